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


# --- the model: continuations, refusals, echo, usage, stop strings, reasoning, tool calls ------

PARTIAL = "tok0 tok1 to"  # an answer cut in the middle of a token
CONTINUE = {"continue_final_message": True, "add_generation_prompt": False}
TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
BOTH_FLAGS = "Cannot set both `continue_final_message` and `add_generation_prompt` to True."
TEMPLATE_ERROR = (
    "continue_final_message and add_generation_prompt are not compatible. Use "
    "continue_final_message when you want the model to continue the final message, and "
    "add_generation_prompt when you want to add a header that will prompt it to start a new "
    "assistant message instead.")


def continuation(content=PARTIAL, **extra):
    """A chat request continuing `content` as the forwarder sends it."""
    return {**CHAT, "messages": [*CHAT["messages"], {"role": "assistant", "content": content}],
            **CONTINUE, **extra}


def post(backend, path, body):
    return requests.post(backend.url + path, json=body, timeout=5)


def stream(backend, path, body):
    """The JSON events of a whole SSE answer (the `[DONE]` checked and left out)."""
    response = post(backend, path, {**body, "stream": True})
    assert response.status_code == 200, response.text
    events = response.content.split(b"\n\n")[:-1]
    assert events[-1] == b"data: [DONE]"
    return [json.loads(event.removeprefix(b"data: ")) for event in events[:-1]]


def deltas(events, field="content"):
    """The `field` of each chat delta after the role chunk that has it."""
    return [e["choices"][0]["delta"][field] for e in events[1:]
            if e["choices"] and field in e["choices"][0]["delta"]]


def texts(events):
    return [e["choices"][0]["text"] for e in events if e["choices"]]


def finish(events):
    choice = [e for e in events if e["choices"]][-1]["choices"][0]
    return choice["finish_reason"], choice["stop_reason"]


def test_a_chat_continuation_takes_up_the_answer_where_it_broke_off(backend):
    events = stream(backend, "/v1/chat/completions", continuation())
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert events[0]["prompt_token_ids"] is None  # the role chunk, first as ever
    assert deltas(events) == ["k2 ", "tok3 ", "tok4 ", ""]
    assert finish(events) == ("stop", None)
    whole = post(backend, "/v1/chat/completions", continuation()).json()["choices"][0]
    assert whole["message"]["content"] == "k2 tok3 tok4 " and whole["finish_reason"] == "stop"
    # vLLM's list-of-text-parts form; at a token boundary; not a prefix of the answer at all
    parts = continuation([{"type": "text", "text": PARTIAL}])
    assert deltas(stream(backend, "/v1/chat/completions", parts))[:1] == ["k2 "]
    assert deltas(stream(backend, "/v1/chat/completions", continuation("tok0 tok1 tok2 "))) \
        == ["tok3 ", "tok4 ", ""]
    assert deltas(stream(backend, "/v1/chat/completions", continuation("Sure: tok0 ")))[:2] \
        == ["tok0 ", "tok1 "]


def test_max_tokens_caps_a_continuation(backend):
    for limit in ({"max_tokens": 2}, {"max_completion_tokens": 2}):
        events = stream(backend, "/v1/chat/completions", continuation(**limit))
        assert deltas(events) == ["k2 ", "tok3 ", ""]
        assert finish(events) == ("length", None)
    # A chat limit replaces `tokens`, so the limit less what was sent ends where the first
    # request (max_tokens=8: tok0 … tok7) would have.
    events = stream(backend, "/v1/chat/completions", continuation("tok0 tok1 ", max_tokens=6))
    assert "".join(deltas(events)) == "tok2 tok3 tok4 tok5 tok6 tok7 "
    assert finish(events) == ("length", None)


def test_a_completions_prompt_ending_with_the_answer_continues_it(backend):
    prompt = {"model": "llama", "prompt": "Say: tok0 tok1 "}
    events = stream(backend, "/v1/completions", prompt)
    assert texts(events) == ["tok2 ", "tok3 ", "tok4 ", ""] and finish(events) == ("stop", None)
    assert texts(stream(backend, "/v1/completions", {**prompt, "prompt": "Say: tok0 tok1 to"})) \
        [:2] == ["k2 ", "tok3 "]
    capped = stream(backend, "/v1/completions", {**prompt, "max_tokens": 2})
    assert texts(capped) == ["tok2 ", "tok3 ", ""] and finish(capped) == ("length", None)
    # vLLM's default max_tokens (16) less what was sent still ends at the answer's end
    assert texts(stream(backend, "/v1/completions", {**prompt, "max_tokens": 14})) \
        == ["tok2 ", "tok3 ", "tok4 ", ""]
    body = post(backend, "/v1/completions", prompt).json()["choices"][0]
    assert body["text"] == "tok2 tok3 tok4 " and body["finish_reason"] == "stop"
    # less than a whole first token is no continuation
    for other in ("Say: to", "tok0", "x tok0"):
        assert texts(stream(backend, "/v1/completions", {**prompt, "prompt": other}))[0] \
            == "tok0 "


