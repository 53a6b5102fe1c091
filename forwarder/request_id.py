"""The request id (`X-Request-Id`): kept when the client sends a usable one, made up otherwise.

It goes to the backend (vLLM uses it as its own request id, so its logs name the same request),
back to the client on every response, and into the access log line (`access_log.py`).
"""

import os
import re

from .access_log import REQUEST_ID_KEY as ENVIRON_KEY

HEADER = "X-Request-Id"
MAX_LENGTH = 128

# Visible ASCII without `"` and `\`: the id is written unquoted into log lines and headers, so a
# client must not be able to break a line or forge a field with it.
_USABLE = re.compile(r"[!#-\[\]-~]{1,%d}" % MAX_LENGTH)


def request_id(environ: dict) -> str:
    """The client's `X-Request-Id` when usable, else a new random one (32 hex digits, like
    vLLM's own ids)."""
    given = environ.get("HTTP_X_REQUEST_ID")
    if given and _USABLE.fullmatch(given):
        return given
    return os.urandom(16).hex()


class RequestIdMiddleware:
    """WSGI middleware: gives each request its id (`environ[ENVIRON_KEY]`) and returns it in
    the response's `X-Request-Id` header."""

    def __init__(self, app):
        self.app = app

    def __call__(self, environ, start_response):
        rid = environ[ENVIRON_KEY] = request_id(environ)

        def start_response_with_id(status, headers, exc_info=None):
            headers.append((HEADER, rid))
            return start_response(status, headers, exc_info)

        return self.app(environ, start_response_with_id)
