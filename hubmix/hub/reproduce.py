"""`reproduce`: rebuild a result from its recipe and check every file's sha256 against the original.

The recipe comes from the result itself (`recipe.yaml`, the model card's recipe block, or the weight files'
metadata); Hub inputs are fetched at their pinned commits (or, with `latest`, at the revisions as originally
given, so a newer input revision shows as a difference); the merge runs into a temporary folder. For a Hub repo the
comparison needs no download of the result: LFS files are compared by the sha256 the Hub records, small files by
their git blob id.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hubmix.formats.quant import QUANT_DTYPES, codec
from hubmix.errors import InputError
from hubmix.hub.hashing import file_sha256
from hubmix.recipe import Recipe, letter, model_entry, recipe_hash
from hubmix.hub.refs import ModelRef, parse_hub_ref, parse_ref

NOT_COMPARED = ("README.md", ".gitattributes")  # the card is rewritten per push (repo id, license); not the merge's


def _compared(path: str) -> bool:
    """Files the merge itself writes: not the card, hidden files, or rendered samples (made after the merge)."""
    return path not in NOT_COMPARED and not path.startswith("samples/") and not any(
        s.startswith(".") for s in path.split("/"))


@dataclass
class FileCheck:
    path: str
    status: str  # identical, different, missing (not in the original), extra (only in the original)
    sha256: str | None  # of the rebuilt file
    expected: str | None  # the original's sha256 (or git blob id for small files of a Hub repo)


@dataclass
class InputCheck:
    name: str
    ref: str
    pinned: str | None  # the commit the recipe records (Hub inputs)
    resolved: str | None  # the commit used now
    files_changed: list[str] = field(default_factory=list)  # input files whose sha256 differs from the recipe's

    @property
    def changed(self) -> bool:
        return self.pinned != self.resolved or bool(self.files_changed)


@dataclass
class ReproduceReport:
    source: str
    revision: str | None  # the result repo's commit (Hub sources)
    latest: bool
    files: list[FileCheck]
    inputs: list[InputCheck]
    recipe_sha256: str
    rebuilt_recipe_sha256: str
    output: Path | None = None  # the rebuild, when kept

    @property
    def identical(self) -> bool:
        return bool(self.files) and all(f.status == "identical" for f in self.files)

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "revision": self.revision, "latest": self.latest, "identical": self.identical,
                "recipe_sha256": self.recipe_sha256, "rebuilt_recipe_sha256": self.rebuilt_recipe_sha256,
                "inputs": [{"name": i.name, "ref": i.ref, "pinned": i.pinned, "resolved": i.resolved,
                            "changed": i.changed, "files_changed": i.files_changed} for i in self.inputs],
                "files": [vars(f) for f in self.files]}

    def render(self) -> str:
        at = f" (commit {self.revision[:12]})" if self.revision else ""
        how = "inputs at their latest revisions" if self.latest else "inputs at their pinned commits"
        lines = [f"reproduce {self.source}{at}, {how}"]
        for i in self.inputs:
            if i.pinned or i.resolved:
                rev = (f"{(i.pinned or '?')[:12]} -> {(i.resolved or '?')[:12]} (revision changed)"
                       if i.pinned != i.resolved else f"{(i.resolved or '')[:12]}")
            else:
                rev = "local"
            extra = f"; files differ: {', '.join(i.files_changed)}" if i.files_changed else ""
            lines.append(f"  input {i.name}: {i.ref} {rev}{extra}")
        width = max((len(f.status) for f in self.files), default=9)
        for f in self.files:
            mark = f.status if f.status == "identical" else f.status.upper()
            lines.append(f"  {mark:<{width}}  {f.path}  sha256 {f.sha256 or '-'}")
        n = len(self.files)
        bad = [f for f in self.files if f.status != "identical"]
        if not bad:
            lines.append(f"all {n} files identical")
        else:
            why = [f"input {i.name} ({i.ref}) " + ("now resolves to another revision" if i.pinned != i.resolved
                                                  else "has different files") for i in self.inputs if i.changed]
            lines.append(f"{len(bad)} of {n} files not identical" + (f"; {'; '.join(why)}" if why else ""))
        return "\n".join(lines)


def _git_blob_id(path: Path) -> str:
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _files(root: Path) -> dict[str, Path]:
    """A result's files by the path they have in a repo (what a push uploads), the card left out."""
    from hubmix.flow.result import result_files

    return {k: v for k, v in result_files(root).items() if _compared(k)}


def _layout_of(names: list[str]) -> tuple[str, str | None]:
    """(layout, name) of a result from its file names: diffusers, both (with the root file's stem) or single-file."""
    roots = [n.removesuffix(".gguf") + ".safetensors" if n.endswith(".gguf") else n  # a GGUF is a single file
             for n in names if "/" not in n and n.endswith((".safetensors", ".gguf"))]
    if "model_index.json" in names:
        return ("both", roots[0][: -len(".safetensors")]) if len(roots) == 1 else ("diffusers", None)
    stems = [n[: -len(".safetensors")] for n in roots if f"{n[: -len('.safetensors')]}.recipe.yaml" in names]
    if len(stems) == 1:
        return "single-file", stems[0]
    if len(roots) == 1:
        return "single-file", roots[0][: -len(".safetensors")]
    raise InputError(f"cannot tell the layout of the result from its files ({', '.join(sorted(names)[:6])})")


