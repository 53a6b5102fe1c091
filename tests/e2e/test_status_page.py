"""`GET /_status` in a real headless Chromium (Debian's `chromium`, driven by Playwright): it shows
every backend, and a backend that dies turns unhealthy on the page without a reload; through two
gunicorn workers, it shows what the instance knows as a whole: requests in flight from every
worker, each backend's KV-cache use, an ejection, the requests waiting in the queue, and the
requests, errors and tokens per second of each backend and API key name, with their charts."""

import itertools
import os
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.harness import REPO_ROOT, wait_until

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = REPO_ROOT / "test-artifacts"
CHAT = "/v1/chat/completions"
# The page refreshes every 2 s: a change shows within a few seconds.
SHOWN_MS = 10000


def _sync_playwright():
    """Playwright, or a skip outside CI where it or the browser is missing (in CI, a failure:
    `.ci/run` installs both)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    missing = ("playwright (requirements-test.txt)" if sync_playwright is None
               else None if os.access(CHROMIUM, os.X_OK) else "chromium (apt-get install chromium)")
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"{missing} is not installed")
        pytest.skip(f"{missing} is not installed")
    return sync_playwright


@pytest.fixture
def browser():
    with _sync_playwright()() as playwright:
        # Debian's own build; Playwright never downloads a browser here.
        chromium = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--headless", "--no-sandbox", "--disable-gpu",
                  "--disable-background-networking"])
        try:
            yield chromium
        finally:
            chromium.close()


def test_status_page_shows_a_dying_backend_without_reload(fake_backend, forwarder, browser):
    steady = fake_backend(config={"running": 4, "waiting": 1})
    doomed = fake_backend()
    fwd = forwarder([steady.url, doomed.url], wait_healthy=2)
    page = browser.new_page(viewport={"width": 1280, "height": 400})
    requested = []
    page.on("request", lambda request: requested.append(request.url))
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))

    page.goto(fwd.url + "/_status")
    page.wait_for_selector(f'tr[data-url="{doomed.url}"][data-healthy="true"]', timeout=10000)
    page.wait_for_selector(f'tr[data-url="{steady.url}"][data-healthy="true"]', timeout=10000)
    row = page.locator(f'tr[data-url="{steady.url}"]')
    assert row.locator(".health").inner_text() == "healthy"
    assert row.locator(".running").inner_text() == "4"
    assert row.locator(".waiting").inner_text() == "1"
    assert page.locator("#healthy-count").inner_text() == "2 of 2"
    page.evaluate("window.loadedOnce = true")

    doomed.kill()
    dead = page.locator(f'tr[data-url="{doomed.url}"][data-healthy="false"]')
    dead.wait_for(timeout=10000)
    assert dead.locator(".health").inner_text() == "unhealthy"
    assert dead.locator(".last-error").inner_text() == "connection refused"
    assert dead.locator(".kv-cache").inner_text() == "–"  # unknown once its poll failed
    assert row.locator(".kv-cache").inner_text() == "7 %"  # the fake's own figure, 0.0734
    page.wait_for_function(
        "document.getElementById('healthy-count').textContent === '1 of 2'", timeout=10000)
    assert page.evaluate("window.loadedOnce") is True  # refreshed in place, never reloaded
    assert not errors
    # Everything the page loaded came from the forwarder itself: no external assets.
    assert requested and all(url.startswith(fwd.url + "/") for url in requested)
    assert sum(url.endswith("/_backends") for url in requested) >= 2
    assert sum(url.endswith("/_status/data") for url in requested) >= 2
    # No API keys: no keys table.
    assert page.locator("#api-keys").is_hidden()

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "status-page.png"), full_page=True)


def chat(stream=False, content="hi"):
    return {"model": "llama", "stream": stream,
            "messages": [{"role": "user", "content": content}]}


def get_json(fwd, path):
    """GET on a connection of its own, so that either worker may answer."""
    with requests.Session() as session:
        session.trust_env = False
        return session.get(fwd.url + path, timeout=5).json()


def open_status(browser, fwd):
    """The page, loaded once, and the errors it met (script errors, console errors such as a
    Content-Security-Policy violation)."""
    page = browser.new_page(viewport={"width": 1280, "height": 400})
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("console", lambda message: message.type == "error" and errors.append(message.text))
    page.goto(fwd.url + "/_status")
    page.wait_for_selector("#healthy-count", timeout=SHOWN_MS)
    page.evaluate("window.loadedOnce = true")
    return page, errors


def wait_for_text(page, selector, expected):
    """Until the element's text is `expected` (the page redraws in place every 2 s)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.wait_for_function(
            "([selector, expected]) => {"
            "  const element = document.querySelector(selector);"
            "  return element !== null && element.innerText === expected; }",
            arg=[selector, expected], timeout=SHOWN_MS)
    except PlaywrightTimeout:
        shown = page.evaluate("selector => document.querySelector(selector)?.innerText ?? null",
                              selector)
        raise AssertionError(f"{selector} shows {shown!r}, not {expected!r}, after "
                             f"{SHOWN_MS / 1000:g} s") from None


