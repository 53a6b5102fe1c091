"""The wire to the backends: one pooled `requests` transport per worker, and the one table that
translates its failures into what they mean for a request.

The session keeps no cookies (a backend's `Set-Cookie` must never ride along on another client's
request), ignores proxy environment variables (they must never reroute backend traffic), adds no
default headers of its own, follows no redirects and never retries by itself. `send` hands back
the urllib3 response underneath requests' (`Response.raw`): the relay reads the raw bytes the
backend sent with `read1`, so nothing of requests' decoding is wanted past the headers.

A failure is classified by the types in its exception chain (`failure_reason`), never by its
message text.
"""

import http.client
import http.cookiejar
import socket

import requests
import urllib3.exceptions

from .compat.client import BackendAdapter, StaleConnection, send_prepared

# Host pools kept per worker: enough for a large fleet, so no backend's connections are evicted.
MAX_BACKEND_POOLS = 1024
# gunicorn's default `worker_connections`; `configure` resizes to the worker's real figure.
DEFAULT_POOL_MAXSIZE = 1000


class ConnectFailed(Exception):
    """Nothing was sent: another backend may be tried. `stale`: a kept-alive connection was closed
    without an answer (the keep-alive race, see `send`), which says nothing of the backend's
    health."""

    def __init__(self, reason: str, stale: bool = False):
        super().__init__(reason)
        self.stale = stale


class UpstreamTimeout(Exception):
    """The backend accepted the request but sent no response within the read timeout."""


class UpstreamFailed(Exception):
    """The request reached the backend but the exchange broke before a response arrived."""


def _chain(exc: BaseException):
    """`exc` and the exceptions it was raised from or while handling, outermost first."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        reason = getattr(exc, "reason", None)  # urllib3's MaxRetryError names its cause here
        exc = reason if isinstance(reason, BaseException) else (exc.__cause__ or exc.__context__)


# Most specific first: urllib3 keeps NewConnectionError a subclass of its ConnectTimeoutError.
_REASONS = (
    (ConnectionRefusedError, "connection refused"),
    (ConnectionResetError, "connection reset"),
    ((urllib3.exceptions.ProtocolError, http.client.IncompleteRead), "connection closed"),
    ((socket.gaierror, urllib3.exceptions.NameResolutionError), "name not resolved"),
    ((TimeoutError, requests.Timeout, urllib3.exceptions.ReadTimeoutError), "timeout"),
)


def failure_reason(exc: BaseException) -> str:
    """A short reason for a failed exchange, as `/_backends` shows it in `last_error`."""
    chain = tuple(_chain(exc))
    for kinds, reason in _REASONS:
        if any(isinstance(link, kinds) for link in chain):
            return reason
    return "connection failed"


def timed_out(exc: BaseException) -> bool:
    """Whether a failed exchange was a timeout rather than a broken connection."""
    return failure_reason(exc) == "timeout"


def _never_connected(exc: BaseException) -> bool:
    # urllib3's connect failures, NewConnectionError included, are ConnectTimeoutErrors.
    return any(isinstance(link, urllib3.exceptions.ConnectTimeoutError) for link in _chain(exc))


def make_session(pool_maxsize: int) -> requests.Session:
    session = requests.Session()
    session.trust_env = False
    session.cookies.set_policy(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
    session.headers.clear()
    # pool_block=False: past pool_maxsize a request opens a throwaway connection instead of
    # waiting, because requests passes no pool timeout and a blocked wait would never end.
    adapter = BackendAdapter(pool_connections=MAX_BACKEND_POOLS, pool_maxsize=pool_maxsize,
                             max_retries=0, pool_block=False)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def _transport(session: requests.Session) -> requests.adapters.HTTPAdapter:
    return session.get_adapter("http://")


_adapter = _transport(make_session(DEFAULT_POOL_MAXSIZE))


def configure(pool_maxsize: int) -> None:
    """Size the connection pool for the worker's concurrency (its `worker_connections`)."""
    global _adapter
    _adapter = _transport(make_session(pool_maxsize))


