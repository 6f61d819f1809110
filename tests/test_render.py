"""Rendering: `hubmix samples`, `merge --samples` (and its card), `hubmix sweep` and the dry-run plot, on tiny SD1.x
and SDXL models whose images are noise. The oracle is a fresh `DiffusionPipeline.from_pretrained` called with the
documented conventions; sweeps are checked against `hubmix merge` followed by `hubmix samples`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import assert_one_line_error

FAST = ["--steps", "2", "--size", "16x16"]


def _pixels(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB")).astype(int)


def _oracle(folder: Path, prompt: str, seed: int, guidance: float, size: int = 16, steps: int = 2) -> np.ndarray:
    """What plain diffusers renders under the documented conventions."""
    import torch
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    image = pipe(prompt=prompt, num_inference_steps=steps, guidance_scale=guidance, width=size, height=size,
                 generator=torch.Generator("cpu").manual_seed(seed)).images[0]
    return np.asarray(image).astype(int)


def _index(folder: Path, name: str = "samples.json") -> dict:
    return json.loads((folder / name).read_text())


def test_samples_twice_identical_and_equal_to_diffusers(zoo, cli, tmp_path):
    a, b = zoo.diffusers("sd1", 1), zoo.single("sd1", 2)  # the single file takes tokenizer/scheduler from a
    args = ["samples", a, b, "--prompt", "a cat", "--seed", "7", *FAST, "-q"]
    code, out, err = cli(*args, "--out", tmp_path / "s1")
    assert code == 0, err
    assert out.strip() == str(tmp_path / "s1" / "grid.png")
    code, _, err = cli(*args, "--out", tmp_path / "s2")
    assert code == 0, err
    files = sorted(p.name for p in (tmp_path / "s1").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "s2").iterdir())
    for name in files:  # the same command twice: the same bytes
        assert (tmp_path / "s1" / name).read_bytes() == (tmp_path / "s2" / name).read_bytes(), name
    index = _index(tmp_path / "s1")
    assert [(i["model"], i["prompt"], i["seed"], i["steps"], i["width"], i["height"], i["guidance"], i["scheduler"])
            for i in index["images"]] == [(a.name, "a cat", 7, 2, 16, 16, 7.5, "PNDMScheduler"),
                                          (b.name, "a cat", 7, 2, 16, 16, 7.5, "PNDMScheduler")]
    first = _pixels(tmp_path / "s1" / index["images"][0]["file"])
    assert (first == _oracle(a, "a cat", 7, 7.5)).all()  # pixel for pixel what diffusers renders
    second = _pixels(tmp_path / "s1" / index["images"][1]["file"])
    assert first.std() > 0 and not (first == second).all()  # b swapped in: other weights, other image
    grid = _pixels(tmp_path / "s1" / "grid.png")
    assert grid.shape[0] > 2 * 192 and grid.shape[1] >= 192  # two rows, 16 px cells enlarged to be readable


def test_sdxl_samples_equal_to_diffusers(zoo, cli, tmp_path):
    a = zoo.diffusers("sdxl", 1)
    code, _, err = cli("samples", a, "--prompt", "a dog", "--seed", "3", "--steps", "2", "-q", "--out", tmp_path / "x")
    assert code == 0, err
    (image,) = _index(tmp_path / "x")["images"]
    assert (image["width"], image["height"], image["guidance"]) == (32, 32, 5.0)  # the model's own size, SDXL's 5.0
    assert (_pixels(tmp_path / "x" / image["file"]) == _oracle(a, "a dog", 3, 5.0, size=32)).all()


def test_merge_samples_plot_and_card(zoo, cli, tmp_path):
    from huggingface_hub import ModelCard

    out = tmp_path / "merged"
    a, b = zoo.diffusers("sd1", 1), zoo.diffusers("sd1", 2)
    code, _, err = cli("merge", a, b, "-m", "lossless", "--beta", "1.05", "--out", out, "--samples", "--prompt",
                       "a cat", "--seed", "1", *FAST, "-q")
    assert code == 0, err
    index = _index(out / "samples")
    assert [i["model"] for i in index["images"]] == [f"a: {a.name}", f"b: {b.name}", "merged"]
    assert str(tmp_path) not in json.dumps(index) and str(zoo.root) not in json.dumps(index)
    result = [i for i in index["images"] if i.get("result")]
    assert len(result) == 1
    assert (_pixels(out / "samples" / result[0]["file"]) == _oracle(out, "a cat", 1, 7.5)).all()
    assert _pixels(out / "samples" / "similarity.png").shape[2] == 3
    code, stdout, err = cli("card", out)
    assert code == 0, err
    card = ModelCard.load(out / "README.md")
    assert card.data.widget == [{"text": "a cat", "output": {"url": f"samples/{result[0]['file']}"}}]
    for w in card.data.widget:
        assert (out / w["output"]["url"]).is_file()
    assert "![samples](samples/grid.png)" in card.text and "![similarity](samples/similarity.png)" in card.text
    # the samples are not part of the merge: the result still reproduces
    code, stdout, err = cli("reproduce", out, "--model", f"a={a}", "--model", f"b={b}", "-q")
    assert code == 0 and "identical" in stdout, stdout + err


def test_dry_plot_is_a_png(zoo, cli, tmp_path):
    from PIL import Image

    plot = tmp_path / "plot.png"
    code, _, err = cli("merge", zoo.diffusers("sd1", 1), zoo.diffusers("sd1", 2), zoo.diffusers("sd1", 3), "-m",
                       "lossless", "--dry", "--plot", plot, "-q")
    assert code == 0, err
    with Image.open(plot) as im:
        im.verify()
    with Image.open(plot) as im:
        assert im.format == "PNG" and im.width > 400 and im.height > 20 * 18  # a row per UNet block


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def test_sweep_equals_merge_then_samples(zoo, cli, tmp_path):
    a, b = zoo.diffusers("sd1", 1, dtype="fp16"), zoo.diffusers("sd1", 2)  # fp16 merge output, fp32 pipeline
    before = _files(tmp_path)
    code, _, err = cli("sweep", a, b, "-m", "lossless", "--vary", "beta=0.9,1.1", "--prompt", "a cat", "--seed", "2",
                       *FAST, "-q", "--out", tmp_path / "sweep")
    assert code == 0, err
    written = _files(tmp_path) - before
    assert all(f.startswith("sweep/") and f.endswith((".png", ".json")) for f in written), written  # no model
    index = _index(tmp_path / "sweep", "sweep.json")
    assert [p["params"] for p in index["points"]] == [{"beta": 0.9}, {"beta": 1.1}]
    shares = [p["shares"]["unet"]["all"] for p in index["points"]]
    assert all(abs(sum(s.values()) - 1) < 1e-9 for s in shares) and shares[0] != shares[1]
    code, _, err = cli("merge", a, b, "-m", "lossless", "--beta", "1.1", "--out", tmp_path / "m", "-q")
    assert code == 0, err
    code, _, err = cli("samples", tmp_path / "m", "--prompt", "a cat", "--seed", "2", *FAST, "-q", "--out",
                       tmp_path / "ms")
    assert code == 0, err
    (want,) = _index(tmp_path / "ms")["images"]
    got = [_pixels(tmp_path / "sweep" / f) for f in index["points"][1]["images"]]
    assert len(got) == 1 and (got[0] == _pixels(tmp_path / "ms" / want["file"])).all()
    assert not (got[0] == _pixels(tmp_path / "sweep" / index["points"][0]["images"][0])).all()


def test_sdxl_sweep_per_block_equals_merge_recipe(zoo, cli, tmp_path):
    a, b = zoo.diffusers("sdxl", 1), zoo.diffusers("sdxl", 2)
    code, _, err = cli("sweep", a, b, "-m", "weighted_sum", "--vary", "OUT00.alpha=0.9", "--components", "unet",
                       "--prompt", "a dog", "--seed", "0", "--steps", "2", "-q", "--out", tmp_path / "sweep")
    assert code == 0, err
    point = _index(tmp_path / "sweep", "sweep.json")["points"][0]
    assert point["params"] == {"OUT00.alpha": 0.9} and point["shares"] == {}  # weighted sums select nothing
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"models": [str(a), str(b)], "method": "weighted_sum", "output": str(
        tmp_path / "m"), "components": {"unet": {"blocks": {"OUT00": {"alpha": 0.9}}}, "text_encoder": {"from": "a"},
                                        "text_encoder_2": {"from": "a"}, "vae": {"from": "a"}}}))
    code, _, err = cli("merge", "--recipe", recipe, "-q")
    assert code == 0, err
    assert (_pixels(tmp_path / "sweep" / point["images"][0]) == _oracle(tmp_path / "m", "a dog", 0, 5.0, size=32)).all()


def test_errors_come_first_in_one_line(zoo, cli, tmp_path):
    a = zoo.diffusers("sd1", 1)
    out = tmp_path / "out"
    cases = [
        (("samples", a, "--seed", "1", "--out", out), ["--prompt"]),
        (("samples", a, "--prompt", "x", "--out", out), ["--seed"]),
        (("samples", a, "--prompt", "x", "--seed", "1", "--size", "30x32", "--out", out), ["30x32", "multiples of 8"]),
        (("samples", zoo.diffusers("sd1", 1, inpainting=True), "--prompt", "x", "--seed", "1", "--out", out),
         ["inpainting"]),
        (("samples", zoo.single("sd1", 2), "--prompt", "x", "--seed", "1", "--out", out), ["--config-from"]),
        (("sweep", a, a, "-m", "weighted_sum", "--vary", "gamma=1,2", "--prompt", "x", "--seed", "1", "--out", out),
         ["gamma", "weighted_sum"]),
        (("sweep", a, a, "-m", "weighted_sum", "--vary", "XX99.alpha=1", "--prompt", "x", "--seed", "1", "--out",
          out), ["XX99"]),
        (("sweep", a, a, "-m", "weighted_sum", "--vary", "alpha", "--prompt", "x", "--seed", "1", "--out", out),
         ["--vary alpha"]),
        (("merge", a, a, "-m", "weighted_sum", "--out", out, "--samples", "--prompt", " "), ["--prompt"]),
    ]
    for args, needles in cases:
        code, _, err = cli(*args)
        assert_one_line_error(code, err, *needles)
        assert not out.exists(), args
    assert not [p for p in tmp_path.iterdir()]


@pytest.mark.parametrize("layout", ["single-file"])
def test_single_file_result_keeps_samples_beside(zoo, cli, tmp_path, layout):
    from hubmix.flow.result import result_files

    out = tmp_path / "m.safetensors"
    code, _, err = cli("merge", zoo.diffusers("sd1", 1), zoo.diffusers("sd1", 2), "-m", "weighted_sum", "--out", out,
                       "--samples", "--prompt", "a", "--seed", "0", *FAST, "-q")
    assert code == 0, err
    files = result_files(out)
    assert {"m.safetensors", "m.recipe.yaml", "samples/samples.json", "samples/grid.png"} <= set(files)
    widget_files = [f"samples/{i['file']}" for i in _index(tmp_path / "m.samples")["images"] if i.get("result")]
    assert widget_files and all(f in files for f in widget_files)


def test_push_uploads_samples_in_the_one_commit(zoo, cli, tmp_path, monkeypatch):
    """Against the loopback Hub: the card's widget files exist in the pushed repo, folder and single-file results."""
    from huggingface_hub import ModelCard
    from huggingface_hub.utils import disable_progress_bars
    from hubserver import configure_hf_client, guard_loopback, start_hub_server

    server = start_hub_server(tokens={"hf_test_token_user": "user"})
    try:
        off_loopback = guard_loopback(monkeypatch)
        configure_hf_client(monkeypatch, server.url, tmp_path / "hf_home")
        monkeypatch.setenv("HF_TOKEN", "hf_test_token_user")
        disable_progress_bars()
        a, b = zoo.diffusers("sd1", 1), zoo.diffusers("sd1", 2)
        for out, repo in ((tmp_path / "m", "user/m"), (tmp_path / "s.safetensors", "user/s")):
            code, stdout, err = cli("merge", a, b, "-m", "weighted_sum", "--out", out, "--samples", "--prompt",
                                    "a cat", "--seed", "0", *FAST, "--push", repo, "--license", "mit", "-q")
            assert code == 0, err
            files = server.files(repo)
            card = ModelCard.load(repo)
            urls = [w["output"]["url"] for w in card.data.widget]
            assert len(urls) == 1 and all(u in files for u in urls), (urls, sorted(files))
            assert {"samples/grid.png", "samples/similarity.png", "samples/samples.json"} <= set(files)
            local = out / "samples" if out.is_dir() else tmp_path / "s.samples"
            assert files["samples/grid.png"] == (local / "grid.png").read_bytes()
            assert len(server.history(repo)) == 2  # the repo's creation, then the one commit
        assert off_loopback == []
    finally:
        server.stop()


def test_vary_names_map_to_recipe_fields():
    from hubmix.errors import RecipeError
    from hubmix.recipe import Recipe
    from hubmix.recipe.vary import Axis, apply as apply_point, parse_vary

    assert parse_vary(["beta=0.9,1.1", "OUT00.alpha=2"]) == [Axis("beta", (0.9, 1.1)), Axis("OUT00.alpha", (2.0,))]
    base = Recipe(models=["a", "b", "c"], method="lossless")
    r = apply_point(base, {"alpha": 0.5, "out00.beta": 1.2, "text_encoder.alpha": 0.7, "unet.IN04.alpha": 0.9})
    assert r.params == {"alpha": 0.5}
    assert r.components["unet"].blocks == {"OUT00": {"beta": 1.2}, "IN04": {"alpha": 0.9}}
    assert r.components["text_encoder"].params == {"alpha": 0.7}
    assert r.plan_for("unet")["blocks"]["OUT00"] == {"alpha": 0.5, "beta": 1.2}
    assert base.params == {} and not base.components  # the base recipe is left as it was
    for bad in ({"gamma": 1.0}, {"vae.gamma": 1.0}, {"a.b.c.alpha": 1.0}):
        with pytest.raises(RecipeError):
            apply_point(base, bad)
