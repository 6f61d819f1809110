"""Push a hubmix result to the Hub in one commit: weights, configs, tokenizers, recipe and the model card the caller
wrote (push receives the card; it never builds one). The token comes from huggingface_hub's usual sources (HF_TOKEN,
the stored login) and is never printed, logged or written anywhere."""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from hubmix import __version__
from hubmix.errors import HubError, InputError
from hubmix.hub.client import LOGIN_HINT, api, endpoint, has_token, hub_error, one_line
from hubmix.hub.refs import ModelRef, parse_ref
from hubmix.recipe import Recipe
from hubmix.flow.result import result_files


def default_repo_name(recipe: Recipe) -> str:
    """A repo name made from the inputs and the method: `a-b-c-lossless`."""
    parts = []
    for m in recipe.models:
        if isinstance(m, dict):
            text = m.get("repo") or m["ref"]
        else:
            text = str(m)
        try:
            r = parse_ref(text)
        except InputError:
            r = ModelRef(text)
        if r.is_hub:
            parts.append(r.repo_id.split("/")[1])  # type: ignore[union-attr]
        else:
            p = PurePosixPath(text.replace("\\", "/").rstrip("/"))
            parts.append(p.stem if p.suffix in (".safetensors", ".ckpt", ".pt", ".pth", ".bin") else p.name)
    name = "-".join([*parts, recipe.method])
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", name)
    name = re.sub(r"-{2,}", "-", name).strip("-._")[:96].strip("-._")
    return name or "hubmix-merge"


def push_target(repo_id: str | None, name: str) -> str:
    """The repo a push goes to: `repo_id` (`org/name`, or a bare name in the token owner's namespace), or
    `<token owner>/<name>`. Checks first that a token is available, so nothing long runs before a certain refusal."""
    if not has_token():
        raise HubError(f"{repo_id or name}: pushing to the Hub needs a token: {LOGIN_HINT}")
    part = r"[A-Za-z0-9][A-Za-z0-9._-]*"
    wanted = repo_id or name
    if not re.fullmatch(rf"(?:{part}/)?{part}", wanted):  # checked now, not after a long merge
        raise HubError(f"{wanted}: not a valid repo name (letters, digits, '.', '_', '-'; org/name or name); "
                       "name the repo with --push ORG/NAME")
    if "/" in wanted:
        return wanted
    try:
        owner = api().whoami()["name"]
    except Exception as e:  # noqa: BLE001 - translated below
        raise hub_error(e, wanted, action="reading the token's account") from None
    return f"{owner}/{wanted}"


@dataclass
class PushResult:
    repo_id: str
    commit_url: str
    commit_sha: str
    revision: str  # the branch, or refs/pr/N
    pr_url: str | None
    files: list[str]  # paths in the repo, in the one commit
    created: bool  # the repo did not exist before
    warnings: list[str] = field(default_factory=list)  # from the model card (license)

    @property
    def url(self) -> str:
        return f"{endpoint()}/{self.repo_id}"


def upload_list(path: Path, card_path: Path) -> list[tuple[str, Path]]:
    """What a push uploads: (path in the repo, local file). A folder: its files (weights, configs, tokenizers,
    recipe.yaml, README.md; hidden files left out). A single file: it, its `<stem>.recipe.yaml`, and the card as
    README.md."""
    out = list(result_files(path).items())
    return out if path.is_dir() else out + [("README.md", card_path)]


def push(path: str | Path, repo_id: str, card: Any, *, private: bool = False, branch: str | None = None,
         create_pr: bool = False, commit_message: str | None = None) -> PushResult:
    """Upload a hubmix result (folder or single file) and its model card to `repo_id` (a full `org/name`, see
    `push_target`) in one commit. `card` is the written card (`hub.card.Card`: its path, summary, recipe hash and
    warnings); push never builds one. The repo is created if needed (`private`); `branch` commits to that branch
    (created from main if missing), `create_pr` opens a PR."""
    path = Path(path)
    if branch and create_pr:
        raise HubError(f"{repo_id or path.name}: --branch and --create-pr exclude each other")
    if not path.exists():
        raise InputError(f"{path}: no such file or folder to push")
    target = repo_id
    uploads = upload_list(path, card.path)
    hub = api()
    try:
        existed = hub.repo_exists(target)
        url = hub.create_repo(target, private=private, exist_ok=True)
        target = url.repo_id or target
    except Exception as e:  # noqa: BLE001
        raise hub_error(e, target, action="creating the repo") from None
    created = not existed
    state = "created empty" if created else "left as it was"
    if branch:
        try:
            hub.create_branch(target, branch=branch, exist_ok=True)
        except Exception as e:  # noqa: BLE001
            raise hub_error(e, target, action=f"creating branch '{branch}'; nothing was committed, the repo was "
                                              f"{state}") from None
    from huggingface_hub import CommitOperationAdd

    ops = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(local)) for rel, local in uploads]
    message = commit_message or f"hubmix: {card.summary}"
    push_id = secrets.token_hex(6)  # names this very commit, to find it if its reply is lost
    try:
        info = hub.create_commit(target, operations=ops, commit_message=message, revision=branch,
                                 create_pr=create_pr or None,
                                 commit_description=f"Made with hubmix {__version__}; recipe sha256 "
                                                    f"{card.recipe_sha256}; push {push_id}.")
    except Exception as e:  # noqa: BLE001
        where = f"branch '{branch}'" if branch else ("a pull request" if create_pr else "main")
        reason = hub_error(e, target).args[0].split(": ", 1)[-1]
        landed = None if create_pr else _landed(hub, target, branch, push_id)
        files = (f"{len(uploads)} files ({', '.join(rel for rel, _ in uploads[:4])}"
                 f"{', ...' if len(uploads) > 4 else ''})")
        if isinstance(landed, str):  # the commit went in, only its reply was lost: that is a success
            return PushResult(target, f"{endpoint()}/{target}/commit/{landed}", landed, branch or "main", None,
                              [rel for rel, _ in uploads], created,
                              [*card.warnings, f"the Hub's reply was lost ({reason}), but the commit landed"])
        if landed is None:
            verdict = (f"whether the commit landed could not be checked: look for a commit titled "
                       f"'{one_line(message, 60)}' before pushing again; the {files} are in it or in none")
        else:
            verdict = f"nothing was committed (checked {where}): none of the {files} is in a commit"
        raise HubError(f"{target}: upload to {where} failed ({reason}); {verdict}, and the repo was {state}") from None
    revision = info.pr_revision or branch or "main"
    return PushResult(target, info.commit_url, info.oid, revision, info.pr_url, [rel for rel, _ in uploads], created,
                      card.warnings)


def _landed(hub: Any, repo: str, branch: str | None, push_id: str) -> str | bool | None:
    """After a failed commit call: the sha of the commit that carries `push_id` on the branch (it landed, the reply
    was lost), False when the branch's recent commits do not have it, None when the Hub cannot be asked."""
    try:
        commits = hub.list_repo_commits(repo, revision=branch)
    except Exception:  # noqa: BLE001 - the Hub is still unreachable: the caller says it could not check
        return None
    for c in commits[:50]:
        if f"push {push_id}." in (c.message or ""):
            return c.commit_id
    return False
