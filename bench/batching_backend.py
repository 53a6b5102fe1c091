"""A fake vLLM engine that batches like vLLM does, for the fleet simulation (`bench/fleet_sim.py`).

    python -m bench.batching_backend --port 8101 [--slowdown 3] [--capacity 8] ...

Continuous batching: requests run together, one output token each per engine step; a step takes
longer the more requests run (`--step-seconds` + `--seq-step-seconds` per running request) plus
the prefill of the requests admitted in it (`--prefill-seconds-per-token` per prompt token). At
most `--capacity` requests run; the rest wait in arrival order, and `/metrics` shows both counts
as vLLM's `vllm:num_requests_running` / `vllm:num_requests_waiting`. A prefix cache like vLLM's
remembers the last `--cache-entries` prompts: a chat request whose conversation so far (every
message but the last two) is a prompt seen before prefills only its new messages. A client that
goes away, waiting or running, is dropped, as vLLM aborts it.

With `--kv-tokens N` the engine also has a KV cache of N tokens: a request admitted reserves its
prompt's tokens and its `max_tokens` until it ends, the head of the waiting queue is admitted only
when it fits (or nothing runs), and `/metrics` shows the tokens held / N as vLLM's
`vllm:kv_cache_usage_perc`, so that a long prompt weighs on the engine as it does on a GPU. Without
it (the default) nothing limits tokens and the gauge is absent.

With `--fail-status CODE` every chat request is answered with that HTTP status and vLLM's error
body, while `/metrics` and `/health` answer as usual: a backend that looks healthy but fails.

Besides vLLM's `/v1/chat/completions` (streamed), `/v1/models`, `/metrics` and `/health`:

    GET  /_sim/stats   {"admitted", "finished", "cache_eligible", "cache_hits", "failed"}
    POST /_sim/reset   drop every request, empty the cache, zero the stats
"""

if __name__ == "__main__":
    from gevent import monkey

    monkey.patch_all()

import argparse
import collections
import hashlib
import json
import socket
import sys

import gevent
from gevent.event import Event
from gevent.pywsgi import WSGIHandler, WSGIServer
from gevent.queue import Queue

MODEL = "sim-model"


def prompt_hash(messages) -> str:
    return hashlib.sha1(json.dumps(messages).encode()).hexdigest()


