"""Sending one request to a backend: pick, resend, pass over, wait, or say why not.

The rules, in the order `Dispatcher.send` applies them:

- Candidates are the healthy backends serving the request's model. None serving it while some
  backend is healthy: `404`, vLLM's own "model does not exist" answer.
- The routing policy picks one of the candidates not tried yet for this request.
- A backend that cannot be connected to is marked down at once and another is tried (nothing was
  sent to it).
- A kept-alive connection closed without a byte of answer (the keep-alive race) is sent once
  more, anywhere; a backend that does it again is passed over (not marked down: it answers
  polls). A body streamed from the client cannot be sent again: `502`.
- No response headers within READ_TIMEOUT_SECONDS: `504`; the exchange broken after the request
  was sent: `502`. Neither is sent again: the backend may be working on it.
- Nothing to pick: a worker whose first poll cycle is not over waits for it (its first poll
  decides, rather than a blind `503`); then, up to NO_BACKEND_WAIT_SECONDS, for a backend to come
  back; then `502` if some backend was tried and could not be reached, else `503`.

Everything the dispatcher touches comes in from outside (the registry, the router, the send, the
clock), so each rule has a unit test that runs in milliseconds.
"""

import contextlib
import time

from . import telemetry, upstream
from .errors import error_response


class DispatchFailed(Exception):
    """No backend answered; `response()` is the error to give the client."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status

    def response(self):
        return error_response(self.status, str(self))


class Dispatcher:
    """Sends requests through one worker's registry and router."""

    def __init__(self, registry, router, settings, clock=time.monotonic):
        self.registry = registry
        self.router = router
        self.no_backend_wait = settings.no_backend_wait_seconds
        self.first_cycle_wait = settings.first_cycle_wait
        self.read_timeout = settings.read_timeout_seconds
        self.clock = clock

    def send(self, attempt, model: "str | None", key: "str | None", resendable: bool = True,
             waiting=None, on_attempt=None):
        """(backend, response) of the first backend that answered `attempt(backend)` with
        response headers; `DispatchFailed` otherwise.

        `attempt` sends the request to one backend (`upstream.send`'s errors mean what they mean
        there); `model` and `key` route it; `resendable` is False for a body that is streamed
        from the client; `waiting` is entered around every wait on a backend or for one (the
        client watch, which interrupts it when the client leaves); `on_attempt(backend)` is
        called before each send. The chosen backend's in-flight count is raised for the
        response's life: whoever relays it releases the backend."""
        waiting = waiting or contextlib.nullcontext()
        deadline = self.clock() + self.no_backend_wait
        tried = []
        stale_resent = False
        attempts = 0
        while True:
            view = self.registry.view
            group = view.serving(model)
            if view.healthy and not group.members:
                raise DispatchFailed(404, f"The model `{model}` does not exist.")
            backend = self.router.pick(group, key, tried)
            if backend is None:
                if self._wait_for_a_backend(deadline, waiting):
                    tried = []  # a poll has seen them healthy since they failed
                    continue
                if tried:
                    raise DispatchFailed(502, "No backend could be reached.")
                raise DispatchFailed(503, "No healthy backend is available.")
            if attempts:
                telemetry.retried()
            attempts += 1
            if on_attempt is not None:
                on_attempt(backend)
            backend.acquire()
            try:
                with waiting:
                    response = attempt(backend)
            except upstream.ConnectFailed as exc:
                backend.release()
                if not exc.stale:
                    self.registry.mark_unreachable(backend, str(exc))
                    tried.append(backend)
                elif not resendable:
                    raise DispatchFailed(
                        502, "The backend closed the connection without answering.") from None
                else:
                    if stale_resent:
                        tried.append(backend)
                    stale_resent = True
            except upstream.UpstreamTimeout:
                backend.release()
                raise DispatchFailed(
                    504, f"The backend did not answer within {self.read_timeout:g} s.") from None
            except upstream.UpstreamFailed as exc:
                backend.release()
                raise DispatchFailed(502, f"The backend failed before answering: {exc}.") from None
            except BaseException:
                backend.release()
                raise
            else:
                return backend, response

    def _wait_for_a_backend(self, deadline: float, waiting) -> bool:
        """Wait for the first poll cycle if it is not over, then until `deadline` for a healthy
        backend; True when one may be picked now."""
        registry = self.registry
        if not registry.first_cycle_done:
            with waiting:
                registry.wait_first_cycle(self.first_cycle_wait)
            if registry.first_cycle_done:
                return True
        remaining = deadline - self.clock()
        if remaining <= 0:
            return False
        with waiting:
            return registry.wait_for_healthy(remaining)
