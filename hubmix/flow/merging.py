"""`merge(recipe)`: the whole flow, refs -> models -> plan -> engine -> output files -> recipe, as one call.

`convert` is the same flow with one model and every component copied, so there is a single code path from input
bytes to output bytes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from hubmix.recipe.blocks import expand_block_lists
from hubmix.lora.bake import attach_loras
from hubmix.engine import pipeline as engine
from hubmix.engine.chunk import span_ready
from hubmix.cache import write_new
from hubmix.engine.devices import device_budget, plain_cpu, resolve_device
from hubmix.errors import Cancelled, InputError, RecipeError
from hubmix.formats.families import Family
from hubmix.formats.quant import QUANT_DTYPES, codec
from hubmix.formats.generic import check_same_keys
from hubmix.hub.hashing import input_hashes
from hubmix.engine.kernels import Kernels
from hubmix.flow.outputs import (choose_prediction, config_source, file_metadata, output_configs,
                                 plan_outputs, split_targets)
from hubmix.formats.model import LocalModel, check_same_family, open_model
from hubmix.engine.target import atomic_target, check_target
from hubmix.engine.plan import Summary, Task, plan_merge
from hubmix.recipe import RECIPE_VERSION, recipe_yaml, Recipe, letter, model_entry, recipe_hash
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
    """The output's layout; a GGUF --dtype writes one .gguf file of the denoiser (ComfyUI-GGUF's layout)."""
    fmt = codec(recipe.dtype) if recipe.dtype in QUANT_DTYPES else None
    gguf = fmt is not None and fmt.layout == "gguf"
    if gguf or (out is not None and out.suffix == ".gguf"):
        if not gguf or recipe.layout not in (None, "gguf", "single-file") or out is None or out.suffix != ".gguf":
            names = [n for n in QUANT_DTYPES if codec(n).layout == "gguf"]  # type: ignore[union-attr]
            raise RecipeError(f"{out}: a GGUF output is one .gguf file holding the denoiser (no diffusers layout): "
                              f"pass --out NAME.gguf with --dtype {' or '.join(names)} (and no --layout)")
        return "gguf"
    layout = recipe.layout or ("single-file" if out is not None and out.suffix == ".safetensors" else "diffusers")
    if fmt is not None and layout != fmt.layout:  # diffusers has no folder convention for these files
        raise RecipeError(f"--dtype {recipe.dtype} writes a {fmt.layout} file (the layout its loaders read), not a "
                          f"diffusers folder; use --layout {fmt.layout} or an --out ending in {fmt.extension}")
    return layout


def canonical_recipe(recipe: Recipe, family: Family, models: list[LocalModel], idents: list[dict[str, Any]],
                     tasks: list[Task], hashes: dict[Path, str],
                     loras: list[dict[str, Any]] | None = None) -> dict[str, Any]:
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
    if loras:
        out["loras"] = loras
        if recipe.lora_skip_unknown:
            out["lora_skip_unknown"] = True
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


def _donor(models: list[LocalModel], family: Family, recipe: Recipe, layout: str | None) -> list[LocalModel]:
    """Components no input has (every input transformer-only) come from --config-from's weights when it names a
    local diffusers folder; a diffusers output cannot do without them."""
    folders = any(m.layout == "diffusers" for m in models)  # an optional part no folder has: the model has none
    missing = [c for c in family.components if not any(c in m.components for m in models)
               and not (folders and c in family.optional)]
    if not missing or layout is None:
        return []
    ref = parse_ref(recipe.config_from) if recipe.config_from else None
    if ref is not None and not ref.is_hub and ref.local and (ref.local / "model_index.json").is_file():
        donor = open_model(ref.local, variant=recipe.variant, components=missing)
        if donor.family.id != family.id:
            raise InputError(f"{recipe.config_from}: --config-from is {donor.family.name}, the inputs are "
                             f"{family.name}")
        return [donor]
    if layout not in ("single-file", "gguf"):
        raise InputError(f"the inputs hold no {', '.join(missing)} (transformer-only files): a diffusers output "
                         f"needs them; pass --config-from <a local {family.name} diffusers folder> to copy them "
                         "from, or write a single file")
    return []


def _execute(tasks: list[Task], write, settings: engine.Settings, desc: str, summary: Summary,
             names: list[str], spans_allowed: bool = True) -> dict[str, Any]:
    """Run the merge tasks through the engine on the chosen device; returns what the engine did. Inputs with
    NaN/inf elements are counted in the same pass and reported per component and model (summary "nonfinite").
    On the CPU, a merge whose every task has a native kernel (or is a copy) runs on spans, without torch, unless
    `write` wants tensors (spans_allowed=False)."""
    device = None if plain_cpu(settings.device) else resolve_device(settings.device)  # None: the CPU, no torch
    on_cpu = device is None or device.type == "cpu"
    workers = settings.workers or (engine.default_workers() if on_cpu else 1)
    budget = device_budget(device, settings.max_memory)
    chunk = engine.chunk_elements(dataclasses.replace(settings, max_memory=budget), workers)
    merged = [t for t in tasks if t.method is not None and t.channels is None]
    kernels = Kernels(settings.kernels, device=device, total_elements=sum(t.numel for t in merged),
                      log=lambda msg: summary.add("note", msg))
    signatures: dict[tuple, tuple] = {}
    for t in merged:
        dtypes = [r.dtype_name for r in t.refs]
        signatures.setdefault(Kernels.key(t.method, dtypes, t.dtype_name), (t.method, dtypes, t.dtype_name))
    bad: dict[tuple[str, int], tuple[int, set[str]]] = {}  # (component, model) -> (count, keys)
    lock = threading.Lock()

    def counter(job: engine.Job, counts: list[int]) -> None:
        with lock:
            for i, n in zip(job.task.sources, counts):
                if n:
                    total, keys = bad.get((job.task.component, i), (0, set()))
                    bad[(job.task.component, i)] = (total + n, keys | {job.task.key})

    try:
        # spans need the native library: its kernels, and its scan for NaN/inf (decided before torch is imported)
        spans = (spans_allowed and device is None and kernels.use_native
                 and all(span_ready(t, kernels) for t in tasks))
        with contextlib.nullcontext() if spans else engine.parallel_across_chunks(workers):
            kernels.start(list(signatures.values()), quantized=any(t.quant for t in tasks))
            engine.run_merge(engine.split_jobs(tasks, chunk), write, kernels, workers=workers, desc=desc,
                             quiet=settings.quiet, nonfinite=counter, spans=spans, progress=settings.progress,
                             cancel=settings.cancel)
    finally:
        kernels.close()
    for (component, i), (n, keys) in sorted(bad.items()):
        summary.add("nonfinite", f"{component}: {n} non-finite (NaN/inf) elements in {names[i]} ({len(keys)} "
                                 f"tensors, e.g. {sorted(keys)[0]})")
    return {"device": str(device or "cpu"), "torch": not spans, "workers": workers, "chunk_elements": chunk,
            "kernels": dict(kernels.calls),
            "native_build_seconds": kernels.native_build_seconds, "compile_seconds": kernels.compile_seconds}


def _plan(recipe: Recipe, resolver: Resolver, layout: str | None) -> tuple:
    """Inputs opened and every task planned, the same for a merge to files and one in memory: (recipe for the
    family with block lists expanded, models, their identities, family, the --config-from donor, tasks, summary,
    structure, LoRAs)."""
    models, idents = open_inputs(recipe, resolver)
    family = check_same_family(models)
    if recipe.family and recipe.family != family.id:
        raise RecipeError(f"{recipe.source}: the recipe is for {recipe.family} models, the inputs are {family.id}")
    if family.generic:
        check_same_keys(models)
        if layout not in (None, "single-file"):
            raise RecipeError(f"{recipe.output}: an unrecognised architecture is written as one .safetensors file, "
                              "as its inputs are; give --out NAME.safetensors")
    recipe = recipe.for_family(family)
    donor = _donor(models, family, recipe, layout)
    recipe, notes = expand_block_lists(recipe, family, models)
    tasks, summary, structure = plan_merge(models + donor, recipe, family)
    if family.generic:
        summary.add("note", "family not recognised: merged key by key")
    for note in notes:
        summary.add("note", note)
    loras = attach_loras(recipe, resolve_local, models, structure, tasks, summary)  # pinned as recorded
    return recipe, models, idents, family, donor, tasks, summary, structure, loras


def merge(recipe: Recipe, *, out: str | Path | None = None, overwrite: bool = False, dry: bool = False,
          quiet: bool = False, workers: int | None = None, settings: engine.Settings | None = None,
          resolver: Resolver = resolve_local) -> MergeResult:
    """Merge as `recipe` says; write to `out` (or recipe.output). With dry=True, only analyze.
    `settings` chooses device, memory budget, workers and fused kernels (engine.Settings), and carries the progress
    callback and the cancel event (a cancelled merge raises errors.Cancelled and leaves `out` as it was)."""
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
        if layout in ("single-file", "gguf"):
            check_target(_sidecar(target), overwrite)
    # resolvers (the Hub) see where the output goes: a diffusers folder also copies model a's other components
    recipe = dataclasses.replace(recipe, layout=layout, output=str(target) if target else None)
    recipe, models, idents, family, donor, tasks, summary, structure, loras = _plan(recipe, resolver, layout)
    placeholder = canonical_recipe(recipe, family, models, idents, tasks, {}, loras)
    prediction = choose_prediction(models, recipe, family, summary)
    if dry:
        names = {c: recipe.plan_for(c).get("models") or [recipe.plan_for(c)["from"]] for c in family.components}
        from hubmix.engine import analysis

        report = analysis.analyze(tasks, names, quiet=settings.quiet, workers=settings.workers)
        return MergeResult(None, None, family, summary, placeholder, report=report)
    assert target is not None and layout is not None
    source = config_source(models, family, recipe) if layout not in ("single-file", "gguf") or any(
        m.components[c].config_source == "inferred" for m in models for c in m.components) else None
    configs = output_configs(models + donor, structure, family, source, summary)
    # the input hashes read the mappings the engine reads, on their own threads, while it runs
    hashes = input_hashes({r.file.path: r.file for t in tasks for r in t.refs}.values()).start()
    sidecar = _sidecar(target) if layout in ("single-file", "gguf") else None
    # Wan 2.2's two experts as single files: two files named from --out, installed together with the recipe
    finals = list(split_targets(family, list(configs), target).values()) if layout == "single-file" else []
    if finals:
        summary.add("note", f"the {family.name} experts as {len(finals)} files: {', '.join(f.name for f in finals)}")
    with atomic_target(finals[0] if finals else target, overwrite,
                       companions=(*finals[1:], sidecar) if sidecar else ()) as stage:
        tmp = stage.path
        router = plan_outputs(tmp, target, layout, tasks, models, structure, family, configs, source, recipe,
                               prediction, placeholder, summary, stage=stage)
        try:
            router.open()
            stats = _execute(router.wanted(tasks), router.write, settings,
                             "converting" if recipe.method == "copy" else "merging", summary,
                             [f"{letter(i)} ({m.name})" for i, m in enumerate(models)])
            canonical = canonical_recipe(recipe, family, models, idents, tasks, hashes.result(), loras)
            stats["hashed_files"] = len(hashes.pending)
            final = file_metadata(canonical)
            for f in router.files:  # the input hashes were computed during the merge: same-length placeholders
                assert f.writer is not None
                f.writer.set_metadata({**f.metadata, **{k: final[k] for k in ("hubmix.recipe",
                                                                                "hubmix.recipe_sha256")}})
            if settings.cancel is not None and settings.cancel.is_set():  # set after the last chunk: still honoured
                raise Cancelled(f"{recipe.method}: cancelled")
            router.finish()
        except Cancelled as e:
            hashes.cancel()
            router.abort()
            raise Cancelled(f"{target}: {e}; nothing was written") from None
        except BaseException:
            hashes.cancel()
            router.abort()
            raise
        # the recipe is staged with the weights and renamed in with them (engine.target): together or not at all
        recipe_file = stage.beside(sidecar) if sidecar else tmp / "recipe.yaml"
        write_new(recipe_file, recipe_yaml(canonical))
        written = finals or [target / f.path.relative_to(tmp) if layout not in ("single-file", "gguf") else target
                             for f in router.files]
    written.append(sidecar or target / "recipe.yaml")
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
    _, models, _, _, _, tasks, summary, _, _ = _plan(recipe, resolver, None)
    tasks = [t for t in tasks if t.method is not None or not merged_only]
    dest = {(t.component, t.key): (into(t.component, t.key) if into else None) for t in tasks}
    for t in tasks:
        d = dest[(t.component, t.key)]
        if d is None or not d.is_contiguous():  # written flat, chunk by chunk
            dest[(t.component, t.key)] = torch.empty(t.shape, dtype=t.out_dtype)

    def write(job: engine.Job, data: Any) -> None:
        dest[(job.task.component, job.task.key)].view(-1)[job.start:job.stop].copy_(data.reshape(-1))

    _execute(tasks, write, settings, "merging", summary, [f"{letter(i)} ({m.name})" for i, m in enumerate(models)],
             spans_allowed=False)  # the chunks are copied into tensors
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