def row_selector(backend):
    return f'tr[data-url="{backend.url}"]'


def sessions_on_both_workers(fwd, count=4):
    """`count` kept-alive sessions (of a fresh instance of two workers, before the browser opens
    connections of its own), each with a connection open. A worker holding more than one
    connection over its sibling stops accepting, so opened one after another from none, some of
    them are held by each worker: requests sent over all of them are relayed by both."""
    sessions = []
    for _ in range(count):
        session = requests.Session()
        session.trust_env = False
        assert session.get(fwd.url + "/_health", timeout=10).status_code == 200
        sessions.append(session)
    return sessions


def test_status_page_shows_the_instance_wide_load_kv_cache_and_queue(
        fake_backend, forwarder, browser):
    # Streams that go silent after their first token: held open until the test lets them go.
    roomy = fake_backend(config={"kv_cache": 0.73, "stall_after": 1})
    full = fake_backend(config={"kv_cache": 0.95, "stall_after": 1})
    fwd = forwarder([roomy.url, full.url], workers=2, wait_healthy=2,
                    env={"MAX_IN_FLIGHT_PER_BACKEND": "2", "QUEUE_TARGET_SECONDS": "30"})
    sessions = sessions_on_both_workers(fwd)
    page, errors = open_status(browser, fwd)
    roomy_row, full_row = page.locator(row_selector(roomy)), page.locator(row_selector(full))
    wait_for_text(page, f"{row_selector(roomy)} .kv-cache", "73 %")
    assert "full" not in roomy_row.locator(".kv-cache").get_attribute("class").split()
    assert full_row.locator(".kv-cache").inner_text() == "95 %"
    # Nearly full (least_loaded avoids it): styled as a problem.
    assert "full" in full_row.locator(".kv-cache").get_attribute("class").split()
    assert page.locator("#queued").inner_text() == "0 requests"
    assert "0 requests waiting in the queue" in page.locator("#summary").inner_text()
    assert all("this worker" not in head.inner_html() for head in page.locator("thead").all())

    streams, chunks = [], []
    with ThreadPoolExecutor(1) as pool:
        try:
            # Two streams on each backend (the limit), each on a connection of its own: the
            # workers share them, and each worker counts only its own.
            for index, session in enumerate(sessions):
                response = session.post(f"{fwd.url}{CHAT}?hold={index}",
                                        json=chat(True, f"s{index}"), stream=True, timeout=30)
                streams.append(response)
                it = response.iter_content(None)
                next(it)  # the stream has begun
                chunks.append(it)  # kept: dropping it would close the stream
            wait_for_text(page, f"{row_selector(roomy)} .in-flight", "2")
            wait_for_text(page, f"{row_selector(full)} .in-flight", "2")
            # One more request finds every backend at its limit: it waits in the queue.
            queued = pool.submit(requests.post, fwd.url + CHAT, json=chat(content="queued"),
                                 timeout=30)
            wait_until(lambda: get_json(fwd, "/_backends")["queued"] == 1, timeout=5,
                       message="the request never queued")
            wait_for_text(page, "#queued", "1 request")
            assert "1 request waiting in the queue" in page.locator("#summary").inner_text()
            assert page.locator("#queued").get_attribute("class") == "busy"
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "status-page-load.png"), full_page=True)
        finally:
            for response in streams:
                response.close()
            for session in sessions:
                session.close()
        # Their places freed, the queued request went through.
        assert queued.result(timeout=10).status_code == 200
    wait_for_text(page, "#queued", "0 requests")
    wait_for_text(page, f"{row_selector(roomy)} .in-flight", "0")
    wait_for_text(page, f"{row_selector(full)} .in-flight", "0")
    # The streams were spread over both workers: the figures shown were the instance's, not
    # those of the worker that answered the page. (A stream is logged once it has ended.)

    def workers_that_held_them():
        pids = [line["pid"] for line in fwd.access_lines() if "hold=" in line["path"]]
        return set(pids) if len(pids) == len(streams) else None

    held = wait_until(workers_that_held_them, message="the held streams were not all logged")
    assert len(held) == 2, "one worker held every stream"
    assert page.evaluate("window.loadedOnce") is True
    assert not errors


