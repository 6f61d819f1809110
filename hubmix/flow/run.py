"""`run(recipe, options)`: the whole flow as one library call, the one the CLI's `merge`, the UI and a remote job
(which runs `hubmix merge --recipe`) all make: recipe -> merge -> saved recipe -> samples / plot -> card -> push, or
the same as a Hugging Face Job (`options.remote`).

    from hubmix import Recipe, RunOptions, run

    recipe = Recipe(models=["a.safetensors", "b.safetensors"], method="weighted_sum", params={"alpha": 0.3})
    flow = run(recipe, RunOptions(out="merged", push="me/merged"),
               progress=lambda done, total, stage: print(stage, done, total))
    print(flow.merge.output, flow.push.commit_url)

`progress(done_bytes, total_bytes, stage)` is called as the merge's chunks are written (stage "merge"; from the
engine's writer thread; `done_bytes` grows and ends at `total_bytes`), then once with (0, 0, stage) as each later
stage starts ("samples", "push", "remote"). Setting `cancel` (a threading.Event) stops a running merge between
chunks: errors.Cancelled is raised and nothing is left at the output path. `log(level, text)` hears what a person
watching should read: level "warning" (non-finite inputs, push notes; the CLI prints them even with -q), "info"
(what happens next; never when options.quiet) and "line" (a followed remote job's log lines).
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from hubmix.errors import HubmixError

Progress = Callable[[int, int, str], None]
Log = Callable[[str, str], None]


class OptionsError(HubmixError):
    """Options that do not go together (the CLI shows it as a usage error)."""


@dataclass
class Remote:
    """Run as Hugging Face Job(s) instead of here (docs/remote.md): the result is pushed by the job."""
    flavor: str | None = None
    timeout: str | None = None
    install: str | None = None  # what the job pip-installs (default: this hubmix, see hub.install)
    detach: bool = False  # start and return the job id
    upload_inputs: bool = False  # local inputs go to private repos first (else they are refused)
    max_jobs: int = 4  # with vary: jobs at once
    vary: list[str] = field(default_factory=list)  # NAME=V1,V2,...: one job per point, each to a branch


@dataclass
class RunOptions:
    out: str | Path | None = None  # a folder, or a .safetensors file (default: the recipe's output)
    overwrite: bool = False
    dry: bool = False  # analyze only: the similarity report, nothing written (but `plot`, a PNG file)
    # the engine (engine.pipeline.Settings)
    workers: int | None = None
    max_memory: int = 512 << 20
    device: str = "auto"
    kernels: str = "auto"
    quiet: bool = False  # no progress bar, no "info" log
    # the push: None = no push; "" = the token owner's namespace under the output's name; else ORG/NAME
    push: str | None = None
    private: bool = False
    branch: str | None = None
    create_pr: bool = False
    commit_message: str | None = None
    license: str | None = None
    # beside the merge
    samples: Any = None  # a render.spec.RenderSpec: render inputs and result into the result's samples/
    plot: str | Path | None = None  # dry: draw the report into this PNG; else "" or a PNG: samples/similarity.png
    save_recipe: str | Path | None = None  # also write the recipe here (a merge that ran)
    remote: Remote | None = None

    def check(self) -> None:
        """Refuse options that do not go together, before any work (the CLI's usage errors)."""
        if self.remote is not None:
            if self.samples is not None or self.plot is not None:
                raise OptionsError("--samples and --plot render on this machine; a --remote merge renders nothing "
                                   "(run `hubmix samples ORG/NAME` on its result)")
            if self.dry:
                raise OptionsError("--remote pushes a result; --dry writes none")
            if self.save_recipe:
                raise OptionsError("--save-recipe: the job writes recipe.yaml into the pushed repo")
            return
        if self.push is None:
            given = [n for n, v in (("--private", self.private), ("--branch", self.branch),
                                    ("--create-pr", self.create_pr), ("--commit-message", self.commit_message),
                                    ("--license", self.license)) if v]
            if given:
                raise OptionsError(f"{', '.join(given)} only go with --push")
        else:
            if self.dry:
                raise OptionsError("--push uploads a result; --dry writes none")
            if self.branch and self.create_pr:
                raise OptionsError("--branch and --create-pr exclude each other")
        if self.dry and (self.samples is not None or self.plot == ""):
            raise OptionsError("--dry writes nothing: --plot needs a FILE.png there, and --samples a merge")


@dataclass
class FlowResult:
    merge: Any = None  # flow.merging.MergeResult (None for a remote run); its output is gone when the
    #                    result was built in a temporary folder for a push without `out`
    samples: Path | None = None  # the result's samples/ folder
    push: Any = None  # hub.push.PushResult
    remote: Any = None  # hub.remote.RemoteRun, or SweepRun with remote.vary
    repo_id: str | None = None  # where the push goes (local or remote)


def run(recipe: Any, options: RunOptions | None = None, progress: Progress | None = None,
        cancel: threading.Event | None = None, log: Log | None = None) -> FlowResult:
    """Merge `recipe` (a hubmix.Recipe) as `options` say, with its samples, card and push, here or as a Hugging Face
    Job; see the module's docstring for `progress`, `cancel` and `log`. Errors are HubmixErrors (OptionsError for
    options that do not go together); an interrupted or failed run leaves the output path as it was."""
    o = options or RunOptions()
    o.check()
    say: Log = log or (lambda level, text: None)
    stage = _stages(progress)
    if o.remote is not None:
        return _remote(recipe, o, say, stage)
    from hubmix.engine.pipeline import Settings
    from hubmix.flow.merging import merge

    out = Path(o.out) if o.out is not None else None
    flow = FlowResult()
    tmpdir = None
    try:
        if o.push is not None:
            from hubmix.hub.push import default_repo_name, push_target

            target = out if out is not None else (Path(recipe.output) if recipe.output else None)
            name = default_repo_name(recipe) if target is None else (target.stem if target.suffix == ".safetensors"
                                                                     else target.name)
            flow.repo_id = push_target(o.push or None, name)  # a token and the account, before any long work
            if target is None:
                tmpdir = tempfile.mkdtemp(prefix="hubmix-push-")
                out = Path(tmpdir) / name
        if o.samples is not None:
            o.samples.check()  # before the merge
        settings = Settings(workers=o.workers, max_memory=o.max_memory, device=o.device, kernels=o.kernels,
                            quiet=o.quiet, cancel=cancel,
                            progress=None if progress is None else (lambda d, t: progress(d, t, "merge")))
        result = flow.merge = merge(recipe, out=out, overwrite=o.overwrite, dry=o.dry, settings=settings)
        for line in result.summary.events.get("nonfinite", []):  # the output may be broken
            say("warning", line)
        if o.save_recipe:  # only for a merge that ran
            try:
                Path(o.save_recipe).write_text(recipe.to_yaml())
            except OSError as e:
                from hubmix.errors import RecipeError

                raise RecipeError(f"{o.save_recipe}: cannot write the recipe ({e.strerror})") from None
        if o.dry:
            if o.plot:
                from hubmix.render.plot import save_plot

                save_plot(result.report or {}, o.plot, f"{recipe.method}: inputs against a")
            return flow
        if o.samples is not None or o.plot is not None:
            from hubmix.render.samples import add_samples

            stage("samples")
            flow.samples = add_samples(result, recipe, o.samples, settings=settings, plot=True)
            if o.plot:
                shutil.copyfile(flow.samples / "similarity.png", o.plot)
        if flow.repo_id is not None:
            from hubmix.hub.card import write_card
            from hubmix.hub.push import push

            if not o.quiet:
                say("info", result.summary.render())
                say("info", f"wrote {result.output} ({result.layout}, {result.family.name}); pushing to "
                            f"{flow.repo_id}")
            stage("push")
            card = write_card(result.output, repo_id=flow.repo_id, license=o.license, revision=o.branch)
            flow.push = push(result.output, flow.repo_id, card, private=o.private, branch=o.branch,
                             create_pr=o.create_pr, commit_message=o.commit_message)
            for w in flow.push.warnings:
                say("warning", w)
        return flow
    finally:
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)


