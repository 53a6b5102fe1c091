"""The fleet as this worker sees it: one `Backend` per listed base URL, the `Registry` that holds
them, and the read-only `FleetView` snapshot that routing picks from.

What the instance knows of a backend lives in the host table (`host/table.py`), shared by its
workers: the list (the leader writes it), each backend's last poll (its poll owner writes it),
the last time a request could not connect to it, its failures in a row and its ejection
(`ejection.py`). The registry mirrors the table into plain attributes (`sync`, when the table's
change stamp moved), and writes what this worker learns into it. The request path reads
`Registry.view` (rebuilt only when health, a model list or the list changes, so picking a
backend costs no scan) and the host-wide in-flight figures, which are read from the table at the
moment they are needed.

A backend is healthy when its last poll answered 200 and no request failed to connect to it, and
no ejection began, since that poll. Each change of a backend's state is logged once per
instance, by the worker that caused it: added to or removed from the list (the leader), healthy
or unhealthy (the poll owner, or the worker whose request could not connect), ejected (the
worker whose request failed), returned (the poll owner).
"""

import logging
import math
import time

from gevent.event import Event

from ..host import table as host_table
from ..host.layout import BackendCount, Column, Slot
from ..host.table import REASONS, UNKNOWN, Busy, HostTable, NotLeader, reason_code
from . import model_lists

log = logging.getLogger("forwarder.backends")

# A column freed by a backend removed from the list goes to a new one only this long after, so
# that no worker still counts for the old one (and none of its requests is left).
COLUMN_QUARANTINE_SECONDS = 60.0


def _figure(value: float) -> "float | None":
    return None if math.isnan(value) else value


def error_text(reason: int, status: int) -> "str | None":
    return f"HTTP {status}" if status else REASONS[reason]


class Backend:
    """One vLLM server, known by its base URL and its column of the host table."""

    __slots__ = ("url", "column", "source", "healthy", "num_requests_running",
                 "num_requests_waiting", "kv_cache_usage", "last_checked_at", "last_error",
                 "ejected_until", "in_flight_at_poll", "models", "model_entries", "models_seq",
                 "models_read", "version", "_table")

    def __init__(self, url: str, column: int, table: HostTable):
        self.url = url
        self.column = column
        self._table = table
        # The `dns+NAME:PORT` entry the backend was discovered through; None when listed itself.
        self.source = None
        self.healthy = False
        self.num_requests_running = None
        self.num_requests_waiting = None
        self.kv_cache_usage = None
        self.last_checked_at = None
        self.last_error = None
        self.ejected_until = None
        # The instance's requests in flight to it when it was last polled: the scraped figures
        # already count them.
        self.in_flight_at_poll = 0
        # The ids and entries of its `/v1/models` list; None while unknown, which means "any".
        self.models = None
        self.model_entries = None
        self.models_seq = 0
        # Whether its model list has been asked for yet (read or found unreadable).
        self.models_read = False
        # Its column's version when last mirrored.
        self.version = -1

    @property
    def in_flight(self) -> int:
        """Requests every worker of the instance has sent to it and not finished relaying."""
        return self._table.in_flight(self.column)

    @property
    def in_flight_weight(self) -> int:
        """The weight of those requests, in `fleet.load.WEIGHT_UNITS` per request."""
        return self._table.in_flight_weight(self.column)

    def acquire(self, weight: int) -> None:
        """One request of `weight` is being sent to this backend (`relay.ledger` only)."""
        self._table.acquire(self.column, weight)

    def release(self, weight: int) -> None:
        """One request of `weight` relayed through this backend has finished."""
        self._table.release(self.column, weight)

    def reweigh(self, delta: int) -> None:
        """A request in flight here now weighs `delta` more (or less)."""
        self._table.add_backend(BackendCount.WEIGHT, self.column, delta)

    def status(self) -> dict:
        """The backend as `/_backends` shows it."""
        return {
            "url": self.url,
            "source": self.source,
            "healthy": self.healthy,
            "num_requests_running": self.num_requests_running,
            "num_requests_waiting": self.num_requests_waiting,
            "kv_cache_usage": self.kv_cache_usage,
            "last_checked_at": self.last_checked_at,
            "last_error": self.last_error,
            "ejected_until": self.ejected_until,
            "in_flight": self.in_flight,
            "models": None if self.models is None else list(self.models),
        }


class Group:
    """Backends that may take a request."""

    __slots__ = ("members",)

    def __init__(self, members):
        self.members = tuple(members)


