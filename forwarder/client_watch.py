"""Noticing that the client went away while the forwarder waits on the backend.

gunicorn only learns that a client left when a write to it fails, and nothing is written while a
backend prefills or computes a non-streaming answer: vLLM would go on burning GPU time for nobody.
A `ClientWatch` waits for the client's socket to become readable; end-of-file there means the
client closed, and the request's greenlet is interrupted with `ClientGone` if it is blocked on the
backend at that moment. Its upstream connection is then closed, which makes vLLM abort.
"""

import socket

import gevent


class ClientGone(Exception):
    """The client closed its connection; the backend connection must be dropped."""


class ClientWatch:
    """Watch one client socket for the life of one response."""

    __slots__ = ("_socket", "_greenlet", "_waiting", "gone", "_watcher")

    def __init__(self, client_socket):
        self._socket = client_socket
        self._greenlet = gevent.getcurrent()
        self._waiting = False
        self.gone = False
        self._watcher = None

    def start(self) -> None:
        """Start watching; only once the request body has been read, or its bytes would look
        like the client still talking."""
        if self._watcher is None:
            # A bare io watcher whose callback runs in the hub, not a greenlet parked in
            # `wait_read`: a watch is made for every request, and spawning, switching to and
            # killing a greenlet each time cost about a tenth of the worker's CPU (bench/run.py,
            # scenario 1).
            self._watcher = gevent.get_hub().loop.io(self._socket.fileno(), 1)
            self._watcher.start(self._readable)

    def _readable(self) -> None:
        self._watcher.stop()
        try:
            # The OS-level socket, which never blocks: gevent's own `recv` may not wait in the hub.
            if self._socket._sock.recv(1, socket.MSG_PEEK):
                return  # the client sent more (a pipelined request): it is still there
        except BlockingIOError:
            self._watcher.start(self._readable)  # a spurious wake-up: keep watching
            return
        except OSError:
            pass
        self.gone = True
        # Thrown from the hub, the way gevent.Timeout interrupts a greenlet, and only while the
        # request is blocked on the backend: never into the middle of gunicorn's own code.
        if self._waiting:
            self._greenlet.throw(ClientGone())

    def __enter__(self) -> "ClientWatch":
        """Enter a wait on the backend that the client's leaving may interrupt."""
        if self.gone:
            raise ClientGone()
        self._waiting = True
        return self

    def __exit__(self, *exc_info) -> None:
        self._waiting = False

    def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.close()

    def abort_client(self) -> None:
        """Cut the client's connection, so that it sees a response body end before its end."""
        try:
            self._socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
