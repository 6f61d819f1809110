"""Pin Hub repos to commits and fetch files at the pin: one `model_info` call gives a commit's sha, its file listing,
license and the sha256 the Hub records for each LFS file; files download through huggingface_hub into its usual cache
(HF_HOME), or are read from a Job's mount of the repo.

The file listing of each commit is kept in hubmix's cache (commits never change), so with `HF_HUB_OFFLINE=1`, or when
the Hub cannot be reached, the same files are chosen again and read from huggingface_hub's cache.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from hubmix import __version__
from hubmix.cache import cache_root, write_atomically
from hubmix.errors import HubError
from hubmix.hub.client import api, endpoint, hub_error, is_network, is_offline, one_line
from hubmix.hub.hashing import record_known
from hubmix.hub.mounts import card_license, listing, mounted

log = logging.getLogger("hubmix")

COMMIT_SHA = re.compile(r"^[0-9a-f]{40}$")


@dataclass
class RepoState:
    """A repo pinned to one commit, with the commit's file listing."""

    repo: str
    sha: str
    names: list[str]
    license: str | None = None
    online: bool = True  # False: served from the caches (offline, or the Hub unreachable)
    revision: str | None = None  # as asked (branch, tag, sha or None for the default branch)
    mount: Path | None = None  # where a Job mounts the repo at this commit (hub.mounts): read, never downloaded
    sha256: dict[str, str] = field(default_factory=dict)  # LFS files: the sha256 the Hub records (no rehashing)


_PINNED: dict[tuple[str, str, str], RepoState] = {}  # (endpoint, repo, commit sha) -> state: commits never change


def _listing_file(repo: str, sha: str) -> Path:
    """Where the file listing of `repo` at commit `sha` is kept (keyed like huggingface_hub's cache: by repo)."""
    return cache_root() / "hub" / f"models--{repo.replace('/', '--')}" / f"{sha}.json"


def _save_listing(state: RepoState) -> None:
    path = _listing_file(state.repo, state.sha)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, json.dumps({"files": sorted(state.names), "license": state.license,
                                           "sha256": dict(sorted(state.sha256.items()))}))
    except OSError:
        pass  # a read-only cache only costs offline use


def _storage(repo: str) -> Path:
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    return Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo, repo_type="model")


def _from_cache(repo: str, revision: str | None) -> RepoState | None:
    """The commit and listing a revision had when last resolved online, from the caches; None if unknown."""
    rev = revision or "main"
    storage = _storage(repo)
    sha = rev if COMMIT_SHA.match(rev) else None
    if sha is None:
        try:
            sha = (storage / "refs" / rev).read_text().strip()
        except OSError:
            return None
    try:
        data = json.loads(_listing_file(repo, sha).read_text())
        names, lic, digests = list(data["files"]), data.get("license"), dict(data.get("sha256") or {})
    except (OSError, ValueError, KeyError):
        snap = storage / "snapshots" / sha
        if not snap.is_dir():
            return None
        names = [p.relative_to(snap).as_posix() for p in sorted(snap.rglob("*")) if p.is_file()]
        lic, digests = None, {}
    return RepoState(repo, sha, names, lic, online=False, revision=revision, sha256=digests)


def pin(repo: str, revision: str | None = None) -> RepoState:
    """Resolve `revision` (branch, tag, sha; None: the default branch) of `repo` to its commit and file listing."""
    if revision and COMMIT_SHA.match(revision) and (endpoint(), repo, revision) in _PINNED:
        return _PINNED[(endpoint(), repo, revision)]
    if (root := mounted(repo, revision)) is not None:
        state = RepoState(repo, str(revision), listing(root), card_license(root), revision=revision, mount=root)
        _PINNED[(endpoint(), repo, state.sha)] = state
        return state
    try:
        info = api().model_info(repo, revision=revision, files_metadata=True)  # with each LFS file's sha256
    except Exception as e:  # noqa: BLE001 - translated below
        if is_offline(e) or is_network(e):
            state = _from_cache(repo, revision)
            if state is not None:
                if not is_offline(e):
                    log.warning("%s: the Hub cannot be reached; using the cached commit %s", repo, state.sha[:12])
                return state
            if is_network(e):
                raise HubError(f"{repo}: cannot reach the Hub at {endpoint()} ({one_line(e, 80)}; network "
                               f"down?), and revision '{revision or 'main'}' is not in the local cache") from None
        raise hub_error(e, repo, revision=revision) from None
    card = info.card_data
    lic = card.get("license") if card is not None else None
    siblings = info.siblings or []
    state = RepoState(repo, str(info.sha), [s.rfilename for s in siblings], lic if isinstance(lic, str) else None,
                      online=True, revision=revision,
                      sha256={s.rfilename: s.lfs.sha256 for s in siblings if s.lfs and s.lfs.sha256})
    _save_listing(state)
    _PINNED[(endpoint(), repo, state.sha)] = state
    return state


def fetch(state: RepoState, filename: str, revision: str | None = None) -> Path:
    """One file at the pinned commit into huggingface_hub's cache (its own progress bar); the path in the snapshot.

    `revision` (the revision as asked) is used for the first file of a repo, so huggingface_hub records the
    branch or tag -> commit ref that offline use needs; the commit it lands on is checked against the pin.
    """
    from huggingface_hub import hf_hub_download

    if state.mount is not None:
        if not (state.mount / filename).is_file():
            raise HubError(f"{state.repo}: file '{filename}' not found in its mount {state.mount}")
        return state.mount / filename
    rev = revision if (revision and state.online) else state.sha  # a branch/tag: huggingface_hub records its ref
    try:
        path = Path(hf_hub_download(state.repo, filename, revision=rev, local_files_only=not state.online,
                                    library_name="hubmix", library_version=__version__))
    except Exception as e:  # noqa: BLE001 - translated below
        raise hub_error(e, state.repo, revision=state.revision, filename=filename) from None
    landed = _snapshot_sha(path, filename)
    if landed is not None and landed != state.sha:
        raise HubError(f"{state.repo}: revision '{revision}' moved to {landed[:12]} while resolving (it was "
                       f"{state.sha[:12]}); run again")
    if filename in state.sha256:
        record_known(path, state.sha256[filename])  # the recipe takes the Hub's sha256: no hashing of the download
    return path


def asked_revision(revision: str | None) -> str:
    from huggingface_hub import constants

    return revision or constants.DEFAULT_REVISION


def _snapshot_sha(path: Path, filename: str) -> str | None:
    root = path
    for _ in PurePosixPath(filename).parts:
        root = root.parent
    return root.name if COMMIT_SHA.match(root.name) and root.parent.name == "snapshots" else None


def input_licenses(models: list[dict[str, Any]]) -> dict[str, str | None]:
    """The license of each Hub input of a canonical recipe at its pinned commit (name -> license or None)."""
    out: dict[str, str | None] = {}
    for m in models:
        repo, sha = m.get("repo"), m.get("revision")
        if not repo or not sha:
            continue
        key = (endpoint(), repo, sha)
        lic = None
        if key in _PINNED:
            lic = _PINNED[key].license
        else:
            try:
                lic = json.loads(_listing_file(repo, sha).read_text()).get("license")
            except (OSError, ValueError):
                try:
                    lic = pin(repo, sha).license
                except HubError:
                    lic = None
        out[m.get("name") or repo] = lic
    return out
