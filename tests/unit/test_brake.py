"""Unit tests for the brake (`forwarder/relay/brake.py`) through the dispatcher: a real registry
of two made-up backends, MAX_IN_FLIGHT_PER_BACKEND=1, requests as greenlets whose send answers at
once, places freed by hand, and a fake clock: time passes only when a test says so, and the
brake's rules are applied when the test calls `tick` (what its ticker does every 5 ms)."""

import types

import gevent
import pytest

from forwarder import settings
from forwarder.errors import Rejected
from forwarder.fleet.ejection import Ejection
from forwarder.host.layout import Slot
from forwarder.observe import metrics
from forwarder.relay.brake import Brake
from forwarder.relay.dispatch import Dispatcher, Outgoing
from forwarder.relay.ledger import Ledger
from forwarder.relay.policies import make_policy
from tests.unit.fleets import fleet

OK = types.SimpleNamespace(status=200)


class Clock:
    def __init__(self):
        self.now = 5000.0

    def __call__(self):
        return self.now


class Fleet:
    """Two backends, their dispatcher and its brake, under the given settings."""

    def __init__(self, **overrides):
        environ = {"IP_LIST_FILE": __file__, "MAX_IN_FLIGHT_PER_BACKEND": "1"}
        environ.update({name.upper(): str(value) for name, value in overrides.items()})
        self.settings = settings.load(environ)
        self.clock = Clock()
        self.registry = fleet(2)
        self.brake = Brake(self.settings, self.registry.table, clock=self.clock)
        self.dispatcher = Dispatcher(
            self.registry, make_policy("least_loaded", self.registry), self.settings,
            Ejection(self.registry, 5, 30), self.brake if self.brake.limit else None,
            clock=self.clock)
        self.sent = []  # (name, backend) in the order they went
        self.ledgers = {}  # backend -> the ledgers holding a place there, oldest first

    def request(self, name, priority=0, client="c"):
        """A greenlet sending one request, run until it was sent or queued (or refused): its
        value is the backend, or the Rejected."""

        def attempt(backend):
            self.sent.append((name, backend))
            return OK

        def run():
            ledger = Ledger(limits=None, brake=self.brake)
            try:
                backend, _ = self.dispatcher.send(Outgoing(
                    attempt, priority_of=lambda: priority, client=client), ledger)
            except BaseException as exc:
                ledger.close()
                if isinstance(exc, Rejected):
                    return exc
                raise
            self.ledgers.setdefault(backend, []).append(ledger)
            return backend

        queued, sent = self.queued(), len(self.sent)
        greenlet = gevent.spawn(run)
        settle(lambda: greenlet.ready() or self.queued() > queued or len(self.sent) > sent)
        return greenlet

    def queued(self):
        return self.registry.table.slot_sum(Slot.QUEUED)

    def free(self, backend):
        """The oldest request at `backend` is over: its ledger closes."""
        self.ledgers[backend].pop(0).close()
        settle(lambda: True)

    def wait(self, seconds):
        """`seconds` pass, and the brake's ticker looks at the queue."""
        self.clock.now += seconds
        self.brake.tick()
        settle(lambda: True)


def settle(done, turns=200):
    """Let the other greenlets run until `done()` (a few turns of the loop at most)."""
    for _ in range(turns):
        if done():
            break
        gevent.sleep(0)
    gevent.sleep(0)


def test_a_request_past_the_limit_waits_and_takes_the_first_place_that_frees():
    brake = Fleet()
    first, second = brake.request("1"), brake.request("2")
    a, b = first.get(timeout=1), second.get(timeout=1)
    assert {a, b} == set(brake.registry.backends())
    third = brake.request("3")
    assert not third.ready() and brake.queued() == 1
    brake.free(b)
    assert third.get(timeout=1) is b  # late binding: where a place freed, not where it queued
    assert brake.queued() == 0


def test_a_full_queue_refuses_at_once():
    brake = Fleet(max_queued_requests=1)
    brake.request("1"), brake.request("2")
    waiting = brake.request("3")
    refused = brake.request("4").get(timeout=1)
    assert isinstance(refused, Rejected) and refused.reason == "queue_full"
    assert refused.response().status_code == 429
    assert refused.response().headers["Retry-After"] == "1"
    assert refused.response().json["error"]["type"] == "RateLimitError"
    assert not waiting.ready() and brake.queued() == 1


