"""Open a local model, in either layout, as components of canonically named, lazily read tensors.

A diffusers folder (model_index.json + component subfolders, sharded or not, variants) and an original single
file (.safetensors or .ckpt) both come out as the same thing: per component, a map from canonical (diffusers) key
to a `TensorRef` that knows where the bytes are and how to view them in canonical shape. Opening reads headers only.
This module opens diffusers folders; formats/single_file.py opens single files; formats/local_model.py holds the
types both return (imported from here too).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Collection, Iterable

from hubmix.errors import FamilyError, InputError
from hubmix.formats.families import Family, all_component_names, detect_family, weight_stem
from hubmix.formats.io.readers import PICKLE_SUFFIXES, WeightFile, open_weight_file, read_regular
from hubmix.formats.layouts import KeyMap
from hubmix.formats.local_model import CONFIG_META, Component, LocalModel, TensorRef, is_inpainting
from hubmix.formats.prediction import from_scheduler
from hubmix.formats.quant import wrap as quant_view
from hubmix.formats.single_file import open_single_file

__all__ = ["CONFIG_META", "Component", "LocalModel", "TensorRef", "check_component_name", "check_same_family",
           "choose_weights", "component_name_ok", "index_shards", "open_model", "read_json"]


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
            return open_single_file(weights[0], ema)
        if not weights:
            raise InputError(f"{p}: not a model: a folder without model_index.json and without a weight file")
        raise InputError(f"{p}: not a diffusers folder (no model_index.json) and holds several weight files; name "
                         f"one: {', '.join(w.name for w in weights)}")
    return open_single_file(p, ema)


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
    model.inpainting = is_inpainting(model)
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


def check_same_family(models: list[LocalModel]) -> Family:
    fam = models[0].family
    for m in models[1:]:
        if m.family.id != fam.id:
            raise FamilyError(f"cannot merge models of different families: {models[0].path} is {fam.name}, "
                              f"{m.path} is {m.family.name}")
    return fam
