"""LoRA bake-in on tiny SD1.x and SDXL models: kohya and PEFT files made from the models' own keys, checked
against diffusers' own load_lora_weights + fuse_lora on the same pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import assert_one_line_error, component_tensors
from safetensors.torch import load_file, save_file

import lora_files
from hubmix.hub.hashing import file_sha256

COMPONENTS = {"sd1": ["unet", "text_encoder"], "sdxl": ["unet", "text_encoder", "text_encoder_2"]}


def canon(comp: str, sd: dict) -> dict:
    return {("text_model." + k if comp != "unet" and not k.startswith(("text_model.", "text_projection")) else k): v
            for k, v in sd.items()}


def fused(folder, lora, scale: float) -> dict[str, dict[str, torch.Tensor]]:
    """diffusers' own result: the pipeline with the LoRA loaded and fused at lora_scale, adapters removed."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(folder))
    # folder + weight_name: diffusers 0.36 (the lowest bound) refuses a bare file path when HF_HUB_OFFLINE is set
    pipe.load_lora_weights(str(Path(lora).parent), weight_name=Path(lora).name)
    pipe.fuse_lora(lora_scale=scale)
    pipe.unload_lora_weights()
    return {c: canon(c, getattr(pipe, c).state_dict()) for c in ("unet", "text_encoder", "text_encoder_2")
            if getattr(pipe, c, None) is not None}


def assert_matches(out, base_folder, want, family, changed_min=10):
    for comp in COMPONENTS[family]:
        got, base = canon(comp, component_tensors(out, comp)), canon(comp, component_tensors(base_folder, comp))
        changed = {k for k in got if not torch.equal(got[k], base[k])}
        want_changed = {k for k in want[comp] if k in base and not torch.equal(want[comp][k], base[k])}
        assert changed == want_changed and len(changed) >= changed_min, comp
        for k in got:
            assert torch.allclose(got[k], want[comp][k], rtol=1e-5, atol=1e-6), (comp, k)


@pytest.mark.parametrize("family, kind", [("sd1", "kohya"), ("sdxl", "kohya-original"), ("sd1", "peft"),
                                          ("sdxl", "peft")])
def test_baked_lora_equals_diffusers_fuse(zoo, tmp_path, cli, family, kind):
    a = zoo.diffusers(family, 1)
    lora = tmp_path / "lora.safetensors"
    if kind == "peft":
        lora_files.peft(a, lora, family)
    else:  # SDXL LoRAs from sd-scripts name UNet modules by the original layout (input_blocks_4_1_...)
        lora_files.kohya(a, lora, family, single=zoo.single(family, 1) if kind == "kohya-original" else None)
    out = tmp_path / "out"
    code, _, err = cli("merge", a, "--method", "copy", "--lora", f"{lora}:0.7", "-o", out, "-q")
    assert code == 0, err
    assert_matches(out, a, fused(a, lora, 0.7), family)
    from hubmix.flow.result import load_result

    entry = load_result(out).canonical["loras"]
    assert entry == [{"ref": "lora.safetensors", "sha256": file_sha256(lora), "strength": 0.7}]
    from hubmix.hub.card import build_card

    assert f"| `lora.safetensors` (local) | - | `-` | 0.7 | `{file_sha256(lora)}` |" in build_card(load_result(out)).text


def test_lora_on_a_merge_and_per_component_strengths(zoo, tmp_path):
    import hubmix
    from hubmix import Recipe

    a, b = zoo.diffusers("sd1", 1), zoo.diffusers("sd1", 2)
    lora = lora_files.kohya(a, tmp_path / "k.safetensors", "sd1", rank=8, alpha=3.0, seed=5)
    plain = tmp_path / "plain"
    hubmix.merge(Recipe(models=[str(a), str(b)], method="weighted_sum", params={"alpha": 0.3}), out=plain,
                 quiet=True)
    out = tmp_path / "out"
    recipe = Recipe.from_dict({"models": [str(a), str(b)], "method": "weighted_sum", "params": {"alpha": 0.3},
                               "loras": [{"ref": str(lora), "components": {"unet": 1.2}}]}, "test")
    hubmix.merge(recipe, out=out, quiet=True)
    want = fused(plain, lora, 1.2)
    got_te, plain_te = component_tensors(out, "text_encoder"), component_tensors(plain, "text_encoder")
    assert all(torch.equal(got_te[k], plain_te[k]) for k in plain_te)  # the LoRA bakes into the UNet only
    got, base = component_tensors(out, "unet"), component_tensors(plain, "unet")
    assert sum(not torch.equal(got[k], base[k]) for k in got) > 10
    assert all(torch.allclose(got[k], want["unet"][k], rtol=1e-5, atol=1e-6) for k in got)


