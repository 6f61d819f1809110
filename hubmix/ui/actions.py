"""What the page's buttons and its named API endpoints do, without Gradio: each takes the recipe YAML (the form's
contract) and calls the library's one flow (hubmix.flow.run.run) as `hubmix merge --recipe` does, so a merge here
gives the CLI's bytes. Every output goes to its own fresh folder under the work folder (several tabs at once never
share one); errors are the library's one-line HubmixErrors, raised before anything is written."""

from __future__ import annotations

import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable

from hubmix.errors import HubmixError, RecipeError
from hubmix.ui.form import recipe_from_yaml


def work_root() -> Path:
    """Where the page's results go when no output path is given: $HUBMIX_UI_DIR, else <tmp>/hubmix-ui."""
    root = Path(os.environ.get("HUBMIX_UI_DIR") or Path(tempfile.gettempdir()) / "hubmix-ui")
    root.mkdir(parents=True, exist_ok=True)
    return root


def fresh_dir(kind: str) -> Path:
    """A new, empty folder of its own for one action (a merge, samples, a sweep, a dry-run plot)."""
    return Path(tempfile.mkdtemp(prefix=f"{kind}-", dir=work_root()))


def _output_path(recipe: Any, out: str | None) -> Path:
    """`out` as given; none: the recipe's output name (or `merged`) in a fresh folder."""
    if out and str(out).strip():
        return Path(str(out).strip()).expanduser()
    name = Path(recipe.output).name if recipe.output else "merged"
    return fresh_dir("merge") / name


def report_rows(report: dict[str, Any]) -> list[list[Any]]:
    """The dry run's report as table rows: component, block, input, cosine, relative L2, ls scale, share."""
    rows = []
    for comp, data in report.items():
        for block, row in [("all", data["total"])] + list(data["blocks"].items()):
            share = ", ".join(f"{n} {100 * v:.1f}%" for n, v in (row.get("share") or {}).items() if v is not None)
            for name, s in row["inputs"].items():
                rows.append([comp, block, name] + [None if s.get(k) is None else round(float(s[k]), 4)
                                                   for k in ("cosine", "rel_l2", "ls_scale")] + [share])
    return rows


ROW_HEADERS = ["component", "block", "input", "cosine", "rel L2", "ls scale", "share"]


def dry_run(recipe_yaml: str, *, plot: bool = True) -> tuple[dict[str, Any], Path | None]:
    """The similarity report (as `hubmix merge --dry --json` prints it) and its plot (a PNG in a fresh folder)."""
    from hubmix.flow.run import RunOptions, run

    recipe = recipe_from_yaml(recipe_yaml)
    png = fresh_dir("dry") / "similarity.png" if plot else None
    flow = run(recipe, RunOptions(dry=True, quiet=True, plot=png))
    result = flow.merge
    from hubmix.recipe import letter, model_entry

    report = {"family": result.family.id, "models": {letter(i): model_entry(m)["ref"]
                                                     for i, m in enumerate(recipe.models)},
              "report": result.report, "summary": result.summary.to_dict()}
    return report, png


def merge(recipe_yaml: str, out: str | None = None, *, progress: Callable[[int, int, str], None] | None = None,
          cancel: threading.Event | None = None, log: Callable[[str, str], None] | None = None,
          overwrite: bool = False) -> dict[str, Any]:
    """Merge as `hubmix merge --recipe FILE --out OUT --json` does and return what it prints (the output path,
    layout, recipe hash, files, summary). Stop (`cancel`) leaves nothing at the output path."""
    from hubmix.flow.run import RunOptions, run

    recipe = recipe_from_yaml(recipe_yaml)
    target = _output_path(recipe, out)
    flow = run(recipe, RunOptions(out=target, overwrite=overwrite, quiet=True), progress=progress, cancel=cancel,
               log=log)
    r = flow.merge
    return {"output": str(r.output), "layout": r.layout, "family": r.family.id, "recipe_sha256": r.recipe_sha256,
            "files": [str(f) for f in r.files], "summary": r.summary.to_dict(), "text": r.summary.render()}


def _spec(prompts: str | list[str] | None, seeds: str | list[int] | None, steps: Any, size: str | None):
    from hubmix.render.spec import RenderSpec, parse_size

    prompt_list = [p.strip() for p in prompts.splitlines()] if isinstance(prompts, str) else list(prompts or [])
    prompt_list = [p for p in prompt_list if p] or ["a photo of a cat"]
    if isinstance(seeds, str):
        try:
            seed_list = [int(s) for s in seeds.replace(",", " ").split()]
        except ValueError:
            raise RecipeError(f"seeds: whole numbers separated by commas, got {seeds!r}") from None
    else:
        seed_list = [int(s) for s in (seeds or [])]
    try:
        n_steps = int(steps or 20)
    except (TypeError, ValueError):
        raise RecipeError(f"steps: a whole number, got {steps!r}") from None
    return RenderSpec(prompts=prompt_list, seeds=seed_list or [0], steps=n_steps,
                      size=parse_size(str(size).strip()) if size and str(size).strip() else None, quiet=True)


