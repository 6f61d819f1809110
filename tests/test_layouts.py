"""Layouts: single files checked tensor by tensor with diffusers' own loader, exact round trips, mixed-layout
merges, .ckpt inputs, EMA, and the rules for keys only one layout has."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from conftest import component_tensors, load_tensors
from safetensors.torch import save_file

import hubmix
from hubmix import Recipe
from hubmix.flow.convert import convert

PIPELINES = {"sd1": "StableDiffusionPipeline", "sd2": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}
FAMILIES = [("sd1", False), ("sd2", False), ("sdxl", False), ("sd1", True)]
IDS = ["sd1", "sd2", "sdxl", "sd1-inpaint"]


def canon(key: str) -> str:
    return key if key.startswith(("text_model.", "text_projection")) else "text_model." + key


def diffusers_tensors(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    out = {}
    for comp in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if (folder / comp).is_dir():
            sd = component_tensors(folder, comp)
            out[comp] = {canon(k) if comp.startswith("text") else k: v for k, v in sd.items()}
    return out


def assert_same(a: dict[str, dict[str, torch.Tensor]], b: dict[str, dict[str, torch.Tensor]]):
    assert set(a) == set(b)
    for comp in a:
        assert set(a[comp]) == set(b[comp]), comp
        bad = [k for k in a[comp] if not torch.equal(a[comp][k], b[comp][k])]
        assert not bad, f"{comp}: {bad[:5]}"


def load_with_diffusers(single: Path, config: Path, family: str, inpainting: bool):
    import diffusers

    cls = PIPELINES[family].replace("Pipeline", "InpaintPipeline") if inpainting else PIPELINES[family]
    return getattr(diffusers, cls).from_single_file(str(single), config=str(config), local_files_only=True)


@pytest.mark.parametrize("family, inpainting", FAMILIES, ids=IDS)
def test_single_file_equals_source_per_diffusers_loader(zoo, family, inpainting):
    """The independent oracle: diffusers' original->diffusers loader reads hubmix's single file back."""
    src = zoo.diffusers(family, 1, inpainting=inpainting)
    single = zoo.single(family, 1, inpainting=inpainting)
    pipe = load_with_diffusers(single, zoo.configs_only(src), family, inpainting)
    want = diffusers_tensors(src)
    for comp, sd in want.items():
        loaded = getattr(pipe, comp).state_dict()
        loaded = {canon(k) if comp.startswith("text") else k: v for k, v in loaded.items()}
        missing = set(sd) - set(loaded)
        assert not missing, f"{comp}: {sorted(missing)[:5]}"
        bad = [k for k in sd if not torch.equal(loaded[k], sd[k])]
        assert not bad, f"{comp}: {len(bad)} tensors differ after diffusers' loader, e.g. {bad[:5]}"


@pytest.mark.parametrize("family, inpainting", FAMILIES, ids=IDS)
def test_round_trip_diffusers_single_diffusers_is_exact(zoo, tmp_path, family, inpainting):
    src = zoo.diffusers(family, 1, inpainting=inpainting)
    back = tmp_path / "back"
    # no --config-from: configs travel inside hubmix's single files; only the tokenizer must come from a folder
    with pytest.raises(hubmix.InputError, match="tokenizer.*--config-from"):
        convert(zoo.single(family, 1, inpainting=inpainting), back, to="diffusers", quiet=True)
    assert not back.exists()
    convert(zoo.single(family, 1, inpainting=inpainting), back, to="diffusers", config_from=str(src), quiet=True)
    assert_same(diffusers_tensors(src), diffusers_tensors(back))
    for comp in ("unet", "vae"):
        assert json.loads((back / comp / "config.json").read_text()) == json.loads((src / comp / "config.json")
                                                                                      .read_text())
    idx = json.loads((back / "model_index.json").read_text())
    assert idx["_class_name"] == json.loads((src / "model_index.json").read_text())["_class_name"]


def test_single_file_metadata_and_inspect(zoo, cli):
    single = zoo.single("sdxl", 1)
    from safetensors import safe_open

    meta = safe_open(str(single), "pt").metadata()
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    assert meta["modelspec.title"] == single.stem
    assert json.loads(meta["hubmix.recipe"])["family"] == "sdxl"
    code, out, _ = cli("inspect", single)
    assert code == 0 and "Stable Diffusion XL" in out and "single-file" in out and "text_encoder_2" in out
    code, out, _ = cli("inspect", single, "--json")
    info = json.loads(out)
    assert info["family"] == "sdxl" and info["components"]["unet"]["tensors"] > 500
    assert info["recipe"]["method"] == "copy"


def _strip_hubmix_metadata(src: Path, dst: Path) -> Path:
    sd = load_tensors(src)
    save_file(sd, str(dst))  # a foreign single file: no embedded configs
    return dst


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_configs_inferred_from_shapes_of_a_foreign_file(zoo, tmp_path, family):
    src = zoo.diffusers(family, 1)
    foreign = _strip_hubmix_metadata(zoo.single(family, 1), tmp_path / "foreign.safetensors")
    from hubmix.flow.inspection import inspect_model

    info = inspect_model(foreign)
    assert all(c["config_source"] == "inferred" for c in info["components"].values())
    assert any("heads" in n for n in info["components"]["unet"]["config_notes"])
    back = tmp_path / "back"
    result = convert(foreign, back, to="diffusers", config_from=str(zoo.configs_only(src)), quiet=True)
    assert_same(diffusers_tensors(src), diffusers_tensors(back))
    want = json.loads((src / "unet" / "config.json").read_text())
    got = json.loads((back / "unet" / "config.json").read_text())
    for key in ("block_out_channels", "layers_per_block", "down_block_types", "up_block_types", "cross_attention_dim",
                "use_linear_projection", "in_channels", "attention_head_dim"):
        assert got[key] == want[key], key
    assert any("structure from" in x for x in result.summary.events["config"])


def test_mixed_layout_merge_equals_all_diffusers_merge(zoo, tmp_path):
    a, b, c = (zoo.diffusers("sd1", s) for s in (1, 2, 3))
    b_single = zoo.single("sd1", 2)
    c_ckpt = tmp_path / "c.ckpt"
    torch.save({"state_dict": load_tensors(zoo.single("sd1", 3)), "global_step": 1000}, c_ckpt)
    hubmix.merge(Recipe(models=[str(a), str(b), str(c)], method="lossless"), out=tmp_path / "ref", quiet=True)
    r = hubmix.merge(Recipe(models=[str(a), str(b_single), str(c_ckpt)], method="lossless"), out=tmp_path / "mixed",
                     quiet=True)
    assert_same(diffusers_tensors(tmp_path / "ref"), diffusers_tensors(tmp_path / "mixed"))
    assert [m["layout"] for m in r.canonical["models"]] == ["diffusers", "single-file", "single-file"]
    # the same merge written as one file and as both
    hubmix.merge(Recipe(models=[str(a), str(b_single), str(c_ckpt)], method="lossless", layout="both"),
                 out=tmp_path / "both", quiet=True)
    assert (tmp_path / "both" / "both.safetensors").is_file()
    assert_same(diffusers_tensors(tmp_path / "ref"), diffusers_tensors(tmp_path / "both"))
    back = tmp_path / "back"
    convert(tmp_path / "both" / "both.safetensors", back, to="diffusers", config_from=str(a), quiet=True)
    assert_same(diffusers_tensors(tmp_path / "ref"), diffusers_tensors(back))


def test_unsafe_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    bad = tmp_path / "evil.ckpt"
    with open(bad, "wb") as f:
        pickle.dump({"state_dict": {"x": Evil()}}, f)
    with pytest.raises(hubmix.InputError, match="refused to unpickle.*never executes"):
        hubmix.merge(Recipe(models=[str(bad), str(bad)], method="weighted_sum"), out=tmp_path / "o", quiet=True)
    assert not marker.exists()


def test_ema_weights_are_used_only_with_ema(zoo, tmp_path):
    single = load_tensors(zoo.single("sd1", 1))
    ema = {}
    for k, v in single.items():
        if k.startswith("model.diffusion_model."):
            ema["model_ema." + k[len("model."):].replace(".", "")] = v + 1.0
    path = tmp_path / "with-ema.safetensors"
    save_file({**single, **ema, "model_ema.decay": torch.tensor(0.9999), "alphas_cumprod": torch.ones(1000)},
              str(path))
    plain, with_ema = tmp_path / "plain", tmp_path / "ema"
    r = convert(path, plain, to="diffusers", config_from=str(zoo.diffusers("sd1", 1)), quiet=True)
    convert(path, with_ema, to="diffusers", config_from=str(zoo.diffusers("sd1", 1)), ema=True, quiet=True)
    p, e = component_tensors(plain, "unet"), component_tensors(with_ema, "unet")
    assert all(torch.equal(e[k], p[k] + 1.0) for k in p)
    assert any("model_ema" in x for x in r.summary.events["unassigned"])  # listed, not silently dropped


def test_keys_only_one_layout_has(zoo, tmp_path):
    """position_ids (CLIP), logit_scale and SD2's unused last OpenCLIP layer are listed, never merged."""
    sd2 = load_tensors(zoo.single("sd2", 1))
    p = "cond_stage_model.model."
    extra = {f"{p}logit_scale": torch.tensor(4.6),
             f"{p}text_projection": torch.randn(48, 48)}
    last = max(int(k.split(".")[4]) for k in sd2 if k.startswith(f"{p}transformer.resblocks."))
    for k, v in list(sd2.items()):
        if k.startswith(f"{p}transformer.resblocks.{last}."):
            extra[k.replace(f"resblocks.{last}.", f"resblocks.{last + 1}.")] = v.clone()
    path = tmp_path / "sd2-full.safetensors"
    from safetensors import safe_open

    save_file({**sd2, **extra}, str(path), metadata=safe_open(str(zoo.single("sd2", 1)), "pt").metadata())
    out = tmp_path / "out"
    r = convert(path, out, to="diffusers", config_from=str(zoo.diffusers("sd2", 1)), quiet=True)
    dropped = "\n".join(r.summary.events["dropped"])
    assert "logit_scale" in dropped and "text_projection" in dropped and f"resblocks.{last + 1}." in dropped
    assert_same(diffusers_tensors(zoo.diffusers("sd2", 1)), diffusers_tensors(out))
    # CLIP's position_ids: not a merged tensor; a fresh int64 arange in every single file hubmix writes
    sd1 = load_tensors(zoo.single("sd1", 1))
    pos = sd1["cond_stage_model.transformer.text_model.embeddings.position_ids"]
    assert pos.dtype == torch.int64 and torch.equal(pos, torch.arange(77)[None])


