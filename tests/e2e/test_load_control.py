"""Load control through a real gunicorn (SPEC "Load control"): the KV cache and request sizes in
`least_loaded`, the brake and its queue, and passive ejection; with two workers wherever the
clause is about the instance."""

import json
import re
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import chat, get_json, log_lines, wait_until

CHAT = "/v1/chat/completions"




def open_stream(fwd, body):
    """A stream that has begun and stays open, on a connection of its own; `.rest()` reads it
    to its end."""
    response = requests.post(fwd.url + CHAT, json=body, stream=True, timeout=30)
    chunks = response.iter_content(None)
    next(chunks)
    response.rest = lambda: b"".join(chunks)
    return response


def metric(fwd, name, **labels):
    text = requests.get(fwd.url + "/metrics", timeout=5).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0



# --- the load a policy sees ---------------------------------------------------------------

def test_kv_cache_usage_is_shown_and_a_nearly_full_cache_is_avoided(fake_backend, forwarder):
    full = fake_backend(name="full", config={"metrics": "dp2", "running": 0, "waiting": 0,
                                             "kv_cache": 0.95})
    roomy = fake_backend(name="roomy", config={"metrics": "v0", "running": 3, "waiting": 1,
                                               "kv_cache": 0.2})
    fwd = forwarder([full.url, roomy.url], workers=2, wait_healthy=2,
                    env={"ROUTING_POLICY": "least_loaded"})
    by_url = {b["url"]: b for b in get_json(fwd, "/_backends")["backends"]}
    assert by_url[full.url]["kv_cache_usage"] == 0.95  # V1's name, the highest engine
    assert by_url[roomy.url]["kv_cache_usage"] == 0.2  # V0's name
    assert metric(fwd, "forwarder_backend_kv_cache_usage", backend=full.url) == 0.95
    with requests.Session() as http:
        seen = {http.post(fwd.url + CHAT, json=chat()).headers["X-Fake-Backend"]
                for _ in range(10)}
    # The idle backend's cache is nearly full: the busier one with room takes everything.
    assert seen == {"roomy"}


@pytest.mark.parametrize("weight_bytes", ["4096", "0"])
def test_least_loaded_weighs_a_request_by_its_size_until_its_first_token(fake_backend,
                                                                         forwarder, weight_bytes):
    # Every answer takes 2 s to begin (a prefill): the long prompt still waiting for its first
    # token weighs about 100 short ones, so the short ones all go to the other backend; with
    # REQUEST_WEIGHT_BYTES=0 every request weighs 1, and the short ones are shared.
    backends = [fake_backend(name=f"b{i}", config={"running": 0, "waiting": 0,
                                                   "first_byte_delay": 2})
                for i in range(2)]
    fwd = forwarder([b.url for b in backends], workers=2, wait_healthy=2,
                    env={"ROUTING_POLICY": "least_loaded", "REQUEST_WEIGHT_BYTES": weight_bytes})
    long_prompt = "word " * 80_000  # ~400 KB: about 100 requests' worth

    def post(content):
        return requests.post(fwd.url + CHAT, json=chat(content=content), timeout=30)

    def arrived():
        return sum(len(b.requests()) for b in backends)

    with ThreadPoolExecutor(7) as pool:
        answers = [pool.submit(post, long_prompt)]
        wait_until(lambda: arrived() == 1)
        (big,) = [b for b in backends if b.requests()]
        for index in range(6):
            answers.append(pool.submit(post, f"short {index}"))
            wait_until(lambda: arrived() == index + 2)
        assert all(a.result().status_code == 200 for a in answers)
    # Counting requests puts every other short one beside the long one.
    if weight_bytes == "0":
        assert len(big.requests()) >= 3
    else:
        assert len(big.requests()) == 1


# --- the brake ----------------------------------------------------------------------------

def test_the_limit_holds_across_workers_and_a_queued_request_takes_the_first_free_place(
        fake_backend, forwarder):
    backends = [fake_backend(name=f"b{i}", config={"tokens": 10, "token_delay": 0.2})
                for i in range(2)]
    fwd = forwarder([b.url for b in backends], workers=2, wait_healthy=2,
                    env={"MAX_IN_FLIGHT_PER_BACKEND": "1", "QUEUE_TARGET_SECONDS": "30",
                         "ROUTING_POLICY": "least_loaded"})
    # The first stream runs for 20 s, the second for 2 s.
    streams = [open_stream(fwd, chat(True, "s0", max_tokens=100)), open_stream(fwd, chat(True))]
    with ThreadPoolExecutor(2) as pool:
        queued = [pool.submit(requests.post, fwd.url + CHAT, json=chat(content=f"q{i}"),
                              timeout=30) for i in range(2)]
        wait_until(lambda: get_json(fwd, "/_backends")["queued"] == 2)
        assert metric(fwd, "forwarder_queue_depth") == 2
        assert sum(len(b.requests()) for b in backends) == 2  # nothing past the limit
        freed = streams[1].headers["X-Fake-Backend"]
        streams[1].rest()  # read to its end: its place frees
        # The queued requests (quick ones) went, one after the other, where a place freed,
        # while the other backend's place stayed taken.
        assert all(f.result(timeout=10).status_code == 200 for f in queued)
        assert [len(b.requests()) for b in backends if b.name == freed] == [3]
        assert get_json(fwd, "/_backends")["queued"] == 0
    streams[0].close()