def _parse_overrides(models: dict[str, str | Path] | None, n: int) -> dict[str, Path]:
    out = {}
    for name, path in (models or {}).items():
        if name not in [letter(i) for i in range(n)]:
            raise InputError(f"--model {name}={path}: the recipe's inputs are {', '.join(letter(i) for i in range(n))}")
        p = Path(path).expanduser()
        if not p.exists():
            raise InputError(f"--model {name}={path}: no such file or folder")
        out[name] = p
    return out


def reproduce(source: str | Path, *, latest: bool = False, models: dict[str, str | Path] | None = None,
              keep: str | Path | None = None, quiet: bool = False, workers: int | None = None) -> ReproduceReport:
    """Rebuild the result at `source` (a Hub repo `org/name[@revision]`, a result folder or a single file) from its
    recipe and compare every file's sha256.

    `latest`: resolve Hub inputs as originally given (`org/a`, `org/b@v2`) instead of at their pinned commits, so
    a newer input revision shows. `models`: {name: path} for inputs that were local files (or to replace any
    input). `keep`: a folder to keep the rebuild in, under its original name (default: a temporary one, removed).
    """
    from hubmix.flow.result import recipe_from_card
    from hubmix.flow.result import load_result
    from hubmix.flow.merging import merge, resolve_local

    text = str(source)
    r = parse_ref(text)
    expected: dict[str, str] = {}  # path -> sha256, or git blob id for non-LFS files of a Hub repo
    blob_ids: set[str] = set()  # paths whose expected value is a git blob id
    revision = None
    if r.is_hub:
        from hubmix.hub.resolve import fetch_result

        remote = fetch_result(text)
        revision = remote.sha
        raw = yaml.safe_load(remote.recipe_text) if remote.recipe_file != "README.md" else recipe_from_card(
            remote.recipe_text)
        names = list(remote.files)
        layout, name = _layout_of(names)
        name = name or r.repo_id.split("/")[-1]  # type: ignore[union-attr]
        for path, meta in remote.files.items():
            if not _compared(path):
                continue
            if meta.get("sha256"):
                expected[path] = meta["sha256"]
            elif meta.get("blob_id"):
                expected[path] = meta["blob_id"]
                blob_ids.add(path)
    else:
        result = load_result(r.local or text)
        raw, layout, name = result.canonical, result.layout, result.name
        expected = {p: file_sha256(f) for p, f in _files(result.path).items()}
    if not isinstance(raw, dict) or not raw.get("models"):
        raise InputError(f"{text}: no readable hubmix recipe")
    canonical = raw
    recipe = Recipe.from_dict(dict(canonical), source=f"{text} (recipe)")
    recipe.layout = layout
    overrides = _parse_overrides(models, len(recipe.models))
    entries = [model_entry(m) for m in recipe.models]
    local = [f"{m.get('name', letter(i))} ({m['ref']})" for i, m in enumerate(entries)
             if not m.get("repo") and m.get("name", letter(i)) not in overrides]
    if local:
        raise InputError(f"{text}: input(s) {', '.join(local)} were local files, which are not on the Hub: pass "
                         f"each with --model NAME=PATH")

    def resolver(ref: Any, rec: Recipe) -> tuple[Path, dict[str, Any]]:
        m = model_entry(ref)
        name_ = m.get("name") or letter(rec.models.index(ref))
        if name_ in overrides:
            return overrides[name_], {"ref": m["ref"]}
        if latest:
            given = parse_hub_ref(m["ref"])
            hub_ref = ModelRef(m["ref"], repo_id=m["repo"], revision=given.revision,
                               filename=given.filename if given.repo_id == m["repo"] else None)
            from hubmix.hub.resolve import resolve_hub

            return resolve_hub(hub_ref, rec)
        return resolve_local(m, rec)

    tmp = Path(tempfile.mkdtemp(prefix="hubmix-reproduce-"))
    try:
        # the rebuild gets the original's own name (file names, the single file's title): --keep is its folder
        suffix = codec(recipe.dtype).extension if recipe.dtype in QUANT_DTYPES else ".safetensors"  # type: ignore
        target = (Path(keep) if keep is not None else tmp) / (f"{name}{suffix}" if layout == "single-file"
                                                              else (name or "result"))
        if keep is not None:
            target.parent.mkdir(parents=True, exist_ok=True)
        out = merge(recipe, out=target, quiet=quiet, workers=workers, resolver=resolver)
        rebuilt = _files(target)
        checks = []
        for path in sorted(set(rebuilt) | set(expected)):
            if path not in rebuilt:
                checks.append(FileCheck(path, "extra", None, expected[path]))
                continue
            sha = file_sha256(rebuilt[path])
            if path not in expected:
                checks.append(FileCheck(path, "missing", sha, None))
                continue
            mine = _git_blob_id(rebuilt[path]) if path in blob_ids else sha
            checks.append(FileCheck(path, "identical" if mine == expected[path] else "different", sha,
                                    expected[path]))
        inputs = []
        for i, (old, new) in enumerate(zip(entries, out.canonical["models"])):
            old_files, new_files = old.get("files") or {}, new.get("files") or {}
            changed = sorted(f for f in set(old_files) | set(new_files) if old_files.get(f) != new_files.get(f))
            inputs.append(InputCheck(old.get("name") or letter(i), old["ref"], old.get("revision"),
                                     new.get("revision"), changed))
        return ReproduceReport(text, revision, latest, checks, inputs, recipe_hash(canonical),
                               recipe_hash(out.canonical), target if keep is not None else None)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


__all__ = ["reproduce", "ReproduceReport", "FileCheck", "InputCheck"]
