"""The fleet as routing sees it, rebuilt when the registry changes and never per request.

`FleetView` holds the healthy backends, which of them serve which model, and the merged
`/v1/models` answer; the registry rebuilds it when a backend's health or model list changes.
`HashRing` places every listed backend on a consistent-hash ring for session affinity; it is
built over the whole list, healthy or not, so that a session's home does not move when another
backend goes down or comes back, and only when the list itself changes.
"""

import bisect
import hashlib

from .models import merged_models_body

# Points per backend on the ring: enough that each backend's share of keys is within a few
# percent of even, few enough that a list of thousands of backends sorts in milliseconds.
RING_POINTS_PER_BACKEND = 64


def stable_hash(data: bytes) -> int:
    """A 64-bit hash that every worker and every replica computes alike (`hash()` is salted)."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


class Group:
    """Backends that may take a request: a tuple to pick from and a set to test membership."""

    __slots__ = ("members", "member_set")

    def __init__(self, members):
        self.members = tuple(members)
        self.member_set = frozenset(self.members)

    def without(self, tried) -> "Group":
        return Group(b for b in self.members if b not in tried)


class FleetView:
    """The healthy backends and the models they serve, as of the last change."""

    __slots__ = ("healthy", "all_healthy", "uniform_models", "_by_model", "_any_model",
                 "models_body")

    def __init__(self, backends):
        self.healthy = tuple(b for b in backends if b.healthy)
        self.all_healthy = Group(self.healthy)
        # When every healthy backend serves the same models (or every one serves any model), the
        # model of a request changes nothing about where it may go, and whichever backend gets
        # it answers vLLM's own 404 for a model it lacks: the request body need not be parsed.
        self.uniform_models = len({None if b.models is None else frozenset(b.models)
                                   for b in self.healthy}) <= 1
        any_model = [b for b in self.healthy if b.models is None]
        serving = {}
        for backend in self.healthy:
            for model in backend.models or ():
                serving.setdefault(model, []).append(backend)
        self._by_model = {model: Group(backends + any_model)
                          for model, backends in serving.items()}
        self._any_model = Group(any_model)
        self.models_body = merged_models_body(self.healthy)

    def serving(self, model: "str | None") -> Group:
        """The healthy backends a request for `model` may go to (all of them when the model is
        unknown or every backend serves the same models)."""
        if model is None or self.uniform_models:
            return self.all_healthy
        return self._by_model.get(model, self._any_model)


class HashRing:
    """Every listed backend at `RING_POINTS_PER_BACKEND` points of a 64-bit ring."""

    __slots__ = ("_hashes", "_backends", "_distinct")

    def __init__(self, backends):
        points = sorted(((stable_hash(f"{b.url}#{i}".encode()), b.url, b)
                         for b in backends for i in range(RING_POINTS_PER_BACKEND)),
                        key=lambda point: point[:2])
        self._hashes = [point[0] for point in points]
        self._backends = [point[2] for point in points]
        self._distinct = len({point[1] for point in points})

    def walk(self, key_hash: int):
        """Each backend once, clockwise from the key's place: its home first."""
        if not self._backends:
            return
        start = bisect.bisect(self._hashes, key_hash)
        count = len(self._backends)
        seen = set()
        for offset in range(count):
            backend = self._backends[(start + offset) % count]
            if backend not in seen:
                seen.add(backend)
                yield backend
                if len(seen) == self._distinct:
                    return
