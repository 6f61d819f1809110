"""Open an original single file (.safetensors, .ckpt, .gguf; the main component alone or the whole pipeline; any
architecture key by key where no family's keys match) as a LocalModel. Reads headers only."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from hubmix.errors import InputError
from hubmix.formats.configs import infer_component_configs
from hubmix.formats.families import detect_family, detect_main_only, families, generic_family, get_family, gguf_family
from hubmix.formats.generic import generic_allowed
from hubmix.formats.io.readers import WeightFile, open_weight_file
from hubmix.formats.layouts import KeyMap, Placement, part_rows, to_canonical_shape
from hubmix.formats.local_model import CONFIG_META, Component, LocalModel, TensorRef, is_inpainting
from hubmix.formats.prediction import MARKER_KEYS, from_single_file
from hubmix.formats.quant import gguf_file  # noqa: F401 - registers the GGUF reader with open_weight_file
from hubmix.formats.quant import wrap as quant_view


def open_single_file(path: Path, ema: bool) -> LocalModel:
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
    model.inpainting = is_inpainting(model)
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

