"""Fast tests of the fake vLLM backend itself, straight over HTTP (no forwarder involved)."""

import base64
import hashlib
import http.client
import json
import socket
import time
from pathlib import Path

import pytest
import requests
import urllib3
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import FakeBackend, wait_until

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
CHAT = {"model": "llama", "messages": [{"role": "user", "content": "Hi"}]}


@pytest.fixture(scope="module")
def shared_backend(tmp_path_factory):
    backend = FakeBackend.start(name="fake-a", log_dir=tmp_path_factory.mktemp("fake_vllm"))
    yield backend
    backend.stop()


@pytest.fixture
def backend(shared_backend):
    shared_backend.reset()
    return shared_backend


def read_events(response):
    """[(arrival time, event bytes)] of an SSE response, read as bytes arrive."""
    arrivals, pending = [], b""
    for data in iter(lambda: response.raw.read1(65536), b""):
        now = time.monotonic()
        pending += data
        while b"\n\n" in pending:
            event, pending = pending.split(b"\n\n", 1)
            arrivals.append((now, event))
    assert pending == b""
    return arrivals


def shape(value):
    """The structure of a JSON value: keys in order and value types, not the values."""
    if isinstance(value, dict):
        return {key: shape(item) for key, item in value.items()}
    if isinstance(value, list):
        return [shape(item) for item in value]
    return type(value).__name__


def fixture_events(name):
    return (FIXTURES / name).read_bytes().split(b"\n\n")[:-1]


def event_shapes(events):
    return [event if event == b"data: [DONE]" else shape(json.loads(event.removeprefix(b"data: ")))
            for event in events]


def load(body, family):
    samples = [sample.value for metric in text_string_to_metric_families(body)
               for sample in metric.samples if sample.name == family]
    return sum(samples) if samples else None


def test_stream_events_arrive_one_by_one(backend):
    backend.configure(token_delay=0.2, tokens=5)
    started = time.monotonic()
    with requests.post(backend.url + "/v1/chat/completions", json={**CHAT, "stream": True},
                       stream=True, timeout=5) as response:
        assert response.headers["Content-Type"] == "text/event-stream; charset=utf-8"
        assert response.headers["X-Fake-Backend"] == "fake-a"
        arrivals = read_events(response)
    times = [arrived for arrived, _ in arrivals]
    assert len(arrivals) == 1 + 5 + 1 + 1  # role, content, finish, [DONE]
    assert times[0] - started < 0.8  # at once, not after the tokens (1 s)
    assert times[-1] - times[0] > 0.8
    content_times = times[1:6]
    assert all(later - earlier > 0.1 for earlier, later in zip(content_times, content_times[1:]))
    text = "".join(json.loads(event[6:])["choices"][0]["delta"]["content"]
                   for _, event in arrivals[1:6])
    assert text == "tok0 tok1 tok2 tok3 tok4 "


@pytest.mark.parametrize("path, body, fixture", [
    ("/v1/chat/completions", {**CHAT, "max_tokens": 3},
     "sse_chat_completions_v0.11_reconstructed.txt"),
    ("/v1/completions", {"model": "llama", "prompt": "The capital of France is", "max_tokens": 2},
     "sse_completions_v0.11_reconstructed.txt"),
])
def test_stream_framing_matches_vllm(backend, path, body, fixture):
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    response = requests.post(backend.url + path, json=body, timeout=5)
    assert response.content.endswith(b"\n\ndata: [DONE]\n\n")
    events = response.content.split(b"\n\n")[:-1]
    assert event_shapes(events) == event_shapes(fixture_events(fixture))
    assert all(json.loads(event[6:])["model"] == "llama" for event in events[:-1])
    without_usage = requests.post(backend.url + path, json={**body, "stream_options": None},
                                  timeout=5).content.split(b"\n\n")[:-1]
    assert event_shapes(without_usage) == event_shapes(events[:-2] + events[-1:])


