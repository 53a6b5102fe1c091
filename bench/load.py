"""The load generator: aiohttp clients on uvloop, timing what a user of the forwarder would see.

Every function takes a base URL, so the same load runs against the forwarder and, in the same
benchmark run, straight against the backend. Latencies are in seconds.
"""

import asyncio
import time

import aiohttp

CHAT_PATH = "/v1/chat/completions"
CHAT_BODY = b'{"model":"llama-3.1-8b","messages":[{"role":"user","content":"Hello!"}]}'
STREAM_BODY = (b'{"model":"llama-3.1-8b","messages":[{"role":"user","content":"Hello!"}],'
               b'"stream":true}')
JSON = {"Content-Type": "application/json"}


def session(connections: int) -> aiohttp.ClientSession:
    """Keep-alive connections up to `connections`, no cookies, bodies left as sent."""
    connector = aiohttp.TCPConnector(limit=connections, limit_per_host=connections,
                                     force_close=False, keepalive_timeout=60, ttl_dns_cache=None)
    return aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar(),
                                 auto_decompress=False,
                                 timeout=aiohttp.ClientTimeout(total=None, sock_read=120))


def percentile(values, fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


class Tally:
    """Latencies of answered requests and a count of failed ones."""

    def __init__(self):
        self.latencies = []
        self.errors = 0

    def absorb(self, other: "Tally") -> None:
        """Add what `other` counted to this tally."""
        self.latencies += other.latencies
        self.errors += other.errors


async def _chat(client, url: str, tally: Tally) -> None:
    started = time.perf_counter()
    try:
        async with client.post(url, data=CHAT_BODY, headers=JSON) as response:
            await response.read()
            ok = response.status == 200
    except (aiohttp.ClientError, asyncio.TimeoutError):
        ok = False
    if ok:
        tally.latencies.append(time.perf_counter() - started)
    else:
        tally.errors += 1


async def sequential(base: str, count: int) -> Tally:
    """`count` non-streaming requests one after another on one kept-alive connection."""
    tally = Tally()
    async with session(1) as client:
        url = base + CHAT_PATH
        for _ in range(3):  # open the connection, warm the caches
            await _chat(client, url, Tally())
        for _ in range(count):
            await _chat(client, url, tally)
    return tally


async def closed_loop(base: str, concurrency: int, seconds: float) -> "tuple[Tally, float]":
    """`concurrency` clients each sending the next request as soon as the last is answered, for
    `seconds`; the tally and the measured wall time."""
    tally = Tally()
    async with session(concurrency) as client:
        url = base + CHAT_PATH
        await asyncio.gather(*(_chat(client, url, Tally()) for _ in range(concurrency)))
        deadline = time.perf_counter() + seconds

        async def client_loop():
            while time.perf_counter() < deadline:
                await _chat(client, url, tally)

        started = time.perf_counter()
        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
        return tally, time.perf_counter() - started


async def closed_loop_streams(base: str, concurrency: int, seconds: float,
                              tokens: int) -> "tuple[StreamTally, float]":
    """`concurrency` clients each starting the next stream of `tokens` events (no delay) as soon
    as the last has ended, for `seconds`; the tally and the measured wall time."""
    tally = StreamTally()
    async with session(concurrency) as client:
        url = base + CHAT_PATH
        deadline = time.perf_counter() + seconds

        async def client_loop():
            while time.perf_counter() < deadline:
                await stream(client, url, tally, tokens, 0)

        started = time.perf_counter()
        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
        return tally, time.perf_counter() - started


class StreamTally:
    """What clients of SSE streams saw."""

    def __init__(self):
        self.first_event = []  # seconds from sending the request to the first event
        self.gaps = []  # seconds between consecutive reads that brought events
        self.events = 0
        self.complete = 0
        self.incomplete = 0
        self.open = 0
        self.peak_open = 0

    def absorb(self, other: "StreamTally") -> None:
        """Add what `other` counted to this tally (of streams run after, not beside, its own)."""
        self.first_event += other.first_event
        self.gaps += other.gaps
        self.events += other.events
        self.complete += other.complete
        self.incomplete += other.incomplete
        self.peak_open = max(self.peak_open, other.peak_open)


async def stream(client, url: str, tally: StreamTally, tokens: int, delay: float) -> None:
    headers = {**JSON, "X-Bench-Tokens": str(tokens), "X-Bench-Token-Delay": str(delay)}
    started = time.perf_counter()
    last = None
    tail = b""
    counted = False
    try:
        async with client.post(url, data=STREAM_BODY, headers=headers) as response:
            if response.status != 200:
                tally.incomplete += 1
                return
            tally.open += 1
            tally.peak_open = max(tally.peak_open, tally.open)
            counted = True
            async for chunk in response.content.iter_any():
                now = time.perf_counter()
                events = chunk.count(b"\n\n")
                if events:
                    if last is None:
                        tally.first_event.append(now - started)
                    else:
                        tally.gaps.append(now - last)
                    last = now
                    tally.events += events
                tail = (tail + chunk)[-32:]
        if tail.endswith(b"data: [DONE]\n\n"):
            tally.complete += 1
        else:
            tally.incomplete += 1
    except (aiohttp.ClientError, asyncio.TimeoutError):
        tally.incomplete += 1
    finally:
        if counted:
            tally.open -= 1


async def sequential_streams(base: str, count: int) -> StreamTally:
    """`count` one-token streams one after another: time to first event, nothing else going on."""
    tally = StreamTally()
    async with session(1) as client:
        url = base + CHAT_PATH
        for _ in range(3):
            await stream(client, url, StreamTally(), 1, 0)
        for _ in range(count):
            await stream(client, url, tally, 1, 0)
    return tally


async def concurrent_streams(base: str, concurrency: int, rounds: int, tokens: int,
                             delay: float,
                             ramp_seconds: float = 0.0) -> "tuple[StreamTally, float]":
    """`concurrency` clients each running `rounds` streams back to back; clients start spread
    over `ramp_seconds` (a burst of thousands of connects overflows listen backlogs)."""
    tally = StreamTally()
    async with session(concurrency) as client:
        url = base + CHAT_PATH

        async def client_loop(index):
            if ramp_seconds:
                await asyncio.sleep(ramp_seconds * index / concurrency)
            for _ in range(rounds):
                await stream(client, url, tally, tokens, delay)

        started = time.perf_counter()
        await asyncio.gather(*(client_loop(i) for i in range(concurrency)))
        return tally, time.perf_counter() - started
