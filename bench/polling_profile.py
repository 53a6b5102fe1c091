"""Where an idle instance's polling CPU goes: py-spy on every worker, samples sorted by purpose.

    python bench/polling_profile.py [--workers 2] [--backends 100] [--seconds 20] [--no-pin]

Starts the fake backend on `--backends` ports (the real 88 KB `/metrics` body) and the forwarder
with `--workers` workers polling them every second (`CHECK_INTERVAL_SECONDS=1`), relaying
nothing; once every backend was polled, records every worker with `py-spy record --format raw
--gil` for `--seconds` while reading the workers' CPU time over the same window. `--gil` keeps
the samples whose thread holds the GIL, which a worker's one thread does while it runs Python:
here they added up to 65–100 % of its CPU time (without `--gil`, to about twice it, the excess
mostly in the hub's wait for events). The system calls that release the GIL (a socket's `send`,
`recv`) are not sampled, and their time is spread over the rest. Each sample goes to the first
purpose whose function is on its stack (PURPOSES, in order), and the table gives each
purpose's share of the samples and that share of the measured CPU per backend per cycle. Pinned
as `bench/run.py` pins: the forwarder on the first core, the backend on the second.
"""

import argparse
import collections
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from bench.run import Backend, Forwarder, Pins  # noqa: E402

CHECK_INTERVAL_SECONDS = 1.0
GEVENT = "gevent: hub, switches, timers (no poller frame, or no Python frame at all)"
# (purpose, functions as py-spy names them: `name (path:line)`, with or without the class).
PURPOSES = (
    ("the /v1/models reads, read and stored",
     ("read_models (forwarder/poller.py", "write_models (forwarder/registry.py")),
    ("load figures: prometheus-client's parser on the wanted lines",
     ("_combine (forwarder/vllm_metrics.py",)),
    ("load figures: finding the wanted lines in the body",
     ("read_load (forwarder/vllm_metrics.py",)),
    ("HTTP: request sent, response headers read (upstream.send)",
     ("send (forwarder/upstream.py",)),
    ("HTTP: the body read, the response closed", ("exchange (forwarder/poller.py",)),
    ("the poll written: Registry.record_poll", ("record_poll (forwarder/registry.py",)),
    ("the 50 ms tick: Registry.sync (what the other workers wrote mirrored)",
     ("sync (forwarder/registry.py",)),
    ("the 50 ms tick: the rest (slots, owners, what is due, polls spawned)",
     ("tick (forwarder/poller.py",)),
    ("the list leader: the backend list (and keys) read and published",
     ("publish_list (forwarder/poller.py",)),
    ("a poll's rest: timeout, body decoded, greenlet", ("check (forwarder/poller.py",
                                                         "get (forwarder/poller.py")),
    (GEVENT, ("gevent/", "greenlet")),
)


def purpose_of(stack: str) -> str:
    if not stack:  # C code holding the GIL with no Python frame: libev's callbacks, switches
        return GEVENT
    for purpose, functions in PURPOSES:
        if any(function in stack for function in functions):
            return purpose
    # Mostly a greenlet's stack that py-spy read cut short: HTTP and parsing frames without their
    # poller frame.
    return "other, stacks cut short (mostly HTTP and parsing)"


def record(pids, seconds, workdir) -> "collections.Counter":
    """py-spy's samples of every process of `pids` over `seconds`, counted by purpose."""
    outputs = [workdir / f"py-spy-{pid}.txt" for pid in pids]
    recorders = [subprocess.Popen(
        [str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(pid),
         "--duration", str(seconds), "--rate", "1000", "--format", "raw", "--gil",
         "--nonblocking", "--output", str(output)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for pid, output in zip(pids, outputs)]
    for recorder in recorders:
        recorder.wait()
    samples = collections.Counter()
    for output in outputs:
        for line in output.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            samples[purpose_of(stack)] += int(count)
    return samples


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--backends", type=int, default=100)
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to cores")
    args = parser.parse_args(argv)
    pins = Pins(not args.no_pin)
    with tempfile.TemporaryDirectory(prefix="forwarder-bench-") as workdir:
        workdir = Path(workdir)
        backend = Backend(workdir, ports=args.backends, cpus=pins.backend)
        try:
            forwarder = Forwarder(workdir, backend.ports, workers=args.workers,
                                  cpus=pins.forwarder,
                                  env={"CHECK_INTERVAL_SECONDS": str(CHECK_INTERVAL_SECONDS)})
            try:
                time.sleep(3)  # every backend polled, the first cycle's one-time work over
                polls_before = backend.stats()["metrics"]
                cpu_before, started = forwarder.cpu_seconds(), time.monotonic()
                samples = record(forwarder.workers, args.seconds, workdir)
                wall = time.monotonic() - started
                cpu = forwarder.cpu_seconds() - cpu_before
                polls = backend.stats()["metrics"] - polls_before
            finally:
                forwarder.stop()
        finally:
            backend.stop()
    per_backend_cycle = cpu / (args.backends * wall / CHECK_INTERVAL_SECONDS) * 1e6
    total = sum(samples.values())
    print(f"{args.workers} workers polling {args.backends} backends every "
          f"{CHECK_INTERVAL_SECONDS:g} s, idle, {wall:.1f} s: {polls / wall:.1f} polls/s, the "
          f"workers {cpu / wall:.1%} of a core, {per_backend_cycle:,.0f} µs of CPU per backend "
          f"per cycle ({cpu / max(polls, 1) * 1e6:,.0f} µs per poll); {total:,} py-spy samples "
          f"({pins.description})\n")
    print("| where | share of samples | µs per backend per cycle |")
    print("| --- | ---: | ---: |")
    for purpose, count in samples.most_common():
        print(f"| {purpose} | {count / total:.1%} | {count / total * per_backend_cycle:,.0f} |")


if __name__ == "__main__":
    main()
