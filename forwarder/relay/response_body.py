"""The response body, relayed from the backend to the client as it arrives.

The body is relayed as the raw bytes the backend sent (still compressed, if it compressed them),
one client write per socket read, so each SSE event reaches the client without waiting for the
next. When the backend dies or goes silent mid-body, or the forwarder is stopping and its grace
period is over (`client_watch.ShuttingDown`), an SSE client gets vLLM's own in-band error event
and `[DONE]`; any other client gets a connection closed before the body is complete, never a
truncated body that looks finished.
"""

import contextlib
import logging

import gevent

from urllib3.exceptions import HTTPError as Urllib3Error

from .. import environ_keys
from ..compat.server import write_now
from ..errors import error_body
from ..observe import metrics
from .. import upstream
from .client_watch import ClientGone, ClientWatch, ShuttingDown
from .resume import CannotGoOn, StreamRecord

log = logging.getLogger(__name__)

# One read takes whatever has arrived, up to this much.
READ_SIZE = 65536


SHUTTING_DOWN = ("The forwarder is shutting down and its grace period is over; "
                 "the response was cut short.")


def sse_error_event(message: str, code: int) -> bytes:
    """vLLM's in-band error event followed by the end-of-stream marker."""
    return b"data: " + error_body(code, message) + b"\n\ndata: [DONE]\n\n"


class KeepAlive:
    """While an SSE response is silent for `seconds`, an SSE comment to its client (load
    balancers cut connections idle for their timeout, 60 s on common cloud ones; SSE clients
    ignore comments). Silence is read off the backend response's byte count (`tell()`) by a
    timer, so relaying a chunk costs nothing more."""

    CHECKS = 4  # a check every seconds / CHECKS: a comment after seconds to 1.25 × seconds

    def __init__(self, response, seconds: float, environ):
        self.response = response
        self._environ = environ
        self._seen = -1
        self._quiet = 0
        self._timer = gevent.get_hub().loop.timer(seconds / self.CHECKS, seconds / self.CHECKS)
        self._timer.start(self._check)

    def _check(self) -> None:
        seen = self.response.tell()
        if seen != self._seen:
            self._seen, self._quiet = seen, 0
            return
        self._quiet += 1
        if self._quiet >= self.CHECKS:
            self._quiet = 0
            gevent.spawn(write_now, self._environ.get(environ_keys.START_RESPONSE),
                         self._environ.get("gunicorn.socket"), KEEP_ALIVE_COMMENT)

    def stop(self) -> None:
        self._timer.close()


KEEP_ALIVE_COMMENT = b": keep-alive\n\n"