def test_non_stream_bodies(backend):
    chat = requests.post(backend.url + "/v1/chat/completions", json=CHAT, timeout=5)
    expected = json.loads((FIXTURES / "chat_completion_nonstream_v0.11_reconstructed.json")
                          .read_text())
    assert shape(chat.json()) == shape(expected)
    assert chat.json()["model"] == "llama"
    assert chat.json()["choices"][0]["message"]["content"] == "tok0 tok1 tok2 tok3 tok4 "
    assert chat.headers["Content-Length"] == str(len(chat.content))
    again = requests.post(backend.url + "/v1/chat/completions", json=CHAT, timeout=5)
    assert again.content == chat.content  # deterministic: a proxy's output can be compared

    completion = requests.post(backend.url + "/v1/completions",
                               json={"model": "llama", "prompt": "x", "max_tokens": 2}, timeout=5)
    assert completion.json()["object"] == "text_completion"
    assert completion.json()["choices"][0]["text"] == "tok0 tok1 "
    assert completion.json()["choices"][0]["finish_reason"] == "length"

    embeddings = requests.post(backend.url + "/v1/embeddings",
                               json={"model": "llama", "input": ["a", "b", "c"]}, timeout=5).json()
    assert [item["index"] for item in embeddings["data"]] == [0, 1, 2]
    assert all(len(item["embedding"]) == 8 for item in embeddings["data"])


def test_models_list(backend):
    models = requests.get(backend.url + "/v1/models", timeout=5).json()
    expected = json.loads((FIXTURES / "v1_models_v0.11_reconstructed.json").read_text())
    assert shape(models) == shape(expected)
    assert [model["id"] for model in models["data"]] == ["llama-3.1-8b", "llama"]
    backend.configure(models=["a", "b", "c"])
    models = requests.get(backend.url + "/v1/models", timeout=5).json()
    assert [model["id"] for model in models["data"]] == ["a", "b", "c"]


def test_metrics_modes(backend):
    def metrics(**config):
        backend.configure(**{"running": None, "waiting": None, **config})
        response = requests.get(backend.url + "/metrics", timeout=5)
        assert response.status_code == 200
        assert response.headers["Content-Type"] == "text/plain; version=1.0.0; charset=utf-8"
        return response.text

    body = metrics()
    assert (load(body, "vllm:num_requests_running"), load(body, "vllm:num_requests_waiting")) \
        == (3, 1)
    body = metrics(metrics="dp2", running=3, waiting=2)
    assert (load(body, "vllm:num_requests_running"), load(body, "vllm:num_requests_waiting")) \
        == (6, 4)
    body = metrics(metrics="dp2_mp", running=0)
    assert load(body, "vllm:num_requests_running") == 0
    assert load(body, "vllm:num_requests_waiting") == 2
    assert load(metrics(metrics="v0", waiting=7.5), "vllm:num_requests_waiting") == 7.5
    body = metrics(metrics="no_load", running=5)
    assert "num_requests_running" not in body and "num_requests_waiting" not in body
    assert load(body, "vllm:num_requests_running") is None
    assert len(list(text_string_to_metric_families(body))) > 10  # still Prometheus text
    with pytest.raises(ValueError):
        load(metrics(metrics="garbage"), "vllm:num_requests_running")


def test_metrics_status_and_delay(backend):
    backend.configure(metrics_status=500)
    response = requests.get(backend.url + "/metrics", timeout=5)
    assert response.status_code == 500
    backend.configure(metrics_status=200, metrics_delay=1)
    with pytest.raises(requests.ReadTimeout):
        requests.get(backend.url + "/metrics", timeout=(1, 0.2))


def test_failures_cookies_and_unknown_models(backend):
    backend.configure(fail_status=429, fail_headers={"Retry-After": "3"},
                      set_cookies=["a=1; Path=/", "b=2; Expires=Wed, 21 Oct 2026 07:28:00 GMT"])
    response = requests.post(backend.url + "/v1/chat/completions", json=CHAT, timeout=5)
    assert response.status_code == 429
    assert response.headers["Retry-After"] == "3"
    assert response.raw.headers.getlist("Set-Cookie") == [
        "a=1; Path=/", "b=2; Expires=Wed, 21 Oct 2026 07:28:00 GMT"]
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == 429

    backend.configure(fail_status=None, strict_models=True)
    response = requests.post(backend.url + "/v1/chat/completions",
                             json={**CHAT, "model": "gpt-9"}, timeout=5)
    assert response.status_code == 404
    assert response.json() == {"error": {"message": "The model `gpt-9` does not exist.",
                                         "type": "NotFoundError", "param": None, "code": 404}}
    ok = requests.post(backend.url + "/v1/chat/completions", json=CHAT, timeout=5)
    assert ok.status_code == 200


