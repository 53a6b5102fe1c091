"""Passive ejection: a backend whose requests fail EJECT_AFTER_FAILURES times in a row is taken
out of rotation for EJECT_SECONDS although its `/metrics` answers (nginx's `max_fails`, Envoy's
outlier detection).

What fails: the connection refused or reset, no response headers within READ_TIMEOUT_SECONDS, the
backend's own `500`, `502` or `504`. A `4xx`, `429` or `503` (busy is not dead) never counts;
any answer ends the run. An ejection lasts EJECT_SECONDS, twice the last one's length when the
backend is ejected again soon after its return (within that length), up to MAX_EJECT_SECONDS;
the next good poll after it brings the backend back (`Registry.record_poll`). Never more than
half of the listed backends are out at once.
"""

import logging
import time

from ..host.table import (C_EJECT_REASON, C_EJECT_SECONDS, C_EJECT_STATUS, C_EJECTED_UNTIL,
                          C_FAILURES, C_LAST_FAILURE, C_LAST_FAILURE_STATUS, reason_code)
from ..observe import metrics
from .registry import Registry, effective, error_text

log = logging.getLogger("forwarder.backends")

# The longest one ejection lasts, however often the backend is ejected again.
MAX_EJECT_SECONDS = 600.0
# A backend's own answers that count as failures (busy, 429 and 503, and the client's own
# mistakes, 4xx, never do).
FAILED_STATUSES = frozenset((500, 502, 504))


class Ejection:
    """One worker's part in ejecting the instance's backends."""

    def __init__(self, registry: Registry, after_failures: int, seconds: float, clock=time.time):
        self.registry = registry
        self.after_failures = after_failures
        self.seconds = seconds
        self.clock = clock

    def record(self, backend, failure: "str | None", status: int = 0) -> None:
        """How a request sent to `backend` went: `failure` (a failure reason of
        `relay.upstream.failure_reason`), or an answer with `status` (the ones of
        FAILED_STATUSES count as failures)."""
        table, column = self.registry.table, backend.column
        if failure is None and status not in FAILED_STATUSES:
            if table.word(column, C_FAILURES):
                table.set_word(column, C_FAILURES, 0)
            return
        status = status if failure is None else 0
        failures = table.word(column, C_FAILURES) + 1
        table.set_word(column, C_FAILURES, failures)
        table.set_word(column, C_LAST_FAILURE, reason_code(failure) if failure else 0)
        table.set_word(column, C_LAST_FAILURE_STATUS, status)
        if not self.after_failures or failures < self.after_failures:
            return
        now = self.clock()
        if not effective(table, column)[0]:
            return  # already out of rotation
        listed = self.registry.listed
        ejected = sum(1 for other in listed if table.float(other.column, C_EJECTED_UNTIL) > now)
        if ejected + 1 > len(listed) // 2:
            return
        last_until = table.float(column, C_EJECTED_UNTIL)
        last_seconds = table.float(column, C_EJECT_SECONDS)
        seconds = self.seconds
        if last_until and now - last_until < last_seconds:
            seconds = min(last_seconds * 2, MAX_EJECT_SECONDS)
        table.set_word(column, C_FAILURES, 0)
        table.set_word(column, C_EJECT_REASON, table.word(column, C_LAST_FAILURE))
        table.set_word(column, C_EJECT_STATUS, status)
        table.set_float(column, C_EJECT_SECONDS, seconds)
        table.set_float(column, C_EJECTED_UNTIL, now + seconds)
        metrics.ejected(backend.url)
        log.warning("backend %s ejected for %g s after %d failed requests in a row (last: %s)",
                    backend.url, seconds, failures,
                    error_text(reason_code(failure) if failure else 0, status))
        self.registry.update(backend)
