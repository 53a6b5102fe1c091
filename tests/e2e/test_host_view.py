"""One view per host: the workers of one instance share what they know (SPEC "One view per
host"), each test through a real gunicorn with two workers."""

import contextlib
import mmap
import os
import socket
import time

import requests

from forwarder.host.layout import REGIONS, Header
from tests.harness import chat, get_json, log_lines, read_response, wait_until

CHAT = "/v1/chat/completions"


@contextlib.contextmanager
def host_table_words(fwd):
    """The instance's host table, mapped in this process too (its memory file, found among the
    master's open files), as 8-byte words."""
    for fd in os.listdir(f"/proc/{fwd.pid}/fd"):
        path = f"/proc/{fwd.pid}/fd/{fd}"
        with contextlib.suppress(OSError):
            if os.readlink(path).startswith("/memfd:vllm-forwarder-host-table"):
                break
    else:
        raise AssertionError("the forwarder's master holds no host table file")
    with open(path, "r+b") as file:
        memory = mmap.mmap(file.fileno(), 0)
    view = memoryview(memory)
    words = view.cast("q")
    try:
        yield words
    finally:
        words.release()
        view.release()
        memory.close()


def test_a_writer_killed_in_the_middle_of_a_write_stops_no_worker(fake_backend, forwarder,
                                                                   tmp_path):
    # A writer killed mid-write (gunicorn's kill of a worker that missed its heartbeat, the OOM
    # killer) leaves the list's counter odd after it moved the list's version: every reader
    # that tried to read the list spun forever, and the whole instance stopped answering. Now
    # readers keep their last reading, and the next write of the leader repairs the list.
    first, second = fake_backend(name="first"), fake_backend(name="second")
    # The leader's next write comes up to 3 s after the "death": meanwhile every request must
    # be answered at once.
    fwd = forwarder([first.url], workers=2, wait_healthy=1, env={"CHECK_INTERVAL_SECONDS": "3"})
    header = REGIONS["header"].at
    with host_table_words(fwd) as words:
        words[header + Header.LIST_SEQ] += 1
        words[header + Header.LIST_VERSION] += 1
        words[header + Header.CHANGES] += 1

    def both_workers_answer():
        answer = requests.post(fwd.url + CHAT, json=chat(), timeout=1)  # a new connection
        assert answer.status_code == 200 and answer.headers["X-Fake-Backend"] == "first"
        assert get_json(fwd, "/_backends")["total"] == 1
        return len({line["pid"] for line in fwd.access_lines() if line["path"] == CHAT}) == 2

    wait_until(both_workers_answer, timeout=10, message="one worker answered every request")

    def repaired():
        with host_table_words(fwd) as words:
            return words[header + Header.LIST_SEQ] % 2 == 0

    wait_until(repaired, timeout=10, message="the list was never repaired")
    fwd.ip_file.write_text(f"{first.url}\n{second.url}\n")
    wait_until(lambda: get_json(fwd, "/_backends")["healthy"] == 2, timeout=10,
               message="a change of the list after the repair was not taken")


def test_in_flight_counts_every_workers_requests_whichever_worker_answers(fake_backend,
                                                                           forwarder):
    backend = fake_backend(config={"tokens": 40, "token_delay": 0.1})
    fwd = forwarder([backend.url], workers=2, wait_healthy=1)
    streams = []
    try:
        for index in range(6):
            # Each stream on a connection of its own: the workers share them.
            response = requests.post(fwd.url + CHAT, json=chat(True, f"s{index}"), stream=True,
                                     timeout=10)
            response.raw.read(16)  # the stream has begun (and stays open)
            streams.append(response)
        answers = []

        def both_workers_answered():
            answers.append(get_json(fwd, "/_backends"))
            pids = {line["pid"] for line in fwd.access_lines() if line["path"] == "/_backends"}
            return len(pids) == 2

        wait_until(both_workers_answered, message="one worker answered every /_backends")
        assert {a["backends"][0]["in_flight"] for a in answers} == {6}
    finally:
        for response in streams:
            response.close()
    wait_until(lambda: get_json(fwd, "/_backends")["backends"][0]["in_flight"] == 0)


def test_a_burst_of_connections_at_start_is_spread_over_the_workers(fake_backend, forwarder):
    # The first poll takes a moment, so the workers start accepting a little apart, and the
    # connections of 40 clients reconnecting their pools to the restarted instance are waiting
    # in the listen queue by then. Each client then sends requests on its connection.
    backend = fake_backend(config={"metrics_delay": 0.5})
    fwd = forwarder([backend.url], workers=2, listening_only=True)
    sockets = []
    try:
        for _ in range(40):
            sockets.append(socket.create_connection(("127.0.0.1", fwd.port), timeout=10))
        for round_ in range(3):
            for index, sock in enumerate(sockets):
                sock.sendall(b"GET /v1/models/llama?c=%d HTTP/1.1\r\nHost: x\r\n\r\n" % index)
            for sock in sockets:
                head, _ = read_response(sock)
                assert head.startswith(b"HTTP/1.1 200")
    finally:
        for sock in sockets:
            sock.close()
    lines = [line for line in fwd.access_lines() if line["path"].startswith("/v1/models/llama")]
    by_connection = {}
    for line in lines:
        by_connection.setdefault(line["path"], set()).add(line["pid"])
    assert all(len(pids) == 1 for pids in by_connection.values())  # kept alive
    per_worker = {}
    for (pid,) in by_connection.values():
        per_worker[pid] = per_worker.get(pid, 0) + 1
    assert len(per_worker) == 2 and min(per_worker.values()) >= 14, per_worker


