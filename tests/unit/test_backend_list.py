"""Unit tests for the `ip.txt` parser: every entry form of SPEC, comments, duplicates, bad lines."""

import logging

import pytest

from forwarder.fleet.backend_list import DnsName, parse_backend_list, parse_entry


@pytest.mark.parametrize("entry, url", [
    ("10.0.0.11:9001", "http://10.0.0.11:9001"),
    ("10.0.0.11", "http://10.0.0.11:8101"),
    ("my-gpu-host", "http://my-gpu-host:8101"),
    ("my-gpu-host:9001", "http://my-gpu-host:9001"),
    ("[fd00::5]:9001", "http://[fd00::5]:9001"),
    ("fd00::5", "http://[fd00::5]:8101"),
    ("[fd00::5]", "http://[fd00::5]:8101"),
    ("http://10.0.0.11:8101/v1", "http://10.0.0.11:8101"),
    ("http://10.0.0.11:8101/v1/", "http://10.0.0.11:8101"),
    ("https://gpu.example/vllm/v1", "https://gpu.example/vllm"),
    ("https://gpu.example/vllm/", "https://gpu.example/vllm"),
    ("HTTP://GPU-Host:9001", "http://gpu-host:9001"),
    ("http://gpu.example/v1x", "http://gpu.example/v1x"),
])
def test_entry_forms(entry, url):
    assert parse_entry(entry, 8101) == url


@pytest.mark.parametrize("entry", [
    "host:0", "host:65536", "host:abc", "ftp://host", "http://", "http://host/v1?x=1",
    "http://user@host", "host/v1", "bad_host!", "10.0.0.1:80:90", "a\tb",
])
def test_bad_entries_raise_value_error(entry):
    with pytest.raises(ValueError):
        parse_entry(entry, 8101)


def test_file_with_comments_duplicates_and_bad_lines(caplog):
    text = (
        "# the fleet\n"
        "\n"
        "10.0.0.11:9001   # rack 1\n"
        "10.0.0.12\n"
        "http://10.0.0.11:9001/v1   # same backend as line 3\n"
        "10.0.0.13:99999\n"
        "has spaces inside\n"
        "   [fd00::5]:9001\n"
    )
    with caplog.at_level(logging.WARNING, logger="forwarder.fleet.backend_list"):
        urls = parse_backend_list(text, "fleet.txt", 8101)
    assert urls == ["http://10.0.0.11:9001", "http://10.0.0.12:8101", "http://[fd00::5]:9001"]
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("fleet.txt:6:") and "10.0.0.13:99999" in m for m in messages)
    assert any(m.startswith("fleet.txt:7:") for m in messages)
    assert len(messages) == 2


@pytest.mark.parametrize("entry, name", [
    ("dns+vllm.llm.svc.cluster.local:8000", DnsName("vllm.llm.svc.cluster.local", 8000)),
    ("DNS+VLLM:8000", DnsName("vllm", 8000)),
    ("dns+vllm", DnsName("vllm", 8101)),
    ("dns+vllm.example.:9001", DnsName("vllm.example.", 9001)),
])
def test_dns_entries(entry, name):
    assert parse_entry(entry, 8101) == name
    assert name.source == f"dns+{name.name}:{name.port}"


@pytest.mark.parametrize("entry", [
    "dns+", "dns+:8000", "dns+vllm:0", "dns+vllm:x", "dns+10.0.0.1:8000", "dns+[fd00::5]:8000",
    "dns+http://vllm:8000", "dns+vllm:8000/v1", "dns+bad_host!:8000",
])
def test_bad_dns_entries_raise_value_error(entry):
    with pytest.raises(ValueError):
        parse_entry(entry, 8101)


def test_dns_entries_keep_their_place_among_urls_and_duplicates_collapse():
    text = "10.0.0.11\ndns+vllm:8000\nDNS+vllm:8000\n10.0.0.12\n"
    assert parse_backend_list(text, "ip.txt", 8101) == [
        "http://10.0.0.11:8101", DnsName("vllm", 8000), "http://10.0.0.12:8101"]
