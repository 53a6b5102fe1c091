"""A fake vLLM engine that schedules as vLLM V1 does, for the fleet simulation (`fleet_sim.py`).

    python -m bench.batching_backend --port 8101 [--slowdown 3] [--max-num-seqs 8] [--kv-blocks N]

It owns what makes one vLLM engine fast or slow for a router: its batch, its queue, its KV cache
and prefix cache, and the time a step takes. Each part follows vLLM V1's code:

- Tokens (`render`). A chat prompt is its messages one after another, each a role marker, its
  content's words (a word is a token) and an end marker, then the marker that opens the answer;
  the answer's i-th token is the word `a<i>`. So the next turn of a conversation (its history
  with the answer as it was streamed, then a new user message) begins with the previous turn's
  prompt and answer, token for token, as it does through a chat template.
- KV cache (`BlockPool`, as `vllm/v1/core/block_pool.py` and `kv_cache_utils.py`):
  `--kv-blocks` blocks of `--block-size` tokens. A running request holds
  ceil(its tokens computed or being computed / block size) blocks, taken as it grows (a prefill
  chunk's worth, then one token's slot per step), not reserved up front.
- Prefix caching: every full block is cached under a hash of its parent block's hash and its own
  tokens, so a hash names the whole prefix. A request starting (or resuming) reuses its longest
  run of cached blocks, never its last token (`KVCacheManager.get_computed_blocks`). A freed
  block keeps its hash and joins the back of the free queue; an allocation takes blocks from the
  front and only then evicts what they cached (LRU). A request's blocks are freed last block
  first, so that a prefix's tail is evicted before its head (`SingleTypeKVCacheManager.free`).
- Scheduling, every step (`vllm/v1/core/sched/scheduler.py`, `Scheduler.schedule`): within
  `--max-num-batched-tokens`, first the running requests in order (a decode is one token, an
  unfinished prefill its next chunk), then, if nothing was preempted, the waiting ones in order
  while fewer than `--max-num-seqs` run, each prefilling a chunk after its cached prefix. A
  waiting request that does not fit blocks the ones behind it (first come, first served).
- Preemption: when a running request's next blocks cannot be allocated, the last running request
  is preempted (blocks freed, back to the front of the waiting queue, its prompt and answer so
  far recomputed when it resumes, from whatever of them is still cached), until the allocation
  fits or the request preempted itself.
- Time: a step sleeps `--slowdown` × (`--step-seconds` + `--token-seconds` × tokens computed +
  `--context-token-seconds` × tokens of context the decodes read), a roofline in miniature: a
  fixed part (weights read once per step, launch overheads), compute per token (prefill), and
  the decodes' attention reading their whole KV. The defaults are a 7-8B model on one GPU,
  rounded: a decode step of 8 requests at 3,000 tokens of context takes 32 ms, a 2,048-token
  prefill chunk 71 ms (~2,900 prompt tokens per 100 ms). The fixed 20 ms is the weights (16 GB)
  read at ~1.5 TB/s plus scheduling and sampling; the 0.5 µs per token of context is a model
  without grouped-query attention (512 KiB of KV a token) at ~1 TB/s, eight times what
  Llama-3-8B reads, so that long contexts weigh on a batch. Simulated time is real time (gevent
  sleeps).
- `/metrics` as vLLM V1 writes it (`vllm/v1/metrics/loggers.py`, `Scheduler.make_stats`):
  `vllm:num_requests_running` (requests running), `vllm:num_requests_waiting` (waiting,
  preempted ones included), `vllm:kv_cache_usage_perc` (1 − free blocks / blocks, cached but
  free blocks counting as free: `BlockPool.get_usage`), the counters
  `vllm:prefix_cache_queries` / `vllm:prefix_cache_hits` (prompt tokens looked up / found, at
  a request's first admission) and `vllm:num_preemptions`, each with `engine` and `model_name`.

Left out: speculative decoding, the sampler (a request always runs to `max_tokens`), priority
scheduling, sliding windows and hybrid models, KV transfer, the watermark and async scheduling.
A prompt plus `max_tokens` longer than the whole cache is refused `400`, as vLLM refuses a
request longer than `max_model_len`. A client that goes away, waiting or running, is dropped, as
vLLM aborts it.

With `--fail-status CODE` every chat request is answered with that HTTP status and vLLM's error
body, while `/metrics` and `/health` answer as usual: a backend that looks healthy but fails.

Besides vLLM's `/v1/chat/completions` (streamed), `/v1/models`, `/metrics` and `/health`, it
answers vLLM's `POST /tokenize` and `POST /v1/chat/completions/render` with the prompt's token ids
(vllm-router's `cache_aware` asks for them and routes on them), and:

    GET  /_sim/stats   {"admitted", "finished", "preemptions", "prefix_query_tokens",
                        "prefix_hit_tokens", "session_turns", "session_turn_hits",
                        "session_turn_evictions", "failed"}
    POST /_sim/reset   drop every request, empty the cache, zero the stats

A session turn is a request with history (more than two messages); it is a hit when, at its
first admission, the cache held its conversation so far (every message but the last two, the
previous turn's prompt) down to the last full block, and an eviction when it did not although
that last block had been cached here before (it was evicted, not sent elsewhere).
"""

