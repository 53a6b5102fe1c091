"""The forwarder beside a direct connection to the same backend, measured in one run.

    python bench/run.py [--quick] [--no-pin] [--only NAME ...]

Starts the fake backend (`bench/fake_backend.py`) and the forwarder as an operator does
(gunicorn with the shipped `gunicorn.conf.py`, on loopback), runs each scenario once through the
forwarder and once straight to the backend, and prints a markdown table. On a machine with two
or more cores the forwarder is pinned to core 0 and the backend and this load generator to core
1 (taskset / sched_setaffinity), so the load generator never takes the forwarder's CPU; the
many-streams scenario runs the shipped configuration unpinned, one worker per core.
"""

import argparse
import asyncio
import datetime
import functools
import json
import math
import os
import platform
import re
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import uvloop

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from bench import load  # noqa: E402  (needs the path above)
from tests.harness import stop_process  # noqa: E402

CLOCK_TICK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


# --- processes --------------------------------------------------------------------------------

def _spawn(command, log_path, env=None, cpus=None, stdout=None):
    if cpus is not None:
        command = ["taskset", "-c", cpus, *command]
    with open(log_path, "ab") as log:
        return subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=stdout or log,
                                stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)


def _children(pid):
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def cpu_seconds(pid) -> float:
    """User + system CPU time of one process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICK


def rss_bytes(pid) -> int:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_SIZE


class Backend:
    """`bench/fake_backend.py` in its own process group."""

    def __init__(self, workdir, ports=1, processes=1, cpus=None):
        command = [sys.executable, "-m", "bench.fake_backend", "--ports", str(ports),
                   "--processes", str(processes)]
        self.proc = _spawn(command, workdir / "backend.log", cpus=cpus, stdout=subprocess.PIPE)
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit("fake backend did not start:\n"
                             + (workdir / "backend.log").read_text()[-2000:])
        self.ports = json.loads(line)["ports"]
        self.url = f"http://127.0.0.1:{self.ports[0]}"

    def stats(self) -> dict:
        with socket.create_connection(("127.0.0.1", self.ports[0])) as sock:
            sock.sendall(b"GET /_bench/stats HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        return json.loads(data.split(b"\r\n\r\n", 1)[1])

    def stop(self):
        stop_process(self.proc)


def _answers_chat(port) -> bool:
    """A chat request to the server on `port` is answered 200."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            body = load.CHAT_BODY
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: f\r\n"
                         b"Content-Type: application/json\r\nConnection: close\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            return sock.recv(12).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Forwarder:
    """gunicorn with the shipped gunicorn.conf.py, bound to loopback."""

    def __init__(self, workdir, backend_ports, workers=1, env=None, cpus=None):
        self.dir = Path(tempfile.mkdtemp(prefix="forwarder-", dir=workdir))
        ip_file = self.dir / "ip.txt"
        ip_file.write_text("".join(f"127.0.0.1:{port}\n" for port in backend_ports))
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        environment = dict(os.environ, IP_LIST_FILE=str(ip_file), **(env or {}))
        command = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py",
                   "forwarder.wsgi:app", "--bind", f"127.0.0.1:{self.port}",
                   "--workers", str(workers)]
        self.log = self.dir / "forwarder.log"
        self.proc = _spawn(command, self.log, env=environment, cpus=cpus)
        self.workers = []
        self._wait_ready(workers)

    def _wait_ready(self, workers):
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit("forwarder exited:\n" + self.log.read_text()[-3000:])
            self.workers = _children(self.proc.pid)
            if len(self.workers) == workers and self._answers():
                return
            time.sleep(0.1)
        raise SystemExit("forwarder not ready in 30 s:\n" + self.log.read_text()[-3000:])

    def _answers(self) -> bool:
        """A chat request relayed with 200: a worker is up and has seen the backend healthy."""
        return _answers_chat(self.port)

    def cpu_seconds(self) -> float:
        return sum(cpu_seconds(pid) for pid in self.workers)

    def rss_bytes(self) -> int:
        return sum(rss_bytes(pid) for pid in [self.proc.pid, *self.workers])

    def pause(self):
        for pid in self.workers:
            os.kill(pid, signal.SIGSTOP)

    def resume(self):
        for pid in self.workers:
            os.kill(pid, signal.SIGCONT)

    def stop(self):
        stop_process(self.proc, sig=signal.SIGINT)


