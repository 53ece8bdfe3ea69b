"""The dashboard in a real browser: `rim-lens dashboard RUNS --port FREE` as a subprocess,
headless Chromium (Debian's, driven by playwright), every page clicked through and one
playground ablation run. Screenshots go to test-artifacts/screenshots/; with
RIM_LENS_UPDATE_SCREENSHOT=1 the README's docs/dashboard.png is rewritten too.

Chromium comes from apt (`apt-get install -y chromium`; `make test` does it); never
`playwright install`, which downloads a browser and fails offline.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from fixtures import clone_runs

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("RIM_LENS_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SHOTS = REPO / "test-artifacts" / "screenshots"
DOCS_SHOT = REPO / "docs" / "dashboard.png"
CHART = ".js-plotly-plot .main-svg"
TIMEOUT_MS = 90_000

pytestmark = pytest.mark.browser  # deselect with -m "not browser"

playwright_api = pytest.importorskip(
    "playwright.sync_api", reason="the playwright package is not installed (pip install -e .[dev])"
)


@pytest.fixture(scope="module")
def runs_root(tiny_modchain_runs, tmp_path_factory) -> Path:
    """A runs folder holding the tiny trained runs (tests/fixtures.py) as demo/{rim,pause,direct}."""
    dest = tmp_path_factory.mktemp("browser") / "runs"
    copy = clone_runs(tiny_modchain_runs, dest)
    shutil.move(copy["rim"].parent, dest / "demo")
    return dest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rim_lens_command() -> list[str]:
    script = Path(sys.executable).with_name("rim-lens")
    return [str(script)] if script.exists() else [sys.executable, "-m", "rim_lens.cli"]


@pytest.fixture(scope="module")
def server(runs_root, tmp_path_factory):
    """`rim-lens dashboard` serving the runs; always terminated at the end."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("server") / "dashboard.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    with open(log_path, "w") as log:
        # Started beside the runs folder and given it as `runs`, as a user would.
        proc = subprocess.Popen(
            [*rim_lens_command(), "dashboard", "runs", "--port", str(port)],
            cwd=runs_root.parent,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"rim-lens dashboard exited with {proc.returncode}:\n{log_path.read_text()}")
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                    if r.read().decode().strip() == "ok":
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"no answer on {url}/_stcore/health within 90 s:\n{log_path.read_text()}")
            time.sleep(0.25)
        yield url
    finally:
        stop(proc)


def stop(proc: subprocess.Popen) -> None:
    """Terminate the server we started (its own process group: streamlit and any child)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(
            f"Chromium not found at {CHROMIUM}: install it with `apt-get install -y chromium` "
            "(make test does), or set RIM_LENS_CHROMIUM"
        )
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


def shot(page, name: str) -> Path:
    """The whole page: Streamlit scrolls inside its main pane, so the viewport is stretched to it."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    size = page.viewport_size
    panes = '[data-testid="stMain"], [data-testid="stAppViewContainer"]'
    height = page.evaluate(
        f"() => Math.max(800, ...Array.from(document.querySelectorAll('{panes}'), e => e.scrollHeight))"
    )
    page.set_viewport_size({"width": size["width"], "height": min(int(height), 5000)})
    time.sleep(0.5)
    page.screenshot(path=str(path))
    page.set_viewport_size(size)
    return path


def go_to(page, name: str, expect: str) -> None:
    """Pick a page in the sidebar and wait until it shows `expect`."""
    page.locator('[data-testid="stSidebar"]').get_by_text(name, exact=True).click()
    page.get_by_text(expect).first.wait_for(timeout=TIMEOUT_MS)
    wait_idle(page)


def wait_idle(page) -> None:
    """Until Streamlit has finished the script run (no stale elements, no running indicator)."""
    page.wait_for_function(
        """() => !document.querySelector('[data-stale="true"]') && !document.querySelector(
        '[data-testid="stStatusWidgetRunningIcon"], [data-testid="stStatusWidgetRunningManIcon"]')""",
        timeout=TIMEOUT_MS,
    )


