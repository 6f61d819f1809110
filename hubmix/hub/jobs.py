"""Merges run as Hugging Face Jobs, next to the Hub's storage.

The local side pins every Hub input to its commit (no download) and builds the job spec: each input a read-only
model `Volume` at that commit, `HUBMIX_MOUNTS` telling hubmix in the job where each `repo@commit` is mounted (so
`hub.resolve` reads it there: same pinned identity, same canonical recipe, same bytes as a local merge), the
pinned recipe in `HUBMIX_RECIPE`, and a command that installs the caller's hubmix (`hub.install`: a wheel
mounted from the user's repo, or `hubmix==V` from an index) and runs `hubmix merge --recipe ... --push`.
The token travels only as the secret HF_TOKEN. Then it follows the job: logs, final stage, pushed commit.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from hubmix import __version__
from hubmix.errors import HubError, InputError
from hubmix.hub.client import LOGIN_HINT, api, endpoint, hub_error, one_line
from hubmix.hub.install import JobInstall
from hubmix.hub.refs import parse_ref
from hubmix.recipe import Recipe, model_entry
from hubmix.recipe.vary import label_value

DEFAULT_IMAGE = "pytorch/pytorch:2.6.0-cuda12.4-cudnn9-runtime"  # torch preinstalled: pip adds hubmix only
DEFAULT_FLAVOR = "cpu-basic"
MOUNT_ROOT = "/inputs"
DEFAULT_ENDPOINT = "https://huggingface.co"
LABEL_KEY = "created-by"  # every hubmix job carries created-by=hubmix
TERMINAL = ("COMPLETED", "CANCELED", "ERROR", "DELETED")
COMMIT_URL = re.compile(r"https?://\S+/commit/[0-9a-f]{40}")


# ---- the spec ---------------------------------------------------------------------------------------------------

@dataclass
class JobSpec:
    """What `run_job` receives, plus what hubmix needs to follow it."""

    image: str
    command: list[str]
    env: dict[str, str]
    secrets: dict[str, str]
    flavor: str
    timeout: str | None
    labels: dict[str, str]
    volumes: list[Any]  # huggingface_hub.Volume
    name: str
    repo_id: str
    branch: str | None = None
    recipe: dict[str, Any] = field(default_factory=dict)  # the pinned recipe the job merges

    def run_kwargs(self) -> dict[str, Any]:
        return {"image": self.image, "command": self.command, "env": self.env, "secrets": self.secrets,
                "flavor": self.flavor, "timeout": self.timeout, "labels": self.labels, "volumes": self.volumes,
                "name": self.name}


def local_inputs(recipe: Recipe) -> list[str]:
    """The recipe's inputs that are local paths (a Job cannot mount them)."""
    out = []
    for m in recipe.models:
        e = model_entry(m)
        if not e.get("repo") and not parse_ref(e["ref"]).is_hub:
            out.append(e["ref"])
    if recipe.config_from and not parse_ref(recipe.config_from).is_hub:
        out.append(recipe.config_from)
    return out


def check_access(repo: str) -> None:
    """Fail early, with the Hub's own message, when the token cannot read `repo` (gated, private)."""
    from huggingface_hub.errors import GatedRepoError

    try:
        api().auth_check(repo)
    except GatedRepoError as e:
        msg = getattr(e, "server_message", None) or str(e).splitlines()[0]
        raise HubError(f"{repo}: {one_line(msg, 160)} (the job reads it with your token)") from None
    except Exception as e:  # noqa: BLE001
        raise hub_error(e, repo, action="checking read access") from None


