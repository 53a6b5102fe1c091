"""End-to-end fault injection: nothing lost when backends die, hang or restart, or clients leave.

Each test names the row of the "What happens when…" table (docs/failure-modes.md) it backs.
"""

import concurrent.futures
import hashlib
import http.client
import json
import os
import signal
import socket
import time

import pytest
import requests
import urllib3

from tests.harness import wait_until

CHAT = "/v1/chat/completions"


def chat_body(stream=False, **extra):
    return {"model": "llama", "messages": [{"role": "user", "content": "hi"}], "stream": stream,
            **extra}


def raw_request(port, path, body):
    """Open a raw connection and send a JSON POST; the socket, for the test to read or close."""
    payload = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
    return sock


def sse_events(data: bytes):
    return [e for e in data.split(b"\n\n") if e.strip()]


def status_of(fwd, url):
    return next(b for b in fwd.backends()["backends"] if b["url"] == url)


def worker_pid(fwd):
    with open(f"/proc/{fwd.pid}/task/{fwd.pid}/children") as f:
        return int(f.read().split()[0])


# --- the client goes away -------------------------------------------------------------------

def test_client_leaving_a_stream_aborts_the_backend_within_a_second(fake_backend, forwarder):
    backend = fake_backend(config={"token_delay": 0.2, "tokens": 200})
    fwd = forwarder([backend.url], wait_healthy=1)
    sock = raw_request(fwd.port, CHAT, chat_body(stream=True))
    received = b""
    while received.count(b'"content":"tok') < 3:
        received += sock.recv(65536)
    sock.close()
    closed_at = time.time()
    (gone,) = wait_until(backend.disconnects, timeout=5)
    assert gone["time"] - closed_at < 2.0  # of a stream that had 39 s to go
    assert gone["chunks_sent"] < 15


def test_client_leaving_before_a_non_streaming_answer_aborts_the_backend(fake_backend,
                                                                         forwarder):
    backend = fake_backend(config={"first_byte_delay": 60})
    fwd = forwarder([backend.url], wait_healthy=1)
    sock = raw_request(fwd.port, CHAT, chat_body())
    wait_until(backend.requests)  # the request is with the backend, which is "computing"
    sock.close()
    closed_at = time.time()
    (gone,) = wait_until(backend.disconnects, timeout=5)
    assert gone["time"] - closed_at < 2.0  # of an answer due in 60 s


# --- failover before the first byte -----------------------------------------------------------

def test_killed_backend_loses_no_request(fake_backend, forwarder):
    a, b = fake_backend(name="a"), fake_backend(name="b")
    # No poll will run during the test: only the failed connections can mark `a` down.
    fwd = forwarder([a.url, b.url], env={"CHECK_INTERVAL_SECONDS": "600"}, wait_healthy=2)
    a.kill()
    with requests.Session() as http:
        answers = [http.post(fwd.url + CHAT, json=chat_body()) for _ in range(20)]
    assert [r.status_code for r in answers] == [200] * 20
    assert {r.headers["x-fake-backend"] for r in answers} == {"b"}
    assert status_of(fwd, a.url)["healthy"] is False
    assert status_of(fwd, a.url)["last_error"] == "connection refused"


def test_connect_timeout_fails_over(fake_backend, forwarder):
    a, b = fake_backend(name="a"), fake_backend(name="b")
    fwd = forwarder([a.url, b.url], env={"CHECK_INTERVAL_SECONDS": "600",
                                         "CONNECT_TIMEOUT_SECONDS": "0.5"}, wait_healthy=2)
    a.kill()
    # A listener whose accept queue is full: connections to it neither open nor fail.
    blackhole = socket.socket()
    blackhole.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    blackhole.bind(("127.0.0.1", a.port))
    blackhole.listen(0)
    filler = socket.create_connection(("127.0.0.1", a.port))
    try:
        with requests.Session() as http:
            # Random choice: 20 requests make it near-certain that one of them picked `a` first.
            answers = [http.post(fwd.url + CHAT, json=chat_body()) for _ in range(20)]
        assert [r.status_code for r in answers] == [200] * 20
        assert status_of(fwd, a.url)["last_error"] == "timeout"
        assert status_of(fwd, a.url)["healthy"] is False
    finally:
        filler.close()
        blackhole.close()


def test_502_when_no_backend_can_be_reached(fake_backend, forwarder):
    a, b = fake_backend(), fake_backend()
    fwd = forwarder([a.url, b.url], env={"CHECK_INTERVAL_SECONDS": "600"}, wait_healthy=2)
    a.kill()
    b.kill()
    response = requests.post(fwd.url + CHAT, json=chat_body())
    assert response.status_code == 502
    assert response.json()["error"]["code"] == 502
    assert fwd.backends()["healthy"] == 0


