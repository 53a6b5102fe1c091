"""The forwarder's own Prometheus metrics: every `forwarder_*` series is declared and written here.

Under gunicorn the workers share their figures through prometheus-client's multiprocess mode
(`gunicorn.conf.py` sets `PROMETHEUS_MULTIPROC_DIR` before anything imports prometheus_client),
so `GET /metrics` shows the same totals whichever worker answers. Without that variable (a unit
test, a plain WSGI server) the figures stay in this process.

The request path pays for a few counter and histogram writes at the end of each `/v1` request
(`Exchange`); every label value comes from a fixed set (`endpoint`), the backend list (`backend`)
or the HTTP status. The backends' health and load are not written at all: each worker's poller
already holds them in its `Registry`, and `FleetCollector` reads them there when scraped.
"""

import os
import time

from flask import Response
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from .. import environ_keys
from ..host.layout import BackendCount

# The `/v1/` paths of vLLM and the OpenAI API; a longer path whose start is one of these (an id
# after it: `models/llama-3`, `responses/resp_1/cancel`) counts as that endpoint, anything else
# as `other`, so the label never takes a client-chosen value.
ENDPOINTS = frozenset((
    "chat/completions", "completions", "embeddings", "models", "responses", "messages",
    "audio/transcriptions", "audio/translations", "audio/speech", "images/generations",
    "moderations", "rerank", "score", "classify", "pooling", "tokenize", "detokenize",
    "files", "batches", "load_lora_adapter", "unload_lora_adapter",
))
OTHER_ENDPOINT = "other"
# The `backend` label of a request never sent to a backend (a 503, a path outside /v1/). Any other
# request is counted under the last backend it was sent to, whether that one answered or not.
NO_BACKEND = "none"
# The `model` label of a model the fleet does not serve (or a request that named none), and the
# `key` label of a request without a key's name: their values stay few.
OTHER_MODEL = "other"
NO_KEY = "none"
# Cut responses that count as errors of their backend.
_BACKEND_CUTS = frozenset(("backend_error", "backend_timeout"))


# An answer can take from milliseconds (a cached embedding) to READ_TIMEOUT_SECONDS (600 s).
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300,
                    600, float("inf"))
# The first byte of a stream is the first token: prefill of a long prompt under load.
TTFB_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120,
                float("inf"))

_LOCAL = CollectorRegistry()

REQUESTS = Counter(
    "forwarder_requests_total",
    "Requests to /v1/ answered, by the backend that answered (none: the forwarder itself), "
    "endpoint and HTTP status.",
    ("backend", "endpoint", "status"), registry=_LOCAL)
DURATION = Histogram(
    "forwarder_request_duration_seconds",
    "Seconds from a /v1/ request's arrival to the end of its response.",
    ("backend", "endpoint"), buckets=DURATION_BUCKETS, registry=_LOCAL)
TTFB = Histogram(
    "forwarder_time_to_first_byte_seconds",
    "Seconds from a /v1/ request's arrival to the first byte of the backend's response body "
    "(for a stream: its first token).",
    ("backend", "endpoint"), buckets=TTFB_BUCKETS, registry=_LOCAL)
IN_FLIGHT = Gauge(
    "forwarder_requests_in_flight",
    "Requests sent to a backend and not yet relayed to the end, over all workers.",
    ("backend",), multiprocess_mode="livesum", registry=_LOCAL)
RETRIES = Counter(
    "forwarder_retries_total",
    "Requests sent again: to another backend because the one picked could not be connected "
    "to, or once more when a kept-alive connection turned out closed without an answer.",
    registry=_LOCAL)
PROMPT_TOKENS = Counter(
    "forwarder_prompt_tokens_total",
    "Prompt tokens of the answers that reported their usage, by model (other: one the fleet "
    "does not serve) and API key name (none: no key, or a key without a name).",
    ("model", "key"), registry=_LOCAL)