def pin_inputs(recipe: Recipe) -> tuple[Recipe, dict[str, str]]:
    """The recipe with every Hub input pinned to its commit ({ref, repo, revision[, file]}: what the canonical recipe
    records), and the mounts it needs: `repo@commit` -> mount path. Local inputs are refused, naming them."""
    import dataclasses

    from hubmix.hub.resolve import pin

    local = local_inputs(recipe)
    if local:
        raise InputError(f"a remote merge cannot read local inputs: {', '.join(local)} (push them to the Hub, or "
                         "add --upload-inputs)")
    mounts: dict[str, str] = {}

    def pinned(repo: str, revision: str | None) -> str:
        sha = pin(repo, revision).sha
        key = f"{repo}@{sha}"
        if key not in mounts:
            check_access(repo)
            mounts[key] = f"{MOUNT_ROOT}/{repo.replace('/', '--')}--{sha[:12]}"
        return sha

    models = []
    for m in recipe.models:
        e = model_entry(m)
        if e.get("repo"):
            repo, rev, file = e["repo"], e.get("revision"), e.get("file")
        else:
            r = parse_ref(e["ref"])
            repo, rev, file = r.repo_id, r.revision, r.filename
        entry = {"ref": e["ref"], "repo": repo, "revision": pinned(repo, rev)}
        models.append({**entry, "file": file} if file else entry)
    config_from = recipe.config_from
    if config_from:
        r = parse_ref(config_from)
        config_from = f"{r.repo_id}@{pinned(r.repo_id, r.revision)}"
    return dataclasses.replace(recipe, models=models, config_from=config_from), mounts


def token() -> str:
    from huggingface_hub import get_token

    t = get_token()
    if not t:
        raise HubError(f"a remote merge runs under your account: {LOGIN_HINT}")
    return t


def namespace() -> str:
    try:
        return api().whoami()["name"]
    except Exception as e:  # noqa: BLE001
        raise hub_error(e, "Hugging Face Jobs", action="reading the token's account") from None