class FleetView:
    """The healthy backends and the models they serve, as of the last change."""

    __slots__ = ("healthy", "all_healthy", "uniform_models", "_by_model", "_any_model",
                 "models_body", "model_ids")

    def __init__(self, backends):
        self.healthy = tuple(b for b in backends if b.healthy)
        self.all_healthy = Group(self.healthy)
        # When every healthy backend serves the same models (or every one serves any model), the
        # model of a request changes nothing about where it may go, and whichever backend gets
        # it answers vLLM's own 404 for a model it lacks: the request body need not be parsed.
        self.uniform_models = len({None if b.models is None else frozenset(b.models)
                                   for b in self.healthy}) <= 1
        any_model = [b for b in self.healthy if b.models is None]
        serving = {}
        for backend in self.healthy:
            for model in backend.models or ():
                serving.setdefault(model, []).append(backend)
        self._by_model = {model: Group(backends + any_model)
                          for model, backends in serving.items()}
        self._any_model = Group(any_model)
        self.models_body = model_lists.merged_models_body(self.healthy)
        # Every model id a healthy backend lists.
        self.model_ids = frozenset(serving)

    def serving(self, model: "str | None") -> Group:
        """The healthy backends a request for `model` may go to (all of them when the model is
        unknown or every backend serves the same models)."""
        if model is None or self.uniform_models:
            return self.all_healthy
        return self._by_model.get(model, self._any_model)


def effective(table: HostTable, column: int) -> "tuple[bool, str | None]":
    """(healthy, last error) of a column as the table has it now."""
    polled_at = table.float(column, Column.POLLED_AT)
    if not table.word(column, Column.POLL_OK):
        if not polled_at:
            return False, None
        return False, error_text(table.word(column, Column.POLL_REASON),
                                  table.word(column, Column.POLL_STATUS))
    ejected_until = table.float(column, Column.EJECTED_UNTIL)
    if ejected_until and polled_at <= ejected_until:
        last = error_text(table.word(column, Column.EJECT_REASON),
                          table.word(column, Column.EJECT_STATUS))
        return False, f"ejected: failed requests in a row (last: {last})"
    if table.float(column, Column.DOWN_AT) >= polled_at:
        return False, REASONS[table.word(column, Column.DOWN_REASON)]
    return True, None


