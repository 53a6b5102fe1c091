"""The reaches into gunicorn and gevent (see `forwarder.compat`). Safe to import in gunicorn's
master: it loads neither requests nor urllib3."""

import gevent.server
import gevent.socket
from gevent import monkey
from gunicorn.workers import ggevent as _ggevent


def raw_socket(sock: gevent.socket.socket):
    """The OS-level socket under a gevent socket: its `send` and `recv` never wait in the hub."""
    return sock._sock


class _ClientSocket(gevent.socket.socket):
    """A client connection whose writes cost one `send` when the kernel takes them whole.

    gevent's `sendall` asks the kernel for the socket's send-buffer size (a `getsockopt` call)
    every time, to cut large writes into pieces; gunicorn writes each relayed SSE event with its
    own `sendall`, and that extra system call was ~12 % of the worker's CPU while relaying 256
    streams (bench/run.py)."""

    __slots__ = ()

    def sendall(self, data, flags=0):
        try:
            sent = self._sock.send(data, flags)
        except BlockingIOError:
            sent = 0
        if sent < len(data):
            super().sendall(memoryview(data)[sent:], flags)


class _ListeningServer(gevent.server.StreamServer):
    """gevent's server, known to the worker whose `run` made it, so that the worker can stop and
    start its accepting."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _servers.append(self)


_servers = []


class GeventWorker(_ggevent.GeventWorker):
    """gunicorn's gevent worker with the undocumented seams the forwarder's worker uses given names
    of their own: `idle_wait`, `after_error_answer`, `connection_opened` and `connection_closed`
    to override, `accepting` to switch, and client sockets that write with one `send`."""

    def init_process(self):
        # gunicorn's `run` makes its servers from this module-level name; in this process only.
        _ggevent.StreamServer = _ListeningServer
        super().init_process()

    def accepting(self, on: bool) -> None:
        """Accept new connections, or leave them to the other workers (and the listen queue)."""
        for server in _servers:
            if server.closed:
                continue
            if on:
                server.start_accepting()
            else:
                server.stop_accepting()

    def connection_opened(self) -> None:
        """A client connection was accepted."""

    def connection_closed(self) -> None:
        """A client connection ended."""

    def idle_wait(self):
        """The context in which a connection waits for its next request (by default gunicorn's,
        which ends it silently after `keepalive` seconds)."""
        return super().timeout_ctx()

    def after_error_answer(self, client) -> None:
        """Called once gunicorn has answered a request it could not parse (400, 414, 431 …)."""

    def timeout_ctx(self):
        return self.idle_wait()

    def handle(self, listener, client, addr):
        if type(client) is gevent.socket.socket:  # not a TLS socket (gunicorn's `certfile`)
            client.__class__ = _ClientSocket
        self.connection_opened()
        try:
            super().handle(listener, client, addr)
        finally:
            self.connection_closed()

    def handle_error(self, req, client, addr, exc):
        super().handle_error(req, client, addr, exc)
        if isinstance(exc, Exception):  # not when the worker is stopping (GreenletExit)
            self.after_error_answer(client)


def close_connection(start_response) -> None:
    """Make gunicorn answer with `Connection: close` and end the connection after the answer;
    called before the answer's first byte is written. Under another WSGI server, nothing."""
    response = getattr(start_response, "__self__", None)
    if hasattr(response, "force_close"):
        response.force_close()


_select = monkey.get_original("select", "select")


def write_now(start_response, client_socket, data: bytes) -> bool:
    """Write `data` to the client as a piece of the response body, outside the body's iteration
    (its headers first, if not sent yet), through the same gunicorn `Response` as the body; only
    when the client's socket takes it at once, so that the write never waits and so never
    interleaves with the body's own writes. True if written."""
    response = getattr(start_response, "__self__", None)
    if not hasattr(response, "write") or client_socket is None:
        return False
    try:
        if not _select([], [client_socket.fileno()], [], 0)[1]:
            return False
        response.write(data)
    except OSError:
        return False
    return True


def operator_access_log_format(cfg) -> bool:
    """Whether the operator set gunicorn's `access_log_format` (`--access-logformat`)."""
    setting = cfg.settings["access_log_format"]
    return setting.value != setting.default
