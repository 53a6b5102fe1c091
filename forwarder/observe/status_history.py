"""The last minutes of requests, errors and tokens per second, per backend and per API key, for the
`/_status` page (`GET /_status/data`).

Every worker counts what it relays in its own cells of the host table (`metrics.Exchange`);
the sums over workers are the instance's. Each worker samples those sums every SAMPLE_SECONDS and
keeps the last HISTORY_SAMPLES, so whichever worker answers shows the same figures (sampled a few
milliseconds apart); a worker that has just started shows a shorter past.
"""

import collections
import time

import gevent

from ..host.layout import BackendCount, KeyCount

SAMPLE_SECONDS = 10.0
# Ten minutes of samples.
HISTORY_SAMPLES = 61


class Recorder:
    """One worker's samples of the instance's counters."""

    def __init__(self, registry, keys):
        self.registry = registry
        self.keys = keys
        self.samples = collections.deque(maxlen=HISTORY_SAMPLES)

    def run_forever(self) -> None:
        while True:
            self.sample()
            gevent.sleep(SAMPLE_SECONDS)

    def sample(self) -> None:
        self.samples.append(self._now())

    def _now(self):
        table = self.registry.table
        self.registry.sync()
        self.keys.sync()
        backends = {b.url: (table.backend_sum(BackendCount.REQUESTS, b.column),
                            table.backend_sum(BackendCount.ERRORS, b.column),
                            table.backend_sum(BackendCount.TOKENS, b.column))
                    for b in self.registry.listed}
        keys = {}
        for key in self.keys.all():
            figures = (table.key_sum(KeyCount.REQUESTS, key.column),
                       table.key_sum(KeyCount.ERRORS, key.column),
                       table.key_sum(KeyCount.TOKENS, key.column))
            so_far = keys.get(key.label, (0, 0, 0))  # keys without a name are one: `none`
            keys[key.label] = tuple(a + b for a, b in zip(so_far, figures))
        return time.time(), backends, keys

    def document(self) -> dict:
        """`/_status/data`: per backend and per key name, requests, errors and tokens per second
        over each sampling interval, oldest first, the last one ending now, with the time each
        interval ended."""
        samples = list(self.samples) + [self._now()]
        pairs = list(zip(samples, samples[1:]))
        return {
            "interval_seconds": SAMPLE_SECONDS,
            "times": [round(later[0], 3) for _, later in pairs],
            "backends": _series(pairs, 1),
            "keys": _series(pairs, 2),
        }


def _series(pairs, index: int) -> dict:
    names = list(pairs[-1][1][index]) if pairs else []
    series = {}
    for name in names:
        rates = {"requests_per_second": [], "errors_per_second": [], "tokens_per_second": []}
        for earlier, later in pairs:
            seconds = max(later[0] - earlier[0], 1e-9)
            # Counts start at 0 when a backend or key is added.
            before = earlier[index].get(name, (0, 0, 0))
            after = later[index].get(name)
            for field, figure in zip(rates, range(3)):
                if after is None:
                    rates[field].append(None)
                else:
                    rates[field].append(round(max(0, after[figure] - before[figure]) / seconds,
                                              3))
        series[name] = rates
    return series


_shared = None


def shared(registry, keys) -> Recorder:
    """This worker's recorder (the worker runs it; `/_status/data` reads it)."""
    global _shared
    if _shared is None:
        _shared = Recorder(registry, keys)
    return _shared
