"""`--lora` on Z-Image, Lumina 2, Chroma and FLUX.2 (LoRAs on fused original tensors split row-wise onto the
diffusers modules included): each baked tensor equals diffusers' own load_lora_weights + fuse_lora on the tiny
pipeline (its converters' full-size widths patched to the tiny model's where hard-coded) and an independent
float64 up @ down split by the fused tensor's rows."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_one_line_error, component_tensors
from dit_lora_files import fused_by_diffusers, patch_lora_converter, write_lora

# diffusers' Lumina 2 converter reads exactly these original modules, in every refiner/layer block
LUMINA2_MODULES = (r"^(noise_refiner|context_refiner|layers)\.\d+\."
                   r"(attention\.(qkv|out)|feed_forward\.w[123]|adaLN_modulation\.1)$")
# diffusers' sd-scripts Flux converter (Chroma's loader) reads the blocks' attention and MLP linears
FLUX_MODULES = r"\.(img_attn\.(qkv|proj)|txt_attn\.(qkv|proj)|img_mlp\.[02]|txt_mlp\.[02]|linear[12])$"

FINAL_ADALN = r"^final_layer\.adaLN_modulation\.1$"
CASES = [  # (family, style, original modules taken, fused originals expected among them)
    ("z_image", "kohya", None, False),
    ("z_image", "comfy_diffusers", None, False),  # ai-toolkit: diffusers names under diffusion_model., alpha
    ("lumina2", "comfy_ab", LUMINA2_MODULES, True),  # qkv in grouped-query proportions
    ("lumina2", "peft", None, False),
    ("chroma", "kohya_original", FLUX_MODULES, True),  # double blocks' qkv, single blocks' linear1 (q, k, v, mlp)
    ("flux", "kohya_original", FLUX_MODULES, True),  # Flux.1: the same split, diffusers' sd-scripts converter
    ("flux2", "comfy_ab", None, True),  # double blocks' img/txt qkv in thirds
]


def _check(got: dict, base: dict, want: dict, strength: float) -> None:
    changed = {k for k in got if not torch.equal(got[k], base[k])}
    assert changed == set(want) and len(changed) >= (8 if len(want) > 1 else 1)
    for k, delta in want.items():
        ref = (base[k].double() + strength * delta).float()
        assert torch.allclose(got[k], ref, rtol=1e-5, atol=1e-6), k


@pytest.mark.parametrize("name, style, only, fused", CASES)
def test_baked_lora_equals_diffusers_fuse(zoo, tmp_path, cli, monkeypatch, name, style, only, fused):
    a = zoo.diffusers(name, 1)
    lora = tmp_path / "lora.safetensors"
    want = write_lora(a, lora, style, only)
    from safetensors import safe_open

    with safe_open(str(lora), "pt") as f:
        assert fused == any("qkv" in k or "linear1" in k for k in f.keys())
    out = tmp_path / "out"
    code, _, err = cli("merge", a, "--method", "copy", "--lora", f"{lora}:0.7", "-o", out, "-q")
    assert code == 0, err
    got, base = component_tensors(out, "transformer"), component_tensors(a, "transformer")
    _check(got, base, want, 0.7)  # the math
    patch_lora_converter(monkeypatch, name, a)
    oracle = fused_by_diffusers(a, lora, 0.7)
    assert {k for k in base if not torch.equal(oracle[k], base[k])} == set(want)
    for k in got:
        assert torch.allclose(got[k], oracle[k], rtol=1e-5, atol=1e-6), k


def test_original_fused_qkv_lora_on_a_single_file(zoo, tmp_path, cli):
    """Z-Image's original `attention.qkv` LoRA (ComfyUI names, alpha) baked into a single-file output: diffusers
    has no converter for that style, so the oracle is the math; the file's fused qkv gets the LoRA's rows."""
    from safetensors.torch import load_file

    a = zoo.diffusers("z_image", 1)
    lora = tmp_path / "lora.safetensors"
    want = write_lora(a, lora, "comfy", r"\.attention\.qkv$")
    assert len(want) == 3 * 7  # q, k, v of 2 + 2 refiner blocks and 3 layers
    out = tmp_path / "out.safetensors"
    code, _, err = cli("merge", a, "--method", "copy", "--lora", f"{lora}:0.5", "-o", out, "-q")
    assert code == 0, err
    got, base = load_file(str(out)), component_tensors(a, "transformer")
    stems = sorted({k.rsplit(".attention.", 1)[0] for k in want})
    for stem in stems:
        parts = [f"{stem}.attention.to_{p}.weight" for p in "qkv"]
        ref = torch.cat([(base[k].double() + 0.5 * want[k]).float() for k in parts])
        assert torch.allclose(got[f"{stem}.attention.qkv.weight"], ref, rtol=1e-5, atol=1e-6), stem
    assert torch.equal(got["layers.0.attention.out.weight"], base["layers.0.attention.to_out.0.weight"])


@pytest.mark.parametrize("name", ["flux", "flux2"])
def test_final_adaln_lora_swaps_its_halves(zoo, tmp_path, cli, name):
    """FLUX's original `final_layer.adaLN_modulation.1` holds (shift, scale), diffusers' `norm_out.linear`
    (scale, shift): a LoRA in original names updates the swapped rows. The oracle is the math: diffusers 0.42's
    Flux.1 converters swap the halves too (`swap_scale_shift`), its FLUX.2 converter does not."""
    a = zoo.diffusers(name, 1)
    lora = tmp_path / "lora.safetensors"
    want = write_lora(a, lora, "comfy", FINAL_ADALN)
    assert list(want) == ["norm_out.linear.weight"]
    out = tmp_path / "out"
    code, _, err = cli("merge", a, "--method", "copy", "--lora", f"{lora}:0.8", "-o", out, "-q")
    assert code == 0, err
    _check(component_tensors(out, "transformer"), component_tensors(a, "transformer"), want, 0.8)


def test_lokr_on_a_fused_tensor_is_refused_by_name(zoo, tmp_path, cli):
    """A LoKr update does not split by rows: on FLUX.2's fused qkv it is one line naming the module, not a guess."""
    from safetensors.torch import save_file

    a = zoo.diffusers("flux2", 1)
    lora = tmp_path / "lokr.safetensors"
    mod = "lora_unet_double_blocks_0_img_attn_qkv"
    save_file({f"{mod}.lokr_w1": torch.ones(4, 4), f"{mod}.lokr_w2": torch.ones(24, 8)}, str(lora))
    code, _, err = cli("merge", a, "--method", "copy", "--lora", lora, "-o", tmp_path / "out", "-q")
    assert_one_line_error(code, err, "lokr.safetensors", mod, "lokr", "split")
    assert not (tmp_path / "out").exists()
