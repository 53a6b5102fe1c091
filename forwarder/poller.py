"""The health poller: every cycle, re-read the backend list, resolve its `dns+` entries, and poll
each backend's `/metrics`.

One poller greenlet runs in each gunicorn worker (started by `gunicorn_worker.Worker`) and is the
only writer of that worker's `Registry`. A backend is healthy when
`GET {base}/metrics` answers 200 within `HEALTH_TIMEOUT_SECONDS`; its load figures are read from
the body but never decide health. Each healthy backend's `GET {base}/v1/models` is read too, for
model-aware routing; a list that cannot be read means "serves any model", never "unhealthy".
"""

import logging
import time

import gevent
import gevent.pool
import urllib3.exceptions

from . import backend_list, discovery, model_lists, upstream, vllm_metrics
from .registry import Backend, Registry

log = logging.getLogger(__name__)

# Polls run concurrently; this bounds the sockets one worker opens at once for a large fleet.
MAX_CONCURRENT_POLLS = 64
# The share of the interval over which one cycle's polls are started.
POLL_SPREAD = 0.9
# While requests wait for a backend to come back (NO_BACKEND_WAIT_SECONDS), poll at least this
# often.
RECOVERY_POLL_SECONDS = 0.25
# Sent with every poll, so that a backend's access log (and a test's fake backend) can tell the
# forwarder's own polls from the requests it relays.
POLL_USER_AGENT = "vllm-forwarder-health"


class Poller:
    """Polls the fleet every `interval` seconds and writes what it sees into `registry`."""

    def __init__(self, registry: Registry, settings):
        self.registry = registry
        self.list_file = settings.ip_list_file
        self.default_port = settings.backend_default_port
        self.interval = settings.check_interval_seconds
        self.timeout = settings.health_timeout_seconds
        # The relay's kind of session (no cookies, no proxy variables); one kept-alive
        # connection per backend.
        self.session = upstream.make_session(pool_maxsize=1)
        self.headers = {"User-Agent": POLL_USER_AGENT}
        self.pool = gevent.pool.Pool(MAX_CONCURRENT_POLLS)
        self.list_text = None
        self.entries = []
        self.discovery = discovery.Discovery(settings)
        self.expanded = None

    def run_forever(self) -> None:
        while True:
            started = time.monotonic()
            try:
                self.cycle()
            except Exception:  # the poller must outlive any bug in one cycle
                log.exception("health poll cycle failed")
            interval = self.interval
            if self.registry.waiting_requests:
                interval = min(interval, RECOVERY_POLL_SECONDS)
            self.registry.poll_requested.clear()
            self.registry.poll_requested.wait(max(0.0, interval - (time.monotonic() - started)))

    def cycle(self) -> None:
        self.reload_list()
        # `dns+` entries are resolved again every cycle, even when the file did not change.
        expanded = self.discovery.expand(self.entries)
        if expanded != self.expanded:
            self.expanded = expanded
            self.registry.set_list(*expanded)
        backends = self.registry.backends()
        # Polls started together finish together, and their reads and parses then run back to
        # back on the hub while relayed streams wait: 100 backends polled at once stalled a
        # request by up to 200 ms. Started one by one over most of the interval (the rest is
        # slack for the last ones to answer before the next cycle), they interleave with the
        # relaying; over 90 % rather than half of it, 100 polls a second added about 40 % as
        # much to the median relayed request (bench/run.py, scenario 4). The first cycle, and a
        # cycle that requests are waiting on because nothing is healthy, poll everything at once.
        spread = self.interval * POLL_SPREAD if self.registry.first_cycle_done else 0.0
        gap = spread / len(backends) if backends else 0.0
        for index, backend in enumerate(backends):
            if index and gap and not self.registry.waiting_requests:
                gevent.sleep(gap)
            self.pool.spawn(self.check, backend)
        self.pool.join()
        self.registry.first_cycle.set()

    def reload_list(self) -> None:
        try:
            with open(self.list_file, encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError as exc:
            log.error("cannot read backend list %s (%s); keeping the last good list",
                      self.list_file, exc.strerror or exc)
            return
        if text == self.list_text:
            return  # unchanged: parsing again would only repeat the warnings of bad lines
        self.list_text = text
        self.entries = backend_list.parse_backend_list(text, self.list_file, self.default_port)

    def check(self, backend: Backend) -> None:
        try:
            status, body = self.get(backend.url + "/metrics")
        except PollFailed as failed:
            self.registry.record_poll(backend, False, str(failed))
            return
        if status != 200:
            self.registry.record_poll(backend, False, f"HTTP {status}")
            return
        figures = vllm_metrics.read_load(body.decode("utf-8", "replace"))
        self.registry.record_poll(backend, True, None, figures)
        # Health is `/metrics` alone: a slow model list must not hold it up. Read on the
        # connection the `/metrics` poll just kept alive.
        self.registry.record_models(backend, self.read_models(backend))

    def read_models(self, backend: Backend) -> "tuple[dict, ...] | None":
        """The entries of the backend's `/v1/models`, or None (any model) when unreadable."""
        try:
            return model_lists.read_model_list(*self.get(backend.url + "/v1/models"))
        except PollFailed:
            return None

    def get(self, url: str) -> "tuple[int, bytes]":
        """GET `url` within HEALTH_TIMEOUT_SECONDS: its status and whole body, or `PollFailed`.

        A poll costs the hub its CPU time, and every relayed stream waits while it runs: it is
        prepared and sent the way the relay sends (`upstream.send`), which is ~1 ms of CPU less
        per poll than `Session.get`. A connection the backend closed unanswered (the keep-alive
        race, `upstream.StaleConnectionError`) is tried once more, as the relay does: it says
        nothing about the backend's health."""
        deadline = gevent.Timeout(self.timeout)
        try:
            with deadline:
                try:
                    return self.exchange(url)
                except upstream.ConnectFailed as exc:
                    if not exc.stale:
                        raise
                    return self.exchange(url)
        except gevent.Timeout as timeout:
            if timeout is not deadline:
                raise
            raise PollFailed("timeout") from None
        except upstream.ConnectFailed as exc:
            raise PollFailed(str(exc)) from exc
        except upstream.UpstreamTimeout as exc:
            raise PollFailed("timeout") from exc
        except (upstream.UpstreamFailed, urllib3.exceptions.HTTPError, OSError) as exc:
            raise PollFailed(upstream.failure_reason(exc)) from exc

    def exchange(self, url: str) -> "tuple[int, bytes]":
        response = upstream.send("GET", url, self.headers, None, self.timeout, self.timeout,
                                 session=self.session)
        try:
            return response.status, response.read()
        finally:
            response.close()


class PollFailed(Exception):
    """A poll got no complete answer; the reason, as `/_backends` shows it in `last_error`."""
