"""Relaying between client and backend: which headers cross, and the response body as it arrives.

The body is relayed as the raw bytes the backend sent (still compressed, if it compressed them),
one client write per socket read, so each SSE event reaches the client without waiting for the
next. When the backend dies or goes silent mid-body, or the forwarder is stopping and its grace
period is over (`client_watch.ShuttingDown`), an SSE client gets vLLM's own in-band error event
and `[DONE]`; any other client gets a connection closed before the body is complete, never a
truncated body that looks finished.
"""

import contextlib
import logging

import gevent

from urllib3.exceptions import HTTPError as Urllib3Error
from urllib3.util import SKIP_HEADER
from werkzeug.http import parse_list_header

from . import environ_keys, telemetry, upstream
from .client_watch import ClientGone, ClientWatch, ShuttingDown
from .compat.server import write_now
from .errors import error_body

log = logging.getLogger(__name__)

# RFC 9110 7.6.1 connection-specific headers, plus the obsolete `Proxy-Connection`.
HOP_BY_HOP = frozenset((
    "connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade",
))
# And every `Proxy-*` header (`Proxy-Authorization`, `Proxy-Connection`, `Proxy-Status` …): they
# are meant for the proxy at hand, here the forwarder, and never for the server behind it.
_PROXY_PREFIX = "proxy-"
# `Host` names the backend, not the forwarder; `upstream.send` sets `Content-Length` from the
# body it sends; gunicorn answers `Expect: 100-continue` itself; the forwarder sends its own
# checked `X-Request-Id` (`request_id.py`).
_NOT_FORWARDED = HOP_BY_HOP | {"host", "content-length", "expect", "x-request-id"}
# gunicorn always writes its own `Server` and `Date`, and the forwarder its `X-Request-Id` (vLLM
# echoes it with --enable-request-id-headers): passing the backend's would repeat them.
_NOT_RETURNED = HOP_BY_HOP | {"server", "date", "x-request-id"}

# What urllib3 and http.client send when a request does not say (urllib3's documented way to
# leave them out is SKIP_HEADER).
_ADDED_BY_DEFAULT = ("User-Agent", "Accept-Encoding")

# One read takes whatever has arrived, up to this much.
READ_SIZE = 65536


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


SHUTTING_DOWN = ("The forwarder is shutting down and its grace period is over; "
                 "the response was cut short.")


def sse_error_event(message: str, code: int) -> bytes:
    """vLLM's in-band error event followed by the end-of-stream marker."""
    return b"data: " + error_body(code, message) + b"\n\ndata: [DONE]\n\n"


class KeepAlive:
    """While an SSE response is silent for `seconds`, an SSE comment to its client (load
    balancers cut connections idle for their timeout, 60 s on common cloud ones; SSE clients
    ignore comments). Silence is read off the backend response's byte count (`tell()`) by a
    timer, so relaying a chunk costs nothing more."""

    CHECKS = 4  # a check every seconds / CHECKS: a comment after seconds to 1.25 × seconds

    def __init__(self, response, seconds: float, environ):
        self._response = response
        self._environ = environ
        self._seen = -1
        self._quiet = 0
        self._timer = gevent.get_hub().loop.timer(seconds / self.CHECKS, seconds / self.CHECKS)
        self._timer.start(self._check)

    def _check(self) -> None:
        seen = self._response.tell()
        if seen != self._seen:
            self._seen, self._quiet = seen, 0
            return
        self._quiet += 1
        if self._quiet >= self.CHECKS:
            self._quiet = 0
            gevent.spawn(write_now, self._environ.get(environ_keys.START_RESPONSE),
                         self._environ.get("gunicorn.socket"), KEEP_ALIVE_COMMENT)

    def stop(self) -> None:
        self._timer.close()


KEEP_ALIVE_COMMENT = b": keep-alive\n\n"


def relay_body(response, exchange, sse: bool, watch: "ClientWatch | None", tap=None,
               keep_alive: float = 0.0):
    """Yield the backend's body as it arrives, telling `exchange` (`telemetry.Exchange`) of its
    first and last byte and of a cut; pass each piece through `tap` (`usage.JsonTap` or
    `usage.StreamTap`) when given; keep a silent SSE stream alive every `keep_alive` seconds;
    close the backend connection however it ends (when the client leaves, that close is what
    makes vLLM abort the generation)."""
    read = response.read1
    waiting = watch or contextlib.nullcontext()
    alive = KeepAlive(response, keep_alive, exchange.environ) if sse and keep_alive else None
    feed = tap.feed if tap is not None else None
    try:
        with waiting:
            chunk = read(READ_SIZE)
        exchange.first_byte()
        while chunk:
            if feed is not None:
                chunk = feed(chunk)
            if chunk:
                yield chunk
            with waiting:
                chunk = read(READ_SIZE)
        rest = tap.finish() if tap is not None else None
        exchange.last_byte()
        if rest:
            yield rest
    except ClientGone:
        exchange.cut("client_left")
        telemetry.client_disconnected()
        return
    except ShuttingDown:
        # The worker is about to be killed: an SSE client is told why its stream ends here.
        exchange.cut("shutdown")
        if sse:
            yield sse_error_event(SHUTTING_DOWN, 503)
        elif watch is not None:
            watch.abort_client()
    except GeneratorExit:
        # Closed at a `yield` before the end: gunicorn's write to the client failed.
        exchange.cut("client_left")
        telemetry.client_disconnected()
        raise
    except (Urllib3Error, OSError) as exc:
        if upstream.timed_out(exc):
            exchange.cut("backend_timeout")
            message = (f"The backend {exchange.backend} sent nothing for "
                       f"READ_TIMEOUT_SECONDS in the middle of the response.")
        else:
            exchange.cut("backend_error")
            message = (f"The backend {exchange.backend} broke off the response: "
                       f"{upstream.failure_reason(exc)}.")
        log.warning("request_id=%s: %s", exchange.request_id, message)
        if sse:
            # 502 whatever the cause, as SPEC's in-band example: the request failed upstream.
            yield sse_error_event(message, 502)
        elif watch is not None:
            # Nothing else tells an HTTP client that a body with no length is incomplete.
            watch.abort_client()
    finally:
        if alive is not None:
            alive.stop()
        response.close()
