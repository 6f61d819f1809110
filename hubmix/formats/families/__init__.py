"""Model families as data: one YAML file per family (components, detection rules, defaults) plus layouts.yaml.

Adding a family (SD3, Flux, the SDXL refiner) means adding a YAML file here, and at most a structure walker or a
shape transform in hubmix/layouts.py; the engine never names a family.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Iterable

import yaml

from hubmix.errors import FamilyError

HERE = Path(__file__).parent


@dataclass(frozen=True)
class ComponentSpec:
    name: str
    library: str  # "diffusers" or "transformers"
    cls: str
    layout: str  # a key of layouts.yaml
    prefix: str  # the component's prefix in the original single-file layout
    dropped: dict[str, str] = field(default_factory=dict)  # original-only keys this family does not keep

    @property
    def weight_name(self) -> str:
        return weight_stem(self.library)


def weight_stem(library: str) -> str:
    """File stem of a component's weights in a diffusers folder, by the library that saves it."""
    return "model" if library == "transformers" else "diffusion_pytorch_model"


@dataclass(frozen=True)
class Family:
    id: str
    name: str
    pipeline: str
    inpaint_pipeline: str
    tags: tuple[str, ...]
    modelspec_architecture: str
    default_config_repo: str
    components: dict[str, ComponentSpec]
    detect: dict[str, list[dict[str, Any]]]
    defaults: dict[str, dict[str, Any]]
    pipeline_extra: dict[str, Any]
    tokenizers: dict[str, str]

    def matches(self, layout: str, keys: dict[str, int]) -> bool:
        """Whether every detection rule for `layout` holds for `keys` (key -> ndim)."""
        rules = self.detect.get(layout.replace("-", "_"))
        if not rules:
            raise ValueError(f"family {self.id} has no detection rules for the {layout} layout")
        return all(_rule_holds(rule, keys) for rule in rules)

    def component_of(self, original_key: str) -> str | None:
        """The component an original single-file key belongs to, by its prefix."""
        for name, spec in self.components.items():
            if original_key.startswith(spec.prefix):
                return name
        return None


def _rule_holds(rule: dict[str, Any], keys: dict[str, int]) -> bool:
    if "present" in rule:
        return any(fnmatch.fnmatchcase(k, rule["present"]) for k in keys)
    if "absent" in rule:
        return not any(fnmatch.fnmatchcase(k, rule["absent"]) for k in keys)
    if "glob" in rule:
        dims = [n for k, n in keys.items() if fnmatch.fnmatchcase(k, rule["glob"])]
        return bool(dims) and all(n == rule["ndim"] for n in dims)
    raise ValueError(f"unknown detection rule {rule}")


def _data(path: Path) -> Any:
    """A data file of the package, parsed with libyaml where PyYAML has it (10x faster: `inspect` answers sooner)."""
    return yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def _load_family(path: Path) -> Family:
    raw = _data(path)
    comps = {
        name: ComponentSpec(name=name, library=c["library"], cls=c["class"], layout=c["layout"], prefix=c["prefix"],
                            dropped=dict(c.get("dropped") or {}))
        for name, c in raw["components"].items()
    }
    return Family(id=raw["id"], name=raw["name"], pipeline=raw["pipeline"], inpaint_pipeline=raw["inpaint_pipeline"],
                  tags=tuple(raw["tags"]), modelspec_architecture=raw["modelspec_architecture"],
                  default_config_repo=raw["default_config_repo"], components=comps, detect=raw["detect"],
                  defaults=raw.get("defaults") or {}, pipeline_extra=raw.get("pipeline_extra") or {},
                  tokenizers=raw.get("tokenizers") or {})


@cache
def families() -> dict[str, Family]:
    found = {}
    for path in sorted(HERE.glob("*.yaml")):
        if path.name == "layouts.yaml":
            continue
        fam = _load_family(path)
        found[fam.id] = fam
    return found


@cache
def layouts() -> dict[str, dict[str, Any]]:
    return _data(HERE / "layouts.yaml")


def get_family(family_id: str) -> Family:
    try:
        return families()[family_id]
    except KeyError:
        raise FamilyError(f"unknown model family {family_id!r} (known: {', '.join(families())})") from None


def detect_family(layout: str, keys: dict[str, int], where: str) -> Family:
    """The one family whose rules match `keys` (name -> ndim) in `layout`, or an error that says why none did."""
    hits = [f for f in families().values() if f.matches(layout, keys)]
    if len(hits) == 1:
        return hits[0]
    if not hits:
        sample = ", ".join(sorted(keys)[:4])
        raise FamilyError(
            f"{where}: not a model hubmix knows ({layout} layout): its keys match no family's signature "
            f"({', '.join(families())}); first keys: {sample or 'none'}"
        )
    raise FamilyError(f"{where}: keys match several families: {', '.join(f.id for f in hits)}")


def all_component_names() -> Iterable[str]:
    seen: dict[str, None] = {}
    for fam in families().values():
        for name in fam.components:
            seen.setdefault(name)
    return list(seen)
