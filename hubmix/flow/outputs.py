"""What a merge writes besides the merged tensors: each output component's config, the rest of a diffusers folder
(scheduler, tokenizers, model a's extra parts, model_index), the prediction type, the files' metadata, and the
routing of every task into the output files of a layout. `merging.merge` calls these in order."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

from hubmix import __version__
from hubmix.engine.output import Router, component_config_json, model_index, need_folder, write_json
from hubmix.engine.plan import DTYPE_NAMES, Summary, Task
from hubmix.errors import InputError, RecipeError
from hubmix.formats.configs import DEFAULT_DERIVED
from hubmix.formats.families import Family
from hubmix.formats.layouts import KeyMap
from hubmix.formats.model import CONFIG_META, LocalModel, check_component_name, read_json
from hubmix.formats.quant import QUANT_DTYPES, codec
from hubmix.formats.prediction import Prediction, marker_tensors, single_file_metadata, update_scheduler
from hubmix.hub.refs import parse_ref
from hubmix.recipe import Recipe, canonical_json, letter, recipe_hash


def config_source(models: list[LocalModel], family: Family, recipe: Recipe) -> Path | None:
    """A diffusers folder to take configs and tokenizers from: a diffusers input, else --config-from."""
    for m in models:
        if m.layout == "diffusers":
            return m.path
    if recipe.config_from:
        ref = parse_ref(recipe.config_from)
        if not ref.is_hub:
            if not (ref.local and (ref.local / "model_index.json").is_file()):
                raise InputError(f"{recipe.config_from}: --config-from needs a diffusers folder (with "
                                 "model_index.json) or a Hub repo")
            return ref.local
        from hubmix.hub.resolve import config_folder

        return config_folder(ref, family)
    return None


def output_configs(models: list[LocalModel], structure: dict[str, int], family: Family, source: Path | None,
                   summary: Summary) -> dict[str, dict[str, Any]]:
    """The config of each output component: its structure model's own, or shapes plus a borrowed config."""
    configs = {}
    for cname, idx in structure.items():
        comp = models[idx].components[cname]
        cfg = dict(comp.config or {})
        if comp.config_source == "inferred":
            borrowed = read_json(source / cname / "config.json") if source else {}
            if borrowed:
                cfg = {**borrowed, **{k: v for k, v in cfg.items() if k not in DEFAULT_DERIVED}}
                summary.add("config", f"{cname}: structure from {models[idx].name}'s shapes, the rest from {source}")
            else:
                for note in comp.notes:
                    summary.add("config", f"{cname}: {note}")
        configs[cname] = cfg
    return configs


def choose_prediction(models: list[LocalModel], recipe: Recipe, family: Family, summary: Summary) -> Prediction:
    """The output's prediction type and zero SNR. The inputs that feed the denoiser (family.main) must agree
    on the type unless the recipe names it (a v-prediction and an epsilon model merge into a model that is
    neither); zero SNR follows the first of them that has the chosen type."""
    den = family.main
    rp = recipe.plan_for(den)
    letters = [letter(i) for i in range(len(models))]
    feeding = [models[letters.index(x)] for x in (rp.get("models") or [rp["from"]])]
    kinds = {m.prediction.type: m for m in reversed(feeding) if m.prediction.type}  # type -> first model saying it
    if len(kinds) > 1 and not recipe.prediction_type:
        desc = ", ".join(f"{m.name} is {k} ({m.prediction.source})" for k, m in sorted(kinds.items()))
        raise RecipeError(f"inputs differ in prediction type: {desc}; pass --prediction-type (recipe: "
                          f"prediction_type) to say which the merged {den} predicts")
    chosen = recipe.prediction_type or next(iter(kinds), None)
    same = [m for m in feeding if m.prediction.type == chosen]
    zero_snr = next((m.prediction.zero_snr for m in same if m.prediction.zero_snr is not None), None)
    if len(kinds) > 1 or len({bool(m.prediction.zero_snr) for m in same}) > 1:
        summary.add("note", f"inputs differ in prediction type or zero terminal SNR; the output is {chosen}"
                            f"{' with zero terminal SNR' if zero_snr else ''}")
    return Prediction(chosen, zero_snr, "the recipe" if recipe.prediction_type else "the inputs")


