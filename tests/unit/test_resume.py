"""Unit tests of what a continuation is made of (`forwarder/relay/resume.py`): the record a stream
keeps as it is relayed, and the continued events as the client gets them, stop strings that span
the cut included (vLLM checks only the text it generates itself, so the forwarder must)."""

import json

from forwarder.relay.resume import Continuation, StreamRecord

HEAD = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7, "model": "m"}


def event(choices, **extra):
    return b"data: " + json.dumps({**HEAD, "choices": choices, **extra}).encode() + b"\n\n"


def delta(content=None, role=None, finish=None):
    piece = {} if role is None else {"role": role}
    if content is not None:
        piece["content"] = content
    return event([{"index": 0, "delta": piece, "finish_reason": finish}])


def recorded(*texts):
    record = StreamRecord("chat/completions")
    record.feed(delta("", role="assistant"))
    for text in texts:
        record.feed(delta(text))
    return record


def client_events(data: bytes):
    return [json.loads(block[6:]) if block[6:] != b"[DONE]" else "[DONE]"
            for block in data.split(b"\n\n") if block]


def test_the_record_keeps_the_text_the_tokens_and_the_first_event():
    record = StreamRecord("chat/completions")
    whole = delta("", role="assistant") + delta('say "hi"\n') + delta("é")
    record.feed(whole[:40])  # an event cut across reads is read once whole
    record.feed(whole[40:])
    assert record.answer_so_far() == 'say "hi"\né'
    assert record.tokens == 2
    assert json.loads(record.first_event[6:])["id"] == "chatcmpl-1"
    assert not (record.finished or record.tool_call or record.reasoning or record.done)
    record.feed(delta("", finish="stop") + b"data: [DONE]\n\n")
    assert record.finished and record.done


def test_the_record_knows_a_cut_inside_the_reasoning_and_a_tool_call():
    record = recorded("a")
    record.feed(event([{"index": 0, "delta": {"reasoning_content": "think"}}]))
    assert record.reasoning and record.tokens == 2
    record.feed(delta("b"))
    assert not record.reasoning
    record.feed(event([{"index": 0, "delta": {"tool_calls": [{"index": 0}]}}]))
    assert record.tool_call


def test_continued_events_keep_the_first_ids_and_drop_the_second_role_chunk():
    record = recorded("tok0 ", "tok1 ")
    continuation = Continuation("chat/completions", {"messages": []}, record, None)
    other = {"id": "chatcmpl-2", "object": "chat.completion.chunk", "created": 9, "model": "m"}
    data = b"".join(b"data: " + json.dumps({**other, **chunk}).encode() + b"\n\n" for chunk in (
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}],
         "usage": {"prompt_tokens": 30, "completion_tokens": 0, "total_tokens": 30}},
        {"choices": [{"index": 0, "delta": {"content": "tok2 "}}],
         "usage": {"prompt_tokens": 30, "completion_tokens": 1, "total_tokens": 31}},
        {"choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": "stop"}],
         "usage": {"prompt_tokens": 30, "completion_tokens": 1, "total_tokens": 31}},
        {"choices": [], "usage": {"prompt_tokens": 30, "completion_tokens": 1,
                                  "total_tokens": 31}})) + b"data: [DONE]\n\n"
    events = client_events(continuation.feed(data[:100]) + continuation.feed(data[100:]))
    assert [e["choices"][0]["delta"] for e in events[:-1]] == [{"content": "tok2 "},
                                                               {"content": ""}]
    assert all((e["id"], e["created"]) == ("chatcmpl-1", 7) for e in events[:-1])
    assert all("usage" not in e for e in events[:-1])  # the client asked for none
    assert events[-1] == "[DONE]"


def test_usage_asked_for_is_the_whole_answers():
    record = recorded("tok0 ", "tok1 ")
    request = {"messages": [], "stream_options": {"include_usage": True}}
    continuation = Continuation("chat/completions", request, record, None)
    data = (event([{"index": 0, "delta": {"content": "tok2 "}}],
                  usage={"prompt_tokens": 12, "completion_tokens": 1, "total_tokens": 13})
            + event([], usage={"prompt_tokens": 12, "completion_tokens": 1, "total_tokens": 13}))
    usage = client_events(continuation.feed(data))[-1]["usage"]
    assert usage == {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13}


def test_a_stop_string_that_spans_the_cut_ends_the_answer_there():
    record = recorded("tok0 ", "to")
    request = {"messages": [], "stop": ["0 tok1"], "stream_options": {"include_usage": True}}
    continuation = Continuation("chat/completions", request, record, None)
    data = continuation.feed(delta("k1 ") + delta("tok2 "))
    events = client_events(data)
    assert continuation.ended
    # Nothing of the stop string is sent after the cut; the answer ends, stop_reason says why.
    assert [e["choices"][0] for e in events if e != "[DONE]" and e["choices"]] == [
        {"index": 0, "logprobs": None, "finish_reason": "stop", "stop_reason": "0 tok1",
         "delta": {"content": ""}}]
    assert events[-2]["usage"]["completion_tokens"] == 2 and events[-1] == "[DONE]"


def test_a_stop_string_inside_the_new_text_keeps_what_comes_before_it():
    record = recorded("tok0 ")
    continuation = Continuation("chat/completions", {"messages": [], "stop": "2 t"}, record,
                                None)
    events = client_events(continuation.feed(delta("tok1 tok2 tok3 ")))
    assert events[0]["choices"][0]["delta"] == {"content": "tok1 tok"}
    assert events[1]["choices"][0]["finish_reason"] == "stop" and events[-1] == "[DONE]"


def test_a_cut_after_the_last_token_allowed_only_misses_its_end():
    record = recorded("a", "b")
    continuation = Continuation("completions", {"prompt": "p", "max_tokens": 2}, record, 0)
    assert continuation.ended
    events = client_events(continuation.closing)
    assert events[0]["choices"][0]["finish_reason"] == "length"
    assert events[0]["object"] == "text_completion" and events[-1] == "[DONE]"
