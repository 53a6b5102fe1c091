"""End-to-end: `ROUTING_POLICY` and model-aware routing through a real gunicorn."""

import base64
import collections
import json
import os
import signal

import requests

from tests.harness import Forwarder, wait_until


def ip_lines(*backends):
    return [b.url for b in backends]


def served_by(response):
    assert response.status_code == 200, response.text
    return response.headers["x-fake-backend"]


def backend_status(fwd, backend):
    return next(b for b in fwd.backends()["backends"] if b["url"] == backend.url)


def test_unknown_policy_stops_start_up_with_one_line(tmp_path):
    code, output = Forwarder.run_expecting_failure({"ROUTING_POLICY": "fastest"},
                                                   log_dir=tmp_path)
    assert code != 0
    lines = [line for line in output.splitlines() if "ROUTING_POLICY" in line]
    assert lines == ["vllm-forwarder: bad setting ROUTING_POLICY='fastest': "
                     "must be one of random, least_loaded, affinity"]
    assert "Traceback" not in output


def test_least_loaded_avoids_a_backend_with_50_waiting(fake_backend, forwarder):
    busy = fake_backend(name="busy", config={"waiting": 50, "running": 8})
    idle = fake_backend(name="idle", config={"waiting": 0, "running": 0})
    fwd = forwarder(ip_lines(busy, idle), env={"ROUTING_POLICY": "least_loaded"},
                    wait_healthy=2)
    wait_until(lambda: backend_status(fwd, busy)["num_requests_waiting"] == 50)
    with requests.Session() as http:
        seen = collections.Counter(served_by(http.get(fwd.url + "/v1/any/path"))
                                   for _ in range(40))
    assert seen["idle"] >= 38, seen


