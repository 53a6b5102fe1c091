"""CPU cost per request of the telemetry hooks on the proxy path, measured in isolation.

    python bench/telemetry_hooks.py [--requests 20000]

Runs each piece the way one `/v1` request runs it, in prometheus-client's multiprocess mode (as
under gunicorn), and prints microseconds of process CPU per request:

- metrics: `Exchange` from start to count (the request counter and two histograms), the
  backend's in-flight gauge up and down, with the series cached after the first request;
- request id: the app's `Edge` middleware taking the client's id and adding the response header;
- access log: `AccessLogger.access` as `gunicorn.conf.py` sets it up, writing to /dev/null,
  beside gunicorn's generic `access_log_format` path writing the same fields, for comparison.
"""

import argparse
import os
import runpy
import shutil
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

# As in gunicorn.conf.py: before anything imports prometheus_client.
os.environ["PROMETHEUS_MULTIPROC_DIR"] = METRICS_DIR = tempfile.mkdtemp(prefix="bench-metrics-")
os.environ.pop("VLLM_FORWARDER_METRICS_MASTER", None)
os.environ.setdefault("IP_LIST_FILE", os.devnull)

from gunicorn.config import Config  # noqa: E402

from forwarder import environ_keys  # noqa: E402
from forwarder.observe import metrics  # noqa: E402
from forwarder.app import Edge  # noqa: E402
from forwarder.fleet.registry import Registry  # noqa: E402

BACKEND = "http://10.0.0.11:8101"
# The headers the openai SDK sends with a chat completion.
REQUEST_HEADERS = [
    ("Host", "forwarder:9000"), ("Accept-Encoding", "gzip, deflate"), ("Connection", "keep-alive"),
    ("Accept", "application/json"), ("Content-Type", "application/json"),
    ("User-Agent", "OpenAI/Python 1.99.0"), ("X-Stainless-Lang", "python"),
    ("X-Stainless-Package-Version", "1.99.0"), ("X-Stainless-OS", "Linux"),
    ("X-Stainless-Arch", "x64"), ("X-Stainless-Runtime", "CPython"),
    ("X-Stainless-Runtime-Version", "3.11.7"), ("Authorization", "Bearer sk-x"),
    ("X-Stainless-Async", "false"), ("X-Stainless-Retry-Count", "0"),
    ("X-Stainless-Read-Timeout", "600"), ("Content-Length", "95"),
    ("X-Request-Id", "client-trace-123"),
]


def gunicorn_environ():
    """An environ as gunicorn and Flask leave it by the time the access log is written."""
    environ = {
        "wsgi.errors": None, "wsgi.version": (1, 0), "wsgi.multithread": True,
        "wsgi.multiprocess": False, "wsgi.run_once": False, "wsgi.file_wrapper": None,
        "wsgi.input_terminated": True, "SERVER_SOFTWARE": "gunicorn/27.0.1", "wsgi.input": None,
        "gunicorn.socket": None, "REQUEST_METHOD": "POST", "QUERY_STRING": "",
        "RAW_URI": "/v1/chat/completions", "SERVER_PROTOCOL": "HTTP/1.1",
        "CONTENT_TYPE": "application/json", "CONTENT_LENGTH": "95", "wsgi.url_scheme": "http",
        "REMOTE_ADDR": "10.0.0.2", "REMOTE_PORT": "51234", "SERVER_NAME": "0.0.0.0",
        "SERVER_PORT": "9000", "PATH_INFO": "/v1/chat/completions", "SCRIPT_NAME": "",
        "werkzeug.request": None,
    }
    for name, value in REQUEST_HEADERS:
        key = "HTTP_" + name.upper().replace("-", "_")
        if key not in ("HTTP_CONTENT_TYPE", "HTTP_CONTENT_LENGTH"):
            environ[key] = value
    return environ


class _Response:
    """Stands for the Flask response: what `Exchange` touches of it."""

    __slots__ = ("status_code", "closers")

    def __init__(self):
        self.status_code = 200
        self.closers = []

    def call_on_close(self, function):
        self.closers.append(function)


def per_request_us(run_once, requests):
    for _ in range(min(1000, requests)):  # warm: series made, caches filled
        run_once()
    started = time.process_time()
    for _ in range(requests):
        run_once()
    return (time.process_time() - started) / requests * 1e6


def metrics_hooks(backend, registry):
    environ = gunicorn_environ()
    environ[environ_keys.REQUEST_ID] = "client-trace-123"

    def once():
        exchange = metrics.Exchange(environ, "chat/completions", registry)
        exchange.sending_to(backend)
        backend.acquire()
        exchange.first_byte()
        response = _Response()
        exchange.finished(response)
        backend.release()
        for close in response.closers:
            close()

    return once


def request_id_hooks():
    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "application/json")])
        return []

    middleware = Edge(app)
    environ = gunicorn_environ()

    def start_response(status, headers, exc_info=None):
        return None

    def once():
        middleware(environ, start_response)

    return once


class _GunicornRequest:
    headers = [(name.upper(), value) for name, value in REQUEST_HEADERS]


class _GunicornResponse:
    status = "200 OK"
    sent = 1661
    headers = [("Content-Type", "text/event-stream; charset=utf-8"),
               ("X-Fake-Backend", "gpu-1"), ("X-Request-Id", "client-trace-123")]


# The same fields through gunicorn's generic `access_log_format` machinery.
GENERIC_FORMAT = (
    "%(t)s request_id=%({forwarder.request_id}e)s method=%(m)s path=%({raw_uri}e)s "
    "status=%(s)s backend=%({forwarder.backend}e)s duration=%(L)s ttfb=%({forwarder.ttfb}e)s "
    "bytes=%(b)s cut=%({forwarder.cut}e)s client=%(h)s pid=%(p)s")


def access_log_line(access_log_format=None):
    settings = runpy.run_path(str(REPO_ROOT / "gunicorn.conf.py"))
    config = Config()
    config.set("accesslog", os.devnull)
    config.set("logger_class", settings["logger_class"])
    if access_log_format:
        config.set("access_log_format", access_log_format)
    logger = config.logger_class(config)
    environ = gunicorn_environ()
    environ.update({environ_keys.REQUEST_ID: "client-trace-123",
                    environ_keys.BACKEND: BACKEND, environ_keys.TTFB: "0.012345"})
    request, response = _GunicornRequest(), _GunicornResponse()
    took = timedelta(microseconds=23456)

    def once():
        logger.access(response, request, environ, took)

    return once


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20000)
    args = parser.parse_args()
    registry = Registry()
    registry.publish_list([BACKEND], {}, "bench")
    (backend,) = registry.backends()
    rows = [
        ("metrics (Exchange + in-flight gauge)", metrics_hooks(backend, registry)),
        ("request id (middleware)", request_id_hooks()),
        ("access log (AccessLogger)", access_log_line()),
        ("  for comparison: gunicorn's access_log_format", access_log_line(GENERIC_FORMAT)),
    ]
    print(f"CPU per request, {args.requests} requests each, multiprocess mode in {METRICS_DIR}")
    total = 0.0
    for name, once in rows:
        cost = per_request_us(once, args.requests)
        if not name.startswith(" "):
            total += cost
        print(f"{name:45s} {cost:7.1f} us")
    print(f"{'total added per proxied request':45s} {total:7.1f} us")
    shutil.rmtree(METRICS_DIR, ignore_errors=True)


if __name__ == "__main__":
    main()
