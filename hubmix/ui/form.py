"""The form's data, without Gradio: models as one reference per line (and what each one is), the method registry's
parameters as slider specs, and the form <-> recipe YAML round trip. The recipe YAML is the contract between the
form and every action (hubmix.ui.actions), exactly as `hubmix merge --recipe FILE` reads it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

from hubmix.errors import HubmixError, RecipeError
from hubmix.methods import methods
from hubmix.recipe import DTYPES, LAYOUTS, Recipe

DEFAULT_METHOD = "weighted_sum"


def component_names() -> tuple[str, ...]:
    """Every component any family has (unet, text encoders, vae, transformer, ...): the form's checkboxes."""
    from hubmix.formats.families import all_component_names

    return tuple(all_component_names())


@dataclass(frozen=True)
class Slider:
    """One parameter name across the registry (one widget in the page), shown for the methods that have it."""
    name: str
    default: Any
    minimum: float
    maximum: float
    step: float
    integer: bool
    choices: tuple[str, ...] | None
    help: str
    methods: tuple[str, ...]


def _slider(p: Any, helps: str, names: tuple[str, ...]) -> Slider:
    if p.integer:
        lo, hi = (p.min if p.min is not None else 0), (p.max if p.max is not None else max(100, 2 * p.default))
    elif p.choices:
        lo, hi = 0.0, 1.0
    else:  # an unbounded side gets a usable span around the default
        lo = p.min if p.min is not None else min(0.0, float(p.default)) - 1.0
        hi = p.max if p.max is not None else max(2.0, 2 * float(p.default))
    return Slider(p.name, p.default, float(lo), float(hi), 1.0 if p.integer else 0.01, p.integer, p.choices, helps,
                  names)


def sliders(method: str | None = None) -> list[Slider]:
    """One slider per parameter name across the registry (the page's widgets), in registry order; with `method`,
    each name that method has takes its default, range and help (a name's range differs between methods:
    weighted_sum's alpha is [0, 1], add_difference's is open)."""
    by_name: dict[str, list] = {}
    for m in methods().values():
        for p in m.params:
            by_name.setdefault(p.name, []).append((m, p))
    out = []
    for name, entries in by_name.items():
        names = tuple(m.name for m, _ in entries)
        own = [(m, p) for m, p in entries if m.name == method]
        m, p = (own or entries)[0]
        helps = f"{p.help} {p.range_text}".strip() if own else "; ".join(
            f"{m.name}: {q.help}" for m, q in entries)
        out.append(_slider(p, helps, names))
    return out


def method_info(name: str) -> str:
    """A method's help in markdown: what it does, its formula, model count and reference."""
    m = methods().get(name)
    if m is None:
        return ""
    return (f"**{m.name}** ({m.models_text} models): {m.summary}  \n`{m.formula}`  \n"
            f"[reference]({m.reference})")


def parse_models(text: str | None) -> list[str]:
    """One reference per line; blank lines and `#` comments are skipped."""
    return [line.strip() for line in (text or "").splitlines() if line.strip() and not line.strip().startswith("#")]


def first_family(rows: list[list[str]]) -> str | None:
    """The family id of the first model that could be read (rows of describe_models), for block sliders."""
    for row in rows:
        if row[1].endswith(")") and "(" in row[1] and not row[1].startswith("error"):
            return row[1].rsplit("(", 1)[1][:-1]
    return None


def describe_models(text: str | None) -> list[list[str]]:
    """[reference, family, layout, components] for each model, as hubmix's own inspection sees it; a reference that
    cannot be read shows its one-line error instead (nothing else stops)."""
    from hubmix.flow.inspection import inspect_model
    from hubmix.flow.merging import resolve_local

    rows = []
    for ref in parse_models(text):
        try:
            path, _ = resolve_local(ref, Recipe(models=[ref], method=DEFAULT_METHOD))
            info = inspect_model(path)
            rows.append([ref, f"{info['family_name']} ({info['family']})", info["layout"],
                         ", ".join(info["components"])])
        except HubmixError as e:
            rows.append([ref, f"error: {e}", "", ""])
    return rows


def block_labels(family: str | None) -> tuple[str, ...]:
    """The A1111/supermerger block labels of a family (BASE, IN00.., M00, OUT00..); () when it has none."""
    if not family:
        return ()
    from hubmix.formats.families import get_family

    try:
        return tuple(get_family(family).block_list)
    except (HubmixError, KeyError):
        return ()


