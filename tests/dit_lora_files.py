"""LoRA files for the DiT families, made from a tiny model's own keys in the key styles published for them, with
the update each canonical weight should get computed independently (float64 up @ down, split by the fused
tensor's rows); and diffusers' LoRA converters with their hard-coded full-size widths read from the tiny model
(as tests/dit_loaders.py does for the single-file converters), so diffusers' own loader is the oracle."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import torch
from conftest import component_tensors
from safetensors.torch import save_file

from hubmix.formats.model import open_model

BLOCKS = re.compile(r"^(transformer_blocks|single_transformer_blocks|layers|noise_refiner|context_refiner)\.\d+\.")

# style -> (module name: "diffusers" or "original", spelling, down/up suffixes, alpha written)
STYLES = {
    "peft": ("diffusers", "transformer.{}", ("lora_A", "lora_B"), False),  # diffusers' trainers
    "kohya": ("diffusers", "lora_unet_{}", ("lora_down", "lora_up"), True),  # musubi-tuner, Z-Image trainers
    "kohya_original": ("original", "lora_unet_{}", ("lora_down", "lora_up"), True),  # sd-scripts Flux/Chroma
    "comfy": ("original", "diffusion_model.{}", ("lora_down", "lora_up"), True),  # ComfyUI / musubi
    "comfy_ab": ("original", "diffusion_model.{}", ("lora_A", "lora_B"), False),  # ai-toolkit, DiffSynth
    "comfy_diffusers": ("diffusers", "diffusion_model.{}", ("lora_A", "lora_B"), True),  # ai-toolkit Z-Image
}


def write_lora(folder: Path, path: Path, style: str, only: str | None = None, rank: int = 4,
               alpha: float = 2.0) -> dict[str, torch.Tensor]:
    """A LoRA on the 2-D weights of the transformer's blocks, or, with `only`, on the 2-D weights whose original
    module name matches it; returns the float64 update (scale 1) each canonical key should get."""
    names, spelling, (down_s, up_s), with_alpha = STYLES[style]
    comp = open_model(folder).components["transformer"]
    tensors = component_tensors(folder, "transformer")
    modules: dict[str, list[tuple[tuple, str]]] = {}
    swapped = set()  # canonical keys whose original stores the two halves the other way round
    for key, w in sorted(tensors.items()):
        if w.dim() != 2 or not key.endswith(".weight") or not (only or BLOCKS.match(key)):
            continue
        place = comp.keymap.to_original(key)
        orig = place.key[len(comp.keymap.prefix):].removesuffix(".weight")
        if only is not None and not re.search(only, orig):
            continue
        if names == "original" and place.transform == "swap_halves":
            swapped.add(key)
        mod = orig if names == "original" else key.removesuffix(".weight")
        if spelling.startswith("lora_unet_"):
            mod = mod.replace(".", "_")
        modules.setdefault(spelling.format(mod), []).append((place.part or (0, ()), key))
    gen = torch.Generator().manual_seed(5)
    sd, want = {}, {}
    for name, members in sorted(modules.items()):
        keys = [k for _, k in sorted(members)]
        rows = [tensors[k].shape[0] for k in keys]
        up = torch.randn(sum(rows), rank, generator=gen) * 0.05
        down = torch.randn(rank, tensors[keys[0]].shape[1], generator=gen) * 0.05
        sd[f"{name}.{down_s}.weight"], sd[f"{name}.{up_s}.weight"] = down, up
        if with_alpha:
            sd[f"{name}.alpha"] = torch.tensor(alpha)
        full = (up.double() @ down.double()) * (alpha / rank if with_alpha else 1.0)
        want.update(zip(keys, full.split(rows)))
        want.update({k: want[k].roll(want[k].shape[0] // 2, 0) for k in keys if k in swapped})
    save_file(sd, str(path))
    return want


# diffusers' LoRA converters' full-size widths -> the tiny model's (read from its tensors)
WIDTHS = {
    "lumina2": ("_convert_non_diffusers_lumina2_lora_to_diffusers", "[2304, 768, 768]",
                ["layers.0.attn.to_q.weight", "layers.0.attn.to_k.weight", "layers.0.attn.to_v.weight"]),
    "chroma": ("_convert_kohya_flux_lora_to_diffusers", "[3072, 3072, 3072, 12288]",
               [f"single_transformer_blocks.0.{m}.weight" for m in ("attn.to_q", "attn.to_k", "attn.to_v",
                                                                     "proj_mlp")]),
}
WIDTHS["flux"] = WIDTHS["chroma"]


def patch_lora_converter(monkeypatch, family: str, folder: Path) -> None:
    """diffusers' LoRA converter of `family` with its hard-coded widths replaced by the tiny model's."""
    if family not in WIDTHS:
        return
    import diffusers.loaders.lora_conversion_utils as conv
    import diffusers.loaders.lora_pipeline as pipes

    fn, old, keys = WIDTHS[family]
    tensors = component_tensors(folder, "transformer")
    src = inspect.getsource(getattr(conv, fn))
    assert old in src, (fn, old)
    namespace = dict(vars(conv))
    exec(src.replace(old, str([tensors[k].shape[0] for k in keys])), namespace)  # noqa: S102 - diffusers' own
    monkeypatch.setattr(conv, fn, namespace[fn])
    if hasattr(pipes, fn):
        monkeypatch.setattr(pipes, fn, namespace[fn])


def fused_by_diffusers(folder: Path, lora: Path, scale: float) -> dict[str, torch.Tensor]:
    """The transformer after diffusers' own load_lora_weights + fuse_lora(lora_scale=scale)."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(folder))
    pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
    pipe.fuse_lora(components=["transformer"], lora_scale=scale)
    pipe.unload_lora_weights()
    return pipe.transformer.state_dict()
