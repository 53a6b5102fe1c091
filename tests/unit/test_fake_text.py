"""The fake vLLM's model of an answer (`tests.fake_vllm.generate` and its helpers), without a
server: where a continuation starts, and stop strings as vLLM's V1 detokenizer applies them."""

import itertools

import pytest

from tests.fake_vllm import continuation_of, find_stop, generate, prompt_continuation, token_text

S = "".join(token_text(i) for i in range(12))


def run(**plan):
    """(the streamed content events, the finish step) of one answer."""
    steps = list(generate(**plan))
    assert [step[0] for step in steps[:-1]] == ["content"] * (len(steps) - 1)
    return [step[1] for step in steps[:-1]], steps[-1]


@pytest.mark.parametrize("text, expected", [
    ("", (0, 0)), ("tok0 tok1 ", (2, 0)), ("tok0 tok1 to", (2, 2)), ("t", (0, 1)),
    ("tok0 tok2 ", None), ("Sure: tok0 ", None), ("tok0 tok1 tok", (2, 3)),
])
def test_continuation_of(text, expected):
    assert continuation_of(text) == expected


@pytest.mark.parametrize("prompt, expected", [
    ("Say: tok0 tok1 ", (2, 0)), ("Say: tok0 tok1 to", (2, 2)), ("tok0 x tok0 ", (1, 0)),
    ("Say: tok0", (0, 0)), ("x", (0, 0)), ("tok0 tok1 tok3 ", (0, 0)),
])
def test_prompt_continuation_needs_a_whole_first_token(prompt, expected):
    assert prompt_continuation(prompt) == expected


def test_vllms_stop_check_looks_only_where_a_match_can_end_in_the_new_text():
    assert find_stop("tok0 tok1 ", 5, ["k0"], False) is None  # wholly in older text
    assert find_stop("tok0 tok1 ", 5, ["0 to"], False) == ("0 to", 3)  # spans the boundary
    assert find_stop("tok0 tok1 ", 5, ["tok1"], True) == ("tok1", 9)
    assert find_stop("tok0 tok1", 4, ["tok1"], True) == ("tok1", -1)  # nothing to cut


STOPS = ["tok3", "k2 t", "1 ", " ", "tok", "o", "tok10 ", "zz", "tok1 tok2 tok3 tok4"]


@pytest.mark.parametrize("stops, include, start", [
    (list(stops), include, start)
    for size in (1, 2) for stops in itertools.permutations(STOPS, size)
    for include in (False, True) for start in ((0, 0), (2, 2))
])
def test_streamed_text_is_the_whole_text_and_never_shows_a_stop_string_it_cuts(
        stops, include, start):
    events, (_, reason, stop_reason, rest, is_token) = run(
        start=start, end=12, stops=stops, include_stop=include)
    text = "".join(events) + rest
    index, offset = start
    pieces = [token_text(index)[offset:], *(token_text(i) for i in range(index + 1, 12))]
    generated = "".join(pieces)
    if stop_reason is None:
        assert (text, reason, is_token) == (generated, "stop", False)
    else:
        assert reason == "stop" and is_token and stop_reason in stops
        cut = generated.index(stop_reason)  # the first place it appears in this output
        assert text == generated[:cut + len(stop_reason) * include]
        # the finish is the token that completed it
        assert len(events) + 1 == next(k for k in range(1, len(pieces) + 1)
                                       if stop_reason in "".join(pieces[:k]))
    held = 0 if include else max(map(len, stops)) - 1
    shown = ""
    for k, event in enumerate(events, 1):  # vLLM's get_next_output_text, token by token
        shown += event
        assert shown == generated[:max(len(shown) - len(event),
                                       len("".join(pieces[:k])) - held)]
        assert not any(stop in shown for stop in stops)


def test_min_tokens_and_limits():
    events, finish = run(end=5, min_tokens=7)
    assert "".join(events) == S[:35] and finish[1] == "stop"
    events, finish = run(end=5, limit=3)
    assert len(events) == 3 and finish[1:4] == ("length", None, "")
    events, finish = run(start=(2, 2), end=5)
    assert events == ["k2 ", "tok3 ", "tok4 "] and finish[1] == "stop"
    events, finish = run(start=(5, 0), end=5)  # the whole answer given: it ends at once
    assert events == [] and finish[1] == "stop"
    steps = list(generate(end=5, limit=3, reasoning=2))
    assert [step[0] for step in steps] == ["reasoning", "reasoning", "content", "finish"]
    assert steps[-1][1] == "length"
