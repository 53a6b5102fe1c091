"""A fake vLLM OpenAI-compatible server for end-to-end tests, run as its own process.

    python -m tests.fake_vllm --port 8101 [--host 127.0.0.1] [--name NAME] [--config JSON]

It speaks vLLM 0.11's wire format (the bodies and SSE framing of `tests/fixtures/`) on a
gevent WSGI server, so it holds hundreds of concurrent streams and sends every SSE event as its
own HTTP/1.1 chunk, with a real pause between tokens. Its behaviour is set by a config (`DEFAULTS`
below) that tests change at run time, and it records what it receives:

    POST /_fake/config      merge a JSON object into the config; answers the full config
    GET  /_fake/config      the config
    GET  /_fake/requests    every /v1 request: id, time, method, raw path, headers, body
    GET  /_fake/disconnects every /v1 response whose client left before it finished
    GET  /_fake/polls       the time of every GET /metrics
    POST /_fake/reset       forget the recordings; config back to the start-up config

Responses are deterministic for a given request and config (ids derive from the request body),
so a test can compare bytes relayed by a proxy with bytes fetched straight from the fake.
Every /v1 response carries `X-Fake-Backend: NAME`; bodies stay exactly vLLM's.

The "model" (`Completion`, `generate`) answers a continuation of one endless text
S = tok0 tok1 tok2 … (`token_text(i)`), one token per SSE event, as vLLM 0.11 (V1 engine)
would, in vLLM's own terms:
- Where it starts: chat with `continue_final_message` continues S after the final message's
  content when that content is a prefix of S; completions continue S after the longest end of
  the (string) prompt that is a prefix of S holding at least the whole first token ("Say: tok0
  tok1 to" goes on with "k2 ", then "tok3 " …); anything else starts at tok0.
- Where it ends: the model's end of sequence sits after token `tokens` - 1 of S (finish_reason
  "stop"); a request's max_tokens caps its own events ("length"). A chat request that sets
  max_tokens / max_completion_tokens has no end of sequence (the limit replaces `tokens`, so a
  test asks for a long stream with it); a completions request always ends at S's end or its
  max_tokens, whichever comes first (see `Completion`). `min_tokens` holds the end off.
- What vLLM refuses (400, its messages): `continue_final_message` with `add_generation_prompt`
  set true (the request validator), or left out (it defaults to true: the chat template call
  fails); max_tokens < 1, min_tokens < 0 or > max_tokens, an empty stop string.
- What vLLM adds: the role chunk first (role "assistant", or the final message's role when
  `add_generation_prompt` is false), `echo` (chat: the final message's content when its role is
  the answer's; completions: the prompt), `stop` strings cut as vLLM's detokenizer does (on
  this request's output only, held back while they might still start), usage on every chunk
  with `stream_options.continuous_usage_stats`, `reasoning_content` deltas and tool-call deltas
  (config `reasoning_tokens`, `tool_call`).
"""

if __name__ == "__main__":
    from gevent import monkey

    monkey.patch_all()

import argparse
import base64
import copy
import gzip
import hashlib
import http
import json
import os
import re
import signal
import socket
import sys
import time
from pathlib import Path

import gevent
from gevent.event import Event
from gevent.pywsgi import WSGIHandler, WSGIServer

FIXTURES = Path(__file__).resolve().parent / "fixtures"

DEFAULTS = {
    "metrics": "single",  # single | dp2 | dp2_mp | v0 | no_load | garbage
    "running": None,  # overrides every vllm:num_requests_running sample
    "waiting": None,  # overrides every vllm:num_requests_waiting sample
    "kv_cache": None,  # overrides every vllm:kv_cache_usage_perc / gpu_cache_usage_perc sample
    "metrics_status": 200,
    "metrics_delay": 0,  # seconds before /metrics answers
    "models": ["llama-3.1-8b", "llama"],
    "models_status": 200,  # another status makes GET /v1/models answer vLLM's error JSON
    "strict_models": False,  # a request naming another model gets vLLM's 404
    "fail_status": None,  # every /v1 request answers this status with vLLM's error JSON
    "fail_headers": {},  # extra headers on those error responses
    "hang": False,  # /v1 requests are never answered
    "first_byte_delay": 0,  # seconds before /v1 headers are sent
    "token_delay": 0,  # seconds before each token event of a stream
    # the model's answer is this many tokens tok0 … then its end of sequence (finish_reason
    # "stop"); a chat request's max_tokens / max_completion_tokens replaces it ("length"), a
    # completions request's max_tokens only cuts it short
    "tokens": 5,
    # token events are every event after the role chunk (and echo chunk): content, reasoning,
    # tool-call deltas, and the event that ends on a stop string; counted per request
    "stall_after": None,  # a stream goes silent forever after this many token events
    "die_after": None,  # the process exits after this many token events of a stream
    # a chat answer begins with this many reasoning tokens "think0 " …, streamed as
    # `delta.reasoning_content` (vLLM 0.11's name) and returned as `message.reasoning_content`;
    # they count as completion tokens, against max_tokens, die_after and stall_after
    "reasoning_tokens": 0,
    # a chat request with `tools` (tool_choice not "none") is answered with one call of its
    # named or first tool instead of content: a delta with id, type, name and empty arguments,
    # then the arguments `{"text": "tok0 … "}` in fragments; finish_reason "tool_calls"
    "tool_call": False,
    "die_mid_body": False,  # a non-streamed POST answer: half is sent, then the process exits
    "gzip": False,  # non-streamed bodies are gzip-compressed for clients that accept it
    "drop_next": 0,  # this many /v1 requests get their connection closed without a byte of answer
    "set_cookies": [],  # each becomes its own Set-Cookie header on /v1 responses
    # vLLM's --enable-request-id-headers: /v1 responses carry X-Request-Id, the request's own or
    # a new one
    "request_id_header": False,
}

