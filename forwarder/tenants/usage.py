"""Token usage: read from the answers that carry it, for the metrics, the access log and the keys'
token limits.

- **JSON answers** (chat, completions, embeddings, responses … not streamed) end with vLLM's
  `"usage": {"prompt_tokens": …, "completion_tokens": …}` (the Responses API's: `input_tokens`,
  `output_tokens`); the relay keeps the start and the end of such a body as it passes
  (`JsonTap`), and only those are searched, never the whole body.
- **Streams** of `/v1/chat/completions` and `/v1/completions` carry usage in one event of their
  own, `choices` empty, just before `data: [DONE]`, when the request asked for it
  (`stream_options.include_usage`). When it did not, the forwarder asks for it
  (`relay.request_body.ask_for_usage`) and takes that event out again (`StreamTap`), so the
  client receives exactly the events it would have received. A `/v1/responses` stream always
  ends with its usage, in `response.completed`, which is read as it passes. Only relayed chunks
  that hold `"usage":{` are looked into.
- `model` is the request's, or else the answer's; metrics label it only when the fleet serves it.
"""

import json
import re


# The endpoints whose streams carry usage in an event of their own only when asked to (the
# forwarder asks), and whose first event is the first token.
ASKED_STREAMS = frozenset(("chat/completions", "completions"))
# The streams read for usage: those, and the Responses API's, whose last event
# (`response.completed`) always carries it.
METERED_STREAMS = ASKED_STREAMS | {"responses"}
# How much of a JSON answer's start and end is kept to find its model and usage.
HEAD_BYTES = 1024
TAIL_BYTES = 8192

# A usage object, nested objects (`prompt_tokens_details`) and all.
_USAGE = re.compile(rb'"usage"\s*:\s*(\{(?:[^{}]|\{[^{}]*\})*\})')
# The model's name: the plain form first (vLLM's), then one with escapes in it.
_PLAIN_MODEL = re.compile(rb'"model"\s*:\s*"([^"\\]{1,256})"')
_MODEL = re.compile(rb'"model"\s*:\s*"((?:[^"\\]|\\.){1,256})"')
# Chat, completions and embeddings name them prompt and completion tokens; the Responses API
# (and `/v1/messages`) input and output tokens.
_PROMPT_TOKENS = re.compile(rb'"(?:prompt|input)_tokens"\s*:\s*(\d+)')
_COMPLETION_TOKENS = re.compile(rb'"(?:completion|output)_tokens"\s*:\s*(\d+)')
_USAGE_START = b'"usage":{'
_EVENT_ENDS = (b"\n\n", b"\r\n\r\n")


def _tokens(data: bytes, at: int) -> "tuple[int, int] | None":
    """The prompt and completion tokens of the usage object whose `"usage"` key starts at `at`
    in `data`. vLLM's chat and completions write both counts before any nested object, so they
    are looked for up to the first `}` with two small patterns (json.loads costs several times
    as much, per answer); a usage object with a nested object between them (the Responses
    API's) is matched whole. A missing completion count (embeddings) is 0."""
    end = data.find(b"}", at)
    prompt = _PROMPT_TOKENS.search(data, at, end) if end > 0 else None
    completion = _COMPLETION_TOKENS.search(data, at, end) if prompt is not None else None
    if completion is None:
        found = _USAGE.match(data, at)
        if found is None:
            return None
        data, at, end = found.group(1), 0, len(found.group(1))
        prompt = _PROMPT_TOKENS.search(data, at, end)
        if prompt is None:
            return None
        completion = _COMPLETION_TOKENS.search(data, at, end)
    return int(prompt.group(1)), int(completion.group(1)) if completion else 0


def _model(data: bytes) -> "str | None":
    at = data.find(b'"model"', 0, HEAD_BYTES)
    if at < 0:
        return None
    found = _PLAIN_MODEL.match(data, at, HEAD_BYTES)
    if found is not None:
        return found.group(1).decode("utf-8", "replace")
    found = _MODEL.match(data, at, HEAD_BYTES)
    if found is None:
        return None
    try:
        return json.loads(b'"' + found.group(1) + b'"')
    except ValueError:
        return None


