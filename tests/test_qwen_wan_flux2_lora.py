"""`--lora` on Qwen-Image, Wan and FLUX.2: LoRA files in the key styles published for them (musubi-tuner's kohya
names, diffusers/PEFT names, original names under `diffusion_model.`), made from the tiny models' own keys and
checked against diffusers' own load_lora_weights + fuse_lora."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from conftest import component_tensors
from safetensors.torch import save_file

from hubmix.formats.model import open_model

LINEAR = re.compile(r"(attn1?2?\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
                    r"|img_mlp\.net\.0\.proj|txt_mlp\.net\.2|ffn\.net\.0\.proj|ffn\.net\.2|ff\.linear_in"
                    r"|attn\.to_qkv_mlp_proj)\.weight$")


def _lora(folder, path, style: str, rank: int = 4, alpha: float = 2.0) -> int:
    """A LoRA on the transformer's block linears: `peft` (transformer.<diffusers module>.lora_A/B), `kohya`
    (lora_unet_<module with _>.lora_down/up + alpha, musubi-tuner's Qwen-Image files), `original`
    (diffusion_model.<original module>.lora_down/up + alpha, Wan's published LoRAs)."""
    gen = torch.Generator().manual_seed(5)
    comp = open_model(folder).components["transformer"]
    sd = {}
    for key, w in sorted(component_tensors(folder, "transformer").items()):
        if not LINEAR.search(key) or not re.match(r"(transformer_blocks|blocks|single_transformer_blocks)\.", key):
            continue
        up, down = torch.randn(w.shape[0], rank, generator=gen) * 0.05, torch.randn(rank, w.shape[1],
                                                                                     generator=gen) * 0.05
        mod = key.removesuffix(".weight")
        if style == "peft":
            sd[f"transformer.{mod}.lora_A.weight"], sd[f"transformer.{mod}.lora_B.weight"] = down, up
            continue
        name = ("lora_unet_" + mod.replace(".", "_") if style == "kohya" else
                "diffusion_model." + comp.keymap.to_original(key).key.removeprefix("model.diffusion_model.")
                .removesuffix(".weight"))
        sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"] = down, up
        sd[f"{name}.alpha"] = torch.tensor(alpha)
    save_file(sd, str(path))
    return len(sd)


def _fused(folder, lora, scale: float) -> dict[str, torch.Tensor]:
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(folder))
    pipe.load_lora_weights(str(Path(lora).parent), weight_name=Path(lora).name)  # diffusers 0.38 offline rule
    pipe.fuse_lora(lora_scale=scale)
    pipe.unload_lora_weights()
    return pipe.transformer.state_dict()


@pytest.mark.parametrize("name, style", [("qwen_image", "kohya"), ("qwen_image", "peft"), ("wan", "original"),
                                         ("wan", "peft"), ("flux2", "peft")])
def test_baked_lora_equals_diffusers_fuse(zoo, tmp_path, cli, name, style):
    a = zoo.diffusers(name, 1)
    lora = tmp_path / "lora.safetensors"
    assert _lora(a, lora, style) > 8
    out = tmp_path / "out"
    code, _, err = cli("merge", a, "--method", "copy", "--lora", f"{lora}:0.7", "-o", out, "-q")
    assert code == 0, err
    want = _fused(a, lora, 0.7)
    got, base = component_tensors(out, "transformer"), component_tensors(a, "transformer")
    changed = {k for k in got if not torch.equal(got[k], base[k])}
    assert changed == {k for k in base if not torch.equal(want[k], base[k])} and len(changed) >= 8
    for k in got:
        assert torch.allclose(got[k], want[k], rtol=1e-5, atol=1e-6), k
    for comp in ("text_encoder", "vae"):  # untouched
        assert all(torch.equal(v, component_tensors(a, comp)[k]) for k, v in component_tensors(out, comp).items())
