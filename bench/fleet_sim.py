"""Fleet simulation: routers side by side on one heterogeneous fleet of fake vLLM engines.

    pip install -r requirements.txt -r bench/requirements.txt
    python -m bench.fleet_sim --scenario issue-80 [--repeat 2]   # one scenario, about 3 minutes
    python -m bench.fleet_sim --scenario all                     # every scenario, ~20 minutes
    python -m bench.fleet_sim [--load 0.8] [--contenders ...]    # the default fleet, one table

It owns the fleet, the workload and the figures; the engines are `bench/batching_backend.py`,
which schedule as vLLM V1 does (KV blocks, prefix cache, chunked prefill, preemption). It starts
`--backends` engines, the first one `--slowdown` times slower, each with `--max-num-seqs` and
its KV budget (`--kv-blocks`: one figure for all, or one per backend, comma-separated), and runs
every contender in turn in front of that same fleet: the forwarder (gunicorn, as
`tests.harness.Forwarder` starts it, `CHECK_INTERVAL_SECONDS` from `--check-interval`) with a
`ROUTING_POLICY`, and the vLLM project's Rust router (`vllm-router`) with a policy. Between
contenders every engine is reset (queues dropped, prefix cache emptied). Clients never retry: a
`429` is a refusal. Tables go to stdout (markdown), progress to stderr.

The workload (`--seed` fixed, so every contender and every run gets the same one): open-loop
Poisson arrivals at `--load` of the fleet's estimated capacity for `--seconds`. `--session-share`
of the requests are the next turn of one of `--sessions` sessions (an agent, say): each has a
system prompt of its own of about `--system-tokens` tokens, and each turn's prompt is the
previous one's, its answer as the engine streamed it, and a new user message of about
`--user-tokens`; after `--turns` turns the session starts a new conversation with the same
system prompt. The rest are one-off prompts of `--one-off-tokens` tokens or a quarter to four
times that (log-uniform); with `--long-share`, that share of the requests are one-off prompts
`--long-factor` times longer. Every request asks for `--output-tokens` tokens, half to one and a
half times that (uniform). Tokens are the engines' (words, `batching_backend.render`).

The policies' table (without `--scenario`, and for `issue-*`, `kv-bound`, `load80-2workers`):
time to first token (p50, p99) of the answered requests, the share never answered within
`--ttft-timeout`, throughput (answered requests per second, first send to last token), the
session turns whose conversation so far was cached on the engine that got them (and those whose
previous turn ran there but whose prefix was evicted since), the share of prompt tokens found in
the prefix cache, the most requests ever waiting on one engine and its highest KV cache use
(`vllm:num_requests_waiting`, `vllm:kv_cache_usage_perc`, read every 100 ms) and the engines'
preemptions.

Scenarios (each sets its own fleet, load, contenders and table; other knobs apply to all):

- `issue-80`, `issue-100`: the issue's fleet (the defaults): four backends, one three times
  slower, 8 running each, a KV cache of 1,024 blocks (16,384 tokens) that fills as the batch
  fills, 1 s polls, 60 % of the requests in 16 sessions, at 80 % and 100 % of capacity.
- `kv-bound`: four backends of one speed, up to 32 running each, so that KV, not the batch,
  is the limit, and two of them with half the KV (1,024 and 512 blocks): 85 %.
- `overload`: 130 % of capacity, clients wait up to 60 s. The forwarder's `least_loaded` without
  the brake, with it (`MAX_IN_FLIGHT_PER_BACKEND` = `--max-num-seqs`, queue settings at their
  defaults) on one and on two workers; vLLM Router's `power_of_two` without a limit, with its
  limit (`--max-concurrent-requests` = all batch slots, `--queue-size 1000`,
  `--queue-timeout-secs 30`), and with that limit as a pure concurrency limit (its token bucket
  refilled at 1/s instead of once per slot per second). Goodput (first token within
  `--good-ttft`, per second of arrivals), refusals (`429`) within `--quick-refusal` and later,
  other failures, the longest wait of a refused request and of any request, p99 time to first
  token of what was served; then the load-control targets, checked.
- `load80-2workers`: the 80 % table for `least_loaded` and `affinity` on one and two workers and
  vLLM Router's `power_of_two` and `cache_aware`.
- `mixed-sizes`: 85 %, a tenth of the prompts one-offs 20 times longer, 4,096 KV blocks each:
  the forwarder's size-weighted `least_loaded` against the same counting requests,
  request-counting vLLM Router `power_of_two` and `random`; TTFT of all, short and long prompts.
- `failing-backend`: 50 %, backend 1 answers every request 500 while its `/metrics` answers:
  failures in the first 5 s and after, when the forwarder ejected it, goodput.
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402  (after patching, so that every socket below is cooperative)
import collections  # noqa: E402
import dataclasses  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

import gevent  # noqa: E402
import requests  # noqa: E402
import requests.adapters  # noqa: E402

from bench import batching_backend as engine  # noqa: E402
from tests.harness import Forwarder, free_port, wait_until  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
# Words of the prompts: one token each, four bytes with the space, as English text averages.
VOCABULARY = "box van hub eta run map day log bay lot ton kit tag bin cab dot".split()
# The engines' timing and block size: their defaults, which the fleet keeps.
ENGINE = engine.parse_args(["--port", "0"])
# The forwarder's EJECT_SECONDS (its default, which the scenarios keep).
EJECT_SECONDS = 30.0


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", choices=(*SCENARIOS, "all"),
                        help="run a scenario (or all of them) instead of the --contenders table")
    parser.add_argument("--repeat", type=int, default=1, help="run each scenario this often")
    parser.add_argument("--seconds", type=float, default=25, help="arrivals per contender")
    parser.add_argument("--load", type=float, default=0.8, help="share of fleet capacity")
    parser.add_argument("--backends", type=int, default=4)
    parser.add_argument("--slowdown", type=float, default=3.0, help="the first backend's")
    parser.add_argument("--max-num-seqs", type=int, default=8, help="requests running per backend")
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048,
                        help="tokens computed per engine step")
    parser.add_argument("--kv-blocks", default="1024",
                        help="KV blocks (16 tokens) per backend: one figure, or one per backend")
    parser.add_argument("--sessions", type=int, default=16)
    parser.add_argument("--session-share", type=float, default=0.6)
    parser.add_argument("--turns", type=int, default=10, help="turns per conversation")
    parser.add_argument("--system-tokens", type=int, default=1500,
                        help="a session's system prompt (on average)")
    parser.add_argument("--user-tokens", type=int, default=100,
                        help="a user message of a session (on average)")
    parser.add_argument("--one-off-tokens", type=int, default=800,
                        help="a one-off prompt (median)")
    parser.add_argument("--output-tokens", type=int, default=64, help="max_tokens (on average)")
    parser.add_argument("--long-share", type=float, default=0.0,
                        help="share of the requests that are long one-off prompts")
    parser.add_argument("--long-factor", type=int, default=20,
                        help="how many times longer a long prompt is than a one-off one")
    parser.add_argument("--failing-backend", type=int, default=-1,
                        help="the backend that answers every request 500 (-1: none)")
    parser.add_argument("--ttft-timeout", type=float, default=15.0,
                        help="a client gives up when no first token came by then")
    parser.add_argument("--good-ttft", type=float, default=2.0,
                        help="a request counts towards goodput with its first token by then")
    parser.add_argument("--quick-refusal", type=float, default=1.0,
                        help="a 429 within this many seconds is a quick refusal")
    parser.add_argument("--check-interval", default="1",
                        help="the forwarder's CHECK_INTERVAL_SECONDS")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--contenders", default="least_loaded,affinity,random,"
                        "rust:power_of_two,rust:cache_aware")
    parser.add_argument("--vllm-router", default=shutil.which("vllm-router"),
                        help="the vllm-router executable (default: from PATH)")
    return parser.parse_args(argv)


# One request of the schedule: when it is sent (seconds from the start), its chat messages, its
# max_tokens, and whether it is one of the long prompts.
Arrival = collections.namedtuple("Arrival", "at messages max_tokens long")


def text(rng, tokens, head):
    """`tokens` words, the first one `head`: a prompt that starts with it is a prefix of its own."""
    return " ".join([head, *rng.choices(VOCABULARY, k=max(0, tokens - 1))])


def about(rng, mean):
    """Half to one and a half times `mean`, uniformly."""
    return rng.randint(max(1, mean // 2), max(1, mean * 3 // 2))


def one_off(rng, args, number, tokens=None):
    """A one-off prompt: `tokens` long, or a quarter to four times `--one-off-tokens`."""
    if tokens is None:
        tokens = round(args.one_off_tokens * 4 ** rng.uniform(-1, 1))
    return [{"role": "user", "content": text(rng, tokens, f"request{number}")}]


def workload(args, rate):
    """The arrival schedule (`Arrival`s), the same for every contender."""
    rng = random.Random(args.seed)
    systems = [text(rng, about(rng, args.system_tokens), f"agent{slot}")
               for slot in range(args.sessions)]
    conversations = {}  # session -> (its last turn's messages, that turn's max_tokens)
    schedule = []
    at = 0.0
    while True:
        at += rng.expovariate(rate)
        if at >= args.seconds:
            return schedule
        number = len(schedule)
        max_tokens = about(rng, args.output_tokens)
        if args.long_share and rng.random() < args.long_share:
            messages = one_off(rng, args, number, args.one_off_tokens * args.long_factor)
            schedule.append(Arrival(at, messages, max_tokens, True))
            continue
        if rng.random() < args.session_share:
            slot = rng.randrange(args.sessions)
            last = conversations.get(slot)
            user = {"role": "user", "content": text(rng, about(rng, args.user_tokens),
                                                    f"turn{number}")}
            if last is None or len(last[0]) >= 2 * args.turns:
                messages = [{"role": "system", "content": systems[slot]}, user]
            else:
                messages = [*last[0], {"role": "assistant", "content": engine.answer(last[1])},
                            user]
            conversations[slot] = (messages, max_tokens)
        else:
            messages = one_off(rng, args, number)
        schedule.append(Arrival(at, messages, max_tokens, False))


def kv_blocks(args):
    """Each backend's KV blocks, from `--kv-blocks` (one figure for all, or one each)."""
    figures = [int(figure) for figure in str(args.kv_blocks).split(",")]
    if len(figures) == 1:
        return figures * args.backends
    if len(figures) != args.backends:
        raise SystemExit(f"--kv-blocks: {len(figures)} figures for {args.backends} backends")
    return figures


