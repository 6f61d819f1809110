"""Resolve Hub inputs: pin every reference to its commit sha (one `model_info` call), then download through
huggingface_hub into its usual cache (HF_HOME) only what the merge reads: for a diffusers repo the configs plus the
weight files of the components this input takes part in, chosen by the same rule `formats.model.open_model` applies
to a folder (`choose_weights`: safetensors before .bin, the requested variant, shards through their index; never
onnx/flax/ckpt duplicates); for a single-file repo the named file, or the only weight file. Also reads a pushed
result's recipe and file hashes without downloading its weights (for reproduce).

Pinning a repo to its commit and fetching files at the pin live in pinning.py.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hubmix.errors import HubError, InputError
from hubmix.formats.families import all_component_names, weight_stem
from hubmix.formats.model import choose_weights, component_name_ok, index_shards
from hubmix.hub.client import api, hub_error, one_line
from hubmix.hub.pinning import RepoState, asked_revision, fetch, pin
from hubmix.hub.refs import ModelRef, parse_hub_ref
from hubmix.recipe import Recipe, model_entry

# Files that are weights in some framework: never fetched as "configs"; only chosen weights are fetched.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".h5", ".onnx", ".onnx_data", ".pb",
                   ".ot", ".tflite", ".gguf", ".npz", ".npy", ".pkl", ".pickle", ".joblib", ".mlmodel")
SINGLE_FILE_SUFFIXES = ((".safetensors",), (".ckpt", ".pt", ".pth", ".bin"))  # in order of preference


# ---- what to fetch --------------------------------------------------------------------------------------------

def _is_weight(name: str) -> bool:
    return name.lower().endswith(WEIGHT_SUFFIXES) or bool(re.search(r"\.index(\.[\w-]+)?\.json$", name))


def _children(names: list[str], folder: str) -> list[str]:
    """File names directly inside `folder` of a repo listing."""
    prefix = folder.rstrip("/") + "/"
    return [n[len(prefix):] for n in names if n.startswith(prefix) and "/" not in n[len(prefix):]]


def _pipeline_folders(index: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Subfolders model_index.json lists with a class: name -> (library, class)."""
    return {k: (v[0], v[1]) for k, v in index.items()
            if not k.startswith("_") and isinstance(v, list) and len(v) == 2 and v[0] is not None}


def _check_index(repo: str, index: dict[str, Any]) -> None:
    """Component names are folder names of the repo, never paths: `../../blobs` would read the cache's blobs."""
    for k, v in index.items():
        if not k.startswith("_") and isinstance(v, list) and not component_name_ok(k):
            raise HubError(f"{repo}: model_index.json names component {k!r}, not a plain folder name; refusing a "
                           "path")


def _config_files(names: list[str], index: dict[str, Any]) -> list[str]:
    """Every non-weight file of the folders model_index.json lists: configs, scheduler, tokenizers."""
    out = []
    for folder in _pipeline_folders(index):
        out += [f"{folder}/{n}" for n in _children(names, folder) if not _is_weight(n)]
    return out


def _extra_weights(names: list[str], variant: str | None, where: str, folder: str) -> list[str]:
    """Weights of a component hubmix copies but does not merge (e.g. a safety checker): safetensors stems before
    .bin ones, each by the same rule as merged components (the variant when it has one)."""
    kids = _children(names, folder)

    def stem(n: str) -> str:
        return re.sub(r"-\d{5}-of-\d{5}$", "", n.split(".")[0])

    stems = {stem(n) for n in kids if ".safetensors" in n} or {stem(n) for n in kids if re.search(r"\.bin\b", n)}
    out: list[str] = []
    for s in sorted(stems):
        try:
            out += choose_weights(kids, s, variant, where, folder)
        except InputError:
            out += choose_weights(kids, s, None, where, folder)
    return out


def _diffusers_output(recipe: Recipe) -> bool:
    """Whether the output will be a diffusers folder (which copies model a's other components); merge() fills in
    the layout and output it chose, and leaves both empty for a dry run, which writes nothing."""
    if recipe.layout:
        return recipe.layout in ("diffusers", "both")
    return bool(recipe.output) and not str(recipe.output).endswith(".safetensors")


def _ref_text(m: Any) -> str:
    return model_entry(m)["ref"]


def _weight_candidates(names: list[str]) -> list[str]:
    for suffixes in SINGLE_FILE_SUFFIXES:
        found = sorted(n for n in names if n.lower().endswith(suffixes))
        if found:
            return found
    return []


def resolve_hub(r: ModelRef, recipe: Recipe) -> tuple[Path, dict[str, Any]]:
    """A Hub reference -> (local path in huggingface_hub's cache, identity for the canonical recipe).

    Diffusers repos come back as the snapshot folder holding the configs and the weights of the components this
    input takes part in (plus model a's other components when the output is a diffusers folder); single-file repos
    as the file.
    """
    assert r.repo_id is not None
    state = pin(r.repo_id, r.revision)
    ident: dict[str, Any] = {"ref": r.text, "repo": r.repo_id, "revision": state.sha}
    names = state.names
    if r.filename:
        if r.filename not in names:
            have = _weight_candidates(names)
            listed = f" (weight files there: {', '.join(have[:6])})" if have else " (it has no weight files)"
            raise HubError(f"{r.repo_id}: file '{r.filename}' not found at revision '{r.revision or 'main'}'"
                           f"{listed}")
        ident["file"] = r.filename
        return fetch(state, r.filename, asked_revision(r.revision)), ident
    if "model_index.json" not in names:
        found = _weight_candidates(names)
        if not found:
            raise HubError(f"{r.repo_id}: no weights in the repo at {state.sha[:12]}: neither a diffusers "
                           "model_index.json nor a .safetensors/.ckpt file")
        if len(found) > 1:
            raise HubError(f"{r.repo_id}: holds several weight files; name one as {r.repo_id}/FILE: "
                           f"{', '.join(found[:10])}{' ...' if len(found) > 10 else ''}")
        ident["file"] = found[0]
        return fetch(state, found[0], asked_revision(r.revision)), ident
    return _fetch_diffusers(state, r, recipe), ident