if __name__ == "__main__":
    from gevent import monkey

    monkey.patch_all()

import argparse
import collections
import json
import socket
import sys
import zlib

import gevent
from gevent.event import Event
from gevent.pywsgi import WSGIHandler, WSGIServer
from gevent.queue import Queue

MODEL = "sim-model"
ANSWER_MARKER = "<assistant>"
END_MARKER = "<end>"


def render(messages) -> list:
    """A chat prompt's tokens (words), ending with the marker that opens the answer."""
    tokens = []
    for message in messages:
        tokens.append(f"<{message['role']}>")
        tokens += str(message.get("content") or "").split()
        tokens.append(END_MARKER)
    tokens.append(ANSWER_MARKER)
    return tokens


def token_ids(tokens) -> list:
    """Tokens as ids, the same in every engine (for `/tokenize` and the render endpoint)."""
    return [zlib.crc32(token.encode()) for token in tokens]


def answer_token(index: int) -> str:
    return f"a{index}"


def answer(count: int) -> str:
    """The text of an answer of `count` tokens, as the engine streams it."""
    return " ".join(answer_token(index) for index in range(count))


class Sequence:
    """One request in the engine: its tokens, how many are computed, the blocks it holds."""

    __slots__ = ("prompt", "max_tokens", "history", "output", "computed", "blocks",
                 "cached_blocks", "hashes", "preemptions", "tokens", "aborted")

    def __init__(self, messages, max_tokens):
        self.prompt = render(messages)
        self.max_tokens = max_tokens
        # The conversation so far: the previous turn's prompt, a prefix of this one.
        self.history = len(render(messages[:-2])) if len(messages) > 2 else None
        self.output = 0  # answer tokens sampled
        self.computed = 0  # tokens whose KV is computed, or being computed in this step
        self.blocks = []
        self.cached_blocks = 0  # how many of `blocks` are in the prefix cache
        self.hashes = []  # block hashes, as far as computed so far
        self.preemptions = 0
        self.tokens = Queue()  # one item per answer token; None ends the stream
        self.aborted = False

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + self.output

    def block_hash(self, index: int, size: int) -> int:
        """The hash of full block `index`: of its parent's hash and its tokens."""
        while len(self.hashes) <= index:
            start = len(self.hashes) * size
            end = start + size
            prompt_length = len(self.prompt)
            tokens = tuple(self.prompt[start:end]) + tuple(
                answer_token(i) for i in range(max(start, prompt_length) - prompt_length,
                                               end - prompt_length))
            self.hashes.append(hash((self.hashes[-1] if self.hashes else None, tokens)))
        return self.hashes[index]