def test_dashboard_in_chromium(server, browser, runs_root):
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.goto(server, timeout=TIMEOUT_MS)

    # Runs: the table and the training curves (plotly renders into SVG).
    page.locator(".gtitle", has_text="Training loss per stage").first.wait_for(timeout=TIMEOUT_MS)
    wait_idle(page)
    page.get_by_role("heading", name="Runs").wait_for(state="visible", timeout=TIMEOUT_MS)
    assert page.locator(".gtitle", has_text="Training loss per stage: demo/rim").count() == 1
    shot(page, "1-runs")

    go_to(page, "Memory explorer", "Inference prompt:")
    # Plotly draws after the script run ends, so wait for this chart's own title, not any chart.
    page.locator(".gtitle", has_text="State norm").first.wait_for(timeout=TIMEOUT_MS)
    assert page.locator(".gtitle", has_text="State norm").count() == 1
    page.get_by_text("rim-lens analyze capture").first.wait_for(timeout=TIMEOUT_MS)
    shot(page, "2-memory-explorer")

    go_to(page, "Probes", "has no probe results")
    page.get_by_text("rim-lens analyze probe runs/demo/rim").first.wait_for(timeout=TIMEOUT_MS)
    shot(page, "3-probes")
    # Each page has its URL (st.navigation), so the browser's back button returns to the last one.
    assert page.url.endswith("/probes"), page.url
    page.go_back()
    page.get_by_text("Inference prompt:").first.wait_for(timeout=TIMEOUT_MS)
    assert page.url.endswith("/explorer"), page.url
    page.go_forward()
    page.get_by_text("has no probe results").first.wait_for(timeout=TIMEOUT_MS)
    wait_idle(page)

    go_to(page, "Causal", "has no causal report")
    # Inside an expander that opens as the page is drawn: wait until it is visible, not just present.
    page.get_by_role("button", name="Run causal report").wait_for(state="visible", timeout=TIMEOUT_MS)
    shot(page, "4-causal")

    # Playground: zero every block state of example 0 and run the model live.
    go_to(page, "Playground", "Press Run intervention")
    page.get_by_role("button", name="Run intervention").click()
    page.get_by_text("the readout changed").wait_for(timeout=TIMEOUT_MS)
    page.wait_for_selector(CHART, timeout=TIMEOUT_MS)
    wait_idle(page)
    page.locator('[data-testid="stMetricValue"]').nth(2).wait_for(timeout=TIMEOUT_MS)
    page.locator(".gtitle", has_text="Readout after each block").first.wait_for(timeout=TIMEOUT_MS)
    labels = page.locator('[data-testid="stMetricLabel"]').all_inner_texts()
    assert [label.strip() for label in labels[:3]] == [
        "gold answer",
        "answer, intact",
        "answer under zero",
    ], labels
    assert page.locator(".gtitle", has_text="Readout after each block: intact vs intervened").count() == 1
    shot(page, "5-playground-ablation")

    if os.environ.get("RIM_LENS_UPDATE_SCREENSHOT") == "1":
        update_docs_screenshot(page)
    assert not errors, errors


def update_docs_screenshot(page) -> None:
    """docs/dashboard.png for the README: the causal report card of the sample runs, 1280x800."""
    go_to(page, "Causal", "has no causal report")
    page.get_by_label("Held-out examples per analysis").fill("48")
    page.get_by_label("Held-out examples per analysis").press("Enter")
    wait_idle(page)
    page.get_by_role("button", name="Run causal report").click()
    page.get_by_role("heading", name=re.compile("^Necessity: ")).wait_for(timeout=TIMEOUT_MS)
    page.wait_for_selector(CHART, timeout=TIMEOUT_MS)
    wait_idle(page)
    shot(page, "6-causal-report")
    # The README picture: the first finding, its intervals, and RiM's ablation beside the control's.
    heading = page.get_by_role("heading", name=re.compile("^Necessity: "))
    heading.evaluate("h => h.scrollIntoView({block: 'start'})")
    page.mouse.move(5, 790)  # no hover toolbar on the charts
    time.sleep(0.5)
    DOCS_SHOT.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(DOCS_SHOT))
    shrink(DOCS_SHOT, limit=300_000)
    assert DOCS_SHOT.stat().st_size < 300_000


def shrink(path: Path, limit: int) -> None:
    """Re-encode a PNG with a 256-colour palette if it is over `limit` bytes."""
    if path.stat().st_size <= limit:
        return
    from PIL import Image

    Image.open(path).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(
        path, optimize=True
    )
