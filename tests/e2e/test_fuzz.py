"""A bounded fuzz run (`tests/fuzz_forwarder.py`) against real forwarders, with and without
FORCED_MODEL_NAME: every hostile request gets a clear status, the backend sees nothing outside
`/v1/`, and the forwarder stays up with the same workers."""

import pytest

from tests import fuzz_forwarder

CASES = 150


@pytest.mark.parametrize("config", sorted(fuzz_forwarder.CONFIGS))
def test_hostile_requests_get_clear_answers_and_the_forwarder_stays_up(fake_backend, forwarder,
                                                                      config):
    backend = fake_backend()
    fwd = forwarder([backend.url], env={**fuzz_forwarder.COMMON_ENV,
                                        **fuzz_forwarder.CONFIGS[config]}, wait_healthy=1)
    report = fuzz_forwarder.fuzz(fwd, backend, CASES, seed=len(config), report=fuzz_forwarder.Report())
    print(f"{config}: {report.cases} cases, statuses {dict(report.statuses)}")
    assert report.cases == CASES
    assert report.failures == []
