"""Unit tests for `Dispatcher.send`, one per rule of `forwarder/relay/dispatch.py`'s docstring: a
real `Registry` and routing policy hold the fleet, while the send (`attempt`), the clock and the
registry's two waits are fakes that follow a script, so every test runs in milliseconds without
the network, without sleeping and without gevent blocking; each test checks the answer (status
and message), the backends attempted in order, and what was left behind (health, `last_error`,
in-flight counts, waits, the retries counter)."""

import types

import pytest

from forwarder import settings, upstream
from forwarder.fleet.ejection import Ejection
from forwarder.fleet.registry import Registry
from forwarder.observe import metrics
from forwarder.relay.dispatch import Dispatcher, DispatchFailed, Outgoing
from forwarder.relay.ledger import Ledger
from forwarder.relay.policies import make_policy
from tests.unit.fleets import poll, publish, serve

URLS = ("http://dispatch-a.test:8101", "http://dispatch-b.test:8101",
        "http://dispatch-c.test:8101")
# The module itself is a readable file: `IP_LIST_FILE` only has to name one.
BASE_SETTINGS = settings.load({"IP_LIST_FILE": __file__})
OK = types.SimpleNamespace(status=200)  # what a backend that answered hands back


class Boom(Exception):
    """Something no rule knows about, raised by the send."""


class Runaway(Exception):
    """The fake send was called far more often than any rule allows."""


def refused():
    return upstream.ConnectFailed("connection refused")


def stale():
    return upstream.ConnectFailed("closed without an answer", stale=True)


def timed_out():
    return upstream.UpstreamTimeout("read timed out")


def broken():
    return upstream.UpstreamFailed("connection reset")


class Clock:
    """Seconds that pass only when a fake wait (or a test) says so."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


class ScriptedRegistry(Registry):
    """A real registry whose waits return at once: each records its timeout, runs the test's
    `during_*` hook (which may mark a backend healthy or end the first cycle, and returns the
    seconds it took, None for the whole timeout) and moves the fake clock on by that much."""

    def __init__(self, clock):
        super().__init__()
        self.clock = clock
        self.waits = []
        self.during_first_cycle_wait = None
        self.during_change_wait = None

    def wait_first_cycle(self, timeout):
        self.waits.append(("first_cycle", timeout))
        spent = self.during_first_cycle_wait(timeout) if self.during_first_cycle_wait else None
        self.clock.advance(timeout if spent is None else spent)
        return self.first_cycle_done

    def wait_for_change(self, timeout):
        self.waits.append(("change", timeout))
        before = self.view
        spent = self.during_change_wait(timeout) if self.during_change_wait else None
        self.clock.advance(timeout if spent is None else spent)
        return self.view is not before


class FakeSend:
    """The `attempt` callable: the outcome of each call comes from `by_url` (a list per backend
    URL, used in order, its last outcome repeated) or from `by_call` (one per call). An outcome
    is `OK` or a function making the exception to raise."""

    def __init__(self, by_url=None, by_call=None, limit=20):
        self.by_url = {url: list(outcomes) for url, outcomes in (by_url or {}).items()}
        self.by_call = list(by_call or ())
        self.limit = limit
        self.calls = []
        self.in_flight_seen = []

    def __call__(self, backend):
        self.calls.append(backend)
        self.in_flight_seen.append(backend.in_flight)
        if len(self.calls) > self.limit:
            raise Runaway(f"{len(self.calls)} sends for one request")
        if self.by_call:
            outcome = self.by_call[len(self.calls) - 1]
        else:
            outcomes = self.by_url[backend.url]
            outcome = outcomes.pop(0) if len(outcomes) > 1 else outcomes[0]
        if outcome is OK:
            return OK
        raise outcome()


class Fleet:
    """A registry of `count` backends (`a`, `b`, `c`), the router and the dispatcher over it."""

    def __init__(self, count=2, healthy=None, loads=None, policy="least_loaded",
                 first_cycle_done=True, **overrides):
        self.clock = Clock()
        self.registry = ScriptedRegistry(self.clock)
        publish(self.registry, URLS[:count])
        self.backends = self.registry.backends()
        healthy = range(count) if healthy is None else healthy
        loads = loads or [0] * count
        for index in healthy:
            # `loads` orders the backends for least_loaded, so the picks are not left to chance.
            poll(self.registry, self.backends[index], num_requests_running=loads[index],
                 num_requests_waiting=0)
        if first_cycle_done:
            self.registry.first_cycle.set()
        self.settings = _settings(**overrides)
        self.policy = make_policy(policy, self.registry)
        self.dispatcher = Dispatcher(self.registry, self.policy, self.settings,
                                     Ejection(self.registry, 5, 30), clock=self.clock)
        self.ledger = None

    def mark_healthy(self, index):
        poll(self.registry, self.backends[index], num_requests_running=0,
             num_requests_waiting=0)

    def in_flight(self):
        return [b.in_flight for b in self.backends]

    def send(self, send, model=None, **kwargs):
        """Send as the view does: a new ledger, closed if the send raises (else by `done`)."""
        self.ledger = Ledger(limits=None)
        try:
            return self.dispatcher.send(Outgoing(send, model, **kwargs), self.ledger)
        except BaseException:
            self.ledger.close()
            raise

    def done(self):
        """The answer has been relayed: the request's places are given back."""
        self.ledger.close()

    def fails(self, send, model=None, **kwargs):
        with pytest.raises(DispatchFailed) as failed:
            self.send(send, model, **kwargs)
        return failed.value


