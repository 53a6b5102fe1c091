"""Sending one request to a backend: pick, resend, pass over, wait, or say why not.

The rules, in the order `Dispatcher.send` applies them:

- Candidates are the healthy backends serving the request's model. None serving it while some
  backend is healthy: `404`, vLLM's own "model does not exist" answer (decided before the first
  send: a request whose backends failed gets `502`, not `404`).
- The routing policy picks one of the candidates not tried yet for this request.
- A backend that cannot be connected to is marked down at once and another is tried (nothing was
  sent to it).
- A kept-alive connection closed without a byte of answer (the keep-alive race) is sent once
  more, anywhere; a backend that does it again is passed over (not marked down: it answers
  polls). A body streamed from the client cannot be sent again: `502`.
- No response headers within READ_TIMEOUT_SECONDS: `504`; the exchange broken after the request
  was sent: `502`. Neither is sent again: the backend may be working on it.
- No candidate left: when none is healthy, a worker whose first poll cycle is not over waits for
  it (its first poll decides, rather than a blind `503`), and then the request waits, up to
  NO_BACKEND_WAIT_SECONDS from its arrival, for the fleet's view to change (a backend back, a
  model list read); `502` when the backends it tried failed, else `503`. Candidates that are
  healthy but were all passed over for this request: `502` at once.

Everything the dispatcher touches comes in from outside (the registry, the router, the send, the
clock), so each rule has a unit test that runs in milliseconds.
"""

import contextlib
import dataclasses
import time
from typing import Callable

from . import telemetry, upstream
from .errors import error_response
from .registry import WEIGHT_UNITS

# A backend's own answers that count as failures towards its ejection (busy, 429 and 503, and
# the client's own mistakes, 4xx, never do).
FAILED_STATUSES = frozenset((500, 502, 504))


class DispatchFailed(Exception):
    """No backend answered; `response()` is the error to give the client."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status

    def response(self):
        return error_response(self.status, str(self))


@dataclasses.dataclass
class Outgoing:
    """One request on its way to a backend, as the dispatcher sees it.

    `attempt(backend)` sends it to one backend (`upstream.send`'s errors mean what they mean
    there); `model` and `key` route it, `weight` (`registry.weight_of`) weighs it; `resendable`
    is False for a body that is streamed from the client; `waiting` is entered around every wait
    on a backend or for one (the client watch, which interrupts it when the client leaves);
    `on_attempt(backend)` is called before each send; `priority_of()` and `client` order it in
    the queue, should it have to wait there."""

    attempt: Callable
    model: "str | None" = None
    key: "str | None" = None
    weight: int = WEIGHT_UNITS
    resendable: bool = True
    waiting: object = None
    on_attempt: "Callable | None" = None
    priority_of: Callable = lambda: 0
    client: str = ""


class Dispatcher:
    """Sends requests through one worker's registry, router and brake."""

    def __init__(self, registry, router, settings, admission=None, clock=time.monotonic):
        self.registry = registry
        self.router = router
        self.admission = admission
        self.no_backend_wait = settings.no_backend_wait_seconds
        self.first_cycle_wait = settings.first_cycle_wait
        self.read_timeout = settings.read_timeout_seconds
        self.clock = clock

    def send(self, request: Outgoing):
        """(backend, response) of the first backend that answered `request` with response
        headers; `DispatchFailed` or `admission.Rejected` otherwise.

        Each outcome counts towards the backend's ejection (`Registry.record_outcome`). The
        chosen backend's in-flight figures are raised by the request's weight for the response's
        life: whoever relays it calls `release`."""
        self.registry.sync()  # what the other workers learnt since this worker's last look
        waiting = request.waiting or contextlib.nullcontext()
        model, weight = request.model, request.weight
        braking = self.admission is not None and self.admission.limited
        deadline = self.clock() + self.no_backend_wait
        tried = []  # backends this request may not go to again (until a poll changes the view)
        stale_once = set()
        failure = None  # the answer once nothing is left to try
        queued_since = None
        attempts = 0

        def candidates():
            members = self.registry.view.serving(model).members
            return tuple(b for b in members if b not in tried) if tried else members

        while True:
            view = self.registry.view
            group = view.serving(model)
            if not group.members and view.healthy and not attempts:
                raise DispatchFailed(404, f"The model `{model}` does not exist.")
            members = candidates()
            if braking and members:
                roomy = self.admission.with_room(members)
                if not roomy or (queued_since is None and self.admission.must_wait()):
                    queued_since = self.admission.wait(candidates, request.priority_of,
                                                       request.client, waiting, queued_since)
                    continue
                members = roomy
            backend = self.router.pick(members, request.key, weight)
            if backend is None:
                if not group.members and self._wait_for_a_change(deadline, waiting):
                    tried = []
                    continue
                raise failure or DispatchFailed(503, "No healthy backend is available.")
            if attempts:
                telemetry.retried()
            attempts += 1
            if request.on_attempt is not None:
                request.on_attempt(backend)
            backend.acquire(weight)
            try:
                with waiting:
                    response = request.attempt(backend)
            except upstream.ConnectFailed as exc:
                self.release(backend, weight)
                if not exc.stale:
                    self.registry.mark_unreachable(backend, str(exc))
                    self.registry.record_outcome(backend, str(exc))
                    tried.append(backend)
                    failure = DispatchFailed(502, "No backend could be reached.")
                    continue
                failure = DispatchFailed(502, "The backend closed the connection without "
                                              "answering.")
                if not request.resendable:
                    raise failure from None
                if backend in stale_once:
                    tried.append(backend)
                stale_once.add(backend)
            except upstream.UpstreamTimeout:
                self.release(backend, weight)
                self.registry.record_outcome(backend, "timeout")
                raise DispatchFailed(
                    504, f"The backend did not answer within {self.read_timeout:g} s.") from None
            except upstream.UpstreamFailed as exc:
                self.release(backend, weight)
                self.registry.record_outcome(backend, str(exc))
                raise DispatchFailed(502, f"The backend failed before answering: {exc}.") from None
            except BaseException:
                self.release(backend, weight)
                raise
            else:
                status = response.status
                self.registry.record_outcome(
                    backend, None, status if status in FAILED_STATUSES else 0)
                return backend, response

    def release(self, backend, weight: int) -> None:
        """A request of `weight` sent to `backend` is over: its place may go to a waiter."""
        backend.release(weight)
        if self.admission is not None:
            self.admission.notify()


    def _wait_for_a_change(self, deadline: float, waiting) -> bool:
        """No candidate is healthy: wait for the first poll cycle if it is not over (its first
        poll decides, rather than a blind 503), else until `deadline` for the fleet's view to
        change; True when it may have a candidate now."""
        registry = self.registry
        if not registry.first_cycle_done:
            with waiting:
                return registry.wait_first_cycle(self.first_cycle_wait)
        remaining = deadline - self.clock()
        if remaining <= 0:
            return False
        with waiting:
            return registry.wait_for_change(remaining)


class Placement:
    """The place a relayed request holds at its backend, from its answer's headers to its end:
    its full weight until its first token, one request's after."""

    __slots__ = ("_dispatcher", "_backend", "_weight")

    def __init__(self, dispatcher: Dispatcher, backend, weight: int):
        self._dispatcher = dispatcher
        self._backend = backend
        self._weight = weight

    def prefilled(self) -> None:
        self._weight = self._backend.prefilled(self._weight)

    def release(self) -> None:
        self._dispatcher.release(self._backend, self._weight)
