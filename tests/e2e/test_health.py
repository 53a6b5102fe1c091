"""End-to-end: the backend list and the health poller, as `/_backends` shows them."""

import os
import signal

import requests

from tests.harness import closed_port, wait_until


def backend_status(fwd, url):
    return next(b for b in fwd.backends()["backends"] if b["url"] == url)


def test_every_ip_txt_form_as_backends_shows_it(fake_backend, forwarder):
    with closed_port() as spare:
        every_ip_txt_form_as_backends_shows_it(fake_backend, forwarder, spare)


def every_ip_txt_form_as_backends_shows_it(fake_backend, forwarder, spare):
    backend = fake_backend()
    port = backend.port
    lines = [
        "# the fleet",
        "",
        f"127.0.0.1:{port}   # trailing comment",
        "127.0.0.1",                       # BACKEND_DEFAULT_PORT
        f"localhost:{spare}",
        f"[::1]:{spare}",
        "::1",
        f"http://127.0.0.1:{port}/v1/",    # the same backend as line 3
        f"http://127.0.0.1:{spare}/prefix/v1",
        f"https://localhost:{spare}",
        "127.0.0.1:99999",                 # bad port: skipped
        "ftp://127.0.0.1:21",              # bad scheme: skipped
    ]
    fwd = forwarder(lines, env={"BACKEND_DEFAULT_PORT": str(spare)}, wait_healthy=1)
    status = fwd.backends()
    assert [b["url"] for b in status["backends"]] == [
        f"http://127.0.0.1:{port}",
        f"http://127.0.0.1:{spare}",
        f"http://localhost:{spare}",
        f"http://[::1]:{spare}",         # `::1` with the default port is the same backend
        f"http://127.0.0.1:{spare}/prefix",
        f"https://localhost:{spare}",
    ]
    assert status["total"] == 6 and status["healthy"] == 1
    for entry in status["backends"]:
        assert set(entry) >= {"url", "healthy", "num_requests_running", "num_requests_waiting",
                              "last_checked_at", "last_error"}
    log = fwd.log()
    assert f"{fwd.ip_file}:11: skipping backend entry '127.0.0.1:99999'" in log
    assert f"{fwd.ip_file}:12: skipping backend entry 'ftp://127.0.0.1:21'" in log


def test_health_flips_on_500_refused_timeout_and_back(fake_backend, forwarder):
    backend = fake_backend()
    fwd = forwarder([backend.url], env={"HEALTH_TIMEOUT_SECONDS": "0.5"}, wait_healthy=1)

    def becomes(healthy, error):
        def check():
            status = backend_status(fwd, backend.url)
            return status["healthy"] is healthy and status["last_error"] == error
        wait_until(check, timeout=5, message=lambda: f"not {healthy}/{error}: {fwd.backends()}")

    backend.configure(metrics_status=500)
    becomes(False, "HTTP 500")
    backend.configure(metrics_status=200)
    becomes(True, None)
    backend.configure(metrics_delay=2)
    becomes(False, "timeout")
    backend.configure(metrics_delay=0)
    becomes(True, None)
    backend.kill()
    becomes(False, "connection refused")
    backend.restart()
    becomes(True, None)
    status = backend_status(fwd, backend.url)
    assert status["last_checked_at"] > 1.7e9


def test_load_figures_summed_over_engines_null_when_absent(fake_backend, forwarder):
    two_engines = fake_backend(config={"metrics": "dp2", "running": 3, "waiting": 4})
    old_engine = fake_backend(config={"metrics": "v0", "running": 1, "waiting": 0})
    no_load = fake_backend(config={"metrics": "no_load"})
    garbage = fake_backend(config={"metrics": "garbage"})
    fwd = forwarder([b.url for b in (two_engines, old_engine, no_load, garbage)], wait_healthy=4)
    figures = {b["url"]: (b["num_requests_running"], b["num_requests_waiting"])
               for b in fwd.backends()["backends"]}
    assert figures[two_engines.url] == (6, 8)
    assert figures[old_engine.url] == (1, 0)
    assert figures[no_load.url] == (None, None)
    assert figures[garbage.url] == (None, None)
    # Figures follow the backend's load from poll to poll.
    two_engines.configure(running=0, waiting=1)
    wait_until(lambda: backend_status(fwd, two_engines.url)["num_requests_waiting"] == 2)