def _settings(**overrides):
    environ = {"IP_LIST_FILE": __file__}
    environ.update({name.upper(): str(value) for name, value in overrides.items()})
    return settings.load(environ)


def retries():
    return metrics.RETRIES._value.get()


class Watch:
    """A `waiting` context manager that logs each entry and exit, and whether it is inside."""

    def __init__(self):
        self.log = []
        self.inside = False

    def __enter__(self):
        assert not self.inside
        self.inside = True
        self.log.append("enter")
        return self

    def __exit__(self, *exc):
        self.inside = False
        self.log.append("exit")
        return False


# 1. A model no healthy backend serves, while some backend is healthy: vLLM's 404.

def test_a_model_no_healthy_backend_serves_is_a_404():
    fleet = Fleet(2)
    a, b = fleet.backends
    serve(fleet.registry, a, "m1")
    serve(fleet.registry, b, "m2")
    send = FakeSend(by_url={a.url: [OK], b.url: [OK]})
    failed = fleet.fails(send, "m3")
    assert failed.status == 404
    assert str(failed) == "The model `m3` does not exist."
    assert failed.response().status_code == 404
    assert send.calls == []
    assert fleet.registry.waits == []
    # A model one of them serves goes to that one only.
    for _ in range(5):
        backend, response = fleet.send(send, "m2")
        assert (backend, response) == (b, OK)
        fleet.done()
    assert send.calls == [b] * 5


def test_a_request_whose_only_backend_for_its_model_was_refused_gets_502_not_404():
    # The 404 is decided before the first send: the model exists, its backend failed.
    fleet = Fleet(3)
    a, b, c = fleet.backends
    serve(fleet.registry, a, "m1")
    serve(fleet.registry, b, "m2")
    serve(fleet.registry, c, "m3")
    send = FakeSend(by_url={a.url: [refused], b.url: [OK], c.url: [OK]})
    failed = fleet.fails(send, "m1")
    assert send.calls == [a]
    assert a.healthy is False
    assert failed.status == 502
    assert str(failed) == "No backend could be reached."
    assert fleet.in_flight() == [0, 0, 0]


def test_a_refused_request_waits_for_its_models_backend_to_come_back():
    fleet = Fleet(3, no_backend_wait_seconds=5)
    a, b, c = fleet.backends
    serve(fleet.registry, a, "m1")
    serve(fleet.registry, b, "m2")
    serve(fleet.registry, c, "m3")
    send = FakeSend(by_url={a.url: [refused, OK], b.url: [OK], c.url: [OK]})
    fleet.registry.during_change_wait = lambda timeout: fleet.mark_healthy(0) or 1.0
    backend, response = fleet.send(send, "m1")
    assert (backend, response) == (a, OK)
    assert send.calls == [a, a]
    assert fleet.registry.waits == [("change", 5)]
    fleet.done()


# 2. A backend that cannot be connected to is marked down at once and another is tried.

def test_a_backend_that_refuses_is_marked_down_and_another_answers():
    fleet = Fleet(3, loads=[0, 1, 2])
    a, b, c = fleet.backends
    send = FakeSend(by_url={a.url: [refused], b.url: [OK], c.url: [OK]})
    before = retries()
    backend, response = fleet.send(send)
    assert (backend, response) == (b, OK)
    assert send.calls == [a, b]
    assert a.healthy is False
    assert a.last_error == "connection refused"
    assert a not in fleet.registry.healthy
    assert b.healthy and c.healthy
    assert retries() - before == 1
    assert fleet.registry.waits == []
    fleet.done()