def tokens_of(messages) -> int:
    """Prompt tokens, at vLLM's usual four characters a token."""
    return max(1, len(json.dumps(messages)) // 4)


class Sequence:
    """One request in the engine."""

    __slots__ = ("prompt_tokens", "new_tokens", "prefix", "full", "remaining", "footprint",
                 "tokens", "aborted")

    def __init__(self, messages, max_tokens):
        self.prompt_tokens = tokens_of(messages)
        self.prefix = prompt_hash(messages[:-2]) if len(messages) > 2 else None
        self.new_tokens = tokens_of(messages[-2:])
        self.full = prompt_hash(messages)
        self.remaining = max_tokens
        self.footprint = self.prompt_tokens + max_tokens  # KV tokens it holds while it runs
        self.tokens = Queue()  # one item per output token; None ends the stream
        self.aborted = False


class Engine:
    """The scheduler loop: admit, step, emit."""

    def __init__(self, args):
        self.args = args
        self.waiting = collections.deque()
        self.running = []
        self.cache = collections.OrderedDict()
        self.wake = Event()
        self.stats = dict.fromkeys(("admitted", "finished", "cache_eligible", "cache_hits",
                                    "failed"), 0)

    def submit(self, sequence: Sequence) -> None:
        self.waiting.append(sequence)
        self.wake.set()

    def kv_used(self) -> int:
        """KV tokens held by the running requests."""
        return sum(s.footprint for s in self.running if not s.aborted)

    def fits(self, sequence: Sequence) -> bool:
        """Whether `sequence` may start now as far as the KV cache goes (always when nothing
        runs: a prompt larger than the cache still runs, alone)."""
        budget = self.args.kv_tokens
        return not budget or not self.running or self.kv_used() + sequence.footprint <= budget

    def reset(self) -> None:
        for sequence in [*self.waiting, *self.running]:
            sequence.aborted = True
            sequence.tokens.put(None)
        self.waiting.clear()
        self.running = []
        self.cache.clear()
        self.stats = dict.fromkeys(self.stats, 0)

    def run_forever(self) -> None:
        args = self.args
        while True:
            self.running = [s for s in self.running if not s.aborted]
            while self.waiting and self.waiting[0].aborted:
                self.waiting.popleft()
            if not self.running and not self.waiting:
                self.wake.clear()
                self.wake.wait()
                continue
            prefill_tokens = 0
            admitted = []
            while self.waiting and len(self.running) < args.capacity:
                sequence = self.waiting[0]
                if not sequence.aborted and not self.fits(sequence):
                    break  # first come, first served: the head waits for room
                self.waiting.popleft()
                if sequence.aborted:
                    continue
                hit = sequence.prefix is not None and sequence.prefix in self.cache
                self.stats["admitted"] += 1
                self.stats["cache_eligible"] += sequence.prefix is not None
                self.stats["cache_hits"] += hit
                prefill_tokens += sequence.new_tokens if hit else sequence.prompt_tokens
                admitted.append(sequence)
                self.running.append(sequence)
            gevent.sleep(args.slowdown * (args.step_seconds
                                          + args.seq_step_seconds * len(self.running)
                                          + args.prefill_seconds_per_token * prefill_tokens))
            for sequence in admitted:
                self.cache[sequence.full] = True
                self.cache.move_to_end(sequence.full)
            while len(self.cache) > args.cache_entries:
                self.cache.popitem(last=False)
            still_running = []
            for sequence in self.running:
                if sequence.aborted:
                    continue
                sequence.remaining -= 1
                sequence.tokens.put(1)
                if sequence.remaining > 0:
                    still_running.append(sequence)
                else:
                    sequence.tokens.put(None)
                    self.stats["finished"] += 1
            self.running = still_running


class Handler(WSGIHandler):
    """Hands the client socket to the app, to notice a client that leaves while it waits."""

    def get_environ(self):
        environ = super().get_environ()
        environ["sim.socket"] = self.socket
        return environ


def watch_client(client_socket, sequence: Sequence) -> None:
    """Abort `sequence` when its client closes the connection."""
    try:
        if client_socket.recv(1, socket.MSG_PEEK):
            return
    except OSError:
        pass
    sequence.aborted = True
    sequence.tokens.put(None)


class App:
    def __init__(self, engine: Engine):
        self.engine = engine

    @staticmethod
    def respond(start_response, status, body, content_type="application/json"):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        start_response(status, [("Content-Type", content_type),
                                ("Content-Length", str(len(data)))])
        return [data]

    def __call__(self, environ, start_response):
        method, path = environ["REQUEST_METHOD"], environ["PATH_INFO"]
        body = environ["wsgi.input"].read()
        engine = self.engine
        if path == "/v1/chat/completions" and method == "POST":
            return self.chat(environ, start_response, json.loads(body))
        if path == "/metrics":
            return self.respond(start_response, "200 OK", self.metrics().encode(), "text/plain")
        if path in ("/health", "/health_generate"):
            return self.respond(start_response, "200 OK", b"")
        if path == "/v1/models":
            return self.respond(start_response, "200 OK", {"object": "list", "data": [
                {"id": MODEL, "object": "model", "owned_by": "vllm"}]})
        if path == "/_sim/stats":
            return self.respond(start_response, "200 OK", engine.stats)
        if path == "/_sim/reset" and method == "POST":
            engine.reset()
            return self.respond(start_response, "200 OK", engine.stats)
        return self.respond(start_response, "404 Not Found", {"detail": "Not Found"})

    def metrics(self) -> str:
        engine = self.engine
        text = (f'vllm:num_requests_running{{model_name="{MODEL}"}} {len(engine.running)}\n'
                f'vllm:num_requests_waiting{{model_name="{MODEL}"}} {len(engine.waiting)}\n')
        budget = engine.args.kv_tokens
        if budget:
            usage = min(1.0, engine.kv_used() / budget)
            text += f'vllm:kv_cache_usage_perc{{model_name="{MODEL}"}} {usage:.4f}\n'
        return text

    def chat(self, environ, start_response, request):
        fail_status = self.engine.args.fail_status
        if fail_status:
            self.engine.stats["failed"] += 1
            return self.respond(start_response, f"{fail_status} Simulated Failure", {
                "object": "error", "message": "simulated engine failure",
                "type": "InternalServerError", "param": None, "code": fail_status})
        sequence = Sequence(request["messages"], int(request.get("max_tokens") or 16))
        watcher = gevent.spawn(watch_client, environ["sim.socket"], sequence)
        self.engine.submit(sequence)
        start_response("200 OK", [("Content-Type", "text/event-stream; charset=utf-8")])
        return self.stream(sequence, watcher)

    @staticmethod
    def stream(sequence: Sequence, watcher):
        head = '{"id":"chatcmpl-sim","object":"chat.completion.chunk","model":"%s",' % MODEL
        try:
            index = 0
            while sequence.tokens.get() is not None:
                yield (f'data: {head}"choices":[{{"index":0,"delta":{{"content":"t{index} "}},'
                       f'"finish_reason":null}}]}}\n\n').encode()
                index += 1
            if not sequence.aborted:
                yield b"data: [DONE]\n\n"
        finally:
            # Wait for the watcher to be gone: still in its recv, it would make the next
            # request's read on this kept-alive connection fail (ConcurrentObjectUseError).
            watcher.kill()
            sequence.aborted = True


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--capacity", type=int, default=8, help="most requests running at once")
    parser.add_argument("--slowdown", type=float, default=1.0, help="every step this much slower")
    parser.add_argument("--step-seconds", type=float, default=0.02)
    parser.add_argument("--seq-step-seconds", type=float, default=0.0025)
    parser.add_argument("--prefill-seconds-per-token", type=float, default=0.00002)
    parser.add_argument("--cache-entries", type=int, default=256)
    parser.add_argument("--kv-tokens", type=int, default=0,
                        help="KV cache size in tokens (0: no limit, no usage gauge)")
    parser.add_argument("--fail-status", type=int, default=0,
                        help="answer every chat request with this HTTP status (0: never)")
    args = parser.parse_args(argv)
    engine = Engine(args)
    gevent.spawn(engine.run_forever)
    server = WSGIServer((args.host, args.port), App(engine), handler_class=Handler, backlog=1024,
                        log=None)
    print(f"batching backend listening on http://{args.host}:{args.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