class RelayedBody:
    """The backend's body as the client gets it: a WSGI body whose `close` (called by gunicorn,
    through Werkzeug's response, however the response ends, even when it was never iterated)
    closes the backend connection and the request's ledger (`ledger.py`).

    Iterating yields the backend's body as it arrives, telling `exchange` (`observe.metrics`)
    of its first and last byte and of a cut; passing each piece through `tap`
    (`tenants.usage.JsonTap` or `StreamTap`) when given; keeping a silent SSE stream alive every
    `keep_alive` seconds. With a `resumer` (`resume.py`: a chat or completions stream, when
    RESUME_STREAMS is on) a `StreamRecord` keeps what a continuation needs, and a cut goes on on
    another backend when it can. When the body has ended, the ledger learns the tokens used and
    is closed, before the client can see the response end."""

    __slots__ = ("_response", "_exchange", "_ledger", "_sse", "_watch", "_tap", "_keep_alive",
                 "_resumer", "_record", "_continuations", "_iteration")

    def __init__(self, response, exchange, ledger, sse: bool, watch: "ClientWatch | None",
                 tap=None, keep_alive: float = 0.0, resumer=None):
        self._response = response
        self._exchange = exchange
        self._ledger = ledger
        self._sse = sse
        self._watch = watch
        self._tap = tap
        self._keep_alive = keep_alive
        self._resumer = resumer
        self._record = StreamRecord(resumer.endpoint) if resumer is not None else None
        self._continuations = []
        self._iteration = None

    def __iter__(self):
        self._iteration = self._relay()
        return self._iteration

    def close(self) -> None:
        try:
            if self._iteration is not None:
                self._iteration.close()
        finally:
            try:
                if self._response is not None:
                    self._response.close()
            finally:
                try:
                    self._ledger.close()
                finally:
                    if self._watch is not None:
                        self._watch.stop()

    def _settle(self) -> None:
        """The backend's body has ended: what the request used is known."""
        tap, ledger = self._tap, self._ledger
        if tap is not None and tap.prompt_tokens is not None:
            # The backends worked on more than the answer's usage tells: each continuation
            # prefilled the answer so far again.
            ledger.tokens = tap.prompt_tokens + tap.completion_tokens + sum(
                continuation.prompt_prefilled for continuation in self._continuations)
        ledger.close()

    def _relay(self):
        exchange, ledger, sse, watch, tap = (
            self._exchange, self._ledger, self._sse, self._watch, self._tap)
        record = self._record
        waiting = watch or contextlib.nullcontext()
        alive = KeepAlive(self._response, self._keep_alive, exchange.environ) \
            if sse and self._keep_alive else None
        feed = tap.feed if tap is not None else None
        continuation = None
        chunk = None
        started = False
        try:
            while True:  # one backend's body, then maybe another's
                try:
                    if chunk is None:
                        with waiting:
                            chunk = self._response.read1(READ_SIZE)
                        if not started:
                            started = True
                            exchange.first_byte()
                    ledger.prefilled()
                    while chunk:
                        if continuation is not None:
                            chunk = continuation.feed(chunk)
                        if feed is not None and chunk:
                            chunk = feed(chunk)
                        if chunk:
                            if record is not None:
                                record.feed(chunk)
                            yield chunk
                        if self._response is None or (continuation is not None
                                                       and continuation.ended):
                            break
                        with waiting:
                            chunk = self._response.read1(READ_SIZE)
                    break
                except (Urllib3Error, OSError) as exc:
                    if record is None:
                        raise
                    continuation, chunk = self._go_on(exc, record)
                    if alive is not None and self._response is not None:
                        alive.response = self._response
            rest = tap.finish() if tap is not None else None
            exchange.last_byte()
            self._settle()
            if rest:
                yield rest
        except ClientGone:
            exchange.cut("client_left")
            metrics.client_disconnected()
            return
        except ShuttingDown:
            # The worker is about to be killed: an SSE client is told why its stream ends here.
            exchange.cut("shutdown")
            if sse:
                yield sse_error_event(SHUTTING_DOWN, 503)
            elif watch is not None:
                watch.abort_client()
        except GeneratorExit:
            # Closed at a `yield` before the end: gunicorn's write to the client failed.
            exchange.cut("client_left")
            metrics.client_disconnected()
            raise
        except (Urllib3Error, OSError, CannotGoOn) as exc:
            ledger.failed = True
            cause = exc.__cause__ if isinstance(exc, CannotGoOn) else exc
            broken = getattr(exc, "backend_url", exchange.backend)
            if upstream.timed_out(cause):
                exchange.cut("backend_timeout")
                message = (f"The backend {broken} sent nothing for READ_TIMEOUT_SECONDS in the "
                           f"middle of the response.")
            else:
                exchange.cut("backend_error")
                message = (f"The backend {broken} broke off the response: "
                           f"{upstream.failure_reason(cause)}.")
            if isinstance(exc, CannotGoOn):
                message = f"{message[:-1]}; it could not go on elsewhere: {exc}."
            log.warning("request_id=%s: %s", exchange.request_id, message)
            if sse:
                # 502 whatever the cause, as SPEC's in-band example: the request failed upstream.
                yield sse_error_event(message, 502)
            elif watch is not None:
                # Nothing else tells an HTTP client that a body with no length is incomplete.
                watch.abort_client()
        finally:
            if alive is not None:
                alive.stop()
            if self._response is not None:
                self._response.close()

    def _go_on(self, exc: BaseException, record: StreamRecord):
        """The stream broke off: (its continuation, the first bytes to relay or None to read
        them from the backend taking over). `CannotGoOn`, from `exc`, when it cannot go on."""
        broken, self._response = self._response, None
        broken.close()
        if record.done:
            return None, b""  # cut after its end: nothing is missing
        if record.finished:
            return None, b"data: [DONE]\n\n"  # only the end marker is missing
        why = ("silent for READ_TIMEOUT_SECONDS" if upstream.timed_out(exc)
               else upstream.failure_reason(exc))
        backend = self._resumer.used[-1]
        try:
            response, continuation = self._resumer.resume(backend, why, record)
        except CannotGoOn as cannot:
            cannot.backend_url = backend.url
            raise cannot from exc
        if response is None:  # nothing left to generate: only the end, already as sent
            return None, continuation.closing
        if continuation is not None:
            self._continuations.append(continuation)
        self._response = response
        return continuation, None