def test_both_generation_flags_are_refused_as_vllm_validates(backend):
    body = continuation(add_generation_prompt=True)
    response = post(backend, "/v1/chat/completions", body)
    assert response.status_code == 400
    errors = [{"type": "value_error", "loc": ("body",), "msg": f"Value error, {BOTH_FLAGS}",
               "input": body, "ctx": {"error": ValueError(BOTH_FLAGS)}}]
    assert response.json() == {"error": {"message": str(errors), "type": "Bad Request",
                                         "param": None, "code": 400}}
    # FastAPI validates before vLLM's handler looks at the model
    backend.configure(strict_models=True)
    assert post(backend, "/v1/chat/completions", {**body, "model": "gpt-9"}).status_code == 400
    assert post(backend, "/v1/chat/completions", {**body, "stream": True}).status_code == 400


def test_continue_final_message_without_add_generation_prompt_false_fails_in_the_template(
        backend):
    body = continuation()
    del body["add_generation_prompt"]  # vLLM's default is true
    response = post(backend, "/v1/chat/completions", {**body, "stream": True})
    assert response.status_code == 400
    assert response.headers["Content-Type"] == "application/json"
    assert response.json() == {"error": {"message": f"{TEMPLATE_ERROR} {TEMPLATE_ERROR}",
                                         "type": "BadRequestError", "param": None,
                                         "code": 400}}


def test_continue_final_message_continues_a_final_user_message_too(backend):
    # transformers does not check the role; vLLM answers in the final message's role
    body = {**CHAT, "messages": [{"role": "user", "content": PARTIAL}], **CONTINUE}
    events = stream(backend, "/v1/chat/completions", body)
    assert events[0]["choices"][0]["delta"] == {"role": "user", "content": ""}
    assert deltas(events)[0] == "k2 "
    assert post(backend, "/v1/chat/completions", body).json()["choices"][0]["message"]["role"] \
        == "user"


def test_chat_echo_repeats_the_final_message_in_a_chunk_of_its_own(backend):
    events = stream(backend, "/v1/chat/completions", continuation(echo=True))
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert events[1]["choices"] == [{"index": 0, "delta": {"content": PARTIAL},
                                     "logprobs": None, "finish_reason": None}]
    assert deltas(events) == [PARTIAL, "k2 ", "tok3 ", "tok4 ", ""]
    whole = post(backend, "/v1/chat/completions", continuation(echo=True)).json()
    assert whole["choices"][0]["message"]["content"] == "tok0 tok1 tok2 tok3 tok4 "
    # a new answer is the assistant's: a final user message is not its to echo
    assert deltas(stream(backend, "/v1/chat/completions", {**CHAT, "echo": True}))[0] == "tok0 "


def test_completions_echo_puts_the_prompt_before_the_text(backend):
    body = {"model": "llama", "prompt": "Say: tok0 tok1 ", "echo": True}
    assert texts(stream(backend, "/v1/completions", body))[:2] \
        == ["Say: tok0 tok1 tok2 ", "tok3 "]
    assert post(backend, "/v1/completions", body).json()["choices"][0]["text"] \
        == "Say: tok0 tok1 tok2 tok3 tok4 "


