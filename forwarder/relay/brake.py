"""The brake: at most MAX_IN_FLIGHT_PER_BACKEND requests in flight to one backend per instance,
and the instance's queue for the requests that find every candidate at that limit.

- **Late binding.** A queued request is not bound to a backend: when any backend frees up, the
  waiter at the head of the queue that may go there is woken and picks again, so it goes to the
  first backend that freed up.
- **Order.** The queue is served by the body's `priority` (vLLM's: lower first, 0 when absent),
  then by turn, then by arrival. A request's turn is the number of requests of the same client
  (its API key's name, else its address) already waiting at the same priority, so a client's
  burst takes turns with everyone else instead of going first. Each worker keeps its own queue;
  the head of each is in the host table, and a worker leaves a free backend to a sibling whose
  head comes first.
- **Refusals**, `429` with `Retry-After`: the instance's queue already holds MAX_QUEUED_REQUESTS
  (`queue_full`, at once); a request waited QUEUE_TIMEOUT_SECONDS (`queue_timeout`); or the queue
  has not emptied for QUEUE_TARGET_SECONDS, and then every request in it that has waited that
  long is refused until it empties again (`queue_overload`: CoDel's rule, which keeps what is
  served fast under overload instead of making everyone wait QUEUE_TIMEOUT_SECONDS).
- A client that leaves while its request waits takes the request out of the queue at once (the
  wait is interrupted by its client watch).

The body is parsed for `priority` only when its request has to wait. With no limit set, nothing
here runs. Every time the brake decides on comes from its `clock` (monotonic: the same in every
worker of a host), so its rules are tested with a fake one.
"""

import bisect
import itertools
import math
import time

import gevent
import gevent.event

from ..errors import Rejected
from ..host.layout import Slot, SlotState
from ..observe import metrics

# How often a worker with requests waiting looks for a backend that freed up (its own releases
# are seen at once), and for requests to refuse.
TICK_SECONDS = 0.005


def _order(entry) -> tuple:
    return entry.order


class QueueEntry:
    """One request waiting in a worker's queue."""

    __slots__ = ("order", "queued_at", "candidates", "event", "refused", "client", "priority")

    def __init__(self, order, queued_at, candidates, client, priority):
        # (priority, turn, first queued at, arrival number): the queue's order.
        self.order = order
        self.queued_at = queued_at
        self.candidates = candidates
        self.client = client
        self.priority = priority
        self.event = gevent.event.Event()
        self.refused = None


