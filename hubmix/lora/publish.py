"""The extract-lora flow: extract (lora.extract), optionally render samples (base, base + LoRA at 0.5 and 1,
tuned) beside the file, and push the file, its samples and a LoRA card (base_model, base_model_relation: adapter)
with the same push code merges use."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hubmix.lora.extract import ExtractOptions, Extraction, extract_lora

STRENGTHS = (0.5, 1.0)


@dataclass
class ExtractDone:
    extraction: Extraction
    samples: Path | None = None
    push: Any = None  # hub.push.PushResult

    def summary(self) -> dict[str, Any]:
        e = self.extraction
        out = {"output": str(e.output), "family": e.family.id, "components": {c: s.to_dict() for c, s in
                                                                             e.components.items()},
               "zero_deltas": e.zero, "changed_not_layers": e.changed, "skipped": e.skipped}
        if self.push is not None:
            out["push"] = {"repo_id": self.push.repo_id, "commit": self.push.commit_sha, "url": self.push.commit_url}
        return out

    def render(self, limit: int = 8) -> str:
        e = self.extraction
        lines = [f"wrote {e.output} ({e.family.name}, {e.metadata.get('hubmix.format')} names)"]
        for c, s in e.components.items():
            d = s.to_dict()
            ranks = str(d["rank_min"]) if d["rank_min"] == d["rank_max"] else f"{d['rank_min']}-{d['rank_max']}"
            lines.append(f"  {c}: {d['layers']} layers, rank {ranks}, {100 * d['energy_kept']:.2f}% of the delta's "
                         f"energy kept ({d['randomized']} randomized SVD, {d['exact']} exact)")
        for title, items in (("layers whose delta is zero, left out", e.zero),
                             ("other tensors that changed (biases, norms, embeddings; --with-diffs writes them)",
                              e.changed), ("skipped", e.skipped)):
            if items:
                lines.append(f"{title}: {len(items)}")
                lines += [f"  {x}" for x in items[:limit]]
                if len(items) > limit:
                    lines.append(f"  ... and {len(items) - limit} more (--json lists all)")
        if self.samples:
            lines.append(f"samples: {self.samples}")
        if self.push is not None:
            lines.append(f"pushed: {self.push.commit_url}")
        return "\n".join(lines)


def extract_and_publish(tuned: str, base: str, out: str | Path, options: ExtractOptions, *, overwrite: bool = False,
                        quiet: bool = False, push: str | None = None, private: bool = False,
                        samples: bool = False, spec: Any = None) -> ExtractDone:
    if push:
        from hubmix.hub.push import push_target

        push = push_target(push, Path(out).stem)
    done = ExtractDone(extract_lora(tuned, base, out, options, overwrite=overwrite, quiet=quiet))
    if samples:
        done.samples = render_lora_samples(tuned, base, Path(out), spec, quiet=quiet)
    if push:
        from hubmix.hub.push import push as upload

        with tempfile.TemporaryDirectory() as tmp:
            card = lora_card(done.extraction, Path(tmp) / "README.md", push)
            done.push = upload(done.extraction.output, push, card, private=private)
    return done


def lora_card(e: Extraction, path: Path, repo_id: str) -> Any:
    """The LoRA's model card: base_model (the base's Hub repo), base_model_relation adapter, tags lora + family."""
    from huggingface_hub import ModelCard, ModelCardData

    from hubmix.hub.card import Card
    from hubmix.flow.result import samples_dir

    base_repo = e.base.get("repo")
    data = ModelCardData(library_name="diffusers", pipeline_tag="text-to-image", base_model=base_repo,
                         tags=["lora", "hubmix", *e.family.tags, e.family.id],
                         **({"base_model_relation": "adapter"} if base_repo else {}))
    m = e.metadata
    lines = [f"# {repo_id.split('/')[-1]}", "",
             f"A {e.family.name} LoRA extracted with hubmix {m['hubmix.version']}: the difference between "
             f"`{m['hubmix.tuned_model']}` and its base `{m['hubmix.base_model']}`, as a truncated SVD of every "
             f"Linear and Conv weight's delta (rank {m['hubmix.rank']}, conv rank {m['hubmix.conv_rank']}, "
             f"{m['hubmix.format']} key names).", "",
             "| component | layers | rank | energy kept |", "|---|---|---|---|"]
    for c, s in e.components.items():
        d = s.to_dict()
        lines.append(f"| {c} | {d['layers']} | {d['rank_min']}-{d['rank_max']} | {100 * d['energy_kept']:.2f}% |")
    grid = samples_dir(e.output) / "grid.png"
    if grid.is_file():
        lines += ["", "Samples (rows: base, base + LoRA at 0.5, base + LoRA at 1, tuned):", "",
                  "![samples](samples/grid.png)"]
    lines += ["", "## Use", "", "```python", "from diffusers import DiffusionPipeline", "",
              f"pipe = DiffusionPipeline.from_pretrained(\"{base_repo or m['hubmix.base_model']}\")",
              f"pipe.load_lora_weights(\"{repo_id}\", weight_name=\"{e.output.name}\")", "```", "",
              "Bake it into a model: `hubmix merge BASE --method copy --lora "
              f"{repo_id}/{e.output.name}:1 -o out`.", ""]
    text = f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)
    path.write_text(str(ModelCard(text)), encoding="utf-8")
    summary = f"LoRA extracted from {m['hubmix.tuned_model']} against {m['hubmix.base_model']}"
    return Card(path, text, None, [], summary, "")


def render_lora_samples(tuned: str, base: str, lora: Path, spec: Any, quiet: bool = False) -> Path:
    """`<stem>.samples/`: base, base + LoRA at each of STRENGTHS, tuned (the LoRA added to the loaded base)."""
    from hubmix.engine.target import atomic_target
    from hubmix.formats.lora import read_lora
    from hubmix.engine.lora_weights import module_update
    from hubmix.render.samples import open_subjects, render_grid_of, resolve_for_render, write_index
    from hubmix.render.spec import RenderSpec
    from hubmix.flow.result import samples_dir

    spec = spec or RenderSpec(quiet=quiet)
    spec.check()
    bpath, tpath = resolve_for_render(base), resolve_for_render(tuned)
    names = ["base", *(f"base + LoRA {s:g}" for s in STRENGTHS), "tuned"]
    subjects = open_subjects([(n, bpath) for n in names[:-1]] + [("tuned", tpath)])
    comps = subjects[0].model.components

    def before(i: int, renderer: Any) -> None:
        if not 1 <= i <= len(STRENGTHS):
            return
        strength = STRENGTHS[i - 1]
        modules, _ = read_lora(lora, lora.name, comps, {c: strength for c in comps}, True)
        for m in modules:
            w = renderer.targets(m.component)(m.key)
            w.add_((module_update(m, tuple(w.shape)) * m.strength).to(w.dtype))

    target = samples_dir(lora)
    with atomic_target(target, True) as stage:
        stage.path.mkdir()
        images = render_grid_of(subjects, spec, stage.path, names=names, before=before)
        write_index(stage.path, images, spec)
    return target
