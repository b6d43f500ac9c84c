"""The real dashboard server in headless Chromium: every page renders without an exception.

Serves the tiny sweep (`crystalae.dashboard.snapshot.serve`), opens each page with Playwright, waits
until Streamlit has finished running the script, and saves a screenshot to a temporary folder (the
README's pictures come from a real sweep: `python -m crystalae.dashboard.snapshot`). Skips when the
playwright package or /usr/bin/chromium is missing.
"""
from __future__ import annotations

import pytest

from crystalae.dashboard.snapshot import CHROMIUM, PAGES, browser, open_page, screenshot, serve
from crystalae.dashboard.views import element_color

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tiny_sweep, tmp_path_factory):
    """Base URL of a dashboard serving the tiny sweep; the server is always terminated."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not installed")
    pytest.importorskip("playwright.sync_api")
    log = tmp_path_factory.mktemp("dashboard") / "server.log"
    with serve(str(tiny_sweep["storage"]), str(tiny_sweep["registry"]), log) as url:
        yield url


@pytest.fixture(scope="module")
def chromium(server):
    with browser() as opened:
        yield opened


@pytest.mark.parametrize("name", list(PAGES))
def test_page_renders_in_browser(name, server, chromium, tmp_path):
    # the tiny 2-epoch champion decodes atoms from N(0, I) latents (as before its promotion fitted a prior), not
    # from the posterior prior it now has
    page = open_page(chromium, server, name, prior="normal" if name == "generate" else None)
    try:
        if name == "sweeps":  # the tiny sweep has two objectives: its Pareto front is drawn
            page.locator('[data-testid="stHeading"]', has_text="Pareto front").wait_for(timeout=30_000)
            page.locator(".js-plotly-plot .legendtext", has_text="Pareto front").first.wait_for(timeout=30_000)
            page.locator('[data-testid="stHeading"]', has_text="Does the objective rank").wait_for(timeout=30_000)
        if name == "home":  # the sidebar names the home page, not its script ("app")
            nav = page.locator('[data-testid="stSidebarNav"]').inner_text()
            assert "Overview" in nav and "app" not in nav.split(), nav
        if name == "compare":  # atoms wear their Jmol colours as the browser draws them
            drawn = page.evaluate("""Array.from(document.querySelectorAll('.js-plotly-plot')).flatMap(plot =>
                (plot.data || []).filter(t => t.type === 'scatter3d' && t.mode === 'markers')
                                 .map(t => [t.name, t.marker.color]))""")
            assert drawn and all(color == element_color(symbol) for symbol, color in drawn), drawn
        screenshot(page, tmp_path / f"{name}.png")
        assert (tmp_path / f"{name}.png").stat().st_size > 10_000
    finally:
        page.close()
