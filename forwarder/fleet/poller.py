"""The health cycle: which backend to poll, when, and what it learnt.

One poller greenlet runs in each gunicorn worker (started by `worker.Worker`), and the pollers of
one instance share the work through the host table, so that each backend is polled once per
cycle whatever the number of workers (every poll makes vLLM's API server render its `/metrics`
on the event loop that also streams its tokens):

- The **list leader**, the lowest ready worker slot, reads the backend list (and, as its
  `leader_duties`, the API keys file) every CHECK_INTERVAL_SECONDS, resolves its `dns+` entries
  and publishes the result.
- Each backend has one **poll owner**, the live worker whose rank among the live workers is the
  backend's column modulo their number. It polls `GET {base}/metrics`: healthy when it answers 200
  within HEALTH_TIMEOUT_SECONDS, its load figures read from the body but never deciding health.
  A healthy backend is polled every CHECK_INTERVAL_SECONDS (the polls of one owner spread over
  most of the interval, so that their work interleaves with relaying); an unhealthy one every
  second (or every CHECK_INTERVAL_SECONDS, when shorter), and at once when a request waits for
  a backend. Its `GET {base}/v1/models` is read when it turns healthy and every
  MODEL_LIST_SECONDS after; a list that cannot be read means "serves any model", never
  "unhealthy".
- Every poller, each TICK_SECONDS, mirrors what the others wrote into its worker's registry.
"""

import logging
import time

import gevent
import gevent.pool
import urllib3.exceptions

from .. import upstream
from ..host.layout import Column, Slot
from ..watched_file import WatchedFile
from . import backend_list, discovery, vllm_metrics
from .registry import Backend, Registry

log = logging.getLogger(__name__)

# Polls run concurrently; this bounds the sockets one worker opens at once for a large fleet.
MAX_CONCURRENT_POLLS = 64
# The share of the interval over which one owner's polls are spread.
POLL_SPREAD = 0.9
# How often an unhealthy backend is polled (at most; CHECK_INTERVAL_SECONDS when shorter).
UNHEALTHY_POLL_SECONDS = 1.0
# While requests wait for a backend to come back, the unhealthy ones are polled this often.
RECOVERY_POLL_SECONDS = 0.25
# A backend's model list is read again this long after the last reading.
MODEL_LIST_SECONDS = 30.0
# How often a poller looks at the host table for work and for what the others wrote.
TICK_SECONDS = 0.05
# Sent with every poll, so that a backend's access log (and a test's fake backend) can tell the
# forwarder's own polls from the requests it relays.
POLL_USER_AGENT = "vllm-forwarder-health"


