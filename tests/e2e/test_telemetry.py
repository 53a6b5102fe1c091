"""The forwarder's own telemetry: `/metrics` through real gunicorn workers, `X-Request-Id`, the
access log line, and the Grafana dashboard's queries."""

import json
import os
import re
import signal
import socket

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from forwarder.observe import metrics
from tests.harness import REPO_ROOT, backend_behind_forwarder, wait_until

DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "forwarder.json"


def get(url, **kwargs):
    """One request on a connection of its own (so that any worker may answer), closed after."""
    with requests.Session() as session:
        session.trust_env = False
        return session.get(url, timeout=10, **kwargs)


def scrape(fwd):
    """{(sample name, ((label, value), ...)): value} from GET /metrics."""
    response = get(fwd.url + "/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.text)
            for s in family.samples}


def value(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def requests_counted(samples):
    return {labels: v for (name, labels), v in samples.items()
            if name == "forwarder_requests_total"}


def test_metrics_add_up_over_workers_and_survive_a_worker_crash(fake_backend, forwarder):
    backend = fake_backend()
    # Until a worker's first poll it knows no healthy backend: requests wait for it, not 503.
    fwd = forwarder([backend.url], workers=2, env={"NO_BACKEND_WAIT_SECONDS": "10"},
                    wait_healthy=1)
    labels = dict(backend=backend.url, endpoint="models", status="200")

    # Fresh connections until both workers have served /v1 requests.
    sent = 0

    def both_workers_served():
        nonlocal sent
        assert get(fwd.url + "/v1/models/llama").status_code == 200
        sent += 1
        pids = {line["pid"] for line in fwd.access_lines() if line["path"] == "/v1/models/llama"}
        return sent >= 5 and len(pids) == 2

    wait_until(both_workers_served, timeout=15, message="one worker served every request")

    # A stream whose first byte comes at once and whose end comes later: TTFB is the first byte.
    backend.configure(tokens=3, token_delay=0.5)
    body = {"model": "llama", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    with requests.post(fwd.url + "/v1/chat/completions", json=body, timeout=10) as response:
        assert response.content.endswith(b"data: [DONE]\n\n")
    backend.configure(token_delay=0)
    chat = dict(backend=backend.url, endpoint="chat/completions")

    def expected(samples):
        assert value(samples, "forwarder_requests_total", **labels) == sent
        assert value(samples, "forwarder_request_duration_seconds_count",
                     backend=backend.url, endpoint="models") == sent
        assert value(samples, "forwarder_requests_total", status="200", **chat) == 1
        assert value(samples, "forwarder_time_to_first_byte_seconds_bucket", le="1.0",
                     **chat) == 1
        assert value(samples, "forwarder_request_duration_seconds_bucket", le="1.0",
                     **chat) == 0
        assert value(samples, "forwarder_request_duration_seconds_bucket", le="5.0",
                     **chat) == 1
        assert value(samples, "forwarder_request_duration_seconds_sum", **chat) >= 1.5
        assert value(samples, "forwarder_requests_in_flight", backend=backend.url) == 0
        return samples

    # A request is counted once its worker has closed the response, a moment after the client
    # has read the end of it.
    wait_until(lambda: value(scrape(fwd), "forwarder_requests_total", status="200", **chat) == 1)

    # Every scrape, whichever worker answers it, shows the same totals.
    scrapes = []

    def both_workers_scraped():
        samples = expected(scrape(fwd))
        assert value(samples, "forwarder_backend_healthy", backend=backend.url) == 1
        scrapes.append(requests_counted(samples))
        pids = {line["pid"] for line in fwd.access_lines() if line["path"] == "/metrics"}
        return len(pids) == 2

    wait_until(both_workers_scraped, timeout=15, message="one worker answered every scrape")
    assert all(s == scrapes[0] for s in scrapes)

    # A stream in flight, then every worker dies at once: the master starts new ones; totals
    # stay, and the dead workers' in-flight requests are no longer counted.
    backend.configure(stall_after=1)
    with requests.post(fwd.url + "/v1/chat/completions", json=body, stream=True,
                       timeout=10) as stalled:
        chunks = stalled.iter_content(None)  # kept: dropping it would close the connection
        next(chunks)
        wait_until(lambda: value(scrape(fwd), "forwarder_requests_in_flight",
                                 backend=backend.url) == 1, timeout=10)
        old = fwd.worker_pids()
        assert len(old) == 2
        for pid in old:
            os.kill(pid, signal.SIGKILL)
        wait_until(lambda: len(fwd.worker_pids() - old) == 2, timeout=15,
                   message=lambda: f"workers not restarted:\n{fwd.log()[-2000:]}")
    backend.configure(stall_after=None)
    samples = expected(scrape(fwd))
    assert requests_counted(samples) == scrapes[0]
    assert get(fwd.url + "/v1/models/llama").status_code == 200
    wait_until(lambda: value(scrape(fwd), "forwarder_requests_total", **labels) == sent + 1)


def test_retries_health_and_errors_by_backend(fake_backend, forwarder):
    first = fake_backend(config={"running": 7, "waiting": 2})
    second = fake_backend()
    # Polls far apart: a dead backend stays "healthy" until a request fails to connect to it.
    fwd = forwarder([first.url, second.url], env={"CHECK_INTERVAL_SECONDS": "60"},
                    wait_healthy=2)
    samples = scrape(fwd)
    assert value(samples, "forwarder_backend_healthy", backend=first.url) == 1
    assert value(samples, "forwarder_backend_requests_running", backend=first.url) == 7
    assert value(samples, "forwarder_backend_requests_waiting", backend=first.url) == 2
    assert value(samples, "forwarder_retries_total") == 0

    assert get(fwd.url + "/v1/models/llama").status_code == 200
    assert get(fwd.url + "/v1/some/future/endpoint").status_code == 200

    first.kill()
    for sent in range(1, 41):
        response = get(fwd.url + "/v1/models/llama")
        assert response.status_code == 200
        if value(scrape(fwd), "forwarder_retries_total") == 1:
            break
    else:
        pytest.fail("no request was retried on the other backend")
    assert get(fwd.url + "/v1/models/llama").status_code == 200
    samples = scrape(fwd)
    assert value(samples, "forwarder_retries_total") == 1  # the dead one is out of rotation
    assert value(samples, "forwarder_backend_healthy", backend=first.url) == 0
    assert value(samples, "forwarder_backend_healthy", backend=second.url) == 1

    second.kill()
    assert get(fwd.url + "/v1/models/llama").status_code == 502
    assert get(fwd.url + "/v1/models/llama").status_code == 503
    counted = requests_counted(scrape(fwd))
    by = {(dict(k)["backend"], dict(k)["endpoint"], dict(k)["status"]): v
          for k, v in counted.items()}
    assert by[(second.url, "models", "502")] == 1
    assert by[(metrics.NO_BACKEND, "models", "503")] == 1
    assert sum(v for (b, e, s), v in by.items() if e == "other") == 1
    assert sum(v for (b, e, s), v in by.items() if e == "models") == sent + 4
    assert {e for (b, e, s) in by} == {"models", "other"}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """One fake backend that echoes X-Request-Id as vLLM can, behind one forwarder."""
    with backend_behind_forwarder(tmp_path_factory, {"request_id_header": True}) as pair:
        yield pair


def test_request_id_is_kept_sent_upstream_and_returned(served):
    backend, fwd = served
    backend.reset()
    kept = get(fwd.url + "/v1/models/llama", headers={"X-Request-Id": "trace-42:abc"})
    made = get(fwd.url + "/v1/models/llama")
    replaced = get(fwd.url + "/v1/models/llama", headers={"X-Request-Id": "x" * 500})
    seen = [r["headers"]["x-request-id"] for r in backend.requests()]
    assert seen[0] == ["trace-42:abc"]
    for response, upstream in zip((kept, made, replaced), seen):
        # One header only, though the backend echoes its own copy.
        assert response.raw.headers.getlist("X-Request-Id") == upstream
    assert re.fullmatch(r"[0-9a-f]{32}", made.headers["x-request-id"])
    assert re.fullmatch(r"[0-9a-f]{32}", replaced.headers["x-request-id"])
    # The forwarder's own answers carry one too.
    assert get(fwd.url + "/_backends", headers={"X-Request-Id": "own"}).headers[
        "x-request-id"] == "own"


def test_one_access_log_line_per_request(served):
    backend, fwd = served
    body = {"model": "llama", "prompt": "x", "stream": True}
    response = requests.post(fwd.url + "/v1/completions?trace=1", json=body, timeout=10,
                             headers={"X-Request-Id": "log-line-1"})
    missing = get(fwd.url + "/v2/nothing", headers={"X-Request-Id": "log-line-2"})
    assert missing.status_code == 404

    def lines_for(rid):
        return [line for line in fwd.access_lines() if line["request_id"] == rid]

    (line,) = wait_until(lambda: lines_for("log-line-1"))
    assert line["method"] == "POST"
    assert line["path"] == "/v1/completions?trace=1"
    assert line["status"] == "200"
    assert line["backend"] == backend.url
    assert int(line["bytes"]) == len(response.content)
    duration, ttfb = float(line["duration"]), float(line["ttfb"])
    assert 0 < ttfb <= duration < 10

    (line,) = wait_until(lambda: lines_for("log-line-2"))
    assert (line["method"], line["path"], line["status"]) == ("GET", "/v2/nothing", "404")
    assert line["backend"] == line["ttfb"] == "-"


def test_client_disconnects_are_counted(served):
    backend, fwd = served
    backend.reset()
    backend.configure(tokens=50, token_delay=0.2)
    before = scrape(fwd)
    disconnects = value(before, "forwarder_client_disconnects_total")
    body = {"model": "llama", "stream": True, "prompt": "x"}
    try:
        # Gone in the middle of a stream.
        with requests.post(fwd.url + "/v1/completions", json=body, stream=True,
                           timeout=10) as response:
            next(response.iter_content(None))
        wait_until(lambda: value(scrape(fwd), "forwarder_client_disconnects_total")
                   == disconnects + 1)
        # Gone before the backend answered anything: counted as nginx's 499.
        backend.configure(first_byte_delay=30)
        with socket.create_connection(("127.0.0.1", fwd.port)) as sock:
            payload = json.dumps(body).encode()
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
            wait_until(lambda: len(backend.requests()) == 2)
        wait_until(lambda: value(scrape(fwd), "forwarder_client_disconnects_total")
                   == disconnects + 2)
    finally:
        backend.reset()
    samples = scrape(fwd)
    assert value(samples, "forwarder_requests_total", backend=backend.url,
                 endpoint="completions", status="499") == 1
    assert value(samples, "forwarder_requests_in_flight", backend=backend.url) == 0


def _queries(node):
    """Every PromQL text in a dashboard: panel targets' `expr`, template variables' `query`."""
    if isinstance(node, dict):
        if isinstance(node.get("expr"), str):
            yield node["expr"]
        if node.get("type") == "query":
            query = node.get("query")
            yield query["query"] if isinstance(query, dict) else query
        for child in node.values():
            yield from _queries(child)
    elif isinstance(node, list):
        for child in node:
            yield from _queries(child)


def test_dashboard_queries_name_exported_metrics(served):
    backend, fwd = served
    assert get(fwd.url + "/v1/models/llama").status_code == 200  # so that the histograms exist
    # Series with labels appear once the first of them is counted: a stream whose usage is read
    # counts tokens, time to first token and time per output token (nothing here is ejected or
    # refused).
    body = {"model": "llama", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    assert requests.post(fwd.url + "/v1/chat/completions", json=body, timeout=10).ok

    def exported_once_counted():
        names = {name for name, _ in scrape(fwd)}
        return names if "forwarder_time_per_output_token_seconds_bucket" in names else None

    exported = wait_until(exported_once_counted, message="the stream's usage was never counted")
    exported |= {"forwarder_ejections_total", "forwarder_rejected_total"}
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for p in dashboard["panels"] if p.get("type") != "row"]
    assert panels
    for panel in panels:
        assert list(_queries(panel)), f"panel {panel.get('title')!r} has no query"
    queries = list(_queries(dashboard))
    named = set()
    for query in queries:
        names = set(re.findall(r"\b(?:forwarder|vllm)[a-zA-Z0-9_:]*", query))
        assert names, f"query names no forwarder metric: {query}"
        assert names <= exported, f"not exported: {sorted(names - exported)} in {query}"
        named |= names
    # The dashboard covers what the issue asks for.
    for needed in ("forwarder_requests_total", "forwarder_request_duration_seconds_bucket",
                   "forwarder_time_to_first_byte_seconds_bucket", "forwarder_requests_in_flight",
                   "forwarder_backend_healthy", "forwarder_backend_requests_waiting",
                   "forwarder_queue_depth", "forwarder_queue_wait_seconds_bucket",
                   "forwarder_rejected_total", "forwarder_backend_kv_cache_usage",
                   "forwarder_ejections_total", "forwarder_prompt_tokens_total",
                   "forwarder_completion_tokens_total",
                   "forwarder_time_to_first_token_seconds_bucket",
                   "forwarder_time_per_output_token_seconds_bucket"):
        assert needed in named


def test_readme_lists_every_metric_and_endpoint(served):
    backend, fwd = served
    assert get(fwd.url + "/v1/models/llama").status_code == 200
    response = get(fwd.url + "/metrics")
    families = {f.name for f in text_string_to_metric_families(response.text)}
    readme = (REPO_ROOT / "docs" / "operate.md").read_text()
    # The "Metrics" section of docs/operate.md, up to the next heading.
    section = readme.split("\n### Metrics: `GET /metrics`\n", 1)[1].split("\n#", 1)[0]
    listed = set(re.findall(r"^\| `(forwarder_\w+)` \|", section, re.M))
    # The parser names counter families without `_total`; a family with labels appears once
    # the first of its series is counted.
    listed = {name.removesuffix("_total") for name in listed}
    assert families <= listed
    assert listed - families <= {"forwarder_ejections", "forwarder_rejected",
                                 "forwarder_resumes",
                                 "forwarder_prompt_tokens", "forwarder_completion_tokens",
                                 "forwarder_time_to_first_token_seconds",
                                 "forwarder_time_per_output_token_seconds"}
    for endpoint in metrics.ENDPOINTS | {metrics.OTHER_ENDPOINT}:
        assert f"`{endpoint}`" in section
