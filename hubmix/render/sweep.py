"""`hubmix sweep`: merge at every point of a parameter grid and render each, without writing any merged model.

One pipeline is loaded (model a's structure, which every merge output follows); for each point the merge engine
writes the merged tensors straight into the pipeline's own parameters (`merging.merge_in_memory`), converted from
the merge's output dtype exactly as loading the merged files would, so a point renders the same pixels as
`hubmix merge` followed by `hubmix samples`. Memory: one pipeline, whatever the number of points; disk: the images.

`--vary NAME=V1,V2,...` names a parameter as a recipe does: `alpha` (the method's, every component), `OUT00.beta`
(a UNet block's), `text_encoder.alpha` (one component's), `unet.IN04.alpha` (a component's block). Several `--vary`
make a grid: every combination, in order, the last one varying fastest.
"""

from __future__ import annotations

import copy
import itertools
from pathlib import Path
from typing import Any

from hubmix.errors import RecipeError
from hubmix.formats.families import all_component_names
from hubmix.engine.plan import plan_merge
from hubmix.formats.model import check_same_family
from hubmix.merging import merge, merge_in_memory, open_inputs, resolve_local
from hubmix.recipe import ComponentRecipe, Recipe
from hubmix.render.samples import open_subjects, render_grid_of, resolve_for_render, write_index
from hubmix.render.spec import RenderSpec


def parse_vary(items: list[str] | tuple[str, ...]) -> list[tuple[str, list[float]]]:
    """`alpha=0.9,1.0` -> [("alpha", [0.9, 1.0])]; one line naming a malformed item."""
    if not items:
        raise RecipeError("--vary: give at least one NAME=V1,V2,... (e.g. --vary alpha=0.9,1.0,1.1)")
    axes = []
    for item in items:
        name, sep, values = str(item).partition("=")
        try:
            vals = [float(v) for v in values.split(",") if v.strip()]
        except ValueError:
            vals = []
        if not sep or not name.strip() or not vals:
            raise RecipeError(f"--vary {item}: expected NAME=V1,V2,... with numbers, e.g. alpha=0.9,1.0,1.1")
        if name.strip() in (a for a, _ in axes):
            raise RecipeError(f"--vary {name.strip()}: given twice")
        axes.append((name.strip(), vals))
    return axes


def _split(name: str) -> tuple[str | None, str | None, str]:
    """`alpha`, `OUT00.beta`, `text_encoder.alpha`, `unet.OUT00.beta` -> (component, block, parameter)."""
    parts = name.split(".")
    comp = parts.pop(0) if len(parts) > 1 and parts[0] in all_component_names() else None
    block = parts.pop(0).upper() if len(parts) > 1 else None
    if len(parts) != 1 or not parts[0]:
        raise RecipeError(f"--vary {name}: expected PARAM, BLOCK.PARAM, COMPONENT.PARAM or COMPONENT.BLOCK.PARAM")
    return (comp or ("unet" if block else None)), block, parts[0]


def apply_point(recipe: Recipe, point: dict[str, float]) -> Recipe:
    """The recipe of one sweep point, validated: an unknown parameter or component fails here, in one line."""
    r = copy.deepcopy(recipe)
    r.source = "--vary " + ", ".join(point)
    for name, value in point.items():
        comp, block, param = _split(name)
        if comp is None:
            r.params[param] = value
            continue
        c = r.components.setdefault(comp, ComponentRecipe())
        if c.from_ is not None:
            raise RecipeError(f"--vary {name}: {comp} is copied unchanged from {c.from_}, it has no parameters")
        if block:
            c.blocks.setdefault(block, {})[param] = value
        else:
            c.params[param] = value
    r.validate()
    return r


def _shares(report: dict[str, Any]) -> dict[str, Any]:
    """A dry-run report's selection shares: {component: {"all" or block: {candidate: share}}}."""
    out: dict[str, Any] = {}
    for comp, data in report.items():
        rows = {"all": data["total"], **data["blocks"]}
        shares = {k: row["share"] for k, row in rows.items() if row.get("share")}
        if shares:
            out[comp] = shares
    return out


def label(point: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in point.items())


def sweep(recipe: Recipe, vary: list[str], spec: RenderSpec, out: str | Path, *, overwrite: bool = False,
          settings: Any = None, resolver: Any = resolve_local) -> Path:
    """Render every point of the `vary` grid into `out`: grid.png, one PNG per image and sweep.json."""
    from hubmix.engine.output import atomic_target, check_target
    from hubmix.engine.pipeline import Settings

    spec.check()
    axes = parse_vary(vary)
    points = [dict(zip((a for a, _ in axes), vals)) for vals in itertools.product(*(v for _, v in axes))]
    recipes = [apply_point(recipe, p) for p in points]
    out = Path(out)
    check_target(out, overwrite)
    models, _ = open_inputs(recipes[0], resolver)
    family = check_same_family(models)
    for r in recipes:  # unknown blocks and the like: before anything is loaded or rendered
        plan_merge(models, r, family)
    settings = settings or Settings(quiet=True)
    a = recipes[0].models[0]
    subject = open_subjects([("a", resolve_for_render(a))], recipe.config_from)[0]
    if recipe.prediction_type:
        subject.model.prediction_type = recipe.prediction_type
    labels = [label(p) for p in points]
    reports = []

    def before(i: int, renderer: Any) -> None:
        targets = {c: renderer.targets(c) for c in renderer.modules}
        merge_in_memory(recipes[i], lambda c, k: targets[c](k), merged_only=i > 0, settings=settings,
                        resolver=resolver)

    with atomic_target(out, overwrite) as tmp:
        tmp.mkdir()
        images = render_grid_of([subject] * len(points), spec, tmp, names=labels, before=before, reload=False,
                                extra=lambda i: {"point": i, "params": points[i]})
        for r in recipes:
            reports.append(merge(r, dry=True, settings=Settings(quiet=True), resolver=resolver).report or {})
        data = {"method": recipe.method, "models": [str(m) if not isinstance(m, dict) else m["ref"]
                                                    for m in recipe.models],
                "vary": {name: vals for name, vals in axes},
                "points": [{"params": p, "label": labels[i], "recipe": recipes[i].to_dict(),
                            "images": [im.file for im in images if im.extra["point"] == i],
                            "shares": _shares(reports[i])} for i, p in enumerate(points)]}
        write_index(tmp, images, spec, labels=labels, extra=data, index_name="sweep.json")
    return out


__all__ = ["sweep", "parse_vary", "apply_point"]
