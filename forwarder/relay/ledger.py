"""Every place one request holds, taken through its `Ledger` and given back by `Ledger.close`,
each exactly once, however the request ends (answered, client gone, backend error, shutdown, an
exception anywhere).

A request holds, in the order it takes them: its key's place (`max_concurrent`) and its count in
the key's minute (`tenants/limits.py`); a place in the instance's queue while it waits for a
backend with room (`brake.py`); and the backend's in-flight count and weight, from the moment it
is sent until its answer has been relayed (`fleet/registry.py`). A failed attempt gives its
backend's place back at once, so that the next attempt takes another.

The view makes the ledger and closes it in a `finally`, unless the last thing it does is to hand
it over to the relayed body (`response_body.RelayedBody`), which closes it when the backend's
body has ended (before the client sees the response end, so a client that sends its next
request at once finds its key's place free) or when gunicorn closes the response, whichever
comes first. Metrics and logs only observe; nothing is given back anywhere else.
"""

from ..fleet.load import WEIGHT_UNITS
from ..observe import metrics


class Ledger:
    """The places of one request (see the module docstring)."""

    __slots__ = ("_limits", "_brake", "key", "backend", "_weight", "_queue_place", "failed",
                 "tokens", "handed_over", "_closed")

    def __init__(self, limits, brake=None):
        self._limits = limits
        self._brake = brake
        # The key (`tenants.keys.Key`) whose place the request holds, and the backend whose.
        self.key = None
        self.backend = None
        self._weight = 0
        # (brake, its entry) while the request waits in the queue.
        self._queue_place = None
        # What the key's counts learn at the end: whether the request failed, the tokens it used.
        self.failed = False
        self.tokens = 0
        # Whether the relayed body closes the ledger (the view's `finally` does otherwise).
        self.handed_over = False
        self._closed = False

    # --- taking ---------------------------------------------------------------------------------

    def take_key(self, key) -> None:
        """A place of `key`, or `errors.Rejected` when the key is over a limit."""
        self._limits.take(key)
        self.key = key

    def join_queue(self, brake, entry) -> None:
        """The request waits in `brake`'s queue as `entry`."""
        self._queue_place = (brake, entry)

    def take_backend(self, backend, weight: int) -> None:
        """The request is being sent to `backend`, weighing `weight`."""
        backend.acquire(weight)
        metrics.in_flight(backend.url).inc()
        self.backend, self._weight = backend, weight

    # --- giving back ----------------------------------------------------------------------------

    def leave_queue(self) -> None:
        """The request is out of the queue (sent on, refused, or gone)."""
        place, self._queue_place = self._queue_place, None
        if place is not None:
            brake, entry = place
            brake.remove(entry)

    def give_back_backend(self) -> None:
        """The backend's place: the attempt failed, or the answer has been relayed."""
        backend, self.backend = self.backend, None
        if backend is None:
            return
        backend.release(self._weight)
        metrics.in_flight(backend.url).dec()
        if self._brake is not None:
            self._brake.notify()

    def prefilled(self) -> None:
        """The answer's first byte: the prompt is prefilled, and from now on the request weighs
        what any one running sequence does."""
        if self.backend is not None and self._weight != WEIGHT_UNITS:
            self.backend.reweigh(WEIGHT_UNITS - self._weight)
            self._weight = WEIGHT_UNITS

    def close(self) -> None:
        """Give back every place still held, each once; a second call does nothing."""
        if self._closed:
            return
        self._closed = True
        try:
            self.leave_queue()
        finally:
            try:
                self.give_back_backend()
            finally:
                key, self.key = self.key, None
                if key is not None:
                    self._limits.give_back(key, self.failed, self.tokens)