METRICS_FILES = {
    "single": "metrics_v0.11.0_V1_single-engine_harness.prom",
    "dp2": "metrics_v0.11.0_V1_dp2_single-apiserver_harness.prom",
    "dp2_mp": "metrics_v0.11.0_V1_dp2_multiprocess-mode_harness.prom",
    "v0": "metrics_v0.6.6_V0_multiprocess_harness.prom",
}
METRICS_CONTENT_TYPE = "text/plain; version=1.0.0; charset=utf-8"
LOAD_FAMILIES = {"running": ("vllm:num_requests_running",),
                 "waiting": ("vllm:num_requests_waiting",),
                 "kv_cache": ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")}
GARBAGE_METRICS = '<html>oops</html>\nvllm:num_requests_running{engine="0" 1 2 3\n'
CREATED = 1764244800  # the fixtures' timestamp; fixed so that responses are deterministic
ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
               429: "RateLimitError", 500: "InternalServerError", 503: "ServiceUnavailableError"}


def _fixture(name):
    return (FIXTURES / name).read_text()


def _metrics_bodies():
    bodies = {mode: _fixture(name) for mode, name in METRICS_FILES.items()}
    load_line = re.compile(r"^(# (HELP|TYPE) )?vllm:num_requests_(running|waiting)[ {]")
    bodies["no_load"] = "".join(
        line for line in bodies["single"].splitlines(keepends=True) if not load_line.match(line)
    )
    bodies["garbage"] = GARBAGE_METRICS
    return bodies


METRICS = _metrics_bodies()
MODEL_TEMPLATE = json.loads(_fixture("v1_models_v0.11_reconstructed.json"))["data"][0]
CHAT_TEMPLATE = json.loads(_fixture("chat_completion_nonstream_v0.11_reconstructed.json"))


def dumps(obj):
    """JSON as vLLM (pydantic / starlette) writes it: compact separators."""
    return json.dumps(obj, separators=(",", ":"))


def token_text(i):
    """The text of token i (0-based) of the model's answer S = tok0 tok1 tok2 …"""
    return f"tok{i} "


def reasoning_text(i):
    """The text of reasoning token i of a chat answer (config `reasoning_tokens`)."""
    return f"think{i} "


VLLM_DEFAULT_COMPLETION_MAX_TOKENS = 16  # CompletionRequest.max_tokens in vLLM's protocol


def continuation_of(text):
    """Where S goes on after `text` when `text` is a prefix of S: (token index, characters of
    that token already in `text`); None when it is not a prefix of S."""
    index = position = 0
    while position < len(text):
        token = token_text(index)
        piece = text[position:position + len(token)]
        if not token.startswith(piece):
            return None
        if len(piece) < len(token):
            return index, len(piece)
        position += len(token)
        index += 1
    return index, 0


def prompt_continuation(prompt):
    """Where S goes on after a completions prompt: after the longest end of `prompt` that is a
    prefix of S at least one whole token long; (0, 0) (from the start) when there is none."""
    start = prompt.find(token_text(0))
    while start != -1:
        found = continuation_of(prompt[start:])
        if found is not None:
            return found
        start = prompt.find(token_text(0), start + 1)
    return 0, 0


def find_stop(text, new_chars, stops, include_in_output):
    """vLLM's stop-string check (`check_stop_strings`, used by the V1 detokenizer after each
    token): the first stop string, in the request's order, found in the output generated so
    far, searching only where it could end in the `new_chars` just added. Returns
    (stop string, length to cut the output to, or -1 for no cut) or None."""
    for stop in stops:
        index = text.find(stop, 1 - new_chars - len(stop))
        if index == -1:
            continue
        if include_in_output:
            index += len(stop)
            if index >= len(text):
                return stop, -1
        return stop, index
    return None


