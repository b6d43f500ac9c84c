"""Pictures of the dashboard as a person sees it: a real server, pages opened in headless Chromium.

    python -m crystalae.dashboard.snapshot --storage runs/bench/rank_correlation --registry runs/registry \
        --out docs/screenshots

Used by the browser test (every page renders without an exception) and to make the README's
screenshots from a real sweep. Needs the `playwright` package and Debian's Chromium (`apt-get install
chromium`): Playwright's own browser download needs the internet.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from crystalae.dashboard.launch import launch_command

__all__ = ["CHROMIUM", "PAGES", "serve", "browser", "open_page", "screenshot"]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
PAGES = {"home": "", "sweeps": "Sweeps", "compare": "Compare", "generate": "Generate", "registry": "Registry"}
RUN_TIMEOUT = 180  # s: a page's first run loads torch and a model
BATCH_TIMEOUT = 900  # s: the batch view samples and fingerprints its default 200 crystals and reference


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(storage: str, registry: str, log: Path, start_timeout: float = 60) -> Iterator[str]:
    """Base URL of a dashboard on a free loopback port; the server (its whole session) is always stopped.

    Raises:
        RuntimeError: the server did not answer its health check in `start_timeout` s (its log's tail).
    """
    port = _free_port()
    env = {**os.environ, "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false"}
    with open(log, "wb") as out:
        process = subprocess.Popen(launch_command(storage, registry, port=port), stdout=out,
                                   stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + start_timeout
        while not _healthy(url):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"dashboard did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)  # its own session: streamlit and anything it started
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
            return response.read() == b"ok"
    except OSError:
        return False


@contextlib.contextmanager
def browser():
    """A headless Chromium (Debian's) driven by Playwright."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


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


def open_page(chromium, url: str, name: str, prior: str | None = None):
    """Page `name` of PAGES, run to the end; the Generate page with samples drawn (from `prior`, one of
    `crystalae.prior.PRIORS`; default: the page's own choice). The caller closes it.

    Raises:
        AssertionError: the page shows an exception or is still loading.
    """
    page = chromium.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(f"{url}/{PAGES[name]}", timeout=RUN_TIMEOUT * 1000)
    wait_until_idle(page)
    if name == "generate":  # show generated crystals, not just the form
        if prior is not None:
            page.locator('[data-testid="stSelectbox"]', has_text="Prior").first.click()
            page.get_by_role("option", name=prior, exact=True).click()
            wait_until_idle(page)
        _press(page, "Generate samples", '[data-testid="stDownloadButton"]')
    _check_rendered(page)
    return page


def _open_batch(chromium, url: str, timeout: float = BATCH_TIMEOUT):
    """The Generate page's batch view: a batch scored at the page's defaults (CDVAE's metrics, the
    crystals' table). The caller closes it.

    Raises:
        AssertionError: the page shows an exception or a warning (the batch failed), or is still loading.
    """
    page = open_page(chromium, url, "generate")
    page.get_by_role("tab", name="Batch metrics").click()
    _press(page, "Score a batch", '[data-testid="stMetric"]', timeout)
    warnings = page.locator('[data-testid="stAlertContentWarning"]')
    assert warnings.count() == 0, warnings.first.inner_text()
    _check_rendered(page)
    return page


def _press(page, button: str, result: str, timeout: float = RUN_TIMEOUT) -> None:
    """Click `button` and wait for the `result` selector and the run that draws it to finish."""
    page.get_by_role("button", name=button).click()
    page.wait_for_selector(result, timeout=timeout * 1000)
    wait_until_idle(page, timeout)


def _check_rendered(page) -> None:
    exceptions = page.locator('[data-testid="stException"]')
    assert exceptions.count() == 0, exceptions.first.inner_text()
    assert page.locator('[data-testid="stSkeleton"]').count() == 0, "page still loading"


def screenshot(page, path: Path, max_height: int = 5000) -> None:
    """Whole page: Streamlit scrolls inside its main block, so grow the viewport to the content first."""
    height = page.evaluate('document.querySelector(\'[data-testid="stMain"]\').scrollHeight')
    page.set_viewport_size({"width": page.viewport_size["width"], "height": min(int(height) + 40, max_height)})
    page.wait_for_timeout(1500)  # plotly redraws at the new size
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="screenshots of every dashboard page")
    parser.add_argument("--storage", required=True, help="sweeps folder or URI")
    parser.add_argument("--registry", required=True, help="registry folder or URI")
    parser.add_argument("--out", type=Path, default=Path("docs/screenshots"))
    parser.add_argument("--only", nargs="+", choices=[*PAGES, "batch"], help="these pictures only (default all)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with serve(args.storage, args.registry, args.out / ".server.log") as url, browser() as chromium:
        for name in args.only or [*PAGES, "batch"]:
            page = _open_batch(chromium, url) if name == "batch" else open_page(chromium, url, name)
            try:
                screenshot(page, args.out / f"{name}.png")
                print(f"{args.out / name}.png")
            finally:
                page.close()
    (args.out / ".server.log").unlink(missing_ok=True)


if __name__ == "__main__":
    main()