def test_unhealthy_backend_gets_no_requests_until_it_recovers(fake_backend, forwarder):
    a = fake_backend(name="a")
    b = fake_backend(name="b", config={"metrics_status": 503})
    fwd = forwarder([a.url, b.url], wait_healthy=1)
    with requests.Session() as http:
        names = {http.get(fwd.url + "/v1/any/path").headers["x-fake-backend"] for _ in range(20)}
        assert names == {"a"}
        b.configure(metrics_status=200)
        wait_until(lambda: fwd.backends()["healthy"] == 2)
        names = {http.get(fwd.url + "/v1/any/path").headers["x-fake-backend"] for _ in range(40)}
    assert names == {"a", "b"}


def test_a_poll_that_meets_a_closed_connection_is_sent_once_more(fake_backend, forwarder):
    # The first poll's `/v1/models` read meets a connection closed unanswered (what uvicorn does
    # with a kept-alive connection it times out): sent once more, it reads the list. Without the
    # resend the list would stay unknown until the next poll, ten minutes away.
    backend = fake_backend(config={"drop_next": 1})
    fwd = forwarder([backend.url], env={"CHECK_INTERVAL_SECONDS": "600"}, wait_healthy=1)
    wait_until(lambda: backend_status(fwd, backend.url)["models"], timeout=5)
    status = backend_status(fwd, backend.url)
    assert status["healthy"] is True and status["last_error"] is None
    model_polls = [r for r in backend.requests(include_polls=True) if r["path"] == "/v1/models"]
    assert len(model_polls) == 2


def fresh_get(url):
    """One request on a connection of its own, so that any worker may take it."""
    with requests.Session() as http:
        return http.get(url, timeout=10)


def test_two_workers_each_poll_and_serve(fake_backend, forwarder):
    backend = fake_backend()
    fwd = forwarder([backend.url], workers=2, wait_healthy=1)
    # Each worker answers from the registry its own poller fills, and accepts no connection
    # before its first poll cycle: whichever worker answers has seen the backend healthy.
    for _ in range(20):
        document = fresh_get(fwd.url + "/_backends").json()
        assert document["healthy"] == 1, document
        response = fresh_get(fwd.url + "/v1/models")
        assert response.status_code == 200, response.text
    log = fwd.log()
    assert log.count("Booting worker with pid") == 2
    assert "MonkeyPatchWarning" not in log


def test_a_restarted_worker_takes_no_connection_before_its_first_poll(fake_backend, forwarder):
    # A worker that has just started knows nothing of the fleet; were it to accept connections
    # then, a load balancer's probe meeting it would take the whole instance out of rotation.
    # The backend's `/metrics` answers slowly, so the new worker's first cycle lasts a while,
    # and fresh connections keep coming all along it.
    backend = fake_backend()
    fwd = forwarder([backend.url], workers=2, wait_healthy=1)
    backend.configure(metrics_delay=1.0)
    started = {str(pid) for pid in fwd.worker_pids()}
    os.kill(int(min(started)), signal.SIGKILL)
    answers = []

    def the_new_worker_has_answered():
        response = fresh_get(fwd.url + "/_health")
        answers.append((response.status_code, response.json()["status"]))
        return {line["pid"] for line in fwd.access_lines()} - started

    wait_until(the_new_worker_has_answered, timeout=15, interval=0.01,
               message=lambda: f"the new worker never answered:\n{fwd.log()[-3000:]}")
    assert set(answers) == {(200, "ok")}, answers
    assert len(answers) > 5  # connections came all through the new worker's first cycle
