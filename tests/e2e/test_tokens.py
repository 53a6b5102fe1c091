"""Tokens and tenants through a real gunicorn (SPEC "Tokens and tenants"): named keys and their
limits (with two workers: the limits are per instance), usage metered from JSON answers and
streams, the access log's fields, the token metrics, and SSE keep-alive comments."""

import base64
import json
import os
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import chat, log_lines, wait_until

CHAT = "/v1/chat/completions"



def bearer(key):
    return {"Authorization": f"Bearer {key}"}


def samples(fwd, name):
    """{labels tuple: value} of one metric's samples."""
    text = requests.get(fwd.url + "/metrics", timeout=5).text
    return {tuple(sorted(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples
            if s.name == name}


def events(body: bytes):
    return [e for e in body.split(b"\n\n") if e]


def access(fwd, **where):
    return wait_until(lambda: [line for line in fwd.access_lines()
                               if all(line.get(k) == v for k, v in where.items())])


# --- keys -----------------------------------------------------------------------------------

def test_named_keys_name_every_figure_and_never_show_the_key(fake_backend, forwarder):
    backend = fake_backend()
    fwd = forwarder([backend.url], workers=2, wait_healthy=1,
                    env={"FORWARDER_API_KEYS": "team-a:sk-alpha-secret,sk-anonymous-secret"})
    with requests.Session() as http:
        assert http.post(fwd.url + CHAT, json=chat(), headers=bearer("nope")).status_code == 401
        named = http.post(fwd.url + CHAT, json=chat(content="from a"),
                          headers=bearer("sk-alpha-secret"))
        anonymous = http.post(fwd.url + CHAT, json=chat(content="anon"),
                              headers=bearer("sk-anonymous-secret"))
    assert named.status_code == anonymous.status_code == 200
    usage = named.json()["usage"]
    (line,) = access(fwd, request_id=named.headers["X-Request-Id"])
    assert line["key"] == "team-a" and line["model"] == "llama"
    assert int(line["prompt_tokens"]) == usage["prompt_tokens"]
    assert int(line["completion_tokens"]) == usage["completion_tokens"]
    (line,) = access(fwd, request_id=anonymous.headers["X-Request-Id"])
    assert line["key"] == "none"
    prompt = wait_until(lambda: len(samples(fwd, "forwarder_prompt_tokens_total")) == 2
                        and samples(fwd, "forwarder_prompt_tokens_total"))
    assert prompt[(("key", "team-a"), ("model", "llama"))] == usage["prompt_tokens"]
    completion = samples(fwd, "forwarder_completion_tokens_total")
    assert completion[(("key", "team-a"), ("model", "llama"))] == usage["completion_tokens"]
    assert (("key", "none"), ("model", "llama")) in prompt
    metrics = requests.get(fwd.url + "/metrics", timeout=5).text
    assert "secret" not in fwd.log() and "secret" not in metrics


def test_a_keys_file_is_read_again_and_its_bad_lines_are_skipped(fake_backend, forwarder,
                                                                 tmp_path):
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text("team-a sk-file-a\nbad name! sk-never-shown\nteam-b sk-b colour=blue\n")
    backend = fake_backend()
    fwd = forwarder([backend.url], wait_healthy=1,
                    env={"API_KEYS_FILE": str(keys_file), "CHECK_INTERVAL_SECONDS": "0.2"})
    with requests.Session() as http:
        assert http.post(fwd.url + CHAT, json=chat(), headers=bearer("sk-file-a")).status_code \
            == 200
        assert http.post(fwd.url + CHAT, json=chat(), headers=bearer("sk-b")).status_code == 401
        warnings = [line for line in fwd.log().splitlines() if "skipping the key" in line]
        assert len(warnings) == 2 and "sk-never-shown" not in fwd.log()
        keys_file.write_text("team-c sk-new\n")
        wait_until(lambda: http.post(fwd.url + CHAT, json=chat(),
                                     headers=bearer("sk-new")).status_code == 200)
        assert http.post(fwd.url + CHAT, json=chat(), headers=bearer("sk-file-a")).status_code \
            == 401
        keys_file.unlink()  # unreadable: the last good keys stay
        wait_until(lambda: len(log_lines(fwd, r"cannot read the API keys file")) >= 2)
        assert http.post(fwd.url + CHAT, json=chat(), headers=bearer("sk-new")).status_code == 200


def test_key_limits_hold_across_workers_with_429_and_retry_after(fake_backend, forwarder,
                                                                 tmp_path):
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text("one-at-a-time sk-one max_concurrent=1\n"
                         "three-a-minute sk-three requests_per_minute=3\n"
                         "few-tokens sk-few tokens_per_minute=30\n")
    backend = fake_backend(config={"tokens": 10, "token_delay": 0.1})
    fwd = forwarder([backend.url], workers=2, wait_healthy=1,
                    env={"API_KEYS_FILE": str(keys_file)})

    def post(key, **body):
        with requests.Session() as http:  # a connection of its own: either worker
            return http.post(fwd.url + CHAT, json=chat(**body), headers=bearer(key), timeout=30)

    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(post, "sk-one", stream=True, max_tokens=30)  # 3 s
        wait_until(lambda: len(backend.requests()) == 1)
        refused = [post("sk-one") for _ in range(4)]
        assert running.result().status_code == 200
    assert all(r.status_code == 429 for r in refused)
    assert all(r.json()["error"]["type"] == "RateLimitError" for r in refused)
    assert all(int(r.headers["Retry-After"]) >= 1 for r in refused)
    assert post("sk-one").status_code == 200  # its one place is free again

    # Not across a minute's end, where the sliding-window estimate lets one more through.
    wait_until(lambda: time.time() % 60 < 56, timeout=5)
    statuses = [post("sk-three").status_code for _ in range(5)]
    assert statuses == [200, 200, 200, 429, 429]

    assert post("sk-few").status_code == 200  # ~10 prompt + 10 completion tokens
    assert post("sk-few").status_code == 200
    refused = post("sk-few")
    assert refused.status_code == 429 and "tokens_per_minute" in refused.json()["error"]["message"]
    rejected = wait_until(lambda: len(samples(fwd, "forwarder_rejected_total")) == 3
                          and samples(fwd, "forwarder_rejected_total"))
    assert rejected[(("reason", "key_max_concurrent"),)] == 4
    assert rejected[(("reason", "key_requests_per_minute"),)] == 2
    assert rejected[(("reason", "key_tokens_per_minute"),)] == 1


def test_a_keys_place_stays_taken_over_a_reload_while_the_old_worker_drains(fake_backend,
                                                                              forwarder, tmp_path):
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text("solo sk-solo max_concurrent=1\n")
    backend = fake_backend(config={"tokens": 40, "token_delay": 0.1})
    fwd = forwarder([backend.url], workers=2, wait_healthy=1,
                    env={"API_KEYS_FILE": str(keys_file)})
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(requests.post, fwd.url + CHAT, json=chat(True), timeout=30,
                              headers=bearer("sk-solo"))
        wait_until(lambda: len(backend.requests()) == 1)
        old_workers = fwd.worker_pids()
        os.kill(fwd.pid, signal.SIGHUP)
        wait_until(lambda: len(fwd.worker_pids() - old_workers) == 2, timeout=15)
        new_workers = {str(pid) for pid in fwd.worker_pids() - old_workers}
        refused = []

        def new_workers_refused():
            response = requests.post(fwd.url + CHAT + f"?r={len(refused)}", json=chat(),
                                     headers=bearer("sk-solo"), timeout=10)
            refused.append(response.status_code)
            pids = {line["pid"] for line in fwd.access_lines() if "?r=" in line["path"]}
            return new_workers <= pids

        wait_until(new_workers_refused, timeout=10, message=lambda: f"answers: {refused}")
        assert not running.done()  # the stream still runs on a draining worker
        assert set(refused) == {429}, refused
        assert running.result().status_code == 200


# --- usage from streams ---------------------------------------------------------------------

def backend_events(backend, sent):
    """The events the backend itself sends for the request the forwarder sent it."""
    body = base64.b64decode(sent["body_b64"])
    response = requests.post(backend.url + CHAT, data=body, timeout=10,
                             headers={"Content-Type": "application/json"})
    return events(response.content)


def test_a_stream_that_did_not_ask_for_usage_is_metered_and_relayed_as_it_was(fake_backend,
                                                                             forwarder):
    backend = fake_backend(config={"tokens": 6})
    fwd = forwarder([backend.url], wait_healthy=1)
    relayed = requests.post(fwd.url + CHAT, json=chat(True, "count to six"), timeout=10)
    (sent,) = backend.requests()
    assert sent["json"]["stream_options"] == {"include_usage": True}  # the forwarder asked
    own = backend_events(backend, sent)
    usage_event = [e for e in own if b'"usage":{' in e]
    assert len(usage_event) == 1
    assert events(relayed.content) == [e for e in own if e not in usage_event]
    usage = json.loads(usage_event[0].removeprefix(b"data: "))["usage"]
    (line,) = access(fwd, path=CHAT)
    assert int(line["prompt_tokens"]) == usage["prompt_tokens"]
    assert int(line["completion_tokens"]) == usage["completion_tokens"] == 6
    ttft = wait_until(lambda: samples(fwd, "forwarder_time_to_first_token_seconds_count"))
    tpot = samples(fwd, "forwarder_time_per_output_token_seconds_count")
    assert ttft[(("model", "llama"),)] == 1 and tpot[(("model", "llama"),)] == 1


def test_a_forced_model_and_the_usage_asked_for_are_written_into_one_body(fake_backend,
                                                                          forwarder):
    backend = fake_backend(config={"tokens": 3})
    fwd = forwarder([backend.url], wait_healthy=1, env={"FORCED_MODEL_NAME": "llama"})
    relayed = requests.post(fwd.url + CHAT, json=chat(True, "hi", model="gpt-4"), timeout=10)
    (sent,) = backend.requests()
    assert sent["json"]["model"] == "llama"
    assert sent["json"]["stream_options"] == {"include_usage": True}
    assert b'"usage":{' not in relayed.content
    assert relayed.content.endswith(b"data: [DONE]\n\n")
    (line,) = access(fwd, path=CHAT)
    assert (line["model"], line["completion_tokens"]) == ("llama", "3")


def test_a_stream_that_asked_for_usage_gets_it_and_the_sdk_reads_it(fake_backend, forwarder):
    backend = fake_backend(config={"tokens": 4})
    fwd = forwarder([backend.url], wait_healthy=1)
    client = openai.OpenAI(base_url=fwd.url + "/v1", api_key="x", max_retries=0)
    chunks = list(client.chat.completions.create(
        model="llama", messages=[{"role": "user", "content": "hi"}], stream=True,
        stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens == 4
    sdk_plain = list(client.chat.completions.create(
        model="llama", messages=[{"role": "user", "content": "hi"}], stream=True))
    assert all(chunk.usage is None for chunk in sdk_plain)
    assert "".join(c.choices[0].delta.content or "" for c in sdk_plain) == \
        "tok0 tok1 tok2 tok3 "
    prompt = wait_until(lambda: samples(fwd, "forwarder_prompt_tokens_total"))
    assert prompt[(("key", "none"), ("model", "llama"))] > 0


def test_completions_streams_and_json_answers_are_metered(fake_backend, forwarder):
    backend = fake_backend(config={"tokens": 3})
    fwd = forwarder([backend.url], wait_healthy=1)
    with requests.Session() as http:
        stream = http.post(fwd.url + "/v1/completions", timeout=10,
                           json={"model": "llama", "prompt": "once upon", "stream": True})
        embedding = http.post(fwd.url + "/v1/embeddings", timeout=10,
                              json={"model": "llama", "input": "a sentence to embed"})
    assert b'"usage":{' not in stream.content and stream.content.endswith(b"data: [DONE]\n\n")
    (line,) = access(fwd, path="/v1/completions")
    assert line["completion_tokens"] == "3"
    (line,) = access(fwd, path="/v1/embeddings")
    assert int(line["prompt_tokens"]) == embedding.json()["usage"]["prompt_tokens"]
    assert line["completion_tokens"] == "0"


def test_responses_answers_and_streams_are_metered_and_relayed_untouched(fake_backend,
                                                                         forwarder):
    backend = fake_backend(config={"tokens": 5})
    fwd = forwarder([backend.url], wait_healthy=1)
    client = openai.OpenAI(base_url=fwd.url + "/v1", api_key="x", max_retries=0)
    answer = client.responses.create(model="llama", input="hello there")
    assert answer.output_text == "tok0 tok1 tok2 tok3 tok4 "
    streamed = list(client.responses.create(model="llama", input="hello again", stream=True))
    assert streamed[-1].type == "response.completed"
    assert streamed[-1].response.usage.output_tokens == 5
    plain, stream = backend.requests()
    body = base64.b64decode(stream["body_b64"])
    assert "stream_options" not in json.loads(body)  # never asked: it always comes
    direct = requests.post(backend.url + "/v1/responses", data=body, timeout=10,
                           headers={"Content-Type": "application/json"})
    relayed = requests.post(fwd.url + "/v1/responses", data=body, timeout=10,
                            headers={"Content-Type": "application/json"})
    assert relayed.content == direct.content and b"response.completed" in relayed.content
    lines = wait_until(lambda: len(access(fwd, path="/v1/responses")) == 3
                       and access(fwd, path="/v1/responses"))
    assert lines[0]["prompt_tokens"] == str(answer.usage.input_tokens)
    assert lines[1]["prompt_tokens"] == str(streamed[-1].response.usage.input_tokens)
    assert [line["completion_tokens"] for line in lines] == ["5"] * 3
    completion = samples(fwd, "forwarder_completion_tokens_total")
    assert completion[(("key", "none"), ("model", "llama"))] == 15
    # Its first event is the response's creation, not a token: no TTFT or TPOT from it.
    assert samples(fwd, "forwarder_time_to_first_token_seconds_count") == {}


def test_a_model_the_fleet_does_not_serve_is_counted_as_other(fake_backend, forwarder):
    backend = fake_backend()  # lists llama-3.1-8b and llama, answers any
    fwd = forwarder([backend.url], wait_healthy=1)
    requests.post(fwd.url + CHAT, json=chat(model="mystery-model"), timeout=10)
    prompt = wait_until(lambda: samples(fwd, "forwarder_prompt_tokens_total"))
    assert list(prompt) == [(("key", "none"), ("model", "other"))]
    (line,) = access(fwd, path=CHAT)
    assert line["model"] == "mystery-model"  # the log says what was asked


def test_metering_off_leaves_streams_untouched(fake_backend, forwarder):
    backend = fake_backend(config={"tokens": 3})
    fwd = forwarder([backend.url], wait_healthy=1, env={"METER_TOKENS": "0"})
    body = json.dumps(chat(True)).encode()
    requests.post(fwd.url + CHAT, data=body, timeout=10,
                  headers={"Content-Type": "application/json"})
    (sent,) = backend.requests()
    assert base64.b64decode(sent["body_b64"]) == body
    (line,) = access(fwd, path=CHAT)
    assert line["prompt_tokens"] == "-"
    assert samples(fwd, "forwarder_prompt_tokens_total") == {}


# --- keep-alive -----------------------------------------------------------------------------

def test_a_silent_stream_gets_keep_alive_comments_and_the_sdk_reads_it_as_before(fake_backend,
                                                                               forwarder):
    backend = fake_backend(config={"tokens": 3, "token_delay": 1.2})
    fwd = forwarder([backend.url], workers=2, wait_healthy=1,
                    env={"SSE_KEEPALIVE_SECONDS": "0.4"})
    raw = requests.post(fwd.url + CHAT, json=chat(True), timeout=20).content
    comments = re.findall(rb"(?m)^: keep-alive$", raw)
    assert len(comments) >= 3  # ~2 in each 1.2 s silence
    data_only = b"".join(e + b"\n\n" for e in events(raw) if not e.startswith(b":"))
    client = openai.OpenAI(base_url=fwd.url + "/v1", api_key="x", max_retries=0)
    text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="llama", messages=[{"role": "user", "content": "hi"}], stream=True))
    assert text == "tok0 tok1 tok2 "
    assert data_only.endswith(b"data: [DONE]\n\n")


def test_keep_alive_off_sends_no_comment(fake_backend, forwarder):
    backend = fake_backend(config={"tokens": 2, "token_delay": 0.8})
    fwd = forwarder([backend.url], wait_healthy=1, env={"SSE_KEEPALIVE_SECONDS": "0"})
    raw = requests.post(fwd.url + CHAT, json=chat(True), timeout=20).content
    assert b": keep-alive" not in raw



# --- the status page's figures ---------------------------------------------------------------

def test_status_data_has_requests_errors_and_tokens_per_second_by_backend_and_key(
        fake_backend, forwarder):
    backend = fake_backend(config={"tokens": 5})
    fwd = forwarder([backend.url], workers=2, wait_healthy=1,
                    env={"FORWARDER_API_KEYS": "team-a:sk-a,team-b:sk-b"})
    for index in range(6):
        with requests.Session() as http:  # a connection each: both workers relay some
            key = "sk-a" if index % 3 else "sk-b"
            http.post(fwd.url + CHAT, json=chat(content=f"r{index}"), headers=bearer(key))
    backend.configure(fail_status=500)
    requests.post(fwd.url + CHAT, json=chat(), headers=bearer("sk-b"), timeout=5)
    documents = [requests.get(fwd.url + "/_status/data", timeout=5).json() for _ in range(6)]
    for document in documents:
        assert document["interval_seconds"] > 0 and len(document["times"]) >= 1
        figures = document["backends"][backend.url]
        assert figures["requests_per_second"][-1] > 0
        assert figures["errors_per_second"][-1] > 0
        assert figures["tokens_per_second"][-1] > 0
        assert set(document["keys"]) == {"team-a", "team-b"}
        assert document["keys"]["team-b"]["errors_per_second"][-1] > 0
        assert document["keys"]["team-a"]["errors_per_second"][-1] == 0
    assert "sk-a" not in json.dumps(documents)
