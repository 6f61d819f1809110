"""Expand A1111/supermerger block lists (`--block-alpha`, `block_alpha:`) into a recipe's per-component and
per-block parameters, once the inputs' family and the UNet's blocks are known.

The list's meaning is A1111's: BASE is the text encoder(s) (their component parameter), IN00.., M00, OUT00.. are
the UNet's blocks as the single-file layout numbers them, the embeddings before the input blocks (`time_embed`,
SDXL's `label_emb`) go with IN00 and the final `out.` layers with the last output block (the block labels of
families/layouts.yaml). A value for a block this UNet lacks (a tiny or unusual model) is unused and reported.
Parameters the recipe sets explicitly for a component or block win over the list. The canonical recipe records
the expanded values, so a result never depends on how a list was spelled.
"""

from __future__ import annotations

import dataclasses

from hubmix.errors import RecipeError
from hubmix.formats.families import Family
from hubmix.formats.model import LocalModel
from hubmix.methods.presets import resolve_block_list
from hubmix.recipe import ComponentRecipe, Recipe, letter


def expand_block_lists(recipe: Recipe, family: Family, models: list[LocalModel]) -> tuple[Recipe, list[str]]:
    """The recipe with its block lists turned into component/block parameters, and notes for the summary."""
    if not recipe.block_lists:
        return recipe, []
    if not family.block_list:
        raise RecipeError(f"{recipe.source}: {family.name} models have no A1111 block list")
    comps = {name: dataclasses.replace(c, params=dict(c.params), blocks={k: dict(v) for k, v in c.blocks.items()})
             for name, c in recipe.components.items()}
    notes = []
    for param, value in sorted(recipe.block_lists.items()):
        where = f"{recipe.source}: block_{param}"
        values = resolve_block_list(value, family.block_list, family.id, where)
        for cname in family.block_base:
            c = comps.setdefault(cname, ComponentRecipe())
            if c.from_ is None:
                c.params.setdefault(param, values["BASE"])
        plan = recipe.plan_for("unet")
        if "from" in plan:
            notes.append(f"block_{param}: the UNet is copied from {plan['from']}; only BASE is used")
            continue
        first = models[[letter(i) for i in range(len(models))].index(plan["models"][0])].components["unet"]
        have = {first.keymap.block_label(k) for k in first.tensors} if first.keymap else set()
        c = comps.setdefault("unet", ComponentRecipe())
        unused = []
        for label in family.block_list[1:]:
            if label not in have:
                unused.append(label)
                continue
            c.blocks.setdefault(label, {}).setdefault(param, values[label])
        if unused:
            notes.append(f"block_{param}: this UNet has no block {', '.join(unused)}; those values are unused")
    out = dataclasses.replace(recipe, components=comps, block_lists={})
    out.validate()
    return out, notes
