"""Fleet simulation: routers side by side on one heterogeneous, continuous-batching fleet.

    pip install -r requirements.txt -r bench/requirements.txt
    python -m bench.fleet_sim --scenario all        # the four scenarios below, about 11 minutes
    python -m bench.fleet_sim --scenario overload   # one of them (overload, load80-2workers,
                                                    # mixed-sizes, failing-backend)
    python -m bench.fleet_sim [--seconds 30] [--load 0.8] [--contenders ...]   # the 80 % table

Starts `--backends` fake vLLM engines (`bench/batching_backend.py`), the first one `--slowdown`
times slower than the rest, and runs every contender in turn in front of that same fleet: the
forwarder (gunicorn, as `tests.harness.Forwarder` starts it, `CHECK_INTERVAL_SECONDS` from
`--check-interval`) and the vLLM project's Rust router (`vllm-router`). Each one gets the same
open-loop Poisson arrival schedule at a share of the fleet's estimated capacity; `--session-share`
of the requests are the next turn of one of `--sessions` running chat conversations (each turn's
prompt is the previous turn's plus two messages), the rest are one-off prompts. Between
contenders every engine is reset (queues dropped, prefix cache emptied). Clients never retry: a
`429` is a refusal. Tables go to stdout (markdown), progress to stderr.

Without `--scenario`: every `--contenders` entry (a forwarder `ROUTING_POLICY`, or
`rust:POLICY`) at `--load`, and one table: time to first token (p50, p99) of the answered
requests, the share never answered within `--ttft-timeout`, throughput (finished requests per
second, from the first send to the last token), and the prefix-cache hit rate of session turns
(turns whose conversation so far was prefilled on the backend that got them / all later turns).

Scenarios (each sets its own load, contenders and table; the other knobs apply to all):

- `overload`: 130 % of capacity, clients wait up to 60 s. The forwarder's `least_loaded` without
  the brake, with it (`MAX_IN_FLIGHT_PER_BACKEND` = `--capacity`, queue settings at their
  defaults) on one and on two workers; vLLM Router's `power_of_two` without a limit, with its
  limit (`--max-concurrent-requests` = all batch slots, `--queue-size 1000`,
  `--queue-timeout-secs 30`), and with that limit as a pure concurrency limit (its token bucket
  refilled at 1/s instead of once per slot per second). Goodput (first token within
  `--good-ttft`, per second of arrivals), refusals (`429`) within `--quick-refusal` and later,
  other failures, the longest wait of a refused request and of any request, p99 time to first
  token of what was served; then the issue's targets, checked.
- `load80-2workers`: the 80 % table for `least_loaded` and `affinity` on one and two workers and
  vLLM Router's `power_of_two` and `cache_aware`.
- `mixed-sizes`: 85 %, a tenth of the prompts 20 times longer, engines with a KV cache
  (`--kv-tokens`): the forwarder's size-weighted `least_loaded` against request-counting vLLM
  Router `power_of_two` and the forwarder's `random`; TTFT of all, short and long prompts.
- `failing-backend`: 50 %, backend 1 answers every request `500` while its `/metrics` answers:
  failures in the first 5 s and after, when the forwarder ejected it, goodput.
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402  (after patching, so that every socket below is cooperative)
import collections  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
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

from tests.harness import Forwarder, free_port, wait_until  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
SYSTEM_PROMPT = ("You are a careful assistant for a logistics company. " * 70).strip()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", choices=(*SCENARIOS, "all"),
                        help="run a scenario (or all of them) instead of the --contenders table")
    parser.add_argument("--seconds", type=float, default=30, help="arrivals per contender")
    parser.add_argument("--load", type=float, default=0.8, help="share of fleet capacity")
    parser.add_argument("--backends", type=int, default=4)
    parser.add_argument("--slowdown", type=float, default=3.0, help="the first backend's")
    parser.add_argument("--capacity", type=int, default=8, help="requests running per backend")
    parser.add_argument("--output-tokens", type=int, default=16)
    parser.add_argument("--session-share", type=float, default=0.6)
    parser.add_argument("--sessions", type=int, default=48, help="conversations running at once")
    parser.add_argument("--turns", type=int, default=6, help="turns per conversation")
    parser.add_argument("--long-share", type=float, default=0.0,
                        help="share of the requests that are long one-off prompts")
    parser.add_argument("--long-factor", type=int, default=20,
                        help="how many times longer a long prompt is than a one-off one")
    parser.add_argument("--kv-tokens", type=int, default=0,
                        help="each engine's KV cache in tokens (0: no limit)")
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
    parser.add_argument("--contenders", default="random,least_loaded,affinity,"
                        "rust:power_of_two,rust:cache_aware")
    parser.add_argument("--vllm-router", default=shutil.which("vllm-router"),
                        help="the vllm-router executable (default: from PATH)")
    return parser.parse_args(argv)


# Engine timing, as `bench.batching_backend` models it (its defaults).
STEP_SECONDS = 0.02
SEQ_STEP_SECONDS = 0.0025
PREFILL_SECONDS_PER_TOKEN = 0.00002
# The forwarder's EJECT_SECONDS (its default, which the scenarios keep).
EJECT_SECONDS = 30.0

# One request of the schedule: when it is sent (seconds from the start), its chat messages, and
# whether it is one of the long prompts.
Arrival = collections.namedtuple("Arrival", "at messages long")


def one_off(rng, factor=1):
    """A one-off prompt; with `factor` > 1, a document to summarise makes it about that many
    times longer."""
    messages = [{"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": f"One-off {rng.randrange(10**9)}: summarise "
                                            "today's deliveries."}]
    if factor > 1:
        line = "Parcel delivered on time, signed for at the door. "
        lines = (factor - 1) * len(json.dumps(messages)) // len(line) + 1
        messages[1]["content"] += " Manifest: " + line * lines
    return messages


def workload(args, rate):
    """The arrival schedule (`Arrival`s), the same for every contender."""
    rng = random.Random(args.seed)
    conversations = {}
    next_id = 0
    schedule = []
    at = 0.0
    while True:
        at += rng.expovariate(rate)
        if at >= args.seconds:
            return schedule
        if args.long_share and rng.random() < args.long_share:
            schedule.append(Arrival(at, one_off(rng, args.long_factor), True))
            continue
        if rng.random() < args.session_share:
            slot = rng.randrange(args.sessions)
            messages = conversations.get(slot)
            if messages is None or len(messages) >= 2 * args.turns:
                next_id += 1
                messages = [{"role": "system", "content": SYSTEM_PROMPT},
                            {"role": "user", "content": f"Conversation {next_id}: where is "
                                                        f"shipment {rng.randrange(10**6)}?"}]
            else:
                turn = len(messages) // 2
                messages = messages + [
                    {"role": "assistant", "content": f"Answer {turn}. " * 20},
                    {"role": "user", "content": f"Follow-up {turn}: and parcel "
                                                f"{rng.randrange(10**6)}?"}]
            conversations[slot] = messages
        else:
            messages = one_off(rng)
        schedule.append(Arrival(at, messages, False))


def fleet_capacity(args, schedule):
    """Requests per second the fleet sustains when every prompt is prefilled in full: a backend
    spends λ·prefill per second on prefills and the rest on full-batch decode steps."""
    prompt_tokens = statistics.mean(max(1, len(json.dumps(a.messages)) // 4) for a in schedule)
    total = 0.0
    for index in range(args.backends):
        slow = args.slowdown if index == 0 else 1.0
        step = slow * (STEP_SECONDS + SEQ_STEP_SECONDS * args.capacity)
        prefill = slow * PREFILL_SECONDS_PER_TOKEN * prompt_tokens
        total += args.capacity / (args.output_tokens * step + args.capacity * prefill)
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
               "--capacity", str(args.capacity),
               "--slowdown", str(args.slowdown if index == 0 else 1.0)]
    if args.kv_tokens:
        command += ["--kv-tokens", str(args.kv_tokens)]
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
    body = {"model": "sim-model", "messages": arrival.messages, "stream": True,
            "max_tokens": args.output_tokens}
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


@dataclasses.dataclass
class Outcome:
    """One contender's run: what the clients saw (`one_request`'s records), each engine's
    `/_sim/stats`, and when the forwarder ejected which backend (seconds from the start)."""

    spec: Spec
    results: list
    stats: list
    ejected: dict


def run(contender, schedule, args):
    """Run `schedule` through `contender`, then reset the engines for the next one."""
    ejected = {}
    try:
        contender.start()
        started = time.monotonic()
        watcher = gevent.spawn(contender.watch_ejections, time.time(), ejected) \
            if args.failing_backend >= 0 else gevent.spawn(lambda: None)
        try:
            results = drive(contender.url, schedule, args, started)
        finally:
            watcher.kill()
    finally:
        contender.stop()
    stats = [requests.get(b.url + "/_sim/stats", timeout=5).json() for b in contender.fleet]
    for backend in contender.fleet:
        requests.post(backend.url + "/_sim/reset", timeout=5)
    errors = collections.Counter(r["error"] for r in results if r["error"])
    if errors:
        print(f"{contender.spec.label()}: without a token {dict(errors)}", file=sys.stderr)
    return Outcome(contender.spec, results, stats, ejected)


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


def seconds(value, digits=2):
    return "–" if value is None else f"{value:.{digits}f}"


def markdown(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


# --- tables --------------------------------------------------------------------------------------

def table(outcomes, args=None, capacity=None):
    """The 80 % table: TTFT, unanswered, throughput, prefix-cache hits."""
    rows = []
    for outcome in outcomes:
        answered = served(outcome.results)
        ends = [r["done"] for r in answered]
        eligible = sum(s["cache_eligible"] for s in outcome.stats)
        hits = sum(s["cache_hits"] for s in outcome.stats)
        rows.append([
            outcome.spec.label(), seconds(percentile([r["ttft"] for r in answered], 50)),
            seconds(percentile([r["ttft"] for r in answered], 99)),
            f"{1 - len(answered) / len(outcome.results):.1%}",
            f"{len(answered) / max(ends):.1f}" if ends else "0.0",
            f"{hits / eligible:.0%}" if eligible else "n/a"])
    return markdown(["router", "TTFT p50 (s)", "TTFT p99 (s)", "unanswered",
                     "throughput (req/s)", "prefix-cache hits"], rows)


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
    return (("MAX_IN_FLIGHT_PER_BACKEND", str(args.capacity)),)


def router_limit(args):
    """vLLM Router's limit at the fleet's batch slots, queue as the forwarder's defaults."""
    return ("--max-concurrent-requests", str(args.backends * args.capacity),
            "--queue-size", "1000", "--queue-timeout-secs", "30")