def send(method: str, url: str, headers: dict, body, connect_timeout: float,
         read_timeout: float, session: "requests.Session | None" = None):
    """Send one request through `session` (the worker's relay session by default); the urllib3
    response with its body unread, to be read as the raw bytes the backend sent (`read1`, or
    `read()` for all of it). After the body's end the connection is back in the pool; `close()`
    before that closes the connection.

    `url` is the backend's base URL from `ip.txt` and the client's own path, which the proxy has
    checked. A connection closed or reset without a byte of answer is `ConnectFailed(stale=True)`:
    mostly the keep-alive race (a server closes an idle connection, its idle timeout or uvicorn
    shutting down, just as a request is sent on it), so the server never read the request. The one
    case it cannot be told from is a backend that read the request and died before answering
    anything; vLLM keeps nothing of such a request, and sending it once more is what keeps a
    rolling restart lossless. A request that got any byte of an answer, or timed out, is never
    reported as stale."""
    adapter = _adapter if session is None else _transport(session)
    try:
        return send_prepared(adapter, method, url, headers, body,
                             (connect_timeout, read_timeout)).raw
    except StaleConnection as exc:
        raise ConnectFailed("closed without an answer", stale=True) from exc
    except requests.ConnectTimeout as exc:
        raise ConnectFailed("timeout") from exc
    except requests.ReadTimeout as exc:
        raise UpstreamTimeout(str(exc)) from exc
    except requests.ConnectionError as exc:
        if _never_connected(exc):
            raise ConnectFailed(failure_reason(exc)) from exc
        raise UpstreamFailed(failure_reason(exc)) from exc
    except requests.RequestException as exc:
        raise UpstreamFailed(failure_reason(exc)) from exc


class WholeAnswer:
    """A backend's answer read whole before the client gets a byte of it, so that an answer
    its backend breaks off can be asked again elsewhere: the urllib3 response's status and
    headers, and its body (raw, as the backend sent it) given back by `read1`."""

    __slots__ = ("status", "headers", "_body", "_response")

    def __init__(self, response, body: bytes):
        self.status = response.status
        self.headers = response.headers
        self._body = body
        self._response = response

    def read1(self, size: int = -1) -> bytes:
        body, self._body = self._body, b""
        return body

    def tell(self) -> int:
        return self._response.tell()

    def close(self) -> None:
        self._response.close()


def read_whole(response, limit: int):
    """`response` with its body read whole (a `WholeAnswer`), when it is at most `limit` bytes;
    else as it was, what was read of it already given back first. `UpstreamFailed` when the
    backend breaks off the body (`UpstreamTimeout` when it goes silent)."""
    pieces, size = [], 0
    try:
        while size <= limit:
            piece = response.read1(65536)
            if not piece:
                return WholeAnswer(response, b"".join(pieces))
            pieces.append(piece)
            size += len(piece)
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        if timed_out(exc):
            response.close()
            raise UpstreamTimeout(str(exc)) from exc
        raise BodyCut(failure_reason(exc), _Cut(response, b"".join(pieces), exc)) from exc
    return _Started(response, b"".join(pieces))


class BodyCut(UpstreamFailed):
    """The backend broke off its answer's body before the client got a byte of it; `answer`
    relays what came, then the same break."""

    def __init__(self, reason: str, answer: "WholeAnswer"):
        super().__init__(reason)
        self.answer = answer


class _Cut(WholeAnswer):
    """What came of a body its backend broke off, then the break."""

    __slots__ = ("_break",)

    def __init__(self, response, body: bytes, broken: BaseException):
        super().__init__(response, body)
        self._break = broken

    def read1(self, size: int = -1) -> bytes:
        if self._body:
            return super().read1(size)
        raise self._break


class _Started(WholeAnswer):
    """An answer too long to be read whole: what was read, then the rest as it comes."""

    __slots__ = ()

    def read1(self, size: int = -1) -> bytes:
        if self._body:
            return super().read1(size)
        return self._response.read1(size)
