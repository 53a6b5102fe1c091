"""CPU per call of the host table's operations on the request path and in the poller.

    python bench/host_table_ops.py [--backends 100] [--iterations 20000]

Builds one worker's `Registry` over a private `HostTable` listing `--backends` backends, all
healthy, with 1, 2 and 8 worker slots in use (host-wide sums run over the slots in use), and
prints microseconds of process CPU (`time.process_time`) per call of each operation: the
in-flight sums (`least_loaded` reads one per candidate, the brake one more), a request's
place taken and given back through its ledger, the picks and the brake's checks over 4 candidates, `Registry.sync` with
nothing changed and after one backend's column changed (what every request and every 50 ms
poller tick pay once a poll landed: it looks at every listed backend's column version and
mirrors the changed one), what a poll writes (`Registry.record_poll`), a poller tick with no
poll due, and reading the load figures from the real 88 KB `/metrics` body.
"""

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

# As under gunicorn (the in-flight gauge lives in a file), before prometheus_client is imported.
os.environ["PROMETHEUS_MULTIPROC_DIR"] = METRICS_DIR = tempfile.mkdtemp(prefix="bench-metrics-")
os.environ.setdefault("IP_LIST_FILE", os.devnull)

from bench.fake_backend import METRICS_BODY  # noqa: E402
from forwarder import settings  # noqa: E402
from forwarder.fleet import vllm_metrics  # noqa: E402
from forwarder.fleet.load import WEIGHT_UNITS, load  # noqa: E402
from forwarder.fleet.poller import Poller  # noqa: E402
from forwarder.fleet.registry import Registry  # noqa: E402
from forwarder.host.layout import Slot
from forwarder.relay.brake import Brake  # noqa: E402
from forwarder.relay.ledger import Ledger  # noqa: E402
from forwarder.relay.policies import Request, make_policy  # noqa: E402

# A poll's figures, as `vllm_metrics.read_load` gives them.
FIGURES = {"num_requests_running": 3.0, "num_requests_waiting": 0.0, "kv_cache_usage": 0.25}
CANDIDATES = 4


def per_call_us(call, iterations: int) -> float:
    """Microseconds of process CPU per call, after a warm-up."""
    for _ in range(min(1000, iterations)):
        call()
    started = time.process_time()
    for _ in range(iterations):
        call()
    return (time.process_time() - started) / iterations * 1e6


def fleet(backends: int, slots: int) -> Registry:
    """A worker's registry over a private table listing `backends` healthy backends, with
    `slots` worker slots in use (this worker's and `slots - 1` siblings')."""
    registry = Registry()
    table = registry.table
    for _ in range(slots - 1):
        table.claim_slot()
    table.refresh_slots_in_use()
    urls = [f"http://10.0.{i // 250}.{i % 250 + 1}:8101" for i in range(backends)]
    registry.publish_list(urls, {}, "bench")
    for backend in registry.listed:
        registry.record_poll(backend, True, figures=FIGURES)
    registry.sync()
    return registry


def idle_poller(registry: Registry) -> Poller:
    """This worker's poller with every poll and the list's next reading far off."""
    poller = Poller(registry, settings.current())
    poller.list_due = float("inf")
    poller.due = {backend.url: float("inf") for backend in registry.listed}
    return poller


def operations(registry: Registry) -> "list[tuple[str, object]]":
    """(name, call) of every operation timed, over `registry`."""
    table = registry.table
    backend = registry.listed[0]
    members = registry.healthy[:CANDIDATES]
    random_policy = make_policy("random", registry)
    least_loaded = make_policy("least_loaded", registry)
    request = Request()
    # The brake on, with a limit no request reaches.
    limited = Brake(dataclasses.replace(settings.current(), max_in_flight_per_backend=1 << 30),
                    table)
    poller = idle_poller(registry)

    def acquire_release():
        table.acquire(backend.column, WEIGHT_UNITS)
        table.release(backend.column, WEIGHT_UNITS)

    def ledger_take_give_back():
        ledger = Ledger(limits=None)
        ledger.take_backend(backend, WEIGHT_UNITS)
        ledger.close()

    def brake():
        limited.with_room(members)
        limited.must_wait()

    def changed(call):
        def after_a_poll():
            table.changed(backend.column)
            call()
        return after_a_poll

    return [
        ("HostTable.in_flight (one backend)", lambda: table.in_flight(backend.column)),
        ("HostTable.in_flight_weight (one backend)",
         lambda: table.in_flight_weight(backend.column)),
        ("HostTable.slot_sum(Slot.QUEUED)", lambda: table.slot_sum(Slot.QUEUED)),
        ("HostTable.acquire + release", acquire_release),
        ("Ledger: take a backend's place and give it back (with the gauge)",
         ledger_take_give_back),
        ("fleet.load.load (one backend)", lambda: load(backend)),
        (f"pick, random, {CANDIDATES} candidates", lambda: random_policy.pick(members, request)),
        (f"pick, least_loaded, {CANDIDATES} candidates",
         lambda: least_loaded.pick(members, request)),
        (f"brake: with_room + must_wait, {CANDIDATES} candidates", brake),
        ("Registry.sync, nothing changed", registry.sync),
        ("Registry.sync after one backend's column changed", changed(registry.sync)),
        ("Registry.record_poll (one healthy poll)",
         lambda: registry.record_poll(backend, True, figures=FIGURES)),
        ("Poller.tick, no poll due, nothing changed", poller.tick),
        ("Poller.tick, no poll due, after one backend's column changed",
         changed(poller.tick)),
    ]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", type=int, default=100)
    parser.add_argument("--iterations", type=int, default=20000)
    args = parser.parse_args()
    slot_counts = (1, 2, 8)
    columns = {}
    for slots in slot_counts:
        for name, call in operations(fleet(args.backends, slots)):
            columns.setdefault(name, []).append(per_call_us(call, args.iterations))
    body = METRICS_BODY
    read_load = per_call_us(lambda: vllm_metrics.read_load(body.decode("utf-8", "replace")),
                            max(1, args.iterations // 100))
    shutil.rmtree(METRICS_DIR, ignore_errors=True)
    print(f"µs of CPU per call, {args.backends} backends listed, {args.iterations:,} "
          f"iterations, by worker slots in use\n")
    print("| operation | " + " | ".join(f"{n} slot{'s' * (n > 1)}" for n in slot_counts) + " |")
    print("| --- |" + " ---: |" * len(slot_counts))
    for name, figures in columns.items():
        print(f"| {name} | " + " | ".join(f"{us:.2f}" for us in figures) + " |")
    print(f"\nvllm_metrics.read_load of the {len(body) / 1000:.0f} KB /metrics body, decoded: "
          f"{read_load:,.0f} µs per call")


if __name__ == "__main__":
    main()
