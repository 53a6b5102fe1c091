"""Answers that survive their backend (SPEC "Streams that survive their backend"), end to end: a
real gunicorn with two workers in front of fake vLLM backends that die (SIGKILL), go silent, or
answer nothing, driven with `requests`, raw reads and the `openai` SDK. The fake continues a
final assistant message, and a prompt that ends in its answer, as vLLM does, so the text a client
gets is the answer an unbroken backend gives, exactly once."""

import json
import re
import signal
import threading

import openai
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import chat, log_lines, wait_until

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
TOKENS = 12
ANSWER = "".join(f"tok{i} " for i in range(TOKENS))
# A backend that exits (as a SIGKILL would leave it) after this many content events.
DIES = {"tokens": TOKENS, "token_delay": 0.01, "die_after": 4}
LIVES = {"tokens": TOKENS, "token_delay": 0.01}


def events(response):
    """The `data:` payloads of an SSE response, parsed (`[DONE]` as the string)."""
    found = []
    for block in response.content.decode().split("\n\n"):
        block = block.strip()
        if block.startswith("data:"):
            data = block[5:].strip()
            found.append(data if data == "[DONE]" else json.loads(data))
    return found


def text_of(chunks, chat_stream=True):
    pieces = []
    for chunk in chunks:
        if chunk == "[DONE]" or not chunk.get("choices"):
            continue
        choice = chunk["choices"][0]
        pieces.append((choice.get("delta") or {}).get("content") or "" if chat_stream
                      else choice.get("text") or "")
    return "".join(pieces)


def check_one_answer(chunks, chat_stream=True):
    """One uninterrupted answer: one id, created and model, one role chunk, one finish,
    `[DONE]` last, no error event; its text."""
    assert chunks[-1] == "[DONE]", chunks[-3:]
    body = [c for c in chunks if c != "[DONE]"]
    assert not any("error" in c for c in body), body
    assert len({(c["id"], c["created"], c["model"]) for c in body}) == 1, body
    if chat_stream:
        roles = [c for c in body if c["choices"] and "role" in c["choices"][0]["delta"]]
        assert len(roles) == 1 and roles[0] is body[0]
    finishes = [c["choices"][0]["finish_reason"] for c in body
                if c["choices"] and c["choices"][0]["finish_reason"]]
    assert finishes == ["stop"], finishes
    return text_of(chunks, chat_stream)


def usage_events(chunks):
    return [c for c in chunks if c != "[DONE]" and c.get("usage")]


def access_line(fwd, path):
    """The one access line of `path` (gunicorn writes it once the response has ended)."""
    lines = wait_until(lambda: [line for line in fwd.access_lines() if line["path"] == path])
    assert len(lines) == 1, lines
    return lines[0]


def resumes(fwd):
    text = requests.get(fwd.url + "/metrics", timeout=5).text
    return {s.labels["outcome"]: s.value for f in text_string_to_metric_families(text)
            for s in f.samples if s.name == "forwarder_resumes_total"}


@pytest.fixture
def pair(fake_backend, forwarder):
    """A backend that dies after 4 tokens, listed first, and one that lives; `least_loaded`
    sends the first request to the first (the other has a stream held, below)."""

    def start(dying=DIES, env=None):
        dead = fake_backend(name="dies", config=dying)
        live = fake_backend(name="lives", config=LIVES)
        fwd = forwarder([dead.url, live.url], workers=2, wait_healthy=2,
                        env={"ROUTING_POLICY": "least_loaded", **(env or {})})
        return dead, live, fwd

    return start


def to_the_dying_one(fwd, live, body, path=CHAT):
    """Send `body` where it will be cut: the backend that lives is made to look busy."""
    live.configure(running=50)
    wait_until(lambda: any(b["num_requests_running"] == 50 for b in
                           requests.get(fwd.url + "/_backends", timeout=5).json()["backends"]))
    response = requests.post(fwd.url + path, json=body, timeout=30)
    live.configure(running=None)
    return response


@pytest.mark.parametrize("usage", [False, True], ids=["no-usage", "usage"])
def test_a_chat_stream_whose_backend_dies_goes_on_elsewhere(pair, usage):
    dead, live, fwd = pair()
    body = chat(True)
    if usage:
        body["stream_options"] = {"include_usage": True}
    chunks = events(to_the_dying_one(fwd, live, body))
    assert check_one_answer(chunks) == ANSWER
    assert not dead.alive()
    got = usage_events(chunks)
    if usage:
        assert len(got) == 1 and got[0]["choices"] == []
        assert got[0]["usage"]["completion_tokens"] == TOKENS
        assert got[0]["usage"]["total_tokens"] == (got[0]["usage"]["prompt_tokens"] + TOKENS)
    else:
        assert got == []
    continued = live.requests()[-1]["json"]
    assert continued["messages"][-1] == {"role": "assistant",
                                         "content": "tok0 tok1 tok2 tok3 "}
    assert (continued["continue_final_message"], continued["add_generation_prompt"],
            continued["echo"]) == (True, False, False)
    line = access_line(fwd, CHAT)
    assert (line["resumed"], line["status"], line["cut"]) == ("1", "200", "-")
    assert line["backend"] == live.url
    assert log_lines(fwd, rf"broke off \(connection closed\) after 4 tokens; going on on "
                          rf"{re.escape(live.url)}")
    assert resumes(fwd).get("resumed") == 1