def test_bytes_do_not_depend_on_chunks_or_workers(zoo, tmp_path, monkeypatch):
    import hubmix
    from hubmix import Recipe
    from hubmix.engine import pipeline

    a, b = zoo.diffusers("sd1", 1), zoo.diffusers("sd1", 2)
    lora = lora_files.kohya(a, tmp_path / "k.safetensors", "sd1")
    recipe = Recipe(models=[str(a), str(b)], method="weighted_sum", loras=[{"ref": str(lora), "strength": 0.8}])
    hubmix.merge(recipe, out=tmp_path / "one", quiet=True, workers=1)
    monkeypatch.setattr(pipeline, "chunk_elements", lambda *a, **k: 1000)  # every large tensor in many chunks
    hubmix.merge(recipe, out=tmp_path / "many", quiet=True, workers=3)
    for comp in ("unet", "text_encoder"):
        for f in (tmp_path / "one" / comp).glob("*.safetensors"):
            assert f.read_bytes() == (tmp_path / "many" / comp / f.name).read_bytes()


def test_unknown_key_and_skip(zoo, tmp_path, cli):
    a = zoo.diffusers("sd1", 1)
    lora = lora_files.kohya(a, tmp_path / "k.safetensors", "sd1")
    sd = load_file(str(lora))
    sd["lora_unet_down_blocks_9_attentions_0_proj_in.lora_down.weight"] = torch.zeros(4, 8)
    sd["lora_unet_down_blocks_9_attentions_0_proj_in.lora_up.weight"] = torch.zeros(8, 4)
    bad = tmp_path / "bad.safetensors"
    save_file(sd, str(bad))
    code, _, err = cli("merge", a, "-m", "copy", "--lora", bad, "-o", tmp_path / "x")
    assert_one_line_error(code, err, "bad.safetensors", "lora_unet_down_blocks_9_attentions_0_proj_in", "matches no")
    assert not (tmp_path / "x").exists()
    code, out, err = cli("merge", a, "-m", "copy", "--lora", bad, "--lora-skip-unknown", "-o", tmp_path / "x",
                         "--json")
    assert code == 0, err
    skipped = json.loads(out)["summary"]["events"]["lora"]
    assert sorted(skipped) == sorted(f"{bad}: lora_unet_down_blocks_9_attentions_0_proj_in.lora_{s}.weight"
                                     for s in ("down", "up"))
    want = fused(a, lora, 1.0)  # the rest is baked as without the stray module
    assert all(torch.allclose(v, want["unet"][k], rtol=1e-5, atol=1e-6)
               for k, v in component_tensors(tmp_path / "x", "unet").items())


@pytest.mark.parametrize("key, fmt", [("lora_unet_x.oft_blocks", "OFT"), ("lora_unet_x.w_norm", "LyCORIS norm")])
def test_lycoris_refused(zoo, tmp_path, cli, key, fmt):
    a = zoo.diffusers("sd1", 1)
    f = tmp_path / "ly.safetensors"
    save_file({key: torch.zeros(2, 2), "lora_unet_x.alpha": torch.tensor(1.0)}, str(f))
    code, _, err = cli("merge", a, "-m", "copy", "--lora", f"{f}:0.5", "-o", tmp_path / "x")
    assert_one_line_error(code, err, "ly.safetensors", fmt, "not supported")


def test_lora_from_the_hub_is_pinned_and_hashed(zoo, tmp_path, monkeypatch, cli):
    from hubserver import configure_hf_client, guard_loopback, start_hub_server

    from hubmix.flow.result import load_result

    a = zoo.diffusers("sd1", 1)
    lora = lora_files.peft(a, tmp_path / "pytorch_lora_weights.safetensors", "sd1", seed=3)
    server = start_hub_server(tokens={})
    try:
        server.create_repo("org/lora")
        sha = server.commit("org/lora", {"pytorch_lora_weights.safetensors": lora})
        off_loopback = guard_loopback(monkeypatch)
        configure_hf_client(monkeypatch, server.url, tmp_path / "hf_home")
        monkeypatch.setenv("HUBMIX_CACHE", str(tmp_path / "hubmix-cache"))
        code, _, err = cli("merge", a, "-m", "copy", "--lora", "org/lora:0.5", "-o", tmp_path / "hub", "-q")
        assert code == 0, err
        assert off_loopback == []
    finally:
        server.stop()
    code, _, err = cli("merge", a, "-m", "copy", "--lora", f"{lora}:0.5", "-o", tmp_path / "local", "-q")
    assert code == 0, err
    for f in (tmp_path / "local" / "unet").glob("*.safetensors"):
        assert load_file(str(f)).keys() == load_file(str(tmp_path / "hub" / "unet" / f.name)).keys()
        assert all(torch.equal(v, load_file(str(tmp_path / "hub" / "unet" / f.name))[k])
                   for k, v in load_file(str(f)).items())
    entry = load_result(tmp_path / "hub").canonical["loras"]
    assert entry == [{"ref": "org/lora", "repo": "org/lora", "revision": sha, "file": "pytorch_lora_weights.safetensors",
                      "sha256": file_sha256(lora), "strength": 0.5}]
