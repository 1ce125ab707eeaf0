"""End to end in a real browser: `rayad dashboard` runs as a process and headless Chromium (Debian's
package, which .ci/run installs) loads its pages, with no Streamlit exception box on any of them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from servers import free_port

from rayad.artifact import Predictor

pytestmark = pytest.mark.slow

# The flags the machine needs: no sandbox as root, and no background traffic to a closed network.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update"]
START_TIMEOUT_S = 60
SHOWN_AS_IS = "brick *tiny* `x`"  # the experiment's folder: titles show its name, not Markdown's italics and code
RENDER_TIMEOUT_MS = 60_000


def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (.ci/run installs Debian's chromium package)")
        pytest.skip("needs Debian's chromium: apt-get install chromium")
    return path


@pytest.fixture
def dashboard(tiny_experiment, tmp_path):
    """`rayad dashboard` on a runs directory holding the search experiment; yields its URL."""
    exp, _ = tiny_experiment
    shutil.copytree(exp, tmp_path / "runs" / SHOWN_AS_IS)
    port = free_port()
    rayad = Path(sys.executable).with_name("rayad")
    process = subprocess.Popen([str(rayad), "dashboard", "--runs", str(tmp_path / "runs"), "--port", str(port)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                if response.read() == b"ok":
                    break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"rayad dashboard did not start:\n{process.communicate()[0]}")
            time.sleep(0.5)
    yield url
    process.terminate()
    process.wait(timeout=30)


def settle(page) -> None:
    """Wait until Streamlit has finished running the page script, then check for exception boxes."""
    page.wait_for_selector('[data-testid="stApp"][data-test-script-state="notRunning"]', timeout=RENDER_TIMEOUT_MS)
    assert page.locator('[data-testid="stException"]').count() == 0, page.inner_text('[data-testid="stException"]')


def test_dashboard_in_headless_chromium(dashboard, tiny_experiment, demo_root, tmp_path):
    from playwright.sync_api import sync_playwright

    exp, _ = tiny_experiment
    shots = Path(os.environ.get("RAYAD_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 2000})  # tall: Streamlit scrolls inside the page
        page.goto(dashboard)
        page.get_by_role("heading", name="Experiments").wait_for(timeout=RENDER_TIMEOUT_MS)
        settle(page)

        page.get_by_role("link", name="Search").click()
        page.get_by_role("heading", name=f"Search: {SHOWN_AS_IS}").wait_for(timeout=RENDER_TIMEOUT_MS)
        settle(page)
        page.locator('[data-testid="stVegaLiteChart"]').first.locator("canvas, svg").first.wait_for(
            timeout=RENDER_TIMEOUT_MS)
        page.screenshot(path=str(shots / "dashboard_search.png"))

        for name in ("Model", "Gallery"):
            page.get_by_role("link", name=name).click()
            page.get_by_role("heading", name=f"{name}: {SHOWN_AS_IS}").wait_for(timeout=RENDER_TIMEOUT_MS)
            settle(page)
        # the script can be done before the browser has mounted its images: wait for the fifth
        page.locator('[data-testid="stImage"] img').nth(4).wait_for(timeout=RENDER_TIMEOUT_MS)
        assert page.locator('[data-testid="stImage"] img').count() >= 5
        page.screenshot(path=str(shots / "dashboard_gallery.png"))

        page.get_by_role("link", name="Try it").click()
        image = demo_root / "brick" / "test" / "stain" / "000.png"
        page.locator('input[type="file"]').set_input_files(str(image))
        score = page.locator('[data-testid="stMetric"]').filter(has_text="Score")
        score.wait_for(timeout=RENDER_TIMEOUT_MS)
        settle(page)
        expected = Predictor.load(exp / "best").predict_files([image])[0].scores[0]
        assert f"{expected:.6f}" in score.inner_text()
        browser.close()
    assert (shots / "dashboard_search.png").stat().st_size > 10_000