def write_diffusers_files(root: Path, models: list[LocalModel], structure: dict[str, int], family: Family,
                           configs: dict[str, dict[str, Any]], source: Path | None, recipe: Recipe,
                           prediction: Prediction) -> None:
    """Everything of a diffusers folder but the weights: model_index, configs, scheduler, tokenizers, extras."""
    a = models[0]
    base = a.path if a.layout == "diffusers" else source
    dtype = DTYPE_NAMES.get(recipe.dtype or "")
    sched = read_json(base / "scheduler" / "scheduler_config.json") if base else {}
    if not sched:  # the family's, with the variant's own settings (schnell: no dynamic shifting)
        variant = family.variants.get(a.model_variant or "", {})
        sched = {**family.defaults.get("scheduler", {}), **variant.get("scheduler", {})}
    write_json(root / "scheduler" / "scheduler_config.json", update_scheduler(sched, prediction))
    for cname, cfg in configs.items():
        write_json(root / cname / "config.json", component_config_json(family.components[cname], cfg, dtype))
    for tok in family.tokenizers:
        src = need_folder(base, f"tokenizer ({tok})", family) / tok
        if not src.is_dir():
            raise InputError(f"{base}: has no {tok}/ folder to take the tokenizer from")
        shutil.copytree(src, root / tok, dirs_exist_ok=True)
    if a.layout == "diffusers":
        for name, folder in a.extra_components.items():
            check_component_name(name, folder)  # open_model refused paths; never copy outside the output
            shutil.copytree(folder, root / name, dirs_exist_ok=True)
    index = model_index(family, a.inpainting, sched["_class_name"], read_json(base / "model_index.json") or None
                        if base else None)
    for name, entry in index.items():  # a borrowed index may list parts (safety checker...) that were not copied
        if isinstance(entry, list) and entry and entry[0] is not None and not (root / name).is_dir():
            index[name] = [None, None]
    write_json(root / "model_index.json", index)


def file_metadata(canonical: dict[str, Any], extra: dict[str, str] | None = None) -> dict[str, str]:
    meta = {"format": "pt", "hubmix.version": __version__, "hubmix.recipe": canonical_json(canonical),
            "hubmix.recipe_sha256": recipe_hash(canonical)}
    meta.update(extra or {})
    return meta


def single_file_meta(canonical: dict[str, Any], family: Family, title: str, configs: dict[str, Any],
                          prediction: Prediction) -> dict[str, str]:
    extra = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": family.modelspec_architecture,
        "modelspec.implementation": "diffusers",
        "modelspec.title": title,
        CONFIG_META: canonical_json(configs),
    }
    extra.update(single_file_metadata(prediction))
    return file_metadata(canonical, extra)