def fleet_capacity(args, schedule):
    """Requests per second the fleet sustains when every prompt is prefilled in full. A backend
    runs as many requests as its batch and its KV cache allow (each holding its prompt and
    answer at the end); per request it spends its prefill and a share of the decode steps, each
    step's time growing with the context the batch reads (`bench.batching_backend`'s model)."""
    prompt = statistics.mean(len(engine.render(a.messages)) for a in schedule)
    output = statistics.mean(a.max_tokens for a in schedule)
    total = 0.0
    for index, blocks in enumerate(kv_blocks(args)):
        slow = args.slowdown if index == 0 else 1.0
        batch = min(args.max_num_seqs, blocks * ENGINE.block_size / (prompt + output))
        step = slow * (ENGINE.step_seconds + ENGINE.token_seconds * batch
                       + ENGINE.context_token_seconds * batch * (prompt + output / 2))
        total += 1 / (output * step / batch + slow * ENGINE.token_seconds * prompt)
    return total


def arrivals(args):
    """(schedule, arrival rate, fleet capacity): the rate is `--load` of the capacity that the
    schedule's own prompts allow (found by a few rounds, since the prompts depend on the rate)."""
    rate = 1.0
    for _ in range(3):
        rate = args.load * fleet_capacity(args, workload(args, rate))
    schedule = workload(args, rate)
    return schedule, rate, fleet_capacity(args, schedule)


