"""The web UI in a real browser: Playwright drives Debian's chromium (/usr/bin/chromium; never Playwright's own
download) through the whole flow on tiny models against the loopback Hub, with a screenshot of each step in the
test's folder (HUBMIX_UI_SHOTS=DIR keeps them there too)."""

from __future__ import annotations

import io
import os
import re
import shutil
import time
from pathlib import Path
from urllib.parse import urljoin

import pytest
import yaml

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


def _download_recipe(page, want: str) -> str:
    """The Download recipe button's file (its link follows the recipe box a moment later: retry briefly)."""
    for _ in range(10):
        with page.expect_download() as dl:
            page.click("#recipe-download")
        got = Path(dl.value.path()).read_text()
        if got == want:
            break
        time.sleep(0.5)
    return got


def test_the_whole_flow_in_a_browser(page, ui_server, tmp_path):  # noqa: F811
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    _, hub, root = ui_server
    # three models: their families show, the recipe follows the form
    _set_models(page, THREE)
    page.locator("#method input").fill("add_difference")
    page.locator("#method input").press("Enter")
    three = "document.querySelector('#families').innerText.split('sd1').length > 3"
    try:  # the check runs on the box's blur; a fresh page's first event was lost once in CI (load 5), waited 120 s
        page.wait_for_function(three, timeout=30_000)
    except PlaywrightTimeout:  # then the button that runs the same check, as a user would press it
        page.click("#check-models")
        page.wait_for_function(three)
    page.wait_for_function("document.querySelector('#recipe-yaml textarea').value.includes('add_difference')")
    text = _yaml(page)
    assert "org/b@v1" in text and "method: add_difference" in text
    assert _download_recipe(page, text) == text  # the download is the recipe of the form
    _shot(page, tmp_path, "1-models")
    # dry run: the table and the plot (the PNG the dry run wrote, shown at its own size)
    _tab(page, "Dry run")
    page.click("#dry-run")
    page.wait_for_function("document.querySelector('#dry-run-table').innerText.includes('unet')")
    assert page.locator("#dry-run-table").is_visible()
    page.wait_for_function("document.querySelector('#dry-run-plot img')?.naturalWidth > 0")
    img = page.locator("#dry-run-plot img")
    shown = page.request.get(urljoin(page.url, img.get_attribute("src"))).body()
    written = max((root / "work").glob("dry-*/similarity.png"), key=lambda p: p.stat().st_mtime)
    assert shown == written.read_bytes()
    from PIL import Image

    with Image.open(io.BytesIO(shown)) as im:
        size = im.size
    assert list(size) == img.evaluate("i => [i.naturalWidth, i.naturalHeight]") and size[0] > 100
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
    code, _, err = run_cli("merge", *THREE.split("\n"), "--method", "add_difference", "--out", tmp_path / "cli",
                           "-q", "--save-recipe", tmp_path / "saved.yaml")
    assert code == 0, err
    assert tree_bytes(out) == tree_bytes(tmp_path / "cli")
    saved = yaml.safe_load((tmp_path / "saved.yaml").read_text())
    assert saved.pop("output") == str(tmp_path / "cli") and yaml.safe_load(text) == saved  # the CLI's recipe
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


def test_an_uploaded_recipe_fills_the_form(page, tmp_path):
    from hubmix.ui.form import build_recipe

    blocks = ",".join(f"{i / 25:.4g}" for i in range(26))
    text = build_recipe("org/a\norg/b@v1\norg/d", "add_difference", {"alpha": 0.35}, components=["unet", "vae"],
                        dtype="fp16", block_alpha=blocks).to_yaml()
    (tmp_path / "upload.yaml").write_text(text)
    with page.expect_file_chooser() as chooser:
        page.click("#recipe-upload")
    chooser.value.set_files(str(tmp_path / "upload.yaml"))
    page.wait_for_function("document.querySelector('#models textarea').value.includes('org/d')")
    page.wait_for_function("document.querySelector('#recipe-yaml textarea').value.includes('0.35')")
    assert page.locator("#models textarea").input_value() == "org/a\norg/b@v1\norg/d"
    assert page.locator("#method input").input_value() == "add_difference"
    assert float(page.locator("#param-alpha input[type=number]").input_value()) == 0.35
    if not page.locator("#block-alpha").is_visible():  # inside the Block weights accordion
        page.get_by_text("Block weights (alpha per UNet block)").click()
    assert page.locator("#block-alpha textarea, #block-alpha input").first.input_value() == blocks
    assert page.locator("#dtype input").input_value() == "fp16"
    ticked = page.eval_on_selector_all("#components input[type=checkbox]",
                                       "bs => bs.filter(b => b.checked).map(b => b.closest('label').innerText.trim())")
    assert sorted(ticked) == ["unet", "vae"]
    assert _yaml(page) == text
    _shot(page, tmp_path, "9-uploaded")


def test_hub_search_suggests_models_as_an_id_is_typed(page, ui_server, tmp_path):  # noqa: F811
    _, hub, _ = ui_server
    page.locator("#method input").fill("weighted_sum")  # two models make a recipe
    page.locator("#method input").press("Enter")
    _set_models(page, "org/a\n")
    hub.clear_log()
    box = page.locator("#models textarea")
    box.click()
    box.press("Control+End")
    page.keyboard.type("org/", delay=50)  # "or", "org", "org/": three lines worth searching
    deadline = time.time() + 30
    while not any(r.query.get("search") == ["org/"] for r in hub.requests if r.route == "list_models"):
        assert time.time() < deadline, "no search for the typed line"
        time.sleep(0.2)
    suggestions = page.locator("#model-suggestions")
    suggestions.get_by_text("org/d", exact=True).wait_for()
    calls = [r.query["search"][0] for r in hub.requests if r.route == "list_models"]
    assert calls[-1] == "org/" and len(calls) < 3  # debounced: not one Hub call per keystroke
    assert suggestions.get_by_text("org/v", exact=True).count() == 0  # no diffusers tag on the Hub: not offered
    _shot(page, tmp_path, "10-suggestions")
    suggestions.get_by_text("org/d", exact=True).click()
    page.wait_for_function("document.querySelector('#models textarea').value === 'org/a\\norg/d\\n'")
    page.wait_for_function("document.querySelector('#families').innerText.includes('org/d')", timeout=30_000)
    rows = re.sub(r"\s*\n\s*", "\n", page.locator("#families").inner_text())  # gradio 6.1 puts tabs between cells
    from hubmix.formats.families import get_family

    assert f"org/d\n{get_family('sd1').name} (sd1)\nsingle-file" in rows, rows  # org/d is zoo.single("sd1", 5)
    page.wait_for_function("document.querySelector('#recipe-yaml textarea').value.includes('org/d')")
    _shot(page, tmp_path, "11-picked")