def _stages(progress: Progress | None) -> Callable[[str], None]:
    return (lambda name: None) if progress is None else (lambda name: progress(0, 0, name))


def _remote(recipe: Any, o: RunOptions, say: Log, stage: Callable[[str], None]) -> FlowResult:
    """The run as Hugging Face Job(s): the job runs `hubmix merge --recipe ... --push` (this same flow) and pushes;
    this follows it (Ctrl-C: hub.remote.LeftRunning, the jobs keep running)."""
    from hubmix.hub.push import push_target
    from hubmix.hub.remote import RemoteOptions, out_name_for, remote_merge, remote_sweep

    r = o.remote
    assert r is not None
    name = out_name_for(recipe, Path(o.out) if o.out is not None else None)
    repo_id = push_target(o.push or None, name[: -len(".safetensors")] if name.endswith(".safetensors") else name)
    opts = RemoteOptions(flavor=r.flavor, timeout=r.timeout, install=r.install, detach=r.detach,
                         max_jobs=r.max_jobs or 4, upload_inputs=r.upload_inputs, private=o.private, branch=o.branch,
                         create_pr=o.create_pr, commit_message=o.commit_message, license=o.license)

    def info(text: str) -> None:
        if not o.quiet:
            say("info", text)

    stage("remote")
    if r.vary:
        return FlowResult(remote=remote_sweep(recipe, list(r.vary), repo_id, name, opts, say=info), repo_id=repo_id)
    on_line = None if o.quiet else (lambda text: say("line", text))
    return FlowResult(remote=remote_merge(recipe, repo_id, name, opts, say=info, on_line=on_line), repo_id=repo_id)


__all__ = ["run", "RunOptions", "Remote", "FlowResult", "OptionsError"]
