"""`merge(recipe)`: the whole flow, refs -> models -> plan -> engine -> output files -> recipe, as one call.

`convert` is the same flow with one model and every component copied, so there is a single code path from input
bytes to output bytes.
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from hubmix import __version__
from hubmix.engine import analysis
from hubmix.engine import pipeline as engine
from hubmix.cache import write_atomically
from hubmix.formats.configs import DEFAULT_DERIVED
from hubmix.engine.devices import device_budget, resolve_device
from hubmix.errors import InputError, RecipeError
from hubmix.formats.families import Family
from hubmix.hashing import hash_in_background
from hubmix.engine.kernels import Kernels
from hubmix.formats.layouts import KeyMap
from hubmix.formats.model import CONFIG_META, LocalModel, check_same_family, open_model, read_json
from hubmix.engine.output import (Router, atomic_target, check_target, component_config_json, model_index,
                     need_folder, write_json)
from hubmix.engine.plan import TORCH_DTYPES, Summary, Task, plan_merge
from hubmix.recipe import RECIPE_VERSION, recipe_yaml, Recipe, canonical_json, letter, model_entry, recipe_hash
from hubmix.hub.refs import ModelRef, parse_ref

PLACEHOLDER = "0" * 64


@dataclass
class MergeResult:
    output: Path | None
    layout: str | None
    family: Family
    summary: Summary
    canonical: dict[str, Any]
    files: list[Path] = field(default_factory=list)
    report: dict[str, Any] | None = None  # the dry run's statistics
    engine: dict[str, Any] = field(default_factory=dict)  # device, workers, chunk size, fused kernels, compile time

    @property
    def recipe_sha256(self) -> str:
        return recipe_hash(self.canonical)


Resolver = Callable[[Any, Recipe], tuple[Path, dict[str, Any]]]


def resolve_local(ref: Any, recipe: Recipe) -> tuple[Path, dict[str, Any]]:
    """A local reference -> (path, identity fields for the canonical recipe); Hub refs need hubmix.hub."""
    text = model_entry(ref)["ref"]
    if isinstance(ref, dict) and ref.get("repo"):  # a canonical recipe's Hub input: at its pinned commit
        r = ModelRef(text, repo_id=ref["repo"], revision=ref.get("revision"), filename=ref.get("file"))
    else:
        r = parse_ref(text)
    if r.is_hub:
        from hubmix.hub.resolve import resolve_hub  # only Hub merges import the Hub client

        return resolve_hub(r, recipe)
    if not r.local or not r.local.exists():
        raise InputError(f"{text}: no such file or folder")
    return r.local, {"ref": r.local.resolve().name}


def open_inputs(recipe: Recipe, resolver: Resolver = resolve_local) -> tuple[list[LocalModel], list[dict[str, Any]]]:
    models, idents = [], []
    for i, ref in enumerate(recipe.models):
        path, ident = resolver(ref, recipe)
        models.append(open_model(path, variant=recipe.variant, ema=recipe.ema, components=recipe.needs(i)))
        idents.append(ident)
    return models, idents


def choose_layout(recipe: Recipe, out: Path | None) -> str:
    if recipe.layout:
        return recipe.layout
    return "single-file" if out is not None and out.suffix == ".safetensors" else "diffusers"


def canonical_recipe(recipe: Recipe, family: Family, models: list[LocalModel], idents: list[dict[str, Any]],
                     tasks: list[Task], hashes: dict[Path, str]) -> dict[str, Any]:
    """Every default filled in, local paths reduced to names, file hashes of what the merge reads."""
    used: dict[int, set[Path]] = {}
    for t in tasks:
        for i, r in zip(t.sources, t.refs):
            used.setdefault(i, set()).add(r.file.path)
    inputs = []
    for i, (m, ident) in enumerate(zip(models, idents)):
        root = m.path if m.layout == "diffusers" else m.path.parent
        files = {str(p.relative_to(root)) if p.is_relative_to(root) else p.name: hashes.get(p, PLACEHOLDER)
                 for p in sorted(used.get(i, ()))}
        inputs.append({"name": letter(i), **ident, "layout": m.layout, "files": files})
    out: dict[str, Any] = {
        "recipe_version": RECIPE_VERSION,
        "family": family.id,
        "models": inputs,
        "method": recipe.method,
        "params": recipe.global_params(),
        "components": {c: recipe.plan_for(c) for c in family.components},
        "dtype": recipe.dtype,
    }
    if recipe.ema:
        out["ema"] = True
    if recipe.variant:
        out["variant"] = recipe.variant
    if recipe.prediction_type:
        out["prediction_type"] = recipe.prediction_type
    if recipe.config_from:
        out["config_from"] = _config_from_ident(recipe.config_from)
    for comp in out["components"].values():
        if not comp.get("blocks"):
            comp.pop("blocks", None)
    return out


def _config_from_ident(text: str) -> str:
    """--config-from as the canonical recipe records it: a Hub repo pinned to its commit, a local folder by name."""
    ref = parse_ref(text)
    if ref.is_hub:
        from hubmix.hub.resolve import pin

        return f"{ref.repo_id}@{pin(ref.repo_id, ref.revision).sha}"
    return ref.local.resolve().name if ref.local else text


def _config_source(models: list[LocalModel], family: Family, recipe: Recipe) -> Path | None:
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


def _prediction_type(models: list[LocalModel], recipe: Recipe, summary: Summary) -> str | None:
    chosen = recipe.prediction_type or models[0].prediction_type
    kinds = {m.prediction_type for m in models if m.prediction_type}
    if len(kinds) > 1:
        summary.add("note", f"inputs differ in prediction type ({', '.join(sorted(kinds))}); the output uses "
                            f"{chosen or 'the scheduler default'}")
    return chosen


def _write_diffusers_files(root: Path, models: list[LocalModel], structure: dict[str, int], family: Family,
                           configs: dict[str, dict[str, Any]], source: Path | None, recipe: Recipe,
                           prediction: str | None) -> None:
    """Everything of a diffusers folder but the weights: model_index, configs, scheduler, tokenizers, extras."""
    a = models[0]
    base = a.path if a.layout == "diffusers" else source
    dtype = TORCH_DTYPES.get(recipe.dtype or "")
    sched = read_json(base / "scheduler" / "scheduler_config.json") if base else {}
    if not sched:
        sched = dict(family.defaults.get("scheduler", {}))
    if prediction:
        sched["prediction_type"] = prediction
    write_json(root / "scheduler" / "scheduler_config.json", sched)
    for cname, spec in family.components.items():
        write_json(root / cname / "config.json", component_config_json(spec, configs[cname], dtype))
    for tok in family.tokenizers:
        src = need_folder(base, f"tokenizer ({tok})", family) / tok
        if not src.is_dir():
            raise InputError(f"{base}: has no {tok}/ folder to take the tokenizer from")
        shutil.copytree(src, root / tok, dirs_exist_ok=True)
    if a.layout == "diffusers":
        for name, folder in a.extra_components.items():
            shutil.copytree(folder, root / name, dirs_exist_ok=True)
    index = model_index(family, a.inpainting, sched["_class_name"], read_json(base / "model_index.json") or None
                        if base else None)
    for name, entry in index.items():  # a borrowed index may list parts (safety checker...) that were not copied
        if isinstance(entry, list) and entry and entry[0] is not None and not (root / name).is_dir():
            index[name] = [None, None]
    write_json(root / "model_index.json", index)


def _metadata(canonical: dict[str, Any], extra: dict[str, str] | None = None) -> dict[str, str]:
    meta = {"format": "pt", "hubmix.version": __version__, "hubmix.recipe": canonical_json(canonical),
            "hubmix.recipe_sha256": recipe_hash(canonical)}
    meta.update(extra or {})
    return meta


def _single_file_metadata(canonical: dict[str, Any], family: Family, title: str, configs: dict[str, Any],
                          prediction: str | None) -> dict[str, str]:
    extra = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": family.modelspec_architecture,
        "modelspec.implementation": "diffusers",
        "modelspec.title": title,
        CONFIG_META: canonical_json(configs),
    }
    if prediction:
        extra["modelspec.prediction_type"] = "v" if prediction == "v_prediction" else prediction
    return _metadata(canonical, extra)


def _execute(tasks: list[Task], write, settings: engine.Settings, desc: str, summary: Summary) -> dict[str, Any]:
    """Run the merge tasks through the engine on the chosen device; returns what the engine did."""
    device = resolve_device(settings.device)
    workers = settings.workers or (1 if device.type != "cpu" else engine.default_workers())
    budget = device_budget(device, settings.max_memory)
    chunk = engine.chunk_elements(dataclasses.replace(settings, max_memory=budget), workers)
    merged = [t for t in tasks if t.method is not None and t.channels is None]
    kernels = Kernels(settings.kernels, device=device, total_elements=sum(t.numel for t in merged),
                      log=lambda msg: summary.add("note", msg))
    signatures: dict[tuple, tuple] = {}
    for t in merged:
        dtypes = [r.dtype for r in t.refs]
        signatures.setdefault(Kernels.key(t.method, dtypes, t.out_dtype), (t.method, dtypes, t.out_dtype))
    try:
        with engine.parallel_across_chunks(workers):
            kernels.start(list(signatures.values()))
            engine.run_merge(engine.split_jobs(tasks, chunk), write, kernels, workers=workers, desc=desc,
                             quiet=settings.quiet)
    finally:
        kernels.close()
    return {"device": str(device), "workers": workers, "chunk_elements": chunk, "kernels": dict(kernels.calls),
            "native_build_seconds": kernels.native_build_seconds, "compile_seconds": kernels.compile_seconds}


def _plan_outputs(tmp: Path, target: Path, layout: str, tasks: list[Task], models: list[LocalModel],
                  structure: dict[str, int], family: Family, configs: dict[str, dict[str, Any]], source: Path | None,
                  recipe: Recipe, prediction: str | None, placeholder: dict[str, Any], summary: Summary) -> Router:
    """The output files of `layout` under `tmp` (the target's temporary sibling), with every task routed into them;
    a diffusers layout also gets its non-weight files here."""
    router = Router()
    by_comp: dict[str, list[Task]] = {}
    for t in tasks:
        by_comp.setdefault(t.component, []).append(t)
    if layout in ("diffusers", "both"):
        _write_diffusers_files(tmp, models, structure, family, configs, source, recipe, prediction)
        variant = f".{recipe.variant}" if recipe.variant else ""
        for cname, spec in family.components.items():
            router.add_component_file(tmp / cname / f"{spec.weight_name}{variant}.safetensors", cname,
                                      by_comp.get(cname, []), _metadata(placeholder))
    if layout in ("single-file", "both"):
        path = tmp if layout == "single-file" else tmp / f"{target.name}.safetensors"
        title = target.stem if layout == "single-file" else target.name
        parts = {c: (KeyMap(family.components[c], configs[c]), by_comp.get(c, [])) for c in family.components}
        router.add_single_file(path, parts, _single_file_metadata(placeholder, family, title, configs, prediction),
                               summary, f"{title}.safetensors")
    return router


def merge(recipe: Recipe, *, out: str | Path | None = None, overwrite: bool = False, dry: bool = False,
          quiet: bool = False, workers: int | None = None, settings: engine.Settings | None = None,
          resolver: Resolver = resolve_local) -> MergeResult:
    """Merge as `recipe` says; write to `out` (or recipe.output). With dry=True, only analyze.
    `settings` chooses device, memory budget, workers and fused kernels (engine.Settings)."""
    settings = settings or engine.Settings()
    settings.quiet = settings.quiet or quiet
    if workers:
        settings.workers = workers
    target = Path(out) if out is not None else (Path(recipe.output) if recipe.output else None)
    layout = None
    if not dry:
        if target is None:
            raise RecipeError(f"{recipe.source}: no output: pass --out (or set output: in the recipe)")
        layout = choose_layout(recipe, target)
        if layout != "single-file" and target.suffix == ".safetensors":
            raise RecipeError(f"{target}: a .safetensors path cannot hold a {layout} folder; choose another --out")
        check_target(target, overwrite)  # before any work
        if layout == "single-file":
            check_target(_sidecar(target), overwrite)
    # resolvers (the Hub) see where the output goes: a diffusers folder also copies model a's other components
    recipe = dataclasses.replace(recipe, layout=layout, output=str(target) if target else None)
    models, idents = open_inputs(recipe, resolver)
    family = check_same_family(models)
    if recipe.family and recipe.family != family.id:
        raise RecipeError(f"{recipe.source}: the recipe is for {recipe.family} models, the inputs are {family.id}")
    tasks, summary, structure = plan_merge(models, recipe, family)
    placeholder = canonical_recipe(recipe, family, models, idents, tasks, {})
    if dry:
        names = {c: recipe.plan_for(c).get("models") or [recipe.plan_for(c)["from"]] for c in family.components}
        report = analysis.analyze(tasks, names, quiet=settings.quiet, workers=settings.workers)
        return MergeResult(None, None, family, summary, placeholder, report=report)
    assert target is not None and layout is not None
    source = _config_source(models, family, recipe) if layout != "single-file" or any(
        m.components[c].config_source == "inferred" for m in models for c in m.components) else None
    configs = output_configs(models, structure, family, source, summary)
    prediction = _prediction_type(models, recipe, summary)
    hashes_future = hash_in_background(sorted({r.file.path for t in tasks for r in t.refs}))
    with atomic_target(target, overwrite) as tmp:
        router = _plan_outputs(tmp, target, layout, tasks, models, structure, family, configs, source, recipe,
                               prediction, placeholder, summary)
        try:
            router.open()
            stats = _execute(router.wanted(tasks), router.write, settings,
                             "converting" if recipe.method == "copy" else "merging", summary)
            canonical = canonical_recipe(recipe, family, models, idents, tasks, hashes_future.result())
            final = _metadata(canonical)
            for f in router.files:  # the input hashes were computed during the merge: same-length placeholders
                assert f.writer is not None
                f.writer.set_metadata({**f.metadata, **{k: final[k] for k in ("hubmix.recipe",
                                                                                "hubmix.recipe_sha256")}})
            router.finish()
        except BaseException:
            router.abort()
            raise
        if layout != "single-file":
            (tmp / "recipe.yaml").write_text(recipe_yaml(canonical))
        written = [target / f.path.relative_to(tmp) if layout != "single-file" else target for f in router.files]
    if layout == "single-file":
        sidecar = _sidecar(target)
        write_atomically(sidecar, recipe_yaml(canonical))
        written.append(sidecar)
    else:
        written.append(target / "recipe.yaml")
    return MergeResult(target, layout, family, summary, canonical, files=written, engine=stats)


def merge_in_memory(recipe: Recipe, into: Callable[[str, str], Any] | None = None, *, merged_only: bool = False,
                    settings: engine.Settings | None = None, resolver: Resolver = resolve_local) -> dict[str, Any]:
    """The merge's output tensors without any file: the same plan and engine as `merge`, each chunk copied into
    `into(component, key)` (a tensor of the task's shape, in any dtype/device: a pipeline's own parameter), else
    into a fresh tensor of the output dtype. `merged_only` skips the copied tensors. Returns {component: {key:
    tensor}}."""
    import torch

    settings = settings or engine.Settings()
    recipe = dataclasses.replace(recipe, layout="single-file", output=None)  # the Hub fetches no output extras
    models, _ = open_inputs(recipe, resolver)
    tasks, summary, _ = plan_merge(models, recipe, check_same_family(models))
    tasks = [t for t in tasks if t.method is not None or not merged_only]
    dest = {(t.component, t.key): (into(t.component, t.key) if into else None) for t in tasks}
    for t in tasks:
        d = dest[(t.component, t.key)]
        if d is None or not d.is_contiguous():  # written flat, chunk by chunk
            dest[(t.component, t.key)] = torch.empty(t.shape, dtype=t.out_dtype)

    def write(job: engine.Job, data: Any) -> None:
        dest[(job.task.component, job.task.key)].view(-1)[job.start:job.stop].copy_(data.reshape(-1))

    _execute(tasks, write, settings, "merging", summary)
    for (c, k), d in dest.items():  # a non-contiguous destination gets its copy now
        if into and (target := into(c, k)) is not None and target.data_ptr() != d.data_ptr():
            target.copy_(d)
    out: dict[str, Any] = {}
    for (c, k), d in dest.items():
        out.setdefault(c, {})[k] = d
    return out


def _sidecar(single_file: Path) -> Path:
    """Where a single-file result's recipe goes: `<stem>.recipe.yaml` beside it."""
    return single_file.with_name(f"{single_file.stem}.recipe.yaml")


__all__ = ["merge", "merge_in_memory", "MergeResult"]
