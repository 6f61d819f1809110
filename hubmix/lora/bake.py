"""Bake LoRAs into a merge: resolve each recipe LoRA (a local file or a pinned Hub file), map its modules onto the
output's canonical keys, and hand each touched tensor its delta (hubmix.engine.lora) for the engine's pass.

The LoRA's modules are matched against the structure model of each component (the model whose keys the output
has), so a LoRA bakes the same way into a merge, a copy (`--method copy`) or a conversion.
"""

from __future__ import annotations

from typing import Any, Callable

from hubmix.engine.lora import LoraDelta
from hubmix.engine.plan import Summary, Task
from hubmix.errors import InputError
from hubmix.formats.lora import LoraModule, read_lora
from hubmix.formats.model import LocalModel
from hubmix.hub.hashing import file_sha256
from hubmix.recipe import Recipe


def attach_loras(recipe: Recipe, resolver: Callable, models: list[LocalModel], structure: dict[str, int],
                 tasks: list[Task], summary: Summary) -> list[dict[str, Any]]:
    """Give every task a LoRA touches its delta; returns the LoRAs' canonical entries (pinned, hashed)."""
    if not recipe.loras:
        return []
    comps = {c: models[i].components[c] for c, i in structure.items()}
    by_key: dict[tuple[str, str], list[LoraModule]] = {}
    entries = []
    for entry in recipe.loras:
        name = entry["ref"]
        path, ident = resolver(entry, recipe)
        if path.is_dir():
            files = sorted(path.glob("*.safetensors"))
            if len(files) != 1:
                raise InputError(f"{name}: a LoRA folder must hold exactly one .safetensors file, found {len(files)}")
            path = files[0]
        sha = file_sha256(path)
        if entry.get("sha256") and entry["sha256"] != sha:
            raise InputError(f"{name}: sha256 {sha[:12]}... differs from the recipe's {entry['sha256'][:12]}...")
        strengths = entry.get("components") or {c: entry["strength"] for c in comps}
        modules, unknown = read_lora(path, name, comps, strengths, recipe.lora_skip_unknown)
        for key in unknown:
            summary.add("lora", f"{name}: {key}")
        for m in modules:
            by_key.setdefault((m.component, m.key), []).append(m)
        canonical = {**ident, "sha256": sha, "strength": entry["strength"]}
        if entry.get("components"):
            canonical["components"] = dict(entry["components"])
        entries.append(canonical)
        kinds = sorted({m.kind for m in modules} - {"lora"}) + (["DoRA"] if any(m.dora for m in modules) else [])
        what = f" ({', '.join(kinds)})" if kinds else ""
        summary.add("note", f"LoRA {name}: {len(modules)} modules{what} baked at strength {entry['strength']:g}")
    for t in tasks:
        mods = by_key.pop((t.component, t.key), None)
        if mods:
            t.lora = LoraDelta(mods, t.shape)
    for (comp, key), mods in by_key.items():  # a key the output does not write (filtered by the plan)
        summary.add("lora", f"{mods[0].lora}: {mods[0].name} ({comp}/{key} is not in the output)")
    return entries