def generate(start=(0, 0), end=None, limit=None, min_tokens=0, reasoning=0, tool_call=None,
             stops=(), include_stop=False):
    """The events of one answer, as ("reasoning", text), ("tool", delta) or ("content", text),
    then one ("finish", finish_reason, stop_reason, text, is_token).

    `start` is where the content takes S up (`continuation_of`), `end` the index of S's token
    where the end of sequence comes (None: never), `limit` the request's max tokens (None: no
    cap). Every event but a plain finish is one generated token: `limit` caps them all,
    `min_tokens` holds the end of sequence and stop strings off until that many are out.
    Stop strings are checked as vLLM's detokenizer checks them, on the content this request
    generated (text given in the request is never part of a match); while they might still
    match, the last (longest stop - 1) characters are held back, so a content event can be "";
    the finish event carries what was held, cut at the stop string. A finish on a stop string
    is itself the token that completed it (`is_token`)."""
    count = 0
    for i in range(reasoning):
        if limit is not None and count >= limit:
            yield "finish", "length", None, "", False
            return
        count += 1
        yield "reasoning", reasoning_text(i)
    if tool_call is not None:  # vLLM reports "tool_calls" once a tool call has streamed
        for delta in tool_call:
            if limit is not None and count >= limit:
                break
            count += 1
            yield "tool", delta
        yield "finish", "tool_calls", None, "", False
        return
    held = max(len(stop) for stop in stops) - 1 if stops and not include_stop else 0
    text, sent = "", 0
    index, offset = start
    while True:
        if limit is not None and count >= limit:
            finish = "length"
            break
        if end is not None and index >= end and count >= min_tokens:
            finish = "stop"  # the end of sequence (vLLM's own token is not counted here)
            break
        piece = token_text(index)[offset:]
        index, offset = index + 1, 0
        count += 1
        text += piece
        if stops and count > min_tokens:
            found = find_stop(text, len(piece), stops, include_stop)
            if found is not None:
                stop, cut = found
                if cut != -1:
                    text = text[:cut]
                yield "finish", "stop", stop, text[sent:], True
                return
        released = max(sent, len(text) - held)
        yield "content", text[sent:released]
        sent = released
    yield "finish", finish, None, text[sent:], False


def chat_refusal(request):
    """vLLM's answer to a chat request it refuses before generating: (status, error type,
    message) or None. Checked in vLLM's order: the request validator, the chat template."""
    flags = request.get("continue_final_message"), request.get("add_generation_prompt")
    if flags[0] and flags[1]:
        # ChatCompletionRequest.check_generation_prompt raises in a "before" model validator;
        # FastAPI's RequestValidationError reaches vLLM's validation_exception_handler, whose
        # message is str(exc.errors()) (the FastAPI of vLLM 0.11's day gives RequestValidationError
        # no __str__ of its own), type HTTPStatus.BAD_REQUEST.phrase.
        problem = ("Cannot set both `continue_final_message` and `add_generation_prompt` "
                   "to True.")
        errors = [{"type": "value_error", "loc": ("body",), "msg": f"Value error, {problem}",
                   "input": request, "ctx": {"error": ValueError(problem)}}]
        return 400, "Bad Request", str(errors)
    if flags[0] and "add_generation_prompt" not in request:
        # The field defaults to true after the validator ran on the raw body: transformers'
        # apply_chat_template then raises, vLLM's apply_hf_chat_template re-raises it as
        # ValueError(str(e)) from e, and serving_chat answers f"{e} {e.__cause__}".
        problem = ("continue_final_message and add_generation_prompt are not compatible. Use "
                   "continue_final_message when you want the model to continue the final "
                   "message, and add_generation_prompt when you want to add a header that will "
                   "prompt it to start a new assistant message instead.")
        return 400, "BadRequestError", f"{problem} {problem}"
    return None


def sampling_refusal(limit, min_tokens, stops):
    """vLLM's SamplingParams._verify_args errors the fake can meet (400 BadRequestError)."""
    if limit is not None and limit < 1:
        return f"max_tokens must be at least 1, got {limit}."
    if min_tokens < 0:
        return f"min_tokens must be greater than or equal to 0, got {min_tokens}."
    if limit is not None and min_tokens > limit:
        return f"min_tokens must be less than or equal to max_tokens={limit}, got {min_tokens}."
    if any(not stop for stop in stops):
        return "stop cannot contain an empty string."
    return None


