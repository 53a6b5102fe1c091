"""Unit tests for telemetry: the `endpoint` label, the request id rules, what importing the
settings loads, and when a key's share of a request is counted."""

import re
import subprocess
import sys
import time

import pytest
from flask import Response

from forwarder import auth, request_id, settings, telemetry, usage
from forwarder.environ_keys import REQUEST_ID
from forwarder.host_table import K_IN_FLIGHT, K_REQUESTS, K_TOKENS_NOW
from tests.harness import REPO_ROOT
from tests.unit.fleets import fleet


@pytest.mark.parametrize("subpath, endpoint", [
    ("chat/completions", "chat/completions"),
    ("chat/completions/", "chat/completions"),
    ("completions", "completions"),
    ("embeddings", "embeddings"),
    ("models", "models"),
    ("models/meta-llama/Llama-3.1-8B", "models"),
    ("responses/resp_123/cancel", "responses"),
    ("chat/completions/chatcmpl-1/messages", "chat/completions"),
    ("audio/transcriptions", "audio/transcriptions"),
    ("audio/unknown", "other"),
    ("some/future/endpoint", "other"),
    ("x" * 500, "other"),
])
def test_endpoint_label_comes_from_a_fixed_set(subpath, endpoint):
    assert telemetry.endpoint_of(subpath) == endpoint
    assert endpoint in telemetry.ENDPOINTS | {telemetry.OTHER_ENDPOINT}


@pytest.mark.parametrize("given, kept", [
    ("abc-123", True),
    ("0f" * 16, True),
    ("a" * request_id.MAX_LENGTH, True),
    ("a" * (request_id.MAX_LENGTH + 1), False),
    ("has space", False),
    ('quote"d', False),
    ("back\\slash", False),
    ("tab\there", False),
    ("caf\u00e9", False),
    ("", False),
])
def test_request_id_is_kept_only_when_usable(given, kept):
    environ = {"HTTP_X_REQUEST_ID": given}
    rid = request_id.request_id(environ)
    if kept:
        assert rid == given
    else:
        assert re.fullmatch(r"[0-9a-f]{32}", rid)
    assert request_id.request_id({}) != request_id.request_id({})


def test_settings_import_leaves_prometheus_client_unimported():
    # gunicorn.conf.py imports forwarder.settings in the master; prometheus_client must not come
    # with it, or it could be imported before PROMETHEUS_MULTIPROC_DIR is set.
    code = "import sys, forwarder.settings; print('prometheus_client' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                            text=True, check=True)
    assert result.stdout.strip() == "False"


# ---------------------------------------------------------------------------------------------
# End to end, through gunicorn.


def test_a_keys_place_and_tokens_are_counted_back_when_the_body_ends_not_at_the_close():
    # The client sees its response end only after the backend's body has ended; counting the
    # key's share then, not at the close, leaves no moment in which its next request, sent at
    # once, finds its place still taken (or its tokens not yet counted) on the other worker.
    registry = fleet(1)
    table = registry.table
    keys = auth.Keys(settings.load({"IP_LIST_FILE": __file__,
                                    "FORWARDER_API_KEYS": "team:sk-team"}), table)
    key = keys.ring.admits("Bearer sk-team")
    keys.admit(key)
    exchange = telemetry.Exchange({REQUEST_ID: "r"}, "chat/completions", registry)
    exchange.key = key
    response = exchange.finished(Response(status=200))
    tap = usage.JsonTap()
    tap.feed(b'{"model":"m","usage":{"prompt_tokens":3,"completion_tokens":4}}')
    tap.finish()
    exchange.usage = tap
    assert table.key_sum(K_IN_FLIGHT, key.column) == 1
    exchange.last_byte()
    assert table.key_sum(K_IN_FLIGHT, key.column) == 0
    assert table.per_minute(K_TOKENS_NOW, key.column, time.time()) == 7
    response.close()  # counted once, not again
    assert table.key_sum(K_IN_FLIGHT, key.column) == 0
    assert table.key_sum(K_REQUESTS, key.column) == 1