def _model_index(state: RepoState, revision: str | None) -> tuple[Path, dict[str, Any]]:
    """The snapshot folder and the parsed model_index.json of a diffusers repo."""
    first = fetch(state, "model_index.json", asked_revision(revision))
    try:
        index = json.loads(first.read_text())
    except (OSError, ValueError) as e:
        raise HubError(f"{state.repo}: model_index.json is unreadable ({one_line(e, 80)})") from None
    if not isinstance(index, dict):
        raise HubError(f"{state.repo}: model_index.json is not a JSON object")
    _check_index(state.repo, index)
    return first.parent, index


def _fetch_diffusers(state: RepoState, r: ModelRef, recipe: Recipe) -> Path:
    root, index = _model_index(state, r.revision)
    idxs = [i for i, m in enumerate(recipe.models) if _ref_text(m) == r.text]
    merged = set(all_component_names())  # every family's components: what formats.model reads
    needs: set[str] = set().union(*(recipe.needs(i) for i in idxs)) if idxs else merged
    extras = 0 in idxs and _diffusers_output(recipe)
    wanted = _config_files(state.names, index)
    indexes: list[str] = []
    for folder, (library, _cls) in _pipeline_folders(index).items():
        where = f"{state.repo}@{state.sha[:12]}"
        if folder in merged:
            if folder not in needs:
                continue
            chosen = choose_weights(_children(state.names, folder), weight_stem(library), recipe.variant, where,
                                    f"{folder}/")
        elif extras:
            chosen = _extra_weights(state.names, recipe.variant, where, folder)
        else:
            continue
        for name in chosen:
            (indexes if name.endswith(".json") else wanted).append(f"{folder}/{name}")
    for path in indexes:  # a sharded component: its index, then the shards it names
        local = fetch(state, path)
        folder = path.rsplit("/", 1)[0]
        try:
            wanted += [f"{folder}/{s}" for s in index_shards(local.read_text())]
        except (OSError, ValueError) as e:
            raise HubError(f"{state.repo}: {path} is unreadable ({one_line(e, 80)})") from None
    missing = sorted(set(wanted) - set(state.names))
    if missing:
        raise HubError(f"{state.repo}: the repo lacks files its own index names: {', '.join(missing[:3])}")
    for path in sorted(set(wanted), key=lambda p: (_is_weight(p), p)):  # configs first, then weights
        fetch(state, path)
    return root


def config_folder(ref: ModelRef, family: Any = None) -> Path:
    """`--config-from org/repo`: the snapshot folder with model_index.json and every config, scheduler and tokenizer
    file (no weights)."""
    assert ref.repo_id is not None
    state = pin(ref.repo_id, ref.revision)
    if "model_index.json" not in state.names:
        raise HubError(f"{ref.repo_id}: --config-from needs a diffusers repo (with model_index.json); this one has "
                       "none")
    root, index = _model_index(state, ref.revision)
    for path in _config_files(state.names, index):
        fetch(state, path)
    return root


# ---- reading a pushed result (for reproduce) -------------------------------------------------------------------

@dataclass
class RemoteResult:
    repo_id: str
    sha: str
    files: dict[str, dict[str, Any]]  # path -> {"size", "sha256" (LFS files), "blob_id" (git sha1)}
    recipe_file: str  # where the recipe was read from: recipe.yaml, <stem>.recipe.yaml or README.md
    recipe_text: str


def fetch_result(text: str) -> RemoteResult:
    """A pushed hubmix result: its commit, every file's sha256 (LFS) or git blob id, and the recipe text (from
    recipe.yaml, else `<stem>.recipe.yaml`, else the model card), without downloading any weights."""
    r = parse_hub_ref(text)
    if r.filename:
        raise InputError(f"{text}: not a Hub repo reference (org/name or org/name@revision)")
    repo = r.repo_id
    assert repo is not None
    try:
        info = api().model_info(repo, revision=r.revision, files_metadata=True)
    except Exception as e:  # noqa: BLE001
        raise hub_error(e, repo, revision=r.revision) from None
    files = {s.rfilename: {"size": s.size, "blob_id": s.blob_id, "sha256": s.lfs.sha256 if s.lfs else None}
             for s in info.siblings or []}
    state = RepoState(repo, str(info.sha), list(files), online=True, revision=r.revision)
    sidecars = [n for n in files if "/" not in n and n.endswith(".recipe.yaml")]
    candidates = (["recipe.yaml"] if "recipe.yaml" in files else []) + sidecars[:1] + (
        ["README.md"] if "README.md" in files else [])
    if not candidates:
        raise HubError(f"{repo}: no hubmix recipe at {state.sha[:12]} (no recipe.yaml, *.recipe.yaml or model card)")
    for name in candidates:
        body = fetch(state, name).read_text(encoding="utf-8")
        if name != "README.md":
            return RemoteResult(repo, state.sha, files, name, body)
        from hubmix.flow.result import recipe_from_card

        if recipe_from_card(body) is not None:
            return RemoteResult(repo, state.sha, files, name, body)
    raise HubError(f"{repo}: its model card holds no hubmix recipe (not made by hubmix?)")
