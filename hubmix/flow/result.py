"""A hubmix result on disk (a diffusers folder, a single file, or both): its files, and the canonical recipe it
records (`recipe.yaml`, `<stem>.recipe.yaml` beside a single file, or the weights' `hubmix.recipe` metadata)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from hubmix.errors import InputError
from hubmix.recipe import recipe_yaml

RECIPE_MARK = "<!-- hubmix:recipe -->"  # the model card's recipe block follows this mark
_RECIPE_BLOCK = re.compile(re.escape(RECIPE_MARK) + r"\s*```ya?ml\n(.*?)\n```", re.S)


@dataclass
class Result:
    """A local hubmix result: where it is, its layout, its canonical recipe and the recipe text as written."""

    path: Path
    layout: str  # diffusers, single-file or both
    canonical: dict[str, Any]
    recipe_text: str

    @property
    def name(self) -> str:
        return self.path.stem if self.layout == "single-file" else self.path.name

    @property
    def card_path(self) -> Path:
        """README.md in a folder; `<stem>.README.md` beside a single file (uploaded as README.md)."""
        return self.path / "README.md" if self.path.is_dir() else self.path.with_name(f"{self.path.stem}.README.md")



def samples_dir(path: Path) -> Path:
    """Where a result's sample images go: `samples/` in a folder, `<stem>.samples/` beside a single file (uploaded
    as `samples/` either way)."""
    return path / "samples" if path.is_dir() else path.with_name(f"{path.stem}.samples")


def split_parts(path: Path) -> list[Path]:
    """The files of a single-file result written as several (Wan 2.2's experts: `<stem>_high_noise.safetensors`
    and `<stem>_low_noise.safetensors` for `--out <stem>.safetensors`), when `path` itself is not there."""
    from hubmix.formats.families import families

    if path.exists():
        return []
    suffixes = sorted({s for fam in families().values() for s in fam.split_files.values()})
    return [f for s in suffixes if (f := path.with_name(f"{path.stem}{s}{path.suffix}")).is_file()]


def result_files(path: Path) -> dict[str, Path]:
    """A result's files by the path they get in a repo: a folder's files (hidden ones left out), or a single file,
    its `<stem>.recipe.yaml` and its samples."""
    def tree(root: Path, prefix: str = "") -> dict[str, Path]:
        return {prefix + p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*"))
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)}

    if path.is_dir():
        return tree(path)
    parts = split_parts(path) or [path]
    out = {p.name: p for p in parts}
    sidecar = path.with_name(f"{path.stem}.recipe.yaml")
    if sidecar.is_file() and _sidecar_matches(sidecar, parts[0]):
        out[sidecar.name] = sidecar
    if samples_dir(path).is_dir():
        out.update(tree(samples_dir(path), "samples/"))
    return out


def _sidecar_matches(sidecar: Path, weights: Path) -> bool:
    """Whether `<stem>.recipe.yaml` is the recipe of these weights: a crash between the two renames of the final
    step (engine.target) can leave a newer sidecar beside the older weights; their recipe sha256 then differ."""
    try:
        own = _header_metadata(weights).get("hubmix.recipe_sha256")
    except InputError:
        return True  # not ours to judge (a pickle, a foreign file): keep the sidecar
    m = re.search(r"sha256 ([0-9a-f]{64})", sidecar.read_text(encoding="utf-8").split("\n", 1)[0])
    return own is None or m is None or m.group(1) == own


def _metadata_recipe(path: Path) -> dict[str, Any] | None:
    """The canonical recipe in a weight file's `hubmix.recipe` metadata (its header only is read)."""
    try:
        raw = _header_metadata(path).get("hubmix.recipe")
        return json.loads(raw) if raw else None
    except (InputError, ValueError):  # not a readable safetensors file, or no recipe in it
        return None


def _header_metadata(path: Path) -> dict[str, str]:
    """A single weight file's string metadata, from its header only: safetensors, or GGUF's string key-values."""
    from hubmix.formats.io.readers import SafetensorsFile

    if path.suffix == ".gguf":
        from hubmix.formats.quant.gguf_file import GGUFFile

        return GGUFFile(path).metadata
    return SafetensorsFile(path).metadata


def load_result(path: str | Path) -> Result:
    """Read a local result's canonical recipe: `recipe.yaml` (`<stem>.recipe.yaml` beside a single file), else the
    `hubmix.recipe` metadata of its weight files."""
    p = Path(path)
    parts = split_parts(p)
    if not p.exists() and not parts:
        raise InputError(f"{p}: no such file or folder")
    if p.is_dir():
        side = p / "recipe.yaml"
        layout = "both" if (p / f"{p.name}.safetensors").is_file() else "diffusers"
        weights = sorted(p.glob("*/*.safetensors")) + sorted(p.glob("*.safetensors"))
    else:
        side = p.with_name(f"{p.stem}.recipe.yaml")
        layout = "single-file"
        weights = parts or [p]
    # A single file's own metadata first: it is written with the weights in one step, the sidecar after them.
    canonical = _metadata_recipe(weights[0]) if layout == "single-file" else None
    if canonical is not None:
        text = recipe_yaml(canonical)
    elif side.is_file():
        text = side.read_text(encoding="utf-8")
        canonical = yaml.safe_load(text)
    else:
        canonical = next((r for r in map(_metadata_recipe, weights) if r), None)
        text = recipe_yaml(canonical) if canonical else ""
    if not isinstance(canonical, dict) or "models" not in canonical:
        raise InputError(f"{p}: no hubmix recipe (no {side.name}, no hubmix.recipe metadata): not a hubmix result")
    return Result(p, layout, canonical, text)


def recipe_from_card(text: str) -> dict[str, Any] | None:
    """The canonical recipe a hubmix card holds in its recipe block, or None."""
    m = _RECIPE_BLOCK.search(text)
    if not m:
        return None
    data = yaml.safe_load(m.group(1))
    return data if isinstance(data, dict) else None


__all__ = ["Result", "load_result", "result_files", "samples_dir", "recipe_from_card", "RECIPE_MARK"]