class Brake:
    """One worker's part of the brake."""

    def __init__(self, settings, table, clock=time.monotonic):
        self.limit = settings.max_in_flight_per_backend
        self.max_queued = settings.max_queued_requests
        self.timeout = settings.queue_timeout_seconds
        self.target = settings.queue_target_seconds
        self.retry_after = max(1, math.ceil(self.target))
        self.table = table
        self.clock = clock
        self._queue = []  # in order: the head first
        self._turns = {}  # (priority, client) -> requests of that client waiting
        self._arrivals = itertools.count()
        self._ticker = None

    def with_room(self, members) -> tuple:
        """The members with room for one more request."""
        limit = self.limit
        return tuple(b for b in members if b.in_flight < limit)

    def must_wait(self) -> bool:
        """Whether a request that found room must still queue behind the instance's waiters."""
        return self.table.slot_sum(Slot.QUEUED) > 0

    def wait(self, ledger, candidates, priority_of, client: str, waiting,
             since: "float | None" = None) -> float:
        """Queue the request of `ledger` until a backend it may go to has room (then return: it
        picks again), or refuse it (`Rejected`). `candidates()` gives the backends it may go to
        now (a tuple); `priority_of()` gives its priority (called once, now); `waiting` is
        entered around the wait; `since` is when it first queued, for a request that comes back
        to the queue (the room it was woken for was taken meanwhile). Returns when it first
        queued."""
        now = self.clock()
        if since is None and self.table.slot_sum(Slot.QUEUED) >= self.max_queued:
            self._refuse("queue_full", 0.0)
        priority = priority_of()
        turn_key = (priority, client)
        turn = self._turns.get(turn_key, 0)
        self._turns[turn_key] = turn + 1
        queued_at = now if since is None else since
        entry = QueueEntry((priority, turn, queued_at, next(self._arrivals)), queued_at,
                           candidates, client, priority)
        bisect.insort(self._queue, entry, key=_order)
        ledger.join_queue(self, entry)
        try:
            self._publish()
            self._hand_out()
            if self._ticker is None:
                self._ticker = gevent.spawn(self._tick_while_waiting)
            with waiting:
                entry.event.wait()
        finally:
            ledger.leave_queue()
        waited = self.clock() - queued_at
        if entry.refused:
            self._refuse(entry.refused, waited)
        metrics.queue_waited(waited)
        return queued_at

    def remove(self, entry: QueueEntry) -> None:
        """`entry` leaves the queue (`Ledger.leave_queue`)."""
        self._queue.remove(entry)
        turn_key = (entry.priority, entry.client)
        left = self._turns.get(turn_key, 1) - 1
        if left:
            self._turns[turn_key] = left
        else:
            self._turns.pop(turn_key, None)
        self._publish()

    def notify(self) -> None:
        """A backend may have freed up in this worker: look at the queue now."""
        if self._queue and self._ticker is not None:
            self._hand_out()

    def tick(self) -> None:
        """Refuse what waited too long, and wake what may go."""
        self._refuse_late()
        self._hand_out()

    def _tick_while_waiting(self) -> None:
        try:
            while self._queue:
                self.tick()
                gevent.sleep(TICK_SECONDS)
        finally:
            self._ticker = None

    def _refuse(self, reason: str, waited: float):
        metrics.rejected(reason)
        if reason != "queue_full":
            metrics.queue_waited(waited)
        raise Rejected(reason, self.retry_after)

    def _publish(self) -> None:
        """This worker's queue as the host table shows it to the others."""
        table = self.table
        queued = len(self._queue)
        if queued and not table.slot_word(table.slot, Slot.QUEUED):
            table.set_own_float(Slot.QUEUE_SINCE, self.clock())
        table.set_own(Slot.QUEUED, queued)
        if queued:
            head = self._queue[0]
            table.set_own(Slot.HEAD_PRIORITY, head.order[0])
            table.set_own(Slot.HEAD_TURN, head.order[1])
            table.set_own_float(Slot.HEAD_ARRIVAL, head.queued_at)

    def _refuse_late(self) -> None:
        """A request that waited QUEUE_TIMEOUT_SECONDS is refused; and CoDel's rule: once the
        instance's queue stood for the target, every request that waited that long is."""
        table = self.table
        now = self.clock()
        standing = min((table.slot_float(slot, Slot.QUEUE_SINCE) for slot in table.live_slots()
                        if table.slot_word(slot, Slot.QUEUED)), default=now)
        overloaded = now - standing >= self.target
        for entry in self._queue:
            if entry.event.is_set():
                continue
            waited = now - entry.queued_at
            if waited >= self.timeout:
                entry.refused = "queue_timeout"
            elif overloaded and waited >= self.target:
                entry.refused = "queue_overload"
            else:
                continue
            entry.event.set()

    def _hand_out(self) -> None:
        """Wake the waiters that may go now, in order, one per free place, leaving a place to
        each sibling whose head comes before them."""
        table = self.table
        limit = self.limit
        free = {}  # candidates -> free places not yet handed out
        ahead = []
        for slot in table.live_slots():
            if slot != table.slot and table.slot_word(slot, Slot.QUEUED) and \
                    table.slot_word(slot, Slot.STATE) in (SlotState.STARTING, SlotState.READY):
                ahead.append((table.slot_word(slot, Slot.HEAD_PRIORITY),
                              table.slot_word(slot, Slot.HEAD_TURN),
                              table.slot_float(slot, Slot.HEAD_ARRIVAL)))
        for entry in self._queue:
            if entry.event.is_set():
                continue
            candidates = entry.candidates()
            places = free.get(candidates)
            if places is None:
                places = sum(max(0, limit - backend.in_flight) for backend in candidates)
            before = sum(1 for head in ahead if head < entry.order[:3])
            if places - before > 0:
                entry.event.set()
                places -= 1
            free[candidates] = places
            if not any(free.values()):
                break