COMPLETION_TOKENS = Counter(
    "forwarder_completion_tokens_total",
    "Completion tokens of the answers that reported their usage, by model and API key name.",
    ("model", "key"), registry=_LOCAL)
# The first token: milliseconds for a short prompt, minutes for a long prefill under load.
TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, float("inf"))
TTFT = Histogram(
    "forwarder_time_to_first_token_seconds",
    "Seconds from a chat or completions stream's arrival to its first event (its first token), "
    "by model.",
    ("model",), buckets=TTFT_BUCKETS, registry=_LOCAL)
# Decoding speed: a few milliseconds per token on a fast GPU, more under a large batch.
TPOT_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, float("inf"))
TPOT = Histogram(
    "forwarder_time_per_output_token_seconds",
    "Seconds per output token after the first, of a chat or completions stream that reported "
    "its usage, by model.",
    ("model",), buckets=TPOT_BUCKETS, registry=_LOCAL)
EJECTIONS = Counter(
    "forwarder_ejections_total",
    "Times a backend was taken out of rotation for failing requests in a row.",
    ("backend",), registry=_LOCAL)
REJECTED = Counter(
    "forwarder_rejected_total",
    "Requests refused with 429 before reaching a backend, by reason (queue_full, queue_timeout, "
    "queue_overload, key_max_concurrent, key_requests_per_minute, key_tokens_per_minute).",
    ("reason",), registry=_LOCAL)
# A request waits in the queue from milliseconds to QUEUE_TIMEOUT_SECONDS (30 s).
QUEUE_WAIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, float("inf"))
QUEUE_WAIT = Histogram(
    "forwarder_queue_wait_seconds",
    "Seconds a request waited in the instance's queue (MAX_IN_FLIGHT_PER_BACKEND), whether it "
    "was then sent or refused.",
    buckets=QUEUE_WAIT_BUCKETS, registry=_LOCAL)
RESUMES = Counter(
    "forwarder_resumes_total",
    "Answers whose backend broke off: gone on on another backend (resumed), tried and failed "
    "(failed), or not to be continued (not_resumable).",
    ("outcome",), registry=_LOCAL)
CLIENT_DISCONNECTS = Counter(
    "forwarder_client_disconnects_total",
    "Requests whose client went away before the whole response was relayed.",
    registry=_LOCAL)

# The series a finished request writes, keyed by their label values: a dict lookup per request
# instead of prometheus-client's `labels()`, which validates and locks every time. A TTFB series
# is made only once observed, so requests that never reach a backend leave no empty histogram.
_series = {}  # (backend, endpoint, status) -> (requests counter, duration histogram)
_ttfb_series = {}  # (backend, endpoint) -> TTFB histogram
_token_series = {}  # (model, key) -> (prompt tokens counter, completion tokens counter)
_stream_series = {}  # model -> (time to first token, time per output token) histograms
_in_flight_series = {}  # backend -> in-flight gauge


def endpoint_of(subpath: str) -> str:
    """The `endpoint` label of a `/v1/{subpath}` request."""
    if subpath in ENDPOINTS:
        return subpath
    segments = subpath.strip("/").split("/")
    for length in (2, 1):
        prefix = "/".join(segments[:length])
        if prefix in ENDPOINTS:
            return prefix
    return OTHER_ENDPOINT


def _series_for(key):
    backend, endpoint, status = key
    series = _series[key] = (REQUESTS.labels(backend, endpoint, status),
                             DURATION.labels(backend, endpoint))
    return series


def _ttfb_series_for(key):
    series = _ttfb_series[key] = TTFB.labels(*key)
    return series


def _token_series_for(labels):
    series = _token_series[labels] = (PROMPT_TOKENS.labels(*labels),
                                      COMPLETION_TOKENS.labels(*labels))
    return series


def _stream_series_for(model):
    series = _stream_series[model] = (TTFT.labels(model), TPOT.labels(model))
    return series