def samples(recipe_yaml: str, prompts: Any = None, seeds: Any = None, steps: Any = 20,
            size: str | None = None) -> tuple[Path, list[tuple[str, str]], str]:
    """Merge into a fresh folder with the inputs' and the merge's samples (as `merge --samples`): returns the grid,
    the images with their captions, and the merge's output path."""
    from hubmix.flow.run import RunOptions, run

    recipe = recipe_from_yaml(recipe_yaml)
    spec = _spec(prompts, seeds, steps, size)
    spec.check()
    flow = run(recipe, RunOptions(out=_output_path(recipe, None), quiet=True, samples=spec))
    folder = Path(flow.samples)
    index = json.loads((folder / "samples.json").read_text())
    images = [(str(folder / im["file"]), f"{im['model']} | {im['prompt']} | seed {im['seed']}")
              for im in index["images"]]
    return folder / index["grid"], images, str(flow.merge.output)


def sweep(recipe_yaml: str, vary: str | list[str], prompts: Any = None, seeds: Any = None, steps: Any = 20,
          size: str | None = None) -> Path:
    """`hubmix sweep --recipe FILE --vary ...`: one merge per point, rendered into a grid; returns the grid."""
    from hubmix.render.sweep import sweep as run_sweep

    recipe = recipe_from_yaml(recipe_yaml)
    texts = [v.strip() for v in (vary.split(";") if isinstance(vary, str) else vary) for v in v.split()
             if v.strip()] if vary else []
    out = fresh_dir("sweep") / "sweep"
    run_sweep(recipe, texts, _spec(prompts, seeds, steps, size), out)
    return out / "grid.png"


def card(result_path: str, repo_id: str | None = None) -> str:
    """The model card a push of the result would upload, as markdown."""
    from hubmix.flow.publish import card_preview

    if not result_path or not Path(result_path).exists():
        raise RecipeError(f"{result_path or 'result'}: nothing to push yet (merge first)")
    return card_preview(result_path, repo_id or None)


def push(result_path: str, repo_id: str | None = None, private: bool = False, branch: str | None = None) -> str:
    """Push the result (with its card) in one commit; returns the commit URL."""
    from hubmix.flow.publish import push_result

    return push_result(result_path, repo_id or None, private=bool(private), branch=branch or None).commit_url


def recipe(models: str | list[str], method: str, params_json: str | dict | None = None, **form: Any) -> str:
    """The canonical recipe YAML of a form: models (lines or a list), a method and its parameters as JSON."""
    from hubmix.ui.form import build_recipe

    if isinstance(params_json, str):
        try:
            params = json.loads(params_json) if params_json.strip() else {}
        except json.JSONDecodeError as e:
            raise RecipeError(f"params: not JSON ({e.msg} at column {e.colno})") from None
    else:
        params = dict(params_json or {})
    if not isinstance(params, dict):
        raise RecipeError("params: a JSON object such as {\"alpha\": 0.3}")
    text = "\n".join(models) if isinstance(models, (list, tuple)) else models
    return build_recipe(text, method, params, **form).to_yaml()


def remote(recipe_yaml: str, repo_id: str | None, flavor: str | None = None, *, private: bool = False,
           log: Callable[[str, str], None] | None = None, detach: bool = False) -> dict[str, Any]:
    """Run the merge as a Hugging Face Job that pushes the result to `repo_id` (`merge --remote --push`); the job's
    log lines reach `log("line", text)`. Returns the job's id, status and where the result went."""
    from hubmix.flow.run import Remote, RunOptions, run

    recipe = recipe_from_yaml(recipe_yaml)
    flow = run(recipe, RunOptions(push=repo_id or "", private=bool(private),
                                  remote=Remote(flavor=flavor or None, detach=detach)), log=log)
    r = flow.remote
    info: dict[str, Any] = {"repo_id": flow.repo_id, "job_id": getattr(r, "job_id", None),
                            "url": getattr(r, "url", None)}
    outcome = getattr(r, "outcome", None)
    if outcome is not None:
        info.update(stage=outcome.stage, message=outcome.message, commit_url=outcome.commit_url)
    return info


def flavors() -> list[str]:
    """The job flavors with their hourly prices, as the Hub lists them (none when it cannot be asked)."""
    try:
        from hubmix.hub.jobs import hardware_lines

        return hardware_lines()
    except HubmixError:
        return []


__all__ = ["dry_run", "merge", "samples", "sweep", "card", "push", "recipe", "remote", "flavors", "report_rows", "ROW_HEADERS",
           "work_root", "fresh_dir", "HubmixError"]