class Process:
    """A child process, output to a log file, stopped by its PID."""

    def __init__(self, command, log_path):
        self.log_path = log_path
        with open(log_path, "w") as log:
            self.proc = subprocess.Popen(command, cwd=REPO_ROOT, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def answers(url):
    try:
        return requests.get(url, timeout=1).status_code == 200
    except requests.RequestException:
        return False


def backend_command(args, index, port):
    command = [sys.executable, "-m", "bench.batching_backend", "--port", str(port),
               "--max-num-seqs", str(args.max_num_seqs),
               "--max-num-batched-tokens", str(args.max_num_batched_tokens),
               "--kv-blocks", str(kv_blocks(args)[index]),
               "--slowdown", str(args.slowdown if index == 0 else 1.0)]
    if index == args.failing_backend:
        command += ["--fail-status", "500"]
    return command


def start_fleet(args, log_dir):
    """Start every backend; each is stopped by `stop_all` (also the ones started before a
    failure here)."""
    backends = []
    try:
        for index in range(args.backends):
            port = free_port()
            process = Process(backend_command(args, index, port), log_dir / f"backend-{index}.log")
            process.url = f"http://127.0.0.1:{port}"
            backends.append(process)
            wait_until(lambda: answers(process.url + "/health"), timeout=15,
                       message=f"backend {index} did not start")
    except BaseException:
        stop_all(backends)
        raise
    return backends


def stop_all(processes):
    for process in processes:
        process.stop()


@dataclasses.dataclass(frozen=True)
class Spec:
    """One contender: the forwarder with `policy` (its `workers`, and more environment in `env`)
    or, with `rust`, vLLM Router with `policy` (more command-line flags in `flags`). `note` tells
    it from others of the same policy."""

    policy: str
    rust: bool = False
    workers: int = 1
    env: tuple = ()
    flags: tuple = ()
    note: str = ""

    @classmethod
    def parse(cls, name):
        """`rust:POLICY` or a forwarder `ROUTING_POLICY`."""
        if name.startswith("rust:"):
            return cls(name.split(":", 1)[1], rust=True)
        return cls(name)

    def label(self):
        router = "vllm-router" if self.rust else "forwarder"
        return f"{router} `{self.policy}`" + (f", {self.note}" if self.note else "")

    def measure(self):
        """What the policy counts as a backend's load."""
        if self.rust:
            return "requests (its own count in flight)"
        if dict(self.env).get("REQUEST_WEIGHT_BYTES") == "0":
            return "requests, in flight and scraped, KV pressure"
        return {"random": "nothing (uniform)",
                "least_loaded": "request size until the first token (1 + body bytes / 4096), "
                                "KV pressure",
                "affinity": "request size, for its load bound"}[self.policy]


class Contender:
    """A router in front of the fleet, started for one run and stopped after it."""

    def __init__(self, spec, args, fleet, log_dir):
        self.spec = spec
        self.args = args
        self.fleet = fleet
        self.log_dir = log_dir
        self.forwarder = None
        self.stop = lambda: None

    def start(self):
        urls = [b.url for b in self.fleet]
        if self.spec.rust:
            self._start_router(urls)
        else:
            self.forwarder = Forwarder.start(
                urls, env={"ROUTING_POLICY": self.spec.policy,
                           "CHECK_INTERVAL_SECONDS": self.args.check_interval,
                           **dict(self.spec.env)},
                workers=self.spec.workers, wait_healthy=len(urls), log_dir=self.log_dir)
            self.stop = self.forwarder.stop
            self.url = self.forwarder.url

    def _start_router(self, urls):
        port = free_port()
        command = [self.args.vllm_router, "--host", "127.0.0.1", "--port", str(port),
                   "--policy", self.spec.policy, "--worker-urls", *urls,
                   "--prometheus-port", str(free_port()), "--log-level", "warning",
                   *self.spec.flags]
        process = Process(command, self.log_dir / f"rust-{self.spec.policy}-{port}.log")
        self.stop = process.stop
        self.url = f"http://127.0.0.1:{port}"
        wait_until(lambda: answers(self.url + "/health"), timeout=60,
                   message=f"vllm-router did not start: see {process.log_path}")

    def watch_ejections(self, started_wall, seen):
        """While it runs, note in `seen` (backend URL -> seconds from `started_wall`) when the
        forwarder ejected each backend (its `/_backends` `ejected_until` less EJECT_SECONDS)."""
        while self.forwarder is not None:
            try:
                for backend in self.forwarder.backends()["backends"]:
                    until = backend.get("ejected_until")
                    if until and backend["url"] not in seen:
                        seen[backend["url"]] = until - EJECT_SECONDS - started_wall
            except (requests.RequestException, ValueError, KeyError):
                pass
            gevent.sleep(0.25)


def client_session(size):
    session = requests.Session()
    session.trust_env = False
    adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=size)
    session.mount("http://", adapter)
    return session