def test_a_full_queue_is_a_429_the_openai_sdk_understands(fake_backend, forwarder):
    backend = fake_backend(config={"tokens": 20, "token_delay": 0.2})
    fwd = forwarder([backend.url], workers=2, wait_healthy=1,
                    env={"MAX_IN_FLIGHT_PER_BACKEND": "1", "MAX_QUEUED_REQUESTS": "1",
                         "QUEUE_TARGET_SECONDS": "30"})
    stream = open_stream(fwd, chat(True))
    with ThreadPoolExecutor(1) as pool:
        queued = pool.submit(requests.post, fwd.url + CHAT, json=chat(content="q"), timeout=30)
        wait_until(lambda: get_json(fwd, "/_backends")["queued"] == 1)
        response = requests.post(fwd.url + CHAT, json=chat(content="one too many"), timeout=5)
        assert response.status_code == 429
        assert response.headers["Retry-After"].isdigit()
        assert response.json()["error"]["type"] == "RateLimitError"
        client = openai.OpenAI(base_url=fwd.url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model="llama", messages=[{"role": "user",
                                                                     "content": "sdk"}])
        stream.close()
        assert queued.result(timeout=10).status_code == 200
    assert metric(fwd, "forwarder_rejected_total", reason="queue_full") == 2


def test_no_request_waits_longer_than_the_queue_timeout(fake_backend, forwarder):
    backend = fake_backend(config={"tokens": 40, "token_delay": 0.2})
    fwd = forwarder([backend.url], wait_healthy=1,
                    env={"MAX_IN_FLIGHT_PER_BACKEND": "1", "QUEUE_TIMEOUT_SECONDS": "1",
                         "QUEUE_TARGET_SECONDS": "30"})
    stream = open_stream(fwd, chat(True))
    started = time.monotonic()
    response = requests.post(fwd.url + CHAT, json=chat(content="late"), timeout=30)
    waited = time.monotonic() - started
    stream.close()
    assert response.status_code == 429 and 0.9 < waited < 5
    assert metric(fwd, "forwarder_rejected_total", reason="queue_timeout") == 1
    assert metric(fwd, "forwarder_queue_wait_seconds_count") >= 1


def test_a_standing_queue_refuses_early_and_keeps_what_it_serves_fast(fake_backend, forwarder):
    # Arrivals faster than the backend serves: past the target, what has waited that long is
    # refused at once, so what is served never waits much longer than the target.
    backend = fake_backend(config={"tokens": 2, "token_delay": 0.2})
    fwd = forwarder([backend.url], workers=2, wait_healthy=1,
                    env={"MAX_IN_FLIGHT_PER_BACKEND": "1", "QUEUE_TARGET_SECONDS": "0.5",
                         "QUEUE_TIMEOUT_SECONDS": "30"})

    def one(index):
        started = time.monotonic()
        response = requests.post(fwd.url + CHAT, json=chat(True, f"r{index}"), timeout=30)
        return response.status_code, time.monotonic() - started

    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(one, range(12)))
    refused = [took for status, took in results if status == 429]
    served = [took for status, took in results if status == 200]
    assert refused and served
    assert max(refused) < 5  # not the 30 s timeout
    assert metric(fwd, "forwarder_rejected_total", reason="queue_overload") == len(refused)


def test_the_queue_goes_by_priority_across_workers(fake_backend, forwarder):
    backend = fake_backend(config={"tokens": 5, "token_delay": 0.2})
    fwd = forwarder([backend.url], workers=2, wait_healthy=1,
                    env={"MAX_IN_FLIGHT_PER_BACKEND": "1", "QUEUE_TARGET_SECONDS": "30"})
    stream = open_stream(fwd, chat(True))
    with ThreadPoolExecutor(4) as pool:
        futures = []
        for index, priority in enumerate((5, 5, 0, 0)):
            futures.append(pool.submit(requests.post, fwd.url + CHAT, timeout=30,
                                       json=chat(content=f"p{priority}-{index}",
                                                 priority=priority)))
            wait_until(lambda: get_json(fwd, "/_backends")["queued"] == index + 1)
        stream.close()
        assert all(f.result(timeout=30).status_code == 200 for f in futures)
    order = [json.loads(r["json"] and json.dumps(r["json"]))["messages"][0]["content"]
             for r in backend.requests()[1:]]
    assert order == ["p0-2", "p0-3", "p5-0", "p5-1"], order


