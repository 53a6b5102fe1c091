"""End-to-end: the `/v1/*` proxy through a real gunicorn in front of fake vLLM processes."""

import base64
import gzip
import hashlib
import http.client
import json
import socket
import time

import pytest
import requests

from tests.harness import wait_until


def ip_lines(*backends):
    return [b.url for b in backends]


def test_post_body_query_and_authorization_reach_the_backend_unchanged(fake_backend, forwarder):
    backend = fake_backend()
    fwd = forwarder(ip_lines(backend), wait_healthy=1)
    body = b'{"model": "llama",   "messages": [{"role": "user", "content": "hi \\u00e9"}]}'
    with requests.Session() as http:
        response = http.post(fwd.url + "/v1/chat/completions?trace=1&x=%2F", data=body,
                             headers={"Authorization": "Bearer sk-client",
                                      "Content-Type": "application/json",
                                      "X-Custom": "kept"})
    assert response.status_code == 200
    (seen,) = backend.requests()
    assert seen["method"] == "POST"
    assert seen["path"] == "/v1/chat/completions?trace=1&x=%2F"
    assert seen["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert seen["headers"]["authorization"] == ["Bearer sk-client"]
    assert seen["headers"]["x-custom"] == ["kept"]
    assert seen["headers"]["content-length"] == [str(len(body))]


def test_response_bytes_equal_a_direct_request(fake_backend, forwarder):
    backend = fake_backend()
    fwd = forwarder(ip_lines(backend), wait_healthy=1)
    body = {"model": "llama", "messages": [{"role": "user", "content": "hi"}]}
    with requests.Session() as http:
        direct = http.post(backend.url + "/v1/chat/completions", json=body)
        relayed = http.post(fwd.url + "/v1/chat/completions", json=body)
    assert relayed.status_code == direct.status_code == 200
    assert relayed.content == direct.content
    assert relayed.headers["content-type"] == direct.headers["content-type"]


@pytest.mark.parametrize("method", ["GET", "HEAD", "PUT", "PATCH", "DELETE", "OPTIONS",
                                    "PROPFIND"])
def test_every_method_on_any_path_is_forwarded(fake_backend, forwarder, method):
    backend = fake_backend()
    fwd = forwarder(ip_lines(backend), wait_healthy=1)
    with requests.Session() as http:
        response = http.request(method, fwd.url + "/v1/some/future/endpoint?a=b")
    assert response.status_code == 200
    (seen,) = backend.requests()
    assert (seen["method"], seen["path"]) == (method, "/v1/some/future/endpoint?a=b")


def test_hop_by_hop_headers_are_not_forwarded(fake_backend, forwarder):
    backend = fake_backend()
    fwd = forwarder(ip_lines(backend), wait_healthy=1)
    connection = http.client.HTTPConnection("127.0.0.1", fwd.port, timeout=10)
    connection.request("GET", "/v1/any/path", headers={
        "Host": "forwarder.example", "Connection": "keep-alive, X-Secret-Hop",
        "X-Secret-Hop": "1", "Keep-Alive": "timeout=5", "TE": "trailers",
        "Proxy-Authorization": "Basic eA==", "Proxy-Foo": "1", "X-End-To-End": "yes"})
    response = connection.getresponse()
    response.read()
    connection.close()
    assert response.status == 200
    headers = backend.requests()[0]["headers"]
    for name in ("x-secret-hop", "keep-alive", "te", "proxy-authorization", "proxy-foo"):
        assert name not in headers
    assert headers["host"] == [f"127.0.0.1:{backend.port}"]
    assert headers["x-end-to-end"] == ["yes"]


def test_the_backend_gets_no_header_the_client_did_not_send(fake_backend, forwarder):
    backend = fake_backend()
    fwd = forwarder(ip_lines(backend), wait_healthy=1)
    with socket.create_connection(("127.0.0.1", fwd.port), timeout=10) as sock:
        sock.sendall(b"GET /v1/any/path HTTP/1.1\r\nHost: x\r\nX-Only: 1\r\n"
                     b"Connection: close\r\n\r\n")
        while sock.recv(65536):
            pass
    headers = backend.requests()[0]["headers"]
    assert set(headers) == {"host", "x-only", "x-request-id"}


def test_backend_errors_pass_through(fake_backend, forwarder):
    backend = fake_backend(config={"strict_models": True})
    fwd = forwarder(ip_lines(backend), wait_healthy=1)
    with requests.Session() as http:
        direct = http.post(backend.url + "/v1/chat/completions", json={"model": "nope"})
        relayed = http.post(fwd.url + "/v1/chat/completions", json={"model": "nope"})
        assert relayed.status_code == 404
        assert relayed.content == direct.content
        assert relayed.json()["error"]["message"] == "The model `nope` does not exist."
        for status in (400, 422, 429, 500, 503):
            backend.configure(fail_status=status)
            relayed = http.post(fwd.url + "/v1/completions", json={"model": "llama"})
            assert relayed.status_code == status
            assert relayed.json()["error"]["code"] == status
    # A backend that answers, even 503, is busy, not dead.
    assert fwd.backends()["backends"][0]["healthy"] is True


def test_no_healthy_backend_is_503_json(fake_backend, forwarder):
    backend = fake_backend(config={"metrics_status": 500})
    fwd = forwarder(ip_lines(backend), wait_healthy=0)
    wait_until(lambda: fwd.backends()["backends"][0]["last_checked_at"] is not None)
    with requests.Session() as http:
        response = http.post(fwd.url + "/v1/chat/completions", json={"model": "llama"})
    assert response.status_code == 503
    error = response.json()["error"]
    assert error["code"] == 503 and error["type"] and error["message"]
    assert backend.requests() == []


def test_forced_model_rewrites_json_object_posts(fake_backend, forwarder):
    backend = fake_backend()
    fwd = forwarder(ip_lines(backend), env={"FORCED_MODEL_NAME": "llama"}, wait_healthy=1)
    with requests.Session() as http:
        http.post(fwd.url + "/v1/chat/completions",
                  json={"model": "gpt-4", "messages": [{"role": "user", "content": "é"}]})
        http.post(fwd.url + "/v1/completions", json={"prompt": "no model field"})
        http.post(fwd.url + "/v1/embeddings", data=b"[1, 2]",
                  headers={"Content-Type": "application/json"})
        # JSON in UTF-16 or UTF-32 (with a byte order mark, or told by its zero bytes) is read by
        # vLLM's server as well: it must not carry a model of its own past the rewrite.
        for encoding in ("utf-16", "utf-32", "utf-16-le"):
            http.post(fwd.url + "/v1/completions",
                      data=' {"model": "gpt-4", "prompt": "x"}'.encode(encoding),
                      headers={"Content-Type": "application/json"})
    chat, completion, array, *other_encodings = backend.requests()
    assert chat["json"] == {"model": "llama", "messages": [{"role": "user", "content": "é"}]}
    assert completion["json"] == {"prompt": "no model field", "model": "llama"}
    assert base64_body(array) == b"[1, 2]"  # not an object: unchanged
    assert [json.loads(base64_body(record)) for record in other_encodings] == \
        [{"model": "llama", "prompt": "x"}] * 3


def base64_body(record):
    return base64.b64decode(record["body_b64"])


def test_body_is_byte_for_byte_unchanged_without_forced_model(fake_backend, forwarder):
    backend = fake_backend()
    fwd = forwarder(ip_lines(backend), wait_healthy=1)
    body = b'{ "model" : "gpt-4" ,"prompt":"x",  "z": 1.50}'
    with requests.Session() as http:
        http.post(fwd.url + "/v1/completions", data=body,
                  headers={"Content-Type": "application/json"})
    assert base64_body(backend.requests()[0]) == body


def test_requests_spread_over_healthy_backends_only(fake_backend, forwarder):
    healthy = [fake_backend(name=f"ok{i}") for i in range(3)]
    sick = fake_backend(name="sick", config={"metrics_status": 500})
    fwd = forwarder(ip_lines(*healthy, sick), wait_healthy=3)
    seen = {}
    with requests.Session() as http:
        for _ in range(60):
            name = http.get(fwd.url + "/v1/any/path").headers["x-fake-backend"]
            seen[name] = seen.get(name, 0) + 1
    assert set(seen) == {"ok0", "ok1", "ok2"}
    assert min(seen.values()) >= 5
    assert sick.requests() == []


def test_stream_chunks_arrive_as_they_are_produced(fake_backend, forwarder):
    backend = fake_backend(config={"token_delay": 0.3, "tokens": 5})
    fwd = forwarder(ip_lines(backend), wait_healthy=1)
    body = {"model": "llama", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    arrivals = []
    data = b""
    with requests.post(fwd.url + "/v1/chat/completions", json=body, stream=True) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        start = time.monotonic()
        while chunk := response.raw.read1(65536):
            arrivals.append((time.monotonic() - start, chunk))
            data += chunk
    events = [e for e in data.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    assert all(e.startswith(b"data: ") for e in events)
    first_content = next(t for t, c in arrivals if b"tok0" in c)
    last = arrivals[-1][0]
    # Five tokens 0.3 s apart: a buffering proxy would deliver tok0 together with [DONE].
    assert last - first_content > 1.0
    assert len(arrivals) >= 5


def test_stream_bytes_equal_a_direct_stream(fake_backend, forwarder):
    backend = fake_backend(config={"tokens": 4})
    fwd = forwarder(ip_lines(backend), wait_healthy=1)
    body = {"model": "llama", "stream": True, "prompt": "The capital of France is",
            "stream_options": {"include_usage": True}}
    with requests.Session() as http:
        direct = http.post(backend.url + "/v1/completions", json=body).content
        relayed = http.post(fwd.url + "/v1/completions", json=body).content
    assert relayed == direct


def test_compressed_responses_pass_through_as_sent(fake_backend, forwarder):
    backend = fake_backend(config={"gzip": True})
    fwd = forwarder(ip_lines(backend), wait_healthy=1)
    body = {"model": "llama", "messages": [{"role": "user", "content": "hi"}]}
    with requests.Session() as http:
        direct = http.post(backend.url + "/v1/chat/completions", json=body, stream=True)
        relayed = http.post(fwd.url + "/v1/chat/completions", json=body, stream=True)
        raw_direct = direct.raw.read(decode_content=False)
        raw_relayed = relayed.raw.read(decode_content=False)
    assert relayed.headers["content-encoding"] == "gzip"
    assert raw_relayed == raw_direct
    assert int(relayed.headers["content-length"]) == len(raw_relayed)
    assert json.loads(gzip.decompress(raw_relayed))["object"] == "chat.completion"


def test_set_cookie_headers_stay_apart(fake_backend, forwarder):
    cookies = ["a=1; Expires=Wed, 21 Oct 2037 07:28:00 GMT; Path=/", "b=2; HttpOnly"]
    backend = fake_backend(config={"set_cookies": cookies})
    fwd = forwarder(ip_lines(backend), wait_healthy=1)
    with requests.Session() as http:
        response = http.get(fwd.url + "/v1/any/path")
    assert response.raw.headers.getlist("Set-Cookie") == cookies


@pytest.mark.parametrize("path", ["/v1/../metrics", "/v1/%2e%2e/metrics", "/v1/x/../../_fake/config",
                                  "/v1/..%2fmetrics"])
def test_paths_leaving_v1_are_rejected(fake_backend, forwarder, path):
    backend = fake_backend()
    fwd = forwarder(ip_lines(backend), wait_healthy=1)
    with socket.create_connection(("127.0.0.1", fwd.port)) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    status = answer.split(b" ", 2)[1]
    assert status in (b"400", b"404"), answer
    assert backend.requests() == []
