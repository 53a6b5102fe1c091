"""Unit tests for reading token usage (`forwarder/usage.py`) and the API keys file
(`forwarder/auth.py`), on vLLM's wire format."""

import json
import logging
from pathlib import Path

import pytest

from forwarder.tenants.keys import parse_keys_file
from forwarder.relay.request_body import ask_for_usage
from forwarder.tenants.usage import JsonTap, StreamTap

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
STREAM = (FIXTURES / "sse_chat_completions_v0.11_reconstructed.txt").read_bytes()
USAGE_EVENT = [e for e in STREAM.split(b"\n\n") if b'"usage":{' in e][0] + b"\n\n"


def relay(tap, pieces):
    out = b"".join(tap.feed(piece) for piece in pieces)
    return out + tap.finish()


@pytest.mark.parametrize("size", [1, 7, 64, 300, len(STREAM)])
def test_the_usage_event_is_read_and_taken_out_however_the_stream_is_cut(size):
    pieces = [STREAM[i:i + size] for i in range(0, len(STREAM), size)]
    tap = StreamTap(hide=True)
    assert relay(tap, pieces) == STREAM.replace(USAGE_EVENT, b"")
    assert (tap.prompt_tokens, tap.completion_tokens) == (12, 7)
    assert tap.model == "meta-llama/Llama-3.1-8B-Instruct"


@pytest.mark.parametrize("separator", [b"\n\n", b"\r\n\r\n"])
def test_a_stream_sent_one_event_per_piece_as_vllm_does_loses_only_its_usage_event(separator):
    stream = STREAM.replace(b"\n\n", separator)
    events = [event + separator for event in stream.split(separator) if event]
    usage_event = USAGE_EVENT.replace(b"\n\n", separator)
    tap = StreamTap(hide=True)
    assert relay(tap, events) == stream.replace(usage_event, b"")
    assert (tap.prompt_tokens, tap.completion_tokens) == (12, 7)


@pytest.mark.parametrize("size", [5, len(STREAM)])
def test_a_client_that_asked_for_usage_gets_every_byte(size):
    pieces = [STREAM[i:i + size] for i in range(0, len(STREAM), size)]
    tap = StreamTap(hide=False)
    assert relay(tap, pieces) == STREAM
    assert tap.completion_tokens == 7


def test_completion_chunks_with_usage_null_are_left_alone():
    stream = (b'data: {"id":"cmpl-1","choices":[{"text":"a"}],"usage":null}\n\n'
              b'data: {"id":"cmpl-1","choices":[],"usage":{"prompt_tokens":3,'
              b'"total_tokens":5,"completion_tokens":2}}\n\ndata: [DONE]\n\n')
    tap = StreamTap(hide=True)
    assert relay(tap, [stream]) == (b'data: {"id":"cmpl-1","choices":[{"text":"a"}],'
                                    b'"usage":null}\n\ndata: [DONE]\n\n')
    assert (tap.prompt_tokens, tap.completion_tokens) == (3, 2)


def test_a_json_answer_gives_its_usage_and_model_from_its_ends():
    body = (FIXTURES / "chat_completion_nonstream_v0.11_reconstructed.json").read_bytes()
    padded = body.replace(b'"content":"', b'"content":"' + b"x" * 50_000, 1)
    tap = JsonTap()
    for i in range(0, len(padded), 4096):
        assert tap.feed(padded[i:i + 4096]) == padded[i:i + 4096]
    tap.finish()
    assert tap.model == "meta-llama/Llama-3.1-8B-Instruct"
    assert tap.prompt_tokens > 0 and tap.completion_tokens > 0


@pytest.mark.parametrize("answer, expected", [
    # vLLM's own: compact, the counts before any nested object
    (b'{"model":"m","usage":{"prompt_tokens":5,"total_tokens":8,"completion_tokens":3,'
     b'"prompt_tokens_details":{"cached_tokens":4}}}', ("m", 5, 3)),
    # another server's order: a nested object first
    (b'{"model":"m","usage":{"prompt_tokens_details":{"cached_tokens":4},'
     b'"completion_tokens":3,"prompt_tokens":5}}', ("m", 5, 3)),
    # spaces, an escaped model name, embeddings' usage without completion tokens
    (b'{"model" : "a\\"b\\u00e9", "usage" : { "prompt_tokens" : 5, "total_tokens" : 5 }}',
     ('a"b\u00e9', 5, 0)),
    # the Responses API's: input and output tokens, a nested object between them, and a tool
    # whose schema has a property called usage before the answer's own
    (b'{"model":"m","tools":[{"parameters":{"properties":{"usage":{"type":"object"}}}}],'
     b'"usage":{"input_tokens":5,"input_tokens_details":{"cached_tokens":0},'
     b'"output_tokens":3,"output_tokens_details":{"reasoning_tokens":0},"total_tokens":8},'
     b'"user":null}', ("m", 5, 3)),
    (b'{"model":"m","usage":null}', ("m", None, None)),
    (b'{"model":"m","usage":{"prompt_tokens_details":{}}}', ("m", None, None)),
])
def test_usage_and_model_are_read_in_any_order_and_spacing(answer, expected):
    tap = JsonTap()
    tap.feed(answer)
    tap.finish()
    assert (tap.model, tap.prompt_tokens, tap.completion_tokens) == expected
    event = b"data: " + answer + b"\n\n"
    stream = StreamTap(hide=False)
    assert relay(stream, [event]) == event
    if b'"usage":{' in answer:
        assert (stream.model, stream.prompt_tokens, stream.completion_tokens) == expected


def test_an_answer_without_usage_reads_as_unknown():
    tap = JsonTap()
    tap.feed(b'{"object":"list","data":[]}')
    tap.finish()
    assert tap.prompt_tokens is None


@pytest.mark.parametrize("document, asked", [
    ({"stream": True}, True),
    ({"stream": True, "stream_options": {"include_usage": False}}, True),
    ({"stream": True, "stream_options": {"include_usage": True}}, False),
    ({"stream": False}, False),
    ({}, False),
    ({"stream": True, "stream_options": "odd"}, False),
])
def test_only_a_stream_that_did_not_ask_is_made_to_ask(document, asked):
    body = json.dumps(document, indent=1).encode()
    sent = ask_for_usage(json.loads(body), body)
    assert (sent is not None) is asked
    if asked:
        assert json.loads(sent)["stream_options"]["include_usage"] is True
        assert {k: v for k, v in json.loads(sent).items() if k != "stream_options"} == \
            {k: v for k, v in document.items() if k != "stream_options"}
    if asked and "stream_options" not in document:
        assert sent.replace(b'"stream_options":{"include_usage":true},', b"") == body


def test_a_keys_file_skips_bad_lines_and_never_logs_a_key(caplog):
    text = ("# team keys\n"
            "team-a sk-aaa max_concurrent=2 tokens_per_minute=1000\n"
            "team-b sk-bbb  # no limits\n"
            "bad!name sk-secret-1\n"
            "lonely\n"
            "team-c sk-secret-2 colour=blue\n"
            "team-d sk-secret-3 requests_per_minute=many\n")
    with caplog.at_level(logging.WARNING):
        keys = parse_keys_file(text, "keys.txt")
    assert keys == [("team-a", "sk-aaa", {"max_concurrent": 2, "tokens_per_minute": 1000}),
                    ("team-b", "sk-bbb", {})]
    assert [r.getMessage().split(":")[1] for r in caplog.records] == ["4", "5", "6", "7"]
    assert "secret" not in caplog.text