def plan_outputs(tmp: Path, target: Path, layout: str, tasks: list[Task], models: list[LocalModel],
                  structure: dict[str, int], family: Family, configs: dict[str, dict[str, Any]], source: Path | None,
                  recipe: Recipe, prediction: Prediction, placeholder: dict[str, Any], summary: Summary,
                  stage: Any = None) -> Router:
    """The output files of `layout` under `tmp` (the target's temporary sibling), with every task routed into them;
    a diffusers layout also gets its non-weight files here. `stage` (engine.target.Staging) stages the further
    files of a split single-file output (`split_targets`); `target` is then the path the user named."""
    fmt = codec(recipe.dtype) if recipe.dtype in QUANT_DTYPES else None
    assert fmt is None or layout == fmt.layout, "merging.choose_layout refuses the others"
    router = Router()
    by_comp: dict[str, list[Task]] = {}
    for t in tasks:
        by_comp.setdefault(t.component, []).append(t)
    if layout in ("diffusers", "both"):
        write_diffusers_files(tmp, models, structure, family, configs, source, recipe, prediction)
        variant = f".{recipe.variant}" if recipe.variant else ""
        for cname, spec in family.components.items():
            router.add_component_file(tmp / cname / f"{spec.weight_name}{variant}.safetensors", cname,
                                      by_comp.get(cname, []), file_metadata(placeholder))
    if layout == "gguf":
        _plan_gguf(router, tmp, target, by_comp, family, configs, recipe, prediction, placeholder, summary)
    if family.generic:  # one file, model a's keys and metadata, hubmix's recipe added
        comp = family.components[family.main]
        router.add_single_file(tmp, {comp.name: (KeyMap(comp, {}), by_comp.get(comp.name, []))},
                               {**models[structure[comp.name]].metadata, **file_metadata(placeholder)}, summary,
                               target.name)
        return router
    if layout in ("single-file", "both"):
        path = tmp if layout == "single-file" else tmp / f"{target.name}.safetensors"
        title = target.stem if layout == "single-file" else target.name
        specs = {c: family.components[c] for c in configs if c in family.single_file_components}
        left = [c for c in configs if c not in specs]
        if left:
            summary.add("note", f"{', '.join(left)}: not in {family.name} single files (they hold the "
                                f"{' and '.join(specs)} alone); a diffusers output keeps them")
        main_only = list(specs) == [family.main] and family.detect.get("main_only")
        if main_only or family.single_file:  # transformer-only files: bare keys, or ComfyUI's prefix like model a
            prefix = models[0].main_prefix if models[0].main_only else ""
            specs = {c: dataclasses.replace(spec, prefix=prefix) for c, spec in specs.items()}
        if layout == "single-file":
            files = split_single_files(family, list(specs), path, stage, target)
        else:  # beside the diffusers folders: <name>_high_noise.safetensors, <name>_low_noise.safetensors
            files = {p: [c] for c, p in split_targets(family, list(specs), path).items()}
        for group_path, names in (files or {path: list(specs)}).items():
            group_title = title if not files else group_path.stem if layout == "both" else single_file_title(
                family, names[0], target)
            parts = {c: (KeyMap(specs[c], configs[c]), by_comp.get(c, [])) for c in names}
            # an expert's own file reads back as the family's main component (a transformer-only file)
            metas = {(family.main if files else c): configs[c] for c in names}
            router.add_single_file(group_path, parts, single_file_meta(placeholder, family, group_title, metas,
                                                                       prediction), summary,
                                   f"{group_title}.safetensors", marker_tensors(prediction, family.marker_keys))
    return router


def split_targets(family: Family, components: list[str], target: Path) -> dict[str, Path]:
    """component -> output file, when a single-file output of `family` is several files (Wan 2.2's two experts:
    `<out>_high_noise.safetensors`, `<out>_low_noise.safetensors`, as ComfyUI's repackaged files); else {}."""
    split = [c for c in components if c in family.split_files]
    if len(split) < 2:
        return {}
    return {c: target.with_name(f"{target.stem}{family.split_files[c]}{target.suffix}") for c in split}


def single_file_title(family: Family, component: str, target: Path) -> str:
    return f"{target.stem}{family.split_files.get(component, '')}"


def split_single_files(family: Family, components: list[str], staged: Path, stage: Any, target: Path
                       ) -> dict[Path, list[str]]:
    """Staged path -> the components it holds, for a split single-file output: the first file is `staged` (the
    staging's own path, installed as the first split target), the others the staging's companions."""
    finals = split_targets(family, components, target)
    if not finals or stage is None:
        return {}
    return {(staged if i == 0 else stage.beside(final)): [c] for i, (c, final) in enumerate(finals.items())}


def _plan_gguf(router: Router, tmp: Path, target: Path, by_comp: dict[str, list[Task]], family: Family,
               configs: dict[str, dict[str, Any]], recipe: Recipe, prediction: Prediction,
               placeholder: dict[str, Any], summary: Summary) -> None:
    """A GGUF file: the denoiser alone under its bare original keys (ComfyUI-GGUF's layout); each tensor's stored
    type follows from model a's dtype of it (formats.quant.gguf_write)."""
    main = family.main
    if not family.gguf_architecture:
        raise RecipeError(f"{target}: {family.name} has no GGUF layout hubmix knows; write safetensors instead")
    for c in configs:
        if c != main:
            summary.add("note", f"{c}: not in {target.name} (a GGUF file holds the {main} alone)")
    spec = dataclasses.replace(family.components[main], prefix="")
    meta = single_file_meta(placeholder, family, target.stem, {main: configs[main]}, prediction)
    meta.pop("format", None)
    router.add_single_file(tmp, {main: (KeyMap(spec, configs[main]), by_comp.get(main, []))}, meta, summary,
                           target.name)
    f = router.files[-1]
    sources = {r.key: t.refs[0].dtype_name for t in by_comp.get(main, [])
               for r in router.routes.get((main, t.key), []) if r.file is f}
    f.writer_of = (codec(recipe.dtype), family.gguf, sources)
