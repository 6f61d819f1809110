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

import dataclasses

from pathlib import Path
from typing import Any

from hubmix.errors import RecipeError
from hubmix.engine.plan import plan_merge
from hubmix.formats.model import check_same_family
from hubmix.flow.merging import merge, merge_in_memory, open_inputs, resolve_local
from hubmix.recipe import Recipe
from hubmix.recipe.vary import apply as apply_point, parse_vary, points as vary_points
from hubmix.render.samples import open_subjects, render_grid_of, resolve_for_render, write_index
from hubmix.render.spec import RenderSpec


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
    from hubmix.engine.target import atomic_target, check_target
    from hubmix.engine.pipeline import Settings

    spec.check()
    if not vary:
        raise RecipeError("--vary: give at least one NAME=V1,V2,... (e.g. --vary alpha=0.9,1.0,1.1)")
    axes = parse_vary(vary)
    points = vary_points(axes)  # the grammar `merge --vary --remote` shares (hubmix.recipe.vary)
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
        subject.model.prediction = dataclasses.replace(subject.model.prediction, type=recipe.prediction_type)
    labels = [label(p) for p in points]
    reports = []

    def before(i: int, renderer: Any) -> None:
        targets = {c: renderer.targets(c) for c in renderer.modules}
        merge_in_memory(recipes[i], lambda c, k: targets[c](k), merged_only=i > 0, settings=settings,
                        resolver=resolver)

    with atomic_target(out, overwrite) as stage:
        tmp = stage.path
        tmp.mkdir()
        images = render_grid_of([subject] * len(points), spec, tmp, names=labels, before=before, reload=False,
                                extra=lambda i: {"point": i, "params": points[i]})
        for r in recipes:
            reports.append(merge(r, dry=True, settings=Settings(quiet=True), resolver=resolver).report or {})
        data = {"method": recipe.method, "models": [str(m) if not isinstance(m, dict) else m["ref"]
                                                    for m in recipe.models],
                "vary": {a.name: list(a.values) for a in axes},
                "points": [{"params": p, "label": labels[i], "recipe": recipes[i].to_dict(),
                            "images": [im.file for im in images if im.extra["point"] == i],
                            "shares": _shares(reports[i])} for i, p in enumerate(points)]}
        write_index(tmp, images, spec, labels=labels, extra=data, index_name="sweep.json")
    return out


__all__ = ["sweep"]
