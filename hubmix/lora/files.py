"""LoRA files hubmix writes: module names per format, and the atomic, byte-reproducible safetensors write.

- kohya (A1111/ComfyUI): `<prefix><module path with '_'>.lora_up.weight` / `.lora_down.weight` / `.alpha`, and
  `.diff` / `.diff_b` for full deltas. Prefixes: `lora_unet_` (or `lora_transformer_` for transformer families),
  `lora_te_` for a single text encoder, `lora_te1_`/`lora_te2_`/`lora_te3_` for several. The denoiser's module
  path is the original single-file one where the family's LoRAs are written that way (sd-scripts' SDXL files,
  KOHYA_ORIGINAL_NAMES) and the layout maps the weight one to one; the diffusers one otherwise.
- diffusers (PEFT names that `load_lora_weights` reads): `<component>.<module>.lora_A.weight` / `.lora_B.weight`,
  no alpha (scale 1: alpha/rank is folded into the weights).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from hubmix.errors import OutputError

KOHYA_ORIGINAL_NAMES = {"sdxl"}  # families whose kohya LoRAs name denoiser modules by the original layout
KOHYA_DENOISER = {"unet": "lora_unet_", "transformer": "lora_transformer_"}
SUFFIXES = {"kohya": (".lora_up.weight", ".lora_down.weight"), "diffusers": (".lora_B.weight", ".lora_A.weight")}


def kohya_prefix(component: str, text_encoders: list[str]) -> str:
    if component in KOHYA_DENOISER:
        return KOHYA_DENOISER[component]
    if len(text_encoders) == 1:
        return "lora_te_"
    return f"lora_te{text_encoders.index(component) + 1}_"


def module_name(fmt: str, family: Any, comp: Any, key: str) -> str:
    """The file's module name for canonical weight (or bias) `key` of component `comp` (formats.model.Component)."""
    stem = key.rsplit(".", 1)[0]
    if fmt == "diffusers":
        return f"{comp.name}.{stem}"
    text_encoders = [c for c in family.components if c.startswith("text_encoder")]
    path = stem
    if family.id in KOHYA_ORIGINAL_NAMES and comp.name == family.main and comp.keymap is not None:
        place = comp.keymap.to_original(stem + ".weight")
        if place is not None and place.part is None and place.transform != "transpose" \
                and place.key.endswith(".weight"):
            path = place.key[len(comp.keymap.prefix): -len(".weight")]
    return kohya_prefix(comp.name, text_encoders) + path.replace(".", "_")


def write_lora(path: Path, tensors: dict[str, Any], metadata: dict[str, str], overwrite: bool) -> None:
    """Write `tensors` to `path` through a temporary sibling renamed at the end; metadata in sorted order."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputError(f"{path}: exists; pass --overwrite to replace it")
    if path.suffix != ".safetensors":
        raise OutputError(f"{path}: a LoRA is written as one .safetensors file")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file({k: tensors[k].contiguous() for k in sorted(tensors)}, str(tmp),
                  metadata={k: metadata[k] for k in sorted(metadata)})
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def json_meta(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))