# 3. Every backend refuses: each is tried once, then 502.

def test_when_every_backend_refuses_each_is_tried_once_then_502():
    fleet = Fleet(3, policy="random")
    send = FakeSend(by_url={url: [refused] for url in URLS})
    before = retries()
    failed = fleet.fails(send)
    assert failed.status == 502
    assert str(failed) == "No backend could be reached."
    assert sorted(b.url for b in send.calls) == sorted(URLS)
    assert all(b.healthy is False and b.last_error == "connection refused"
               for b in fleet.backends)
    assert fleet.registry.healthy == ()
    assert retries() - before == 2
    assert fleet.in_flight() == [0, 0, 0]


# 4. The keep-alive race: sent once more, anywhere; the backend is not marked down.

def test_a_stale_connection_is_sent_once_more_and_the_backend_stays_up():
    fleet = Fleet(2, loads=[0, 5])
    a, b = fleet.backends
    send = FakeSend(by_url={a.url: [stale, OK], b.url: [OK]})
    before = retries()
    backend, response = fleet.send(send)
    # least_loaded picks `a` again: once released it is still the least loaded.
    assert (backend, response) == (a, OK)
    assert send.calls == [a, a]
    assert a.healthy is True
    assert a.last_error is None
    assert retries() - before == 1
    fleet.done()


# 5. Stale twice: that backend is passed over, never marked down.

def test_a_backend_stale_twice_is_passed_over_not_marked_down():
    fleet = Fleet(2, loads=[0, 5])
    a, b = fleet.backends
    send = FakeSend(by_url={a.url: [stale, stale, OK], b.url: [OK]})
    backend, response = fleet.send(send)
    assert (backend, response) == (b, OK)
    assert send.calls == [a, a, b]
    assert a.healthy is True
    assert a.last_error is None
    assert fleet.registry.waits == []
    assert fleet.in_flight() == [0, 1]
    fleet.done()


def test_a_single_backend_stale_twice_leaves_nothing_to_pick_so_502():
    fleet = Fleet(1)
    (a,) = fleet.backends
    send = FakeSend(by_url={a.url: [stale, stale, OK]})
    failed = fleet.fails(send)
    # Passed over, it counts as tried: a 502, not "no healthy backend".
    assert failed.status == 502
    assert str(failed) == "The backend closed the connection without answering."
    assert send.calls == [a, a]
    assert a.healthy is True
    # NO_BACKEND_WAIT_SECONDS=0: no time left to wait for anything.
    assert fleet.registry.waits == []
    assert a.in_flight == 0


def test_a_single_backend_stale_twice_is_not_resent_while_waiting_for_a_backend():
    # Still healthy, it is no reason to wait: the request fails at once.
    fleet = Fleet(1, no_backend_wait_seconds=5)
    (a,) = fleet.backends
    send = FakeSend(by_url={a.url: [stale]}, limit=10)
    failed = fleet.fails(send)
    assert failed.status == 502
    assert send.calls == [a, a]
    assert fleet.registry.waits == []


# 6. A body streamed from the client cannot be sent again.

def test_a_stale_connection_with_a_streamed_body_is_a_502_without_resending():
    fleet = Fleet(2, loads=[0, 5])
    a, b = fleet.backends
    send = FakeSend(by_url={a.url: [stale, OK], b.url: [OK]})
    before = retries()
    failed = fleet.fails(send, resendable=False)
    assert failed.status == 502
    assert str(failed) == "The backend closed the connection without answering."
    assert send.calls == [a]
    assert a.healthy is True
    assert a.last_error is None
    assert retries() == before
    assert fleet.in_flight() == [0, 0]


# 7. No response headers within READ_TIMEOUT_SECONDS: 504, not sent again.

def test_a_read_timeout_is_a_504_naming_the_timeout_and_not_sent_again():
    fleet = Fleet(2, loads=[0, 5], read_timeout_seconds=2.5)
    a, b = fleet.backends
    send = FakeSend(by_url={a.url: [timed_out], b.url: [OK]})
    failed = fleet.fails(send)
    assert failed.status == 504
    assert str(failed) == "The backend did not answer within 2.5 s."
    assert send.calls == [a]
    assert a.healthy is True
    assert a.last_error is None
    assert fleet.in_flight() == [0, 0]


def test_the_504_message_shows_a_whole_read_timeout_without_decimals():
    fleet = Fleet(1)
    (a,) = fleet.backends
    failed = fleet.fails(FakeSend(by_url={a.url: [timed_out]}))
    assert str(failed) == "The backend did not answer within 600 s."