def message_text(content):
    """A message's content as vLLM hands it to a string-format chat template: a string, or
    the texts of its text parts joined by newlines."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(part.get("text", "") for part in content
                         if isinstance(part, dict) and part.get("type") == "text")
    return ""


class State:
    """The mutable config and the recordings of one fake server."""

    def __init__(self, name, start_config):
        self.name = name
        self.start_config = {**copy.deepcopy(DEFAULTS), **start_config}
        self.reset()

    def reset(self):
        self.config = copy.deepcopy(self.start_config)
        self.requests = []
        self.disconnects = []
        self.polls = []


class Exchange:
    """One /v1 request: its record, a watcher on its client's socket, its disconnect."""

    def __init__(self, state, environ, body):
        self.state = state
        self.id = len(state.requests)
        self.method = environ["REQUEST_METHOD"]
        self.path = environ["fake.raw_path"]
        self.chunks_sent = 0
        self.gone = Event()
        self.body_hash = hashlib.sha256(body).hexdigest()
        headers = {}
        for name, value in environ["fake.headers"]:
            headers.setdefault(name.lower(), []).append(value)
        try:
            parsed = json.loads(body) if body else None
        except (ValueError, RecursionError):  # vLLM answers 400 to JSON nested too deep, too
            parsed = None
        self.json = parsed if isinstance(parsed, dict) else None
        state.requests.append({
            "id": self.id, "time": time.time(), "method": self.method, "path": self.path,
            "headers": headers, "body_b64": base64.b64encode(body).decode(),
            "body_length": len(body), "body_sha256": self.body_hash, "json": parsed,
        })
        self._watcher = gevent.spawn(self._watch, environ["fake.socket"])

    def _watch(self, sock):
        """Set `gone` when the client closes its end (a peek that returns b"" or fails)."""
        while True:
            try:
                if sock.recv(1, socket.MSG_PEEK):
                    return  # a pipelined next request: nothing more to learn here
            except socket.timeout:
                continue
            except OSError:
                pass
            self.disconnected()
            return

    def wait(self, seconds=None):
        """Sleep `seconds` (None: forever), cut short when the client leaves; True if it left."""
        return self.gone.wait(seconds)

    def disconnected(self):
        if not self.gone.is_set():
            self.gone.set()
            self.state.disconnects.append({
                "request_id": self.id, "time": time.time(), "method": self.method,
                "path": self.path, "chunks_sent": self.chunks_sent,
            })

    def body(self, chunks):
        """The WSGI body: `chunks` one write each; a client gone before the end is recorded."""
        finished = False
        try:
            for chunk in chunks:
                yield chunk
                self.chunks_sent += 1
            finished = True
        finally:
            self._watcher.kill()  # before the handler reads the socket again
            if hasattr(chunks, "close"):
                chunks.close()
            if not finished:
                self.disconnected()


class Handler(WSGIHandler):
    """Adds what plain WSGI hides: the client socket, the raw request target, repeated headers;
    and a graceful stop like vLLM's uvicorn: idle keep-alive connections closed at once, requests
    in progress finished, each connection closed after its response."""

    idle = set()  # handlers waiting for their connection's next request
    stopping = False

    def read_requestline(self):
        Handler.idle.add(self)
        try:
            return super().read_requestline()
        finally:
            Handler.idle.discard(self)

    @classmethod
    def stop_gracefully(cls, server):
        cls.stopping = True
        server.close()
        for handler in list(cls.idle):
            try:
                handler.socket.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        server.stop(10)

    def get_environ(self):
        if Handler.stopping:
            self.close_connection = True
        environ = super().get_environ()
        environ["fake.socket"] = self.socket
        environ["fake.raw_path"] = self.path
        environ["fake.headers"] = list(self.headers.items())
        return environ


