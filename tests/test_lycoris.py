"""LyCORIS bake-in (LoHa with and without Tucker cores, LoKr in its factorings with lokr_t2, full diffs, DoRA)
on a tiny SD1.x model, checked against lycoris-lora's own modules' `get_weight(shape)` (alpha / rank applied once)."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_one_line_error, component_tensors
from safetensors.torch import load_file, save_file

import lycoris_files

pytest.importorskip("lycoris")


def _canon(comp, sd):
    return {("text_model." + k if comp == "text_encoder" and not k.startswith("text_model.") else k): v
            for k, v in sd.items()}


def _base(folder):
    return {(c, k): v for c in ("unet", "text_encoder") for k, v in _canon(c, component_tensors(folder, c)).items()}


@pytest.mark.parametrize("specs, strength", [(lycoris_files.SPECS, 0.7), (lycoris_files.DORA_SPECS, 1.0)],
                         ids=["loha-lokr-full", "dora"])
def test_bake_equals_lycoris(zoo, tmp_path, cli, specs, strength):
    a = zoo.diffusers("sd1", 1)
    base = _base(a)
    f = tmp_path / "ly.safetensors"
    want = lycoris_files.write(f, base, specs)
    if strength != 1:
        want = {k: base[k] + strength * (v - base[k]) for k, v in want.items()}
    out = tmp_path / "out"
    code, stdout, err = cli("merge", a, "-m", "copy", "--lora", f"{f}:{strength}", "-o", out, "--json")
    assert code == 0, err
    got = _base(out)
    changed = {k for k in got if not torch.equal(got[k], base[k])}
    assert changed == set(want)
    for k, v in want.items():
        assert torch.allclose(got[k], v, rtol=1e-5, atol=2e-6), k


def test_lokr_t2_rank_is_w2_b(zoo, tmp_path, cli):
    """lycoris-lora's file loader takes a Tucker LoKr's rank from lokr_w2_a's second dimension (the output size);
    the scale is alpha / lokr_w2_b's first dimension, as the module that wrote the file and ComfyUI use."""
    a = zoo.diffusers("sd1", 1)
    spec = [s for s in lycoris_files.SPECS if "lokr" == s[3] and s[4].get("use_tucker")]
    f = tmp_path / "t2.safetensors"
    want = lycoris_files.write(f, _base(a), spec, alpha=2.0)
    sd = load_file(str(f))
    name = spec[0][0]
    assert sd[f"{name}.lokr_w2_a"].shape[1] != sd[f"{name}.lokr_w2_b"].shape[0]  # the two readings differ
    code, _, err = cli("merge", a, "-m", "copy", "--lora", f, "-o", tmp_path / "o", "-q")
    assert code == 0, err
    got = _canon("unet", component_tensors(tmp_path / "o", "unet"))[spec[0][2]]
    assert torch.allclose(got, want[("unet", spec[0][2])], rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("key, fmt", [("lora_unet_x.oft_blocks", "OFT"), ("lora_unet_x.on_input", "(IA)^3"),
                                      ("unet.x.lora_magnitude_vector", "PEFT DoRA")])
def test_still_refused_by_name(zoo, tmp_path, cli, key, fmt):
    a = zoo.diffusers("sd1", 1)
    f = tmp_path / "ly.safetensors"
    save_file({key: torch.zeros(2, 2)}, str(f))
    code, _, err = cli("merge", a, "-m", "copy", "--lora", f"{f}:0.5", "-o", tmp_path / "x")
    assert_one_line_error(code, err, "ly.safetensors", fmt, "not supported")


def test_incomplete_and_misfit_modules(zoo, tmp_path, cli):
    a = zoo.diffusers("sd1", 1)
    name = "lora_unet_down_blocks_0_resnets_0_conv1"
    f = tmp_path / "half.safetensors"
    save_file({f"{name}.hada_w1_a": torch.zeros(32, 2), f"{name}.hada_w1_b": torch.zeros(2, 288)}, str(f))
    code, _, err = cli("merge", a, "-m", "copy", "--lora", f, "-o", tmp_path / "x")
    assert_one_line_error(code, err, "half.safetensors", name, "lacks")
    save_file({f"{name}.lokr_w1": torch.zeros(4, 4), f"{name}.lokr_w2": torch.zeros(3, 3)}, str(f))
    code, _, err = cli("merge", a, "-m", "copy", "--lora", f, "-o", tmp_path / "x")
    assert_one_line_error(code, err, "half.safetensors", name, "does not fit", "[32, 32, 3, 3]")
