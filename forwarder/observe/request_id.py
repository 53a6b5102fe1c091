"""The request id (`X-Request-Id`): kept when the client sends a usable one, made up otherwise.

It goes to the backend (vLLM uses it as its own request id, so its logs name the same request),
back to the client on every response, and into the access log line (`access_log.py`).
"""

import os
import re

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
