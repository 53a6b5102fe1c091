"""Unit tests for `forwarder.discovery.Discovery.expand`: what the list's entries become, with a
resolver the test scripts (the DNS wire itself is exercised end to end in test_discovery.py)."""

import logging
import time
import types

import gevent
import pytest

from forwarder.fleet.backend_list import DnsName
from forwarder.fleet.discovery import Discovery, LookupFailed

PODS = DnsName("vllm", 8000)
OTHERS = DnsName("other", 9000)


class ScriptedResolver:
    """Answers each name from `answers`: a list of addresses, an exception to raise, or
    "hang"."""

    def __init__(self):
        self.answers = {}
        self.hanging = 0
        self.most_hanging = 0

    def addresses(self, name):
        answer = self.answers[name]
        if answer == "hang":
            self.hanging += 1
            self.most_hanging = max(self.most_hanging, self.hanging)
            try:
                gevent.sleep(60)
            finally:
                self.hanging -= 1
        if isinstance(answer, Exception):
            raise answer
        return answer


@pytest.fixture
def discovery():
    found = Discovery(types.SimpleNamespace(dns_server=None, dns_timeout_seconds=0.2))
    found.resolver = ScriptedResolver()
    return found


def test_addresses_become_sorted_urls_with_their_source(discovery):
    discovery.resolver.answers["vllm"] = ["10.0.0.3", "fd00::5", "10.0.0.2", "10.0.0.3"]
    urls, sources = discovery.expand(["http://a:1", PODS, "http://b:2"])
    assert urls == ["http://a:1", "http://10.0.0.2:8000", "http://10.0.0.3:8000",
                    "http://[fd00::5]:8000", "http://b:2"]
    assert sources == {url: "dns+vllm:8000" for url in urls[1:4]}


def test_a_url_listed_both_ways_is_one_backend_with_its_first_entrys_source(discovery):
    discovery.resolver.answers["vllm"] = ["10.0.0.2"]
    assert discovery.expand(["http://10.0.0.2:8000", PODS]) == (["http://10.0.0.2:8000"], {})
    assert discovery.expand([PODS, "http://10.0.0.2:8000"]) == (
        ["http://10.0.0.2:8000"], {"http://10.0.0.2:8000": "dns+vllm:8000"})


def test_a_failed_lookup_keeps_the_last_addresses_and_logs_once(discovery, caplog):
    discovery.resolver.answers.update(vllm=["10.0.0.2"], other=["10.0.0.9"])
    discovery.expand([PODS, OTHERS])
    caplog.set_level(logging.INFO, logger="forwarder.fleet.discovery")
    for failure in (LookupFailed("SERVFAIL"), "hang", LookupFailed("SERVFAIL")):
        discovery.resolver.answers["vllm"] = failure
        discovery.resolver.answers["other"] = ["10.0.0.8"]
        urls, _ = discovery.expand([PODS, OTHERS])
        assert urls == ["http://10.0.0.2:8000", "http://10.0.0.8:9000"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["dns+vllm:8000: DNS lookup failed (SERVFAIL); keeping its last 1 backends"]
    discovery.resolver.answers["vllm"] = ["10.0.0.4"]
    assert discovery.expand([PODS])[0] == ["http://10.0.0.4:8000"]
    assert "dns+vllm:8000: DNS lookup works again" in caplog.messages


def test_lookups_run_at_once_each_bounded_by_the_timeout(discovery):
    names = [DnsName(f"pods-{n}", 8000) for n in range(3)]
    discovery.resolver.answers.update({name.name: "hang" for name in names})
    started = time.monotonic()
    assert discovery.expand(names) == ([], {})
    assert discovery.resolver.most_hanging == 3  # side by side
    assert time.monotonic() - started < 30  # each ended by its timeout, none waited out


def test_a_name_that_no_longer_exists_takes_its_backends_away(discovery):
    discovery.resolver.answers["vllm"] = ["10.0.0.2"]
    discovery.expand([PODS])
    discovery.resolver.answers["vllm"] = []
    assert discovery.expand([PODS]) == ([], {})
