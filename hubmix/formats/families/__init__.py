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
    label: str | None = None  # the block label of every key (supermerger's CLIP, T5), for components without blocks

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
    block_list: tuple[str, ...] = ()  # A1111/supermerger block list labels, in order (BASE, IN00.., M00, OUT00..)
    block_base: tuple[str, ...] = ()  # the components the list's BASE value applies to
    main: str = "unet"  # the denoiser: the one component a file may hold alone (a Flux transformer-only file)
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {when: rule on main's keys, ...}
    # components a single file may lack (SD3 files come with and without their text encoders and VAE); the merge
    # takes them from the inputs that have them, or from --config-from
    optional: tuple[str, ...] = ()
    # what an unmarked single file predicts, and which marker keys single files carry (formats/prediction.py)
    prediction: dict[str, Any] = field(default_factory=dict)
    gguf: dict[str, Any] = field(default_factory=dict)  # its GGUF files: architecture, reshape, keep (ComfyUI-GGUF)
    # the components an original single file holds (default: all); the others exist in diffusers folders only
    # (Qwen-Image, Wan, Flux.2: files hold the transformer alone, bare or under `model.diffusion_model.`)
    single_file: tuple[str, ...] = ()
    # single-file outputs with several of these components: one file each, named from --out with the suffix
    # (Wan 2.2 A14B: `transformer` -> `<out>_high_noise.safetensors`, `transformer_2` -> `<out>_low_noise...`)
    split_files: dict[str, str] = field(default_factory=dict)
    # pipeline classes of this family a diffusers input's model_index.json may name (Qwen-Image-Edit, FLUX.2 Klein):
    # an output keeps its input's; any other becomes `pipeline`
    pipelines: tuple[str, ...] = ()

    @property
    def single_file_components(self) -> tuple[str, ...]:
        return self.single_file or tuple(self.components)

    @property
    def gguf_architecture(self) -> str | None:
        return self.gguf.get("architecture")
    generic: bool = False  # the key-by-key "family" of unrecognised architectures (keys.yaml), never detected

    def variant_of(self, main_keys: Iterable[str]) -> str | None:
        """Which variant (Flux dev or schnell) a model is, by a rule over its main component's canonical keys."""
        keys = {k: 0 for k in main_keys}
        return next((name for name, v in self.variants.items() if _rule_holds(v["when"], keys)), None)

    @property
    def unmarked_prediction(self) -> str | None:
        return self.prediction.get("unmarked")

    @property
    def marker_keys(self) -> tuple[str, ...]:
        return tuple(self.prediction.get("markers") or ())

    def matches(self, layout: str, keys: dict[str, int]) -> bool:
        """Whether every detection rule for `layout` holds for `keys` (key -> ndim)."""
        rules = self.detect.get(layout.replace("-", "_"))
        if not rules:  # no file of this layout holds the whole family (transformer-only single files)
            return False
        return all(_rule_holds(rule, keys) for rule in rules)

    def component_of(self, original_key: str) -> str | None:
        """The component an original single-file key belongs to, by its prefix."""
        for name in self.single_file_components:
            spec = self.components.get(name)
            if spec is not None and original_key.startswith(spec.prefix):
                return name
        return None


def main_only_matches(family: Family, keys: dict[str, int]) -> bool:
    """Whether `keys` (without any prefix) are the family's main component alone (`detect.main_only` rules)."""
    rules = family.detect.get("main_only")
    return bool(rules) and all(_rule_holds(rule, keys) for rule in rules)


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
        name: ComponentSpec(name=name, library=c["library"], cls=c["class"], layout=c["layout"], prefix=c.get("prefix", ""),
                            dropped=dict(c.get("dropped") or {}), label=c.get("label"))
        for name, c in raw["components"].items()
    }
    return Family(id=raw["id"], name=raw["name"], pipeline=raw["pipeline"], inpaint_pipeline=raw["inpaint_pipeline"],
                  tags=tuple(raw["tags"]), modelspec_architecture=raw["modelspec_architecture"],
                  default_config_repo=raw["default_config_repo"], components=comps, detect=raw["detect"],
                  defaults=raw.get("defaults") or {}, pipeline_extra=raw.get("pipeline_extra") or {},
                  tokenizers=raw.get("tokenizers") or {}, main=raw.get("main") or next(iter(comps)),
                  variants=raw.get("variants") or {}, prediction=raw.get("prediction") or {},
                  optional=tuple(raw.get("optional") or ()), single_file=tuple(raw.get("single_file") or ()),
                  split_files=dict(raw.get("split_files") or {}), pipelines=tuple(raw.get("pipelines") or ()),
                  gguf=raw.get("gguf") or {},
                  generic=bool(raw.get("generic")),
                  **_block_list(raw.get("block_list")))


