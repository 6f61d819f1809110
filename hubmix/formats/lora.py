"""LoRA files: recipe entries, format detection, and the map from a LoRA's module names to canonical keys.

Two families of files are read:
- kohya / A1111 (`lora_unet_*`, `lora_te_*`, SDXL's `lora_te1_*` / `lora_te2_*`, with `.lora_down.weight`,
  `.lora_up.weight` and optional `.alpha`; conv LoRA / LoCon included). A kohya module name is a module path
  (diffusers' or the original single-file one) with '.' written '_': the lookup is built from the model's own
  canonical keys and their original-layout placements, never from string rewrites of the LoRA's names.
- diffusers / PEFT (`<component>.<module>.lora_A.weight` / `.lora_B.weight`, alpha from `.alpha` keys or the
  file's `lora_adapter_metadata`, else alpha = rank).
LoHa / LoKr and other LyCORIS variants are refused by name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hubmix.errors import InputError, RecipeError

KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                  "lora_te2_": "text_encoder_2"}
UNSUPPORTED = {  # key fragments of LyCORIS formats this reader does not bake
    ".hada_w1_a": "LoHa", ".hada_w2_a": "LoHa", ".lokr_w1": "LoKr", ".lokr_w2": "LoKr", ".oft_blocks": "OFT",
    ".lora_mid.weight": "LoCon with a CP-decomposed middle (lora_mid)", ".diff": "LyCORIS full diff",
    ".w_norm": "LyCORIS norm", ".on_input": "(IA)^3",
}


def lora_entry(x: Any, where: str) -> dict[str, Any]:
    """A recipe's LoRA (`path`, `org/repo/file.safetensors`, or a mapping with ref, strength, components) as a
    normalised mapping: ref, strength and, when given, per-component strengths; a canonical entry's pins kept."""
    if isinstance(x, str):
        x = {"ref": x}
    if not isinstance(x, dict) or not isinstance(x.get("ref"), str) or not x["ref"]:
        raise RecipeError(f"{where}: a LoRA is a path or Hub reference, or a mapping with 'ref'")
    known = {"ref", "strength", "components", "repo", "revision", "file", "sha256"}
    unknown = sorted(set(x) - known)
    if unknown:
        raise RecipeError(f"{where}: unknown field(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    out = dict(x)
    out["strength"] = _number(x.get("strength", 1.0), f"{where}.strength")
    comps = x.get("components")
    if comps is not None:
        from hubmix.formats.families import all_component_names

        if isinstance(comps, list):
            comps = {c: out["strength"] for c in comps}
        if not isinstance(comps, dict):
            raise RecipeError(f"{where}.components: a list of components or a mapping component -> strength")
        bad = [c for c in comps if c not in all_component_names()]
        if bad:
            raise RecipeError(f"{where}.components: unknown {', '.join(bad)} (known: "
                              f"{', '.join(all_component_names())})")
        out["components"] = {c: _number(v, f"{where}.components.{c}") for c, v in sorted(comps.items())}
    return out


def parse_lora_option(text: str) -> dict[str, Any]:
    """`REF[:STRENGTH]` as the CLI's --lora takes it."""
    ref, sep, tail = text.rpartition(":")
    if sep and ref:
        try:
            return {"ref": ref, "strength": float(tail)}
        except ValueError:
            pass
    return {"ref": text, "strength": 1.0}


def _number(v: Any, where: str) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise RecipeError(f"{where}: must be a number, got {v!r}") from None
    if f != f:
        raise RecipeError(f"{where}: must be a number, got NaN")
    return f
