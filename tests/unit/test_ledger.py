"""Unit tests for the request's ledger (`forwarder/relay/ledger.py`): each place given back once,
and when the key's share of a request is counted."""

import time

from forwarder import settings
from forwarder.host.layout import KeyCount
from forwarder.observe import metrics
from forwarder.environ_keys import REQUEST_ID
from forwarder.relay.ledger import Ledger
from forwarder.relay.response_body import RelayedBody
from forwarder.tenants import usage
from forwarder.tenants.keys import Keys
from forwarder.tenants.limits import KeyLimits
from tests.unit.fleets import fleet

ANSWER = b'{"model":"m","usage":{"prompt_tokens":3,"completion_tokens":4}}'


class Upstream:
    """A backend response whose body is `pieces`, read one per `read1`."""

    def __init__(self, *pieces):
        self.pieces = list(pieces)
        self.closed = 0

    def read1(self, size):
        return self.pieces.pop(0) if self.pieces else b""

    def tell(self):
        return 0

    def close(self):
        self.closed += 1


def key_and_limits(registry):
    keys = Keys(settings.load({"IP_LIST_FILE": __file__, "FORWARDER_API_KEYS": "team:sk-team"}),
                registry.table)
    return keys.ring.admits("Bearer sk-team"), KeyLimits(registry.table)


def test_a_keys_place_and_tokens_are_given_back_when_the_body_ends_not_at_the_close():
    # The client sees its response end only after the backend's body has ended; counting the
    # key's share then, not at the close, leaves no moment in which its next request, sent at
    # once, finds its place still taken (or its tokens not yet counted) on the other worker.
    registry = fleet(1)
    table = registry.table
    (backend,) = registry.backends()
    key, limits = key_and_limits(registry)
    ledger = Ledger(limits)
    ledger.take_key(key)
    ledger.take_backend(backend, 16)
    exchange = metrics.Exchange({REQUEST_ID: "r"}, "chat/completions", registry)
    tap = usage.JsonTap()
    body = RelayedBody(Upstream(ANSWER), exchange, ledger, False, None, tap)
    assert table.key_sum(KeyCount.IN_FLIGHT, key.column) == 1
    assert list(body) == [ANSWER]
    assert table.key_sum(KeyCount.IN_FLIGHT, key.column) == 0
    assert backend.in_flight == 0
    assert table.per_minute(KeyCount.TOKENS_NOW, key.column, time.time()) == 7
    body.close()  # given back once, not again
    assert table.key_sum(KeyCount.IN_FLIGHT, key.column) == 0
    assert table.key_sum(KeyCount.REQUESTS, key.column) == 1
    assert backend.in_flight == 0


def test_a_body_never_iterated_gives_everything_back_at_its_close():
    # HEAD, 204 and 304: Werkzeug never starts the body, but gunicorn closes it.
    registry = fleet(1)
    (backend,) = registry.backends()
    key, limits = key_and_limits(registry)
    ledger = Ledger(limits)
    ledger.take_key(key)
    ledger.take_backend(backend, 16)
    upstream = Upstream(ANSWER)
    exchange = metrics.Exchange({REQUEST_ID: "r"}, "chat/completions", registry)
    RelayedBody(upstream, exchange, ledger, False, None).close()
    assert registry.table.key_sum(KeyCount.IN_FLIGHT, key.column) == 0
    assert backend.in_flight == 0
    assert upstream.closed


def test_close_gives_each_place_back_once():
    registry = fleet(1)
    (backend,) = registry.backends()
    key, limits = key_and_limits(registry)
    ledger = Ledger(limits)
    ledger.take_key(key)
    ledger.take_backend(backend, 48)
    ledger.close()
    ledger.close()
    assert registry.table.key_sum(KeyCount.IN_FLIGHT, key.column) == 0
    assert registry.table.key_sum(KeyCount.REQUESTS, key.column) == 1
    assert backend.in_flight == 0 and backend.in_flight_weight == 0
