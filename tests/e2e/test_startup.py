"""End-to-end: start-up as an operator sees it, good and bad."""

import pytest

from tests.harness import Forwarder


@pytest.mark.parametrize("env, named", [
    ({"CHECK_INTERVAL_SECONDS": "abc"}, "CHECK_INTERVAL_SECONDS='abc'"),
    ({"BACKEND_DEFAULT_PORT": "http"}, "BACKEND_DEFAULT_PORT='http'"),
    ({"IP_LIST_FILE": "no-such-dir/ip.txt"}, "IP_LIST_FILE='no-such-dir/ip.txt'"),
])
def test_bad_setting_stops_start_up_with_one_line(env, named):

    returncode, output = Forwarder.run_expecting_failure(env)
    assert returncode != 0
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output
    assert named in lines[0]
    assert "Traceback" not in output


def test_clean_start_and_stop_log_no_warning_or_traceback(fake_backend, forwarder):
    backend = fake_backend()
    fwd = forwarder([backend.url], wait_healthy=1)
    log = fwd.log()
    assert "Booting worker" in log
    assert "MonkeyPatchWarning" not in log
    assert "Traceback" not in log
    assert fwd.stop(graceful=True) == 0  # SIGTERM, as an orchestrator stops it
    log = fwd.log()
    assert "Worker exiting" in log
    assert "Traceback" not in log and "Exception ignored" not in log, log[-2000:]