@pytest.mark.parametrize("usage", [False, True], ids=["no-usage", "usage"])
def test_a_completions_stream_whose_backend_dies_goes_on_elsewhere(pair, usage):
    dead, live, fwd = pair()
    body = {"model": "llama", "prompt": "Say it:", "stream": True, "max_tokens": 20}
    if usage:
        body["stream_options"] = {"include_usage": True}
    chunks = events(to_the_dying_one(fwd, live, body, COMPLETIONS))
    assert check_one_answer(chunks, chat_stream=False) == ANSWER
    continued = live.requests()[-1]["json"]
    assert continued["prompt"] == "Say it:tok0 tok1 tok2 tok3 "
    assert (continued["max_tokens"], continued["echo"]) == (16, False)
    assert len(usage_events(chunks)) == usage
    if usage:
        assert usage_events(chunks)[0]["usage"]["completion_tokens"] == TOKENS


def test_the_openai_sdk_sees_one_answer_when_the_backend_is_sigkilled(pair):
    dead, live, fwd = pair(dying={**LIVES, "token_delay": 0.05})
    live.configure(running=50)
    wait_until(lambda: any(b["num_requests_running"] == 50 for b in
                           requests.get(fwd.url + "/_backends", timeout=5).json()["backends"]))
    client = openai.OpenAI(base_url=fwd.url + "/v1", api_key="x", max_retries=0)
    stream = client.chat.completions.create(model="llama", stream=True,
                                            messages=[{"role": "user", "content": "hi"}],
                                            stream_options={"include_usage": True})
    pieces, ids, usage = [], set(), None
    for chunk in stream:
        ids.add(chunk.id)
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            if len(pieces) == 3:
                dead.proc.send_signal(signal.SIGKILL)  # in the middle of the answer
        usage = chunk.usage or usage
    live.configure(running=None)
    assert "".join(pieces) == ANSWER and len(ids) == 1
    assert usage.completion_tokens == TOKENS
    assert dead.proc.wait(5) == -signal.SIGKILL


def test_a_backend_that_goes_silent_is_left_for_another(pair):
    dead, live, fwd = pair(dying={**LIVES, "stall_after": 5},
                           env={"READ_TIMEOUT_SECONDS": "1"})
    chunks = events(to_the_dying_one(fwd, live, chat(True)))
    assert check_one_answer(chunks) == ANSWER
    assert log_lines(fwd, r"broke off \(silent for READ_TIMEOUT_SECONDS\) after 5 tokens")
    assert dead.disconnects(), "the silent backend's connection was not closed"


def test_the_second_backend_dying_as_well_goes_on_on_a_third(fake_backend, forwarder):
    first = fake_backend(name="first", config={**LIVES, "die_after": 3})
    second = fake_backend(name="second", config={**LIVES, "die_after": 3})
    third = fake_backend(name="third", config={**LIVES, "running": 50})
    fwd = forwarder([first.url, second.url, third.url], workers=2, wait_healthy=3,
                    env={"ROUTING_POLICY": "least_loaded"})
    second.configure(running=40)
    wait_until(lambda: sorted(b["num_requests_running"] or 0 for b in
                              requests.get(fwd.url + "/_backends", timeout=5).json()["backends"])
               [1:] == [40, 50])
    chunks = events(requests.post(fwd.url + CHAT, json=chat(True), timeout=30))
    assert check_one_answer(chunks) == ANSWER
    assert not first.alive() and not second.alive()
    line = access_line(fwd, CHAT)
    assert line["resumed"] == "2" and line["backend"] == third.url
    # The last continuation went on from everything sent so far.
    assert third.requests()[-1]["json"]["messages"][-1]["content"] == \
        "tok0 tok1 tok2 tok3 tok4 tok5 "


def in_band_error(chunks):
    return [c for c in chunks if c != "[DONE]" and "error" in c]


@pytest.mark.parametrize("extra, config, why", [
    ({"n": 2}, {}, "n above 1"),
    ({"response_format": {"type": "json_object"}}, {}, "a response_format other than text"),
    ({"guided_json": {"type": "object"}}, {}, "guided or structured output"),
    ({"tool_choice": "required", "tools": [{"type": "function", "function": {"name": "f"}}]},
     {}, "tool_choice required"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, {"tool_call": True},
     "a tool call was already sent"),
    ({}, {"reasoning_tokens": 8}, "the cut is inside the reasoning"),
], ids=["n", "json", "guided", "required-tool", "tool-call-sent", "reasoning"])
def test_what_a_continuation_could_change_ends_with_the_in_band_error(pair, extra, config, why):
    dead, live, fwd = pair(dying={**DIES, **config})
    chunks = events(to_the_dying_one(fwd, live, chat(True, **extra)))
    (error,) = in_band_error(chunks)
    assert error["error"]["code"] == 502 and chunks[-1] == "[DONE]"
    assert [r for r in live.requests() if r["path"] == CHAT] == []
    assert log_lines(fwd, rf"could not go on elsewhere: {re.escape(why)}")
    assert resumes(fwd) == {"not_resumable": 1}
    line = access_line(fwd, CHAT)
    assert (line["resumed"], line["cut"]) == ("0", "backend_error")


