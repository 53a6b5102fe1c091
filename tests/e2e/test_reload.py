"""Reloads and shutdowns lose nothing for clients that keep their connections alive: a connection
the forwarder is about to close says so (`Connection: close`) before it is closed, and a request
sent on a connection whose last answer promised keep-alive is still answered."""

import os
import re
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import requests

from tests.harness import get_json, read_response, wait_until

CHAT = "/v1/chat/completions"


def raw_request(sock, body=b'{"model": "llama", "prompt": "hi"}', path="/v1/completions"):
    sock.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (path.encode(), len(body), body))


def connection_header(head):
    return re.search(rb"(?im)^connection: *(\S+)", head).group(1).lower()


def test_a_request_right_after_a_stream_that_outlived_a_reload_is_answered(fake_backend,
                                                                           forwarder):
    # The stream starts before SIGHUP and promised keep-alive; its client sends the next request
    # on the same connection the moment the stream ends, while its old worker drains.
    backend = fake_backend(config={"tokens": 8, "token_delay": 0.25})
    fwd = forwarder([backend.url], workers=2, wait_healthy=1)
    with socket.create_connection(("127.0.0.1", fwd.port)) as sock:
        raw_request(sock, b'{"model": "llama", "prompt": "hi", "stream": true}')
        wait_until(lambda: backend.requests(), timeout=5)
        os.kill(fwd.pid, signal.SIGHUP)
        head, body = read_response(sock)
        assert head.startswith(b"HTTP/1.1 200") and b"data: [DONE]" in body
        assert connection_header(head) == b"keep-alive"
        raw_request(sock)
        head, body = read_response(sock)
        assert head.startswith(b"HTTP/1.1 200"), "the request after the stream was lost"
        assert connection_header(head) == b"close"
        assert b'"text"' in body
        sock.settimeout(5)
        assert sock.recv(1) == b""  # and then it ends


def test_an_idle_kept_alive_connection_still_takes_a_request_after_sigterm(fake_backend,
                                                                           forwarder):
    backend = fake_backend(config={"tokens": 2})
    fwd = forwarder([backend.url], wait_healthy=1)
    with socket.create_connection(("127.0.0.1", fwd.port)) as sock:
        raw_request(sock)
        head, _ = read_response(sock)
        assert connection_header(head) == b"keep-alive"
        # Something long-running keeps the worker alive meanwhile, as under load.
        backend.configure(first_byte_delay=3)
        with requests.Session() as other:
            other.trust_env = False
            with ThreadPoolExecutor(1) as pool:
                slow = pool.submit(other.post, fwd.url + "/v1/completions",
                                   json={"model": "llama", "prompt": "slow"}, timeout=10)
                wait_until(lambda: len(backend.requests()) == 2, timeout=5)
                os.kill(fwd.pid, signal.SIGTERM)
                time.sleep(0.5)  # the client's next request comes a moment after the signal
                backend.configure(first_byte_delay=0)
                raw_request(sock)
                head, body = read_response(sock)
                assert head.startswith(b"HTTP/1.1 200"), "the idle connection was closed"
                assert connection_header(head) == b"close"
                assert slow.result(timeout=10).status_code == 200
    assert fwd.proc.wait(15) == 0


def test_an_idle_connection_holds_up_shutdown_only_for_the_drain(fake_backend, forwarder):
    backend = fake_backend()
    fwd = forwarder([backend.url], wait_healthy=1)
    with socket.create_connection(("127.0.0.1", fwd.port)) as sock:
        raw_request(sock)
        read_response(sock)
        started = time.monotonic()
        os.kill(fwd.pid, signal.SIGTERM)
        sock.settimeout(10)
        assert sock.recv(1) == b""  # closed by the forwarder, not held for `keepalive` (75 s)
        assert fwd.proc.wait(15) == 0
        # DRAIN_IDLE_SECONDS (2 s) and gunicorn's one-second checks, with room for a slow box.
        assert time.monotonic() - started < 10


def test_no_request_is_lost_over_a_reload_under_load(fake_backend, forwarder):
    # Clients that keep their connections alive, as every SDK does, send request after request
    # while the instance reloads: every one gets its answer.
    backend = fake_backend(config={"tokens": 3, "token_delay": 0.02})
    fwd = forwarder([backend.url], workers=2, wait_healthy=1)
    reloaded_at = {}
    errors = []

    def client(index):
        answered = 0
        with requests.Session() as session:
            session.trust_env = False
            while "done" not in reloaded_at:
                stream = index % 2 == 0
                try:
                    response = session.post(
                        fwd.url + CHAT, timeout=10,
                        json={"model": "llama", "stream": stream,
                              "messages": [{"role": "user", "content": f"c{index}"}]})
                    if response.status_code != 200 or (stream and not response.content.endswith(
                            b"data: [DONE]\n\n")):
                        errors.append((response.status_code, response.content[:200]))
                    answered += 1
                except requests.RequestException as exc:
                    errors.append(repr(exc))
        return answered

    with ThreadPoolExecutor(8) as pool:
        clients = [pool.submit(client, i) for i in range(8)]
        time.sleep(1)
        old_workers = fwd.worker_pids()
        os.kill(fwd.pid, signal.SIGHUP)
        wait_until(lambda: not (fwd.worker_pids() & old_workers), timeout=20,
                   message="the old workers did not exit")
        time.sleep(1)
        reloaded_at["done"] = True
        answered = sum(c.result(timeout=20) for c in clients)
    assert not errors, errors[:5]
    assert answered > 50


def test_new_workers_share_the_view_of_the_old_ones_over_a_reload(fake_backend, forwarder):
    # The host table outlives a reload: the new workers count the streams the old ones still
    # relay while they drain, and hold the brake's limit with them.
    backend = fake_backend(config={"tokens": 30, "token_delay": 0.2})
    fwd = forwarder([backend.url], workers=2, wait_healthy=1,
                    env={"MAX_IN_FLIGHT_PER_BACKEND": "2", "QUEUE_TARGET_SECONDS": "30"})
    streams = []
    for index in range(2):
        response = requests.post(fwd.url + CHAT, stream=True, timeout=30, json={
            "model": "llama", "stream": True, "messages": [{"role": "user", "content": f"{index}"}]})
        chunks = response.iter_content(None)
        next(chunks)
        streams.append((response, chunks))
    old_workers = fwd.worker_pids()
    os.kill(fwd.pid, signal.SIGHUP)
    wait_until(lambda: len(fwd.worker_pids() - old_workers) == 2, timeout=15)
    answers = []

    def new_workers_answered():
        answers.append(get_json(fwd, "/_backends"))
        pids = {line["pid"] for line in fwd.access_lines() if line["path"] == "/_backends"}
        return len(pids & {str(p) for p in fwd.worker_pids() - old_workers}) == 2

    wait_until(new_workers_answered, timeout=10)
    assert all(a["backends"][0]["in_flight"] == 2 for a in answers[-2:])
    with ThreadPoolExecutor(1) as pool:
        queued = pool.submit(requests.post, fwd.url + CHAT, timeout=30,
                             json={"model": "llama", "messages": [{"role": "user", "content": "q"}]})
        wait_until(lambda: get_json(fwd, "/_backends")["queued"] == 1)  # the limit holds
        for response, chunks in streams:
            b"".join(chunks)
            response.close()
        assert queued.result(timeout=30).status_code == 200
