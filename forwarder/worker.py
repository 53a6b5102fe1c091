"""One gunicorn worker's whole life: start (its poller, pool and log), serve, drain, exit.

`gunicorn.conf.py` names this class as `worker_class`; it is gunicorn's gevent worker
(`compat.server.GeventWorker`) with everything the forwarder does in a worker, in order:

- **Start.** The worker takes the host-table slot the master handed it (`pre_fork` in
  `gunicorn.conf.py`). Once gevent has patched the process and the app is loaded (`run`): the log
  goes where gunicorn's error log goes, the relay's connection pool is sized for
  `worker_connections`, the health poller starts (its share of the instance's polling), so does
  the recorder of the figures `/_status` charts, and what was loaded so far is frozen out of the
  garbage collector's full sweeps (`gc.freeze()`: one walked the ~50,000 objects of a fresh
  worker in 15–25 ms, with every stream waiting).
- **The first-cycle gate.** A worker knows nothing of the fleet until its poller's first cycle
  ends: its `/_health` would answer `503` and a load balancer's probe could take the whole
  instance out of rotation when a worker starts beside others (after a crash, or `SIGTTIN`). So
  it accepts connections only once that cycle is over, or after `Settings.first_cycle_wait` at
  most; meanwhile the workers already running take every connection, and at start-up the kernel
  holds them in the listen queue.
- **Serve.** gunicorn's own loop; after gunicorn's own error answer to a request it could not
  parse, what the client still sends is discarded for a moment (`request_body.linger`), so no
  reset destroys the answer.
- **Share connections.** Every worker of an instance waits on the same listening socket, and the
  first to wake takes a connection, which then stays with it for as long as its client keeps it
  alive: a burst of connections (clients reconnecting their pools to a restarted instance) could
  all land on one worker and leave the others idle. So a worker that holds more than
  ACCEPT_SLACK connections more than the least busy of its siblings stops accepting (nginx's
  `accept_mutex` and `accept_disabled` do the like), and starts again once it no longer does;
  the kernel holds the connections meanwhile and the others take them. A sibling still in its
  first cycle counts for STARTING_SIBLING_SECONDS, so a burst at start-up waits for it that long
  at most.
- **Drain** (`SIGTERM`, and `SIGHUP`, which replaces every worker). gunicorn's worker waits on
  every open connection, idle keep-alive ones included, which could idle for the whole
  `keepalive` time. Closing them at once instead loses requests: a response that ended just
  before or after the signal said `Connection: keep-alive`, and its client sends its next
  request on the connection right away, into a closed socket. So a connection that is between
  requests is kept `DRAIN_IDLE_SECONDS` after its last response, and a request that arrives
  meanwhile is answered with `Connection: close` (gunicorn does that for every request it
  starts after the signal); only then is the connection closed. Shutdown therefore waits for the
  responses in flight and at most that long for idle connections. With
  END_STREAMS_BEFORE_KILL_SECONDS set, responses still running that long before
  `graceful_timeout` runs out are interrupted (`client_watch.end_all`): an SSE stream ends with
  an in-band error event and `[DONE]` rather than being cut off by the master's kill.
- **Exit.** The frozen objects are unfrozen first: frozen, they are left out of the
  interpreter's last collection and torn down after the modules they use, with "Exception
  ignored" tracebacks in the log.
"""

import gc
import logging
import os
import time

import gevent
import gevent.event

from . import settings
from .compat.server import GeventWorker
from .host import table as host_table
from .host.layout import Slot, SlotState
from .relay import client_watch
from .relay.request_body import linger

# After gunicorn's own error answer to a request it could not parse (400, 414, 431 …): at most
# this much of what the client still sends is discarded before the connection closes.
ERROR_LINGER_BYTES = 1 << 20
# Once the worker is stopping, how long a connection is kept open after its last response for a
# request its client may already be sending.
DRAIN_IDLE_SECONDS = 2.0
# A worker accepts while it holds at most this many connections more than the least busy sibling.
ACCEPT_SLACK = 1
# How long a sibling that has not finished its first cycle still counts as one to leave
# connections to, from its start; and how stale a sibling's heartbeat may be before it stops
# counting (a worker stuck on its CPU is no sibling to wait for).
STARTING_SIBLING_SECONDS = 2.0
SIBLING_HEARTBEAT_SECONDS = 2.0
# While a worker leaves connections to its siblings, how often it looks whether to take them again.
ACCEPT_CHECK_SECONDS = 0.02