def test_each_backend_is_polled_once_per_cycle_whatever_the_workers(fake_backend, forwarder):
    backends = [fake_backend() for _ in range(3)]
    fwd = forwarder([b.url for b in backends], workers=3, wait_healthy=3,
                    env={"CHECK_INTERVAL_SECONDS": "0.5"})
    for backend in backends:
        backend.reset()
    # Eight polls each, however long the box takes for them; then the polls per cycle, read
    # off the times the backends saw them: one, not one per worker (three).
    wait_until(lambda: all(len(b.polls()) >= 8 for b in backends), timeout=15)
    for backend in backends:
        polls = backend.polls()
        per_cycle = (len(polls) - 1) * 0.5 / (polls[-1] - polls[0])
        assert 0.6 < per_cycle < 1.5, (per_cycle, polls)
    assert get_json(fwd, "/_backends")["healthy"] == 3


def test_state_changes_are_logged_once_per_instance(fake_backend, fake_dns, forwarder):
    a = fake_backend(name="a")
    b = fake_backend(name="b")
    # A `dns+` name that stands for no backend makes an empty list whose every reading the
    # fake DNS server sees.
    dns = fake_dns({})
    fwd = forwarder([a.url], workers=2, wait_healthy=1,
                    env={"CHECK_INTERVAL_SECONDS": "0.3", "DNS_SERVER": dns.address})
    fwd.ip_file.write_text(f"{a.url}\n{b.url}\n")
    wait_until(lambda: get_json(fwd, "/_backends")["healthy"] == 2)
    a.configure(metrics_status=500)
    wait_until(lambda: get_json(fwd, "/_backends")["healthy"] == 1)
    polls = len(a.polls())
    wait_until(lambda: len(a.polls()) >= polls + 3)  # more polls that find it unhealthy
    a.configure(metrics_status=200)
    wait_until(lambda: get_json(fwd, "/_backends")["healthy"] == 2)
    fwd.ip_file.write_text(f"{b.url}\n")
    wait_until(lambda: get_json(fwd, "/_backends")["total"] == 1)
    fwd.ip_file.write_text("dns+nothing.test:8000\n")
    wait_until(lambda: get_json(fwd, "/_backends")["total"] == 0)
    questions = len(dns.questions())
    wait_until(lambda: len(dns.questions()) >= questions + 6)  # three more readings
    assert len(log_lines(fwd, rf"backend {a.url} added to the list")) == 1
    assert len(log_lines(fwd, rf"backend {b.url} added to the list")) == 1
    assert len(log_lines(fwd, rf"backend {a.url} is unhealthy \(HTTP 500\)")) == 1
    assert len(log_lines(fwd, rf"backend {a.url} is healthy")) == 2  # first poll, and back
    assert len(log_lines(fwd, rf"backend {a.url} removed from the list")) == 1
    assert len(log_lines(fwd, rf"backend {b.url} removed from the list")) == 1
    assert len(log_lines(fwd, r"names no backend")) == 1


def test_an_empty_list_is_warned_about_at_start(fake_dns, forwarder):
    dns = fake_dns({})  # a name that stands for no backend: every reading asks it
    fwd = forwarder(["dns+nothing.test:8000"], workers=2, env={"DNS_SERVER": dns.address})
    wait_until(lambda: log_lines(fwd, r"WARNING.*names no backend"))
    questions = len(dns.questions())
    wait_until(lambda: len(dns.questions()) >= questions + 6)  # three more readings
    assert len(log_lines(fwd, r"names no backend")) == 1


def test_a_backend_that_comes_back_takes_requests_within_about_a_second(fake_backend,
                                                                         forwarder):
    backend = fake_backend()
    # The default interval: only the re-poll of unhealthy backends can bring it back in time.
    fwd = forwarder([backend.url], workers=2, wait_healthy=1,
                    env={"CHECK_INTERVAL_SECONDS": "10"})
    backend.kill()
    assert requests.post(fwd.url + CHAT, json=chat(), timeout=10).status_code == 502
    wait_until(lambda: get_json(fwd, "/_backends")["healthy"] == 0)
    backend.restart()
    answering = time.monotonic()
    wait_until(lambda: requests.post(fwd.url + CHAT, json=chat(),
                                     timeout=5).status_code == 200, timeout=8, interval=0.1)
    assert time.monotonic() - answering < 4  # about a second, on a loaded box
