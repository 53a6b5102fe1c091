"""Which headers cross the forwarder, each way, and the credential the backends get.

Hop-by-hop headers never cross (RFC 9110 7.6.1, plus every `Proxy-*` header and the ones a
`Connection` header names). Towards the backend the forwarder also drops what it sets itself or
what names the forwarder rather than the backend (`Host`, `Content-Length`, `Expect`,
`X-Request-Id`), and adds nothing the HTTP client would add of its own. With `BACKEND_API_KEY`
the backend's `Authorization` is the forwarder's, never the client's.
"""

from urllib3.util import SKIP_HEADER
from werkzeug.http import parse_list_header

HOP_BY_HOP = frozenset((
    "connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade",
))
# And every `Proxy-*` header (`Proxy-Authorization`, `Proxy-Connection`, `Proxy-Status` …): they
# are meant for the proxy at hand, here the forwarder, and never for the server behind it.
_PROXY_PREFIX = "proxy-"
# `Host` names the backend, not the forwarder; `upstream.send` sets `Content-Length` from the
# body it sends; gunicorn answers `Expect: 100-continue` itself; the forwarder sends its own
# checked `X-Request-Id` (`observe/request_id.py`).
_NOT_FORWARDED = HOP_BY_HOP | {"host", "content-length", "expect", "x-request-id"}
# gunicorn always writes its own `Server` and `Date`, and the forwarder its `X-Request-Id` (vLLM
# echoes it with --enable-request-id-headers): passing the backend's would repeat them.
_NOT_RETURNED = HOP_BY_HOP | {"server", "date", "x-request-id"}

# What urllib3 and http.client send when a request does not say (urllib3's documented way to
# leave them out is SKIP_HEADER).
_ADDED_BY_DEFAULT = ("User-Agent", "Accept-Encoding")


def _connection_tokens(headers) -> "set[str]":
    value = headers.get("connection")
    return {t.lower() for t in parse_list_header(value)} if value else set()


def request_headers(headers) -> dict:
    """The client's headers as they go to the backend, and nothing the HTTP client would add of
    its own (urllib3's `User-Agent`, http.client's `Accept-Encoding: identity`)."""
    dropped = _NOT_FORWARDED | _connection_tokens(headers)
    forwarded = {name: value for name, value in headers.items()
                 if (lowered := name.lower()) not in dropped
                 and not lowered.startswith(_PROXY_PREFIX)}
    for name in _ADDED_BY_DEFAULT:
        if name not in headers:
            forwarded[name] = SKIP_HEADER
    return forwarded


def response_headers(headers) -> "list[tuple[str, str]]":
    """The backend's headers (a urllib3 `HTTPHeaderDict`, repeated headers kept apart) as they go
    to the client."""
    dropped = _NOT_RETURNED | _connection_tokens(headers)
    return [(name, value) for name, value in headers.items()
            if (lowered := name.lower()) not in dropped and not lowered.startswith(_PROXY_PREFIX)]


def backend_authorization(settings) -> "str | None":
    """The `Authorization` value to send to backends instead of the client's, if any."""
    return f"Bearer {settings.backend_api_key}" if settings.backend_api_key else None