# 8. The exchange broken after the request was sent: 502, not sent again.

def test_an_exchange_broken_after_sending_is_a_502_and_not_sent_again():
    fleet = Fleet(2, loads=[0, 5])
    a, b = fleet.backends
    send = FakeSend(by_url={a.url: [broken], b.url: [OK]})
    failed = fleet.fails(send)
    assert failed.status == 502
    assert str(failed) == "The backend failed before answering: connection reset."
    assert send.calls == [a]
    assert a.healthy is True
    assert fleet.in_flight() == [0, 0]


# 9. Nothing healthy, first cycle over, NO_BACKEND_WAIT_SECONDS=0: 503 at once.

def test_nothing_healthy_and_no_wait_is_a_503_at_once():
    fleet = Fleet(2, healthy=())
    send = FakeSend(by_call=[OK])
    failed = fleet.fails(send, "m1")
    assert failed.status == 503
    assert str(failed) == "No healthy backend is available."
    assert send.calls == []
    assert fleet.registry.waits == []


# 10. Nothing healthy: wait up to NO_BACKEND_WAIT_SECONDS for a backend to come back.

def test_nothing_healthy_waits_and_sends_to_the_backend_that_comes_back():
    fleet = Fleet(2, healthy=(), no_backend_wait_seconds=5)
    a, b = fleet.backends

    def b_comes_back(timeout):
        fleet.mark_healthy(1)
        return 2

    fleet.registry.during_change_wait = b_comes_back
    send = FakeSend(by_url={a.url: [OK], b.url: [OK]})
    backend, response = fleet.send(send)
    assert (backend, response) == (b, OK)
    assert send.calls == [b]
    assert fleet.registry.waits == [("change", 5)]
    fleet.done()


def test_nothing_healthy_waits_no_longer_than_no_backend_wait_then_503():
    fleet = Fleet(2, healthy=(), no_backend_wait_seconds=5)
    send = FakeSend(by_call=[OK])
    start = fleet.clock()
    failed = fleet.fails(send)
    assert failed.status == 503
    assert str(failed) == "No healthy backend is available."
    assert fleet.registry.waits == [("change", 5)]
    assert fleet.clock() - start == 5
    assert send.calls == []


def test_the_wait_for_a_backend_is_bounded_by_one_deadline_for_the_request():
    fleet = Fleet(1, healthy=(), no_backend_wait_seconds=5)
    (a,) = fleet.backends
    comebacks = []

    def a_comes_back_once(timeout):
        if not comebacks:
            comebacks.append(timeout)
            fleet.mark_healthy(0)
            return 3
        return None

    fleet.registry.during_change_wait = a_comes_back_once
    send = FakeSend(by_url={a.url: [refused]})
    start = fleet.clock()
    failed = fleet.fails(send)
    # Back after 3 s and refused (marked down again): the second wait gets only the 2 s left,
    # then 502, since a backend was tried and could not be reached.
    assert failed.status == 502
    assert str(failed) == "No backend could be reached."
    assert fleet.registry.waits == [("change", 5), ("change", 2)]
    assert fleet.clock() - start == 5
    assert send.calls == [a]
    assert a.healthy is False


# 11. A worker whose first poll cycle is not over waits for it.

def test_before_the_first_cycle_ends_the_request_waits_for_it_and_is_sent():
    fleet = Fleet(2, healthy=(), first_cycle_done=False, no_backend_wait_seconds=0)
    a, b = fleet.backends

    def cycle_ends_with_a_healthy(timeout):
        fleet.mark_healthy(0)
        fleet.registry.first_cycle.set()
        return 0.5

    fleet.registry.during_first_cycle_wait = cycle_ends_with_a_healthy
    send = FakeSend(by_url={a.url: [OK], b.url: [OK]})
    backend, response = fleet.send(send)
    assert (backend, response) == (a, OK)
    assert send.calls == [a]
    assert fleet.settings.first_cycle_wait == 10
    assert fleet.registry.waits == [("first_cycle", 10)]
    fleet.done()


def test_a_first_cycle_that_does_not_end_is_a_503_without_waiting_past_the_deadline():
    fleet = Fleet(2, healthy=(), first_cycle_done=False, no_backend_wait_seconds=5,
                  health_timeout_seconds=3, dns_timeout_seconds=4)
    send = FakeSend(by_call=[OK])
    start = fleet.clock()
    failed = fleet.fails(send)
    assert failed.status == 503
    assert str(failed) == "No healthy backend is available."
    # The first cycle's 7 s took the request past its 5 s deadline: no wait for health after.
    assert fleet.registry.waits == [("first_cycle", 7)]
    assert fleet.clock() - start == 7
    assert send.calls == []