def overload_contenders(args):
    slots = args.backends * args.capacity
    return (
        Spec("least_loaded", note="no brake"),
        Spec("least_loaded", env=brake(args), note=f"brake {args.capacity}/backend"),
        Spec("least_loaded", env=brake(args), workers=2,
             note=f"brake {args.capacity}/backend, 2 workers"),
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
    "overload": Scenario(
        "130 % of the fleet's capacity; clients wait up to 60 s and never retry a 429",
        overload_contenders, overload_table, {"load": 1.3, "ttft_timeout": 60.0}),
    "load80-2workers": Scenario(
        "80 % of capacity, the forwarder on one and on two workers",
        load80_contenders, table, {"load": 0.8}),
    "mixed-sizes": Scenario(
        "85 % of capacity, a tenth of the prompts 20 times longer, engines with a KV cache of "
        "49,152 tokens. least_loaded weighs each request by its size, or, with "
        "REQUEST_WEIGHT_BYTES=0, counts requests; vllm-router's power_of_two counts requests; "
        "random counts nothing",
        lambda args: (Spec("least_loaded"),
                      Spec("least_loaded", env=(("REQUEST_WEIGHT_BYTES", "0"),),
                           note="counting requests"),
                      Spec("power_of_two", rust=True), Spec("random")),
        mixed_table, {"load": 0.85, "long_share": 0.1, "kv_tokens": 49152}),
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
    failing = (f"; backend {args.failing_backend} answers every request 500"
               if args.failing_backend >= 0 else "")
    kv = f", KV cache {args.kv_tokens:,} tokens each" if args.kv_tokens else ""
    longs = sum(1 for a in schedule if a.long)
    return (f"Fleet: {args.backends} backends, capacity {args.capacity} each{kv}, backend 0 "
            f"{args.slowdown:g}x slower{failing}; estimated capacity {capacity:.1f} req/s; "
            f"arrivals {rate:.1f} req/s ({rate / capacity:.0%}) for {args.seconds:g} s = "
            f"{len(schedule)} requests"
            + (f", {longs} of them long prompts ({args.long_factor}x), of the others"
               if longs else ",") + f" {args.session_share:.0%} in sessions.")


def run_scenario(name, scenario, base_args, log_dir):
    """Run every contender of `scenario` in front of a fleet of its own; its markdown."""
    args = argparse.Namespace(**{**vars(base_args), **scenario.overrides})
    specs = with_router(scenario.contenders(args), args)
    schedule, rate, capacity = arrivals(args)
    scenario_dir = log_dir / name
    scenario_dir.mkdir()
    print(f"{name}: {len(specs)} contenders, {len(schedule)} requests each; logs in "
          f"{scenario_dir}", file=sys.stderr)
    fleet = start_fleet(args, scenario_dir)
    outcomes = []
    try:
        for spec in specs:
            began = time.monotonic()
            outcomes.append(run(Contender(spec, args, fleet, scenario_dir), schedule, args))
            print(f"  {spec.label()}: {time.monotonic() - began:.0f} s", file=sys.stderr)
    finally:
        stop_all(fleet)
    return (f"## {name}\n\n{scenario.title}.\n\n{fleet_line(args, schedule, rate, capacity)}\n\n"
            f"{scenario.report(outcomes, args, capacity)}\n")


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
