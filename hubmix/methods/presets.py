"""Block lists as A1111 and supermerger users write them: comma lists of per-block values or named presets.

A list holds one value per block in the A1111/supermerger order: BASE, IN00.., M00, OUT00.. (26 values for SD1.x
and SD2.x, 20 for SDXL). The presets are supermerger's published ones (block_presets.yaml, 26 values); for SDXL
they keep the values of the blocks SDXL has, as supermerger does. Parsing needs no torch and no family; the count
is checked against the inputs' family when the list is expanded (hubmix.recipe.blocks).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

from hubmix.errors import RecipeError

SD_LABELS = tuple(["BASE"] + [f"IN{i:02d}" for i in range(12)] + ["M00"] + [f"OUT{i:02d}" for i in range(12)])
COUNTS = {26: "SD1.x/SD2.x: BASE, IN00..IN11, M00, OUT00..OUT11", 20: "SDXL: BASE, IN00..IN08, M00, OUT00..OUT08"}


@cache
def presets() -> dict[str, tuple[float, ...]]:
    """supermerger's named presets, 26 values each (SD1.x order)."""
    import yaml

    raw = yaml.safe_load((Path(__file__).parent / "block_presets.yaml").read_text())
    return {name: tuple(float(v) for v in values) for name, values in raw.items()}


def for_labels(values: tuple[float, ...], labels: tuple[str, ...]) -> tuple[float, ...]:
    """A 26-value (SD1.x order) list restricted to `labels` (supermerger's conversion of presets to SDXL)."""
    by_label = dict(zip(SD_LABELS, values))
    return tuple(by_label[label] for label in labels)


def parse_block_list(value: Any, where: str) -> list[float] | str | dict[str, float]:
    """A block list as given (`"0.5,0,...,1"`, a YAML list of numbers, or a preset name) -> list of numbers or
    the preset's name; checks the numbers, the count (26 or 20) and the preset name. The LABEL=VALUE form
    (`"IN=1,D*=0.4,*=0.5"` or a mapping) -> {pattern: value} (methods/label_rules.py)."""
    from hubmix.methods.label_rules import is_label_form, parse_label_rules

    if is_label_form(value):
        return parse_label_rules(value, where)
    if isinstance(value, str) and "," not in value:
        name = value.strip()
        if name.upper() not in {p.upper() for p in presets()}:
            raise RecipeError(f"{where}: {value!r} is neither a comma list of 26 or 20 numbers, LABEL=VALUE pairs, "
                              f"nor a preset "
                              f"(presets: {', '.join(presets())}; `hubmix methods --presets` lists their values)")
        return next(p for p in presets() if p.upper() == name.upper())
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise RecipeError(f"{where}: expected a comma list of numbers or a preset name, got {value!r}")
    out = []
    for i, item in enumerate(items):
        try:
            v = float(item.strip() if isinstance(item, str) else item)
        except (TypeError, ValueError):
            raise RecipeError(f"{where}: value {i + 1} ({item!r}) is not a number") from None
        if v != v:
            raise RecipeError(f"{where}: value {i + 1} is NaN")
        out.append(v)
    if len(out) not in COUNTS:
        raise RecipeError(f"{where}: {len(out)} values; a block list has 26 ({COUNTS[26]}) or 20 ({COUNTS[20]})")
    return out


def resolve_block_list(value: list[float] | str, labels: tuple[str, ...], family: str, where: str) -> dict[str, float]:
    """A parsed list or preset name -> {label: value} for a family whose block list is `labels`."""
    if isinstance(value, str):
        return dict(zip(labels, for_labels(presets()[value], labels)))
    if len(value) != len(labels):
        raise RecipeError(f"{where}: {len(value)} values ({COUNTS.get(len(value), '?')}), but these {family} models "
                          f"take {len(labels)} ({labels[0]}, {labels[1]}..{labels[-1]})")
    return dict(zip(labels, value))