def test_a_first_cycle_that_ends_with_nothing_healthy_then_waits_the_time_left():
    fleet = Fleet(1, healthy=(), first_cycle_done=False, no_backend_wait_seconds=5)

    def cycle_ends_after_one_second(timeout):
        fleet.registry.first_cycle.set()
        return 1

    fleet.registry.during_first_cycle_wait = cycle_ends_after_one_second
    failed = fleet.fails(FakeSend(by_call=[OK]))
    assert failed.status == 503
    assert fleet.registry.waits == [("first_cycle", 10), ("change", 4)]


# 12. `waiting` is entered around every send and every wait.

def test_waiting_is_entered_around_each_send_and_each_wait():
    fleet = Fleet(1, healthy=(), first_cycle_done=False, no_backend_wait_seconds=5)
    (a,) = fleet.backends
    watch = Watch()
    inside = []

    def cycle_ends(timeout):
        inside.append(("first_cycle", watch.inside))
        fleet.registry.first_cycle.set()
        return 1

    def a_comes_back(timeout):
        inside.append(("change", watch.inside))
        fleet.mark_healthy(0)
        return 1

    class WatchedSend(FakeSend):
        def __call__(self, backend):
            inside.append(("send", watch.inside))
            return super().__call__(backend)

    fleet.registry.during_first_cycle_wait = cycle_ends
    fleet.registry.during_change_wait = a_comes_back
    send = WatchedSend(by_url={a.url: [refused, OK]})
    backend, response = fleet.send(send, waiting=watch)
    assert (backend, response) == (a, OK)
    # first-cycle wait, wait for health, send (refused), wait for health, send (answered)
    assert inside == [("first_cycle", True), ("change", True), ("send", True),
                      ("change", True), ("send", True)]
    assert watch.log == ["enter", "exit"] * 5
    assert not watch.inside
    fleet.done()


# 13. The chosen backend's place is taken in the ledger for the response's life, and only then.

def test_in_flight_is_raised_for_the_answering_backend_only():
    fleet = Fleet(3, loads=[0, 1, 2])
    a, b, c = fleet.backends
    send = FakeSend(by_url={a.url: [refused], b.url: [stale, stale], c.url: [OK]})
    backend, response = fleet.send(send)
    assert (backend, response) == (c, OK)
    assert send.calls == [a, b, b, c]
    # Raised during each send, released after each failure, still raised for the answer.
    assert send.in_flight_seen == [1, 1, 1, 1]
    assert fleet.in_flight() == [0, 0, 1]
    fleet.done()
    assert fleet.in_flight() == [0, 0, 0]


@pytest.mark.parametrize("failure", [refused, stale, timed_out, broken])
def test_in_flight_is_released_after_every_failure(failure):
    fleet = Fleet(2, policy="random")
    send = FakeSend(by_url={url: [failure] for url in URLS[:2]})
    with pytest.raises(DispatchFailed):
        fleet.send(send)
    assert send.calls
    assert fleet.in_flight() == [0, 0]


def test_in_flight_is_released_after_a_streamed_body_meets_a_stale_connection():
    fleet = Fleet(1)
    (a,) = fleet.backends
    fleet.fails(FakeSend(by_url={a.url: [stale]}), resendable=False)
    assert a.in_flight == 0


def test_an_unknown_exception_propagates_and_releases_the_backend():
    fleet = Fleet(2, loads=[0, 5])
    a, b = fleet.backends
    send = FakeSend(by_url={a.url: [Boom], b.url: [OK]})
    with pytest.raises(Boom):
        fleet.send(send)
    assert send.calls == [a]
    assert a.healthy is True
    assert fleet.in_flight() == [0, 0]


# 14. `on_attempt(backend)` is called once before each send, in order.

def test_on_attempt_is_called_before_each_send_in_order():
    fleet = Fleet(3, loads=[0, 1, 2])
    a, b, c = fleet.backends
    events = []

    class LoggedSend(FakeSend):
        def __call__(self, backend):
            events.append(("send", backend))
            return super().__call__(backend)

    send = LoggedSend(by_url={a.url: [refused], b.url: [stale, OK], c.url: [OK]})
    backend, _ = fleet.send(send, on_attempt=lambda chosen: events.append(("on_attempt", chosen)))
    assert backend is b
    assert events == [("on_attempt", a), ("send", a), ("on_attempt", b), ("send", b),
                      ("on_attempt", b), ("send", b)]
    fleet.done()
