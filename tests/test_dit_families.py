"""Z-Image, Lumina 2 and Chroma: transformer-only single files (bare and ComfyUI-prefixed) checked tensor by tensor
with diffusers' own from_single_file, exact round trips, configs inferred from shapes, mixed-layout merges against
the all-diffusers merge and numpy, detection by keys, block labels from the files."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import component_tensors, load_tensors
from dit_loaders import patch_loaders
from safetensors.torch import save_file
from test_merge import np_lossless, np_weighted_sum

import hubmix
from hubmix import Recipe
from hubmix.flow.convert import convert
from hubmix.formats.model import open_model

FAMILIES = {"z_image": "ZImageTransformer2DModel", "lumina2": "Lumina2Transformer2DModel",
            "chroma": "ChromaTransformer2DModel"}
COMFY = "model.diffusion_model."


@pytest.fixture
def loaders(monkeypatch):
    patch_loaders(monkeypatch)


def prefixed(single: Path, out: Path) -> Path:
    """ComfyUI's diffusion_models file: the same keys under model.diffusion_model., no metadata."""
    save_file({COMFY + k: v for k, v in load_tensors(single).items()}, str(out))
    return out


def same(want: dict, got: dict, where: str) -> None:
    assert set(want) == set(got), (where, sorted(set(want) ^ set(got))[:5])
    bad = [k for k in want if not torch.equal(want[k], got[k])]
    assert not bad, (where, bad[:5])