class Exchange:
    """One `/v1` request as the metrics, the access log (`access_log.py`) and the host table's
    counters of `/_status` see it, counted when it ends: its backend, key, model and token
    usage. It only observes: what the request holds is its ledger's (`relay/ledger.py`)."""

    __slots__ = ("_environ", "_endpoint", "_started", "_registry", "backend", "_column",
                 "_first_byte", "_last_byte", "_response", "key", "model", "usage",
                 "token_stream")

    def __init__(self, environ: dict, subpath: str, registry):
        self._started = time.perf_counter()
        self._environ = environ
        self._endpoint = endpoint_of(subpath)
        self._registry = registry
        # The base URL of the backend the request was last sent to, or NO_BACKEND.
        self.backend = NO_BACKEND
        self._column = None
        self._first_byte = None
        self._last_byte = None
        self._response = None
        # The API key (`tenants.keys.Key`) of the request, the model it named, what its answer
        # used (`tenants.usage.Usage`), and whether that answer was a stream whose first event
        # is its first token (chat, completions: the ones TTFT and TPOT are measured on).
        self.key = None
        self.model = None
        self.usage = None
        self.token_stream = False

    @property
    def request_id(self) -> str:
        return self._environ[environ_keys.REQUEST_ID]

    @property
    def environ(self) -> dict:
        return self._environ

    @property
    def endpoint(self) -> str:
        return self._endpoint

    def sending_to(self, backend) -> None:
        """The request is being sent to this backend."""
        self.backend = self._environ[environ_keys.BACKEND] = backend.url
        self._column = backend.column

    def first_byte(self) -> None:
        """The first byte of the backend's response body is ready to go to the client."""
        self._first_byte = elapsed = time.perf_counter() - self._started
        self._environ[environ_keys.TTFB] = "%.6f" % elapsed

    def last_byte(self) -> None:
        """The backend's response body has all been relayed (and its usage read)."""
        self._last_byte = time.perf_counter() - self._started
        usage, environ = self.usage, self._environ
        if usage is not None:
            if self.model is None and usage.model is not None:
                environ[environ_keys.MODEL] = usage.model
            if usage.prompt_tokens is not None:
                environ[environ_keys.PROMPT_TOKENS] = usage.prompt_tokens
                environ[environ_keys.COMPLETION_TOKENS] = usage.completion_tokens

    def named(self, model: "str | None") -> None:
        """The request names `model`."""
        self.model = model
        if model is not None:
            self._environ[environ_keys.MODEL] = model

    def resumed(self) -> None:
        """The answer went on on another backend (once more)."""
        self._environ[environ_keys.RESUMED] = self._environ.get(environ_keys.RESUMED, 0) + 1

    def cut(self, reason: str) -> None:
        """The response ended before the backend's body did, for `reason` (the access log's
        `cut=`: `backend_error`, `backend_timeout`, `client_left`, `shutdown`)."""
        self._environ[environ_keys.CUT] = reason

    def finished(self, response: Response) -> Response:
        """`response` is the answer; it is counted once the server has closed it."""
        self._response = response
        response.call_on_close(self._count)
        return response

    def _count(self) -> None:
        duration = time.perf_counter() - self._started
        status = self._response.status_code
        key = (self.backend, self._endpoint, status)
        count, durations = _series.get(key) or _series_for(key)
        count.inc()
        durations.observe(duration)
        if self._first_byte is not None:
            key = (self.backend, self._endpoint)
            (_ttfb_series.get(key) or _ttfb_series_for(key)).observe(self._first_byte)
        self._account(status)

    def _account(self, status: int) -> None:
        """The request's tokens and outcome, per backend, key and model."""
        environ, table, usage = self._environ, self._registry.table, self.usage
        model = self.model or (usage.model if usage is not None else None)
        tokens = 0
        if usage is not None and usage.prompt_tokens is not None:
            tokens = usage.prompt_tokens + usage.completion_tokens
            labels = (model if model in self._registry.view.model_ids else OTHER_MODEL,
                      self.key.label if self.key is not None else NO_KEY)
            prompt, completion = _token_series.get(labels) or _token_series_for(labels)
            prompt.inc(usage.prompt_tokens)
            completion.inc(usage.completion_tokens)
            if self.token_stream and self._first_byte is not None:
                ttft, tpot = _stream_series.get(labels[0]) or _stream_series_for(labels[0])
                ttft.observe(self._first_byte)
                if usage.completion_tokens > 1 and self._last_byte is not None:
                    tpot.observe((self._last_byte - self._first_byte)
                                 / (usage.completion_tokens - 1))
        failed = status >= 500 or environ.get(environ_keys.CUT) in _BACKEND_CUTS
        if self._column is not None:
            table.add_backend(BackendCount.REQUESTS, self._column, 1)
            table.add_backend(BackendCount.ERRORS, self._column, int(failed))
            table.add_backend(BackendCount.TOKENS, self._column, tokens)