class _IdleWait:
    """A connection's wait for its next request, silently ended (gunicorn then closes the
    connection) after `keepalive` seconds, or DRAIN_IDLE_SECONDS once the worker is stopping."""

    __slots__ = ("_worker", "_timeout", "_greenlet", "_since", "_ending")

    def __init__(self, worker: "Worker"):
        self._worker = worker
        self._timeout = gevent.Timeout(worker.cfg.keepalive if worker.alive
                                       else DRAIN_IDLE_SECONDS, False)
        self._greenlet = None
        self._since = None
        self._ending = None

    def __enter__(self):
        self._greenlet = gevent.getcurrent()
        self._since = time.monotonic()
        self._worker.idle.add(self)
        return self._timeout.__enter__()

    def __exit__(self, *exc_info):
        self._worker.idle.discard(self)
        if self._ending is not None:
            self._ending.close()
        return self._timeout.__exit__(*exc_info)

    def drain(self) -> None:
        """The worker is stopping: end the wait once it has lasted DRAIN_IDLE_SECONDS."""
        if self._ending is not None:
            return
        remaining = DRAIN_IDLE_SECONDS - (time.monotonic() - self._since)
        self._ending = gevent.get_hub().loop.timer(max(remaining, 0.0))
        self._ending.start(self._end)

    def _end(self) -> None:
        if self in self._worker.idle:
            self._greenlet.throw(self._timeout)


class Worker(GeventWorker):
    """The forwarder's gunicorn worker (see the module docstring for its life)."""

    def init_process(self):
        self.settings = settings.current()
        self.table = host_table.shared()
        slot = getattr(self, "slot", None)
        if slot is None:  # not forked by this project's gunicorn.conf.py: a slot of its own
            slot = self.table.claim_slot()
        self.table.attach(slot, os.getpid())
        self.idle = set()
        self._stream_end = None
        self._paused = None
        super().init_process()

    def run(self):
        # Imported only now that gevent has patched this process: the master imports this module,
        # and what these import (requests, urllib3) must not be loaded unpatched.
        from . import upstream
        from .fleet import registry
        from .fleet.poller import Poller
        from .observe import status_history
        from .tenants.keys import shared_keys

        forwarder_log = logging.getLogger("forwarder")
        forwarder_log.handlers = logging.getLogger("gunicorn.error").handlers
        forwarder_log.setLevel(logging.INFO)
        forwarder_log.propagate = False
        upstream.configure(pool_maxsize=self.cfg.worker_connections)
        fleet = registry.shared()
        keys = shared_keys(self.settings, fleet.table)
        gevent.spawn(Poller(fleet, self.settings, leader_duties=(keys.publish,)).run_forever)
        gevent.spawn(status_history.shared(fleet, keys).run_forever)
        self._wait_for(fleet.first_cycle, self.settings.first_cycle_wait)
        if self.alive:
            self.table.set_own(Slot.STATE, SlotState.READY)
        gc.freeze()
        try:
            super().run()
        finally:
            gc.unfreeze()

    def _wait_for(self, event: gevent.event.Event, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.alive and not event.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            # The master kills a worker that stays silent for `timeout` seconds.
            self.notify()
            event.wait(min(remaining, 1.0))

    def idle_wait(self):
        return _IdleWait(self)

    def connection_opened(self) -> None:
        self.table.add_own(Slot.CONNECTIONS, 1)
        if self._paused is None and self._over_share():
            self.accepting(False)
            self._paused = gevent.get_hub().loop.timer(ACCEPT_CHECK_SECONDS,
                                                       ACCEPT_CHECK_SECONDS)
            self._paused.start(self._check_share)

    def connection_closed(self) -> None:
        self.table.add_own(Slot.CONNECTIONS, -1)

    def _check_share(self) -> None:
        if self.alive and self._over_share():
            return
        self._paused.close()
        self._paused = None
        if self.alive:
            self.accepting(True)

    def _over_share(self) -> bool:
        """Whether a sibling holds more than ACCEPT_SLACK connections fewer than this worker."""
        table, own = self.table, self.table.slot
        now = time.time()
        fewest = None
        for slot in table.live_slots():
            if slot == own or now - table.slot_float(slot, Slot.HEARTBEAT) \
                    > SIBLING_HEARTBEAT_SECONDS:
                continue
            state = table.slot_word(slot, Slot.STATE)
            if state == SlotState.STARTING and now - table.slot_float(slot, Slot.STARTED) \
                    > STARTING_SIBLING_SECONDS:
                continue
            if state in (SlotState.STARTING, SlotState.READY):
                connections = table.slot_word(slot, Slot.CONNECTIONS)
                fewest = connections if fewest is None else min(fewest, connections)
        return fewest is not None and table.slot_word(own, Slot.CONNECTIONS) > fewest + ACCEPT_SLACK

    def after_error_answer(self, client) -> None:
        linger(client, ERROR_LINGER_BYTES)

    def handle_exit(self, sig, frame):
        super().handle_exit(sig, frame)
        self.table.set_own(Slot.STATE, SlotState.DRAINING)
        loop = gevent.get_hub().loop
        loop.run_callback(self._drain_idle_waits)
        # The master kills this worker `graceful_timeout` seconds after telling it to stop: with
        # END_STREAMS_BEFORE_KILL_SECONDS, responses still running are ended a little before,
        # while an ending can still be written.
        end_before_kill = self.settings.end_streams_before_kill_seconds
        if end_before_kill and self._stream_end is None:
            delay = max(self.cfg.graceful_timeout - end_before_kill, 0.0)
            self._stream_end = loop.timer(delay)
            self._stream_end.start(client_watch.end_all)

    def _drain_idle_waits(self) -> None:
        for wait in list(self.idle):
            wait.drain()
