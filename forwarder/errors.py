"""Error responses in OpenAI's shape, as vLLM itself sends them."""

import json

from flask import Response

# The `type` names follow vLLM's (`NotFoundError`, `BadRequestError`): the OpenAI SDK maps the
# status, and people reading logs see the same words vLLM uses.
_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    413: "RequestTooLargeError",
    429: "RateLimitError",
    502: "BadGatewayError",
    503: "ServiceUnavailableError",
    504: "GatewayTimeoutError",
}


def error_body(status: int, message: str) -> bytes:
    error = {"message": message, "type": _TYPES.get(status, "ServerError"), "param": None,
             "code": status}
    return json.dumps({"error": error}).encode()


def error_response(status: int, message: str) -> Response:
    return Response(error_body(status, message), status=status, mimetype="application/json")


class Rejected(Exception):
    """A request refused before it reached a backend, for a limit of the instance's (its queue)
    or of its key; `response()` is the `429` with `Retry-After`."""

    MESSAGES = {
        "queue_full": "Too many requests are waiting for a backend (MAX_QUEUED_REQUESTS).",
        "queue_timeout": "The request waited too long for a backend (QUEUE_TIMEOUT_SECONDS).",
        "queue_overload": "The fleet is overloaded: requests wait longer than "
                          "QUEUE_TARGET_SECONDS for a backend.",
        "key_max_concurrent": "This API key has as many requests in flight as it may "
                              "(max_concurrent).",
        "key_requests_per_minute": "This API key has sent as many requests as it may this "
                                   "minute (requests_per_minute).",
        "key_tokens_per_minute": "This API key has used as many tokens as it may this minute "
                                 "(tokens_per_minute).",
    }

    def __init__(self, reason: str, retry_after: int):
        super().__init__(self.MESSAGES[reason])
        self.reason = reason
        self.retry_after = retry_after

    def response(self):
        response = error_response(429, str(self))
        response.headers["Retry-After"] = str(self.retry_after)
        return response