def test_a_prompt_that_is_not_one_string_is_not_continued(pair):
    dead, live, fwd = pair()
    body = {"model": "llama", "prompt": ["Say it:"], "stream": True}
    chunks = events(to_the_dying_one(fwd, live, body, COMPLETIONS))
    assert in_band_error(chunks) and chunks[-1] == "[DONE]"
    assert log_lines(fwd, r"could not go on elsewhere: a prompt that is not one string")


def test_with_resume_streams_off_the_in_band_error_comes_at_once(pair):
    dead, live, fwd = pair(env={"RESUME_STREAMS": "false"})
    chunks = events(to_the_dying_one(fwd, live, chat(True)))
    assert in_band_error(chunks) and chunks[-1] == "[DONE]"
    assert text_of(chunks) == "tok0 tok1 tok2 tok3 "
    assert [r for r in live.requests() if r["path"] == CHAT] == []


def test_a_responses_stream_is_not_continued(pair):
    dead, live, fwd = pair()
    live.configure(running=50)
    wait_until(lambda: any(b["num_requests_running"] == 50 for b in
                           requests.get(fwd.url + "/_backends", timeout=5).json()["backends"]))
    dead.configure(token_delay=0.05)
    response = requests.post(fwd.url + "/v1/responses", stream=True, timeout=30,
                             json={"model": "llama", "input": "hi", "stream": True})
    lines = response.iter_lines()
    assert next(lines).startswith(b"event: response.created")
    dead.kill()
    rest = b"\n".join(lines)
    assert b'"error"' in rest and rest.rstrip().endswith(b"data: [DONE]")
    assert [r for r in live.requests() if r["path"] == "/v1/responses"] == []


@pytest.mark.parametrize("path, body", [
    (CHAT, chat()),
    (COMPLETIONS, {"model": "llama", "prompt": "Say it:"}),
    ("/v1/embeddings", {"model": "llama", "input": "hello"}),
], ids=["chat", "completions", "embeddings"])
def test_a_whole_answer_broken_off_before_the_client_got_a_byte_is_asked_again(pair, path,
                                                                                 body):
    dead, live, fwd = pair(dying={"die_mid_body": True})
    response = to_the_dying_one(fwd, live, body, path)
    assert response.status_code == 200
    assert response.headers["X-Fake-Backend"] == "lives"
    assert response.json() == requests.post(live.url + path, json=body, timeout=5).json()
    assert not dead.alive()
    line = access_line(fwd, path)
    assert line["resumed"] == "1"
    assert log_lines(fwd, r"before the client got a byte; asking another")


def test_a_rolling_restart_of_every_backend_costs_no_client_anything(fake_backend, forwarder):
    # Streams of 2 s: a backend's SIGTERM lets them run 1 s, then its SIGKILL cuts them.
    slow = {"tokens": 40, "token_delay": 0.05}
    whole = "".join(f"tok{i} " for i in range(40))
    backends = [fake_backend(name=f"b{i}", config=slow) for i in range(3)]
    fwd = forwarder([b.url for b in backends], workers=2, wait_healthy=3,
                    env={"ROUTING_POLICY": "least_loaded", "NO_BACKEND_WAIT_SECONDS": "10"})
    clients = 24
    errors, done = [], threading.Event()
    # The restart after which each client's last finished request began; as an operator's
    # rollout does, a backend is restarted once the last one's restart is behind every client.
    restarts = [0]
    finished = [-1] * clients

    def client(index):
        with requests.Session() as http:
            while not done.is_set():
                began, stream = restarts[0], index % 3 != 0
                try:
                    response = http.post(fwd.url + CHAT, json=chat(stream, f"c{index}"),
                                         timeout=30)
                    if not stream:
                        if response.status_code != 200:
                            errors.append((response.status_code, response.text[:200]))
                    elif in_band_error(events(response)):
                        errors.append(in_band_error(events(response)))
                    elif check_one_answer(events(response)) != whole:
                        errors.append(("text", text_of(events(response))))
                except Exception as exc:  # every failure is the test's finding
                    errors.append(repr(exc))
                finished[index] = began

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    try:
        for backend in backends:
            wait_until(lambda: min(finished) >= restarts[0], timeout=30)
            backend.restart(grace=1)  # SIGTERM, SIGKILL after 1 s, started again
            restarts[0] += 1
            wait_until(lambda: requests.get(fwd.url + "/_backends", timeout=5)
                       .json()["healthy"] == 3, timeout=30)
        wait_until(lambda: min(finished) >= restarts[0], timeout=30)
    finally:
        done.set()
        for thread in threads:
            thread.join(60)
    assert not errors, (errors[:3],
                        log_lines(fwd, r"could not go on")[:5])
    assert resumes(fwd).get("resumed", 0) >= 3, "no stream was cut: the test tested nothing"