class App:
    def __init__(self, state):
        self.state = state

    def __call__(self, environ, start_response):
        method, path = environ["REQUEST_METHOD"], environ["PATH_INFO"]
        body = environ["wsgi.input"].read()
        if path.startswith("/v1/"):
            return self.v1(environ, start_response, body)
        if path == "/metrics" and method == "GET":
            return self.metrics(start_response)
        if path.startswith("/_fake/"):
            return self.control(method, path, body, start_response)
        return self.respond(start_response, 404, dumps({"detail": "Not Found"}))

    @staticmethod
    def respond(start_response, status, body, content_type="application/json"):
        data = body.encode()
        start_response(f"{status} {http.HTTPStatus(status).phrase}",
                       [("Content-Type", content_type), ("Content-Length", str(len(data)))])
        return [data]

    def metrics(self, start_response):
        config = self.state.config
        self.state.polls.append(time.time())
        gevent.sleep(config["metrics_delay"] or 0)
        if config["metrics_status"] != 200:
            status = config["metrics_status"]
            return self.respond(start_response, status, http.HTTPStatus(status).phrase,
                                "text/plain; charset=utf-8")
        body = METRICS[config["metrics"]]
        for key, families in LOAD_FAMILIES.items():
            for family in families:
                if config[key] is not None:
                    sample = re.compile(rf"^({re.escape(family)}(\{{[^}}]*\}})?) \S+.*$", re.M)
                    body = sample.sub(rf"\g<1> {float(config[key])!r}", body)
        return self.respond(start_response, 200, body, METRICS_CONTENT_TYPE)

    def control(self, method, path, body, start_response):
        state = self.state
        if (method, path) == ("POST", "/_fake/config"):
            try:
                update = json.loads(body)
            except ValueError:
                update = None
            if not isinstance(update, dict) or not set(update) <= set(DEFAULTS):
                detail = f"expected a JSON object with keys among {sorted(DEFAULTS)}"
                return self.respond(start_response, 400, dumps({"detail": detail}))
            state.config.update(update)
            return self.respond(start_response, 200, dumps(state.config))
        if (method, path) == ("POST", "/_fake/reset"):
            state.reset()
            return self.respond(start_response, 200, dumps(state.config))
        recorded = {"/_fake/config": state.config, "/_fake/requests": state.requests,
                    "/_fake/disconnects": state.disconnects, "/_fake/polls": state.polls}
        if method == "GET" and path in recorded:
            return self.respond(start_response, 200, dumps(recorded[path]))
        return self.respond(start_response, 404, dumps({"detail": "Not Found"}))

    def v1(self, environ, start_response, body):
        config = self.state.config
        exchange = Exchange(self.state, environ, body)
        if config["drop_next"]:
            config["drop_next"] -= 1
            environ["fake.socket"].shutdown(socket.SHUT_RDWR)  # what uvicorn does at shutdown
            return []
        headers = [("X-Fake-Backend", self.state.name)]
        headers += [("Set-Cookie", cookie) for cookie in config["set_cookies"]]
        if config["request_id_header"]:
            request_id = environ.get("HTTP_X_REQUEST_ID") or os.urandom(16).hex()
            headers.append(("X-Request-Id", request_id))

        def send(status, chunks, content_type="application/json", extra=()):
            response_headers = [("Content-Type", content_type), *headers, *extra]
            if isinstance(chunks, bytes):
                if config["gzip"] and "gzip" in environ.get("HTTP_ACCEPT_ENCODING", ""):
                    chunks = gzip.compress(chunks, mtime=0)
                    response_headers.append(("Content-Encoding", "gzip"))
                response_headers.append(("Content-Length", str(len(chunks))))
                dies = config["die_mid_body"] and environ["REQUEST_METHOD"] == "POST"
                chunks = half_then_die(chunks) if dies else [chunks]
            start_response(f"{status} {http.HTTPStatus(status).phrase}", response_headers)
            return exchange.body(chunks)

        def error(status, message, extra=(), error_type=None):
            error_type = error_type or ERROR_TYPES.get(
                status, http.HTTPStatus(status).phrase.replace(" ", ""))
            return send(status, dumps({"error": {"message": message, "type": error_type,
                                                 "param": None, "code": status}}).encode(),
                        extra=extra)

        if config["hang"]:
            exchange.wait()
            return send(200, b"")
        if exchange.wait(config["first_byte_delay"] or 0):
            return send(200, b"")
        if config["fail_status"] is not None:
            status = config["fail_status"]
            return error(status, http.HTTPStatus(status).description or "error",
                         list(config["fail_headers"].items()))
        request = exchange.json or {}
        method, path = environ["REQUEST_METHOD"], environ["PATH_INFO"]
        chat = (method, path) == ("POST", "/v1/chat/completions")
        refusal = chat_refusal(request) if chat else None
        if refusal is not None and refusal[1] == "Bad Request":  # FastAPI's, before the handler
            status, error_type, message = refusal
            return error(status, message, error_type=error_type)
        model = request.get("model")
        if config["strict_models"] and model is not None and model not in config["models"]:
            return error(404, f"The model `{model}` does not exist.")
        if refusal is not None:  # the chat template's, after the model check
            status, error_type, message = refusal
            return error(status, message, error_type=error_type)

        if (method, path) == ("GET", "/v1/models"):
            if config["models_status"] != 200:
                return error(config["models_status"], "models unavailable")
            return send(200, dumps(self.models()).encode())
        if method == "POST" and path in ("/v1/chat/completions", "/v1/completions",
                                         "/v1/embeddings"):
            if exchange.json is None:
                return error(400, "The request body must be a JSON object.")
            if path == "/v1/embeddings":
                return send(200, dumps(embeddings(request, exchange.body_hash)).encode())
            completion = Completion(config, request, chat, exchange.body_hash)
            problem = completion.refusal()
            if problem is not None:
                return error(400, problem)
            if request.get("stream"):
                return send(200, completion.events(exchange), "text/event-stream; charset=utf-8")
            return send(200, dumps(completion.response()).encode())
        if (method, path) == ("POST", "/v1/responses"):
            if exchange.json is None:
                return error(400, "The request body must be a JSON object.")
            answer = ResponsesAnswer(config, request, exchange.body_hash)
            if request.get("stream"):
                return send(200, answer.events(exchange), "text/event-stream; charset=utf-8")
            return send(200, dumps(answer.response("completed")).encode())
        echo = {"method": exchange.method, "path": exchange.path, "body_length": len(body),
                "body_sha256": exchange.body_hash}
        return send(200, b"" if exchange.method == "HEAD" else dumps(echo).encode())

    def models(self):
        data = []
        for i, model_id in enumerate(self.state.config["models"]):
            entry = copy.deepcopy(MODEL_TEMPLATE)
            entry["id"] = model_id
            entry["permission"][0]["id"] = f"modelperm-{i:032x}"
            data.append(entry)
        return {"object": "list", "data": data}


