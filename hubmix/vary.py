"""Parameter sweeps: `--vary NAME=v1,v2,...` (repeatable) parsed into points, one recipe per point, and the names
a point goes by (a branch `alpha-0.3`, a Job label `alpha-0_3`). Shared by `merge --vary ... --remote` and the
sweep command; nothing here runs a merge."""

from __future__ import annotations

import dataclasses
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
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
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
    """The branch a point's result goes to: `alpha-0.3`, `alpha-0.3_beta-0.1` (valid git and Hub branch names)."""
    return "_".join(f"{k.replace('_', '-')}-{_value(v)}" for k, v in point.items())


def label_value(text: str) -> str:
    """`text` as a Job label value: the Hub allows letters, digits, '-' and '_' (1 to 100 of them)."""
    out = re.sub(r"[^A-Za-z0-9_-]", "_", text.replace("/", "--"))[:100]
    return out or "_"


def apply(recipe: Any, point: Point) -> Any:
    """The recipe of one point: its global parameters updated, checked like any recipe (an unknown parameter or a
    value out of range is a RecipeError naming the point)."""
    clash = sorted(set(point) & set(recipe.params))
    if clash:
        raise RecipeError(f"--vary {clash[0]}: the parameter is also given alone; drop --{clash[0].replace('_', '-')}")
    out = dataclasses.replace(recipe, params={**recipe.params, **point},
                              source=f"{recipe.source} at {point_name(point)}")
    out.validate()
    return out


def plan(recipe: Any, texts: Sequence[str]) -> list[tuple[Point, Any]]:
    """(point, recipe) for every point of `--vary` TEXTS, each recipe checked before anything runs."""
    pts = points(parse_vary(texts))
    return [(p, apply(recipe, p)) for p in pts]


__all__ = ["Axis", "Point", "parse_vary", "points", "point_name", "label_value", "apply", "plan"]
