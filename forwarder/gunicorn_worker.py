"""gunicorn's gevent worker, made to serve only once it knows the fleet, to drain promptly on
shutdown, to end what still runs at the end of the grace period with an answer when asked to, to
deliver its own error answers whole, and to write to clients with one system call per write.

A worker that has just started knows nothing of the fleet until its poller's first cycle ends: its
`/_health` would answer `503` and its `/_backends` would show every backend unpolled. When a
worker starts beside others (after a crash, or added with `SIGTTIN`), a load balancer's probe
could meet it and take the whole instance out of rotation. So a worker starts accepting
connections only once its first cycle is over, or after `health.first_cycle_wait` at most; until
then the workers already running take every connection, and at start-up the kernel holds them in
the listen queue.

gunicorn's worker waits on every open connection after `SIGTERM`, including keep-alive
connections idling between requests, and those can idle for the whole `keepalive` time: a
forwarder with one idle client would wait out `graceful_timeout` and be killed. This worker closes
connections that are between requests as soon as it is told to stop, and closes every connection
that becomes idle afterwards, so shutdown waits only for responses in flight. With
END_STREAMS_BEFORE_KILL_SECONDS set, responses still running that long before `graceful_timeout`
runs out are interrupted (`client_watch.end_all`): an SSE stream ends with an in-band error event
and `[DONE]` rather than being cut off by the master's kill, and a request still waiting for its
backend's answer gets `503`. By default they run until the kill, as SPEC has it.

gevent's `sendall` asks the kernel for the socket's send-buffer size (a `getsockopt` call) every
time, to cut large writes into pieces; gunicorn writes each relayed SSE event with its own
`sendall`, and that extra system call was ~12 % of the worker's CPU while relaying 256 streams
(bench/run.py). Client sockets here try one plain `send` first, which takes a whole event, and fall
back to gevent's `sendall` for whatever the kernel did not take.
"""

import time

import gevent
import gevent.event
import gevent.socket
from gunicorn.workers.ggevent import GeventWorker

from . import client_watch, settings
from .access import linger

# After gunicorn's own error answer to a request it could not parse (400, 414, 431 …): at most
# this much of what the client still sends is discarded before the connection closes.
ERROR_LINGER_BYTES = 1 << 20


class _ClientSocket(gevent.socket.socket):
    """A client connection whose writes cost one `send` when the kernel takes them whole."""

    __slots__ = ()

    def sendall(self, data, flags=0):
        try:
            sent = self._sock.send(data, flags)
        except BlockingIOError:
            sent = 0
        if sent < len(data):
            super().sendall(memoryview(data)[sent:], flags)


class _IdleWait:
    """The wait for a connection's next request (gunicorn's `timeout_ctx`), which shutdown can end
    early the way the keep-alive timeout ends it: silently, so gunicorn closes the connection."""

    __slots__ = ("_worker", "_timeout", "_greenlet")

    def __init__(self, worker: "Worker"):
        self._worker = worker
        self._timeout = gevent.Timeout(worker.cfg.keepalive if worker.alive else 0, False)
        self._greenlet = None

    def __enter__(self):
        self._greenlet = gevent.getcurrent()
        self._worker.idle.add(self)
        return self._timeout.__enter__()

    def __exit__(self, *exc_info):
        self._worker.idle.discard(self)
        return self._timeout.__exit__(*exc_info)

    def end(self) -> None:
        self._greenlet.throw(self._timeout)


class Worker(GeventWorker):
    """gunicorn's gevent worker with this module's additions: no connection accepted before the
    first poll cycle, idle keep-alive connections that do not hold up shutdown, an optional clean
    end before the kill, lingering after its own error answers, and one-`send` client writes."""

    def init_process(self):
        self.idle = set()
        self._settings = settings.load()
        self._stream_end = None
        super().init_process()

    def run(self):
        # Imported only now that gevent has patched this process: the master imports this module,
        # and what these import (requests, urllib3) must not be loaded unpatched.
        from .health import first_cycle_wait
        from .registry import REGISTRY

        self._wait_for(REGISTRY.first_cycle, first_cycle_wait(self._settings))
        super().run()

    def _wait_for(self, event: gevent.event.Event, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.alive and not event.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            # The master kills a worker that stays silent for `timeout` seconds.
            self.notify()
            event.wait(min(remaining, 1.0))

    def handle(self, listener, client, addr):
        if type(client) is gevent.socket.socket:  # not a TLS socket (gunicorn's `certfile`)
            client.__class__ = _ClientSocket
        super().handle(listener, client, addr)

    def handle_error(self, req, client, addr, exc):
        # gunicorn answers and closes with the rest of the request unread, and closing a socket
        # with unread data sends a reset that can destroy the answer on its way: the client
        # would see a dropped connection instead of the error.
        super().handle_error(req, client, addr, exc)
        if isinstance(exc, Exception):  # not when the worker is stopping (GreenletExit)
            linger(client, ERROR_LINGER_BYTES)

    def timeout_ctx(self):
        return _IdleWait(self)

    def handle_exit(self, sig, frame):
        super().handle_exit(sig, frame)
        loop = gevent.get_hub().loop
        loop.run_callback(self._end_idle_waits)
        # The master kills this worker `graceful_timeout` seconds after telling it to stop: with
        # END_STREAMS_BEFORE_KILL_SECONDS, responses still running are ended a little before,
        # while an ending can still be written.
        end_before_kill = self._settings.end_streams_before_kill_seconds
        if end_before_kill and self._stream_end is None:
            delay = max(self.cfg.graceful_timeout - end_before_kill, 0.0)
            self._stream_end = loop.timer(delay)
            self._stream_end.start(client_watch.end_all)

    def _end_idle_waits(self) -> None:
        for wait in list(self.idle):
            wait.end()
