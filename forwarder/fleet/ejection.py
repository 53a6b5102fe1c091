"""Passive ejection: a backend whose requests fail EJECT_AFTER_FAILURES times in a row is taken
out of rotation for EJECT_SECONDS although its `/metrics` answers (nginx's `max_fails`, Envoy's
outlier detection).

What fails: the connection refused or reset, no response headers within READ_TIMEOUT_SECONDS, the
backend's own `500`, `502` or `504`. A `4xx`, `429` or `503` (busy is not dead) never counts;
any answer ends the run. The run is counted by every worker in its own cells and summed
(`HostTable.count_failure`); an ejection is decided and written by one worker at a time, under
the table's ejection lock, so that never more than half of the listed backends are out at once.
An ejection lasts EJECT_SECONDS, twice the last one's length when the backend is ejected again
soon after its return (within that length), up to MAX_EJECT_SECONDS; the next good poll after it
brings the backend back (`Registry.record_poll`).
"""

import logging
import time

from ..host.layout import Column
from ..host.table import Busy, reason_code
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
        `upstream.failure_reason`), or an answer with `status` (the ones of FAILED_STATUSES
        count as failures)."""
        table, column = self.registry.table, backend.column
        if failure is None and status not in FAILED_STATUSES:
            table.end_failure_run(column)
            return
        status = status if failure is None else 0
        table.set_word(column, Column.LAST_FAILURE, reason_code(failure) if failure else 0)
        table.set_word(column, Column.LAST_FAILURE_STATUS, status)
        failures = table.count_failure(column)
        if not self.after_failures or failures < self.after_failures:
            return
        try:
            with table.ejecting():
                self._eject(backend, failures, failure, status)
        except Busy:
            pass  # another worker is ejecting one: the next failure tries again

    def _eject(self, backend, failures: int, failure: "str | None", status: int) -> None:
        table, column = self.registry.table, backend.column
        now = self.clock()
        if not effective(table, column)[0]:
            return  # already out of rotation
        listed = self.registry.listed
        ejected = sum(1 for other in listed
                      if table.float(other.column, Column.EJECTED_UNTIL) > now)
        if ejected + 1 > len(listed) // 2:
            return
        last_until = table.float(column, Column.EJECTED_UNTIL)
        last_seconds = table.float(column, Column.EJECT_SECONDS)
        seconds = self.seconds
        if last_until and now - last_until < last_seconds:
            seconds = min(last_seconds * 2, MAX_EJECT_SECONDS)
        table.end_failure_run(column)
        table.set_word(column, Column.EJECT_REASON, table.word(column, Column.LAST_FAILURE))
        table.set_word(column, Column.EJECT_STATUS, status)
        table.set_float(column, Column.EJECT_SECONDS, seconds)
        table.set_float(column, Column.EJECTED_UNTIL, now + seconds)
        metrics.ejected(backend.url)
        log.warning("backend %s ejected for %g s after %d failed requests in a row (last: %s)",
                    backend.url, seconds, failures,
                    error_text(reason_code(failure) if failure else 0, status))
        self.registry.update(backend)
