"""Fleet simulation: routing policies side by side on one heterogeneous, continuous-batching fleet.

    pip install -r requirements.txt -r bench/requirements.txt
    python -m bench.fleet_sim [--seconds 30] [--load 0.8] [--slowdown 3] ...

Starts `--backends` fake vLLM engines (`bench/batching_backend.py`), the first one `--slowdown`
times slower than the rest, and runs every contender in turn in front of that same fleet: the
forwarder (one gunicorn worker) with each `ROUTING_POLICY`, and the vLLM project's Rust router
(`vllm-router`) with its `power_of_two` and `cache_aware` policies. Each one gets the same
open-loop Poisson arrival schedule at `--load` of the fleet's capacity; `--session-share` of the
requests are the next turn of one of `--sessions` running chat conversations (each turn's prompt
is the previous turn's plus two messages), the rest are one-off prompts. Between contenders every
engine is reset (queues dropped, prefix cache emptied).

Prints a markdown table: time to first token (p50, p99) of the answered requests, the share never
answered within `--ttft-timeout`, throughput (finished requests per second, from the first send to
the last token), and the prefix-cache hit rate of session turns (turns whose conversation so far
was prefilled on the backend that got them / all later turns).
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402  (after patching, so that every socket below is cooperative)
import collections  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import gevent  # noqa: E402
import requests  # noqa: E402
import requests.adapters  # noqa: E402

from tests.harness import Forwarder, free_port, wait_until  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
SYSTEM_PROMPT = ("You are a careful assistant for a logistics company. " * 70).strip()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30, help="arrivals per contender")
    parser.add_argument("--load", type=float, default=0.8, help="share of fleet capacity")
    parser.add_argument("--backends", type=int, default=4)
    parser.add_argument("--slowdown", type=float, default=3.0, help="the first backend's")
    parser.add_argument("--capacity", type=int, default=8, help="requests running per backend")
    parser.add_argument("--output-tokens", type=int, default=16)
    parser.add_argument("--session-share", type=float, default=0.6)
    parser.add_argument("--sessions", type=int, default=48, help="conversations running at once")
    parser.add_argument("--turns", type=int, default=6, help="turns per conversation")
    parser.add_argument("--ttft-timeout", type=float, default=15.0)
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


def workload(args, rate):
    """The arrival schedule: (seconds from start, chat messages), the same for every contender."""
    rng = random.Random(args.seed)
    conversations = {}
    next_id = 0
    schedule = []
    at = 0.0
    while True:
        at += rng.expovariate(rate)
        if at >= args.seconds:
            return schedule
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
            messages = [{"role": "system", "content": SYSTEM_PROMPT},
                        {"role": "user", "content": f"One-off {rng.randrange(10**9)}: summarise "
                                                    "today's deliveries."}]
        schedule.append((at, messages))


def fleet_capacity(args, schedule):
    """Requests per second the fleet sustains when every prompt is prefilled in full: a backend
    spends λ·prefill per second on prefills and the rest on full-batch decode steps."""
    prompt_tokens = statistics.mean(max(1, len(json.dumps(m)) // 4) for _, m in schedule)
    total = 0.0
    for index in range(args.backends):
        slow = args.slowdown if index == 0 else 1.0
        step = slow * (STEP_SECONDS + SEQ_STEP_SECONDS * args.capacity)
        prefill = slow * PREFILL_SECONDS_PER_TOKEN * prompt_tokens
        total += args.capacity / (args.output_tokens * step + args.capacity * prefill)
    return total


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


def start_fleet(args, log_dir):
    backends = []
    for index in range(args.backends):
        port = free_port()
        command = [sys.executable, "-m", "bench.batching_backend", "--port", str(port),
                   "--capacity", str(args.capacity),
                   "--slowdown", str(args.slowdown if index == 0 else 1.0)]
        process = Process(command, log_dir / f"backend-{index}.log")
        process.url = f"http://127.0.0.1:{port}"
        backends.append(process)
        wait_until(lambda: answers(process.url + "/health"), timeout=15,
                   message=f"backend {index} did not start")
    return backends


class Contender:
    """A router in front of the fleet, started for one run and stopped after it."""

    def __init__(self, name, args, fleet, log_dir):
        self.name = name
        self.args = args
        self.fleet = fleet
        self.log_dir = log_dir
        self.stop = lambda: None

    def start(self):
        urls = [b.url for b in self.fleet]
        if self.name.startswith("rust:"):
            port = free_port()
            command = [self.args.vllm_router, "--host", "127.0.0.1", "--port", str(port),
                       "--policy", self.name.split(":", 1)[1], "--worker-urls", *urls,
                       "--prometheus-port", str(free_port()), "--log-level", "warning"]
            process = Process(command, self.log_dir / f"{self.name.replace(':', '-')}.log")
            self.stop = process.stop
            self.url = f"http://127.0.0.1:{port}"
            wait_until(lambda: answers(self.url + "/health"), timeout=60,
                       message=f"vllm-router did not start: see {process.log_path}")
        else:
            forwarder = Forwarder.start(
                urls, env={"ROUTING_POLICY": self.name,
                           "CHECK_INTERVAL_SECONDS": self.args.check_interval},
                workers=1, wait_healthy=len(urls), log_dir=self.log_dir)
            self.stop = forwarder.stop
            self.url = forwarder.url


def client_session(size):
    session = requests.Session()
    session.trust_env = False
    adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=size)
    session.mount("http://", adapter)
    return session


def one_request(session, url, messages, args, started, results):
    body = {"model": "sim-model", "messages": messages, "stream": True,
            "max_tokens": args.output_tokens}
    sent = time.monotonic()
    first = None
    try:
        with gevent.Timeout(args.ttft_timeout):
            response = session.post(url + "/v1/chat/completions", json=body, stream=True,
                                    timeout=(5, args.ttft_timeout))
            while first is None:
                chunk = response.raw.read1(65536)
                if not chunk:
                    break
                if b"data: {" in chunk:
                    first = time.monotonic()
        if first is None:
            results.append({"ttft": None, "error": f"HTTP {response.status_code}"})
            response.close()
            return
        while response.raw.read1(65536):
            pass
        response.close()
        results.append({"ttft": first - sent, "done": time.monotonic() - started})
    except gevent.Timeout:
        results.append({"ttft": None, "error": "no first token in time"})
    except (requests.RequestException, OSError) as exc:
        results.append({"ttft": None, "error": type(exc).__name__})


def run(contender, schedule, args):
    contender.start()
    try:
        session = client_session(2048)
        results = []
        greenlets = []
        started = time.monotonic()
        for at, messages in schedule:
            delay = started + at - time.monotonic()
            if delay > 0:
                gevent.sleep(delay)
            greenlets.append(gevent.spawn(one_request, session, contender.url, messages, args,
                                          started, results))
        gevent.joinall(greenlets)
        session.close()
    finally:
        contender.stop()
    stats = [requests.get(b.url + "/_sim/stats", timeout=5).json() for b in contender.fleet]
    for backend in contender.fleet:
        requests.post(backend.url + "/_sim/reset", timeout=5)
    answered = sorted(r["ttft"] for r in results if r["ttft"] is not None)
    errors = collections.Counter(r["error"] for r in results if r["ttft"] is None)
    if errors:
        print(f"{contender.name}: unanswered {dict(errors)}", file=sys.stderr)
    eligible = sum(s["cache_eligible"] for s in stats)
    return {
        "contender": contender.name,
        "p50": statistics.quantiles(answered, n=100)[49] if len(answered) > 1 else None,
        "p99": statistics.quantiles(answered, n=100)[98] if len(answered) > 1 else None,
        "unanswered": 1 - len(answered) / len(results),
        "throughput": len(answered) / max(r["done"] for r in results if r["ttft"] is not None)
        if answered else 0.0,
        "cache_hits": sum(s["cache_hits"] for s in stats) / eligible if eligible else None,
    }


def label(name):
    if name.startswith("rust:"):
        return f"vllm-router `{name.split(':', 1)[1]}`"
    return f"forwarder `{name}`"


def table(rows):
    lines = ["| router | TTFT p50 (s) | TTFT p99 (s) | unanswered | throughput (req/s) "
             "| prefix-cache hits |", "| --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        hits = "n/a" if row["cache_hits"] is None else f"{row['cache_hits']:.0%}"
        lines.append(f"| {label(row['contender'])} | {row['p50']:.2f} | {row['p99']:.2f} "
                     f"| {row['unanswered']:.1%} | {row['throughput']:.1f} | {hits} |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    names = args.contenders.split(",")
    if any(n.startswith("rust:") for n in names) and not args.vllm_router:
        print("vllm-router not found (pip install -r bench/requirements.txt, or --vllm-router "
              "PATH): its rows are left out", file=sys.stderr)
        names = [n for n in names if not n.startswith("rust:")]
    log_dir = Path(tempfile.mkdtemp(prefix="fleet-sim-"))
    probe = workload(args, 1.0)
    rate = args.load * fleet_capacity(args, probe)
    schedule = workload(args, rate)
    print(f"fleet: {args.backends} backends, capacity {args.capacity} each, backend 0 "
          f"{args.slowdown:g}x slower; {fleet_capacity(args, schedule):.1f} req/s capacity; "
          f"arrivals {rate:.1f} req/s ({args.load:.0%}) for {args.seconds:g} s = "
          f"{len(schedule)} requests, {args.session_share:.0%} in sessions; logs in {log_dir}",
          file=sys.stderr)
    fleet = start_fleet(args, log_dir)
    rows = []
    try:
        for name in names:
            rows.append(run(Contender(name, args, fleet, log_dir), schedule, args))
            print(f"{name}: done", file=sys.stderr)
    finally:
        for backend in fleet:
            backend.stop()
    print(table(rows))


if __name__ == "__main__":
    main()