class FloorServer:
    """Flask answering by itself on gunicorn's gevent worker (`bench/stack_floor.py`)."""

    def __init__(self, workdir, cpus=None):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / "floor.log"
        command = [sys.executable, "-m", "gunicorn", "-k", "gevent", "--workers", "1",
                   "--bind", f"127.0.0.1:{self.port}", "--no-control-socket",
                   "bench.stack_floor:app"]
        self.proc = _spawn(command, self.log, cpus=cpus)
        deadline = time.monotonic() + 30
        while not _answers_chat(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("floor server not ready:\n" + self.log.read_text()[-3000:])
            time.sleep(0.1)
        self.workers = _children(self.proc.pid)

    def cpu_seconds(self) -> float:
        return sum(cpu_seconds(pid) for pid in self.workers)

    def stop(self):
        stop_process(self.proc, sig=signal.SIGINT)


def floor_client_cpu(url, count, cpus=None) -> float:
    """Client CPU seconds of one requests exchange with `url` (`bench/stack_floor.py`)."""
    command = [sys.executable, "-m", "bench.stack_floor", url, str(count)]
    if cpus is not None:
        command = ["taskset", "-c", cpus, *command]
    output = subprocess.run(command, cwd=REPO_ROOT, check=True, capture_output=True).stdout
    return json.loads(output)["cpu_us_per_request"] / 1e6


# --- the table --------------------------------------------------------------------------------

class Table:
    def __init__(self):
        self.rows = []

    def add(self, scenario, figure, forwarder, direct=None, unit="", ratio=True, note=""):
        self.rows.append((scenario, figure, forwarder, direct, unit, ratio, note))

    @staticmethod
    def _fmt(value, unit):
        if value is None:
            return "–"
        if isinstance(value, str):
            return value
        if isinstance(value, int):
            return f"{value:,}{unit}"
        digits = 0 if abs(value) >= 100 else 1 if abs(value) >= 10 else 2
        if unit in (" ms",) and abs(value) < 10:
            digits = 3 if abs(value) < 1 else 2
        return f"{value:,.{digits}f}{unit}"

    def markdown(self) -> str:
        lines = ["| scenario | figure | forwarder | direct | forwarder / direct | note |",
                 "| --- | --- | --- | --- | --- | --- |"]
        for scenario, figure, forwarder, direct, unit, ratio, note in self.rows:
            shown_ratio = "–"
            if ratio and isinstance(forwarder, (int, float)) and isinstance(direct, (int, float)) \
                    and direct:
                shown_ratio = f"{forwarder / direct:.2f}"
            lines.append(f"| {scenario} | {figure} | {self._fmt(forwarder, unit)} | "
                         f"{self._fmt(direct, unit)} | {shown_ratio} | {note} |")
        return "\n".join(lines)


def ms(seconds):
    return seconds * 1000.0


# --- scenarios --------------------------------------------------------------------------------

# Scenario 0 takes turns in this many blocks.
SINGLE_BLOCKS = 8


def scenario_single(table, workdir, quick, pins):
    """One request at a time: the forwarder's added latency and time to first event, its CPU per
    request, and the stack's floor (`bench/stack_floor.py`). The forwarder, the direct
    connection and the floor take turns in short blocks, so that all of them meet the same
    machine: its speed drifts by tens of percent from minute to minute here."""
    count = 400 if quick else 2000
    per_block = count // SINGLE_BLOCKS
    count = per_block * SINGLE_BLOCKS
    backend = Backend(workdir, cpus=pins.backend)
    forwarder = floor = None
    direct, relayed = load.Tally(), load.Tally()
    direct_streams, relayed_streams = load.StreamTally(), load.StreamTally()
    cpu = flask_cpu = requests_cpu = 0.0
    try:
        forwarder = Forwarder(workdir, backend.ports, cpus=pins.forwarder)
        floor = FloorServer(workdir, cpus=pins.forwarder)
        for server in (forwarder, floor):
            asyncio.run(load.sequential(server.url, 100))
        for _ in range(SINGLE_BLOCKS):
            direct.absorb(asyncio.run(load.sequential(backend.url, per_block)))
            cpu_before = forwarder.cpu_seconds()
            relayed.absorb(asyncio.run(load.sequential(forwarder.url, per_block)))
            cpu += forwarder.cpu_seconds() - cpu_before
            cpu_before = floor.cpu_seconds()
            asyncio.run(load.sequential(floor.url, per_block))
            flask_cpu += floor.cpu_seconds() - cpu_before
            requests_cpu += floor_client_cpu(backend.url, per_block, cpus=pins.forwarder) \
                * per_block
            direct_streams.absorb(asyncio.run(load.sequential_streams(backend.url, per_block)))
            relayed_streams.absorb(
                asyncio.run(load.sequential_streams(forwarder.url, per_block)))
    finally:
        for server in (forwarder, floor):
            if server:
                server.stop()
        backend.stop()
    cpu, flask_cpu, requests_cpu = cpu / count, flask_cpu / count, requests_cpu / count
    name = f"0. one at a time ({count} requests)"
    d50 = ms(load.percentile(direct.latencies, 0.5))
    f50 = ms(load.percentile(relayed.latencies, 0.5))
    table.add(name, "latency p50", f50, d50, " ms", note=f"added {f50 - d50:.3f} ms")
    d50 = ms(load.percentile(direct_streams.first_event, 0.5))
    f50 = ms(load.percentile(relayed_streams.first_event, 0.5))
    table.add(name, "time to first event p50", f50, d50, " ms", note=f"added {f50 - d50:.3f} ms")
    table.add(name, "worker CPU per request", cpu * 1e6, None, " µs", ratio=False,
              note=f"{(cpu - flask_cpu - requests_cpu) * 1e6:,.0f} µs over the stack's floor")
    table.add(name, "floor: Flask answering by itself on gunicorn's gevent worker, CPU",
              flask_cpu * 1e6, None, " µs", ratio=False, note="bench/stack_floor.py")
    table.add(name, "floor: one exchange through requests (client CPU)", requests_cpu * 1e6,
              None, " µs", ratio=False,
              note=f"floor, the sum: {(flask_cpu + requests_cpu) * 1e6:,.0f} µs")
    table.add(name, "errors", relayed.errors + relayed_streams.incomplete,
              direct.errors + direct_streams.incomplete, ratio=False)


def scenario_throughput(table, workdir, quick, pins):
    """1. Non-streaming chat at concurrency 64."""
    seconds = 5 if quick else 20
    backend = Backend(workdir, cpus=pins.backend)
    forwarder = Forwarder(workdir, backend.ports, cpus=pins.forwarder)
    try:
        direct, direct_wall = asyncio.run(load.closed_loop(backend.url, 64, seconds))
        connections_before = backend.stats()["connections"]
        cpu_before = forwarder.cpu_seconds()
        relayed, relayed_wall = asyncio.run(load.closed_loop(forwarder.url, 64, seconds))
        cpu = forwarder.cpu_seconds() - cpu_before
        upstream_connections = backend.stats()["connections"] - connections_before - 1
    finally:
        forwarder.stop()
        backend.stop()
    name = "1. non-streaming, concurrency 64"
    answered = len(relayed.latencies)
    table.add(name, "requests/s", answered / relayed_wall, len(direct.latencies) / direct_wall)
    for label, fraction in (("p50", 0.5), ("p99", 0.99)):
        table.add(name, f"latency {label}", ms(load.percentile(relayed.latencies, fraction)),
                  ms(load.percentile(direct.latencies, fraction)), " ms")
    table.add(name, "worker CPU per request", cpu / max(answered, 1) * 1e6, None, " µs",
              ratio=False, note=f"{cpu / relayed_wall:.0%} of a core")
    table.add(name, "new upstream connections", upstream_connections, None, ratio=False,
              note=f"for {answered:,} requests")
    table.add(name, "errors", relayed.errors, direct.errors, ratio=False)


def scenario_streams(table, workdir, quick, pins):
    """2. 256 concurrent streams of 50 tokens 20 ms apart."""
    rounds = 3 if quick else 10
    backend = Backend(workdir, cpus=pins.backend)
    forwarder = Forwarder(workdir, backend.ports, cpus=pins.forwarder)
    try:
        direct, direct_wall = asyncio.run(
            load.concurrent_streams(backend.url, 256, rounds, 50, 0.02, ramp_seconds=0.5))
        cpu_before = forwarder.cpu_seconds()
        relayed, relayed_wall = asyncio.run(
            load.concurrent_streams(forwarder.url, 256, rounds, 50, 0.02, ramp_seconds=0.5))
        cpu = forwarder.cpu_seconds() - cpu_before
    finally:
        forwarder.stop()
        backend.stop()
    name = f"2. 256 streams × 50 tokens @ 20 ms ({rounds} rounds)"
    for label, fraction in (("p50", 0.5), ("p99", 0.99)):
        f = ms(load.percentile(relayed.first_event, fraction))
        d = ms(load.percentile(direct.first_event, fraction))
        table.add(name, f"time to first event {label}", f, d, " ms", note=f"added {f - d:.2f} ms")
    for label, fraction in (("p50", 0.5), ("p99", 0.99)):
        table.add(name, f"inter-chunk gap {label}", ms(load.percentile(relayed.gaps, fraction)),
                  ms(load.percentile(direct.gaps, fraction)), " ms")
    table.add(name, "events/s", relayed.events / relayed_wall, direct.events / direct_wall,
              note=f"worker {cpu / relayed_wall:.0%} of a core, "
                   f"{cpu / max(relayed.events, 1) * 1e6:.0f} µs per event")
    table.add(name, "incomplete streams", relayed.incomplete, direct.incomplete, ratio=False)


def scenario_many_streams(table, workdir, quick, pins, streams=2000):
    """3. Many open slow streams (a token a second) on the shipped configuration."""
    # Started over a ramp (at most 400 a second), and long enough that all are open at once even
    # while starting them is slow: this measures holding them, not the rate of starting them.
    ramp = max(5 if quick else 10, streams / 400)
    tokens = int(ramp) + (15 if quick else 50)
    workers = os.cpu_count() or 1
    backend = Backend(workdir, cpus=pins.backend)
    forwarder = Forwarder(workdir, backend.ports, workers=workers)
    try:
        idle_rss = forwarder.rss_bytes()
        direct, _ = asyncio.run(
            load.concurrent_streams(backend.url, streams, 1, tokens, 1.0, ramp_seconds=ramp))
        peak = [idle_rss]

        async def measured():
            run = asyncio.ensure_future(
                load.concurrent_streams(forwarder.url, streams, 1, tokens, 1.0, ramp_seconds=ramp))
            while not run.done():
                peak[0] = max(peak[0], forwarder.rss_bytes())
                await asyncio.sleep(0.25)
            return run.result()

        cpu_before = forwarder.cpu_seconds()
        relayed, _ = asyncio.run(measured())
        cpu = forwarder.cpu_seconds() - cpu_before
    finally:
        forwarder.stop()
        backend.stop()
    name = f"3. {streams:,} open streams, a token a second ({workers} workers)"
    table.add(name, "streams open at once (peak)", relayed.peak_open, direct.peak_open,
              ratio=False)
    table.add(name, "forwarder RSS, all processes (peak)", peak[0] / 2**20, None, " MiB",
              ratio=False, note=f"idle {idle_rss / 2**20:.0f} MiB")
    table.add(name, "memory per open stream", (peak[0] - idle_rss) / max(relayed.peak_open, 1)
              / 1024, None, " KiB", ratio=False)
    table.add(name, "workers' CPU per relayed event", cpu / max(relayed.events, 1) * 1e6, None,
              " µs", ratio=False, note="starting the streams included")
    table.add(name, "incomplete streams", relayed.incomplete, direct.incomplete, ratio=False)


def _alternating(polling, quiet, count) -> "tuple[load.Tally, load.Tally]":
    """`count` requests one at a time through each forwarder, in alternating blocks, so that
    both meet the same machine (its speed drifts by tens of percent from minute to minute here).
    While the quiet one is measured the polling one is stopped (SIGSTOP), so that only one of
    them ever has the core. Each first gets enough requests to have a connection open to nearly
    every backend: opening them is not what is measured."""
    for forwarder in (polling, quiet):
        asyncio.run(load.sequential(forwarder.url, WARM_UP_REQUESTS))
    tallies = (load.Tally(), load.Tally())
    for _ in range(count // ALTERNATION_BLOCK):
        for forwarder, tally in zip((polling, quiet), tallies):
            if forwarder is quiet:
                polling.pause()
            try:
                tally.absorb(asyncio.run(load.sequential(forwarder.url, ALTERNATION_BLOCK)))
            finally:
                if forwarder is quiet:
                    polling.resume()
    return tallies


def _idle_polling(forwarder, backend, seconds) -> "tuple[float, float, int]":
    """Over `seconds` of polling with nothing relayed, once every backend was polled: polls a
    second as the backends saw them, the forwarder's workers' CPU seconds a second, and how many
    connections they opened."""
    time.sleep(2)  # every backend polled at least once
    before = backend.stats()
    cpu_before = forwarder.cpu_seconds()
    time.sleep(seconds)
    share = (forwarder.cpu_seconds() - cpu_before) / seconds
    after = backend.stats()
    # Less the connection that asked for the stats.
    connections = after["connections"] - before["connections"] - 1
    return (after["metrics"] - before["metrics"]) / seconds, share, connections


# The workers of the instance whose polling CPU scenario 4 measures: the shipped one per core,
# at least two, so that the sharing of the polls is part of what is measured.
INSTANCE_WORKERS = max(2, os.cpu_count() or 1)
# Spread at random over 100 backends, 500 requests reach all but ~1 of them.
WARM_UP_REQUESTS = 500
ALTERNATION_BLOCK = 100


def scenario_polling(table, workdir, quick, pins):
    """4. 100 backends serving the 88 KB /metrics body, polled every second.

    What polling costs relayed requests is their latency beside that of an identical forwarder
    that is not polling (its first poll cycle over, the next an hour away), measured in
    alternating blocks in the same run; how often a poll held the hub for over 2 ms, which
    gevent's own monitor reports; and, for an instance of INSTANCE_WORKERS workers sharing the
    polls, the polls the backends see and the workers' CPU per backend per cycle."""
    idle_seconds = 5 if quick else 15
    count = 1500 if quick else 5000
    backend = Backend(workdir, ports=100, cpus=pins.backend)
    forwarder = quiet_forwarder = None
    try:
        forwarder = Forwarder(workdir, backend.ports, cpus=pins.forwarder,
                              env={"CHECK_INTERVAL_SECONDS": "1"})
        polls, polling_share, poll_connections = _idle_polling(forwarder, backend, idle_seconds)
        direct = asyncio.run(load.sequential(backend.url, count))
        quiet_forwarder = Forwarder(workdir, backend.ports, cpus=pins.forwarder,
                                    env={"CHECK_INTERVAL_SECONDS": "3600"})
        relayed, quiet = _alternating(forwarder, quiet_forwarder, count)
    finally:
        for started in (forwarder, quiet_forwarder):
            if started:
                started.stop()
    try:
        blocked = hub_blocks_while_polling(workdir, backend, idle_seconds, pins)
        instance = Forwarder(workdir, backend.ports, workers=INSTANCE_WORKERS,
                             cpus=pins.forwarder, env={"CHECK_INTERVAL_SECONDS": "1"})
        try:
            master_before = cpu_seconds(instance.proc.pid)
            instance_polls, instance_share, _ = _idle_polling(instance, backend, idle_seconds)
            master_share = (cpu_seconds(instance.proc.pid) - master_before) / idle_seconds
        finally:
            instance.stop()
    finally:
        backend.stop()
    name = "4. polling 100 backends × 88 KB every 1 s"
    table.add(name, "polls/s", polls, 100.0, ratio=False, note="target 100")
    table.add(name, "new connections for the polls", poll_connections, None, ratio=False,
              note=f"{polls * idle_seconds:,.0f} polls")
    table.add(name, "worker CPU share spent polling", f"{polling_share:.1%}", None, ratio=False,
              note=f"{polling_share / max(polls, 1) * 1e6:.0f} µs per poll")
    # Each backend is polled once a cycle (a second) whatever the number of workers.
    backends = len(backend.ports)
    table.add(name, f"polls/s, {INSTANCE_WORKERS} workers", instance_polls, 100.0, ratio=False,
              note=f"target 100, not {100 * INSTANCE_WORKERS}: one poll owner per backend")
    table.add(name, f"CPU per backend per cycle, {INSTANCE_WORKERS} workers together",
              instance_share / backends * 1e6, None, " µs", ratio=False,
              note=f"target ≤ 1,500 µs; the workers {instance_share:.1%} of a core, idle, "
                   f"{instance_share / max(instance_polls, 1) * 1e6:,.0f} µs per poll; "
                   f"gunicorn's master {master_share / backends * 1e6:.0f} µs more")
    for label, fraction in (("p50", 0.5), ("p99", 0.99), ("max", 1.0)):
        polling = ms(load.percentile(relayed.latencies, fraction))
        not_polling = ms(load.percentile(quiet.latencies, fraction))
        table.add(name, f"latency of requests relayed meanwhile, {label}", polling,
                  ms(load.percentile(direct.latencies, fraction)), " ms",
                  note=f"{not_polling:.2f} ms while not polling: polling adds "
                       f"{polling - not_polling:.2f} ms")
    table.add(name, f"hub held over {ms(MONITOR_BLOCKING_SECONDS):g} ms by a poll",
              blocked["polls"], None, ratio=False,
              note=f"gevent's blocking monitor, {idle_seconds} s of polling and relaying: "
                   f"{blocked['polls_in_kernel']} of them inside a socket system call; "
                   f"{blocked['other']} times by the relaying")
    table.add(name, "errors", relayed.errors + quiet.errors, direct.errors, ratio=False)


# Scenario 5's forwarders, from reading no host-wide sum per request to reading the most: (name,
# environment, the variants its CPU per request is compared with).
SHARED_TABLE_VARIANTS = (
    ("random", {"ROUTING_POLICY": "random"}, ()),
    # The same again: how far two identical forwarders differ here, the noise floor.
    ("random, again", {"ROUTING_POLICY": "random"}, ("random",)),
    # An in-flight weight summed over the workers' rows per candidate.
    ("least_loaded", {"ROUTING_POLICY": "least_loaded"}, ("random",)),
    # And the brake's: an in-flight count per candidate and the queue's length over the rows, a
    # limit so high that nothing ever waits.
    ("least_loaded + MAX_IN_FLIGHT_PER_BACKEND",
     {"ROUTING_POLICY": "least_loaded", "MAX_IN_FLIGHT_PER_BACKEND": "1000000"},
     ("random", "least_loaded")),
)
SHARED_TABLE_BACKENDS = 4


def _rounds(workdir, pins, variants, rounds, seconds, ports=1):
    """µs of one worker's CPU per request of each variant, a list of the rounds' figures each,
    and the errors: `variants` are (name, environment, references, run) where `run(url,
    seconds)` loads one forwarder and answers (requests served, errors). Rounds of one block
    each, so that every variant meets the same machine; every round starts its forwarders afresh
    (a process's own layout, hash seed and addresses move its CPU per request by a few percent
    for its whole life, more than the differences measured here), and each variant takes each
    place in the order of starting and of measuring equally often."""
    count = len(variants)
    backend = Backend(workdir, ports=ports, cpus=pins.backend)
    cpu = [[] for _ in variants]
    errors = 0
    try:
        for turn in range(rounds):
            order = [(turn + i) % count for i in range(count)]
            forwarders = {}
            try:
                for index in order:
                    forwarders[index] = Forwarder(workdir, backend.ports, cpus=pins.forwarder,
                                                  env=variants[index][1])
                for index in order:  # connections to every backend open, caches warm
                    variants[index][3](forwarders[index].url, 0.5)
                for index in order:
                    cpu_before = forwarders[index].cpu_seconds()
                    served, failed = variants[index][3](forwarders[index].url, seconds)
                    used = forwarders[index].cpu_seconds() - cpu_before
                    cpu[index].append(used / max(served, 1) * 1e6)
                    errors += failed
            finally:
                for forwarder in forwarders.values():
                    forwarder.stop()
    finally:
        backend.stop()
    return cpu, errors


def _report_rounds(table, name, variants, cpu, errors):
    """Each variant's mean CPU per request, its rounds' spread, and its mean difference ± the
    standard error of the rounds' differences against each of its references."""
    names = [variant[0] for variant in variants]
    rounds = len(cpu[0])
    for index, (variant, _, references, _) in enumerate(variants):
        note = f"rounds {min(cpu[index]):,.0f}–{max(cpu[index]):,.0f} µs"
        for reference in references:
            differences = [a - b for a, b in zip(cpu[index], cpu[names.index(reference)])]
            mean = statistics.mean(differences)
            base = statistics.mean(cpu[names.index(reference)])
            note += (f"; {mean:+,.0f} ± {statistics.stdev(differences) / math.sqrt(rounds):,.0f}"
                     f" µs ({mean / base:+.1%}) over {reference}")
        table.add(name, f"worker CPU per request, {variant}", statistics.mean(cpu[index]), None,
                  " µs", ratio=False, note=note)
    table.add(name, "errors", errors, None, ratio=False)


def _non_streaming(url, seconds):
    tally, _ = asyncio.run(load.closed_loop(url, 64, seconds))
    return len(tally.latencies), tally.errors


def _streaming(url, seconds, tokens=None):
    tally, _ = asyncio.run(load.closed_loop_streams(url, 64, seconds, tokens or METERING_TOKENS))
    return tally.complete, tally.incomplete


def _long_streaming(url, seconds):
    return _streaming(url, seconds, METERING_LONG_TOKENS)


def scenario_shared_table(table, workdir, quick, pins):
    """5. What reading the host table's in-flight sums costs a request: one worker's CPU per
    non-streaming request at concurrency 64 over 4 backends (four ports of one fake backend), for
    each routing variant of SHARED_TABLE_VARIANTS."""
    variants = [(*variant, _non_streaming) for variant in SHARED_TABLE_VARIANTS]
    rounds = len(variants) * (1 if quick else 3)
    seconds = 1.5 if quick else 4
    cpu, errors = _rounds(workdir, pins, variants, rounds, seconds, ports=SHARED_TABLE_BACKENDS)
    _report_rounds(table, f"5. shared table: {SHARED_TABLE_BACKENDS} backends, concurrency 64 "
                          f"({rounds} rounds, a {seconds} s block each)", variants, cpu, errors)


# Scenario 6's forwarders: token metering on and off, for non-streaming chat completions (their
# usage read from the answer's end) and for streams (usage asked for and its event taken out):
# short ones, where metering's cost per stream weighs most, and ones of a typical answer's length.
METERING_TOKENS = 16
METERING_LONG_TOKENS = 128
METERING_VARIANTS = (
    ("non-streaming, metering off", {"METER_TOKENS": "0"}, (), _non_streaming),
    ("non-streaming, metering on", {}, ("non-streaming, metering off",), _non_streaming),
    ("streaming, metering off", {"METER_TOKENS": "0"}, (), _streaming),
    ("streaming, metering on", {}, ("streaming, metering off",), _streaming),
    (f"streams of {METERING_LONG_TOKENS}, metering off", {"METER_TOKENS": "0"}, (),
     _long_streaming),
    (f"streams of {METERING_LONG_TOKENS}, metering on", {},
     (f"streams of {METERING_LONG_TOKENS}, metering off",), _long_streaming),
)


def scenario_metering(table, workdir, quick, pins):
    """6. What token metering costs a request: one worker's CPU per non-streaming chat
    completion, and per stream of METERING_TOKENS and of METERING_LONG_TOKENS events, at
    concurrency 64, with METER_TOKENS on and off in the same run."""
    rounds = 4 if quick else 12
    seconds = 1.5 if quick else 4
    cpu, errors = _rounds(workdir, pins, METERING_VARIANTS, rounds, seconds)
    _report_rounds(table, f"6. token metering, concurrency 64, streams of {METERING_TOKENS} "
                          f"events unless said ({rounds} rounds, a {seconds} s block each)",
                   METERING_VARIANTS, cpu, errors)


# gevent's monitor thread reports a greenlet that has run this long without yielding to the hub.
MONITOR_BLOCKING_SECONDS = 0.002


def hub_blocks_while_polling(workdir, backend, seconds, pins) -> dict:
    """How often, over `seconds` of polling the backends every second while relaying requests
    one at a time, one greenlet held a worker's hub for longer than MONITOR_BLOCKING_SECONDS:
    gevent's own monitor thread watches and logs each time with the greenlet's stack (its
    start-up, before the window, not counted). `{"polls": …, "polls_in_kernel": …, "other": …}`:
    those with the poller in the stack, how many of them were inside a socket call, and the
    rest (the relaying: a pause of the whole process lands in whatever runs)."""
    forwarder = Forwarder(workdir, backend.ports, cpus=pins.forwarder,
                          env={"CHECK_INTERVAL_SECONDS": "1",
                               "GEVENT_MONITOR_THREAD_ENABLE": "true",
                               "GEVENT_MAX_BLOCKING_TIME": str(MONITOR_BLOCKING_SECONDS)})
    try:
        time.sleep(2)  # its first cycles, and their one-time work, are over
        start = len(forwarder.log.read_bytes())
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            asyncio.run(load.sequential(forwarder.url, ALTERNATION_BLOCK))
        window = forwarder.log.read_bytes()[start:].decode("utf-8", "replace")
    finally:
        forwarder.stop()
    stacks = [report.split("Blocked Stack", 1)[-1].split("\nInfo:", 1)[0]
              for report in window.split(" appears to be blocked")[1:]]
    polls = [stack for stack in stacks if "forwarder/poller.py" in stack]
    # A report whose innermost frame is a socket call caught the process inside the kernel
    # (on this VM a `send` now and then takes milliseconds), not running Python.
    in_kernel = sum(re.findall(r'File "([^"]+)", line \d+, in (\w+)', stack)[-1][0]
                    .endswith("gevent/_socketcommon.py") for stack in polls)
    return {"polls": len(polls), "polls_in_kernel": in_kernel,
            "other": len(stacks) - len(polls)}


SCENARIOS = {
    "single": scenario_single,
    "throughput": scenario_throughput,
    "streams": scenario_streams,
    "many": scenario_many_streams,
    "polling": scenario_polling,
    "table": scenario_shared_table,
    "metering": scenario_metering,
}


class Pins:
    """Which cores the forwarder and the rest (backend, load generator) run on."""

    def __init__(self, enabled: bool):
        cores = sorted(os.sched_getaffinity(0))
        if enabled and len(cores) >= 2:
            self.forwarder, self.backend = str(cores[0]), str(cores[1])
            self.description = (f"forwarder pinned to core {cores[0]}, backend and load "
                                f"generator to core {cores[1]}")
        else:
            self.forwarder = self.backend = None
            self.description = "not pinned"

    def pin_self(self):
        if self.backend is not None:
            os.sched_setaffinity(0, {int(self.backend)})


def machine() -> str:
    model = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return (f"{os.cpu_count()} × {model}, Linux {platform.release()}, "
            f"Python {platform.python_version()}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs (under 3 minutes)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to cores")
    parser.add_argument("--only", nargs="+", choices=list(SCENARIOS), help="run only these")
    parser.add_argument("--streams", type=int, default=2000,
                        help="open streams in scenario 3 (10,000 needs `ulimit -n` of 20,000 "
                             "or more)")
    args = parser.parse_args(argv)

    # 2,000 streams need 2,000 sockets here, as many in the backend and twice that in the
    # forwarder: the children inherit this limit.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    pins = Pins(not args.no_pin)
    pins.pin_self()
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())

    scenarios = dict(SCENARIOS, many=functools.partial(scenario_many_streams,
                                                       streams=args.streams))
    table = Table()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="forwarder-bench-") as workdir:
        for name in args.only or SCENARIOS:
            scenarios[name](table, Path(workdir), args.quick, pins)
            print(f"[{time.monotonic() - started:.0f} s] {name} done", file=sys.stderr)
    print(f"{datetime.date.today()} · {machine()} · {pins.description} · "
          f"`python bench/run.py{' --quick' if args.quick else ''}` "
          f"({time.monotonic() - started:.0f} s)\n")
    print(table.markdown())


if __name__ == "__main__":
    main()