class Poller:
    """This worker's share of the instance's polling, and its registry's mirror of the rest."""

    def __init__(self, registry: Registry, settings, leader_duties=()):
        self.registry = registry
        self.table = registry.table
        # What else the list leader reads every cycle (the API keys file).
        self.leader_duties = tuple(leader_duties)
        self.list_file = WatchedFile(settings.ip_list_file, "the backend list")
        self.default_port = settings.backend_default_port
        self.interval = settings.check_interval_seconds
        self.unhealthy_interval = min(UNHEALTHY_POLL_SECONDS, self.interval)
        self.timeout = settings.health_timeout_seconds
        # The relay's kind of session (no cookies, no proxy variables); one kept-alive
        # connection per backend.
        self.session = upstream.make_session(pool_maxsize=1)
        self.headers = {"User-Agent": POLL_USER_AGENT}
        self.pool = gevent.pool.Pool(MAX_CONCURRENT_POLLS)
        self.entries = []
        self.discovery = discovery.Discovery(settings)
        self.leading = False
        self.list_due = 0.0
        self.listing = None
        # Per base URL this worker polls: when its next poll is due, and when the last one began.
        self.due = {}
        self.polled = {}
        self.polling = set()
        self.wanted_seen = 0.0

    def run_forever(self) -> None:
        while True:
            try:
                self.tick()
            except Exception:  # the poller must outlive any bug in one tick
                log.exception("health poll tick failed")
            self.registry.poll_requested.clear()
            self.registry.poll_requested.wait(TICK_SECONDS)

    def tick(self) -> None:
        table = self.table
        now = time.time()
        table.refresh_slots_in_use()
        table.set_own_float(Slot.HEARTBEAT, now)
        owners = table.serving_slots()
        leader = table.leader() == table.slot
        if leader and not self.leading:
            self.discovery.remember(self.registry.listed)
        self.leading = leader
        if leader and now >= self.list_due and self.listing is None:
            self.list_due = now + self.interval
            self.listing = gevent.spawn(self.publish_list)
        self.registry.sync()
        if table.slot not in owners:
            return
        rank, count = owners.index(table.slot), len(owners)
        mine = [b for b in self.registry.listed if b.column % count == rank]
        recovering = table.polls_wanted_at > self.wanted_seen
        if recovering and now - self.wanted_seen >= RECOVERY_POLL_SECONDS:
            self.wanted_seen = now
        else:
            recovering = False
        for index, backend in enumerate(mine):
            if backend.url in self.polling:
                continue
            due = self.due.get(backend.url, 0.0)
            if not backend.healthy:
                due = min(due, self.polled.get(backend.url, 0.0) + self.unhealthy_interval)
                if recovering:
                    due = now
            if now >= due:
                self.polled[backend.url] = now
                first = backend.url not in self.due
                # After its first poll each backend keeps its own phase in the interval.
                phase = POLL_SPREAD * self.interval * index / len(mine) if first else 0.0
                self.due[backend.url] = now + self.interval + phase
                self.polling.add(backend.url)
                self.pool.spawn(self.check, backend)
        listed = {b.url for b in self.registry.listed}
        for url in [url for url in self.due if url not in listed]:
            del self.due[url]
            self.polled.pop(url, None)

    def publish_list(self) -> None:
        try:
            for duty in self.leader_duties:
                duty()
            self.reload_list()
            # `dns+` entries are resolved again every cycle, even when the file did not change.
            urls, sources = self.discovery.expand(self.entries)
            self.registry.publish_list(urls, sources, self.list_file.path)
        except Exception:
            log.exception("reading the backend list failed")
        finally:
            self.listing = None

    def reload_list(self) -> None:
        text = self.list_file.changed()
        if text is not None:  # unchanged: parsing again would only repeat the bad lines' warnings
            self.entries = backend_list.parse_backend_list(text, self.list_file.path,
                                                           self.default_port)

    def check(self, backend: Backend) -> None:
        try:
            was_healthy = backend.healthy
            try:
                status, body = self.get(backend.url + "/metrics")
            except PollFailed as failed:
                self.registry.record_poll(backend, False, reason=str(failed))
                return
            if status != 200:
                self.registry.record_poll(backend, False, status=status)
                return
            figures = vllm_metrics.read_load(body.decode("utf-8", "replace"))
            self.registry.record_poll(backend, True, figures=figures)
            read_at = self.table.float(backend.column, Column.MODELS_READ_AT)
            if not was_healthy or time.time() - read_at >= MODEL_LIST_SECONDS:
                # Read on the connection the `/metrics` poll just kept alive.
                self.registry.write_models(backend, self.read_models(backend))
        finally:
            self.polling.discard(backend.url)

    def read_models(self, backend: Backend) -> "bytes | None":
        """The body of the backend's `/v1/models` answer, or None when it has none to give."""
        try:
            status, body = self.get(backend.url + "/v1/models")
        except PollFailed:
            return None
        return body if status == 200 else None

    def get(self, url: str) -> "tuple[int, bytes]":
        """GET `url` within HEALTH_TIMEOUT_SECONDS: its status and whole body, or `PollFailed`.

        A poll costs the hub its CPU time, and every relayed stream waits while it runs: it is
        prepared and sent the way the relay sends (`upstream.send`), which is ~1 ms of CPU less
        per poll than `Session.get`. A connection the backend closed unanswered (the keep-alive
        race) is tried once more, as the relay does: it says nothing about the backend's
        health."""
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
