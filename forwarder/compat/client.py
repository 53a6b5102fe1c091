"""The reaches into requests and urllib3 (see `forwarder.compat`). Imported only once gevent has
patched the process: importing urllib3 unpatched leaves its TLS unpatched."""

import http.client
import select

import requests
import requests.adapters
from gevent import monkey
from requests.structures import CaseInsensitiveDict
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool


class StaleConnection(Exception):
    """The backend closed or reset a kept-alive connection without a single byte of answer.

    Deliberately neither an `OSError` nor one of urllib3's or requests' exceptions: those wrap
    and translate what they know, and let anything else pass through as it was raised, with the
    connection discarded."""


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
                raise StaleConnection(f"closed without an answer ({exc!r})") from exc

    Connection.__name__ = Connection.__qualname__ = "Backend" + base.__name__
    return Connection


class _HTTPPool(HTTPConnectionPool):
    ConnectionCls = _connection_class(HTTPConnection)


class _HTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _connection_class(HTTPSConnection)


class BackendAdapter(requests.adapters.HTTPAdapter):
    """requests' transport adapter over connections that check their liveness cheaply and tell a
    connection closed unanswered (`StaleConnection`) from every other failure."""

    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}


def send_prepared(adapter: requests.adapters.HTTPAdapter, method: str, url: str, headers: dict,
                  body, timeout: "tuple[float, float]"):
    """Send one request straight through `adapter`, without `Session.request`; requests'
    `Response`, its body unread (`stream=True`).

    Everything `Session.request` adds (re-quoting the URL, merging session cookies, headers and
    environment settings, hooks, a cookie jar filled from every response) is either unwanted
    here or switched off, and it costs ~300 µs of CPU per request (bench/run.py)."""
    prepared = requests.PreparedRequest()
    prepared.method = method
    prepared.url = url
    prepared.headers = CaseInsensitiveDict(headers)
    if body is not None:
        prepared.headers["Content-Length"] = str(len(body))
    prepared.body = body
    return adapter.send(prepared, stream=True, timeout=timeout)