def test_a_client_that_leaves_the_queue_is_gone_from_it_at_once(fake_backend, forwarder):
    backend = fake_backend(config={"tokens": 40, "token_delay": 0.2})
    fwd = forwarder([backend.url], workers=2, wait_healthy=1,
                    env={"MAX_IN_FLIGHT_PER_BACKEND": "1", "QUEUE_TARGET_SECONDS": "30"})
    stream = open_stream(fwd, chat(True))
    body = json.dumps(chat(content="leaving")).encode()
    with socket.create_connection(("127.0.0.1", fwd.port)) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                     b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        wait_until(lambda: get_json(fwd, "/_backends")["queued"] == 1)
    wait_until(lambda: get_json(fwd, "/_backends")["queued"] == 0, timeout=2)
    stream.close()
    # The place that freed goes to the next request; had the one that left still waited, it
    # would have gone first.
    assert requests.post(fwd.url + CHAT, json=chat(content="next"), timeout=10).status_code \
        == 200
    contents = [r["json"]["messages"][0]["content"] for r in backend.requests()]
    assert contents == ["hi", "next"], contents


# --- passive ejection ---------------------------------------------------------------------

def test_a_backend_that_fails_every_request_is_ejected_and_returns(fake_backend, forwarder):
    bad = fake_backend(name="bad", config={"fail_status": 500})
    good = fake_backend(name="good")
    fwd = forwarder([bad.url, good.url], workers=2, wait_healthy=2,
                    env={"EJECT_AFTER_FAILURES": "3", "EJECT_SECONDS": "3",
                         "CHECK_INTERVAL_SECONDS": "0.2"})
    with requests.Session() as http:
        statuses = []
        while len([s for s in statuses if s == 500]) < 3:
            statuses.append(http.post(fwd.url + CHAT, json=chat()).status_code)
            assert len(statuses) < 100
        ejected_at = time.time()
        by_url = {b["url"]: b for b in get_json(fwd, "/_backends")["backends"]}
        assert by_url[bad.url]["healthy"] is False
        assert "ejected" in by_url[bad.url]["last_error"]
        assert "HTTP 500" in by_url[bad.url]["last_error"]
        assert ejected_at < by_url[bad.url]["ejected_until"] <= ejected_at + 3.5
        assert all(http.post(fwd.url + CHAT, json=chat()).headers["X-Fake-Backend"] == "good"
                   for _ in range(10))
    assert metric(fwd, "forwarder_ejections_total", backend=bad.url) == 1
    assert len(log_lines(fwd, rf"backend {bad.url} ejected")) == 1
    bad.configure(fail_status=None)
    wait_until(lambda: get_json(fwd, "/_backends")["healthy"] == 2, timeout=8)
    assert time.time() >= ejected_at + 2.9  # not before its ejection ended
    wait_until(lambda: log_lines(fwd, rf"backend {bad.url} returned after its ejection"))
    assert len(log_lines(fwd, rf"backend {bad.url} returned")) == 1


def test_busy_and_client_errors_never_eject(fake_backend, forwarder):
    busy = fake_backend(name="busy")
    fwd = forwarder([busy.url, fake_backend().url], wait_healthy=2,
                    env={"EJECT_AFTER_FAILURES": "2"})
    with requests.Session() as http:
        for status in (429, 503, 400, 404, 422) * 3:
            busy.configure(fail_status=status)
            http.post(fwd.url + CHAT, json=chat())
    assert get_json(fwd, "/_backends")["healthy"] == 2


def test_never_more_than_half_of_the_backends_are_ejected(fake_backend, forwarder):
    backends = [fake_backend(config={"fail_status": 502}) for _ in range(2)]
    fwd = forwarder([b.url for b in backends], workers=2, wait_healthy=2,
                    env={"EJECT_AFTER_FAILURES": "2", "EJECT_SECONDS": "30"})
    with requests.Session() as http:
        for _ in range(20):
            assert http.post(fwd.url + CHAT, json=chat()).status_code == 502
    status = get_json(fwd, "/_backends")
    assert status["healthy"] == 1
    assert sum(b["ejected_until"] is not None for b in status["backends"]) == 1


def test_an_ejection_soon_after_a_return_lasts_twice_as_long(fake_backend, forwarder):
    # "Soon" is within the last ejection's length after it ended; 4 s leaves a loaded CI box
    # room for the return poll, the wait below and the failing requests.
    bad = fake_backend(name="bad", config={"fail_status": 500})
    fwd = forwarder([bad.url, fake_backend().url], wait_healthy=2,
                    env={"EJECT_AFTER_FAILURES": "1", "EJECT_SECONDS": "4",
                         "CHECK_INTERVAL_SECONDS": "0.2", "ROUTING_POLICY": "least_loaded"})

    def eject():
        seen = []
        with requests.Session() as http:
            for _ in range(100):
                entry = {b["url"]: b for b in get_json(fwd, "/_backends")["backends"]}[bad.url]
                if entry["ejected_until"]:
                    return entry["ejected_until"] - time.time()
                seen.append(http.post(fwd.url + CHAT, json=chat()).status_code)
        raise AssertionError(f"never ejected: answers {seen}, last {entry}")

    first = eject()
    wait_until(lambda: get_json(fwd, "/_backends")["healthy"] == 2, timeout=10)
    second = eject()
    lengths = [float(line.split("ejected for ")[1].split(" s ")[0])
               for line in log_lines(fwd, rf"backend {re.escape(bad.url)} ejected for")]
    assert lengths == [4.0, 8.0], lengths
    assert 1.0 < first <= 4.0 and 5.0 < second <= 8.0, (first, second)