class Registry:
    """The backends of the current list, in list order, and which of them are healthy."""

    def __init__(self, table: "HostTable | None" = None):
        self.table = table if table is not None else HostTable.private()
        self._backends = {}
        self._by_column = {}
        # Every listed backend, healthy or not; a new tuple only when the list changes.
        self.listed = ()
        self.view = FleetView(())
        self.healthy = self.view.healthy
        self._list_version = -1
        self._changes = -1
        # Set once every listed backend has been polled, and the model list of each healthy one
        # read: until then nothing is known.
        self.first_cycle = Event()
        # Set, and replaced by a fresh one, whenever `view` changes.
        self._changed = Event()
        # Set by a request that found no candidate: the poller polls again at once.
        self.poll_requested = Event()
        self.waiting_requests = 0

    def backends(self) -> "list[Backend]":
        return list(self.listed)

    def at_column(self, column: "int | None") -> "Backend | None":
        """The listed backend of a host-table column, or None."""
        return self._by_column.get(column)

    # --- reading the table ---------------------------------------------------------------------

    def sync(self) -> None:
        """Mirror the table, if anything changed since the last time."""
        table = self.table
        changes = table.changes
        if changes == self._changes:
            return
        self._changes = changes
        refresh = False
        list_version = table.list_version
        if list_version != self._list_version:
            entries = table.read_list()
            if entries is not None:  # else the last reading stays, until the list is repaired
                self._list_version = list_version
                self._mirror_list(entries)
                refresh = True
        for backend in self.listed:
            if table.version(backend.column) != backend.version:
                refresh |= self._mirror(backend)
        if refresh:
            self._refresh_view()
        if not self.first_cycle.is_set() and self._list_version > 0 and all(
                backend.last_checked_at is not None
                and (backend.models_read or not backend.healthy) for backend in self.listed):
            self.first_cycle.set()

    def _mirror_list(self, entries) -> None:
        backends = {}
        for column, url, source in entries:
            backend = self._backends.get(url)
            if backend is None or backend.column != column:
                self.table.adopt_column(column)
                backend = Backend(url, column, self.table)
            backend.source = source
            backends[url] = backend
        self._backends = backends
        self._by_column = {b.column: b for b in backends.values()}
        self.listed = tuple(backends.values())

    def _mirror(self, backend: Backend) -> bool:
        """Copy one backend's column into its attributes; True if routing must see it anew."""
        table, column = self.table, backend.column
        backend.version = table.version(column)
        healthy, error = effective(table, column)
        polled_at = table.float(column, Column.POLLED_AT)
        backend.last_checked_at = polled_at or None
        backend.last_error = error
        backend.num_requests_running = _figure(table.float(column, Column.RUNNING))
        backend.num_requests_waiting = _figure(table.float(column, Column.WAITING))
        backend.kv_cache_usage = _figure(table.float(column, Column.KV_CACHE))
        backend.in_flight_at_poll = table.word(column, Column.IN_FLIGHT_AT_POLL)
        ejected_until = table.float(column, Column.EJECTED_UNTIL)
        backend.ejected_until = ejected_until if not healthy and ejected_until > time.time() \
            else None
        refresh = healthy != backend.healthy
        backend.healthy = healthy
        backend.models_read = bool(table.float(column, Column.MODELS_READ_AT))
        seq = table.models_seq(column)
        models = table.read_models(column) if seq != backend.models_seq else None
        if models is not None:
            backend.models_seq, body = models
            entries = model_lists.read_model_list(body)
            if entries != backend.model_entries:
                backend.model_entries = entries
                backend.models = None if entries is None else tuple(e["id"] for e in entries)
                refresh = True
        return refresh

    def _refresh_view(self) -> None:
        self.view = FleetView(self.listed)
        self.healthy = self.view.healthy
        changed, self._changed = self._changed, Event()
        changed.set()

    def update(self, backend: Backend) -> None:
        """Mirror `backend` now, after this worker wrote its column."""
        self.table.changed(backend.column)
        if self._mirror(backend):
            self._refresh_view()

    # --- writing it ----------------------------------------------------------------------------

    def publish_list(self, urls: "list[str]", sources: "dict[str, str]", where: str) -> None:
        """The list leader's reading of the backend list (`where` names it in the log)."""
        now = time.time()
        first = self.table.list_version == 0
        try:
            added, removed = self.table.write_list(urls, sources, now, COLUMN_QUARANTINE_SECONDS)
        except ValueError as exc:
            log.error("%s: %s; keeping the last list", where, exc)
            return
        except (Busy, NotLeader):
            return  # another worker writes it (a new leader, while this one drains)
        for url in added:
            log.info("backend %s added to the list", url)
        for url in removed:
            log.info("backend %s removed from the list", url)
        if not urls and (first or removed):
            log.warning("%s names no backend: every request gets 503", where)
        self.sync()

    def record_poll(self, backend: Backend, healthy: bool, reason: "str | None" = None,
                    status: int = 0, figures: "dict | None" = None) -> None:
        """The result of polling `backend` (its poll owner): healthy or not, why not (a failure
        reason of `upstream.failure_reason`, or the HTTP status), and the load figures read."""
        table, column = self.table, backend.column
        was_healthy, _ = effective(table, column)
        was_polled = bool(table.float(column, Column.POLLED_AT))
        ejected_until = table.float(column, Column.EJECTED_UNTIL)
        figures = figures or {}
        for word, name in ((Column.RUNNING, "num_requests_running"),
                           (Column.WAITING, "num_requests_waiting"),
                           (Column.KV_CACHE, "kv_cache_usage")):
            value = figures.get(name)
            table.set_float(column, word, UNKNOWN if value is None else value)
        table.set_word(column, Column.IN_FLIGHT_AT_POLL, table.in_flight(column))
        table.set_word(column, Column.POLL_REASON, reason_code(reason) if reason else 0)
        table.set_word(column, Column.POLL_STATUS, status)
        table.set_word(column, Column.POLL_OK, int(healthy))
        table.set_float(column, Column.POLLED_AT, time.time())
        is_healthy, error = effective(table, column)
        if is_healthy != was_healthy or not was_polled:
            if is_healthy and ejected_until and was_polled:
                log.info("backend %s returned after its ejection", backend.url)
            elif is_healthy:
                log.info("backend %s is healthy", backend.url)
            else:
                log.warning("backend %s is unhealthy (%s)", backend.url, error)
        self.update(backend)

    def write_models(self, backend: Backend, body: "bytes | None") -> None:
        """The body of the backend's `/v1/models` answer, or None when it could not be read."""
        try:
            self.table.write_models(backend.column, body, time.time())
        except Busy:
            return  # a former poll owner writes it this moment; this one writes it next time
        self.update(backend)

    def mark_unreachable(self, backend: Backend, reason: str) -> None:
        """A request could not connect: out of rotation until a poll succeeds."""
        table, column = self.table, backend.column
        was_healthy, _ = effective(table, column)
        table.set_word(column, Column.DOWN_REASON, reason_code(reason))
        table.set_float(column, Column.DOWN_AT, time.time())
        if was_healthy:
            log.warning("backend %s is unhealthy (%s)", backend.url, reason)
        self.update(backend)

    # --- waiting -------------------------------------------------------------------------------

    @property
    def first_cycle_done(self) -> bool:
        return self.first_cycle.is_set()

    def wait_first_cycle(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the first poll cycle to end; True once it has."""
        return self.first_cycle.wait(timeout)

    def wait_for_change(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for `view` to change, asking the poll owners to poll
        meanwhile; True if it changed."""
        self.waiting_requests += 1
        self.table.want_polls(time.time())
        self.poll_requested.set()
        try:
            return self._changed.wait(timeout)
        finally:
            self.waiting_requests -= 1

    def queued(self) -> int:
        """Requests waiting in the instance's queue now."""
        return self.table.slot_sum(Slot.QUEUED)

    def status(self) -> dict:
        """The `/_backends` document."""
        self.sync()
        backends = [b.status() for b in self.listed]
        return {"backends": backends, "healthy": len(self.healthy), "total": len(backends),
                "queued": self.queued()}


_shared = None


def shared() -> Registry:
    """This worker's registry over the instance's host table."""
    global _shared
    if _shared is None:
        _shared = Registry(host_table.shared())
    return _shared
