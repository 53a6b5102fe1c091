"""`affinity`: consistent hashing with bounded loads, so that a conversation stays where its
prefix is cached.

A session key (`session_key`) maps to its home on a ring of every listed backend. A backend is
skipped when taking the request would lift its load (`fleet.load`) over LOAD_BOUND × the
average (`load + 1 > 1.25 × (total load + 1) / candidates`), so a session moves when its home is
down or overloaded. A session that moved is remembered in the host table, by every worker and
over a reload, and stays where it moved (its prefix cache is there now) until that backend is
down or over the bound too. A request without a session key goes to the least loaded backend.
"""

import bisect
import hashlib
import json

from ...fleet.load import load
from .base import Request
from .least_loaded import least_loaded

SESSION_HEADER = "X-Session-ID"
# Bounded load: no backend takes a session while over this multiple of the average load.
LOAD_BOUND = 1.25
# Points per backend on the ring: enough that each backend's share of keys is within a few
# percent of even, few enough that a list of thousands of backends sorts in milliseconds.
RING_POINTS_PER_BACKEND = 64
# The start of a text prompt that keys a session. Each turn of a conversation sent as one growing
# prompt keeps the same key once its first turn is this long; shorter prompts are cheap to
# prefill again, so losing their cache costs little.
PROMPT_KEY_CHARS = 256


def stable_hash(data: bytes) -> int:
    """A 64-bit hash that every worker and every replica computes alike (`hash()` is salted)."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def session_key(header: "str | None", document: "dict | None") -> "str | None":
    """The key that keeps a conversation on one backend: the `X-Session-ID` header, else the
    body's `user`, else the start of the prompt (the chat messages up to the first user message,
    or the first `PROMPT_KEY_CHARS` of a text prompt); None when there is none."""
    if header:
        return "header:" + header
    if document is None:
        return None
    user = document.get("user")
    if isinstance(user, str) and user:
        return "user:" + user
    messages = document.get("messages")
    if isinstance(messages, list) and messages:
        opening = []
        for message in messages:
            opening.append(message)
            if isinstance(message, dict) and message.get("role") == "user":
                break
        return "messages:" + json.dumps(opening, sort_keys=True)
    prompt = document.get("prompt", document.get("input"))
    if isinstance(prompt, list) and prompt:
        prompt = prompt[0]
    if isinstance(prompt, str) and prompt:
        return "prompt:" + prompt[:PROMPT_KEY_CHARS]
    if prompt:
        return "prompt:" + json.dumps(prompt)[:PROMPT_KEY_CHARS]
    return None


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


class Affinity:
    """The ring over every listed backend (rebuilt only when the list changes); the sessions that
    moved are in the host table, shared by every worker."""

    name = "affinity"
    needs_session_key = True

    def __init__(self, registry):
        self.registry = registry
        self._ring = HashRing(())
        self._ring_of = ()

    def ring(self) -> HashRing:
        listed = self.registry.listed
        if listed is not self._ring_of:
            self._ring = HashRing(listed)
            self._ring_of = listed
        return self._ring

    def pick(self, members: tuple, request: Request):
        if request.session_key is None:
            return least_loaded(members)
        loads = {backend: load(backend) for backend in members}
        # The bound: with this request, no more than LOAD_BOUND × the average (but room for one
        # request even on an idle fleet). The request itself counts as one: counted at its size,
        # a long conversation's next turn would fit only on an idle backend, and leave its
        # prefix cache behind (measured: bench/fleet_sim.py).
        bound = max(1.0, LOAD_BOUND * (sum(loads.values()) + 1) / len(loads))
        key_hash = stable_hash(request.session_key.encode())
        table = self.registry.table
        moved = self.registry.at_column(table.moved_to(key_hash))
        if moved in loads and loads[moved] + 1 <= bound:
            return moved
        # The home is the key's first backend on the ring, a candidate or not: a session that
        # had to leave it (down, tried, overloaded) is remembered where it went. When every
        # candidate is at the bound (a small, evenly loaded fleet), the least loaded one nearest
        # the home takes it.
        home = chosen = lightest = None
        for backend in self.ring().walk(key_hash):
            home = home or backend
            if backend not in loads:
                continue
            if loads[backend] + 1 <= bound:
                chosen = backend
                break
            if lightest is None or loads[backend] < loads[lightest]:
                lightest = backend
        chosen = chosen or lightest
        table.move(key_hash, None if chosen is home else chosen.column)
        return chosen
