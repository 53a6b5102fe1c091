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
  was sent: `502`. Neither is sent again (the backend may be working on it), except a request
  that may be asked again (`asks_again`: a chat, completions or embeddings request, when
  RESUME_STREAMS is on: vLLM aborts a request whose connection closes, and these have no side
  effect), which a broken exchange sends to a backend not tried yet, up to MAX_RESUMES times.
- No candidate left: when none is healthy, a worker whose first poll cycle is not over waits for
  it (its first poll decides, rather than a blind `503`), and then the request waits, up to
  NO_BACKEND_WAIT_SECONDS from its arrival, for the fleet's view to change (a backend back, a
  model list read); `502` when the backends it tried failed, else `503`. Candidates that are
  healthy but were all passed over for this request: `502` at once.

Everything the dispatcher touches comes in from outside (the registry, the policy, the brake, the
ejection, the send, the clock), so each rule has a unit test that runs in milliseconds. The
places a request takes on its way (its backend's, its queue's) are its ledger's
(`ledger.py`).
"""

import contextlib
import dataclasses
import time
from typing import Callable

from ..errors import error_response
from ..fleet.load import WEIGHT_UNITS
from ..observe import metrics
from .. import upstream
from .policies import Request


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
    there); `model` and `session_key` route it, `weight` (`fleet.load.weight_of`) weighs it;
    `resendable` is False for a body that is streamed from the client; `waiting` is entered
    around every wait on a backend or for one (the client watch, which interrupts it when the
    client leaves); `on_attempt(backend)` is called before each send; `priority_of()` and
    `client` order it in the queue, should it have to wait there; `avoid` are backends it must
    not go to; `asks_again` is how many more times a broken exchange may be sent elsewhere, and
    `on_ask_again(backend, reason)` is told of each."""

    attempt: Callable
    model: "str | None" = None
    session_key: "str | None" = None
    weight: int = WEIGHT_UNITS
    resendable: bool = True
    waiting: object = None
    on_attempt: "Callable | None" = None
    priority_of: Callable = lambda: 0
    client: str = ""
    avoid: tuple = ()
    asks_again: int = 0
    on_ask_again: "Callable | None" = None


class Dispatcher:
    """Sends requests through one worker's registry, policy, brake and ejection."""

    def __init__(self, registry, policy, settings, ejection, brake=None, clock=time.monotonic):
        self.registry = registry
        self.policy = policy
        self.ejection = ejection
        self.brake = brake
        self.no_backend_wait = settings.no_backend_wait_seconds
        self.first_cycle_wait = settings.first_cycle_wait
        self.read_timeout = settings.read_timeout_seconds
        self.clock = clock

    def send(self, request: Outgoing, ledger):
        """(backend, response) of the first backend that answered `request` with response
        headers; `DispatchFailed` or `errors.Rejected` otherwise.

        Each outcome counts towards the backend's ejection. The chosen backend's place is taken
        in `ledger` for the response's life; a failed attempt gives it back at once."""
        self.registry.sync()  # what the other workers learnt since this worker's last look
        waiting = request.waiting or contextlib.nullcontext()
        model, weight = request.model, request.weight
        picking = Request(request.session_key, weight)
        brake = self.brake
        deadline = self.clock() + self.no_backend_wait
        tried = list(request.avoid)  # may not go to these again (until a poll changes the view)
        stale_once = set()
        failure = None  # the answer once nothing is left to try
        cut = None  # (backend, what came) of the last answer its backend broke off
        queued_since = None
        attempts = 0

        def give_up(failure):
            """Nothing is left to try: the last answer broken off is relayed as it came (its
            client sees the break), else `failure`."""
            if cut is None:
                raise failure
            ledger.take_backend(cut[0], weight)
            return cut

        def candidates():
            members = self.registry.view.serving(model).members
            return tuple(b for b in members if b not in tried) if tried else members

        while True:
            view = self.registry.view
            group = view.serving(model)
            if not group.members and view.healthy and not attempts:
                raise DispatchFailed(404, f"The model `{model}` does not exist.")
            members = candidates()
            if brake is not None and members:
                roomy = brake.with_room(members)
                if not roomy or (queued_since is None and brake.must_wait()):
                    queued_since = brake.wait(ledger, candidates, request.priority_of,
                                              request.client, waiting, queued_since)
                    continue
                members = roomy
            backend = self._pick(members, picking)
            if backend is None:
                if not group.members and self._wait_for_a_change(deadline, waiting):
                    tried = list(request.avoid)
                    continue
                return give_up(failure or DispatchFailed(503, "No healthy backend is available."))
            if attempts:
                metrics.retried()
            attempts += 1
            if request.on_attempt is not None:
                request.on_attempt(backend)
            ledger.take_backend(backend, weight)
            try:
                with waiting:
                    response = request.attempt(backend)
            except upstream.ConnectFailed as exc:
                ledger.give_back_backend()
                if not exc.stale:
                    self.registry.mark_unreachable(backend, str(exc))
                    self.ejection.record(backend, str(exc))
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
                ledger.give_back_backend()
                self.ejection.record(backend, "timeout")
                raise DispatchFailed(
                    504, f"The backend did not answer within {self.read_timeout:g} s.") from None
            except upstream.UpstreamFailed as exc:
                ledger.give_back_backend()
                self.ejection.record(backend, str(exc))
                failure = DispatchFailed(502, f"The backend failed before answering: {exc}.")
                if isinstance(exc, upstream.BodyCut):
                    if cut is not None:
                        cut[1].close()
                    cut = (backend, exc.answer)
                if request.asks_again <= 0:
                    return give_up(failure)
                request.asks_again -= 1
                tried.append(backend)
                if request.on_ask_again is not None:
                    request.on_ask_again(backend, str(exc))
            else:
                self.ejection.record(backend, None, response.status)
                if cut is not None:
                    cut[1].close()
                return backend, response

    def _pick(self, members: tuple, request: Request):
        if len(members) < 2:
            return members[0] if members else None
        return self.policy.pick(members, request)

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