def build_spec(recipe: Recipe, repo_id: str, out_name: str, *, mounts: dict[str, str], branch: str | None = None,
               private: bool = False, create_pr: bool = False, commit_message: str | None = None,
               license: str | None = None, flavor: str | None = None, timeout: str | None = None,
               install: JobInstall | str | None = None, image: str | None = None,
               labels: dict[str, str] | None = None, secret: str | None = None) -> JobSpec:
    """The spec of a job merging the pinned `recipe` (see `pin_inputs`) and pushing it to `repo_id`.

    The output is named `out_name` in the job, as a local `merge --push` would name it, so the bytes match.
    `install`: what `hub.install.prepare` made available (a string: a pip spec as given, unchecked)."""
    try:
        from huggingface_hub import Volume
    except ImportError:  # Jobs volumes came with huggingface_hub 1.x releases after 1.0
        raise HubError("remote merges mount inputs as Job volumes, which this huggingface_hub lacks: "
                       "pip install -U huggingface_hub") from None

    image, flavor = image or DEFAULT_IMAGE, flavor or DEFAULT_FLAVOR
    if not isinstance(install, JobInstall):
        install = JobInstall(install or f"hubmix=={__version__}", f"`{install or f'hubmix=={__version__}'}`")
    push = ["--push", repo_id]
    for opt, value in (("--branch", branch), ("--commit-message", commit_message), ("--license", license)):
        if value:
            push += [opt, value]
    push += ["--private"] * private + ["--create-pr"] * create_pr
    script = "; ".join([
        "set -e",
        'pip install --quiet --no-cache-dir "$HUBMIX_INSTALL"',
        'work="$(mktemp -d)"',
        'printenv HUBMIX_RECIPE > "$work/recipe.yaml"',
        'exec hubmix merge --recipe "$work/recipe.yaml" --out "$work/"' + shlex.quote(out_name) + " "
        + shlex.join(push)])
    recipe_dict = recipe.to_dict()
    recipe_dict.pop("output", None)
    env = {"HUBMIX_RECIPE": _yaml(recipe_dict), "HUBMIX_MOUNTS": json.dumps(mounts, sort_keys=True),
           "HUBMIX_PUSH": json.dumps({"repo": repo_id, "branch": branch, "create_pr": create_pr}, sort_keys=True),
           "HUBMIX_INSTALL": install.spec, "HUBMIX_INSTALL_FROM": install.source, **install.env,
           "HUBMIX_JOB_IMAGE": image, "HUBMIX_JOB_FLAVOR": flavor,
           "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    if endpoint().rstrip("/") != DEFAULT_ENDPOINT:
        env["HF_ENDPOINT"] = endpoint()
    volumes = [Volume(type="model", source=key.rsplit("@", 1)[0], revision=key.rsplit("@", 1)[1], mount_path=path,
                      read_only=True) for key, path in sorted(mounts.items())]
    if install.volume:
        repo, commit, path = install.volume
        volumes.append(Volume(type="model", source=repo, revision=commit, mount_path=path, read_only=True))
    all_labels = {LABEL_KEY: "hubmix", "hubmix-repo": label_value(repo_id), **(labels or {})}
    if branch:
        all_labels["hubmix-branch"] = label_value(branch)
    name = label_value(f"hubmix-{repo_id.split('/')[-1]}" + (f"-{branch}" if branch else ""))
    return JobSpec(image, ["bash", "-c", script], env, {"HF_TOKEN": secret or token()}, flavor, timeout,
                   all_labels, volumes, name, repo_id, branch, recipe_dict)


def _yaml(data: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


# ---- running and following ----------------------------------------------------------------------------------------

def job_error(e: BaseException, action: str) -> HubError:
    """One line from the Hub's answer (no credit, unknown flavor, quota, ...)."""
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(e, HfHubHTTPError) and e.response is not None:
        msg = getattr(e, "server_message", None) or str(e).splitlines()[0]
        return HubError(f"Hugging Face Jobs refused {action} (HTTP {e.response.status_code}): {one_line(msg, 160)}")
    return hub_error(e, "Hugging Face Jobs", action=action)


def submit(spec: JobSpec, ns: str | None = None):
    """Start the job; its JobInfo."""
    try:
        return api().run_job(**spec.run_kwargs(), namespace=ns or namespace())
    except Exception as e:  # noqa: BLE001
        raise job_error(e, f"the job for {spec.repo_id}") from None


def split_id(job_id: str) -> tuple[str, str]:
    """`ns/id` or `id` (in the token's namespace) -> (namespace, id)."""
    ns, _, jid = job_id.rpartition("/")
    return (ns or namespace()), jid


def inspect(job_id: str):
    ns, jid = split_id(job_id)
    try:
        return api().inspect_job(job_id=jid, namespace=ns)
    except Exception as e:  # noqa: BLE001
        raise job_error(e, f"reading job {jid}") from None


def logs(job_id: str, *, follow: bool = False, tail: int | None = None) -> Iterable[str]:
    ns, jid = split_id(job_id)
    try:
        yield from api().fetch_job_logs(job_id=jid, namespace=ns, follow=follow, tail=tail)
    except Exception as e:  # noqa: BLE001
        raise job_error(e, f"the logs of job {jid}") from None


def cancel(job_id: str) -> None:
    ns, jid = split_id(job_id)
    try:
        api().cancel_job(job_id=jid, namespace=ns)
    except Exception as e:  # noqa: BLE001
        raise job_error(e, f"canceling job {jid}") from None


def list_jobs(all_stages: bool = True) -> list[Any]:
    """hubmix's jobs (by label), newest first."""
    try:
        jobs = list(api().list_jobs(labels={LABEL_KEY: "hubmix"}, namespace=namespace(),
                                    status=None if all_stages else ["RUNNING", "SCHEDULING"]))
    except Exception as e:  # noqa: BLE001
        raise job_error(e, "listing jobs") from None
    return sorted(jobs, key=lambda j: j.created_at.timestamp() if j.created_at else 0, reverse=True)


@dataclass
class Outcome:
    job_id: str
    url: str
    stage: str
    message: str | None
    commit_url: str | None
    tail: list[str]  # the last log lines

    @property
    def exit_code(self) -> int:
        if self.stage == "COMPLETED":
            return 0
        m = re.search(r"exit code:?\s*(\d+)", self.message or "")
        return int(m.group(1)) if m and int(m.group(1)) else 1

    def describe(self) -> str:
        why = f": {self.message}" if self.message else ""
        return f"job {self.job_id} ended {self.stage}{why}"


def follow(job_id: str, *, on_line: Callable[[str], None] | None = None, poll: float = 2.0,
           keep: int = 20) -> Outcome:
    """Stream the job's logs to `on_line` until it ends; its final stage, last lines and pushed commit."""
    tail: list[str] = []
    commit = None
    for line in logs(job_id, follow=True):
        tail = (tail + [line])[-keep:]
        commit = (COMMIT_URL.findall(line) or [commit])[-1]
        if on_line:
            on_line(line)
    info = inspect(job_id)
    while info.status.stage not in TERMINAL:  # the stage lags the last log line a little
        time.sleep(poll)
        info = inspect(job_id)
    return Outcome(f"{info.owner.name}/{info.id}", info.url, info.status.stage, info.status.message,
                   commit or _pushed_head(info), tail)


def outcome(job_id: str, keep: int = 20) -> Outcome:
    """A finished (or running) job's stage, last lines and pushed commit, without following it."""
    info = inspect(job_id)
    lines = list(logs(job_id)) if info.status.stage in TERMINAL else []
    commits = [u for line in lines for u in COMMIT_URL.findall(line)]
    return Outcome(f"{info.owner.name}/{info.id}", info.url, info.status.stage, info.status.message,
                   commits[-1] if commits else _pushed_head(info), lines[-keep:])


def _pushed_head(info: Any) -> str | None:
    """A COMPLETED job whose log stream lost the commit line (a dropped connection, a truncated log): the commit URL
    of the head of the branch it pushed to, asked of the Hub. None for other stages, for a pull request (its ref is
    not known here) and when the Hub cannot say."""
    if info.status.stage != "COMPLETED":
        return None
    try:
        push = json.loads((info.environment or {}).get("HUBMIX_PUSH") or "null")
    except ValueError:
        return None
    if not isinstance(push, dict) or not push.get("repo") or push.get("create_pr"):
        return None
    try:
        sha = api().model_info(push["repo"], revision=push.get("branch") or None).sha
    except Exception:  # noqa: BLE001 - the caller then reports the job as it did without a commit
        return None
    return f"{endpoint().rstrip('/')}/{push['repo']}/commit/{sha}" if sha else None


def follow_hint(job_id: str) -> str:
    return f"follow it with `hubmix jobs logs {job_id} --follow`, cancel it with `hubmix jobs cancel {job_id}`"


def _hardware_line(hw: Any) -> str:
    acc = f", {hw.accelerator.quantity}x {hw.accelerator.model} ({hw.accelerator.vram})" if hw.accelerator else ""
    per_hour = hw.unit_cost_usd * (60 if hw.unit_label == "minute" else 1)
    return f"{hw.name} ({hw.pretty_name}: {hw.cpu}, {hw.ram}{acc}): ${per_hour:.4f}/hour"


def hardware_lines() -> list[str]:
    """One line per job flavor with its cost, from list_jobs_hardware."""
    try:
        return [_hardware_line(hw) for hw in api().list_jobs_hardware()]
    except Exception as e:  # noqa: BLE001
        raise job_error(e, "listing the hardware") from None


def flavor_cost(flavor: str) -> str | None:
    """`cpu-upgrade (CPU Upgrade: 8 vCPU, 32 GB): $0.0300/hour` (None where the Hub does not list it)."""
    try:
        hardware = api().list_jobs_hardware()
    except Exception:  # noqa: BLE001 - an older Hub or client: no cost line
        return None
    return next((_hardware_line(hw) for hw in hardware if hw.name == flavor), None)


# ---- inside the job -----------------------------------------------------------------------------------------------

def job_context() -> dict[str, str] | None:
    """Where this process runs, when it is a hubmix job: job id (set by the platform as JOB_ID), image, flavor,
    where its hubmix came from. None outside a job."""
    if not os.environ.get("HUBMIX_JOB_IMAGE"):
        return None
    return {"job": os.environ.get("JOB_ID", ""), "image": os.environ["HUBMIX_JOB_IMAGE"],
            "flavor": os.environ.get("HUBMIX_JOB_FLAVOR", ""),
            "install": os.environ.get("HUBMIX_INSTALL_FROM") or f"`{os.environ.get('HUBMIX_INSTALL', '')}`"}
