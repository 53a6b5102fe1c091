"""End-to-end: `dns+NAME:PORT` entries through a real gunicorn, resolved by a fake DNS server the
test controls (`tests/fake_dns.py`, pointed at with `DNS_SERVER`) or by the system resolver; and
`GET /_health`. Fake backends share one port on different loopback addresses, as vLLM pods
behind a headless Service do."""

import os
import shutil
import time

import requests

from tests.harness import wait_until

ROUNDS = 20  # requests per routing check: one of two backends gets none with p < 1e-5


def shown(fwd):
    """`{url: source}` of every backend in /_backends."""
    return {b["url"]: b["source"] for b in fwd.backends()["backends"]}


def healthy_urls(fwd):
    return {b["url"] for b in fwd.backends()["backends"] if b["healthy"]}


def served_by(fwd, rounds=ROUNDS):
    """The names of the fake backends that answered `rounds` requests through the forwarder."""
    names = set()
    with requests.Session() as http:
        http.trust_env = False
        for _ in range(rounds):
            response = http.get(fwd.url + "/v1/any/path", timeout=10)
            assert response.status_code == 200, response.text
            names.add(response.headers["X-Fake-Backend"])
    return names


def test_dns_entry_backends_follow_the_name_between_polls(fake_dns, fake_backend, forwarder):
    first = fake_backend(host="127.0.0.2")
    second = fake_backend(host="127.0.0.3", port=first.port)
    third = fake_backend(host="::1", port=first.port)
    dns = fake_dns({"vllm.test": {"A": ["127.0.0.2", "127.0.0.3"]}})
    source = f"dns+vllm.test:{first.port}"
    fwd = forwarder([f"dns+VLLM.test:{first.port}  # the pods"],
                    env={"DNS_SERVER": dns.address}, wait_healthy=2)

    assert shown(fwd) == {first.url: source, second.url: source}
    assert served_by(fwd) == {first.name, second.name}

    # One address leaves, an IPv6 one (AAAA) joins.
    dns.set_zone({"vllm.test": {"A": ["127.0.0.3"], "AAAA": ["::1"]}})
    wait_until(lambda: healthy_urls(fwd) == {second.url, third.url},
               message=lambda: f"backends did not follow DNS: {fwd.backends()}")
    assert shown(fwd) == {second.url: source, third.url: source}
    assert served_by(fwd) == {second.name, third.name}

    # A failing DNS server: the entry keeps its last backends, and says so once in the log.
    dns.set_zone({}, mode="servfail")
    failures = len(dns.questions())
    wait_until(lambda: len(dns.questions()) >= failures + 3, message="no lookups while failing")
    assert shown(fwd) == {second.url: source, third.url: source}
    assert served_by(fwd) == {second.name, third.name}
    assert fwd.log().count(f"{source}: DNS lookup failed") == 1

    # The name is gone (NXDOMAIN: a headless Service scaled to zero): so are its backends.
    dns.set_zone({})
    wait_until(lambda: shown(fwd) == {},
               message=lambda: f"NXDOMAIN did not empty the entry: {fwd.backends()}")
    assert requests.get(fwd.url + "/v1/models", timeout=10).status_code == 503
    assert f"{source}: DNS lookup works again" in fwd.log()


def test_hanging_dns_server_delays_neither_relayed_requests_nor_health(
        fake_dns, fake_backend, forwarder):
    listed = fake_backend()
    dns = fake_dns()
    dns.set_zone({}, mode="hang")
    timeout = 1.5
    fwd = forwarder([listed.url, "dns+vllm.test:8000"],
                    env={"DNS_SERVER": dns.address, "DNS_TIMEOUT_SECONDS": str(timeout)})

    # The worker takes connections only once its first cycle is over, and that cycle waits for
    # the lookup to give up: the listed backend is polled and healthy all the same.
    assert requests.get(fwd.url + "/_health", timeout=timeout + 5).json() == {
        "status": "ok", "backends_healthy": 1, "backends_total": 1}

    # Lookups go on hanging, one after another: requests relayed over longer than one of them
    # never wait (a resolver that blocked the worker would hold one up for most of `timeout`).
    questions = len(dns.questions())
    slowest = 0.0
    with requests.Session() as http:
        http.trust_env = False
        until = time.monotonic() + timeout + 0.5
        while time.monotonic() < until:
            sent = time.monotonic()
            assert http.get(fwd.url + "/v1/models", timeout=10).status_code == 200
            slowest = max(slowest, time.monotonic() - sent)
    assert len(dns.questions()) > questions, "no lookup happened meanwhile"
    assert slowest < timeout / 2, f"a request waited {slowest:.2f} s for the DNS lookup"


def _configmap_volume(directory, text, version):
    """Lay out `directory` as the kubelet does for a ConfigMap volume, or update it the way the
    kubelet does: a new timestamped directory, then `..data` swapped to it by one rename."""
    payload = directory / f"..{version}"
    payload.mkdir()
    (payload / "ip.txt").write_text(text)
    staging = directory / "..data_tmp"
    staging.symlink_to(payload.name)
    old = os.readlink(directory / "..data") if (directory / "..data").is_symlink() else None
    os.replace(staging, directory / "..data")
    if old:
        shutil.rmtree(directory / old)
    if not (directory / "ip.txt").is_symlink():
        (directory / "ip.txt").symlink_to("..data/ip.txt")


def test_system_resolver_and_configmap_updates(fake_backend, forwarder, tmp_path):
    local = fake_backend()
    pod = fake_backend(host="127.0.0.2")
    volume = tmp_path / "config"
    volume.mkdir()
    entry = f"dns+localhost:{local.port}"
    _configmap_volume(volume, f"{entry}\n", "2026_01")
    fwd = forwarder([], env={"IP_LIST_FILE": str(volume / "ip.txt")}, wait_healthy=1)

    # No DNS_SERVER: /etc/hosts' localhost (127.0.0.1, and ::1 where listed) through getaddrinfo.
    assert shown(fwd)[local.url] == entry
    assert served_by(fwd, rounds=3) == {local.name}

    _configmap_volume(volume, f"{entry}\n{pod.url}\n", "2026_02")
    wait_until(lambda: pod.url in healthy_urls(fwd),
               message=lambda: f"ConfigMap update not seen: {fwd.backends()}")
    assert shown(fwd)[pod.url] is None
