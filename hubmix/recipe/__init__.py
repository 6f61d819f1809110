"""Recipes: what to merge and how, from YAML or CLI arguments, validated, with a canonical form and its hash.

A recipe names its inputs in order (model a, b, c, ...), a method with parameters, and optional per-component
settings: another method or parameters, a subset of the models, a plain copy from one model (`from: c`), or
per-block parameters for the UNet (`blocks: {IN00: {alpha: 0.2}}`). The canonical form fills in every default
and every component, reduces local paths to file names and sha256, and pins Hub inputs to commits: it is what the
output's metadata, recipe.yaml and model card record, and what `hubmix reproduce` replays.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hubmix import __version__
from hubmix.errors import RecipeError
from hubmix.formats.quant import QUANT_DTYPES
from hubmix.methods import get_method

RECIPE_VERSION = 1
DTYPES = ("fp16", "bf16", "fp32", "fp8_e4m3fn", "fp8_e5m2", *QUANT_DTYPES)  # quantized: formats.quant's codecs
LAYOUTS = ("diffusers", "single-file", "both")
LETTERS = string.ascii_lowercase
BLOCK_LIST_PARAMS = ("alpha", "beta")  # parameters that take a block list (block_alpha:, --block-alpha)


def letter(i: int) -> str:
    return LETTERS[i]


def model_entry(model: Any) -> dict[str, Any]:
    """A recipe's model as a dict: a reference as given (`./a`, `org/a@v2`) or a canonical recipe's entry."""
    return model if isinstance(model, dict) else {"ref": str(model)}


@dataclass
class ComponentRecipe:
    method: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    models: list[str] | None = None  # letters of the models this component merges, in order
    from_: str | None = None  # copy the component unchanged from this model
    blocks: dict[str, dict[str, Any]] = field(default_factory=dict)  # UNet block label -> parameter overrides

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {}
        if self.from_ is not None:
            return {"from": self.from_}
        if self.method is not None:
            d["method"] = self.method
        if self.models is not None:
            d["models"] = list(self.models)
        if self.params:
            d["params"] = dict(self.params)
        if self.blocks:
            d["blocks"] = {k: dict(v) for k, v in self.blocks.items()}
        return d


@dataclass
class Recipe:
    models: list[Any]  # references as given (str), or dicts from a canonical recipe
    method: str
    params: dict[str, Any] = field(default_factory=dict)
    components: dict[str, ComponentRecipe] = field(default_factory=dict)
    dtype: str | None = None  # None: each tensor keeps model a's dtype
    layout: str | None = None  # None: from the output path (.safetensors -> single-file, else diffusers)
    variant: str | None = None  # input variant to read, and output variant name
    ema: bool = False
    config_from: str | None = None
    prediction_type: str | None = None
    output: str | None = None
    family: str | None = None  # when set (canonical recipes), the inputs must be of this family
    source: str = "arguments"  # where the recipe came from, for messages
    # A1111/supermerger block lists by parameter name ({"alpha": "GRAD_V" or [26 numbers]}); merging expands them
    # into per-component and per-block parameters once the family is known (hubmix.recipe.blocks)
    block_lists: dict[str, Any] = field(default_factory=dict)
    loras: list[Any] = field(default_factory=list)  # LoRAs baked into the result (hubmix.loras.lora_entry)
    lora_skip_unknown: bool = False  # LoRA keys that match no tensor are listed instead of failing the merge

    # ---- construction -----------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: Any, source: str = "recipe") -> "Recipe":
        if not isinstance(raw, dict):
            raise RecipeError(f"{source}: a recipe is a mapping with at least 'models' and 'method'")
        known = {"models", "method", "params", "components", "dtype", "layout", "variant", "ema", "config_from",
                 "prediction_type", "output", "recipe_version", "family", "loras", "lora_skip_unknown",
                 *(f"block_{p}" for p in BLOCK_LIST_PARAMS)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise RecipeError(f"{source}: unknown field(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        if "models" not in raw or "method" not in raw:
            raise RecipeError(f"{source}: 'models' and 'method' are required")
        models = raw["models"]
        if not isinstance(models, list) or not models:
            raise RecipeError(f"{source}: 'models' must be a non-empty list")
        for key in ("params", "components"):
            if not isinstance(raw.get(key) or {}, dict):
                raise RecipeError(f"{source}: '{key}' must be a mapping, got {raw[key]!r}")
        for key in ("ema", "lora_skip_unknown"):
            if not isinstance(raw.get(key, False), bool):
                raise RecipeError(f"{source}: '{key}' must be true or false, got {raw[key]!r}")
        if not isinstance(raw.get("loras") or [], list):
            raise RecipeError(f"{source}: 'loras' must be a list of LoRA references")
        components = {}
        for name, c in (raw.get("components") or {}).items():
            components[name] = _component_from_dict(c, f"{source}: components.{name}")
        if raw.get("recipe_version", RECIPE_VERSION) != RECIPE_VERSION:
            raise RecipeError(f"{source}: recipe_version {raw['recipe_version']} is not supported (this hubmix "
                              f"reads version {RECIPE_VERSION})")
        r = cls(models=models, method=str(raw["method"]), family=raw.get("family"), params=dict(raw.get("params") or {}),
                components=components, dtype=raw.get("dtype"), layout=raw.get("layout"), variant=raw.get("variant"),
                ema=raw.get("ema", False), config_from=raw.get("config_from"),
                prediction_type=raw.get("prediction_type"), output=raw.get("output"), source=source,
                block_lists={p: raw[f"block_{p}"] for p in BLOCK_LIST_PARAMS if raw.get(f"block_{p}") is not None},
                loras=list(raw.get("loras") or []), lora_skip_unknown=raw.get("lora_skip_unknown", False))
        r.validate()
        return r

    @classmethod
    def load(cls, path: str | Path) -> "Recipe":
        p = Path(path)
        try:
            raw = yaml.safe_load(p.read_text())
        except OSError as e:
            raise RecipeError(f"{p}: cannot read recipe ({e.strerror})") from None
        except yaml.YAMLError as e:
            raise RecipeError(f"{p}: not valid YAML{_yaml_position(e)}") from None
        return cls.from_dict(raw, str(p))

    # ---- validation ---------------------------------------------------------------------------------------------
    def validate(self) -> None:
        src = self.source
        n = len(self.models)
        if n > len(LETTERS):
            raise RecipeError(f"{src}: at most {len(LETTERS)} models")
        for i, m in enumerate(self.models):
            if not isinstance(m, (str, dict)) or (isinstance(m, dict) and not (m.get("ref") or m.get("file"))):
                raise RecipeError(f"{src}: models[{i}] must be a path or repo id")
        method = get_method(self.method)
        method.check_models(n, src)
        method.resolve_params(self.params, n, src)
        if self.dtype is not None and self.dtype not in DTYPES:
            raise RecipeError(f"{src}: dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.layout is not None and self.layout not in LAYOUTS:
            raise RecipeError(f"{src}: layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        if self.prediction_type not in (None, "epsilon", "v_prediction"):
            raise RecipeError(f"{src}: prediction_type must be epsilon or v_prediction")
        letters = [letter(i) for i in range(n)]
        from hubmix.formats.families import all_component_names, component_labels
        from hubmix.methods.presets import parse_block_list

        for param, value in self.block_lists.items():
            self.block_lists[param] = parse_block_list(value, f"{src}: block_{param}")
            if param not in method.applicable(n):
                raise RecipeError(f"{src}: block_{param}: method {method.name} takes no parameter {param}")
        from hubmix.formats.lora import lora_entry

        self.loras = [lora_entry(x, f"{src}: loras[{i}]") for i, x in enumerate(self.loras)]
        for name, c in self.components.items():
            where = f"{src}: components.{name}"
            if name not in all_component_names() and name not in component_labels():
                raise RecipeError(f"{where}: unknown component (known: {', '.join(all_component_names())}, or "
                                  f"{', '.join(component_labels())} where the family has them)")
            if c.from_ is not None:
                if c.from_ not in letters:
                    raise RecipeError(f"{where}: from: {c.from_!r} is not one of the models ({', '.join(letters)})")
                continue
            sub = c.models or letters
            bad = [m for m in sub if m not in letters]
            if bad:
                raise RecipeError(f"{where}: models {bad} are not among {', '.join(letters)}")
            m = get_method(c.method or self.method)
            m.check_models(len(sub), where)
            base = c.params if c.method else {**self._global_params_for(m, len(sub)), **c.params}
            m.resolve_params(base, len(sub), where)
            for label, bp in c.blocks.items():
                if not isinstance(bp, dict):
                    raise RecipeError(f"{where}.blocks.{label}: expected a mapping of parameters")
                m.resolve_params({**base, **bp}, len(sub), f"{where}.blocks.{label}")

    def _global_params_for(self, method, n_models: int) -> dict[str, Any]:
        """The global parameters that a component's (same) method accepts with its number of models."""
        if method.name != get_method(self.method).name:
            return {}
        return {k: v for k, v in self.params.items() if k in method.applicable(n_models)}

    # ---- resolution -------------------------------------------------------------------------------------------
    def plan_for(self, component: str) -> dict[str, Any]:
        """Resolved settings of one component: {'from': letter} or {'method', 'models', 'params', 'blocks'}."""
        c = self.components.get(component, ComponentRecipe())
        if c.from_ is not None:
            return {"from": c.from_}
        letters = c.models or [letter(i) for i in range(len(self.models))]
        method = get_method(c.method or self.method)
        where = f"{self.source}: components.{component}"
        base = c.params if c.method else {**self._global_params_for(method, len(letters)), **c.params}
        params = method.resolve_params(base, len(letters), where)
        blocks = {label: method.resolve_params({**base, **bp}, len(letters), f"{where}.blocks.{label}")
                  for label, bp in sorted(c.blocks.items())}
        return {"method": method.name, "models": list(letters), "params": params, "blocks": blocks}

    def needs(self, i: int) -> set[str]:
        """The components model i takes part in (merged from it or copied from it): the only ones read from it."""
        from hubmix.formats.families import all_component_names

        me = letter(i)
        if set(self.components) - set(all_component_names()):  # a label (CLIP, T5): which part is known later
            return set(all_component_names())
        return {c for c in all_component_names()
                if (p := self.plan_for(c)).get("from") == me or me in p.get("models", ())}

    def for_family(self, family) -> "Recipe":
        """The recipe with component labels (Flux's CLIP, T5) replaced by the family's component names."""
        from hubmix.formats.families import all_component_names

        comps = {}
        for name, c in self.components.items():
            if name not in all_component_names():  # a label; another family's component names are ignored
                real = [n for n, spec in family.components.items() if spec.label == name]
                if len(real) != 1:
                    raise RecipeError(f"{self.source}: components.{name}: not a component of {family.name} "
                                      f"models (theirs: {', '.join(family.components)})")
                if real[0] in self.components:
                    raise RecipeError(f"{self.source}: components.{name} and components.{real[0]} name the same "
                                      "component")
                name = real[0]
            comps[name] = c
        return dataclasses.replace(self, components=comps)

    def global_params(self) -> dict[str, float]:
        """The top-level method's parameters with defaults filled in."""
        return get_method(self.method).resolve_params(self.params, len(self.models), self.source)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"models": list(self.models), "method": self.method}
        if self.params:
            d["params"] = dict(self.params)
        if self.components:
            d["components"] = {k: v.to_dict() for k, v in self.components.items()}
        for name in ("dtype", "layout", "variant", "config_from", "prediction_type", "output"):
            if getattr(self, name) is not None:
                d[name] = getattr(self, name)
        if self.ema:
            d["ema"] = True
        for param, value in self.block_lists.items():
            d[f"block_{param}"] = value
        if self.loras:
            d["loras"] = [dict(x) for x in self.loras]
        if self.lora_skip_unknown:
            d["lora_skip_unknown"] = True
        return d

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _yaml_position(e: Exception) -> str:
    """' at line L, column C: problem' from a PyYAML error (1-based, as editors count)."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{where}: {problem}"


def _component_from_dict(c: Any, where: str) -> ComponentRecipe:
    if c is None:
        return ComponentRecipe()
    if not isinstance(c, dict):
        raise RecipeError(f"{where}: expected a mapping (method, params, models, from, blocks)")
    known = {"method", "params", "models", "from", "blocks"}
    unknown = sorted(set(c) - known)
    # a bare parameter (alpha: 0.3) is accepted as shorthand for params: {alpha: 0.3}
    params = dict(c.get("params") or {})
    for k in unknown:
        params[k] = c[k]
    if "from" in c and (set(c) - {"from"}):
        raise RecipeError(f"{where}: 'from' copies a component unchanged and takes nothing else")
    models = c.get("models")
    if models is not None and (not isinstance(models, list) or not all(isinstance(m, str) for m in models)):
        raise RecipeError(f"{where}: models must be a list of model letters such as [a, c]")
    blocks = c.get("blocks") or {}
    if not isinstance(blocks, dict):
        raise RecipeError(f"{where}: blocks must map UNet block labels (IN00, M00, OUT11) to parameters")
    return ComponentRecipe(method=c.get("method"), params=params, models=models, from_=c.get("from"),
                           blocks={str(k).upper(): v for k, v in blocks.items()})


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def recipe_hash(canonical: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json(canonical).encode()).hexdigest()


def recipe_yaml(canonical: dict[str, Any]) -> str:
    head = (f"# Made by hubmix {__version__}. Canonical recipe (sha256 {recipe_hash(canonical)}):\n"
            "# every default filled in, local inputs by name and sha256, Hub inputs pinned to a commit.\n")
    return head + yaml.safe_dump(canonical, sort_keys=False, allow_unicode=True)
