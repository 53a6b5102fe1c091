"""Noticing that the client went away while the forwarder waits on the backend.

gunicorn only learns that a client left when a write to it fails, and nothing is written while a
backend prefills or computes a non-streaming answer: vLLM would go on burning GPU time for nobody.
A `ClientWatch` waits for the client's socket to become readable; end-of-file there means the
client closed, and the request's greenlet is interrupted with `ClientGone` if it is blocked on the
backend at that moment. Its upstream connection is then closed, which makes vLLM abort.
"""

import socket

import gevent
from gevent.socket import wait_read


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
            self._watcher = gevent.spawn(self._watch, self._socket)

    def _watch(self, client_socket) -> None:
        try:
            wait_read(client_socket.fileno())
            if client_socket.recv(1, socket.MSG_PEEK):
                return  # the client sent more (a pipelined request): it is still there
        except OSError:
            pass
        self.gone = True
        # Thrown from the hub, the way gevent.Timeout interrupts a greenlet, and only while the
        # request is blocked on the backend: never into the middle of gunicorn's own code.
        gevent.get_hub().loop.run_callback(self._interrupt)

    def _interrupt(self) -> None:
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
            self._watcher.kill(block=False)

    def abort_client(self) -> None:
        """Cut the client's connection, so that it sees a response body end before its end."""
        try:
            self._socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
