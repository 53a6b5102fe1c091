"""A fake vLLM backend for benchmarks: fast enough never to be what is measured.

    python -m bench.fake_backend [--ports N] [--processes P] [--tokens T] [--token-delay S]

aiohttp's low-level server on uvloop, answering from bodies built once at start-up. It listens on
N loopback ports (port 0: the kernel picks them), and P processes share those listening sockets.
Once serving it prints one JSON line to stdout: `{"ports": [...]}`.

    GET  /metrics                 the real 88 KB two-engine vLLM body (tests/fixtures)
    POST /v1/...                  a chat completion; with `"stream": true` in the body an SSE
                                  stream of T content events, S seconds apart (headers at once),
                                  and a usage event when the body asks for it
    GET  /_bench/stats            connections accepted, /v1 requests and /metrics polls, summed
                                  over every process and port since start

A request may override T and S with `X-Bench-Tokens` and `X-Bench-Token-Delay` headers (the
forwarder relays them), so one backend serves every scenario.
"""

import argparse
import asyncio
import json
import multiprocessing
import multiprocessing.connection
import os
import socket
import sys
from pathlib import Path

import uvloop
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
METRICS_FIXTURE = "metrics_v0.11.0_V1_dp2_single-apiserver_harness.prom"
CHAT_FIXTURE = "chat_completion_nonstream_v0.11_reconstructed.json"

METRICS_BODY = (FIXTURES / METRICS_FIXTURE).read_bytes()
CHAT_BODY = (FIXTURES / CHAT_FIXTURE).read_bytes()
_HEAD = ('{"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1764244800,'
         '"model":"meta-llama/Llama-3.1-8B-Instruct","choices":[{"index":0,')
ROLE_EVENT = ("data: " + _HEAD + '"delta":{"role":"assistant","content":""},"logprobs":null,'
              '"finish_reason":null}]}\n\n').encode()
TOKEN_EVENT = ("data: " + _HEAD + '"delta":{"content":" tok"},"logprobs":null,'
               '"finish_reason":null,"token_ids":null}]}\n\n').encode()
USAGE_EVENT = (b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk",'
               b'"created":1764244800,"model":"meta-llama/Llama-3.1-8B-Instruct","choices":[],'
               b'"usage":{"prompt_tokens":12,"total_tokens":62,"completion_tokens":50}}\n\n')
DONE_EVENT = b"data: [DONE]\n\n"
SSE_TYPE = "text/event-stream"


class Counters:
    """Shared-memory counters, summed across the server processes."""

    def __init__(self):
        self.connections = multiprocessing.RawValue("q", 0)
        self.requests = multiprocessing.RawValue("q", 0)
        self.metrics = multiprocessing.RawValue("q", 0)
        self.lock = multiprocessing.Lock()

    def add(self, counter) -> None:
        with self.lock:
            counter.value += 1

    def snapshot(self) -> dict:
        return {"connections": self.connections.value, "requests": self.requests.value,
                "metrics": self.metrics.value}


class CountingServer(web.Server):
    """aiohttp's server, counting the TCP connections it accepts (one protocol per connection):
    how the benchmark sees whether the forwarder reuses its upstream connections."""

    def __init__(self, handler, counters: Counters):
        super().__init__(handler)
        self.counters = counters

    def __call__(self) -> RequestHandler:
        self.counters.add(self.counters.connections)
        return super().__call__()


def make_handler(counters: Counters, tokens: int, token_delay: float):
    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        path = request.path
        if path == "/metrics":
            counters.add(counters.metrics)
            return web.Response(body=METRICS_BODY,
                                content_type="text/plain", charset="utf-8")
        if path == "/_bench/stats":
            return web.json_response(counters.snapshot())
        if not path.startswith("/v1/"):
            return web.Response(status=404)
        counters.add(counters.requests)
        body = await request.read()
        if b'"stream":true' not in body.replace(b" ", b""):
            return web.Response(body=CHAT_BODY, content_type="application/json")
        count = int(request.headers.get("X-Bench-Tokens", tokens))
        delay = float(request.headers.get("X-Bench-Token-Delay", token_delay))
        response = web.StreamResponse(headers={"Content-Type": SSE_TYPE})
        await response.prepare(request)
        await response.write(ROLE_EVENT)
        for _ in range(count):
            if delay:
                await asyncio.sleep(delay)
            await response.write(TOKEN_EVENT)
        if b'"include_usage":true' in body.replace(b" ", b""):
            await response.write(USAGE_EVENT)
        await response.write(DONE_EVENT)
        await response.write_eof()
        return response

    return handle


def serve(sockets, counters: Counters, tokens: int, token_delay: float, ready) -> None:
    async def main():
        server = CountingServer(make_handler(counters, tokens, token_delay), counters)
        runner = web.ServerRunner(server, access_log=None, handle_signals=True)
        await runner.setup()
        for sock in sockets:
            await web.SockSite(runner, sock, backlog=4096).start()
        ready.set()
        await asyncio.Event().wait()

    uvloop.run(main())


def listening_sockets(count: int, host: str):
    sockets = []
    for _ in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, 0))
        sock.listen(4096)
        sock.setblocking(False)
        sockets.append(sock)
    return sockets


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--ports", type=int, default=1)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=50)
    parser.add_argument("--token-delay", type=float, default=0.02)
    args = parser.parse_args(argv)

    sockets = listening_sockets(args.ports, args.host)
    counters = Counters()
    context = multiprocessing.get_context("fork")
    readies = []
    for _ in range(args.processes):
        ready = context.Event()
        context.Process(target=serve, args=(sockets, counters, args.tokens, args.token_delay,
                                            ready), daemon=True).start()
        readies.append(ready)
    for ready in readies:
        ready.wait()
    print(json.dumps({"ports": [s.getsockname()[1] for s in sockets], "pid": os.getpid()}),
          flush=True)
    try:
        multiprocessing.connection.wait([p.sentinel for p in multiprocessing.active_children()])
    except KeyboardInterrupt:
        pass
    sys.exit(1)


if __name__ == "__main__":
    main()