def test_continuous_usage_stats_put_usage_on_every_chunk(backend):
    options = {"stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    events = stream(backend, "/v1/chat/completions", continuation(echo=True, **options))
    prompt_tokens = events[0]["usage"]["prompt_tokens"]
    assert list(events[0]) == ["id", "object", "created", "model", "choices", "usage",
                               "prompt_token_ids"]
    assert [e["usage"]["completion_tokens"] for e in events] == [0, 0, 1, 2, 3, 3, 3]
    assert all(e["usage"] == {"prompt_tokens": prompt_tokens,
                              "total_tokens": prompt_tokens + e["usage"]["completion_tokens"],
                              "completion_tokens": e["usage"]["completion_tokens"]}
               for e in events)
    assert events[-1]["choices"] == []  # the final usage chunk, as without continuous stats
    # the assistant's text so far is part of a continuation's prompt
    fresh = stream(backend, "/v1/chat/completions", {**CHAT, **options})
    assert prompt_tokens > fresh[0]["usage"]["prompt_tokens"]
    # completions dump every field of their usage; include_usage defaults to true
    events = stream(backend, "/v1/completions", {
        "model": "llama", "prompt": "x", "max_tokens": 2,
        "stream_options": {"continuous_usage_stats": True}})
    assert [e["usage"] for e in events[:2]] == [
        {"prompt_tokens": 1, "total_tokens": 2, "completion_tokens": 1,
         "prompt_tokens_details": None},
        {"prompt_tokens": 1, "total_tokens": 3, "completion_tokens": 2,
         "prompt_tokens_details": None}]
    assert events[-1] == {**events[-1], "choices": [],
                          "usage": {"prompt_tokens": 1, "total_tokens": 3, "completion_tokens": 2}}


def test_stop_strings_cut_the_answer_and_are_held_back_while_they_may_match(backend):
    body = {"model": "llama", "prompt": "x", "stop": ["tok2", "k3"]}
    events = stream(backend, "/v1/completions", body)
    # 3 characters (longest stop - 1) held back: nothing of "tok2" ever leaves
    assert texts(events) == ["to", "k0 to", "k1 "]
    assert finish(events) == ("stop", "tok2")
    whole = post(backend, "/v1/completions", body).json()
    assert whole["choices"][0]["text"] == "tok0 tok1 "
    assert whole["usage"]["completion_tokens"] == 3  # the token that completed the stop string
    kept = post(backend, "/v1/completions", {**body, "stop": "tok2",
                                             "include_stop_str_in_output": True}).json()
    assert (kept["choices"][0]["text"], kept["choices"][0]["stop_reason"]) \
        == ("tok0 tok1 tok2", "tok2")
    # several complete in one token: the first of the list wins, as in vLLM
    chat = stream(backend, "/v1/chat/completions", {**CHAT, "stop": ["k1", "tok1"]})
    assert "".join(deltas(chat)) == "tok0 to" and finish(chat) == ("stop", "k1")
    whole = post(backend, "/v1/chat/completions", {**CHAT, "stop": "tok3"}).json()["choices"][0]
    assert (whole["message"]["content"], whole["finish_reason"], whole["stop_reason"]) \
        == ("tok0 tok1 tok2 ", "stop", "tok3")


def test_a_stop_string_spanning_the_given_text_and_the_new_output_is_not_seen(backend):
    events = stream(backend, "/v1/chat/completions", continuation(stop=["tok2"]))
    assert "".join(deltas(events)) == "k2 tok3 tok4 " and finish(events) == ("stop", None)
    events = stream(backend, "/v1/completions", {"model": "llama", "prompt": "Say: " + PARTIAL,
                                                 "stop": "tok2"})
    assert "".join(texts(events)) == "k2 tok3 tok4 " and finish(events) == ("stop", None)


def test_min_tokens_holds_off_the_end_and_stop_strings(backend):
    body = {"model": "llama", "prompt": "x"}
    whole = post(backend, "/v1/completions", {**body, "min_tokens": 7}).json()["choices"][0]
    assert whole["text"] == "tok0 tok1 tok2 tok3 tok4 tok5 tok6 "
    assert whole["finish_reason"] == "stop"
    # "tok1" comes within the first 3 tokens: not checked; "tok3" comes after them
    whole = post(backend, "/v1/completions",
                 {**body, "min_tokens": 3, "stop": ["tok1", "tok3"]}).json()["choices"][0]
    assert (whole["text"], whole["stop_reason"]) == ("tok0 tok1 tok2 ", "tok3")
    for extra, message in [
            ({"max_tokens": 2, "min_tokens": 3},
             "min_tokens must be less than or equal to max_tokens=2, got 3."),
            ({"min_tokens": 17},  # vLLM's default max_tokens for completions, 16
             "min_tokens must be less than or equal to max_tokens=16, got 17."),
            ({"max_tokens": 0}, "max_tokens must be at least 1, got 0."),
            ({"stop": ["x", ""]}, "stop cannot contain an empty string.")]:
        response = post(backend, "/v1/completions", {**body, **extra})
        assert response.status_code == 400
        assert response.json()["error"] == {"message": message, "type": "BadRequestError",
                                            "param": None, "code": 400}
    assert post(backend, "/v1/chat/completions", {**CHAT, "min_tokens": 17}).status_code == 200


def test_reasoning_tokens_come_first_as_reasoning_content(backend):
    backend.configure(reasoning_tokens=2, tokens=2)
    events = stream(backend, "/v1/chat/completions", CHAT)
    assert [list(e["choices"][0]["delta"]) for e in events[1:-1]] \
        == [["reasoning_content"]] * 2 + [["content"]] * 2
    assert deltas(events, "reasoning_content") == ["think0 ", "think1 "]
    assert deltas(events) == ["tok0 ", "tok1 ", ""]
    message = post(backend, "/v1/chat/completions", CHAT).json()["choices"][0]["message"]
    assert (message["reasoning_content"], message["content"]) == ("think0 think1 ", "tok0 tok1 ")
    assert texts(stream(backend, "/v1/completions", {"model": "llama", "prompt": "x"})) \
        == ["tok0 ", "tok1 ", ""]  # no reasoning on completions


def test_tool_calls_stream_in_vllm_shape(backend):
    backend.configure(tool_call=True, tokens=2)
    body = {**CHAT, "tools": TOOLS}
    events = stream(backend, "/v1/chat/completions", body)
    calls = [call for delta in deltas(events, "tool_calls") for call in delta]
    assert list(calls[0]) == ["id", "type", "index", "function"]
    assert calls[0]["id"].startswith("chatcmpl-tool-")
    assert (calls[0]["type"], calls[0]["index"], calls[0]["function"]) \
        == ("function", 0, {"name": "lookup", "arguments": ""})
    assert all(call == {"index": 0, "function": {"arguments": call["function"]["arguments"]}}
               for call in calls[1:])
    arguments = "".join(call["function"]["arguments"] for call in calls)
    assert json.loads(arguments) == {"text": "tok0 tok1 "}
    assert events[-1]["choices"][0]["delta"] == {}
    assert finish(events) == ("tool_calls", None)
    message = post(backend, "/v1/chat/completions", body).json()["choices"][0]
    assert message["finish_reason"] == "tool_calls" and message["message"]["content"] is None
    assert message["message"]["tool_calls"][0]["function"] == {"name": "lookup",
                                                               "arguments": arguments}
    # no tools, or tool_choice "none": a plain answer
    assert deltas(stream(backend, "/v1/chat/completions", CHAT))[0] == "tok0 "
    assert deltas(stream(backend, "/v1/chat/completions", {**body, "tool_choice": "none"}))[0] \
        == "tok0 "


def test_stall_after_counts_tool_call_events(backend):
    backend.configure(tool_call=True, stall_after=2)
    with requests.post(backend.url + "/v1/chat/completions", timeout=(5, 0.5),
                       json={**CHAT, "tools": TOOLS, "stream": True}, stream=True) as response:
        received = b""
        with pytest.raises(urllib3.exceptions.ReadTimeoutError):
            for data in iter(lambda: response.raw.read1(65536), b""):
                received += data
    events = received.split(b"\n\n")[:-1]
    assert len(events) == 3  # the role chunk, then two tool-call deltas, then silence
    assert all(b'"tool_calls"' in event for event in events[1:])


@pytest.mark.parametrize("config, body, seen", [
    ({"die_after": 1}, {**continuation(), "stream": True}, "k2 "),
    ({"die_after": 1, "reasoning_tokens": 3}, {**CHAT, "stream": True}, "think0 "),
])
def test_die_after_counts_this_requests_token_events(fake_backend, config, body, seen):
    backend = fake_backend(config=config)
    received = b""
    with requests.post(backend.url + "/v1/chat/completions", json=body, stream=True,
                       timeout=5) as response:
        with pytest.raises(urllib3.exceptions.ProtocolError):
            for data in iter(lambda: response.raw.read1(65536), b""):
                received += data
    events = [json.loads(event[6:]) for event in received.split(b"\n\n")[:-1]]
    assert len(events) == 2  # the role chunk and one token event
    assert seen in events[1]["choices"][0]["delta"].values()
    wait_until(lambda: not backend.alive(), timeout=2, message="fake still running")
