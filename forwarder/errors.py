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
