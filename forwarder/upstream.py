"""The wire to the backends: one pooled `requests.Session` per worker, and what its failures mean.

The session keeps no cookies (a backend's `Set-Cookie` must never ride along on another client's
request), ignores proxy environment variables (they must never reroute backend traffic), adds no
default headers of its own, follows no redirects and never retries by itself. `send` hands back
the urllib3 response underneath requests' (`Response.raw`): the relay reads the raw bytes the
backend sent with `read1`, so nothing of requests' decoding is wanted past the headers.
"""

import http.client
import http.cookiejar
import select

import requests
import requests.adapters
from requests.structures import CaseInsensitiveDict
from gevent import monkey
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import NewConnectionError

# Host pools kept per worker: enough for a large fleet, so no backend's connections are evicted.
MAX_BACKEND_POOLS = 1024
# gunicorn's default `worker_connections`; `configure` resizes to the worker's real figure.
DEFAULT_POOL_MAXSIZE = 1000


class ConnectFailed(Exception):
    """No connection could be opened: nothing was sent, so another backend may be tried.
    `stale`: the connection was closed without an answer (see `StaleConnectionError`)."""

    def __init__(self, reason: str, stale: bool = False):
        super().__init__(reason)
        self.stale = stale


class UpstreamTimeout(Exception):
    """The backend accepted the request but sent no response within the read timeout."""


class UpstreamFailed(Exception):
    """The request reached the backend but the exchange broke before a response arrived."""


class StaleConnectionError(NewConnectionError):
    """The backend closed or reset the connection without a single byte of answer.

    Mostly this is the keep-alive race: a server closes an idle connection (its idle timeout, or
    uvicorn closing idle and not-yet-read connections when vLLM shuts down) just as a request is
    sent on it. The server never read that request, so it is sent once more, as if the connection
    had failed to open. The one case it cannot be told apart from is a backend that read the
    request and died before answering anything; vLLM keeps nothing of such a request, and sending
    it once more is what keeps a rolling restart lossless. A request that got any byte of an
    answer, or timed out, is never sent again. A subclass of NewConnectionError so that urllib3
    and requests report it as a connect failure.
    """


# The operating system's poll, not gevent's stand-in for it.
_poll = monkey.get_original("select", "poll")


def _is_connected(connection) -> bool:
    """urllib3's check, before reusing a pooled connection, that the backend has not closed it
    (nothing to read on an idle connection), asked of the kernel directly: urllib3 calls
    `select.poll`, which gevent's patch turns into watchers and a trip through the hub, ~34 µs of
    CPU per request instead of ~2 µs."""
    if connection.sock is None:
        return False
    poller = _poll()
    poller.register(connection.sock, select.POLLIN)
    return not poller.poll(0)


def _connection_class(base):
    class Connection(base):
        is_connected = property(_is_connected)

        def getresponse(self, *args, **kwargs):
            try:
                return super().getresponse(*args, **kwargs)
            except (http.client.RemoteDisconnected, ConnectionResetError) as exc:
                raise StaleConnectionError(self, f"closed without an answer: {exc}") from exc

    Connection.__name__ = Connection.__qualname__ = "Backend" + base.__name__
    return Connection


class _HTTPPool(HTTPConnectionPool):
    ConnectionCls = _connection_class(HTTPConnection)


class _HTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _connection_class(HTTPSConnection)


def make_session(pool_maxsize: int) -> requests.Session:
    session = requests.Session()
    session.trust_env = False
    session.cookies.set_policy(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
    session.headers.clear()
    # pool_block=False: past pool_maxsize a request opens a throwaway connection instead of
    # waiting, because requests passes no pool timeout and a blocked wait would never end.
    adapter = requests.adapters.HTTPAdapter(
        pool_connections=MAX_BACKEND_POOLS, pool_maxsize=pool_maxsize,
        max_retries=0, pool_block=False)
    adapter.poolmanager.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def _transport(session: requests.Session) -> requests.adapters.HTTPAdapter:
    return session.get_adapter("http://")


_session = make_session(DEFAULT_POOL_MAXSIZE)
_adapter = _transport(_session)


def configure(pool_maxsize: int) -> None:
    """Size the connection pool for the worker's concurrency (its `worker_connections`)."""
    global _session, _adapter
    _session = make_session(pool_maxsize)
    _adapter = _transport(_session)


def describe(exc: BaseException) -> str:
    """A short reason for an exception raised while connecting to a backend."""
    text = str(exc).lower()
    if isinstance(exc, (requests.Timeout, TimeoutError)) or "timed out" in text:
        return "timeout"
    if "refused" in text:
        return "connection refused"
    if "resolve" in text or "name or service not known" in text:
        return "name not resolved"
    if "reset" in text:
        return "connection reset"
    return "connection failed"


def send(method: str, url: str, headers: dict, body, connect_timeout: float,
         read_timeout: float, session: "requests.Session | None" = None):
    """Send one request through `session` (the worker's relay session by default); the urllib3
    response with its body unread, to be read as the raw bytes the backend sent (`read1`, or
    `read()` for all of it). After the body's end the connection is back in the pool; `close()`
    before that closes the connection.

    The request goes straight to the session's transport adapter, already prepared: `url` is the
    backend's base URL from `ip.txt` and the client's own path, which gunicorn has checked, and
    everything `Session.request` adds (re-quoting the URL, merging session cookies, headers and
    environment settings, hooks, a cookie jar filled from every response) is either unwanted here
    or switched off. That is ~300 µs of CPU less per request (bench/run.py)."""
    prepared = requests.PreparedRequest()
    prepared.method = method
    prepared.url = url
    prepared.headers = CaseInsensitiveDict(headers)
    if body is not None:
        prepared.headers["Content-Length"] = str(len(body))
    prepared.body = body
    adapter = _adapter if session is None else _transport(session)
    try:
        return adapter.send(prepared, stream=True, timeout=(connect_timeout, read_timeout)).raw
    except requests.ConnectTimeout as exc:
        raise ConnectFailed("timeout") from exc
    except requests.ReadTimeout as exc:
        raise UpstreamTimeout(str(exc)) from exc
    except requests.ConnectionError as exc:
        reason = getattr(exc.args[0], "reason", None) if exc.args else None
        if isinstance(reason, NewConnectionError):
            raise ConnectFailed(describe(reason),
                                stale=isinstance(reason, StaleConnectionError)) from exc
        raise UpstreamFailed(describe(exc)) from exc
    except requests.RequestException as exc:
        raise UpstreamFailed(str(exc)) from exc