def client_disconnected() -> None:
    CLIENT_DISCONNECTS.inc()


def resumed(outcome: str) -> None:
    RESUMES.labels(outcome).inc()


def retried() -> None:
    RETRIES.inc()


def ejected(backend_url: str) -> None:
    EJECTIONS.labels(backend_url).inc()


def rejected(reason: str) -> None:
    REJECTED.labels(reason).inc()


def queue_waited(seconds: float) -> None:
    QUEUE_WAIT.observe(seconds)


def in_flight(backend_url: str):
    """The in-flight gauge of one backend (this worker's share, summed over workers when
    scraped), which a request's ledger moves as it takes and gives back the backend's place."""
    gauge = _in_flight_series.get(backend_url)
    if gauge is None:
        gauge = _in_flight_series[backend_url] = IN_FLIGHT.labels(backend_url)
    return gauge


class FleetCollector:
    """The backends' health and load and the queue, read from the host table (through this
    worker's registry) when scraped: the same whichever worker answers, and a backend removed
    from the list leaves no stale series behind (multiprocess files can only ever grow)."""

    def __init__(self, registry):
        self._registry = registry

    def collect(self):
        healthy = GaugeMetricFamily(
            "forwarder_backend_healthy", "1 when the backend's last health poll succeeded.",
            labels=("backend",))
        running = GaugeMetricFamily(
            "forwarder_backend_requests_running",
            "The backend's own vllm:num_requests_running at its last poll (absent: unknown).",
            labels=("backend",))
        waiting = GaugeMetricFamily(
            "forwarder_backend_requests_waiting",
            "The backend's own vllm:num_requests_waiting at its last poll (absent: unknown).",
            labels=("backend",))
        kv_cache = GaugeMetricFamily(
            "forwarder_backend_kv_cache_usage",
            "The backend's KV-cache use at its last poll, 0 to 1, the highest over its engines "
            "(absent: unknown).",
            labels=("backend",))
        queued = GaugeMetricFamily(
            "forwarder_queue_depth",
            "Requests waiting in the instance's queue now, all workers together.")
        for backend in self._registry.backends():
            healthy.add_metric((backend.url,), 1.0 if backend.healthy else 0.0)
            if backend.num_requests_running is not None:
                running.add_metric((backend.url,), backend.num_requests_running)
            if backend.num_requests_waiting is not None:
                waiting.add_metric((backend.url,), backend.num_requests_waiting)
            if backend.kv_cache_usage is not None:
                kv_cache.add_metric((backend.url,), backend.kv_cache_usage)
        queued.add_metric((), self._registry.queued())
        return (healthy, running, waiting, kv_cache, queued)


class Scrape:
    """What `GET /metrics` shows: every worker's request figures, and the fleet."""

    def __init__(self, registry):
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            per_request = MultiProcessCollector(None)
        else:
            per_request = _LOCAL
        self._sources = (per_request, FleetCollector(registry))

    def collect(self):
        for source in self._sources:
            yield from source.collect()

    def response(self) -> Response:
        return Response(generate_latest(self), content_type=CONTENT_TYPE_PLAIN_0_0_4,
                        headers={"Cache-Control": "no-store"})