def hubmix_tensors(path: Path) -> dict:
    return {k: r.load() for k, r in open_model(path).components["transformer"].tensors.items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_single_files_load_in_diffusers_equal_to_source(zoo, tmp_path, loaders, family):
    import diffusers

    src = zoo.diffusers(family, 1)
    want = component_tensors(src, "transformer")
    single = zoo.single(family, 1)
    keys = load_tensors(single)
    # the original names, the transformer alone, bare
    assert not any(k.startswith((COMFY, "vae.", "text_encoders.")) for k in keys)
    assert not any(".to_q." in k or "all_x_embedder" in k or "time_caption_embed" in k for k in keys)
    comfy = prefixed(single, tmp_path / "comfy.safetensors")
    cls = getattr(diffusers, FAMILIES[family])
    for path in (single, comfy):
        assert open_model(path).family.id == family
        same(want, hubmix_tensors(path), f"hubmix reads {path.name}")
        if family == "lumina2" and path == comfy:
            with pytest.raises(KeyError):  # diffusers 0.42 cannot read ComfyUI-prefixed Lumina 2 files; hubmix can
                cls.from_single_file(str(path), config=str(zoo.configs_only(src)), subfolder="transformer",
                                     local_files_only=True)
            continue
        model = cls.from_single_file(str(path), config=str(zoo.configs_only(src)), subfolder="transformer",
                                     local_files_only=True)
        same(want, model.state_dict(), f"diffusers reads {path.name}")
    # a merge whose model a is ComfyUI-prefixed writes ComfyUI-prefixed keys (model a's layout)
    out = tmp_path / "from-comfy.safetensors"
    hubmix.merge(Recipe(models=[str(comfy), str(single)], method="weighted_sum"), out=out, quiet=True)
    got = load_tensors(out)
    assert set(got) == {COMFY + k for k in keys}
    if family != "lumina2":
        model = cls.from_single_file(str(out), config=str(zoo.configs_only(src)), subfolder="transformer",
                                     local_files_only=True)
        same(want, model.state_dict(), "prefixed output")


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_and_inferred_config(zoo, tmp_path, family):
    src = zoo.diffusers(family, 1)
    plain = tmp_path / "plain.safetensors"  # no hubmix metadata: the config comes from the shapes
    save_file(load_tensors(zoo.single(family, 1)), str(plain))
    m = open_model(plain)
    assert m.main_only and m.components["transformer"].config_source == "inferred"
    cfg = json.loads((src / "transformer" / "config.json").read_text())
    inferred = m.components["transformer"].config
    from hubmix.formats.configs import DEFAULT_DERIVED

    for k, v in inferred.items():
        if k in cfg and k not in DEFAULT_DERIVED:  # shapes cannot tell these: family defaults, borrowed below
            assert (list(v) if isinstance(v, tuple) else v) == cfg[k], k
    back = tmp_path / "back"
    convert(plain, back, to="diffusers", config_from=str(src), quiet=True)
    for comp in ("transformer", "text_encoder", "vae"):
        same(component_tensors(src, comp), component_tensors(back, comp), comp)
    built = json.loads((back / "transformer" / "config.json").read_text())
    assert {k: built[k] for k in cfg if not k.startswith("_")} == {k: cfg[k] for k in cfg if not k.startswith("_")}
    assert json.loads((back / "model_index.json").read_text())["_class_name"] == \
        {"z_image": "ZImagePipeline", "lumina2": "Lumina2Pipeline", "chroma": "ChromaPipeline"}[family]
    again = tmp_path / "again.safetensors"
    convert(back, again, to="single-file", quiet=True)
    same(load_tensors(zoo.single(family, 1)), load_tensors(again), "single -> diffusers -> single")


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_layout_lossless_equals_all_diffusers_and_numpy(zoo, tmp_path, family):
    params = {"alpha": 0.9, "beta": 1.1}
    folders = [zoo.diffusers(family, s) for s in (1, 2, 3)]
    ref = tmp_path / "ref"
    hubmix.merge(Recipe(models=[str(p) for p in folders], method="lossless", params=params), out=ref, quiet=True)
    sds = [component_tensors(p, "transformer") for p in folders]
    want = component_tensors(ref, "transformer")
    for k, t in want.items():
        a, b, c = (sd[k].numpy() for sd in sds)
        assert torch.equal(t, torch.from_numpy(np.asarray(np_lossless(a, b, c, 0.9, 1.1), dtype=np.float32))), k
    comfy = prefixed(zoo.single(family, 3), tmp_path / "c3.safetensors")
    mixed = tmp_path / "mixed"
    hubmix.merge(Recipe(models=[str(zoo.single(family, 1)), str(folders[1]), str(comfy)], method="lossless",
                        params=params, config_from=str(folders[0])), out=mixed, quiet=True)
    same(want, component_tensors(mixed, "transformer"), "mixed -> diffusers")
    for comp in ("text_encoder", "vae"):  # from the one input that has them
        same(component_tensors(folders[1], comp), component_tensors(mixed, comp), comp)
    single = tmp_path / "mixed.safetensors"
    r = hubmix.merge(Recipe(models=[str(folders[0]), str(zoo.single(family, 2)), str(comfy)], method="lossless",
                            params=params), out=single, quiet=True)
    assert any("hold the transformer alone" in n for n in r.summary.events["note"])
    back = tmp_path / "back"
    convert(single, back, to="diffusers", config_from=str(folders[0]), quiet=True)
    same(want, component_tensors(back, "transformer"), "mixed -> single file")


LABELS = {"z_image": ["IN", "NR0", "NR1", "CR0", "CR1", "L00", "L01", "L02", "OUT"],
          "lumina2": ["IN", "NR0", "NR1", "CR0", "CR1", "L00", "L01", "L02", "OUT"],
          "chroma": ["IN", "D00", "D01", "S00", "S01", "S02", "OUT"]}


def label_of(family: str, key: str) -> str:
    """The block of a diffusers key, from diffusers' module names (independent of the layout data)."""
    if family == "chroma":
        if m := re.match(r"transformer_blocks\.(\d+)\.", key):
            return f"D{int(m[1]):02d}"
        if m := re.match(r"single_transformer_blocks\.(\d+)\.", key):
            return f"S{int(m[1]):02d}"
        return "OUT" if key.startswith("proj_out.") else "IN"
    if m := re.match(r"(noise|context)_refiner\.(\d+)\.", key):
        return f"{m[1][0].upper()}R{m[2]}"
    if m := re.match(r"layers\.(\d+)\.", key):
        return f"L{int(m[1]):02d}"
    return "OUT" if key.startswith(("all_final_layer.", "norm_out.")) else "IN"


@pytest.mark.parametrize("family", FAMILIES)
def test_labels_dry_run_and_label_values(zoo, tmp_path, cli, family):
    a, b = zoo.diffusers(family, 1), zoo.single(family, 2)
    code, outp, err = cli("merge", a, b, "-m", "weighted_sum", "--dry")
    assert code == 0, err
    rows = re.findall(r"^transformer\s+all|^\s+(\S+)\s+b\s", outp, re.M)
    labels = [x for x in rows if x in LABELS[family]]
    assert labels == LABELS[family], outp
    spec = "L00-L01=1,NR*=0.25,OUT=0.75,*=0" if family != "chroma" else "D01=1,S*=0.25,OUT=0.75,*=0"
    values = {"L00": 1.0, "L01": 1.0, "NR0": 0.25, "NR1": 0.25, "OUT": 0.75, "D01": 1.0, "S00": 0.25, "S01": 0.25,
              "S02": 0.25}
    out = tmp_path / "out"
    hubmix.merge(Recipe(models=[str(a), str(b)], method="weighted_sum", params={"alpha": 0.5},
                        block_lists={"alpha": spec}), out=out, quiet=True)
    got, ta, tb = (component_tensors(p, "transformer") for p in (out, a, a))
    tb = {k: r.load() for k, r in open_model(b).components["transformer"].tensors.items()}
    for k, t in got.items():
        alpha = values.get(label_of(family, k), 0.0)
        want = np_weighted_sum(ta[k].numpy(), tb[k].numpy(), alpha)
        assert torch.equal(t, torch.from_numpy(np.asarray(want, dtype=np.float32))), (k, alpha)
    te = component_tensors(out, "text_encoder")  # its label (QWEN3, GEMMA2, T5) falls under `*`
    same(component_tensors(a, "text_encoder"), te, "text encoder at alpha 0")


def test_families_told_apart_by_keys(zoo):
    from hubmix.flow.inspection import inspect_model, render

    for family in FAMILIES:
        for path in (zoo.diffusers(family, 1), zoo.single(family, 1)):
            assert open_model(path).family.id == family, path
    assert open_model(zoo.single("flux", 1)).family.id == "flux"
    text = render(inspect_model(zoo.single("chroma", 1)))
    assert "Chroma (chroma)" in text and "the transformer alone" in text


@pytest.mark.parametrize("family", FAMILIES)
def test_samples_equal_a_fresh_pipeline(zoo, cli, tmp_path, family):
    """`hubmix samples` with the family's pipeline (ZImagePipeline, Lumina2Pipeline, ChromaPipeline): pixel for
    pixel what a fresh DiffusionPipeline.from_pretrained renders; model b swapped into the same pipeline gives
    another image."""
    from diffusers import DiffusionPipeline
    from PIL import Image

    a, b = zoo.diffusers(family, 1), zoo.diffusers(family, 2)
    code, _, err = cli("samples", a, b, "--prompt", "a cat", "--seed", "7", "--steps", "2", "--size", "32x32", "-q",
                       "--out", tmp_path / "s")
    assert code == 0, err
    images = json.loads((tmp_path / "s" / "samples.json").read_text())["images"]
    got = [np.asarray(Image.open(tmp_path / "s" / im["file"]).convert("RGB")).astype(int) for im in images]
    pipe = DiffusionPipeline.from_pretrained(str(a))
    pipe.set_progress_bar_config(disable=True)
    want = pipe(prompt="a cat", num_inference_steps=2, guidance_scale=images[0]["guidance"], width=32, height=32,
                generator=torch.Generator("cpu").manual_seed(7)).images[0]
    assert (got[0] == np.asarray(want).astype(int)).all()
    assert got[0].std() > 0 and not (got[0] == got[1]).all()