def first_token(response):
    """When the first token of a streamed answer came, or None when the body ended without."""
    while True:
        chunk = response.raw.read1(65536)
        if not chunk:
            return None
        if b"data: {" in chunk:
            return time.monotonic()


def one_request(session, url, arrival, args, started, results):
    """Send one streamed chat request as a client does (no retry) and append what it saw to
    `results`: when it was sent and ended (seconds from `started`), the response's status, the
    time to its first token (`ttft`, None when none came) and how long the client waited for
    its first token or for knowing it would get none (`waited`), and else why (`error`)."""
    body = {"model": engine.MODEL, "messages": arrival.messages, "stream": True,
            "max_tokens": arrival.max_tokens}
    sent = time.monotonic()
    record = {"sent": sent - started, "long": arrival.long, "status": None, "ttft": None,
              "error": None}
    response = None
    first = None
    try:
        with gevent.Timeout(args.ttft_timeout):
            response = session.post(url + "/v1/chat/completions", json=body, stream=True,
                                    timeout=(5, args.ttft_timeout))
            record["status"] = response.status_code
            first = first_token(response)
        if first is None:
            record["error"] = f"HTTP {response.status_code}"
        else:
            record["ttft"] = first - sent
            while response.raw.read1(65536):
                pass
    except gevent.Timeout:
        record["error"] = "no first token in time"
    except (requests.RequestException, OSError) as exc:
        record["error"] = type(exc).__name__
    finally:
        if response is not None:
            response.close()
    record["waited"] = (first or time.monotonic()) - sent
    record["done"] = time.monotonic() - started
    results.append(record)


