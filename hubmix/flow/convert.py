"""`convert`: change a model's layout (diffusers <-> single file) or dtype, through the same engine as a merge."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hubmix.formats.families import all_component_names
from hubmix.flow.merging import MergeResult, merge
from hubmix.recipe import ComponentRecipe, Recipe


def convert(src: str | Path, out: str | Path, *, to: str = "diffusers", dtype: str | None = None,
            config_from: str | None = None, ema: bool = False, variant: str | None = None,
            prediction_type: str | None = None, overwrite: bool = False, quiet: bool = False,
            **kw: Any) -> MergeResult:
    """Write `src` in layout `to` ("diffusers", "single-file" or "both"); every tensor is copied, none merged."""
    recipe = Recipe(models=[str(src)], method="copy", components={c: ComponentRecipe(from_="a")
                                                                  for c in all_component_names()},
                    dtype=dtype, layout=to, variant=variant, ema=ema, config_from=config_from,
                    prediction_type=prediction_type, source="convert")
    recipe.validate()
    return merge(recipe, out=out, overwrite=overwrite, quiet=quiet, **kw)
