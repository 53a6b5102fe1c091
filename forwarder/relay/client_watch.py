"""Interrupting a response's waits on the backend: when its client went away, and when the worker
must end it before being killed.

gunicorn only learns that a client left when a write to it fails, and nothing is written while a
backend prefills or computes a non-streaming answer: vLLM would go on burning GPU time for nobody.
A `ClientWatch` waits for the client's socket to become readable; end-of-file there means the
client closed, and the request's greenlet is interrupted with `ClientGone` if it is blocked on the
backend at that moment. Its upstream connection is then closed, which makes vLLM abort.

A stopping worker lets responses run for gunicorn's `graceful_timeout`, and then its master kills
it: a stream still running is cut off mid-body, and the client cannot tell why. Shortly before
that, `end_all` interrupts every watched response with `ShuttingDown` instead, so that it can end
with an answer the client understands.
"""

import socket
import weakref

import gevent

from ..compat.server import raw_socket


class ClientGone(Exception):
    """The client closed its connection; the backend connection must be dropped."""


class ShuttingDown(Exception):
    """The worker is stopping and its grace period is nearly over: end the response now."""


# The watches of the responses in progress, for `end_all`; weak, so that a watch a failed request
# never stopped is not kept alive by this.
_watching = weakref.WeakSet()


def end_all() -> None:
    """Interrupt every response in progress with `ShuttingDown`, now if it is waiting on its
    backend, else at its next wait."""
    for watch in list(_watching):
        watch.end()


class ClientWatch:
    """Watch one client socket for the life of one response."""

    __slots__ = ("_socket", "_greenlet", "_waiting", "gone", "ending", "_watcher", "__weakref__")

    def __init__(self, client_socket):
        self._socket = client_socket
        self._greenlet = gevent.getcurrent()
        self._waiting = False
        self.gone = False
        self.ending = False
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
            _watching.add(self)

    def _readable(self) -> None:
        self._watcher.stop()
        try:
            # The OS-level socket, which never blocks: gevent's own `recv` may not wait in the hub.
            if raw_socket(self._socket).recv(1, socket.MSG_PEEK):
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
        if self.ending:
            raise ShuttingDown()
        self._waiting = True
        return self

    def __exit__(self, *exc_info) -> None:
        self._waiting = False

    def end(self) -> None:
        """Interrupt the response with `ShuttingDown` (see `end_all`)."""
        self.ending = True
        if self._waiting:
            self._greenlet.throw(ShuttingDown())

    def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.close()
        _watching.discard(self)

    def abort_client(self) -> None:
        """Cut the client's connection, so that it sees a response body end before its end."""
        try:
            self._socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
