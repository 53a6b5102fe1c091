"""The fleet as this worker sees it: one `Backend` per base URL, the `Registry` that holds them, and
the read-only `FleetView` snapshot that routing picks from.

The health poller is the only writer of scraped figures, model lists and the backend list. The
request path reads `Registry.view` (rebuilt only when health, a model list or the list changes,
so picking a backend costs no scan) and `Registry.listed`, marks a backend down at once when it
cannot be reached, and may wait for a backend to come back. Everything runs in one gevent
worker's greenlets, so no locks are needed.
"""

import time

from gevent.event import Event

from . import telemetry
from .model_lists import merged_models_body


class Backend:
    """One vLLM server, known by its base URL, as last seen by this worker."""

    __slots__ = ("url", "source", "healthy", "num_requests_running", "num_requests_waiting",
                 "last_checked_at", "last_error", "in_flight", "_in_flight_gauge",
                 "in_flight_at_poll", "models", "model_entries")

    def __init__(self, url: str):
        self.url = url
        # The `dns+NAME:PORT` entry the backend was discovered through; None when listed itself.
        self.source = None
        self.healthy = False
        self.num_requests_running = None
        self.num_requests_waiting = None
        self.last_checked_at = None
        self.last_error = None
        # Requests this worker has sent to the backend and not finished relaying: never stale.
        self.in_flight = 0
        # `in_flight` when the figures were last scraped: those requests are in the figures.
        self.in_flight_at_poll = 0
        # The ids and entries of its `/v1/models` list; None while unknown, which means "any".
        self.models = None
        self.model_entries = None
        # The same count summed over every worker, for /metrics.
        self._in_flight_gauge = telemetry.in_flight_gauge(url)

    def acquire(self) -> None:
        """One request is being sent to this backend."""
        self.in_flight += 1
        self._in_flight_gauge.inc()

    def release(self) -> None:
        """One request relayed through this backend has finished."""
        self.in_flight -= 1
        self._in_flight_gauge.dec()

    def status(self) -> dict:
        """The backend as `/_backends` shows it."""
        return {
            "url": self.url,
            "source": self.source,
            "healthy": self.healthy,
            "num_requests_running": self.num_requests_running,
            "num_requests_waiting": self.num_requests_waiting,
            "last_checked_at": self.last_checked_at,
            "last_error": self.last_error,
            "in_flight": self.in_flight,
            "models": None if self.models is None else list(self.models),
        }


class Group:
    """Backends that may take a request: a tuple to pick from and a set to test membership."""

    __slots__ = ("members", "member_set")

    def __init__(self, members):
        self.members = tuple(members)
        self.member_set = frozenset(self.members)

    def without(self, tried) -> "Group":
        return Group(b for b in self.members if b not in tried)


class FleetView:
    """The healthy backends and the models they serve, as of the last change."""

    __slots__ = ("healthy", "all_healthy", "uniform_models", "_by_model", "_any_model",
                 "models_body")

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
        self.models_body = merged_models_body(self.healthy)

    def serving(self, model: "str | None") -> Group:
        """The healthy backends a request for `model` may go to (all of them when the model is
        unknown or every backend serves the same models)."""
        if model is None or self.uniform_models:
            return self.all_healthy
        return self._by_model.get(model, self._any_model)


class Registry:
    """The backends of the current list, in list order, and which of them are healthy."""

    def __init__(self):
        self._backends = {}
        # Every listed backend, healthy or not; a new tuple only when the list changes.
        self.listed = ()
        self.view = FleetView(())
        self.healthy = self.view.healthy
        # Set once the worker's first poll cycle has finished: until then nothing is known.
        self.first_cycle = Event()
        # Set, and replaced by a fresh one, whenever `view` changes.
        self._changed = Event()
        # Set by a request that found no candidate: the poller polls again at once.
        self.poll_requested = Event()
        self.waiting_requests = 0

    def backends(self) -> "list[Backend]":
        return list(self.listed)

    def set_list(self, urls: "list[str]", sources: "dict[str, str] | None" = None) -> None:
        """Make the registry hold exactly `urls`: new ones start unhealthy until polled, removed
        ones are dropped (requests already relayed through them keep their own reference).
        `sources` names the `dns+` entry of each URL that was discovered."""
        sources = sources or {}
        self._backends = {url: self._backends.get(url) or Backend(url) for url in urls}
        for url, backend in self._backends.items():
            backend.source = sources.get(url)
        self.listed = tuple(self._backends.values())
        self._refresh_healthy()

    def record_poll(self, backend: Backend, healthy: bool, error: "str | None",
                    figures: "dict | None" = None) -> None:
        figures = figures or {}
        backend.num_requests_running = figures.get("num_requests_running")
        backend.num_requests_waiting = figures.get("num_requests_waiting")
        backend.in_flight_at_poll = backend.in_flight
        backend.last_checked_at = time.time()
        backend.last_error = error
        self._set_health(backend, healthy)

    def record_models(self, backend: Backend, entries: "tuple[dict, ...] | None") -> None:
        """The model entries its `/v1/models` just listed, or None when they could not be read."""
        if entries == backend.model_entries:
            return
        backend.model_entries = entries
        backend.models = None if entries is None else tuple(e["id"] for e in entries)
        self._refresh_healthy()

    def mark_unreachable(self, backend: Backend, error: str) -> None:
        """A request could not connect: take the backend out of rotation until a poll succeeds."""
        backend.last_error = error
        self._set_health(backend, False)

    @property
    def first_cycle_done(self) -> bool:
        return self.first_cycle.is_set()

    def wait_first_cycle(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the first poll cycle to end; True once it has."""
        return self.first_cycle.wait(timeout)

    def wait_for_change(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for `view` to change, asking the poller to poll meanwhile;
        True if it changed."""
        self.waiting_requests += 1
        self.poll_requested.set()
        try:
            return self._changed.wait(timeout)
        finally:
            self.waiting_requests -= 1

    def _set_health(self, backend: Backend, healthy: bool) -> None:
        if backend.healthy != healthy:
            backend.healthy = healthy
            self._refresh_healthy()

    def _refresh_healthy(self) -> None:
        self.view = FleetView(self._backends.values())
        self.healthy = self.view.healthy
        changed, self._changed = self._changed, Event()
        changed.set()

    def status(self) -> dict:
        """The `/_backends` document."""
        backends = [b.status() for b in self._backends.values()]
        return {"backends": backends, "healthy": len(self.healthy), "total": len(backends)}


REGISTRY = Registry()