def test_connection_closed_without_an_answer_is_sent_once_more(fake_backend, forwarder):
    backend = fake_backend()
    # No poll during the test: its /v1/models read would take a drop.
    fwd = forwarder([backend.url], env={"CHECK_INTERVAL_SECONDS": "600"}, wait_healthy=1)
    wait_until(lambda: status_of(fwd, backend.url)["models"])  # the first cycle is over
    backend.configure(drop_next=1)
    with requests.Session() as http:
        response = http.post(fwd.url + CHAT, json=chat_body())
        assert response.status_code == 200
        assert len(backend.requests()) == 2  # dropped unanswered, then answered
        assert status_of(fwd, backend.url)["healthy"] is True  # it answers: not marked down
        # Twice in a row is no race: 502, and not a third time.
        backend.configure(drop_next=2)
        response = http.post(fwd.url + CHAT, json=chat_body())
        assert response.status_code == 502
        assert len(backend.requests()) == 4
        # A large body was streamed to the backend and is gone: never sent again.
        backend.configure(drop_next=1)
        response = http.post(fwd.url + "/v1/files", data=os.urandom(2 * 1024 * 1024))
        assert response.status_code == 502
        assert len(backend.requests()) == 5


def test_a_backend_that_keeps_closing_unanswered_is_passed_over(fake_backend, forwarder):
    # Every request `a` gets is closed without an answer (a backend stuck in its restart), while
    # it still answers its polls: each request sent there is sent again, and once `a` has done it
    # twice, to `b`. No client sees it, and `a` stays in rotation.
    a = fake_backend(name="a")
    b = fake_backend(name="b")
    # No poll during the test: its /v1/models read would take a drop.
    fwd = forwarder([a.url, b.url], env={"CHECK_INTERVAL_SECONDS": "600"}, wait_healthy=2)
    wait_until(lambda: status_of(fwd, a.url)["models"] and status_of(fwd, b.url)["models"])
    a.configure(drop_next=1000)
    with requests.Session() as http:
        statuses = [http.post(fwd.url + CHAT, json=chat_body()).status_code for _ in range(20)]
    assert statuses == [200] * 20
    assert len(b.requests()) == 20
    assert a.requests()  # `random` sent some there first (all 20 to `b`: once in 2^20 runs)
    assert status_of(fwd, a.url)["healthy"] is True


# --- timeouts and broken streams -------------------------------------------------------------

def test_silent_backend_gives_504_before_the_first_byte(fake_backend, forwarder):
    backend = fake_backend(config={"hang": True})
    fwd = forwarder([backend.url], env={"READ_TIMEOUT_SECONDS": "1"}, wait_healthy=1)
    started = time.monotonic()
    response = requests.post(fwd.url + CHAT, json=chat_body())
    assert response.status_code == 504
    assert response.json()["error"]["code"] == 504
    assert 0.9 < time.monotonic() - started < 5
    assert status_of(fwd, backend.url)["healthy"] is True  # slow is not dead


@pytest.mark.parametrize("fault", ["stall_after", "die_after"])
def test_stream_broken_mid_way_ends_with_vllms_in_band_error(fake_backend, forwarder, fault):
    backend = fake_backend(config={fault: 2, "tokens": 10})
    fwd = forwarder([backend.url], env={"READ_TIMEOUT_SECONDS": "1"}, wait_healthy=1)
    with requests.post(fwd.url + CHAT, json=chat_body(stream=True), stream=True) as response:
        events = sse_events(response.raw.read())
    assert b'"content":"tok1' in events[-3]  # the tokens that were sent arrived
    error = json.loads(events[-2].removeprefix(b"data: "))["error"]
    assert error["code"] == 502 and backend.url in error["message"]
    assert events[-1] == b"data: [DONE]"
    # One warning and one access line, matched by the request id: the line marks the cut.
    request_id = response.headers["X-Request-Id"]
    cut = "backend_timeout" if fault == "stall_after" else "backend_error"
    line = wait_until(lambda: [a for a in fwd.access_lines() if a["request_id"] == request_id])
    assert line[0]["status"] == "200" and line[0]["cut"] == cut
    (warning,) = [w for w in fwd.log().splitlines() if f"request_id={request_id}" in w
                  and "WARNING" in w]
    assert warning.endswith(f"request_id={request_id}: {error['message']}")
    assert "((" not in warning and "IncompleteRead" not in warning


def test_non_streaming_body_cut_short_is_never_a_complete_answer(fake_backend, forwarder):
    backend = fake_backend(config={"die_mid_body": True})
    fwd = forwarder([backend.url], wait_healthy=1)
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        requests.post(fwd.url + CHAT, json=chat_body())
    line = wait_until(lambda: [a for a in fwd.access_lines() if a["path"] == CHAT])
    assert line[0]["cut"] == "backend_error"