class Completion:
    """A chat or text completion, whole or as vLLM's SSE events, from the model of `generate`.

    Where the answer ends: the end of S comes after token `tokens` - 1. A chat request that
    sets max_completion_tokens (else max_tokens) has no end of sequence: it gets exactly that
    many tokens, "length" (the fake's long-standing rule, which tests use for long streams; a
    continuation that sends the limit less what was sent ends where the first request would
    have). A completions request ends at S's end ("stop") or at its max_tokens ("length"),
    whichever comes first, so a continuation carrying vLLM's default of 16 less what was sent
    ends where the first request did (with `tokens` <= 16). vLLM's completions endpoint has no
    max_completion_tokens; neither has the fake's.

    `min_tokens`: before that many tokens, neither the end of sequence nor a stop string ends
    the answer (vLLM's logits processor and detokenizer); past S's end the model simply goes
    on, tok5 tok6 …, then ends at once.

    prompt_tokens is the fake's estimate len(JSON of messages or prompt) // 4, so the text of
    a continuation's final assistant message counts in it; completion_tokens counts the token
    events (the end of sequence is not one)."""

    def __init__(self, config, request, chat, body_hash):
        self.config = config
        self.chat = chat
        self.request = request
        self.model = request.get("model")
        self.body_hash = body_hash
        tokens = config["tokens"]
        if chat:
            limit = request.get("max_completion_tokens") or request.get("max_tokens")
            end = tokens if limit is None else None
        else:
            limit = request.get("max_tokens")
            end = tokens
        self.limit = limit
        min_tokens = request.get("min_tokens")
        self.min_tokens = min_tokens if isinstance(min_tokens, int) else 0
        stops = request.get("stop")
        stops = [stops] if isinstance(stops, str) else stops if isinstance(stops, list) else []
        self.stops = [stop for stop in stops if isinstance(stop, str)]
        messages = request.get("messages") if chat else None
        self.role = "assistant"
        self.echo_text = ""
        start = (0, 0)
        if chat:
            final = messages[-1] if isinstance(messages, list) and messages \
                and isinstance(messages[-1], dict) else {}
            final_text = message_text(final.get("content"))
            if not request.get("add_generation_prompt", True):  # get_chat_request_role
                self.role = final.get("role", "assistant")
            if request.get("continue_final_message"):
                start = continuation_of(final_text) or (0, 0)
            if request.get("echo") and final.get("role") == self.role:
                self.echo_text = final_text
        else:
            prompt = request.get("prompt")
            if isinstance(prompt, str):
                start = prompt_continuation(prompt)
                if request.get("echo"):
                    self.echo_text = prompt
        self.tool_call = self._tool_call() if chat else None
        self.plan = dict(start=start, end=end, limit=limit, min_tokens=self.min_tokens,
                         reasoning=config["reasoning_tokens"] if chat else 0,
                         tool_call=self.tool_call, stops=self.stops,
                         include_stop=bool(request.get("include_stop_str_in_output")))
        options = request.get("stream_options")
        options = options if isinstance(options, dict) else None
        # vLLM's StreamOptions: include_usage defaults to true once stream_options is given
        self.include_usage = bool(options is not None and options.get("include_usage", True))
        self.continuous_usage = self.include_usage and bool(options.get("continuous_usage_stats"))
        prompt = request.get("messages") if chat else request.get("prompt")
        self.prompt_tokens = max(1, len(json.dumps(prompt)) // 4)
        self.head = {"id": ("chatcmpl-" if chat else "cmpl-") + body_hash[:32],
                     "object": "chat.completion.chunk" if chat else "text_completion",
                     "created": CREATED, "model": self.model}

    def refusal(self):
        """vLLM's error for sampling parameters it refuses, or None."""
        limit = self.limit
        if limit is None and not self.chat:
            limit = VLLM_DEFAULT_COMPLETION_MAX_TOKENS
        if not self.chat and self.echo_text and limit == 0:
            limit = 1  # vLLM: echo with max_tokens 0 returns the prompt alone
        return sampling_refusal(limit, self.min_tokens, self.stops)

    def _tool_call(self):
        tools = self.request.get("tools")
        choice = self.request.get("tool_choice")
        if not (self.config["tool_call"] and isinstance(tools, list) and tools) \
                or choice == "none":
            return None
        if isinstance(choice, dict):
            name = (choice.get("function") or {}).get("name")
        else:
            name = ((tools[0] or {}).get("function") or {}).get("name")
        fragments = ['{"text": "', *(token_text(i) for i in range(self.config["tokens"])),
                     '"}']
        first = {"id": "chatcmpl-tool-" + self.body_hash[32:64], "type": "function",
                 "index": 0, "function": {"name": name, "arguments": ""}}
        return [first, *({"index": 0, "function": {"arguments": fragment}}
                         for fragment in fragments)]

    def usage(self, completion_tokens):
        return {"prompt_tokens": self.prompt_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens,
                "completion_tokens": completion_tokens}

    def response(self):
        reasoning, content, deltas, count = [], [], [], 0
        for step in generate(**self.plan):
            if step[0] == "finish":
                _, finish_reason, stop_reason, text, is_token = step
                content.append(text)
                count += is_token
            else:
                count += 1
                {"reasoning": reasoning, "content": content, "tool": deltas}[step[0]] \
                    .append(step[1])
        text = self.echo_text + "".join(content)
        usage = {**self.usage(count), "prompt_tokens_details": None}
        if not self.chat:
            return {**self.head, "choices": [self._text_choice(text, finish_reason, stop_reason)],
                    "service_tier": None, "system_fingerprint": None, "usage": usage,
                    "kv_transfer_params": None}
        body = copy.deepcopy(CHAT_TEMPLATE)
        body.update(id=self.head["id"], model=self.model, usage=usage)
        choice = body["choices"][0]
        choice.update(finish_reason=finish_reason, stop_reason=stop_reason)
        message = choice["message"]
        message.update(role=self.role, content=text,
                       reasoning_content="".join(reasoning) if reasoning else None)
        if deltas:
            arguments = "".join(delta["function"]["arguments"] for delta in deltas)
            message.update(content=self.echo_text or None, tool_calls=[{
                "id": deltas[0]["id"], "type": "function",
                "function": {"name": deltas[0]["function"]["name"], "arguments": arguments}}])
        return body

    def _text_choice(self, text, finish_reason, stop_reason=None):
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason,
                "stop_reason": stop_reason, "prompt_token_ids": None, "token_ids": None}

    def _event(self, choices, **extra):
        tail = {} if self.chat else {"usage": None}
        return f"data: {dumps({**self.head, 'choices': choices, **tail, **extra})}\n\n".encode()

    def _chunk_usage(self, completion_tokens):
        """usage on a chunk with continuous_usage_stats: serving_chat dumps chunks with
        exclude_unset, serving_completion without (so prompt_tokens_details: null)."""
        if not self.continuous_usage:
            return {}
        usage = self.usage(completion_tokens)
        return {"usage": usage if self.chat else {**usage, "prompt_tokens_details": None}}

    def _delta_choice(self, delta, finish_reason=None, stop_reason=None):
        if not self.chat:
            return self._text_choice(delta, finish_reason, stop_reason)
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        if finish_reason is not None:
            choice["stop_reason"] = stop_reason
        choice["token_ids"] = None
        return choice

    def events(self, exchange):
        """The SSE stream, one event per item; stall_after / die_after / token_delay apply to
        the token events (every event after the role and echo chunks but a plain finish)."""
        config = self.config
        if self.chat:
            role = {"index": 0, "delta": {"role": self.role, "content": ""}, "logprobs": None,
                    "finish_reason": None}
            yield self._event([role], **self._chunk_usage(0), prompt_token_ids=None)
            if self.echo_text:  # its own chunk, right after the role's (serving_chat)
                echo = {"index": 0, "delta": {"content": self.echo_text}, "logprobs": None,
                        "finish_reason": None}
                yield self._event([echo], **self._chunk_usage(0))
        prefix = "" if self.chat else self.echo_text  # the prompt comes with the first text
        count = 0
        for step in generate(**self.plan):
            if step[0] != "finish" or step[4]:
                if exchange.wait(config["token_delay"] or 0):
                    return
                if count == config["stall_after"]:
                    exchange.wait()
                    return
                if count == config["die_after"]:
                    print(f"fake vllm {exchange.state.name}: die_after={count}, exiting",
                          flush=True)
                    os._exit(1)
                count += 1
            if step[0] == "finish":
                _, finish_reason, stop_reason, text, _ = step
                delta = {} if self.tool_call is not None else {"content": text}
                choice = self._delta_choice(delta if self.chat else prefix + text,
                                            finish_reason, stop_reason)
            elif step[0] == "content":
                choice = self._delta_choice({"content": step[1]} if self.chat
                                            else prefix + step[1])
            elif step[0] == "reasoning":
                choice = self._delta_choice({"reasoning_content": step[1]})
            else:
                choice = self._delta_choice({"tool_calls": [step[1]]})
            prefix = ""
            yield self._event([choice], **self._chunk_usage(count))
        if self.include_usage:
            yield self._event([], usage=self.usage(count))
        yield b"data: [DONE]\n\n"


