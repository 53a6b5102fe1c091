"""gunicorn's gevent worker, made to drain promptly on shutdown.

gunicorn's worker waits on every open connection after `SIGTERM`, including keep-alive
connections idling between requests, and those can idle for the whole `keepalive` time: a
forwarder with one idle client would wait out `graceful_timeout` and be killed. This worker closes
connections that are between requests as soon as it is told to stop, and closes every connection
that becomes idle afterwards, so shutdown waits only for responses in flight.
"""

import gevent
from gunicorn.workers.ggevent import GeventWorker


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
    """A gevent worker whose idle keep-alive connections do not hold up shutdown."""

    def init_process(self):
        self.idle = set()
        super().init_process()

    def timeout_ctx(self):
        return _IdleWait(self)

    def handle_exit(self, sig, frame):
        super().handle_exit(sig, frame)
        gevent.get_hub().loop.run_callback(self._end_idle_waits)

    def _end_idle_waits(self) -> None:
        for wait in list(self.idle):
            wait.end()
