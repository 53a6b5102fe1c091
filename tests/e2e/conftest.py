"""Fixtures that start fake vLLM backends and forwarders, and stop every one of them by PID at
teardown, whatever the test did. (No gevent here: the pytest process is never monkey-patched.)"""

import pytest

from tests.harness import FakeBackend, FakeDns, Forwarder, log_tail


@pytest.fixture
def fake_backend(tmp_path_factory):
    """Factory: `fake_backend(name=None, config=None, port=None, host="127.0.0.1")` -> a started
    FakeBackend."""

    def start(name=None, config=None, port=None, host="127.0.0.1"):
        return FakeBackend.start(name=name, port=port, config=config, host=host,
                                 log_dir=tmp_path_factory.mktemp("fake_vllm"))

    yield from _serve(start, "fake vllm")


@pytest.fixture
def fake_dns(tmp_path_factory):
    """Factory: `fake_dns(records=None)` -> a started FakeDns on 127.0.0.1."""

    def start(records=None):
        return FakeDns.start(records, log_dir=tmp_path_factory.mktemp("fake_dns"))

    yield from _serve(start, "fake dns")


@pytest.fixture
def forwarder(tmp_path_factory):
    """Factory: `forwarder(ip_lines, env=None, workers=1, extra_args=(), wait_healthy=None,
    listening_only=False)` -> a started Forwarder."""

    def start(ip_lines, env=None, workers=1, extra_args=(), wait_healthy=None,
              listening_only=False):
        return Forwarder.start(ip_lines, env=env, workers=workers, extra_args=extra_args,
                               wait_healthy=wait_healthy, listening_only=listening_only,
                               log_dir=tmp_path_factory.mktemp("forwarder"))

    yield from _serve(start, "forwarder")


def _serve(start, what):
    """A fixture's body: yields a factory calling `start` for each process the test asks for,
    then stops every one of them."""
    started = []

    def make(*args, **kwargs):
        process = start(*args, **kwargs)
        started.append(process)
        return process

    yield make
    _stop_all(started, what)


def _stop_all(processes, what):
    """Stop each (one failing does not spare the others); print log tails, which pytest shows
    with a failed test's report."""
    errors = []
    for process in processes:
        try:
            process.stop()
        except Exception as error:  # keep stopping the rest
            errors.append(error)
        print(f"--- {what} pid {process.pid} log {process.log_path} (tail)\n"
              f"{log_tail(process.log_path)}")
    if errors:
        raise errors[0]