def drive(url, schedule, args, started):
    """Send `schedule` to `url` on time, open loop; what every client saw."""
    session = client_session(2048)
    results = []
    greenlets = []
    for arrival in schedule:
        delay = started + arrival.at - time.monotonic()
        if delay > 0:
            gevent.sleep(delay)
        greenlets.append(gevent.spawn(one_request, session, url, arrival, args, started,
                                      results))
    gevent.joinall(greenlets)
    session.close()
    return results


# The gauges read from each engine while a contender runs, and what the run keeps of each.
GAUGES = re.compile(r"^vllm:(num_requests_waiting|kv_cache_usage_perc)\{[^}]*\} (\S+)$",
                    re.MULTILINE)


def watch_engines(fleet, peaks):
    """Every 100 ms, read each engine's requests waiting and KV cache use; keep the highest seen
    of each in `peaks` (gauge name -> one figure per backend)."""
    with client_session(len(fleet)) as session:
        while True:
            for index, backend in enumerate(fleet):
                try:
                    text = session.get(backend.url + "/metrics", timeout=1).text
                except requests.RequestException:
                    continue
                for name, value in GAUGES.findall(text):
                    peaks[name][index] = max(peaks[name][index], float(value))
            gevent.sleep(0.1)


@dataclasses.dataclass
class Outcome:
    """One contender's run: what the clients saw (`one_request`'s records), each engine's
    `/_sim/stats` and the highest of its gauges (`watch_engines`), and when the forwarder ejected
    which backend (seconds from the start)."""

    spec: Spec
    results: list
    stats: list
    peaks: dict
    ejected: dict


def run(contender, schedule, args):
    """Run `schedule` through `contender`, then reset the engines for the next one."""
    ejected = {}
    peaks = {name: [0.0] * len(contender.fleet)
             for name in ("num_requests_waiting", "kv_cache_usage_perc")}
    try:
        contender.start()
        started = time.monotonic()
        watchers = [gevent.spawn(watch_engines, contender.fleet, peaks)]
        if args.failing_backend >= 0:
            watchers.append(gevent.spawn(contender.watch_ejections, time.time(), ejected))
        try:
            results = drive(contender.url, schedule, args, started)
        finally:
            gevent.killall(watchers)
    finally:
        contender.stop()
    stats = [requests.get(b.url + "/_sim/stats", timeout=5).json() for b in contender.fleet]
    for backend in contender.fleet:
        requests.post(backend.url + "/_sim/reset", timeout=5)
    errors = collections.Counter(r["error"] for r in results if r["error"])
    if errors:
        print(f"{contender.spec.label()}: without a token {dict(errors)}", file=sys.stderr)
    return Outcome(contender.spec, results, stats, peaks, ejected)


# --- figures -------------------------------------------------------------------------------------

def percentile(values, p):
    """The p-th percentile of `values` (None when there are none)."""
    values = sorted(values)
    if len(values) < 2:
        return values[0] if values else None
    return statistics.quantiles(values, n=100)[p - 1]


def served(results):
    return [r for r in results if r["ttft"] is not None]


def refused(results):
    return [r for r in results if r["status"] == 429]


def failed(results):
    """Neither served nor refused: errors of every other kind, timeouts."""
    return [r for r in results if r["ttft"] is None and r["status"] != 429]


def goodput(results, args):
    """Requests with their first token within `--good-ttft`, per second of arrivals."""
    return sum(1 for r in served(results) if r["ttft"] <= args.good_ttft) / args.seconds


def kinds(records):
    """What went wrong, most frequent first: `HTTP 500 ×3, ReadTimeout ×1`."""
    counts = collections.Counter(r["error"] for r in records)
    return ", ".join(f"{error} ×{count}" for error, count in counts.most_common())


def share(part, whole):
    return f"{part / whole:.0%}" if whole else "n/a"


def seconds(value, digits=2):
    return "–" if value is None else f"{value:.{digits}f}"


