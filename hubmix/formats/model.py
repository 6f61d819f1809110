"""Open a local model, in either layout, as components of canonically named, lazily read tensors.

A diffusers folder (model_index.json + component subfolders, sharded or not, variants) and an original single
file (.safetensors or .ckpt) both come out as the same thing: per component, a map from canonical (diffusers) key
to a `TensorRef` that knows where the bytes are and how to view them in canonical shape. Opening reads headers only.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Collection, Iterable

from hubmix.formats.configs import infer_component_configs
from hubmix.errors import FamilyError, InputError
from hubmix.formats.families import (ComponentSpec, Family, all_component_names, detect_family, detect_main_only,
                                     families, generic_family, get_family, gguf_family, weight_stem)
from hubmix.formats.generic import generic_allowed
from hubmix.formats.io.readers import PICKLE_SUFFIXES, TensorInfo, WeightFile, open_weight_file, read_regular
from hubmix.formats.quant import gguf_file  # noqa: F401 - registers the GGUF reader with open_weight_file
from hubmix.formats.io.span import Span
from hubmix.formats.layouts import COPYING, KeyMap, Placement, apply_to_canonical, part_rows, to_canonical_shape
from hubmix.formats.quant import wrap as quant_view
from hubmix.formats.prediction import MARKER_KEYS, Prediction, from_scheduler, from_single_file

if TYPE_CHECKING:
    import torch

CONFIG_META = "hubmix.configs"  # single files written by hubmix embed their component configs under this key


@dataclass(frozen=True)
class TensorRef(TensorInfo):
    """One canonical tensor of one input: a (part of a) tensor in a weight file, viewed in canonical shape."""

    file: WeightFile
    key: str
    place: Placement = Placement("")

    @property
    def quant(self) -> str | None:
        """The quant type of a quantized input tensor ("nf4", "fp8_scaled e4m3fn"), None for a plain one."""
        of = getattr(self.file, "quant_type", None)
        return of(self.key) if of is not None else None

    def load(self) -> torch.Tensor:
        """A zero-copy view (a copy only for transposed tensors) in canonical shape; a quantized tensor
        dequantized to float32 (a fused part's rows only)."""
        if self.quant is not None and self.place.transform not in COPYING:
            return self.load_flat(0, self.numel).reshape(self.shape)
        t = self.file.tensor(self.key)
        if self.place.part is not None:
            start, rows = part_rows(self.place.part, t.shape[0])  # type: ignore[misc]  # checked on open
            t = t.narrow(0, start, rows)
        return apply_to_canonical(self.place.transform, t)

    def load_flat(self, start: int, stop: int) -> torch.Tensor:
        """Flat elements [start, stop) of the canonical tensor (a layout whose transform moves no bytes); a
        quantized tensor dequantizes only those."""
        ranged = getattr(self.file, "tensor_range", None)
        if ranged is None or self.place.transform in COPYING:
            return self.load().reshape(-1)[start:stop]
        base = 0
        if self.place.part is not None:
            full = self.file.info(self.key).shape
            first, _ = part_rows(self.place.part, full[0])  # type: ignore[misc]  # checked on open
            base = first * (math.prod(full[1:]) if len(full) > 1 else 1)
        return ranged(self.key, base + start, base + stop)

    def stored_span(self) -> Span | None:
        """The stored bytes as a torch-free span (no copy; a fused tensor's rows narrowed) in the file's shape, or
        None where the reader has no mapping to offer (a pickle, misaligned data)."""
        s = self.file.span(self.key)
        if s is not None and self.place.part is not None:
            start, rows = part_rows(self.place.part, s.shape[0])  # type: ignore[misc]  # checked on open
            s = s.rows(start, rows)
        return s

    def span(self) -> Span | None:
        """The tensor in canonical shape as a span without a copy; None also for transforms that move bytes
        (transpose, swap_halves), which the engine applies to `stored_span()`."""
        if self.place.transform in COPYING:
            return None
        s = self.stored_span()
        return None if s is None else s.reshape(self.shape)


@dataclass
class Component:
    name: str
    spec: ComponentSpec
    tensors: dict[str, TensorRef]
    config: dict[str, Any] | None
    config_source: str  # "folder", "embedded" or "inferred"
    keymap: KeyMap | None = None
    notes: list[str] = field(default_factory=list)
    dropped: list[tuple[str, str]] = field(default_factory=list)  # (original key, why)
    folder: Path | None = None  # the component's subfolder in a diffusers input


@dataclass
class LocalModel:
    path: Path
    layout: str  # "diffusers" or "single-file"
    family: Family
    components: dict[str, Component]
    files: list[Path]
    metadata: dict[str, str] = field(default_factory=dict)
    extra_components: dict[str, Path] = field(default_factory=dict)  # diffusers subfolders hubmix does not merge
    prediction: Prediction = Prediction()
    inpainting: bool = False
    unassigned: list[str] = field(default_factory=list)  # single-file keys outside every component
    main_only: bool = False  # a file with the main component alone (a Flux transformer-only file)
    main_prefix: str = ""  # a main-only file's key prefix: "" (bare) or ComfyUI's `model.diffusion_model.`

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def prediction_type(self) -> str | None:
        return self.prediction.type

    @property
    def model_variant(self) -> str | None:
        """The family's variant this model is (Flux dev or schnell), by its main component's keys."""
        main = self.components.get(self.family.main)
        return self.family.variant_of(main.tensors) if main is not None else None


def open_model(path: str | Path, *, variant: str | None = None, ema: bool = False,
               components: Collection[str] | None = None) -> LocalModel:
    """Open a diffusers folder or a single file. `components` (diffusers folders only): the components to read;
    the others may lack weights (the Hub fetches only what a merge uses) and are left out of the model."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file or folder")
    if p.is_dir():
        if (p / "model_index.json").is_file():
            return _open_diffusers(p, variant, components)
        weights = sorted(f for f in p.iterdir() if f.suffix in (".safetensors", *PICKLE_SUFFIXES) and f.is_file())
        if len(weights) == 1:
            return _open_single_file(weights[0], ema)
        if not weights:
            raise InputError(f"{p}: not a model: a folder without model_index.json and without a weight file")
        raise InputError(f"{p}: not a diffusers folder (no model_index.json) and holds several weight files; name "
                         f"one: {', '.join(w.name for w in weights)}")
    return _open_single_file(p, ema)


# ---- diffusers folders -----------------------------------------------------------------------------------------


def choose_weights(names: Iterable[str], stem: str, variant: str | None, where: str, folder: object) -> list[str]:
    """The rule that picks a component's weight files among the file names of its folder: safetensors before .bin
    (never both), the requested variant (else the default one, else the only one), shards through their index.

    Returns the chosen names: weight files, or one `*.index*.json` whose shards the caller reads from it. hub.py
    applies this same function to a repo listing, so what is downloaded is exactly what `open_model` reads.
    """
    found: dict[str | None, list[str]] = {}  # variant -> names
    for ext in ("safetensors", "bin"):
        rx = re.compile(rf"^{re.escape(stem)}(?:\.([\w-]+))?\.{ext}(?:\.index(?:\.([\w-]+))?\.json)?$")
        for name in sorted(names):
            m = rx.match(name)
            if not m:
                continue
            var = m.group(1) or m.group(2)
            if var is not None and re.search(r"(?:^|-)\d{5}-of-\d{5}$", var):
                continue  # a shard, reached through its index
            found.setdefault(var, [name])
        if found:
            break  # safetensors found: never fall back to .bin duplicates
    if not found:
        raise InputError(f"{where}: no weight file ({stem}.safetensors or .bin) in {folder}")
    if variant is not None:
        if variant in found:
            return found[variant]
        raise InputError(f"{where}: no '{variant}' variant in {folder} (found: "
                         f"{', '.join(v or 'default' for v in found)})")
    if None in found:
        return found[None]
    if len(found) == 1:
        return next(iter(found.values()))
    raise InputError(f"{where}: several variants in {folder} ({', '.join(sorted(found))}); choose one with --variant")


def index_shards(index_text: str, where: object = "weights index") -> list[str]:
    """The shard file names a weights index (`*.index.json`) points to."""
    try:
        index = json.loads(index_text)
        shards = sorted(set(index["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError):
        raise InputError(f"{where}: not a weights index (expected JSON with a weight_map)") from None
    if not all(isinstance(x, str) for x in shards):
        raise InputError(f"{where}: not a weights index (weight_map values must be file names)")
    return shards


def _weight_files(folder: Path, stem: str, variant: str | None, where: str) -> list[Path]:
    """The weight files of one component, chosen by `choose_weights` among the folder's files."""
    names = {f.name for f in folder.iterdir()} if folder.is_dir() else set()
    chosen = choose_weights(names, stem, variant, where, folder)
    if len(chosen) == 1 and chosen[0].endswith(".json"):
        files = [folder / s for s in index_shards(read_regular(folder / chosen[0]), folder / chosen[0])]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise InputError(f"{folder / chosen[0]}: index names missing shard files: {', '.join(missing[:3])}")
        return files
    return [folder / n for n in chosen]


def _config_ndims(folder: Path, library: str, cls: str) -> dict[str, int]:
    """Key -> ndim of a component whose weights were not fetched, from its config (the model is built on the meta
    device: no memory, no weights), so family detection still sees its keys. A bare presence marker if that fails."""
    try:
        import importlib

        import torch

        if library not in ("diffusers", "transformers"):  # names from a repo's model_index.json: nothing else runs
            raise ValueError(library)
        module = importlib.import_module(library)
        base = module.ModelMixin if library == "diffusers" else module.PreTrainedModel
        klass = getattr(module, cls)
        if not (isinstance(klass, type) and issubclass(klass, base)):
            raise ValueError(cls)
        config = json.loads(read_regular(folder / "config.json"))
        with torch.device("meta"):
            model = klass.from_config(config) if library == "diffusers" else klass(
                klass.config_class.from_dict(config))
        return {k: v.ndim for k, v in model.state_dict().items()}
    except Exception:  # noqa: BLE001 - detection then relies on the marker alone
        return {"*": 0}


def _open_diffusers(root: Path, variant: str | None, wanted: Collection[str] | None = None) -> LocalModel:
    try:
        index = json.loads(read_regular(root / "model_index.json"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{root / 'model_index.json'}: unreadable ({e})") from None
    if not isinstance(index, dict):
        raise InputError(f"{root / 'model_index.json'}: not a JSON object")
    subfolders = {check_component_name(name, root / "model_index.json"): root / name for name, v in index.items()
                  if not name.startswith("_") and isinstance(v, list) and v and v[0] is not None}
    opened: dict[str, list[WeightFile]] = {}
    ndims: dict[str, int] = {}
    skipped: set[str] = set()
    for name, folder in subfolders.items():
        stem = weight_stem(index[name][0])
        if name not in all_component_names():  # tokenizers, schedulers, safety checkers: not merged
            continue
        if wanted is not None and name not in wanted:
            skipped.add(name)
            for k, n in _config_ndims(folder, index[name][0], index[name][1]).items():
                ndims[f"{name}/{k}"] = n
            continue
        files = [quant_view(open_weight_file(f)) for f in _weight_files(folder, stem, variant, str(root))]
        opened[name] = files
        for f in files:
            for k in f.keys():
                ndims[f"{name}/{k}"] = len(f.info(k).shape)
    family = detect_family("diffusers", ndims, str(root))
    components: dict[str, Component] = {}
    for name, spec in family.components.items():
        if name in skipped:
            continue
        if name not in opened and name in family.optional and name not in subfolders:
            continue  # Wan 2.1 and Wan 2.2 TI2V: no second expert (model_index.json says null)
        if name not in opened:
            raise InputError(f"{root}: a {family.name} model needs a {name} component; model_index.json has none")
        folder = subfolders[name]
        try:
            config = json.loads(read_regular(folder / "config.json"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"{folder / 'config.json'}: unreadable ({e})") from None
        keymap = KeyMap(spec, config)
        comp = Component(name, spec, {}, config, "folder", keymap=keymap, folder=folder)
        for f in opened[name]:
            for k in f.keys():
                info = f.info(k)
                canon = keymap.normalize(k)
                why = keymap.dropped_reason(canon)
                if why is not None:
                    comp.dropped.append((f"{name}/{k}", why))
                    continue
                comp.tensors[canon] = TensorRef(info.dtype_name, info.shape, f, k)
        components[name] = comp
    sched = read_json(root / "scheduler" / "scheduler_config.json")
    extra = {n: f for n, f in subfolders.items() if n not in family.components and f.is_dir()}
    model = LocalModel(root, "diffusers", family, components, sorted({f.path for fs in opened.values() for f in fs}),
                       extra_components=extra, prediction=from_scheduler(sched))
    model.inpainting = _is_inpainting(model)
    return model


PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def component_name_ok(name: object) -> bool:
    """Whether a model_index.json entry is a plain folder name: never a path (`../x`, `/abs`, `a/b`), which would
    make hubmix read or copy files outside the model, or write them outside --out."""
    return isinstance(name, str) and bool(PLAIN_NAME.fullmatch(name)) and ".." not in name


def check_component_name(name: str, where: object) -> str:
    if not component_name_ok(name):
        raise InputError(f"{where}: component {name!r} is not a plain folder name; refusing a path in "
                         "model_index.json")
    return name


def read_json(path: Path) -> dict[str, Any]:
    """A JSON file's object, or {} when it is missing or unreadable (optional configs)."""
    if not path.exists():
        return {}
    try:
        return json.loads(read_regular(path))  # a FIFO or device is refused (InputError), not waited on
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}


def _is_inpainting(model: LocalModel) -> bool:
    unet = model.components.get("unet")
    ref = unet.tensors.get("conv_in.weight") if unet else None
    return bool(ref and len(ref.shape) == 4 and ref.shape[1] == 9)


# ---- single files ----------------------------------------------------------------------------------------------

def _open_single_file(path: Path, ema: bool) -> LocalModel:
    f = quant_view(open_weight_file(path))
    ndims = {k: len(f.info(k).shape) for k in f.keys()}
    if f.format == "gguf":  # the denoiser alone, its header naming the family (else, like sd.cpp's, its keys)
        arch = getattr(f, "architecture", None)
        only = detect_main_only(ndims) if arch is None else None
        family = only[0] if only is not None else gguf_family(arch, str(path))
        prefix = family.components[family.main].prefix  # ComfyUI-GGUF's loader strips it where every key has it
        only = (family, prefix if f.keys() and all(k.startswith(prefix) for k in f.keys()) else "")
    elif not any(fam.matches("single-file", ndims) for fam in families().values()) and \
            detect_main_only(ndims) is None and generic_allowed(path, ndims):
        return _open_generic(f, path)  # no family's keys: any architecture, key by key
    else:
        family = detect_family("single-file", ndims, str(path))
        only = None if family.matches("single-file", ndims) else detect_main_only(ndims)
    if only is not None:  # the main component alone, bare or under its prefix: read it under its own prefix
        main = dataclasses.replace(family.components[family.main], prefix=only[1])
        family = dataclasses.replace(family, components={family.main: main})
    by_comp: dict[str, dict[str, tuple[int, ...]]] = {}
    unassigned = []
    for k in f.keys():
        comp = family.component_of(k)
        if comp is None:
            unassigned.append(k)
            continue
        by_comp.setdefault(comp, {})[k[len(family.components[comp].prefix):]] = f.info(k).shape
    embedded = _embedded_configs(f, path)
    inferred, notes = infer_component_configs(family, by_comp, str(path))
    components: dict[str, Component] = {}
    for name, spec in family.components.items():
        if name not in by_comp and name in family.optional:
            continue  # plan_merge takes it from another input or --config-from
        if name not in by_comp:
            raise InputError(f"{path}: a {family.name} checkpoint needs its {name} (keys {spec.prefix}*); "
                             "it has none")
        config, source = (embedded[name], "embedded") if name in embedded else (inferred[name], "inferred")
        keymap = KeyMap(spec, config)
        comp = Component(name, spec, {}, config, source, keymap=keymap,
                         notes=notes[name] if source == "inferred" else [])
        for k in f.keys():
            if not k.startswith(spec.prefix):
                continue
            why = keymap.dropped_reason(k)
            targets = None if why else keymap.from_original(k)
            if targets is None:
                comp.dropped.append((k, why or "no diffusers counterpart in this component's config"))
                continue
            for canon, place in targets:
                src_key = k
                if ema and (ek := keymap.ema_key(k)) is not None and ek in f:
                    src_key = ek
                comp.tensors[canon] = _ref(f, src_key, place, path)
        components[name] = comp
    if ema:
        unassigned = [k for k in unassigned if not k.startswith("model_ema.")]
    unassigned = [k for k in unassigned if k not in MARKER_KEYS]  # read below, kept by outputs that carry them
    model = LocalModel(path, "single-file", family, components, [path], metadata=dict(f.metadata),
                       unassigned=unassigned, main_only=only is not None, main_prefix=only[1] if only else "",
                       prediction=from_single_file(f.keys(), f.metadata, family.unmarked_prediction))
    if only is not None:  # the family as every other input knows it (all components), for merging and outputs
        model.family = get_family(family.id)
    model.inpainting = _is_inpainting(model)
    return model


def _open_generic(f: WeightFile, path: Path) -> LocalModel:
    """The generic family (formats/generic.py): every key of `f` in the one component, as stored."""
    family = generic_family()
    spec = family.components[family.main]
    comp = Component(spec.name, spec, {}, {}, "keys", keymap=KeyMap(spec, {}))
    for k in f.keys():
        info = f.info(k)
        comp.tensors[k] = TensorRef(info.dtype_name, info.shape, f, k)
    return LocalModel(path, "single-file", family, {spec.name: comp}, [path], metadata=dict(f.metadata),
                      prediction=from_single_file(f.keys(), f.metadata, None))


def _ref(f: WeightFile, key: str, place: Placement, path: Path) -> TensorRef:
    info = f.info(key)
    shape = info.shape
    if place.part is not None:
        rows = part_rows(place.part, shape[0]) if shape else None
        if rows is None:
            raise InputError(f"{path}: {key} has shape {list(shape)}, which does not split into fused parts of "
                             f"relative widths {list(place.part[1])}")
        shape = (rows[1], *shape[1:])
    return TensorRef(info.dtype_name, to_canonical_shape(place.transform, shape), f, key, place)


def _embedded_configs(f: WeightFile, path: Path) -> dict[str, dict[str, Any]]:
    raw = f.metadata.get(CONFIG_META)
    if not raw:
        return {}
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        raise InputError(f"{path}: corrupt {CONFIG_META} metadata") from None


def check_same_family(models: list[LocalModel]) -> Family:
    fam = models[0].family
    for m in models[1:]:
        if m.family.id != fam.id:
            raise FamilyError(f"cannot merge models of different families: {models[0].path} is {fam.name}, "
                              f"{m.path} is {m.family.name}")
    return fam