class ResponsesAnswer:
    """A `/v1/responses` answer as vLLM 0.11 writes it (reconstructed from its serving code, as
    the fixtures are): the response object, its usage named `input_tokens` / `output_tokens`
    with nested details, whole; or typed SSE events (`event: TYPE` and `data: …`) whose last,
    `response.completed`, carries the usage; no `[DONE]`."""

    def __init__(self, config, request, body_hash):
        self.config = config
        self.request = request
        self.tokens = config["tokens"]
        self.id = "resp_" + body_hash[:32]
        self.item_id = "msg_" + body_hash[32:64]
        prompt_tokens = max(1, len(json.dumps(request.get("input"))) // 4)
        self.usage = {"input_tokens": prompt_tokens,
                      "input_tokens_details": {"cached_tokens": 0},
                      "output_tokens": self.tokens,
                      "output_tokens_details": {"reasoning_tokens": 0},
                      "total_tokens": prompt_tokens + self.tokens}

    def response(self, status):
        done = status == "completed"
        text = "".join(token_text(i) for i in range(self.tokens))
        output = [{"id": self.item_id, "content": [{"annotations": [], "text": text,
                                                    "type": "output_text", "logprobs": None}],
                   "role": "assistant", "status": "completed", "type": "message"}]
        return {"id": self.id, "created_at": CREATED, "incomplete_details": None,
                "instructions": self.request.get("instructions"), "metadata": None,
                "model": self.request.get("model"), "object": "response",
                "output": output if done else [], "parallel_tool_calls": True,
                "temperature": 1.0, "tool_choice": "auto", "tools": [], "top_p": 1.0,
                "background": False, "max_output_tokens": None, "max_tool_calls": None,
                "previous_response_id": None, "prompt": None, "reasoning": None,
                "service_tier": "auto", "status": status, "text": None, "top_logprobs": None,
                "truncation": "disabled", "usage": self.usage if done else None,
                "user": None}

    def _event(self, sequence, kind, **fields):
        data = {**fields, "sequence_number": sequence, "type": kind}
        return f"event: {kind}\ndata: {dumps(data)}\n\n".encode()

    def events(self, exchange):
        yield self._event(0, "response.created", response=self.response("in_progress"))
        yield self._event(1, "response.in_progress", response=self.response("in_progress"))
        for i in range(self.tokens):
            if exchange.wait(self.config["token_delay"] or 0):
                return
            yield self._event(2 + i, "response.output_text.delta", content_index=0,
                              delta=token_text(i), item_id=self.item_id, logprobs=[],
                              output_index=0)
        yield self._event(2 + self.tokens, "response.completed",
                          response=self.response("completed"))


def half_then_die(body):
    yield body[:len(body) // 2]
    gevent.sleep(0.05)  # let the half reach the socket before the process goes
    print("fake vllm: die_mid_body, exiting", flush=True)
    os._exit(1)


def embeddings(request, body_hash):
    items = request.get("input")
    if isinstance(items, str) or not isinstance(items, list) or not items \
            or isinstance(items[0], int):
        items = [items]
    data = []
    for index in range(len(items)):
        seed = hashlib.sha256(f"{body_hash}:{index}".encode()).digest()
        vector = [round(byte / 255 - 0.5, 6) for byte in seed[:8]]
        data.append({"index": index, "object": "embedding", "embedding": vector})
    tokens = max(1, len(json.dumps(items)) // 4)
    return {"id": "embd-" + body_hash[:32], "object": "list", "created": CREATED,
            "model": request.get("model"), "data": data,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0,
                      "prompt_tokens_details": None}}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8101, help="0 picks a free port")
    parser.add_argument("--name", help="X-Fake-Backend header value (default HOST:PORT)")
    parser.add_argument("--config", type=json.loads, default={}, help="initial config, JSON")
    args = parser.parse_args(argv)
    unknown = set(args.config) - set(DEFAULTS)
    if unknown:
        parser.error(f"unknown config keys: {sorted(unknown)}")
    state = State(args.name, args.config)
    server = WSGIServer((args.host, args.port), App(state), handler_class=Handler, backlog=1024)
    server.start()
    host, port = server.address[:2]
    state.name = state.name or f"{host}:{port}"
    print(f"fake vllm listening on http://{host}:{port}", flush=True)
    # Like vLLM's uvicorn: SIGTERM stops accepting and lets requests in progress finish.
    gevent.signal_handler(signal.SIGTERM, Handler.stop_gracefully, server)
    server.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