def test_requests_are_recorded_raw(backend):
    body = b"\x00\xffnot json"
    connection = http.client.HTTPConnection("127.0.0.1", backend.port, timeout=5)
    connection.putrequest("PUT", "/v1/files/a%2Fb?x=1&y=%20")
    connection.putheader("X-Multi", "one")
    connection.putheader("X-Multi", "two")
    connection.putheader("Content-Length", str(len(body)))
    connection.endheaders(body)
    response = connection.getresponse()
    assert response.status == 200
    assert json.loads(response.read())["path"] == "/v1/files/a%2Fb?x=1&y=%20"
    connection.close()
    [recorded] = backend.requests()
    assert recorded["method"] == "PUT"
    assert recorded["path"] == "/v1/files/a%2Fb?x=1&y=%20"
    assert recorded["headers"]["x-multi"] == ["one", "two"]
    assert base64.b64decode(recorded["body_b64"]) == body
    assert recorded["body_length"] == len(body)
    assert recorded["body_sha256"] == hashlib.sha256(body).hexdigest()


def test_first_byte_delay(backend):
    backend.configure(first_byte_delay=0.3)
    started = time.monotonic()
    requests.get(backend.url + "/v1/models", timeout=5).raise_for_status()
    assert time.monotonic() - started >= 0.3


def test_die_after_kills_the_process(fake_backend):
    backend = fake_backend(config={"die_after": 2})
    events = []
    with requests.post(backend.url + "/v1/completions",
                       json={"model": "llama", "prompt": "x", "stream": True},
                       stream=True, timeout=5) as response:
        with pytest.raises(urllib3.exceptions.ProtocolError):
            for data in iter(lambda: response.raw.read1(65536), b""):
                events += data.split(b"\n\n")[:-1]
    assert len(events) == 2 and b"[DONE]" not in b"".join(events)
    wait_until(lambda: not backend.alive(), timeout=2, message="fake still running")
    assert backend.proc.returncode == 1


def raw_request(port, path, body):
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    data = json.dumps(body).encode()
    sock.sendall(b"POST %s HTTP/1.1\r\nHost: fake\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (path.encode(), len(data), data))
    return sock


def test_disconnect_of_a_slow_stream_is_seen_at_once(backend):
    backend.configure(token_delay=0.5, tokens=50)
    sock = raw_request(backend.port, "/v1/chat/completions", {**CHAT, "stream": True})
    received = b""
    while b"\r\n\r\n" not in received:
        received += sock.recv(65536)
    assert received.startswith(b"HTTP/1.1 200")
    closed_at = time.time()
    sock.close()
    [disconnect] = wait_until(backend.disconnects, timeout=2, message="no disconnect recorded")
    assert disconnect["time"] - closed_at < 1
    assert disconnect["path"] == "/v1/chat/completions"
    assert disconnect["request_id"] == backend.requests()[0]["id"]


@pytest.mark.parametrize("config", [{"hang": True}, {"first_byte_delay": 30},
                                    {"stall_after": 1}])
def test_disconnect_of_a_silent_response_is_seen_at_once(backend, config):
    backend.configure(**config)
    sock = raw_request(backend.port, "/v1/chat/completions", {**CHAT, "stream": True})
    wait_until(backend.requests, message="request not recorded")
    if "stall_after" in config:
        received = b""
        while b"tok0" not in received:
            received += sock.recv(65536)
        sock.settimeout(0.3)
        with pytest.raises(socket.timeout):  # silent after one content event
            sock.recv(65536)
    closed_at = time.time()
    sock.close()
    [disconnect] = wait_until(backend.disconnects, timeout=2, message="no disconnect recorded")
    assert disconnect["time"] - closed_at < 1


def test_control_api(backend):
    assert backend.configure(tokens=9)["tokens"] == 9
    response = requests.post(backend.url + "/_fake/config", json={"tokenz": 1}, timeout=5)
    assert response.status_code == 400
    requests.get(backend.url + "/v1/models", timeout=5)
    assert len(backend.requests()) == 1
    config = backend.reset()
    assert config["tokens"] == 5 and backend.requests() == [] and backend.disconnects() == []
