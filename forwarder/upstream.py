"""The wire to the backends: one urllib3 `PoolManager` per worker, and what its failures mean.

urllib3 itself, not requests on top of it: requests' per-request work (preparing, merging session
settings, hooks, cookie extraction) cost ~450 µs of the worker's CPU per proxied request
(bench/run.py), and the forwarder needs none of it. The pool keeps no cookies (a backend's
`Set-Cookie` must never ride along on another client's request), ignores proxy environment
variables (they must never reroute backend traffic), adds no default headers of its own, follows
no redirects and never retries: a request that reached a backend is not sent twice.
"""

import http.client
import select

import urllib3
from gevent import monkey
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, HTTPError, NewConnectionError, ReadTimeoutError

# Host pools kept per worker: enough for a large fleet, so no backend's connections are evicted.
MAX_BACKEND_POOLS = 1024
# gunicorn's default `worker_connections`; `configure` resizes to the worker's real figure.
DEFAULT_POOL_MAXSIZE = 1000


class ConnectFailed(Exception):
    """No connection could be opened: nothing was sent, so another backend may be tried.
    `stale`: a kept-alive connection turned out closed (see `StaleConnectionError`)."""

    def __init__(self, reason: str, stale: bool = False):
        super().__init__(reason)
        self.stale = stale


class StaleConnectionError(NewConnectionError):
    """A kept-alive connection that the backend closed or reset without a byte of answer.

    This is the keep-alive race: a server closes an idle connection (its idle timeout, or
    uvicorn closing idle connections when vLLM shuts down) just as a request is sent on it. The
    server never read that request, so it is sent again on a fresh connection, as if that
    connection had failed to open. (The one case it cannot be told apart from: a backend that
    read the request and died before answering a byte; vLLM keeps nothing of such a request.)
    A subclass of NewConnectionError so that urllib3 reports it as a connect failure.
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


class _PolledHTTPConnection(HTTPConnection):
    is_connected = property(_is_connected)


class _PolledHTTPSConnection(HTTPSConnection):
    is_connected = property(_is_connected)


def _stale_aware(connection_class):
    class Connection(connection_class):
        _answered = False  # has this connection carried a whole exchange already?

        def getresponse(self, *args, **kwargs):
            try:
                response = super().getresponse(*args, **kwargs)
            except (http.client.RemoteDisconnected, ConnectionResetError) as exc:
                if self._answered:
                    raise StaleConnectionError(self, f"kept-alive connection dropped: {exc}") \
                        from exc
                raise
            self._answered = True
            return response

    Connection.__name__ = Connection.__qualname__ = "StaleAware" + connection_class.__name__
    return Connection


class _HTTPPool(HTTPConnectionPool):
    ConnectionCls = _stale_aware(_PolledHTTPConnection)


class _HTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _stale_aware(_PolledHTTPSConnection)


class UpstreamTimeout(Exception):
    """The backend accepted the request but sent no response within the read timeout."""


class UpstreamFailed(Exception):
    """The request reached the backend but the exchange broke before a response arrived."""


def make_pool(pool_maxsize: int) -> urllib3.PoolManager:
    # block=False: past pool_maxsize a request opens a throwaway connection instead of waiting
    # for a pooled one to come back.
    manager = urllib3.PoolManager(num_pools=MAX_BACKEND_POOLS, maxsize=pool_maxsize,
                                  block=False, retries=False)
    manager.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}
    return manager


_pool = make_pool(DEFAULT_POOL_MAXSIZE)


def configure(pool_maxsize: int) -> None:
    """Size the connection pool for the worker's concurrency (its `worker_connections`)."""
    global _pool
    _pool = make_pool(pool_maxsize)


def describe(exc: BaseException) -> str:
    """A short reason for an exception raised while connecting to a backend."""
    text = str(exc).lower()
    if isinstance(exc, TimeoutError) or "timed out" in text:
        return "timeout"
    if "refused" in text:
        return "connection refused"
    if "resolve" in text or "name or service not known" in text:
        return "name not resolved"
    if "reset" in text:
        return "connection reset"
    return "connection failed"


def send(method: str, url: str, headers: dict, body, connect_timeout: float,
         read_timeout: float) -> urllib3.BaseHTTPResponse:
    """Send one request and return the response with its body unread, to be read as the raw
    bytes the backend sent (`read1`). After the body's end the connection is back in the pool;
    `close()` before that closes the connection."""
    if body is not None and not isinstance(body, bytes):
        # A body streamed from the client: urllib3 would send it chunked without a length.
        headers["Content-Length"] = str(len(body))
    try:
        return _pool.urlopen(method, url, body=body, headers=headers, redirect=False,
                             retries=False, preload_content=False, decode_content=False,
                             timeout=urllib3.Timeout(connect=connect_timeout, read=read_timeout))
    except NewConnectionError as exc:  # before ConnectTimeoutError: it is a subclass of it
        raise ConnectFailed(describe(exc), stale=isinstance(exc, StaleConnectionError)) from exc
    except ConnectTimeoutError as exc:
        raise ConnectFailed("timeout") from exc
    except ReadTimeoutError as exc:
        raise UpstreamTimeout(str(exc)) from exc
    except (HTTPError, OSError) as exc:
        raise UpstreamFailed(describe(exc)) from exc
