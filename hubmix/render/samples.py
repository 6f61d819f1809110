"""`hubmix samples`: render every model on every prompt x seed with diffusers under fixed conventions (spec.py),
write one PNG per image, a labelled `grid.png` and `samples.json`; `add_samples` does the same for a merge result
and its inputs, into the result's `samples/`, with the dry-run plot beside.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from hubmix.errors import InputError
from hubmix.formats.families import all_component_names
from hubmix.formats.model import open_model
from hubmix.flow.merging import resolve_local
from hubmix.flow.outputs import config_source, output_configs
from hubmix.recipe import ComponentRecipe, Recipe, letter, model_entry
from hubmix.render.spec import RenderError, RenderSpec

CONVENTIONS = ("diffusers text-to-image pipeline of the model's family with the model's own scheduler; "
               "generator=torch.Generator('cpu').manual_seed(seed); no safety checker, no watermark; "
               "the pipeline's image saved as PNG without post-processing")

SLOW_CPU = "a full-size SD1.5 takes about 1 min per step at 512x512 on a 2-core CPU (docs/samples.md)"


@dataclass
class Image:
    file: str
    model: str
    prompt: str
    seed: int
    width: int
    height: int
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. a sweep point's parameters, a result flag


def resolve_for_render(ref: Any) -> Path:
    """A model reference (a local path, a Hub reference, or a canonical recipe's entry) -> a local path, with every
    component a render needs fetched (and none of the extras a diffusers merge output would copy)."""
    ref = ref if isinstance(ref, dict) else str(ref)
    recipe = Recipe(models=[ref], method="copy", layout="single-file", source="samples",
                    components={c: ComponentRecipe(from_="a") for c in all_component_names()})
    return resolve_local(ref, recipe)[0]


def open_subjects(refs: list[tuple[str, Path]], config_from: str | Path | None = None) -> list:
    """(name, local path) pairs -> Subjects, each checked renderable before anything is loaded."""
    import diffusers

    from hubmix.engine.plan import Summary
    from hubmix.render.pipes import Subject

    models = [(name, open_model(path)) for name, path in refs]
    source = config_source([], models[0][1].family, Recipe(models=[], method="copy", config_from=str(config_from))
                            ) if config_from else None
    subjects = []
    for name, m in models:
        fam = m.family
        if m.inpainting:
            raise RenderError(f"{name}: an inpainting model needs an image and a mask; samples renders "
                              "text-to-image models only")
        if not hasattr(diffusers, fam.pipeline):
            raise RenderError(f"{name}: diffusers {diffusers.__version__} has no {fam.pipeline} to render "
                              f"{fam.name} models")
        folder = m.path if m.layout == "diffusers" else source or next(
            (o.path for _, o in models if o.layout == "diffusers" and o.family.id == fam.id), None)
        if folder is None or not (folder / "model_index.json").is_file():
            raise RenderError(f"{name}: a single file has no tokenizer or scheduler; pass --config-from <a "
                              f"diffusers folder or Hub repo of its family>, e.g. {fam.default_config_repo}")
        if any(c not in m.components for c in fam.components) and folder != m.path:
            base = open_model(folder)  # a transformer-only file: the text encoder and VAE from the folder
            m.components = {**{c: base.components[c] for c in fam.components if c in base.components},
                            **m.components}
        configs = output_configs([m], {c: 0 for c in fam.components if c in m.components}, fam, folder, Summary())
        subjects.append(Subject(name, m, folder, configs))
    return subjects


def display_name(ref: Any) -> str:
    """How a model is named in labels and samples.json: a Hub reference as given, a local path by its name only
    (no local path leaves the machine in a pushed result)."""
    from hubmix.hub.refs import parse_ref

    text = model_entry(ref)["ref"]
    try:
        return text if parse_ref(text).is_hub else Path(text).name
    except InputError:
        return Path(text).name


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-._")[-60:].strip("-._") or "model"


def render_grid_of(subjects: list, spec: RenderSpec, out: Path, *, extra: Callable[[int], dict] | None = None,
                   names: list[str] | None = None, before: Callable[[int, Any], None] | None = None,
                   reload: bool = True) -> list[Image]:
    """Render rows (subjects) x prompts x seeds into `out` (an existing folder); returns the images in order.
    `before(i, renderer)` runs after subject i is loaded (a sweep writes its merged weights there); with
    `reload=False` only the first subject is loaded."""
    from tqdm.auto import tqdm

    from hubmix.engine.devices import resolve_device
    from hubmix.render.pipes import Renderer

    device = resolve_device(spec.device)
    dtype = spec.torch_dtype(device)
    names = names or [s.name for s in subjects]
    sizes = [spec.size or s.default_size() for s in subjects]
    per_row = len(spec.prompts) * len(spec.seeds)
    total = len(subjects) * per_row
    shown = ", ".join(sorted({f"{w}x{h}" for w, h in sizes}))
    if not spec.quiet:
        import click

        click.echo(f"rendering {total} images ({len(subjects)} x {len(spec.prompts)} prompt(s) x {len(spec.seeds)} "
                   f"seed(s)) at {shown}, {spec.steps} steps, on {device} ({str(dtype).removeprefix('torch.')})"
                   + (f"; {SLOW_CPU}" if device.type == "cpu" and max(w * h for w, h in sizes) >= 512 * 512
                      else ""), err=True)
    renderer = Renderer(device, dtype)
    images: list[Image] = []
    used: set[str] = set()
    with tqdm(total=total, desc="images", unit="img", disable=spec.quiet, dynamic_ncols=True) as bar, \
            tqdm(total=spec.steps, desc="steps", unit="step", disable=spec.quiet, leave=False, position=1,
                 dynamic_ncols=True) as steps:
        for i, subject in enumerate(subjects):
            if reload or i == 0:
                renderer.load(subject)
            if before:
                before(i, renderer)
            stem = slug(names[i])
            while stem in used:
                stem += "_"
            used.add(stem)
            for pi, prompt in enumerate(spec.prompts):
                for seed in spec.seeds:
                    steps.reset(total=spec.steps)

                    def on_step(total: int) -> None:
                        steps.total = total
                        steps.update(1)
                    img = renderer.render(prompt, seed, negative=spec.negative_prompt, steps=spec.steps,
                                          size=sizes[i], guidance=spec.guidance_for(subject.family),
                                          on_step=on_step)
                    name = f"{stem}-p{pi}-s{seed}.png"
                    img.save(out / name, format="PNG")
                    clip = save_clip(renderer.last_clip, out / f"{stem}-p{pi}-s{seed}.webp")
                    meta = {"scheduler": type(renderer.pipe.scheduler).__name__,
                            "guidance": spec.guidance_for(subject.family), "steps": spec.steps,
                            "negative_prompt": spec.negative_prompt, "dtype": str(dtype).removeprefix("torch."),
                            "device": device.type, **({"clip": clip} if clip else {}), **(extra(i) if extra else {})}
                    images.append(Image(name, names[i], prompt, seed, sizes[i][0], sizes[i][1], meta))
                    bar.update(1)
    return images


def save_clip(frames: list | None, path: Path, fps: int = 16) -> str | None:
    """A video sample's whole clip beside its first frame: an animated, lossless WebP (Wan's 16 frames a second);
    its file name, or None for an image model."""
    if not frames or len(frames) < 2:
        return None
    frames[0].save(path, format="WEBP", save_all=True, append_images=frames[1:], duration=round(1000 / fps),
                   loop=0, lossless=True)
    return path.name


def write_index(out: Path, images: list[Image], spec: RenderSpec | None, *, labels: list[str] | None = None,
                extra: dict[str, Any] | None = None, index_name: str = "samples.json") -> None:
    """grid.png (rows in image order, columns prompt x seed) and the JSON index."""
    from hubmix.render.grid import make_grid

    cols = len(spec.prompts) * len(spec.seeds) if spec else 1
    rows = [images[i:i + cols] for i in range(0, len(images), cols)]
    if rows:
        make_grid([[(out / im.file, f"{labels[r] if labels else im.model}\nseed {im.seed}: {im.prompt}")
                    for im in row] for r, row in enumerate(rows)]).save(out / "grid.png", format="PNG")
    data = {"conventions": CONVENTIONS, **({"grid": "grid.png"} if rows else {}), **(extra or {}),
            "images": [{"file": im.file, "model": im.model, "prompt": im.prompt, "seed": im.seed,
                        "width": im.width, "height": im.height, **im.extra} for im in images]}
    (out / index_name).write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def render_samples(models: list[str | Path], spec: RenderSpec, out: str | Path, *, overwrite: bool = False,
                   config_from: str | Path | None = None, names: list[str] | None = None) -> Path:
    """`hubmix samples`: every model on every prompt x seed into `out` (written atomically)."""
    from hubmix.engine.target import atomic_target, check_target

    spec.check()
    if not models:
        raise InputError("samples: name at least one model")
    out = Path(out)
    check_target(out, overwrite)
    refs = [(names[i] if names else display_name(m), resolve_for_render(m)) for i, m in enumerate(models)]
    subjects = open_subjects(refs, config_from)
    with atomic_target(out, overwrite) as stage:
        tmp = stage.path
        tmp.mkdir()
        images = render_grid_of(subjects, spec, tmp)
        write_index(tmp, images, spec)
    return out


def add_samples(result: Any, recipe: Recipe, spec: RenderSpec | None, *, plot: bool = True, settings: Any = None,
                resolver: Any = resolve_local) -> Path:
    """After a merge: render its inputs and the result into the result's samples folder (replaced), with the
    dry-run plot as `similarity.png` (`spec` None: the plot only). `result` is a MergeResult (hubmix.flow.merging)."""
    from hubmix.engine.target import atomic_target
    from hubmix.flow.result import samples_dir

    target = samples_dir(result.output)
    images: list[Image] = []
    if spec is not None:
        spec.check()
        refs = [(f"{letter(i)}: {display_name(m)}", resolve_for_render(m)) for i, m in enumerate(recipe.models)]
        refs.append(("merged", result.output))
        subjects = open_subjects(refs, recipe.config_from)
    with atomic_target(target, True) as stage:
        tmp = stage.path
        tmp.mkdir()
        if spec is not None:
            images = render_grid_of(subjects, spec, tmp, extra=lambda i: {"result": True} if i == len(refs) - 1
                                    else {})
        extra: dict[str, Any] = {}
        if plot:
            from hubmix.flow.merging import merge
            from hubmix.render.plot import save_plot

            dry = merge(recipe, dry=True, settings=settings, resolver=resolver)
            save_plot(dry.report or {}, tmp / "similarity.png", f"{recipe.method}: inputs against a")
            extra["plot"] = "similarity.png"
        write_index(tmp, images, spec, extra=extra)
    return target