def markdown(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


# --- tables --------------------------------------------------------------------------------------

def table(outcomes, args, capacity):
    """The policies' table: TTFT, unanswered, throughput, prefix cache, queues, preemptions."""
    rows = []
    for outcome in outcomes:
        answered = served(outcome.results)
        ends = [r["done"] for r in answered]
        total = collections.Counter()
        for stats in outcome.stats:
            total.update(stats)
        waiting = outcome.peaks["num_requests_waiting"]
        deepest = max(range(len(waiting)), key=waiting.__getitem__)
        rows.append([
            outcome.spec.label(), seconds(percentile([r["ttft"] for r in answered], 50)),
            seconds(percentile([r["ttft"] for r in answered], 99)),
            f"{1 - len(answered) / len(outcome.results):.1%}",
            f"{len(answered) / max(ends):.1f}" if ends else "0.0",
            f'{share(total["session_turn_hits"], total["session_turns"])} '
            f'({share(total["session_turn_evictions"], total["session_turns"])} evicted)',
            share(total["prefix_hit_tokens"], total["prefix_query_tokens"]),
            f"{waiting[deepest]:.0f} (backend {deepest})",
            f"{max(outcome.peaks['kv_cache_usage_perc']):.0%}", total["preemptions"]])
    return markdown(["router", "TTFT p50 (s)", "TTFT p99 (s)", "unanswered",
                     "throughput (req/s)", "session turns on their prefix (evicted)",
                     "prompt tokens cached", "most waiting on one backend", "KV use, highest",
                     "preemptions"], rows)


def overload_table(outcomes, args, capacity):
    """Goodput, refusals, failures and waits under overload, then the targets checked."""
    rows = []
    for outcome in outcomes:
        results = outcome.results
        waits = [r["waited"] for r in refused(results)]
        quick = sum(1 for wait in waits if wait <= args.quick_refusal)
        failures = failed(results)
        good = goodput(results, args)
        rows.append([
            outcome.spec.label(), f"{good:.1f}", f"{good / capacity:.0%}",
            f"{len(waits)} ({len(waits) / args.seconds:.1f}/s)",
            f"{quick} ({quick / args.seconds:.1f}/s)",
            f"{seconds(percentile(waits, 50))} / {seconds(max(waits, default=None))}",
            f"{len(failures)}" + (f" ({kinds(failures)})" if failures else ""),
            seconds(max(r["waited"] for r in results)),
            seconds(percentile([r["ttft"] for r in served(results)], 99)),
            sum(1 for r in served(results) if r["ttft"] > args.good_ttft)])
    text = markdown([
        "router", "goodput (req/s)", "goodput / capacity", "refused (429)",
        f"of which within {args.quick_refusal:g} s", "refused: wait p50 / longest (s)",
        "failures", "longest wait, any request (s)", "TTFT p99 served (s)",
        f"served late (TTFT > {args.good_ttft:g} s)"], rows)
    return text + "\n\n" + overload_targets(outcomes, args, capacity)


def overload_targets(outcomes, args, capacity):
    """The issue's targets for the forwarder with the brake, each with its figures."""
    best_rust = max((goodput(o.results, args) for o in outcomes if o.spec.rust), default=None)
    lines = ["Targets (forwarder with the brake): goodput ≥ 85 % of capacity, no request waited "
             "longer than QUEUE_TIMEOUT_SECONDS (30 s), goodput no worse than vllm-router's best"
             + (f" ({best_rust:.1f} req/s)" if best_rust is not None else "") + ":", ""]
    for outcome in outcomes:
        if outcome.spec.rust or not outcome.spec.env:
            continue
        good = goodput(outcome.results, args)
        longest = max(r["waited"] for r in outcome.results)
        checks = [("goodput", good >= 0.85 * capacity, f"{good / capacity:.0%} of capacity"),
                  ("waits", longest <= 30, f"longest {longest:.2f} s")]
        if best_rust is not None:
            checks.append(("vs vllm-router", good >= best_rust,
                           f"{good:.1f} against {best_rust:.1f} req/s"))
        lines.append(f"- {outcome.spec.label()}: " + "; ".join(
            f"{name} {'met' if ok else 'MISSED'} ({figure})" for name, ok, figure in checks))
    return "\n".join(lines)


def mixed_table(outcomes, args, capacity):
    """TTFT of all, short and long prompts, and goodput, with what each policy counts."""
    rows = []
    for outcome in outcomes:
        answered = served(outcome.results)
        short = [r["ttft"] for r in answered if not r["long"]]
        long = [r["ttft"] for r in answered if r["long"]]
        rows.append([
            outcome.spec.label(), outcome.spec.measure(),
            seconds(percentile([r["ttft"] for r in answered], 50)),
            seconds(percentile([r["ttft"] for r in answered], 99)),
            seconds(percentile(short, 99)), seconds(percentile(long, 50)),
            seconds(percentile(long, 99)), f"{goodput(outcome.results, args):.1f}",
            f"{1 - len(answered) / len(outcome.results):.1%}"])
    return markdown(["router", "load it counts", "TTFT p50 (s)", "TTFT p99 (s)",
                     "p99 short prompts (s)", "p50 long prompts (s)", "p99 long prompts (s)",
                     "goodput (req/s)", "unanswered"], rows)


def failing_table(outcomes, args, capacity):
    """Failures before and after the first 5 s, when the bad backend was ejected, goodput."""
    early = 5.0
    rows = []
    for outcome in outcomes:
        failures = failed(outcome.results)
        bad = outcome.stats[args.failing_backend]["failed"]
        ejected = list(outcome.ejected.values())
        rows.append([
            outcome.spec.label(), sum(1 for r in failures if r["sent"] < early),
            sum(1 for r in failures if r["sent"] >= early),
            f"{len(failures)}" + (f" ({kinds(failures)})" if failures else ""),
            seconds(max((r["sent"] for r in failures), default=None)),
            seconds(min(ejected), 1) if ejected else ("–" if outcome.spec.rust else "never"),
            bad, f"{goodput(outcome.results, args):.1f}"])
    return markdown(["router", f"failed, sent in the first {early:g} s",
                     f"failed, sent after {early:g} s", "failed in all",
                     "last failure sent at (s)", "bad backend ejected at (s)",
                     "requests the bad backend answered 500", "goodput (req/s)"], rows)


# --- scenarios -----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Scenario:
    """What one scenario changes in the arguments (`overrides`), its contenders (from the
    arguments) and its table (`report(outcomes, args, capacity)`), with a line saying what it
    shows."""

    title: str
    contenders: Callable
    report: Callable
    overrides: dict = dataclasses.field(default_factory=dict)


def brake(args):
    """The forwarder's brake at the engines' batch size, queue settings at their defaults."""
    return (("MAX_IN_FLIGHT_PER_BACKEND", str(args.max_num_seqs)),)


def router_limit(args):
    """vLLM Router's limit at the fleet's batch slots, queue as the forwarder's defaults."""
    return ("--max-concurrent-requests", str(args.backends * args.max_num_seqs),
            "--queue-size", "1000", "--queue-timeout-secs", "30")


def overload_contenders(args):
    slots = args.backends * args.max_num_seqs
    return (
        Spec("least_loaded", note="no brake"),
        Spec("least_loaded", env=brake(args), note=f"brake {args.max_num_seqs}/backend"),
        Spec("least_loaded", env=brake(args), workers=2,
             note=f"brake {args.max_num_seqs}/backend, 2 workers"),
        Spec("power_of_two", rust=True, note="no limit"),
        Spec("power_of_two", rust=True, flags=router_limit(args),
             note=f"limit {slots}, queue 1000, 30 s (bucket refill {slots}/s)"),
        Spec("power_of_two", rust=True,
             flags=router_limit(args) + ("--rate-limit-tokens-per-second", "1"),
             note=f"limit {slots}, queue 1000, 30 s, bucket refill 1/s"),
    )


def load80_contenders(args):
    return (Spec("least_loaded"), Spec("least_loaded", workers=2, note="2 workers"),
            Spec("affinity"), Spec("affinity", workers=2, note="2 workers"),
            Spec("power_of_two", rust=True), Spec("cache_aware", rust=True))


def listed_contenders(args):
    return tuple(Spec.parse(name) for name in args.contenders.split(","))


SCENARIOS = {
    "issue-80": Scenario(
        "The issue's fleet at 80 % of capacity: 60 % of the requests turns of 16 sessions, 40 % "
        "one-off prompts, a KV cache that fills as the batch fills",
        listed_contenders, table, {"load": 0.8}),
    "issue-100": Scenario(
        "The issue's fleet at 100 % of capacity", listed_contenders, table, {"load": 1.0}),
    "kv-bound": Scenario(
        "85 % of capacity on backends of one speed that may run 32 requests each, so that the KV "
        "cache binds first; backends 2 and 3 have half the KV of 0 and 1",
        listed_contenders, table,
        {"load": 0.85, "slowdown": 1.0, "max_num_seqs": 32, "kv_blocks": "1024,1024,512,512"}),
    "overload": Scenario(
        "130 % of the fleet's capacity; clients wait up to 60 s and never retry a 429",
        overload_contenders, overload_table, {"load": 1.3, "ttft_timeout": 60.0}),
    "load80-2workers": Scenario(
        "80 % of capacity, the forwarder on one and on two workers",
        load80_contenders, table, {"load": 0.8}),
    "mixed-sizes": Scenario(
        "85 % of capacity, a tenth of the prompts one-offs 20 times longer, engines with 4,096 KV "
        "blocks (65,536 tokens). least_loaded weighs each request by its size, or, with "
        "REQUEST_WEIGHT_BYTES=0, counts requests; vllm-router's power_of_two counts requests; "
        "random counts nothing",
        lambda args: (Spec("least_loaded"),
                      Spec("least_loaded", env=(("REQUEST_WEIGHT_BYTES", "0"),),
                           note="counting requests"),
                      Spec("power_of_two", rust=True), Spec("random")),
        mixed_table, {"load": 0.85, "long_share": 0.1, "kv_blocks": "4096"}),
    "failing-backend": Scenario(
        "50 % of capacity, backend 1 answers every request 500 while its /metrics and /health "
        "answer 200 (forwarder: EJECT_AFTER_FAILURES=5, EJECT_SECONDS=30, the defaults)",
        lambda args: (Spec("least_loaded"), Spec("power_of_two", rust=True)),
        failing_table, {"load": 0.5, "failing_backend": 1}),
}


def with_router(specs, args):
    """`specs` without vLLM Router's when it is not installed (said on stderr)."""
    if args.vllm_router or not any(s.rust for s in specs):
        return specs
    print("vllm-router not found (pip install -r bench/requirements.txt, or --vllm-router "
          "PATH): its rows are left out", file=sys.stderr)
    return tuple(s for s in specs if not s.rust)


def fleet_line(args, schedule, rate, capacity):
    blocks = kv_blocks(args)
    kv = f"{blocks[0]:,}" if len(set(blocks)) == 1 else "/".join(f"{b:,}" for b in blocks)
    fleet = (f"{args.backends} backends, up to {args.max_num_seqs} running and {kv} KV blocks "
             f"({ENGINE.block_size} tokens) each, "
             + (f"backend 0 {args.slowdown:g}x slower" if args.slowdown != 1 else "one speed")
             + (f"; backend {args.failing_backend} answers every request 500"
                if args.failing_backend >= 0 else ""))
    prompts = [len(engine.render(a.messages)) for a in schedule]
    sessions = sum(1 for a in schedule if len(a.messages) > 1)
    longs = sum(1 for a in schedule if a.long)
    requests_line = (f"{len(schedule)} requests, {sessions} of them session turns"
                     + (f", {longs} long prompts" if longs else ""))
    return (f"Fleet: {fleet}; estimated capacity {capacity:.1f} req/s; arrivals {rate:.1f} req/s "
            f"({rate / capacity:.0%}) for {args.seconds:g} s = {requests_line}; prompts "
            f"{statistics.median(prompts):,.0f} tokens median, {max(prompts):,} longest, "
            f"max_tokens {statistics.mean(a.max_tokens for a in schedule):.0f} on average.")


def run_scenario(name, scenario, base_args, log_dir):
    """Run every contender of `scenario` `--repeat` times in front of a fleet of its own; its
    markdown, a table per run."""
    args = argparse.Namespace(**{**vars(base_args), **scenario.overrides})
    specs = with_router(scenario.contenders(args), args)
    schedule, rate, capacity = arrivals(args)
    scenario_dir = log_dir / name
    scenario_dir.mkdir()
    print(f"{name}: {len(specs)} contenders, {len(schedule)} requests each; logs in "
          f"{scenario_dir}", file=sys.stderr)
    fleet = start_fleet(args, scenario_dir)
    tables = []
    try:
        for repetition in range(1, args.repeat + 1):
            outcomes = []
            for spec in specs:
                began = time.monotonic()
                outcomes.append(run(Contender(spec, args, fleet, scenario_dir), schedule, args))
                print(f"  {spec.label()}: {time.monotonic() - began:.0f} s", file=sys.stderr)
            heading = f"Run {repetition} of {args.repeat}:\n\n" if args.repeat > 1 else ""
            tables.append(heading + scenario.report(outcomes, args, capacity))
    finally:
        stop_all(fleet)
    return (f"## {name}\n\n{scenario.title}.\n\n{fleet_line(args, schedule, rate, capacity)}"
            "\n\n" + "\n\n".join(tables) + "\n")


def main(argv=None):
    args = parse_args(argv)
    log_dir = Path(tempfile.mkdtemp(prefix="fleet-sim-"))
    if args.scenario is None:
        chosen = {"contenders": Scenario(f"{args.load:.0%} of capacity", listed_contenders,
                                         table)}
    else:
        names = SCENARIOS if args.scenario == "all" else (args.scenario,)
        chosen = {name: SCENARIOS[name] for name in names}
    for name, scenario in chosen.items():
        began = time.monotonic()
        print(run_scenario(name, scenario, args, log_dir), flush=True)
        print(f"{name}: {time.monotonic() - began:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