def test_status_page_shows_an_ejected_backend(fake_backend, forwarder, browser):
    bad = fake_backend(config={"fail_status": 500})
    good = fake_backend()
    fwd = forwarder([bad.url, good.url], workers=2, wait_healthy=2,
                    env={"EJECT_AFTER_FAILURES": "2", "EJECT_SECONDS": "30"})
    page, errors = open_status(browser, fwd)
    page.wait_for_selector(f'{row_selector(bad)}[data-ejected="false"]', timeout=SHOWN_MS)
    assert page.locator(f"{row_selector(bad)} .health").inner_text() == "healthy"

    def ejected_until():
        with requests.Session() as session:
            session.trust_env = False
            session.post(fwd.url + CHAT, json=chat(), timeout=5)
        by_url = {b["url"]: b for b in get_json(fwd, "/_backends")["backends"]}
        return by_url[bad.url]["ejected_until"]

    until = wait_until(ejected_until, timeout=10, interval=0, message="never ejected")
    ejected_at = time.time()
    row = page.locator(f'{row_selector(bad)}[data-ejected="true"]')
    row.wait_for(timeout=SHOWN_MS)
    assert row.get_attribute("data-healthy") == "false"
    assert row.get_attribute("class") == "unhealthy"  # styled as a problem
    health = row.locator(".health")
    assert "down" in health.get_attribute("class")
    assert health.inner_text().splitlines()[0] == "ejected"
    ejection = row.locator(".ejection").inner_text()
    shown_clock = page.evaluate("until => new Date(until * 1000).toLocaleTimeString()", until)
    match = re.fullmatch(r"until (.+) · (\d+) s left", ejection)
    assert match, ejection
    assert match.group(1) == shown_clock
    # EJECT_SECONDS=30, counted on the server's clock (its Date header: whole seconds).
    assert 20 <= int(match.group(2)) <= min(31, until - ejected_at + 3), ejection
    assert row.locator(".last-error").inner_text() == \
        "ejected: failed requests in a row (last: HTTP 500)"
    page.wait_for_function(
        "document.getElementById('healthy-count').textContent === '1 of 2'", timeout=SHOWN_MS)
    good_row = page.locator(row_selector(good))
    assert good_row.get_attribute("data-ejected") == "false"
    assert good_row.locator(".health").inner_text() == "healthy"
    # The countdown goes on at each refresh.
    page.wait_for_function(
        "([selector, first]) => {"
        "  const text = document.querySelector(selector).innerText;"
        "  return Number(text.match(/(\\d+) s left/)[1]) < first; }",
        arg=[f"{row_selector(bad)} .ejection", int(match.group(2))], timeout=SHOWN_MS)
    assert page.evaluate("window.loadedOnce") is True
    assert not errors

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "status-page-ejected.png"), full_page=True)


RATE_KINDS = ("requests", "errors", "tokens")


