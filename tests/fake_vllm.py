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
    "token_delay": 0,  # seconds before each content event of a stream
    "tokens": 5,  # content events per stream (the request's max_tokens overrides it)
    "stall_after": None,  # a stream goes silent forever after this many content events
    "die_after": None,  # the process exits after this many content events of a stream
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
    """The text of content event number i (0-based) of every stream."""
    return f"tok{i} "


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

        def error(status, message, extra=()):
            error_type = ERROR_TYPES.get(status, http.HTTPStatus(status).phrase.replace(" ", ""))
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
        model = request.get("model")
        if config["strict_models"] and model is not None and model not in config["models"]:
            return error(404, f"The model `{model}` does not exist.")

        method, path = environ["REQUEST_METHOD"], environ["PATH_INFO"]
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
            completion = Completion(config, request, path == "/v1/chat/completions",
                                    exchange.body_hash)
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
    """A chat or text completion of `tokens` tokens, whole or as vLLM's SSE events."""

    def __init__(self, config, request, chat, body_hash):
        self.config = config
        self.chat = chat
        self.model = request.get("model")
        limit = request.get("max_completion_tokens", request.get("max_tokens"))
        self.tokens = config["tokens"] if limit is None else limit
        self.finish_reason = "stop" if limit is None else "length"
        self.include_usage = bool((request.get("stream_options") or {}).get("include_usage"))
        prompt = request.get("messages") if chat else request.get("prompt")
        prompt_tokens = max(1, len(json.dumps(prompt)) // 4)
        self.usage = {"prompt_tokens": prompt_tokens,
                      "total_tokens": prompt_tokens + self.tokens,
                      "completion_tokens": self.tokens}
        self.head = {"id": ("chatcmpl-" if chat else "cmpl-") + body_hash[:32],
                     "object": "chat.completion.chunk" if chat else "text_completion",
                     "created": CREATED, "model": self.model}

    def response(self):
        text = "".join(token_text(i) for i in range(self.tokens))
        usage = {**self.usage, "prompt_tokens_details": None}
        if self.chat:
            body = copy.deepcopy(CHAT_TEMPLATE)
            body.update(id=self.head["id"], model=self.model, usage=usage)
            body["choices"][0].update(finish_reason=self.finish_reason)
            body["choices"][0]["message"]["content"] = text
            return body
        return {**self.head, "choices": [self._text_choice(text, self.finish_reason)],
                "service_tier": None, "system_fingerprint": None, "usage": usage,
                "kv_transfer_params": None}

    def _text_choice(self, text, finish_reason):
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason,
                "stop_reason": None, "prompt_token_ids": None, "token_ids": None}

    def _event(self, choices, **extra):
        tail = {} if self.chat else {"usage": None}
        return f"data: {dumps({**self.head, 'choices': choices, **tail, **extra})}\n\n".encode()

    def _choice(self, text, finish_reason=None):
        if not self.chat:
            return self._text_choice(text, finish_reason)
        choice = {"index": 0, "delta": {"content": text}, "logprobs": None,
                  "finish_reason": finish_reason}
        if finish_reason is not None:
            choice["stop_reason"] = None
        choice["token_ids"] = None
        return choice

    def events(self, exchange):
        """The SSE stream, one event per item; stall_after / die_after / token_delay apply."""
        config = self.config
        if self.chat:
            role = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                    "finish_reason": None}
            yield self._event([role], prompt_token_ids=None)
        for i in range(self.tokens):
            if exchange.wait(config["token_delay"] or 0):
                return
            if i == config["stall_after"]:
                exchange.wait()
                return
            if i == config["die_after"]:
                print(f"fake vllm {exchange.state.name}: die_after={i}, exiting", flush=True)
                os._exit(1)
            yield self._event([self._choice(token_text(i))])
        yield self._event([self._choice("", self.finish_reason)])
        if self.include_usage:
            yield self._event([], usage=self.usage)
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
