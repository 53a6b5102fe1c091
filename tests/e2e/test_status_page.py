"""`GET /_status` in a real headless Chromium (Debian's `chromium`, driven by Playwright): it shows
every backend, and a backend that dies turns unhealthy on the page without a reload."""

import os
import shutil

import pytest

from tests.harness import REPO_ROOT

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = REPO_ROOT / "test-artifacts"


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
    page.wait_for_function(
        "document.getElementById('healthy-count').textContent === '1 of 2'", timeout=10000)
    assert page.evaluate("window.loadedOnce") is True  # refreshed in place, never reloaded
    assert not errors
    # Everything the page loaded came from the forwarder itself: no external assets.
    assert requested and all(url.startswith(fwd.url + "/") for url in requested)
    assert sum(url.endswith("/_backends") for url in requested) >= 2

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "status-page.png"), full_page=True)