class Usage:
    """What one answer used: `prompt_tokens`, `completion_tokens` (None while unknown) and the
    answer's `model`."""

    __slots__ = ("prompt_tokens", "completion_tokens", "model")

    def __init__(self):
        self.prompt_tokens = None
        self.completion_tokens = None
        self.model = None

    def read(self, data: bytes, at: int) -> None:
        """The usage object whose `"usage"` key starts at `at` in `data`."""
        tokens = _tokens(data, at)
        if tokens is not None:
            self.prompt_tokens, self.completion_tokens = tokens


class JsonTap(Usage):
    """A JSON answer's start and end, kept as it is relayed."""

    __slots__ = ("_head", "_tail")

    def __init__(self):
        super().__init__()
        self._head = b""
        self._tail = b""

    def feed(self, chunk: bytes) -> bytes:
        if not self._head:
            self._head = self._tail = chunk  # mostly the whole answer, in one piece
            return chunk
        if len(self._head) < HEAD_BYTES:
            self._head += chunk[:HEAD_BYTES - len(self._head)]
        self._tail = (self._tail + chunk)[-TAIL_BYTES:] if len(chunk) < TAIL_BYTES \
            else chunk[-TAIL_BYTES:]
        return chunk

    def finish(self) -> None:
        self.model = _model(self._head)
        at = self._tail.rfind(b'"usage"')
        if at >= 0:
            self.read(self._tail, at)


class StreamTap(Usage):
    """A chat or completions stream's usage event, read, and taken out when the forwarder asked
    for it (`hide`). A piece that ends inside an event is held back until the event is whole
    (an SSE client cannot use half an event either); whole events pass as they came."""

    __slots__ = ("hide", "_held", "_started", "_plain")

    def __init__(self, hide: bool, read_model: bool = True):
        super().__init__()
        self.hide = hide
        self._held = b""
        # The model is read from the first event only when the request did not name it.
        self._started = not read_model
        # Nothing held back and the model known: a chunk of whole events without usage passes.
        self._plain = self._started

    def feed(self, chunk: bytes) -> bytes:
        if self._plain and chunk.endswith(_EVENT_ENDS):
            if _USAGE_START not in chunk:
                return chunk
            if chunk.find(b"\n\n", 0, -2) < 0 and chunk.find(b"\r\n\r\n", 0, -4) < 0:
                return self._kept(chunk)  # the usage event alone, as vLLM sends it
        data = self._held + chunk
        lf, crlf = data.rfind(b"\n\n"), data.rfind(b"\r\n\r\n")
        end = max(lf + 2 if lf >= 0 else 0, crlf + 4 if crlf >= 0 else 0)
        whole, self._held = data[:end], data[end:]
        if not self._started and whole:
            self._started = True
            self.model = _model(whole[:HEAD_BYTES])
        self._plain = self._started and not self._held
        at = whole.find(_USAGE_START)
        if at < 0:
            return whole
        kept = []
        done = 0
        while at >= 0:
            lf, crlf = whole.rfind(b"\n\n", done, at), whole.rfind(b"\r\n\r\n", done, at)
            start = max(lf + 2 if lf >= 0 else done, crlf + 4 if crlf >= 0 else done)
            ends = [end + size for end, size in ((whole.find(b"\n\n", at), 2),
                                                 (whole.find(b"\r\n\r\n", at), 4)) if end >= 0]
            end = min(ends)
            kept += (whole[done:start], self._kept(whole[start:end]))
            done = end
            at = whole.find(_USAGE_START, done)
        kept.append(whole[done:])
        return b"".join(kept)

    def _kept(self, event: bytes) -> bytes:
        # The last usage object of the event: a Responses API event echoes the request's tools
        # before its usage, and a tool's schema may well have a property called `usage`.
        self.read(event, event.rfind(_USAGE_START))
        return b"" if self.hide and b'"choices":[]' in event else event

    def finish(self) -> bytes:
        """What is still held back (an event cut short by the end of the stream)."""
        held, self._held = self._held, b""
        self._plain = self._started
        return held