def test_a_request_waits_no_longer_than_the_queue_timeout():
    brake = Fleet(queue_timeout_seconds=2, queue_target_seconds=10)
    brake.request("1"), brake.request("2")
    waiting = brake.request("3")
    brake.wait(1.9)
    assert not waiting.ready()
    brake.wait(0.1)
    refused = waiting.get(timeout=1)
    assert isinstance(refused, Rejected) and refused.reason == "queue_timeout"
    assert brake.queued() == 0


def test_a_standing_queue_refuses_what_waited_the_target_and_serves_what_did_not():
    brake = Fleet(queue_target_seconds=0.2)
    before = metrics.REJECTED.labels("queue_overload")._value.get()
    brake.request("1"), brake.request("2")
    old = brake.request("old")
    brake.clock.now += 0.3
    fresh = brake.request("fresh")
    brake.wait(0)
    refused = old.get(timeout=1)
    assert isinstance(refused, Rejected) and refused.reason == "queue_overload"
    assert not fresh.ready()  # waited less than the target
    brake.free(brake.sent[0][1])
    assert fresh.get(timeout=1) is brake.sent[0][1]
    assert metrics.REJECTED.labels("queue_overload")._value.get() == before + 1


def test_a_queue_that_empties_in_time_refuses_nothing():
    brake = Fleet(queue_target_seconds=0.2)
    a = brake.request("1").get(timeout=1)
    brake.request("2")
    waiting = brake.request("3")
    brake.wait(0.1)
    brake.free(a)
    assert waiting.get(timeout=1) is a
    late = brake.request("4")
    brake.wait(0.15)  # the queue emptied in between: its standing time starts again
    assert not late.ready() and brake.queued() == 1


def test_the_queue_is_served_by_priority_then_arrival():
    brake = Fleet()
    a, b = brake.request("1").get(timeout=1), brake.request("2").get(timeout=1)
    late = brake.request("late", priority=5)
    first = brake.request("first", priority=0)
    second = brake.request("second", priority=0)
    brake.free(a)  # one place at a time
    brake.free(b)
    brake.free(brake.sent[2][1])
    gevent.joinall([late, first, second], timeout=1)
    assert [name for name, _ in brake.sent[2:]] == ["first", "second", "late"]


def test_clients_take_turns_within_a_priority():
    brake = Fleet()
    held = [brake.request("1").get(timeout=1), brake.request("2").get(timeout=1)]
    burst = [brake.request(f"x{i}", client="x") for i in range(3)]
    other = brake.request("y0", client="y")
    for index in range(4):
        brake.free(held[index % 2] if index < 2 else brake.sent[index][1])
    gevent.joinall(burst + [other], timeout=1)
    assert [name for name, _ in brake.sent[2:]] == ["x0", "y0", "x1", "x2"]


def test_a_client_that_leaves_leaves_the_queue_at_once():
    brake = Fleet()
    brake.request("1"), brake.request("2")
    waiting = brake.request("3")
    assert brake.queued() == 1
    waiting.kill()  # what the client watch does when the client goes
    assert brake.queued() == 0


def test_a_new_request_does_not_jump_the_queue():
    brake = Fleet()
    a = brake.request("1").get(timeout=1)
    brake.request("2").get(timeout=1)
    waiting = brake.request("waiting")
    brake.ledgers[a].pop(0).close()  # a place frees, and at that moment another arrives
    newcomer = brake.request("newcomer")
    assert waiting.get(timeout=1) is a
    assert not newcomer.ready() and brake.queued() == 1


def test_without_a_limit_nothing_waits():
    brake = Fleet(max_in_flight_per_backend=0)
    results = [brake.request(str(i)).get(timeout=1) for i in range(10)]
    assert all(not isinstance(r, Rejected) for r in results)
    assert brake.queued() == 0


@pytest.fixture(autouse=True)
def _no_leftover_greenlets():
    yield
    gevent.sleep(0)