def block_values(family: str | None, preset: str | None = None, alpha: float = 0.5) -> list[tuple[str, float]]:
    """(label, value) per block of `family`: a preset's values (restricted to the family's blocks, as supermerger
    converts them for SDXL), else `alpha` everywhere; [] for a family without A1111 blocks."""
    labels = block_labels(family)
    if not labels:
        return []
    if preset:
        from hubmix.methods.presets import for_labels, presets

        return list(zip(labels, for_labels(presets()[preset], labels)))
    return [(label, float(alpha)) for label in labels]


def block_list_text(values: list[float]) -> str:
    """Slider values -> the --block-alpha list."""
    return ",".join(f"{v:.10g}" for v in values)


def preset_names() -> list[str]:
    from hubmix.methods.presets import presets

    return list(presets())


def build_recipe(models_text: str | None, method: str, params: dict[str, Any] | None = None, *,
                 components: list[str] | None = None, dtype: str | None = None, layout: str | None = None,
                 block_alpha: str | None = None, loras_text: str | None = None) -> Recipe:
    """The form -> a validated Recipe: only the parameters `method` has (the others' sliders are hidden), the
    components not ticked copied from model a, LoRAs as `REF[:STRENGTH]` lines."""
    models = parse_models(models_text)
    if not models:
        raise RecipeError("models: give at least one reference, one per line")
    m = methods().get(method)
    if m is None:
        raise RecipeError(f"method: unknown {method!r} (known: {', '.join(sorted(methods()))})")
    own = m.applicable(len(models))
    kept = {k: v for k, v in (params or {}).items() if k in own and v is not None}
    for k, v in list(kept.items()):
        p = own[k]
        if p.integer:
            kept[k] = int(v)
        elif not p.choices:
            kept[k] = float(v)
        if kept[k] == p.default:  # the canonical form fills defaults in; the YAML stays short
            del kept[k]
    from hubmix.recipe import ComponentRecipe

    comps = {}
    if components is not None:
        comps = {c: ComponentRecipe(from_="a") for c in component_names() if c not in components}
    loras = []
    if loras_text and loras_text.strip():
        from hubmix.formats.lora import parse_lora_option

        loras = [parse_lora_option(x) for x in parse_models(loras_text)]
    r = Recipe(models=models, method=method, params=kept, components=comps, dtype=dtype or None,
               layout=layout or None, block_lists={"alpha": block_alpha.strip()} if block_alpha and
               block_alpha.strip() else {}, loras=loras, source="form")
    r.validate()
    return r


def recipe_from_yaml(text: str, source: str = "recipe") -> Recipe:
    """The recipe YAML (as `hubmix merge --recipe` reads it) -> a validated Recipe; one-line RecipeError."""
    try:
        raw = yaml.safe_load(text or "")
    except yaml.YAMLError as e:
        raise RecipeError(f"{source}: not valid YAML ({str(e).splitlines()[0]})") from None
    return Recipe.from_dict(raw, source=source)


def form_values(recipe: Recipe) -> dict[str, Any]:
    """A recipe -> what the form shows (the inverse of build_recipe, for an uploaded recipe)."""
    from hubmix.recipe import model_entry

    copied = {k for k, c in recipe.components.items() if c.from_ == "a"}
    loras = []
    for x in recipe.loras:
        x = dict(x)
        ref = x.get("ref") or x.get("path") or ""
        loras.append(f"{ref}:{x['strength']:g}" if x.get("strength", 1) != 1 else str(ref))
    block = recipe.block_lists.get("alpha")
    return {"models": "\n".join(model_entry(m)["ref"] for m in recipe.models), "method": recipe.method,
            "params": dict(recipe.params), "components": [c for c in component_names() if c not in copied],
            "dtype": recipe.dtype or "", "layout": recipe.layout or "",
            "block_alpha": block if isinstance(block, str) or block is None else block_list_text(block),
            "loras": "\n".join(loras)}


CHOICES = {"dtype": ("",) + DTYPES, "layout": ("",) + LAYOUTS}

__all__ = ["Slider", "sliders", "method_info", "parse_models", "describe_models", "block_labels", "block_values", "block_list_text", "first_family", "preset_names",
           "build_recipe", "recipe_from_yaml", "form_values", "CHOICES", "component_names"]
