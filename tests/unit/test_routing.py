"""Unit tests for the routing policies, the hash ring and the session key."""

import collections

import pytest

from forwarder.fleet.load import load, weight_of
from forwarder.fleet.registry import Backend, FleetView, Registry
from forwarder.relay.ledger import Ledger
from forwarder.relay.policies import POLICIES, Request, make_policy
from forwarder.relay.policies.affinity import HashRing, session_key, stable_hash
from forwarder.settings import ROUTING_POLICIES
from tests.unit.fleets import fleet, poll, serve


def test_every_routing_policy_value_has_its_policy():
    assert tuple(POLICIES) == ROUTING_POLICIES
    assert [POLICIES[name].needs_session_key for name in ROUTING_POLICIES] == [
        False, False, True]


def test_session_key_sources_in_order():
    assert session_key("s1", {"user": "u"}) == "header:s1"
    assert session_key(None, {"user": "u", "prompt": "p"}) == "user:u"
    opening = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]
    later = opening + [{"role": "assistant", "content": "a"}, {"role": "user", "content": "r"}]
    assert session_key(None, {"messages": opening}) == session_key(None, {"messages": later})
    assert session_key(None, {"messages": opening}) != session_key(
        None, {"messages": [{"role": "user", "content": "other"}]})
    long_prompt = "x" * 300
    assert session_key(None, {"prompt": long_prompt}) == session_key(
        None, {"prompt": long_prompt + " and the next turn"})
    assert session_key(None, {"model": "m"}) is None
    assert session_key(None, None) is None


def test_ring_moves_only_the_keys_of_a_removed_backend():
    table = Registry().table
    backends = [Backend(f"http://10.0.0.{i}:8101", i, table) for i in range(8)]
    keys = [stable_hash(f"k{i}".encode()) for i in range(4000)]
    before = HashRing(backends)
    after = HashRing(backends[1:])
    homes = [next(before.walk(k)) for k in keys]
    share = collections.Counter(homes)
    assert max(share.values()) < 1.6 * len(keys) / len(backends)
    for key, home in zip(keys, homes):
        if home is not backends[0]:
            assert next(after.walk(key)) is home


def test_affinity_never_exceeds_the_load_bound():
    registry = fleet(4)
    policy = make_policy("affinity", registry)
    group = registry.view.serving(None)
    # Every request names the same session: bounded load must still spread them.
    for _ in range(100):
        loads = [b.in_flight for b in group.members]
        chosen = policy.pick(group.members, Request("one-hot-session"))
        bound = max(1, 1.25 * (sum(loads) + 1) / 4)
        assert chosen.in_flight + 1 <= bound or chosen.in_flight == min(loads)
        chosen.acquire(16)
    assert max(b.in_flight for b in group.members) <= 1.25 * 100 / 4


def test_least_loaded_prefers_the_least_loaded_and_breaks_ties_at_random():
    registry = fleet(3)
    busy, idle, other = registry.backends()
    poll(registry, busy, num_requests_running=0, num_requests_waiting=5)
    other.acquire(16)
    policy = make_policy("least_loaded", registry)
    group = registry.view.serving(None)
    assert {policy.pick(group.members, Request()) for _ in range(50)} == {idle}
    assert policy.pick((busy, other), Request()) is other
    other.release(16)
    assert {policy.pick(group.members, Request()) for _ in range(50)} == {idle, other}


def test_fleet_view_groups_by_model():
    registry = fleet(3)
    a, b, anything = registry.backends()
    serve(registry, a, "m1")
    serve(registry, b, "m2")
    view = registry.view
    assert not view.uniform_models
    assert set(view.serving("m1").members) == {a, anything}
    assert set(view.serving("nope").members) == {anything}
    assert isinstance(view, FleetView) and view.models_body.startswith(b'{"object":"list"')


def test_a_request_weighs_its_size_until_its_first_token():
    registry = fleet(1)
    (backend,) = registry.backends()
    weight = weight_of(40 * 1024, 4096)  # 1 + 40 KiB / 4 KiB
    assert weight_of(40 * 1024, 0) == weight_of(0, 4096)  # counting requests
    ledger = Ledger(limits=None)
    ledger.take_backend(backend, weight)
    assert load(backend) == 11
    ledger.prefilled()
    assert load(backend) == 1
    ledger.close()
    assert load(backend) == 0 and backend.in_flight == 0


def test_a_nearly_full_kv_cache_counts_up_to_16_requests_more():
    registry = fleet(2)
    full, roomy = registry.backends()
    poll(registry, full, num_requests_running=0, num_requests_waiting=0, kv_cache_usage=0.95)
    poll(registry, roomy, num_requests_running=4, num_requests_waiting=3, kv_cache_usage=0.2)
    policy = make_policy("least_loaded", registry)
    assert load(full) == pytest.approx(8) and load(roomy) == 7
    assert {policy.pick((full, roomy), Request()) for _ in range(20)} == {roomy}
    poll(registry, roomy, num_requests_running=8, num_requests_waiting=3, kv_cache_usage=0.2)
    assert {policy.pick((full, roomy), Request()) for _ in range(20)} == {full}  # far busier


def test_a_moved_session_is_remembered_in_the_host_table():
    # A policy made afresh over the same table (a new worker's, say) finds where the session
    # went: the move is in the table, not in the policy object. (Two real workers:
    # tests/e2e/test_routing.py.)
    registry = fleet(3)
    first = make_policy("affinity", registry)
    group = registry.view.serving(None).members
    home = next(first.ring().walk(stable_hash(b"s-1")))
    poll(registry, home, num_requests_running=50, num_requests_waiting=0)
    moved = first.pick(group, Request("s-1"))
    assert moved is not home
    poll(registry, home, num_requests_running=0, num_requests_waiting=0)
    # Home is idle again, but the session's cache is where it moved: it stays there.
    second = make_policy("affinity", registry)
    assert {second.pick(group, Request("s-1")) for _ in range(5)} == {moved}
