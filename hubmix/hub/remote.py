"""`merge --remote`: one merge as a Hugging Face Job, or a sweep (`--vary`) fanned out over one job per point, each
pushing to its own branch of one repo, with a summary card on main linking them. Built on `hub.jobs`."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from hubmix.errors import HubError, RecipeError
from hubmix.hub import install, jobs
from hubmix.hub.client import api, endpoint, hub_error
from hubmix.hub.install import JobInstall
from hubmix.hub.refs import parse_ref
from hubmix.recipe import Recipe, model_entry
from hubmix.recipe.vary import label_value, plan, point_name

Say = Callable[[str], None]
POLL_SECONDS = 2.0  # how often a sweep asks each running job's stage


def _quiet(_: str) -> None:
    pass


@dataclass
class RemoteOptions:
    flavor: str | None = None
    timeout: str | None = None
    install: str | None = None  # pip requirement the job installs (default: this hubmix, see hub.install)
    image: str | None = None
    detach: bool = False
    max_jobs: int = 4
    upload_inputs: bool = False
    private: bool = False
    branch: str | None = None
    create_pr: bool = False
    commit_message: str | None = None
    license: str | None = None


class LeftRunning(KeyboardInterrupt):
    """Ctrl-C while following: the jobs keep running."""

    def __init__(self, job_ids: list[str]):
        super().__init__(", ".join(job_ids))
        self.job_ids = job_ids


@dataclass
class RemoteRun:
    job_id: str
    url: str
    flavor: str
    outcome: jobs.Outcome | None = None  # None when detached


def upload_local_inputs(recipe: Recipe, ns: str, say: Say = _quiet) -> Recipe:
    """Each local input uploaded to a private repo `ns/hubmix-input-NAME`; the recipe then names it at that commit."""
    import dataclasses

    hub, models = api(), []
    for m in recipe.models:
        e = model_entry(m)
        ref = parse_ref(e["ref"]) if not e.get("repo") else None
        if ref is None or ref.is_hub or ref.local is None:
            models.append(m)
            continue
        path = ref.local.expanduser().resolve()
        repo = f"{ns}/hubmix-input-{re.sub(r'[^A-Za-z0-9._-]+', '-', path.stem).strip('-.') or 'model'}"[:96]
        say(f"uploading {e['ref']} to private repo {repo}")
        try:
            hub.create_repo(repo, private=True, exist_ok=True)
            if path.is_dir():
                info = hub.upload_folder(repo_id=repo, folder_path=path, ignore_patterns=[".*", "**/.*"],
                                         commit_message=f"hubmix: input {path.name}")
            else:
                info = hub.upload_file(path_or_fileobj=str(path), path_in_repo=path.name, repo_id=repo,
                                       commit_message=f"hubmix: input {path.name}")
        except Exception as e:  # noqa: BLE001
            raise hub_error(e, repo, action=f"uploading {path.name}") from None
        models.append(f"{repo}@{info.oid}" + ("" if path.is_dir() else f"/{path.name}"))
    return dataclasses.replace(recipe, models=models)


def _prepare(recipe: Recipe, opts: RemoteOptions, say: Say) -> tuple[Recipe, dict[str, str], str, JobInstall]:
    """Inputs pinned (uploaded first with --upload-inputs) and what the job installs made available and checked:
    everything that can fail does, before any job starts."""
    ns = jobs.namespace()
    if opts.upload_inputs:
        recipe = upload_local_inputs(recipe, ns, say)
    pinned, mounts = jobs.pin_inputs(recipe)
    inst = install.prepare(ns, opts.install, say)
    cost = jobs.flavor_cost(opts.flavor or jobs.DEFAULT_FLAVOR)
    say(f"flavor {cost or opts.flavor or jobs.DEFAULT_FLAVOR}; {len(mounts)} input repo(s) mounted read-only at "
        "their pinned commits")
    return pinned, mounts, ns, inst


def _spec(recipe: Recipe, mounts: dict[str, str], repo_id: str, out_name: str, opts: RemoteOptions, inst: JobInstall,
          branch: str | None, labels: dict[str, str] | None = None) -> jobs.JobSpec:
    return jobs.build_spec(recipe, repo_id, out_name, mounts=mounts, branch=branch, private=opts.private,
                           create_pr=opts.create_pr, commit_message=opts.commit_message, license=opts.license,
                           flavor=opts.flavor, timeout=opts.timeout, install=inst, image=opts.image,
                           labels=labels)


def remote_merge(recipe: Recipe, repo_id: str, out_name: str, opts: RemoteOptions, *, say: Say = _quiet,
                 on_line: Say | None = None) -> RemoteRun:
    """Run `recipe` as a job pushing to `repo_id`; follow it unless `opts.detach` (Ctrl-C: LeftRunning)."""
    pinned, mounts, ns, inst = _prepare(recipe, opts, say)
    spec = _spec(pinned, mounts, repo_id, out_name, opts, inst, opts.branch)
    info = jobs.submit(spec, ns)
    job_id = f"{ns}/{info.id}"
    say(f"started job {job_id}: {info.url}")
    run = RemoteRun(job_id, info.url, spec.flavor)
    if opts.detach:
        return run
    try:
        run.outcome = jobs.follow(job_id, on_line=on_line)
    except KeyboardInterrupt:
        raise LeftRunning([job_id]) from None
    return run


# ---- sweeps ---------------------------------------------------------------------------------------------------------

@dataclass
class PointRun:
    point: dict[str, float]
    branch: str
    job_id: str | None = None
    url: str | None = None
    outcome: jobs.Outcome | None = None


@dataclass
class SweepRun:
    repo_id: str
    points: list[PointRun] = field(default_factory=list)
    summary_url: str | None = None

    @property
    def exit_code(self) -> int:
        codes = [p.outcome.exit_code for p in self.points if p.outcome is not None]
        return max(codes, default=0)


def remote_sweep(recipe: Recipe, vary: list[str], repo_id: str, out_name: str, opts: RemoteOptions, *,
                 say: Say = _quiet, poll: float | None = None) -> SweepRun:
    """One job per point of `vary`, at most `opts.max_jobs` at once, each pushing to branch `alpha-0.3` (...) of
    `repo_id`; then a summary card on main linking the branches (at the start instead, when detached)."""
    points = plan(recipe, vary)  # every point's recipe checked before anything starts
    if opts.branch or opts.create_pr:
        raise RecipeError("--vary pushes each point to its own branch; drop --branch / --create-pr")
    if opts.detach and len(points) > opts.max_jobs:
        raise RecipeError(f"--detach starts all {len(points)} jobs at once: raise --max-jobs to {len(points)} or "
                          "drop --detach")
    pinned, mounts, ns, inst = _prepare(recipe, opts, say)
    try:
        api().create_repo(repo_id, private=opts.private, exist_ok=True)  # before the jobs, which push in parallel
    except Exception as e:  # noqa: BLE001
        raise hub_error(e, repo_id, action="creating the repo") from None
    from hubmix.recipe.vary import apply

    run = SweepRun(repo_id, [PointRun(p, point_name(p)) for p, _ in points])
    queue, running = list(run.points), []

    def start(p: PointRun) -> None:
        labels = {"hubmix-sweep": label_value(repo_id), "hubmix-point": label_value(p.branch)}
        try:
            info = jobs.submit(_spec(apply(pinned, p.point), mounts, repo_id, out_name, opts, inst, p.branch, labels),
                               ns)
        except HubError as e:  # e.g. a quota reached after some points started: say which keep running
            left = [f"{q.branch} ({q.job_id})" for q in run.points if q.job_id and q.outcome is None]
            raise HubError(f"{p.branch}: {e}" + (f"; still running: {', '.join(left)}" if left else "")) from None
        p.job_id, p.url = f"{ns}/{info.id}", info.url
        say(f"{p.branch}: started job {p.job_id}")

    try:
        while queue or running:
            while queue and len(running) < opts.max_jobs:
                running.append(queue.pop(0))
                start(running[-1])
            if opts.detach:
                running = []
                continue
            time.sleep(POLL_SECONDS if poll is None else poll)
            for p in list(running):
                assert p.job_id is not None
                if jobs.inspect(p.job_id).status.stage in jobs.TERMINAL:
                    running.remove(p)
                    p.outcome = jobs.outcome(p.job_id)
                    say(f"{p.branch}: {p.outcome.stage}" + (f" {p.outcome.commit_url}" if p.outcome.commit_url
                                                             else f" ({p.outcome.message})"))
    except KeyboardInterrupt:
        raise LeftRunning([p.job_id for p in run.points if p.job_id and p.outcome is None]) from None
    run.summary_url = push_summary(run, pinned)
    return run


def summary_card(run: SweepRun, recipe: Recipe) -> str:
    """README.md of the sweep's main branch: one row per point, linking its branch, commit and job."""
    from huggingface_hub import ModelCardData

    base = list(dict.fromkeys(model_entry(m)["repo"] for m in recipe.models if model_entry(m).get("repo")))
    data = ModelCardData(tags=["hubmix", "merge", "sweep"], base_model=base or None,
                         **({"base_model_relation": "merge"} if base else {}))
    names = list(run.points[0].point) if run.points else []
    refs = ", ".join(model_entry(m)["ref"] for m in recipe.models)
    lines = [f"# {run.repo_id.split('/')[-1]}", "",
             f"A hubmix sweep: **{recipe.method}** of {refs}, one merge per value of {', '.join(names)}, each made "
             "by a Hugging Face Job and pushed to its own branch (its model card there holds the full recipe).", "",
             "| " + " | ".join(names) + " | branch | status | commit | job |",
             "|" + "---|" * (len(names) + 4)]
    for p in run.points:
        o = p.outcome
        status = o.stage if o else "started"
        commit = f"[{o.commit_url.rsplit('/', 1)[-1][:12]}]({o.commit_url})" if o and o.commit_url else "-"
        job = f"[{p.job_id}]({p.url})" if p.job_id else "-"
        values = " | ".join(f"{v:g}" for v in p.point.values())
        lines.append(f"| {values} | [{p.branch}]({endpoint()}/{run.repo_id}/tree/{p.branch}) | {status} | "
                     f"{commit} | {job} |")
    first = run.points[0].branch if run.points else "BRANCH"
    lines += ["", "Load one point:", "", "```python", "from diffusers import DiffusionPipeline", "",
              f'pipe = DiffusionPipeline.from_pretrained("{run.repo_id}", revision="{first}")', "```", ""]
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)


def push_summary(run: SweepRun, recipe: Recipe) -> str:
    from huggingface_hub import CommitOperationAdd

    text = summary_card(run, recipe)
    try:
        info = api().create_commit(run.repo_id, operations=[CommitOperationAdd("README.md", text.encode())],
                                   commit_message=f"hubmix: sweep of {len(run.points)} points")
    except Exception as e:  # noqa: BLE001
        raise hub_error(e, run.repo_id, action="writing the sweep's summary card") from None
    return info.commit_url


def out_name_for(recipe: Recipe, out: Path | None) -> str:
    """The result's name in the job: what a local `merge --push` would call it (the same bytes need the same name)."""
    from hubmix.hub.push import default_repo_name

    return out.name if out is not None else default_repo_name(recipe)


__all__ = ["RemoteOptions", "RemoteRun", "SweepRun", "LeftRunning", "remote_merge", "remote_sweep", "out_name_for",
           "upload_local_inputs", "summary_card"]