def _block_list(raw: dict[str, Any] | None) -> dict[str, tuple[str, ...]]:
    if not raw:
        return {}
    labels = (["BASE"] + [f"IN{i:02d}" for i in range(raw["inputs"])] + ["M00"]
              + [f"OUT{i:02d}" for i in range(raw["outputs"])])
    return {"block_list": tuple(labels), "block_base": tuple(raw["base"])}


@cache
def _all_families() -> dict[str, Family]:
    found = {}
    for path in sorted(HERE.glob("*.yaml")):
        if path.name == "layouts.yaml":
            continue
        fam = _load_family(path)
        found[fam.id] = fam
    return found


def families() -> dict[str, Family]:
    """The families detection tries (the generic key-by-key one is not among them)."""
    return {k: f for k, f in _all_families().items() if not f.generic}


def generic_family() -> Family:
    """The key-by-key "family" of architectures hubmix does not know (keys.yaml)."""
    return next(f for f in _all_families().values() if f.generic)


def family_names(short: bool = True) -> list[str]:
    """Every family's name, in file order, from the `name:` line of its YAML file alone (`hubmix --help` shows them
    and must stay cheap); `short` writes "Stable Diffusion XL" as "SDXL"."""
    names = []
    for path in sorted(HERE.glob("*.yaml")):
        if path.name == "layouts.yaml":
            continue
        lines = path.read_text().splitlines()
        if "generic: true" in lines:  # the key-by-key "family" is no family a user names
            continue
        line = next((ln for ln in lines if ln.startswith("name:")), None)
        if line is not None:
            name = str(yaml.safe_load(line)["name"])
            names.append(name.replace("Stable Diffusion ", "SD") if short else name)
    return names


@cache
def layouts() -> dict[str, dict[str, Any]]:
    return _data(HERE / "layouts.yaml")


def get_family(family_id: str) -> Family:
    try:
        return _all_families()[family_id]
    except KeyError:
        raise FamilyError(f"unknown model family {family_id!r} (known: {', '.join(families())})") from None


def detect_family(layout: str, keys: dict[str, int], where: str) -> Family:
    """The one family whose rules match `keys` (name -> ndim) in `layout`, or an error that says why none did."""
    hits = [f for f in families().values() if f.matches(layout, keys)]
    if len(hits) == 1:
        return hits[0]
    if not hits and layout == "single-file":
        only = detect_main_only(keys)
        if only is not None:
            return only[0]
    if not hits:
        sample = ", ".join(sorted(keys)[:4])
        raise FamilyError(
            f"{where}: not a model hubmix knows ({layout} layout): its keys match no family's signature "
            f"({', '.join(families())}); first keys: {sample or 'none'}"
        )
    raise FamilyError(f"{where}: keys match several families: {', '.join(f.id for f in hits)}")


def gguf_family(architecture: str | None, where: str) -> Family:
    """The family whose GGUF files name `architecture` (ComfyUI-GGUF's general.architecture)."""
    for fam in families().values():
        if fam.gguf_architecture is not None and fam.gguf_architecture == architecture:
            return fam
    known = ", ".join(sorted(f.gguf_architecture for f in families().values() if f.gguf_architecture))
    raise FamilyError(f"{where}: a GGUF file of architecture {architecture!r}, which no hubmix family reads "
                      f"(known: {known})")


def detect_main_only(keys: dict[str, int]) -> tuple[Family, str] | None:
    """(family, prefix) when `keys` are one family's main component alone: bare (BFL's transformer-only files) or
    under the component's usual prefix (`model.diffusion_model.` only)."""
    for fam in families().values():
        prefix = fam.components[fam.main].prefix
        for p in ("", prefix):
            if p and not all(k.startswith(p) for k in keys):
                continue
            rel = {k[len(p):]: n for k, n in keys.items()}
            if main_only_matches(fam, rel):
                return fam, p
    return None


def component_labels() -> list[str]:
    """Labels a recipe may use for a component (supermerger's CLIP, T5), resolved per family by `for_family`."""
    return sorted({spec.label for fam in families().values() for spec in fam.components.values() if spec.label})


def all_component_names() -> Iterable[str]:
    seen: dict[str, None] = {}
    for fam in _all_families().values():
        for name in fam.components:
            seen.setdefault(name)
    return list(seen)
