"""Unit tests for telemetry: the `endpoint` label, the request id rules, and what importing the
settings loads."""

import re
import subprocess
import sys

import pytest

from forwarder.observe import metrics, request_id
from tests.harness import REPO_ROOT


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
    assert metrics.endpoint_of(subpath) == endpoint
    assert endpoint in metrics.ENDPOINTS | {metrics.OTHER_ENDPOINT}


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
