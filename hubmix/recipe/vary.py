"""Parameter sweeps: `--vary NAME=v1,v2,...` (repeatable) parsed into points, one recipe per point, and the names
a point goes by (a branch `alpha-0.3`, a Job label `alpha-0_3`). Shared by `merge --vary ... --remote` and the
sweep command; nothing here runs a merge."""

from __future__ import annotations

import copy
import itertools
import re
from dataclasses import dataclass
from typing import Any, Sequence

from hubmix.errors import RecipeError

Point = dict[str, float]


@dataclass(frozen=True)
class Axis:
    name: str
    values: tuple[float, ...]


def _number(text: str, where: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise RecipeError(f"{where}: {text!r} is not a number") from None


def parse_vary(texts: Sequence[str]) -> list[Axis]:
    """`["alpha=0.3,0.5,0.7", "beta=0.1,0.2"]` -> axes, in the order given; names as parameters spell them."""
    axes: list[Axis] = []
    for text in texts:
        where = f"--vary {text}"
        name, sep, values = str(text).partition("=")
        name = name.strip().lstrip("-").replace("-", "_")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*){0,2}", name):
            raise RecipeError(f"{where}: expected NAME=v1,v2,... such as alpha=0.3,0.5,0.7")
        parts = [v.strip() for v in values.split(",") if v.strip()]
        if not parts:
            raise RecipeError(f"{where}: no values after '='")
        nums = tuple(_number(v, where) for v in parts)
        if len(set(nums)) != len(nums):
            raise RecipeError(f"{where}: a value is given twice")
        if any(a.name == name for a in axes):
            raise RecipeError(f"{where}: {name} is varied twice; give all its values in one --vary")
        axes.append(Axis(name, nums))
    return axes


def points(axes: Sequence[Axis]) -> list[Point]:
    """Every combination of the axes' values (the first axis varies slowest)."""
    return [dict(zip([a.name for a in axes], combo)) for combo in itertools.product(*(a.values for a in axes))]


def _value(v: float) -> str:
    return f"{v:g}"


def point_name(point: Point) -> str:
    """The branch a point's result goes to: `alpha-0.3`, `alpha-0.3_beta-0.1`, `text-encoder.alpha-0.5` (valid git
    and Hub branch names)."""
    return "_".join(f"{k.replace('_', '-')}-{_value(v)}" for k, v in point.items())


def label_value(text: str) -> str:
    """`text` as a Job label value: the Hub allows letters, digits, '-' and '_' (1 to 100 of them)."""
    out = re.sub(r"[^A-Za-z0-9_-]", "_", text.replace("/", "--"))[:100]
    return out or "_"


def _split(name: str) -> tuple[str | None, str | None, str]:
    """`alpha`, `OUT00.beta`, `text_encoder.alpha`, `unet.OUT00.beta` -> (component, block, parameter)."""
    from hubmix.formats.families import all_component_names

    parts = name.split(".")
    comp = parts.pop(0) if len(parts) > 1 and parts[0] in all_component_names() else None
    block = parts.pop(0).upper() if len(parts) > 1 else None
    if len(parts) != 1 or not parts[0]:
        raise RecipeError(f"--vary {name}: expected PARAM, BLOCK.PARAM, COMPONENT.PARAM or COMPONENT.BLOCK.PARAM")
    return (comp or ("unet" if block else None)), block, parts[0]


def apply(recipe: Any, point: Point) -> Any:
    """The recipe of one point, checked like any recipe (an unknown parameter, component or block, or a value out
    of range, is a RecipeError naming it). Names as a recipe spells them: `alpha` (the method's), `OUT00.beta` (a
    UNet block's), `text_encoder.alpha` (one component's), `unet.IN04.alpha`."""
    r = copy.deepcopy(recipe)
    r.source = f"{recipe.source} at {point_name(point)}"
    for name, value in point.items():
        comp, block, param = _split(name)
        if comp is None:
            if param in recipe.params:
                raise RecipeError(f"--vary {name}: the parameter is also given alone; drop --{param.replace('_', '-')}")
            r.params[param] = value
            continue
        from hubmix.recipe import ComponentRecipe

        c = r.components.setdefault(comp, ComponentRecipe())
        if c.from_ is not None:
            raise RecipeError(f"--vary {name}: {comp} is copied unchanged from {c.from_}, it has no parameters")
        (c.blocks.setdefault(block, {}) if block else c.params)[param] = value
    r.validate()
    return r


def plan(recipe: Any, texts: Sequence[str]) -> list[tuple[Point, Any]]:
    """(point, recipe) for every point of `--vary` TEXTS, each recipe checked before anything runs."""
    pts = points(parse_vary(texts))
    return [(p, apply(recipe, p)) for p in pts]


__all__ = ["Axis", "Point", "parse_vary", "points", "point_name", "label_value", "apply", "plan"]