# --- busy is not dead -------------------------------------------------------------------------

def test_backend_answering_429_or_503_stays_healthy(fake_backend, forwarder):
    backend = fake_backend()
    fwd = forwarder([backend.url], env={"CHECK_INTERVAL_SECONDS": "600"}, wait_healthy=1)
    with requests.Session() as http:
        for status in (429, 503, 500):
            backend.configure(fail_status=status, fail_headers={"Retry-After": "3"})
            response = http.post(fwd.url + CHAT, json=chat_body())
            assert response.status_code == status
            assert response.headers["retry-after"] == "3"
    assert status_of(fwd, backend.url)["healthy"] is True


# --- hot reload -------------------------------------------------------------------------------

def test_backends_added_and_removed_in_ip_txt(fake_backend, forwarder):
    a = fake_backend(name="a", config={"token_delay": 0.1, "tokens": 20})
    b = fake_backend(name="b")
    fwd = forwarder([a.url], wait_healthy=1)
    fwd.ip_file.write_text(f"{a.url}\n{b.url}\n")
    wait_until(lambda: fwd.backends()["healthy"] == 2)
    with requests.Session() as http:
        answers = [http.get(fwd.url + "/v1/any/path") for _ in range(30)]
    names = {r.headers.get("x-fake-backend", f"{r.status_code} {r.text}") for r in answers}
    assert names == {"a", "b"}

    with requests.post(fwd.url + CHAT, json=chat_body(stream=True), stream=True,
                       headers={"Connection": "close"}) as stream:
        while stream.headers["x-fake-backend"] != "a":  # a stream running on `a`
            stream.close()
            stream = requests.post(fwd.url + CHAT, json=chat_body(stream=True), stream=True,
                                   headers={"Connection": "close"})
        fwd.ip_file.write_text(f"{b.url}\n")
        wait_until(lambda: [x["url"] for x in fwd.backends()["backends"]] == [b.url])
        with requests.Session() as http:
            names = {http.get(fwd.url + "/v1/any/path").headers["x-fake-backend"]
                     for _ in range(20)}
        assert names == {"b"}
        events = sse_events(stream.raw.read())  # the stream on the removed backend finishes
    assert events[-1] == b"data: [DONE]"
    assert all(b'"error"' not in e for e in events)


def test_unreadable_list_keeps_the_last_good_one(fake_backend, forwarder):
    backend = fake_backend()
    fwd = forwarder([backend.url], wait_healthy=1)
    os.remove(fwd.ip_file)
    wait_until(lambda: "cannot read the backend list" in fwd.log())
    assert "keeping the last good one" in fwd.log()
    assert fwd.backends()["healthy"] == 1
    assert requests.get(fwd.url + "/v1/models").status_code == 200


# --- rolling restarts -------------------------------------------------------------------------

def test_restarting_every_backend_loses_nothing_with_no_backend_wait(fake_backend, forwarder):
    backends = [fake_backend(), fake_backend()]
    fwd = forwarder([b.url for b in backends], env={"NO_BACKEND_WAIT_SECONDS": "10",
                                                    "CHECK_INTERVAL_SECONDS": "5"},
                    wait_healthy=2)
    stop = time.monotonic() + 3.0
    statuses = []

    def client():
        with requests.Session() as http:
            while time.monotonic() < stop:
                response = http.post(fwd.url + CHAT, json=chat_body())
                statuses.append(response.status_code if response.ok else response.text)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        clients = [pool.submit(client) for _ in range(4)]
        for backend in backends:  # every backend down at once, for a second
            backend.stop()
        time.sleep(1.0)  # the outage itself, not a wait for a condition
        for backend in backends:
            backend.restart()
        for c in clients:
            c.result()
    assert statuses and set(statuses) == {200}, statuses


# --- drain ------------------------------------------------------------------------------------

def test_sigterm_lets_50_live_streams_finish(fake_backend, forwarder):
    backend = fake_backend(config={"token_delay": 0.1, "tokens": 20})
    fwd = forwarder([backend.url], wait_healthy=1)

    def stream():
        with requests.post(fwd.url + CHAT, json=chat_body(stream=True), stream=True) as r:
            return sse_events(r.raw.read())

    with concurrent.futures.ThreadPoolExecutor(50) as pool:
        streams = [pool.submit(stream) for _ in range(50)]
        wait_until(lambda: len(backend.requests()) == 50, timeout=10)
        os.kill(fwd.pid, signal.SIGTERM)
        results = [s.result(timeout=30) for s in streams]
    assert all(events[-1] == b"data: [DONE]" for events in results)
    assert all(sum(b'"content":"tok' in e for e in events) == 20 for events in results)
    assert fwd.proc.wait(15) == 0
    with pytest.raises(requests.ConnectionError):
        requests.get(fwd.url + "/_backends", timeout=2)