def test_prefixed_and_unprefixed_text_encoder_keys_merge_together(zoo, tmp_path):
    """transformers >= 5 writes CLIPTextModel keys without text_model.; older files have it."""
    a, b = zoo.diffusers("sd1", 1), zoo.diffusers("sd1", 2)
    old = tmp_path / "old-style"
    shutil.copytree(b, old)
    f = old / "text_encoder" / "model.safetensors"
    sd = load_tensors(f)
    assert not any(k.startswith("text_model.") for k in sd)
    save_file({"text_model." + k: v for k, v in sd.items()}, str(f), metadata={"format": "pt"})
    hubmix.merge(Recipe(models=[str(a), str(b)], method="weighted_sum"), out=tmp_path / "new", quiet=True)
    hubmix.merge(Recipe(models=[str(a), str(old)], method="weighted_sum"), out=tmp_path / "mixed", quiet=True)
    assert_same(diffusers_tensors(tmp_path / "new"), diffusers_tensors(tmp_path / "mixed"))


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_merged_single_file_of_each_family_loads_in_diffusers(zoo, tmp_path, family):
    inputs = [str(zoo.single(family, s)) for s in (1, 2, 3)]
    out = tmp_path / "merged.safetensors"
    hubmix.merge(Recipe(models=inputs, method="lossless"), out=out, quiet=True)
    assert (tmp_path / "merged.recipe.yaml").is_file()
    ref = tmp_path / "ref"
    hubmix.merge(Recipe(models=[str(zoo.diffusers(family, s)) for s in (1, 2, 3)], method="lossless"), out=ref,
                 quiet=True)
    pipe = load_with_diffusers(out, zoo.configs_only(zoo.diffusers(family, 1)), family, False)
    want = diffusers_tensors(ref)
    for comp, sd in want.items():
        loaded = {canon(k) if comp.startswith("text") else k: v for k, v in getattr(pipe, comp).state_dict().items()}
        assert all(torch.equal(loaded[k], sd[k]) for k in sd), comp


def test_unknown_layout_is_a_one_line_error(tmp_path, cli):
    f = tmp_path / "random.safetensors"
    save_file({"foo.weight": torch.ones(2), "bar.bias": torch.ones(2)}, str(f))
    code, out, _ = cli("inspect", f)  # a safetensors file of no family opens key by key (tests/test_keys.py)
    assert code == 0 and "key by key" in out
    f = tmp_path / "random.ckpt"
    torch.save({"foo.weight": torch.ones(2), "bar.bias": torch.ones(2)}, f)
    code, _, err = cli("inspect", f)
    assert code == 1 and err.count("\n") == 1
    assert "random.ckpt" in err and "matches no family" in err.replace("match no family", "matches no family")
