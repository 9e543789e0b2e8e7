"""End to end in headless Chromium (Playwright's Python package driving Debian's chromium) against the
standalone app, as a newcomer uses it: an empty folder, two synthetic checkpoints made from the page, an
amplified difference, the refreshed lists, a merge interrupted half way with no file left behind.

Screenshots of every step go to artifacts/screenshots/ (or $REBASIN_SCREENSHOTS) for CI to keep.
Run: `DIR/current/bin/python -m pytest -m browser tests/test_e2e_browser.py` (venv from .ci/ui-envs.sh).
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("Debian's chromium is not installed (apt-get install chromium)", allow_module_level=True)
pytest.importorskip("gradio")
sync_api = pytest.importorskip("playwright.sync_api")

from lib_rebasin import jobs  # noqa: E402
from lib_rebasin.host.standalone import SAMPLE_NAMES  # noqa: E402
from lib_rebasin.synthetic import write_synthetic  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SHOTS = Path(os.environ.get("REBASIN_SCREENSHOTS", ROOT / "artifacts" / "screenshots"))
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run"]
STEMS = f"{SAMPLE_NAMES[0][:-len('.safetensors')]}_{SAMPLE_NAMES[1][:-len('.safetensors')]}"
AMP_NAME = f"amp_M2_{STEMS}.safetensors"
REBASIN_NAME = f"rebasin_a0.5_{STEMS}.safetensors"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """The standalone app on an empty folder, in its own process, as `python -m lib_rebasin ui` starts it."""
    models = tmp_path_factory.mktemp("browser") / "models"
    port = _free_port()
    log = open(models.parent / "server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "lib_rebasin", "ui", "--models-dir", str(models), "--port", str(port),
         "--sample-scale", "tiny"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                raise RuntimeError(f"the app did not start: {(models.parent / 'server.log').read_text()}")
            time.sleep(0.5)
    yield url, models
    server.terminate()
    server.wait(timeout=30)
    log.close()


@pytest.fixture(scope="module")
def page(app):
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(60_000)
        page.goto(app[0])
        page.wait_for_selector("#rebasin_merge")
        yield page
        browser.close()


def shot(page, name: str) -> None:
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def choose(page, elem_id: str, option: str) -> None:
    page.click(f"#{elem_id} input")
    page.click(f"#{elem_id} li[role=option][aria-label='{option}']")


def options(page, elem_id: str) -> list[str]:
    page.click(f"#{elem_id} input")
    found = page.locator(f"#{elem_id} li[role=option]").evaluate_all("items => items.map(i => i.ariaLabel)")
    page.click("#rebasin_formula")  # closes the list (Escape leaves it re-opening on the next click)
    return found


def pick_method(page, label: str) -> None:
    page.locator("#rebasin_method label").filter(has_text=label).get_by_text(label, exact=True).click()


def progress_seen(page) -> bool:
    tracker = page.locator("#rebasin_result [data-testid=status-tracker]")
    return tracker.count() > 0 and "%" in tracker.first.inner_text()


def wait_for_result(page, selector: str, contains: str, timeout: float = 120) -> str:
    """The result box's text once it shows `selector` holding `contains` (not a previous run's result)."""
    page.wait_for_function(
        "([selector, text]) => { const el = document.querySelector('#rebasin_result ' + selector);"
        " return el !== null && el.innerText.includes(text); }", arg=[selector, contains], timeout=timeout * 1000)
    page.wait_for_timeout(500)  # the follow-up event refreshes the lists
    return page.locator("#rebasin_result").inner_text()


def test_a_newcomer_merges_and_interrupts(page, app):
    url, models = app
    shot(page, "01-empty-folder")
    assert page.locator("#rebasin_samples").is_visible()

    page.click("#rebasin_create_samples")
    page.wait_for_function("() => { const t = document.querySelector('#rebasin_result [data-testid=status-tracker]');"
                           " return t && t.innerText.includes('%'); }")
    shot(page, "02-creating-samples-progress")
    wait_for_result(page, ".rebasin-info", "Created")
    assert sorted(os.listdir(models)) == sorted(SAMPLE_NAMES)
    assert not page.locator("#rebasin_samples").is_visible()
    shot(page, "03-samples-selected")

    page.click("#rebasin_merge")
    wait_for_result(page, ".rebasin-result", AMP_NAME)
    shot(page, "04-amplified-difference-result")
    assert (models / AMP_NAME).is_file()
    assert AMP_NAME in options(page, "rebasin_model_a") and AMP_NAME in options(page, "rebasin_model_b")

    # Re-Basin (exact weight matching, then the merge), with its matching line and chart
    pick_method(page, "Re-Basin")
    page.wait_for_function("() => document.querySelector('#rebasin_formula').innerText.includes('P(B)')")
    page.click("#rebasin_merge")
    if "rebasin" in jobs.RUNNERS:
        text = wait_for_result(page, ".rebasin-result", REBASIN_NAME, timeout=300)
        shot(page, "05-rebasin")
        assert "Matching:" in text and (models / REBASIN_NAME).is_file()
        assert REBASIN_NAME in options(page, "rebasin_model_b")
    else:  # until jobs runs it, the page must say so and write nothing
        wait_for_result(page, ".error", "not available yet")
        shot(page, "05-rebasin")
        assert not (models / REBASIN_NAME).exists()

    # a bigger pair (small scale, a few seconds to merge): appears after Refresh, and is interrupted half way
    for name, seed in (("big-a.safetensors", 1), ("big-b.safetensors", 2)):
        write_synthetic(models / name, scale="small", seed=seed)
    page.click("#rebasin_refresh")
    pick_method(page, "Amplified difference")
    page.wait_for_timeout(1000)
    assert "big-a.safetensors" in options(page, "rebasin_model_a")
    choose(page, "rebasin_model_a", "big-a.safetensors")
    choose(page, "rebasin_model_b", "big-b.safetensors")
    page.fill("#rebasin_output_name textarea, #rebasin_output_name input", "interrupted")
    page.click("#rebasin_merge")
    page.wait_for_function("() => { const t = document.querySelector('#rebasin_result [data-testid=status-tracker]');"
                           " return t && /[1-9][0-9]?(\\.[0-9])?%/.test(t.innerText); }", timeout=60_000)
    shot(page, "06-merge-progress")
    page.click("#rebasin_interrupt")
    wait_for_result(page, ".rebasin-cancelled", "no file was written")
    shot(page, "07-interrupted")
    assert not (models / "interrupted.safetensors").exists()
    assert [n for n in os.listdir(models) if n.startswith(".") or n.endswith(".tmp")] == []
