"""Expand block lists (`--block-alpha`, `block_alpha:`) into a recipe's per-component and per-block parameters,
once the inputs' family and their blocks are known.

Two forms. The A1111/supermerger list (SD families): BASE is the text encoder(s) (their component parameter),
IN00.., M00, OUT00.. are the UNet's blocks as the single-file layout numbers them, the embeddings before the input
blocks (`time_embed`, SDXL's `label_emb`) go with IN00 and the final `out.` layers with the last output block (the
block labels of families/layouts.yaml). A value for a block this UNet lacks is unused and reported.
The LABEL=VALUE form (every family, methods/label_rules.py): the labels are those of the inputs' own keys (the
`blocks:` rules of each component's layout over the first model's tensors, so block counts come from the files),
each text encoder's component label (CLIP, T5) and the group BASE (the family's `block_list.base`, else every
labelled component); a pattern that matches none of them is an error.
Parameters the recipe sets explicitly for a component or block win over the list. The canonical recipe records
the expanded values, so a result never depends on how a list was spelled.
"""

from __future__ import annotations

import dataclasses
import re

from hubmix.errors import RecipeError
from hubmix.formats.families import Family, layouts
from hubmix.formats.model import Component, LocalModel
from hubmix.methods.label_rules import assign
from hubmix.methods.presets import parse_block_list, resolve_block_list
from hubmix.recipe import ComponentRecipe, Recipe, letter


def expand_block_lists(recipe: Recipe, family: Family, models: list[LocalModel]) -> tuple[Recipe, list[str]]:
    """The recipe with its block lists turned into component/block parameters, and notes for the summary. Block
    labels in `components.*.blocks` are spelled as the model spells them (`blocks.7`, `IN00`) whatever their case."""
    comps = {name: dataclasses.replace(c, params=dict(c.params), blocks={k: dict(v) for k, v in c.blocks.items()})
             for name, c in recipe.components.items()}
    _respell_blocks(comps, recipe, family, models)
    if not recipe.block_lists:
        return dataclasses.replace(recipe, components=comps), []
    notes = []
    for param, value in sorted(recipe.block_lists.items()):
        where = f"{recipe.source}: block_{param}"
        value = parse_block_list(value, where)  # idempotent; a Recipe built in code may not have parsed it
        if isinstance(value, dict):
            notes += _expand_labels(comps, recipe, family, models, param, value, where)
        else:
            notes += _expand_a1111(comps, recipe, family, models, param, value, where)
    out = dataclasses.replace(recipe, components=comps, block_lists={})
    out.validate()
    return out, notes


def _first(recipe: Recipe, models: list[LocalModel], cname: str) -> Component | None:
    """The component of the model whose structure the output follows (None when copied or absent)."""
    plan = recipe.plan_for(cname)
    name = plan.get("models", [plan.get("from")])[0]
    return models[[letter(i) for i in range(len(models))].index(name)].components.get(cname)


def block_labels(comp: Component) -> list[str]:
    """A component's block labels in model order (the layout's block_order, then number), from its keys."""
    if comp.keymap is None or not comp.keymap.has_blocks:
        return []
    seen: dict[str, None] = {}
    for k in comp.tensors:
        label = comp.keymap.block_label(k)
        if label is not None:
            seen.setdefault(label)
    order = list(layouts()[comp.spec.layout].get("block_order") or ())
    firsts: dict[str, int] = {}
    for label in seen:
        firsts.setdefault(_split(label)[0], len(firsts))

    def key(label: str) -> tuple[int, int, int]:
        prefix, number = _split(label)
        return (order.index(prefix) if prefix in order else len(order), firsts[prefix], number)

    return sorted(seen, key=key)


def _split(label: str) -> tuple[str, int]:
    m = re.match(r"^(.*?)(\d+)$", label)
    return (m.group(1), int(m.group(2))) if m else (label, -1)


def base_components(family: Family) -> tuple[str, ...]:
    return family.block_base or tuple(c for c, spec in family.components.items() if spec.label)


def _respell_blocks(comps: dict[str, ComponentRecipe], recipe: Recipe, family: Family,
                    models: list[LocalModel]) -> None:
    for cname, c in comps.items():
        if not c.blocks or cname not in family.components:
            continue
        comp = _first(recipe, models, cname)
        labels = {x.casefold(): x for x in block_labels(comp)} if comp is not None else {}
        c.blocks = {labels.get(k.casefold(), k): v for k, v in c.blocks.items()}


def _expand_labels(comps: dict[str, ComponentRecipe], recipe: Recipe, family: Family, models: list[LocalModel],
                   param: str, rules: dict[str, float], where: str) -> list[str]:
    targets: dict[str, tuple[str, bool]] = {}  # label -> (component, is a block)
    base = base_components(family)
    for cname, spec in family.components.items():
        comp = _first(recipe, models, cname) or next((m.components[cname] for m in models
                                                      if cname in m.components), None)
        if comp is None:
            continue
        labels = block_labels(comp)
        if labels:
            targets.update({label: (cname, True) for label in labels})
        elif cname in base:
            targets[spec.label or cname] = (cname, False)
    groups = {"BASE": {label for label, (c, _) in targets.items() if c in base}}
    values = assign(rules, list(targets), groups, where)
    notes = []
    for label, v in values.items():
        cname, is_block = targets[label]
        if "from" in recipe.plan_for(cname) or _first(recipe, models, cname) is None:
            notes.append(f"block_{param}: {label}: the {cname} is copied, not merged; its value is unused")
            continue
        c = comps.setdefault(cname, ComponentRecipe())
        if is_block:
            c.blocks.setdefault(label, {}).setdefault(param, v)
        else:
            c.params.setdefault(param, v)
    return notes


def _expand_a1111(comps: dict[str, ComponentRecipe], recipe: Recipe, family: Family, models: list[LocalModel],
                  param: str, value, where: str) -> list[str]:
    if not family.block_list:
        raise RecipeError(f"{where}: {family.name} models have no A1111 block list; give LABEL=VALUE pairs "
                          "(e.g. \"IN=0.2,D*=0.5,*=0.4\")")
    values = resolve_block_list(value, family.block_list, family.id, where)
    for cname in family.block_base:
        c = comps.setdefault(cname, ComponentRecipe())
        if c.from_ is None:
            c.params.setdefault(param, values["BASE"])
    plan = recipe.plan_for("unet")
    if "from" in plan:
        return [f"block_{param}: the UNet is copied from {plan['from']}; only BASE is used"]
    first = _first(recipe, models, "unet")
    have = set(block_labels(first)) if first is not None else set()
    c = comps.setdefault("unet", ComponentRecipe())
    unused = []
    for label in family.block_list[1:]:
        if label not in have:
            unused.append(label)
            continue
        c.blocks.setdefault(label, {}).setdefault(param, values[label])
    if unused:
        return [f"block_{param}: this UNet has no block {', '.join(unused)}; those values are unused"]
    return []