def test_least_loaded_spreads_its_own_streams_when_figures_are_equal(fake_backend, forwarder):
    config = {"waiting": 0, "running": 0, "tokens": 1, "token_delay": 30}
    backends = [fake_backend(name=name, config=config) for name in ("a", "b")]
    fwd = forwarder(ip_lines(*backends), env={"ROUTING_POLICY": "least_loaded"},
                    wait_healthy=2)
    body = {"model": "llama", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    streams = []
    try:
        for _ in range(20):
            # Headers arrive with the first event; the stream then stays open for 30 s.
            streams.append(requests.post(fwd.url + "/v1/chat/completions", json=body,
                                         stream=True, timeout=10))
        seen = collections.Counter(served_by(s) for s in streams)
    finally:
        for stream in streams:
            stream.close()
    # Random choice splits 20 this evenly less than one time in five.
    assert abs(seen["a"] - seen["b"]) <= 1, seen


def test_affinity_keeps_sessions_together_and_moves_them_on_failure_and_overload(
        fake_backend, forwarder):
    backends = {name: fake_backend(name=name, config={"waiting": 0, "running": 0})
                for name in ("a", "b", "c")}
    fwd = forwarder(ip_lines(*backends.values()), env={"ROUTING_POLICY": "affinity"},
                    wait_healthy=3)
    http = requests.Session()

    def send(session_id, **extra):
        return served_by(http.post(fwd.url + "/v1/completions", timeout=10,
                                   json={"model": "llama", "prompt": "hi", "max_tokens": 1},
                                   headers={"X-Session-ID": session_id}, **extra))

    homes = {}
    for n in range(12):
        turns = {send(f"session-{n}") for _ in range(3)}
        assert len(turns) == 1, f"session-{n} was split over {turns}"
        homes[f"session-{n}"] = turns.pop()
    assert len(set(homes.values())) >= 2, homes

    # Without the header: the body's `user`, else the conversation's opening messages.
    opening = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    chat_turns = [opening, opening + [{"role": "assistant", "content": "hello"},
                                      {"role": "user", "content": "more"}]]
    for key_field in ({"user": "alice"}, {}):
        places = {served_by(http.post(fwd.url + "/v1/chat/completions", timeout=10,
                                      json={"model": "llama", "messages": m, **key_field}))
                  for m in chat_turns for _ in range(2)}
        assert len(places) == 1, (key_field, places)

    # A session whose backend dies moves, and stays where it moved once the backend is back.
    session, home = next(iter(homes.items()))
    backends[home].kill()
    moved = send(session)
    assert moved != home
    backends[home].restart()
    wait_until(lambda: backend_status(fwd, backends[home])["healthy"], timeout=10)
    assert {send(session) for _ in range(3)} == {moved}

    # An overloaded backend sheds its sessions; they stay where they moved after it recovers.
    session, home = next((s, h) for s, h in homes.items() if h != moved)
    backends[home].configure(waiting=50)
    wait_until(lambda: backend_status(fwd, backends[home])["num_requests_waiting"] == 50)
    moved = send(session)
    assert moved != home
    backends[home].configure(waiting=0)
    wait_until(lambda: backend_status(fwd, backends[home])["num_requests_waiting"] == 0)
    assert {send(session) for _ in range(3)} == {moved}
    http.close()


def test_a_moved_session_is_followed_by_every_worker_and_over_a_reload(fake_backend, forwarder):
    # Where a session moved is kept in the host table: the worker that did not move it sends it
    # there too, and so do the workers that replace them on SIGHUP.
    backends = {name: fake_backend(name=name, config={"waiting": 0, "running": 0})
                for name in ("a", "b", "c")}
    fwd = forwarder(ip_lines(*backends.values()), workers=2, wait_healthy=3,
                    env={"ROUTING_POLICY": "affinity"})
    sent = iter(range(10_000))

    def send():  # a connection of its own: either worker
        return served_by(requests.post(f"{fwd.url}/v1/completions?n={next(sent)}", timeout=10,
                                       json={"model": "llama", "prompt": "hi", "max_tokens": 1},
                                       headers={"X-Session-ID": "the-session"}))

    home = send()
    backends[home].configure(waiting=50)
    wait_until(lambda: backend_status(fwd, backends[home])["num_requests_waiting"] == 50)
    moved = send()
    assert moved != home
    backends[home].configure(waiting=0)
    wait_until(lambda: backend_status(fwd, backends[home])["num_requests_waiting"] == 0)

    def every_worker_sends_it_to(place, workers):
        places = collections.Counter()

        def both_served():
            places[send()] += 1
            pids = {line["pid"] for line in fwd.access_lines()
                    if line["path"].startswith("/v1/completions")}
            return {str(pid) for pid in workers} <= pids

        wait_until(both_served, timeout=20, message=lambda: f"one worker only: {places}")
        assert set(places) == {place}, places

    every_worker_sends_it_to(moved, fwd.worker_pids())
    old_workers = fwd.worker_pids()
    os.kill(fwd.pid, signal.SIGHUP)
    wait_until(lambda: len(fwd.worker_pids() - old_workers) == 2, timeout=15)
    every_worker_sends_it_to(moved, fwd.worker_pids() - old_workers)


def test_affinity_relays_bodies_unchanged_and_never_parses_multipart(fake_backend, forwarder):
    backend = fake_backend()
    fwd = forwarder(ip_lines(backend), env={"ROUTING_POLICY": "affinity"}, wait_healthy=1)
    json_body = b'{ "model" : "llama" ,"prompt":"x",  "z": 1.50}'
    multipart = (b'--B\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
                 b'Content-Type: audio/wav\r\n\r\n{"model": "not json"}\r\n--B--\r\n')
    with requests.Session() as http:
        http.post(fwd.url + "/v1/completions", data=json_body,
                  headers={"Content-Type": "application/json"})
        http.post(fwd.url + "/v1/audio/transcriptions", data=multipart,
                  headers={"Content-Type": "multipart/form-data; boundary=B"})
    relayed = [base64.b64decode(r["body_b64"]) for r in backend.requests()]
    assert relayed == [json_body, multipart]


def test_requests_go_only_to_backends_serving_their_model(fake_backend, forwarder):
    a = fake_backend(name="a", config={"models": ["model-a", "shared"], "strict_models": True})
    b = fake_backend(name="b", config={"models": ["model-b", "shared"], "strict_models": True})
    fwd = forwarder(ip_lines(a, b), wait_healthy=2)
    wait_until(lambda: all(s["models"] for s in fwd.backends()["backends"]))
    assert [s["models"] for s in fwd.backends()["backends"]] == [["model-a", "shared"],
                                                                 ["model-b", "shared"]]
    with requests.Session() as http:
        def places(model):
            # Enough requests that `random` leaves out one of two backends once in 2^39 runs.
            return {served_by(http.post(fwd.url + "/v1/completions", timeout=10,
                                        json={"model": model, "prompt": "x"}))
                    for _ in range(40)}

        assert places("model-a") == {"a"}
        assert places("model-b") == {"b"}
        assert places("shared") == {"a", "b"}

        polls = len(a.requests()) + len(b.requests())
        missing = http.post(fwd.url + "/v1/chat/completions", json={"model": "gpt-4"})
        assert missing.status_code == 404
        assert missing.json() == {"error": {
            "message": "The model `gpt-4` does not exist.", "type": "NotFoundError",
            "param": None, "code": 404}}
        assert len(a.requests()) + len(b.requests()) == polls

        listed = http.get(fwd.url + "/v1/models")
        assert listed.status_code == 200
        document = listed.json()
        assert document["object"] == "list"
        assert [m["id"] for m in document["data"]] == ["model-a", "shared", "model-b"]
        assert all(m["object"] == "model" for m in document["data"])
    # Answered by the forwarder itself: no backend saw a client's GET /v1/models.
    assert not any(r["path"] == "/v1/models" for r in a.requests() + b.requests())


def test_a_backend_whose_list_cannot_be_read_serves_any_model(fake_backend, forwarder):
    known = fake_backend(name="known", config={"models": ["model-a"]})
    unknown = fake_backend(name="unknown", config={"models_status": 500})
    fwd = forwarder(ip_lines(known, unknown), env={"FORCED_MODEL_NAME": "model-z"},
                    wait_healthy=2)
    wait_until(lambda: backend_status(fwd, known)["models"] == ["model-a"])
    assert backend_status(fwd, unknown)["models"] is None
    with requests.Session() as http:
        # The forced name is the one routed on: only the backend that may serve anything fits.
        places = {served_by(http.post(fwd.url + "/v1/completions", timeout=10,
                                      json={"model": "model-a", "prompt": "x"}))
                  for _ in range(10)}
        assert places == {"unknown"}
        assert json.loads(http.get(fwd.url + "/v1/models").content)["data"][0]["id"] == "model-a"