@pytest.mark.parametrize("case", ["stream", "waiting", "stream, by default"])
def test_what_outlives_the_grace_period_ends_with_an_answer(fake_backend, forwarder, case):
    # gunicorn's master kills the worker `graceful_timeout` after SIGTERM. With
    # END_STREAMS_BEFORE_KILL_SECONDS, a little before that a stream still running ends with
    # vLLM's in-band error and [DONE] instead of a cut connection, and a request still waiting for
    # its backend's answer gets a 503; either way the backend's connection is closed, so vLLM
    # stops generating. By default nothing is ended before the kill (SPEC): the stream is cut.
    streaming = case.startswith("stream")
    config = {"token_delay": 0.25, "tokens": 40} if streaming else {"hang": True}
    backend = fake_backend(config=config)
    env = {} if case.endswith("by default") else {"END_STREAMS_BEFORE_KILL_SECONDS": "3"}
    fwd = forwarder([backend.url], env=env, wait_healthy=1,
                    extra_args=["--graceful-timeout", "6"])

    def exchange():
        with requests.post(fwd.url + CHAT, json=chat_body(stream=streaming),
                           stream=True) as response:
            try:
                body = response.raw.read()
            except (urllib3.exceptions.HTTPError, http.client.HTTPException):
                body = None  # cut off by the kill
            return response, body, time.monotonic()

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        answer = pool.submit(exchange)
        wait_until(lambda: backend.requests(), timeout=5)
        os.kill(fwd.pid, signal.SIGTERM)
        stopped = time.monotonic()
        response, body, ended = answer.result(timeout=10)
    elapsed = ended - stopped
    if case == "stream, by default":
        assert body is None  # the kill cut it: no in-band error, no [DONE]
        assert elapsed > 5
        return
    if streaming:
        events = sse_events(body)
        assert response.status_code == 200
        assert sum(b'"content":"tok' in e for e in events) < 40
        error = json.loads(events[-2].removeprefix(b"data: "))["error"]
        assert error["code"] == 503 and error["type"] == "ServiceUnavailableError"
        assert "shutting down" in error["message"]
        assert events[-1] == b"data: [DONE]"
    else:
        assert response.status_code == 503
        assert "shutting down" in json.loads(body)["error"]["message"]
    assert 2 < elapsed < 5.5  # ended 3 s before the master's kill at 6 s
    wait_until(lambda: backend.disconnects(), timeout=5)
    assert fwd.proc.wait(10) == 0


def test_worker_timeout_never_cuts_a_long_stream(fake_backend, forwarder):
    backend = fake_backend(config={"token_delay": 0.25, "tokens": 16})
    fwd = forwarder([backend.url], extra_args=["--timeout", "1"], wait_healthy=1)
    with requests.post(fwd.url + CHAT, json=chat_body(stream=True), stream=True) as response:
        events = sse_events(response.raw.read())
    assert events[-1] == b"data: [DONE]"
    assert "WORKER TIMEOUT" not in fwd.log()


# --- hygiene ----------------------------------------------------------------------------------

def test_backend_hop_by_hop_headers_do_not_reach_the_client(fake_backend, forwarder):
    backend = fake_backend(config={"fail_status": 400, "fail_headers": {
        "Connection": "X-Internal", "X-Internal": "1", "Keep-Alive": "timeout=5",
        "Proxy-Authenticate": "Basic", "Proxy-Status": "upstream", "X-Kept": "yes"}})
    fwd = forwarder([backend.url], wait_healthy=1)
    response = requests.post(fwd.url + CHAT, json=chat_body())
    assert response.status_code == 400
    for name in ("x-internal", "keep-alive", "proxy-authenticate", "proxy-status"):
        assert name not in response.headers
    assert response.headers["x-kept"] == "yes"


def test_large_body_passes_intact_and_is_not_held_in_memory(fake_backend, forwarder):
    backend = fake_backend()
    fwd = forwarder([backend.url], wait_healthy=1)
    body = os.urandom(32 * 1024 * 1024)
    pid = worker_pid(fwd)

    def peak_rss_kib():
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))

    before = peak_rss_kib()
    response = requests.post(fwd.url + "/v1/files", data=body,
                             headers={"Content-Type": "application/octet-stream"})
    assert response.status_code == 200
    assert response.json()["body_sha256"] == hashlib.sha256(body).hexdigest()
    # Streamed through: the worker's peak memory grows by far less than the body.
    assert peak_rss_kib() - before < 8 * 1024
