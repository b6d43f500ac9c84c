"""The real dashboard server in headless Chromium: every page renders without an exception.

Starts `launch_command` on a free port against the tiny sweep, opens each page with Playwright,
waits until Streamlit has finished running the script, and saves docs/screenshots/<page>.png.
Skips when the playwright package or /usr/bin/chromium is missing.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from crystalae.dashboard.launch import launch_command

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = Path(__file__).resolve().parents[1] / "docs" / "screenshots"
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
PAGES = {"home": "", "sweeps": "Sweeps", "compare": "Compare", "generate": "Generate", "registry": "Registry"}
pytestmark = pytest.mark.slow
RUN_TIMEOUT = 180  # s: a page's first run loads torch and a model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_sweep, tmp_path_factory):
    """Base URL of a dashboard serving the tiny sweep; the server is always terminated."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not installed")
    pytest.importorskip("playwright.sync_api")
    port = free_port()
    log = tmp_path_factory.mktemp("dashboard") / "server.log"
    env = {**os.environ, "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false"}
    with open(log, "wb") as out:
        process = subprocess.Popen(launch_command(str(tiny_sweep["storage"]), str(tiny_sweep["registry"]), port=port),
                                   stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                    if response.read() == b"ok":
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"dashboard did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)  # its own session: streamlit and anything it started
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture(scope="module")
def browser(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def wait_until_idle(page, timeout: float = RUN_TIMEOUT, quiet: float = 2.0) -> None:
    """Wait until the app is mounted, and neither the 'running' status widget nor a loading skeleton
    (a lazily loaded chart or table component) has been seen for `quiet` seconds."""
    page.wait_for_selector('[data-testid="stApp"]', timeout=timeout * 1000)
    page.wait_for_selector('[data-testid="stMainBlockContainer"] h1', timeout=timeout * 1000)
    deadline, idle_since = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        running = page.locator('[data-testid="stStatusWidget"], [data-testid="stSkeleton"]').count() > 0
        if running:
            idle_since = None
        elif idle_since is None:
            idle_since = time.monotonic()
        elif time.monotonic() - idle_since >= quiet:
            return
        page.wait_for_timeout(250)
    raise AssertionError(f"{page.url} still running after {timeout} s")


def screenshot(page, path: Path, max_height: int = 5000) -> None:
    """Whole page: Streamlit scrolls inside its main block, so grow the viewport to the content first."""
    height = page.evaluate('document.querySelector(\'[data-testid="stMain"]\').scrollHeight')
    page.set_viewport_size({"width": page.viewport_size["width"], "height": min(int(height) + 40, max_height)})
    page.wait_for_timeout(1500)  # plotly redraws at the new size
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path))


@pytest.mark.parametrize("name", list(PAGES))
def test_page_renders_in_browser(name, server, browser):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        page.goto(f"{server}/{PAGES[name]}", timeout=RUN_TIMEOUT * 1000)
        wait_until_idle(page)
        if name == "generate":  # show generated crystals, not just the form
            page.get_by_role("button", name="Generate samples").click()
            page.wait_for_selector('[data-testid="stDownloadButton"]', timeout=RUN_TIMEOUT * 1000)
            wait_until_idle(page)
        if name == "sweeps":  # the tiny sweep has two objectives: its Pareto front is drawn
            page.locator('[data-testid="stHeading"]', has_text="Pareto front").wait_for(timeout=30_000)
            page.locator(".js-plotly-plot .legendtext", has_text="Pareto front").first.wait_for(timeout=30_000)
        exceptions = page.locator('[data-testid="stException"]')
        assert exceptions.count() == 0, exceptions.first.inner_text()
        assert page.locator('[data-testid="stSkeleton"]').count() == 0, "page still loading"
        screenshot(page, SCREENSHOTS / f"{name}.png")
    finally:
        page.close()
