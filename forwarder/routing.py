"""Choosing the backend for one request: the `ROUTING_POLICY`, applied to the fleet's view.

- `random`: any candidate, uniformly.
- `least_loaded`: the candidate with the least load, ties broken at random. A backend's load is

      load = max(0, running + waiting − counted) + weight in flight / WEIGHT_UNITS
             + KV_FULL_PENALTY × max(0, kv − KV_NEARLY_FULL) / (1 − KV_NEARLY_FULL)

  where `running` and `waiting` are its scraped `num_requests_*`, `counted` the instance's
  requests in flight to it when they were scraped (already in those figures), `weight in
  flight` the weight of the instance's requests in flight to it now, all workers together
  (`registry.weight_of`: 1 + body bytes / 4 KiB per request until its first token, the prefill
  that grows with the prompt; 1 after), and `kv` its scraped KV-cache use: a cache past 90 %
  counts up to 16 requests more, so a backend about to preempt is avoided while another has
  room and is not that much busier. Because each pick raises the chosen backend's figure at
  once, a burst between two polls spreads request by request instead of piling onto the backend
  that looked idlest at the last poll. (Two random choices, the usual remedy for stale figures,
  measured worse here, and so did avoiding a nearly full cache outright, on a figure up to a poll
  old: `bench/fleet_sim.py`.)
- `affinity`: consistent hashing with bounded loads. A session key maps to its home on the ring;
  a backend is skipped when taking the request would lift its load (the same load, the requests
  in flight weighed by size) over 1.25 × the average (`load + 1 > 1.25 × (total load + 1) /
  candidates`), so a session moves when its backend is down or overloaded. A session that moved
  is remembered in the host table, by every worker and over a reload, and stays where it moved
  (its prefix cache is there now) until that backend is down or over the bound too.

Candidates are the healthy backends that serve the request's model (`FleetView.serving`).
"""

import bisect
import hashlib
import json
import random

from .registry import WEIGHT_UNITS

SESSION_HEADER = "X-Session-ID"
# Bounded load: no backend takes a session while over this multiple of the average load.
LOAD_BOUND = 1.25
# A KV cache this full is about to preempt and recompute: avoided while another has room.
KV_NEARLY_FULL = 0.9
# Past KV_NEARLY_FULL a backend counts up to this many requests busier (at a full cache), so it
# is avoided while another with room is less busy than that, without the whole fleet piling onto
# one backend on a figure up to a poll old.
KV_FULL_PENALTY = 16.0
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


def load(backend) -> float:
    """Requests queued at or running on the backend, in requests of weight 1, as far as the
    instance knows (see the module docstring)."""
    scraped = (backend.num_requests_running or 0) + (backend.num_requests_waiting or 0)
    pressure = max(0.0, (backend.kv_cache_usage or 0.0) - KV_NEARLY_FULL) / (1 - KV_NEARLY_FULL)
    return (max(0, scraped - backend.in_flight_at_poll) + backend.in_flight_weight / WEIGHT_UNITS
            + KV_FULL_PENALTY * pressure)


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


class Router:
    """One worker's routing policy and, for `affinity`, its ring (the sessions that moved are in
    the host table, shared by every worker)."""

    def __init__(self, policy: str, registry):
        self.registry = registry
        self.needs_session_key = policy == "affinity"
        self._policy = self.policies()[policy]
        self._ring = HashRing(())
        self._ring_of = ()

    def policies(self) -> dict:
        """Each value of ROUTING_POLICY (`settings.ROUTING_POLICIES`) and its method."""
        return {"random": self._random, "least_loaded": self._least_loaded,
                "affinity": self._affinity}

    def ring(self) -> "HashRing":
        """The ring over every listed backend, rebuilt only when the list changes."""
        listed = self.registry.listed
        if listed is not self._ring_of:
            self._ring = HashRing(listed)
            self._ring_of = listed
        return self._ring

    def pick(self, members: tuple, key: "str | None", weight: int = WEIGHT_UNITS):
        """One of the candidate backends `members` for a request of `weight`, or None."""
        if len(members) < 2:
            return members[0] if members else None
        return self._policy(members, key, weight / WEIGHT_UNITS)

    @staticmethod
    def _random(members, key, weight):
        return random.choice(members)

    @staticmethod
    def _least_loaded(members, key, weight):
        # `min` keeps the first of equals: starting at a random place breaks ties at random.
        start = random.randrange(len(members))
        return min(members[start:] + members[:start], key=load)

    def _affinity(self, members, key, weight):
        if key is None:
            return self._least_loaded(members, None, weight)
        loads = {backend: load(backend) for backend in members}
        # The bound: with this request, no more than LOAD_BOUND × the average (but room for one
        # request even on an idle fleet). The request itself counts as one: counted at its size,
        # a long conversation's next turn would fit only on an idle backend, and leave its
        # prefix cache behind (measured: bench/fleet_sim.py).
        bound = max(1.0, LOAD_BOUND * (sum(loads.values()) + 1) / len(loads))
        key_hash = stable_hash(key.encode())
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
