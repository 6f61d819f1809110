"""The web UI in a real browser: Playwright drives Debian's chromium (/usr/bin/chromium; never Playwright's own
download) through the whole flow on tiny models against the loopback Hub, with a screenshot of each step in the
test's folder (HUBMIX_UI_SHOTS=DIR keeps them there too)."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from conftest import run_cli
from ui_helpers import tree_bytes, ui_server  # noqa: F401  (fixture)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
pytestmark = [pytest.mark.skipif(CHROMIUM is None, reason="no chromium: apt-get install chromium (.ci/run does)")]
pytest.importorskip("playwright", reason="no playwright: pip install -e '.[ui]'")

THREE = "org/a\norg/b@v1\norg/c/checkpoints/c.safetensors"


@pytest.fixture(scope="module")
def page(ui_server):  # noqa: F811
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        pg = browser.new_page(viewport={"width": 1400, "height": 1000})
        pg.set_default_timeout(120_000)
        pg.goto(ui_server[0])
        pg.wait_for_selector("#models textarea")
        yield pg
        browser.close()


def _shot(page, tmp_path: Path, name: str) -> None:
    page.screenshot(path=str(tmp_path / f"{name}.png"), full_page=True)
    keep = os.environ.get("HUBMIX_UI_SHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(keep) / f"{name}.png"), full_page=True)


def _yaml(page) -> str:
    return page.locator("#recipe-yaml textarea").input_value()


def _tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def _set_models(page, text: str) -> None:
    box = page.locator("#models textarea")
    box.fill(text)
    box.blur()


def test_the_whole_flow_in_a_browser(page, ui_server, tmp_path):  # noqa: F811
    _, hub, _ = ui_server
    # three models: their families show, the recipe follows the form
    _set_models(page, THREE)
    page.locator("#method input").fill("add_difference")
    page.locator("#method input").press("Enter")
    page.wait_for_function("document.querySelector('#families').innerText.split('sd1').length > 3")
    page.wait_for_function("document.querySelector('#recipe-yaml textarea').value.includes('add_difference')")
    text = _yaml(page)
    assert "org/b@v1" in text and "method: add_difference" in text
    _shot(page, tmp_path, "1-models")
    # dry run: the table
    _tab(page, "Dry run")
    page.click("#dry-run")
    page.wait_for_function("document.querySelector('#dry-run-table').innerText.includes('unet')")
    assert page.locator("#dry-run-table").is_visible()
    _shot(page, tmp_path, "2-dry-run")
    # samples: the gallery of a, b, c and the merge
    _tab(page, "Samples")
    page.locator("#steps input").fill("1")
    page.locator("#size textarea, #size input").first.fill("32x32")
    page.click("#samples")
    page.wait_for_function("document.querySelectorAll('#gallery img').length >= 4")
    _shot(page, tmp_path, "3-samples")
    # merge: the CLI's bytes for the same recipe
    _tab(page, "Merge")
    out = tmp_path / "ui-merge"
    page.locator("#out textarea, #out input").first.fill(str(out))
    page.click("#merge")
    page.wait_for_function("document.querySelector('#summary textarea').value.includes('wrote')")
    (tmp_path / "r.yaml").write_text(text)
    code, _, err = run_cli("merge", "--recipe", tmp_path / "r.yaml", "--out", tmp_path / "cli", "-q")
    assert code == 0, err
    assert tree_bytes(out) == tree_bytes(tmp_path / "cli")
    _shot(page, tmp_path, "4-merge")
    # push: the card previewed, then the commit on the loopback Hub
    _tab(page, "Push")
    page.locator("#repo-id textarea, #repo-id input").first.fill("user/browser-merge")
    page.click("#preview-card")
    page.wait_for_function("document.querySelector('#card').innerText.includes('add_difference')")
    page.click("#push")
    page.wait_for_function("document.querySelector('#commit-url textarea').value.includes('/commit/')")
    url = page.locator("#commit-url textarea").input_value()
    files = hub.files("user/browser-merge")
    assert "user/browser-merge" in url and "add_difference" in files["README.md"].decode()
    _shot(page, tmp_path, "5-push")


def test_a_bad_reference_shows_the_error_and_writes_nothing(page, tmp_path):
    _set_models(page, "org/a\norg/missing")
    page.locator("#method input").fill("weighted_sum")
    page.locator("#method input").press("Enter")
    page.wait_for_function("document.querySelector('#recipe-yaml textarea').value.includes('org/missing')")
    _tab(page, "Merge")
    out = tmp_path / "bad"
    page.locator("#out textarea, #out input").first.fill(str(out))
    page.click("#merge")
    page.get_by_text("org/missing").last.wait_for()
    page.wait_for_function("document.body.innerText.includes('repository not found')")
    assert not out.exists()
    _shot(page, tmp_path, "6-bad-reference")


def test_stop_during_a_merge_leaves_nothing(page, tmp_path, monkeypatch):
    from hubmix.ui import actions

    real = actions.merge

    def slow(text, out=None, *, progress=None, **kw):  # each written chunk takes a while: time to press Stop
        def paced(done, total, stage):
            time.sleep(0.7)
            if progress:
                progress(done, total, stage)
        return real(text, out, progress=paced, **kw)

    monkeypatch.setattr(actions, "merge", slow)
    _set_models(page, THREE)
    page.locator("#method input").fill("add_difference")
    page.locator("#method input").press("Enter")
    page.wait_for_function("document.querySelector('#recipe-yaml textarea').value.includes('org/c')")
    _tab(page, "Merge")
    out = tmp_path / "stopped"
    page.locator("#out textarea, #out input").first.fill(str(out))
    page.click("#merge")
    time.sleep(1.5)
    page.click("#stop")
    page.wait_for_function("document.body.innerText.includes('stopped')")
    _shot(page, tmp_path, "7-stopped")
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".stopped")]


def test_block_sliders_follow_the_family_and_presets(page, tmp_path):
    from hubmix.methods.presets import presets

    _set_models(page, THREE)
    page.click("#check-models")
    page.get_by_text("Block weights (alpha per UNet block)").click()
    page.wait_for_selector("#block-25", state="visible")  # sd1: 26 blocks, BASE .. OUT11
    assert page.locator("#block-13").get_by_text("M00").count() >= 1
    page.locator("#preset input").fill("GRAD_V")
    page.locator("#preset input").press("Enter")
    page.wait_for_function("document.querySelector('#block-alpha textarea, #block-alpha input').value === 'GRAD_V'")
    page.wait_for_function("document.querySelector('#recipe-yaml textarea').value.includes('block_alpha: GRAD_V')")
    want = presets()["GRAD_V"][13]
    got = float(page.locator("#block-13 input[type=number]").input_value())
    assert got == pytest.approx(want)
    _shot(page, tmp_path, "8-blocks")
