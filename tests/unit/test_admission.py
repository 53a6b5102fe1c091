"""Unit tests for the brake (`forwarder/admission.py`) through the dispatcher: a real registry of
two made-up backends, MAX_IN_FLIGHT_PER_BACKEND=1, requests as greenlets whose send answers at
once, and places freed by hand."""

import types

import gevent
import pytest

from forwarder import settings, telemetry
from forwarder.admission import Admission, Rejected
from forwarder.dispatch import Dispatcher, Outgoing
from forwarder.host_table import S_QUEUED
from forwarder.routing import Router
from tests.unit.fleets import fleet

OK = types.SimpleNamespace(status=200)


class Brake:
    """Two backends, their dispatcher and its admission, under the given settings."""

    def __init__(self, **overrides):
        environ = {"IP_LIST_FILE": __file__, "MAX_IN_FLIGHT_PER_BACKEND": "1"}
        environ.update({name.upper(): str(value) for name, value in overrides.items()})
        self.settings = settings.load(environ)
        self.registry = fleet(2)
        self.admission = Admission(self.settings, self.registry.table)
        self.dispatcher = Dispatcher(self.registry, Router("least_loaded", self.registry),
                                     self.settings, self.admission)
        self.sent = []  # (name, backend) in the order they went

    def request(self, name, priority=0, client="c"):
        """A greenlet sending one request: its value is the backend, or the Rejected."""

        def attempt(backend):
            self.sent.append((name, backend))
            return OK

        def run():
            try:
                backend, _ = self.dispatcher.send(Outgoing(
                    attempt, priority_of=lambda: priority, client=client))
            except Rejected as rejected:
                return rejected
            return backend

        greenlet = gevent.spawn(run)
        gevent.sleep(0.001)  # it arrives, and queues if it must, before the next one
        return greenlet

    def queued(self):
        return self.registry.table.slot_sum(S_QUEUED)

    def free(self, backend):
        self.dispatcher.release(backend, 16)


def test_a_request_past_the_limit_waits_and_takes_the_first_place_that_frees():
    brake = Brake()
    first, second = brake.request("1"), brake.request("2")
    a, b = first.get(timeout=1), second.get(timeout=1)
    assert {a, b} == set(brake.registry.backends())
    third = brake.request("3")
    gevent.sleep(0.05)
    assert not third.ready() and brake.queued() == 1
    brake.free(b)
    assert third.get(timeout=1) is b  # late binding: where a place freed, not where it queued
    assert brake.queued() == 0


def test_a_full_queue_refuses_at_once():
    brake = Brake(max_queued_requests=1)
    brake.request("1"), brake.request("2")
    waiting = brake.request("3")
    refused = brake.request("4").get(timeout=1)
    assert isinstance(refused, Rejected) and refused.reason == "queue_full"
    assert refused.response().status_code == 429
    assert refused.response().headers["Retry-After"] == "1"
    assert refused.response().json["error"]["type"] == "RateLimitError"
    assert not waiting.ready()


def test_a_request_waits_no_longer_than_the_queue_timeout():
    brake = Brake(queue_timeout_seconds=0.2, queue_target_seconds=10)
    brake.request("1"), brake.request("2")
    refused = brake.request("3").get(timeout=2)
    assert isinstance(refused, Rejected) and refused.reason == "queue_timeout"
    assert brake.queued() == 0


def test_a_standing_queue_refuses_what_waited_the_target_and_serves_what_did_not():
    brake = Brake(queue_target_seconds=0.2)
    before = telemetry.REJECTED.labels("queue_overload")._value.get()
    brake.request("1"), brake.request("2")
    old = brake.request("old")
    gevent.sleep(0.3)
    fresh = brake.request("fresh")
    refused = old.get(timeout=1)
    assert isinstance(refused, Rejected) and refused.reason == "queue_overload"
    assert not fresh.ready()  # waited less than the target
    brake.free(brake.sent[0][1])
    assert fresh.get(timeout=1) is brake.sent[0][1]
    assert telemetry.REJECTED.labels("queue_overload")._value.get() == before + 1


def test_the_queue_is_served_by_priority_then_arrival():
    brake = Brake()
    a, b = brake.request("1").get(timeout=1), brake.request("2").get(timeout=1)
    late = brake.request("late", priority=5)
    first = brake.request("first", priority=0)
    second = brake.request("second", priority=0)
    for backend in (a, b):
        brake.free(backend)  # one place at a time
        gevent.sleep(0.02)
    brake.free(brake.sent[2][1])
    gevent.joinall([late, first, second], timeout=1)
    assert [name for name, _ in brake.sent[2:]] == ["first", "second", "late"]


def test_clients_take_turns_within_a_priority():
    brake = Brake()
    held = [brake.request("1").get(timeout=1), brake.request("2").get(timeout=1)]
    burst = [brake.request(f"x{i}", client="x") for i in range(3)]
    other = brake.request("y0", client="y")
    for index in range(4):
        brake.free(held[index % 2] if index < 2 else brake.sent[index][1])
        gevent.sleep(0.02)
    gevent.joinall(burst + [other], timeout=1)
    assert [name for name, _ in brake.sent[2:]] == ["x0", "y0", "x1", "x2"]


def test_a_client_that_leaves_leaves_the_queue_at_once():
    brake = Brake()
    brake.request("1"), brake.request("2")
    waiting = brake.request("3")
    assert brake.queued() == 1
    waiting.kill()  # what the client watch does when the client goes
    assert brake.queued() == 0


def test_a_new_request_does_not_jump_the_queue():
    brake = Brake()
    a = brake.request("1").get(timeout=1)
    brake.request("2").get(timeout=1)
    waiting = brake.request("waiting")
    brake.dispatcher.release(a, 16)  # a place frees, and at that moment another arrives
    newcomer = brake.request("newcomer")
    assert waiting.get(timeout=1) is a
    gevent.sleep(0.05)
    assert not newcomer.ready()


def test_without_a_limit_nothing_waits():
    brake = Brake(max_in_flight_per_backend=0)
    results = [brake.request(str(i)).get(timeout=1) for i in range(10)]
    assert all(not isinstance(r, Rejected) for r in results)
    assert brake.queued() == 0


@pytest.fixture(autouse=True)
def _no_leftover_greenlets():
    yield
    gevent.sleep(0)
