"""Whatever step of a request raises, every place it took is given back: the key's, the queue's
and the backend's (`forwarder/relay/ledger.py`).

The app runs in this process (`create_app` over a host table of its own, driven by Werkzeug's
test client) in front of a real fake vLLM backend, so that each step between the key's
admission and the end of the relayed body can be made to raise in turn; after each, every count
of the shared table is back at zero."""

import pytest

from forwarder import settings
from forwarder.app import create_app
from forwarder.fleet.registry import Registry
from forwarder.host.layout import KeyCount, Slot
from forwarder.tenants.keys import shared_keys
from tests.harness import FakeBackend, chat
from tests.unit.fleets import poll, publish

KEY = "sk-ledger"


class Injected(Exception):
    """The failure each test makes one step raise."""


def _raise(*args, **kwargs):
    raise Injected()


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    fake = FakeBackend.start(log_dir=tmp_path_factory.mktemp("fake_vllm"))
    yield fake
    fake.stop()


def make_app(backend, **environ):
    registry = Registry()
    publish(registry, [backend.url])
    poll(registry, registry.backends()[0], num_requests_running=0, num_requests_waiting=0)
    registry.first_cycle.set()
    loaded = settings.load({"IP_LIST_FILE": __file__, "FORWARDER_API_KEYS": f"team:{KEY}",
                            "SSE_KEEPALIVE_SECONDS": "0", "ROUTING_POLICY": "least_loaded",
                            **environ})
    app = create_app(loaded, registry)
    shared_keys(loaded, registry.table).publish()  # the list leader's work, done here
    app.testing = False  # a view's exception becomes a 500, as under gunicorn
    return app, registry


def counts(registry):
    """Every place a request can hold, summed over the table."""
    table = registry.table
    (backend,) = registry.backends()
    keys = [column for column, *_ in table.read_keys()]
    return {"key in flight": sum(table.key_sum(KeyCount.IN_FLIGHT, column) for column in keys),
            "backend in flight": backend.in_flight,
            "backend weight": backend.in_flight_weight,
            "queued": table.slot_sum(Slot.QUEUED)}


ZERO = {"key in flight": 0, "backend in flight": 0, "backend weight": 0, "queued": 0}


def send(app, stream):
    """One chat request through the app, its body read to the end (or to the failure)."""
    client = app.test_client()
    try:
        response = client.post("/v1/chat/completions", json=chat(stream=stream),
                               headers={"Authorization": f"Bearer {KEY}"}, buffered=True)
    except Injected:
        return None  # raised while the body was relayed: the server cuts the connection
    return response.status_code


# Every step between the key's admission and the body's end, by the name it has in the code.
STEPS = [
    ("forwarder.relay.request_body.take", None),
    ("forwarder.relay.json_bodies.json_object", None),
    ("forwarder.relay.headers.request_headers", None),
    ("forwarder.relay.policies.least_loaded.LeastLoaded.pick", None),
    ("forwarder.relay.dispatch.Dispatcher._pick", None),
    ("forwarder.relay.ledger.Ledger.take_backend", None),
    ("forwarder.upstream.send", None),
    ("forwarder.fleet.ejection.Ejection.record", None),
    ("forwarder.relay.headers.response_headers", None),
    ("forwarder.tenants.usage.StreamTap.__init__", True),
    ("forwarder.tenants.usage.JsonTap.__init__", False),
    ("forwarder.observe.metrics.Exchange.first_byte", None),
    ("forwarder.relay.ledger.Ledger.prefilled", None),
    ("forwarder.tenants.usage.StreamTap.feed", True),
    ("forwarder.tenants.usage.JsonTap.feed", False),
    ("forwarder.tenants.usage.StreamTap.finish", True),
    ("forwarder.tenants.usage.JsonTap.finish", False),
    ("forwarder.observe.metrics.Exchange.last_byte", None),
    ("forwarder.observe.metrics.Exchange._count", None),
]


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
@pytest.mark.parametrize("step, applies_to_stream", STEPS, ids=[s for s, _ in STEPS])
def test_a_step_that_raises_leaves_every_count_at_zero(backend, monkeypatch, step, stream,
                                                       applies_to_stream):
    if applies_to_stream is not None and applies_to_stream != stream:
        pytest.skip("this step is only taken by the other kind of answer")
    app, registry = make_app(backend)
    assert send(app, stream) == 200  # the step is taken: without the failure, all is well
    assert counts(registry) == ZERO
    monkeypatch.setattr(step, _raise)
    status = send(app, stream)
    assert status in (None, 200, 500)
    assert counts(registry) == ZERO, f"left behind after {step} raised"


def test_a_request_that_fails_in_the_queue_gives_its_place_back(backend, monkeypatch):
    # The one backend's one place is held by a stream not yet read; the next request queues,
    # and something raises while it waits.
    app, registry = make_app(backend, MAX_IN_FLIGHT_PER_BACKEND="1")
    client = app.test_client()
    held = client.post("/v1/chat/completions", json=chat(stream=True),
                       headers={"Authorization": f"Bearer {KEY}"}, buffered=False)
    assert counts(registry)["backend in flight"] == 1
    monkeypatch.setattr("forwarder.relay.brake.Brake._hand_out", _raise)
    assert send(app, stream=False) == 500
    held.close()
    assert counts(registry) == ZERO
