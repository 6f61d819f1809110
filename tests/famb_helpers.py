"""Helpers of the Qwen-Image / Wan / FLUX.2 tests: the families' tiny zoo names, their diffusers loaders, and
files in the layouts people share (bare transformer-only, ComfyUI-prefixed)."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import component_tensors, load_tensors
from safetensors.torch import save_file

COMFY = "model.diffusion_model."
# zoo name -> (family id, transformer class, a key only the original layout has, block labels of the tiny model)
FAMILIES = {
    "qwen_image": ("qwen_image", "QwenImageTransformer2DModel", "txt_norm.weight", {"IN", "T00", "T01", "OUT"}),
    "wan": ("wan", "WanTransformer3DModel", "head.modulation", {"IN", "B00", "B01", "B02", "OUT"}),
    "flux2": ("flux2", "Flux2Transformer2DModel", "double_stream_modulation_img.lin.weight",
              {"IN", "D00", "D01", "S00", "S01", "S02", "OUT"}),
}
COMPONENTS = ("transformer", "transformer_2", "text_encoder", "vae")


def folder_tensors(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {c: component_tensors(folder, c) for c in COMPONENTS if (folder / c).is_dir()}


def assert_tensors_equal(want: dict[str, torch.Tensor], got: dict[str, torch.Tensor], where: str) -> None:
    assert set(want) == set(got), f"{where}: keys differ: {sorted(set(want) ^ set(got))[:5]}"
    bad = [k for k in want if not torch.equal(want[k], got[k])]
    assert not bad, f"{where}: {len(bad)} tensors differ, e.g. {bad[:5]}"


def prefixed(single: Path, out: Path) -> Path:
    """ComfyUI's form of a transformer-only file: every key under model.diffusion_model."""
    save_file({COMFY + k: v for k, v in load_tensors(single).items()}, str(out))
    return out


def bare(single: Path, out: Path) -> Path:
    save_file({k.removeprefix(COMFY): v for k, v in load_tensors(single).items()}, str(out))
    return out


def load_single_transformer(cls_name: str, single: Path, config_folder: Path, subfolder: str = "transformer"):
    """diffusers' own from_single_file on a transformer-only file (bare keys: diffusers cannot read the
    ComfyUI-prefixed Qwen-Image and FLUX.2 files, so those are given to it without the prefix)."""
    import diffusers

    keys = load_tensors(single)
    if any(k.startswith(COMFY) for k in keys) and cls_name != "WanTransformer3DModel":
        single = bare(single, single.with_name(single.stem + "-unprefixed.safetensors"))
    cls = getattr(diffusers, cls_name)
    return cls.from_single_file(str(single), config=str(config_folder), subfolder=subfolder, local_files_only=True)