def shown_rates(page):
    """What the page shows for each backend (by URL) and API key name: {kind: {"text": the
    figure, "chart": whether its chart draws a line, "bad": whether it is styled as a problem}}."""
    return page.evaluate(
        """kinds => {
          const shown = {};
          for (const row of document.querySelectorAll("tr[data-url], tr[data-key]")) {
            const figures = {};
            for (const kind of kinds) {
              const td = row.querySelector("td.rate." + kind);
              const line = td && td.querySelector("svg.spark > path.line");
              figures[kind] = td && {
                text: td.querySelector(".value").textContent,
                chart: line !== null && line.getAttribute("d").length > 0,
                bad: td.classList.contains("bad")};
            }
            shown[row.dataset.url ?? row.dataset.key] = figures;
          }
          return shown;
        }""", list(RATE_KINDS))


def rate(shown, name, kind):
    """The figure shown as a number, None when absent or "–"."""
    try:
        return float(shown[name][kind]["text"])
    except (KeyError, TypeError, ValueError):
        return None


def test_status_page_shows_requests_errors_and_tokens_per_second_by_backend_and_key(
        fake_backend, forwarder, browser):
    backend = fake_backend(config={"tokens": 5})
    fwd = forwarder([backend.url], workers=2, wait_healthy=1,
                    env={"FORWARDER_API_KEYS": "team-a:sk-a,team-b:sk-b"})
    sessions = sessions_on_both_workers(fwd)
    turns = itertools.cycle(sessions)
    page, errors = open_status(browser, fwd)
    page.wait_for_selector('#api-keys tr[data-key="team-b"]', timeout=SHOWN_MS)
    assert page.locator("#api-keys").is_visible()
    # Every configured key name has its row, its figures still 0 before any request.
    shown = shown_rates(page)
    assert set(shown) == {backend.url, "team-a", "team-b"}
    assert shown["team-a"]["requests"]["text"] == "0"

    def post(key, content):
        return next(turns).post(fwd.url + CHAT, json=chat(content=content), timeout=10,
                                headers={"Authorization": f"Bearer {key}"})

    def send_round(index):
        for key in ("sk-a", "sk-b", "sk-a", "sk-b", "sk-a"):
            assert post(key, f"{key} {index}").status_code == 200
        backend.configure(fail_status=500)
        try:
            assert post("sk-b", "fails").status_code == 500
        finally:
            backend.configure(fail_status=None)

    def as_expected(shown):
        for name in (backend.url, "team-a", "team-b"):
            if not (rate(shown, name, "requests") or 0) > 0 or \
                    not (rate(shown, name, "tokens") or 0) > 0:
                return False
        return (rate(shown, backend.url, "errors") or 0) > 0 and \
            (rate(shown, "team-b", "errors") or 0) > 0 and rate(shown, "team-a", "errors") == 0

    # The figures are the last interval's, from the last sample (every 10 s) to now: should a
    # sample fall between the requests and the page's next refresh, they are in the interval
    # before it; a new round then lands in the new one.
    seen = []

    def shown_as_expected():
        shown = shown_rates(page)
        if not seen or seen[-1] != shown:
            seen.append(shown)
        return as_expected(shown)

    for index in range(3):
        seen.clear()
        send_round(index)
        try:
            wait_until(shown_as_expected, timeout=SHOWN_MS / 1000, interval=0.1)
            break
        except AssertionError:
            if index == 2:
                raise AssertionError(f"the page showed, in turn: {seen}") from None
    shown = seen[-1]  # as it was then: a later sample starts an interval without them
    for name in (backend.url, "team-a", "team-b"):
        for kind in RATE_KINDS:
            assert shown[name][kind]["chart"], f"no chart of {kind} for {name}: {shown}"
    # Errors are styled as a problem, where there were some.
    assert shown[backend.url]["errors"]["bad"] and shown["team-b"]["errors"]["bad"]
    assert shown["team-a"]["errors"] == {"text": "0", "chart": True, "bad": False}
    # Names only, never a key.
    for text in (page.content(), page.locator("body").inner_text()):
        assert "sk-a" not in text and "sk-b" not in text
    # Both workers relayed some of them (each answer is counted by the worker that relayed it):
    # the figures shown were the instance's.
    wait_until(lambda: len({line["pid"] for line in fwd.access_lines()
                            if line["path"] == CHAT}) == 2, message="one worker relayed all")
    assert page.evaluate("window.loadedOnce") is True
    assert not errors

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "status-page-rates.png"), full_page=True)
    for session in sessions:
        session.close()