class BlockPool:
    """The KV blocks, as vLLM V1's `BlockPool`: the free ones in eviction order (an allocation
    takes from the front, a freed block goes to the back) and the prefix cache, hash -> block.
    A cached block stays cached while free, until an allocation takes it."""

    def __init__(self, count: int):
        self.count = count
        self.free = collections.OrderedDict.fromkeys(range(count))
        self.refs = [0] * count
        self.hash_of = [None] * count
        self.by_hash = {}
        self.ever_cached = set()  # every hash cached here, to tell an eviction from a miss

    def usage(self) -> float:
        return 1.0 - len(self.free) / self.count

    def longest_hit(self, sequence: Sequence, size: int) -> list:
        """The cached blocks of `sequence`'s longest cached prefix, its last token left out
        (it must be computed again to sample the next one)."""
        hit = []
        for index in range((sequence.num_tokens - 1) // size):
            block = self.by_hash.get(sequence.block_hash(index, size))
            if block is None:
                break
            hit.append(block)
        return hit

    def evictable(self, blocks) -> int:
        """How many of `blocks` are free (cached only): taking them uses up free blocks."""
        return sum(1 for block in blocks if self.refs[block] == 0)

    def take(self, blocks) -> None:
        """Share cached blocks with one more request."""
        for block in blocks:
            if self.refs[block] == 0:
                del self.free[block]
            self.refs[block] += 1

    def allocate(self, count: int) -> list:
        """`count` blocks from the front of the free queue, evicting what they cached."""
        blocks = []
        for _ in range(count):
            block, _ = self.free.popitem(last=False)
            block_hash = self.hash_of[block]
            if block_hash is not None:
                if self.by_hash.get(block_hash) == block:
                    del self.by_hash[block_hash]
                self.hash_of[block] = None
            self.refs[block] = 1
            blocks.append(block)
        return blocks

    def release(self, blocks) -> None:
        """Free a request's blocks, last one first: a prefix's tail is evicted before its
        head."""
        for block in reversed(blocks):
            self.refs[block] -= 1
            if self.refs[block] == 0:
                self.free[block] = None

    def cache(self, block: int, block_hash: int) -> None:
        # A block whose hash is cached already (two requests computed it at once) is left out:
        # vLLM keeps both but only ever finds the first, and such twins are rare here.
        if block_hash not in self.by_hash:
            self.by_hash[block_hash] = block
            self.hash_of[block] = block_hash
            self.ever_cached.add(block_hash)


class Engine:
    """The scheduler loop: schedule a step, sleep its time, emit its tokens."""

    STATS = ("admitted", "finished", "preemptions", "prefix_query_tokens", "prefix_hit_tokens",
             "session_turns", "session_turn_hits", "session_turn_evictions", "failed")

    def __init__(self, args):
        self.args = args
        self.pool = BlockPool(args.kv_blocks)
        self.waiting = collections.deque()
        self.running = []
        self.wake = Event()
        self.stats = dict.fromkeys(self.STATS, 0)

    @property
    def max_model_len(self) -> int:
        return self.args.kv_blocks * self.args.block_size

    def submit(self, sequence: Sequence) -> None:
        self.waiting.append(sequence)
        self.wake.set()

    def reset(self) -> None:
        for sequence in [*self.waiting, *self.running]:
            sequence.aborted = True
            sequence.blocks = []  # they belong to the pool thrown away here
            sequence.tokens.put(None)
        self.waiting.clear()
        self.running = []
        self.pool = BlockPool(self.args.kv_blocks)
        self.stats = dict.fromkeys(self.STATS, 0)

    def run_forever(self) -> None:
        while True:
            self.drop_aborted()
            batch = self.schedule() if self.running or self.waiting else []
            if not batch:
                self.wake.clear()
                self.wake.wait()
                continue
            gevent.sleep(self.step_seconds(batch))
            self.emit(batch)

    def drop_aborted(self) -> None:
        for sequence in [s for s in self.running if s.aborted]:
            self.running.remove(sequence)
            self.pool.release(sequence.blocks)
            sequence.blocks = []
        if any(s.aborted for s in self.waiting):
            self.waiting = collections.deque(s for s in self.waiting if not s.aborted)

    def schedule(self) -> list:
        """This step's batch, [(sequence, tokens to compute)], as V1's `Scheduler.schedule`."""
        args = self.args
        budget = args.max_num_batched_tokens
        batch = []
        preemptions = self.stats["preemptions"]
        index = 0
        while index < len(self.running) and budget > 0:
            sequence = self.running[index]
            count = min(sequence.num_tokens - sequence.computed, budget)
            if not self.make_room(sequence, count):
                break
            batch.append((sequence, count))
            budget -= count
            index += 1
        # V1 admits nothing in a step that had to preempt: memory is short.
        while (self.stats["preemptions"] == preemptions and self.waiting and budget > 0
               and len(self.running) < args.max_num_seqs):
            sequence = self.waiting[0]
            hit = self.pool.longest_hit(sequence, args.block_size)
            count = min(sequence.num_tokens - len(hit) * args.block_size, budget)
            seen = self.history_was_cached(sequence)  # asked before it caches its own blocks
            if not self.allocate(sequence, count, hit):
                break
            self.waiting.popleft()
            self.running.append(sequence)
            if sequence.preemptions == 0:
                self.count_admission(sequence, len(hit) * args.block_size, seen)
            batch.append((sequence, count))
            budget -= count
        for sequence, count in batch:
            sequence.computed += count
        return batch

    def make_room(self, sequence: Sequence, count: int) -> bool:
        """Allocate for `count` more tokens of a running `sequence`, preempting the last running
        request until it fits; False when `sequence` itself had to go."""
        while not self.allocate(sequence, count):
            victim = self.running.pop()
            self.preempt(victim)
            if victim is sequence:
                return False
        return True

    def allocate(self, sequence: Sequence, count: int, hit=()) -> bool:
        """Give `sequence` the blocks for `count` more tokens after its computed ones (and, when
        it starts, after its cached prefix `hit`), and cache its blocks that are full once those
        are computed (V1 caches them when scheduled); False when the free blocks are too few."""
        size = self.args.block_size
        if hit:
            sequence.computed = len(hit) * size
        total = sequence.computed + count
        needed = -(-total // size) - len(sequence.blocks) - len(hit)
        if needed + self.pool.evictable(hit) > len(self.pool.free):
            if hit:
                sequence.computed = 0
            return False
        if hit:
            self.pool.take(hit)
            sequence.blocks = list(hit)
            sequence.cached_blocks = len(hit)
        sequence.blocks += self.pool.allocate(needed)
        full = min(total, sequence.num_tokens) // size
        for index in range(sequence.cached_blocks, full):
            self.pool.cache(sequence.blocks[index], sequence.block_hash(index, size))
        sequence.cached_blocks = max(sequence.cached_blocks, full)
        return True

    def preempt(self, sequence: Sequence) -> None:
        self.pool.release(sequence.blocks)
        sequence.blocks = []
        sequence.cached_blocks = 0
        sequence.computed = 0
        sequence.preemptions += 1
        self.waiting.appendleft(sequence)
        self.stats["preemptions"] += 1

    def history_blocks(self, sequence: Sequence) -> int:
        """How many full blocks of `sequence`'s conversation so far a hit must find."""
        return max(1, sequence.history // self.args.block_size)

    def history_was_cached(self, sequence: Sequence) -> bool:
        """Whether the last full block of `sequence`'s conversation so far was cached here once
        (its previous turn ran here)."""
        return sequence.history is not None and sequence.block_hash(
            self.history_blocks(sequence) - 1, self.args.block_size) in self.pool.ever_cached

    def count_admission(self, sequence: Sequence, hit_tokens: int, seen: bool) -> None:
        stats = self.stats
        stats["admitted"] += 1
        stats["prefix_query_tokens"] += sequence.num_tokens
        stats["prefix_hit_tokens"] += hit_tokens
        if sequence.history is not None:
            stats["session_turns"] += 1
            if hit_tokens >= self.history_blocks(sequence) * self.args.block_size:
                stats["session_turn_hits"] += 1
            elif seen:  # cached here once, evicted since
                stats["session_turn_evictions"] += 1

    def step_seconds(self, batch) -> float:
        args = self.args
        computed = sum(count for _, count in batch)
        # A decode (one token) reads its whole context; a prefill chunk's attention is part of
        # its compute, counted per token.
        context = sum(sequence.computed for sequence, count in batch if count == 1)
        return args.slowdown * (args.step_seconds + args.token_seconds * computed
                                + args.context_token_seconds * context)

    def emit(self, batch) -> None:
        """After the step: every sequence whose tokens are all computed samples one more;
        those at `max_tokens` finish and free their blocks."""
        for sequence, _ in batch:
            if sequence.aborted or sequence.computed < sequence.num_tokens:
                continue  # gone (dropped before the next step), or a prefill chunk short
            sequence.output += 1
            sequence.tokens.put(1)
            if sequence.output >= sequence.max_tokens:
                self.running.remove(sequence)
                self.pool.release(sequence.blocks)
                sequence.blocks = []
                sequence.tokens.put(None)
                self.stats["finished"] += 1


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


def error_body(status: int, kind: str, message: str) -> dict:
    """vLLM's error document."""
    return {"object": "error", "message": message, "type": kind, "param": None, "code": status}


METRICS = (  # name, vLLM's help text, type, the figure
    ("vllm:num_requests_running", "Number of requests in model execution batches.", "gauge",
     lambda engine: len(engine.running)),
    ("vllm:num_requests_waiting", "Number of requests waiting to be processed.", "gauge",
     lambda engine: len(engine.waiting)),
    ("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", "gauge",
     lambda engine: engine.pool.usage()),
    ("vllm:num_preemptions", "Cumulative number of preemption from the engine.", "counter",
     lambda engine: engine.stats["preemptions"]),
    ("vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.",
     "counter", lambda engine: engine.stats["prefix_query_tokens"]),
    ("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.",
     "counter", lambda engine: engine.stats["prefix_hit_tokens"]),
)


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
                {"id": MODEL, "object": "model", "owned_by": "vllm",
                 "max_model_len": engine.max_model_len}]})
        if path in ("/v1/chat/completions/render", "/tokenize") and method == "POST":
            return self.tokenize(start_response, path, json.loads(body))
        if path == "/_sim/stats":
            return self.respond(start_response, "200 OK", engine.stats)
        if path == "/_sim/reset" and method == "POST":
            engine.reset()
            return self.respond(start_response, "200 OK", engine.stats)
        return self.respond(start_response, "404 Not Found", {"detail": "Not Found"})

    def tokenize(self, start_response, path, request):
        """vLLM's prompt token ids, as its chat render endpoint (a `GenerateRequest`) or
        `/tokenize` answers them: vllm-router's `cache_aware` routes on them."""
        messages = request.get("messages")
        tokens = token_ids(render(messages) if messages else str(request.get("prompt")).split())
        if path == "/tokenize":
            return self.respond(start_response, "200 OK", {
                "count": len(tokens), "max_model_len": self.engine.max_model_len,
                "tokens": tokens, "token_strs": None})
        return self.respond(start_response, "200 OK", {
            "request_id": "render-sim", "token_ids": tokens, "model": MODEL,
            "sampling_params": {"max_tokens": request.get("max_tokens")}})

    def metrics(self) -> str:
        """As prometheus-client writes vLLM's: labels sorted, counters with `_total`."""
        labels = f'{{engine="0",model_name="{MODEL}"}}'
        lines = []
        for name, help_text, kind, figure in METRICS:
            sample = name + ("_total" if kind == "counter" else "")
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}",
                      f"{sample}{labels} {float(figure(self.engine))!r}"]
        return "\n".join(lines) + "\n"

    def chat(self, environ, start_response, request):
        engine = self.engine
        fail_status = engine.args.fail_status
        if fail_status:
            engine.stats["failed"] += 1
            return self.respond(start_response, f"{fail_status} Simulated Failure", error_body(
                fail_status, "InternalServerError", "simulated engine failure"))
        sequence = Sequence(request["messages"], int(request.get("max_tokens") or 16))
        length = len(sequence.prompt) + sequence.max_tokens
        if length > engine.max_model_len:
            return self.respond(start_response, "400 Bad Request", error_body(
                400, "BadRequestError", f"This model's maximum context length is "
                f"{engine.max_model_len} tokens. However, you requested {length} tokens "
                f"({len(sequence.prompt)} in the messages, {sequence.max_tokens} in the "
                "completion)."))
        watcher = gevent.spawn(watch_client, environ["sim.socket"], sequence)
        engine.submit(sequence)
        start_response("200 OK", [("Content-Type", "text/event-stream; charset=utf-8")])
        return self.stream(sequence, watcher)

    @staticmethod
    def stream(sequence: Sequence, watcher):
        head = '{"id":"chatcmpl-sim","object":"chat.completion.chunk","model":"%s",' % MODEL
        try:
            index = 0
            while sequence.tokens.get() is not None:
                yield (f'data: {head}"choices":[{{"index":0,"delta":{{"content":'
                       f'"{answer_token(index)} "}},"finish_reason":null}}]}}\n\n').encode()
                index += 1
            if not sequence.aborted:
                yield b"data: [DONE]\n\n"
        finally:
            # Wait for the watcher to be gone: still in its recv, it would make the next
            # request's read on this kept-alive connection fail (ConcurrentObjectUseError).
            watcher.kill()
            sequence.aborted = True


def parse_args(argv=None):
    """The engine's settings (`bench.fleet_sim` reads its defaults here too)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--max-num-seqs", type=int, default=8, help="most requests running")
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048,
                        help="tokens computed per step (vLLM's default for its OpenAI server "
                             "on A100-class GPUs)")
    parser.add_argument("--kv-blocks", type=int, default=8192, help="KV cache size in blocks")
    parser.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    parser.add_argument("--slowdown", type=float, default=1.0, help="every step this much slower")
    parser.add_argument("--step-seconds", type=float, default=0.02, help="a step's fixed part")
    parser.add_argument("--token-seconds", type=float, default=25e-6,
                        help="per token computed (prefill)")
    parser.add_argument("--context-token-seconds", type=float, default=0.5e-6,
                        help="per token of context a decode reads")
    parser.add_argument("--fail-status", type=int, default=0,
                        help="answer every chat request with this HTTP status (0: never)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    engine = Engine(args)
    gevent.spawn(engine.run_forever)
    server = WSGIServer((args.host, args.port), App(engine), handler_class=Handler, backlog=1024,
                        log=None)
    print(f"batching backend listening on http://{args.host}:{args.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
