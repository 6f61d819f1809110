"""Any architecture, key by key: safetensors files whose keys match no family open as the generic family
(families/keys.yaml): one component, `model`, holding every key under its own name, so the engine merges them like
any family's tensors (spans, native kernels, the same writer).

Two guards keep this from hiding mistakes: a file that carries part of a known family's signature (a damaged or
truncated Flux or SD file) is refused, never merged as "unknown"; and every input of a key-by-key merge must have
exactly model a's keys and shapes (`check_same_keys`), since no layout data says how differing ones would line up.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path

from hubmix.errors import FamilyError, InputError
from hubmix.formats.families import families


def near_family(keys: dict[str, int]) -> tuple[str, str, str] | None:
    """(family name, a signature pattern the keys have, one they lack) when `keys` carry part of a known family's
    single-file signature (bare, or under its main component's prefix), else None; the family whose signature
    they hold the largest share of (a Flux file without single blocks is a damaged Flux file, not Chroma). At least
    half of a signature must be there: one common name alone (`img_in.weight`, which Qwen-Image's signature holds
    beside two others) says nothing about where a file came from."""
    best: tuple[float, tuple[str, str, str]] | None = None
    for fam in families().values():
        prefix = fam.components[fam.main].prefix
        for layout in ("single_file", "main_only"):
            patterns = [r["present"] for r in fam.detect.get(layout) or () if "present" in r]
            for p in ("",) + ((prefix,) if layout == "main_only" else ()):
                have = [x for x in patterns if any(fnmatch.fnmatchcase(k, p + x) for k in keys)]
                lack = [x for x in patterns if x not in have]
                share = len(have) / max(1, len(patterns))
                if have and lack and share >= 0.5 and (best is None or share > best[0]):
                    best = (share, (fam.name, p + have[0], p + lack[0]))
    return best[1] if best else None


def generic_allowed(path: Path, keys: dict[str, int]) -> bool:
    """Whether a single file that matched no family opens key by key; raises for a damaged known-family file."""
    if path.suffix != ".safetensors" or not keys:
        return False
    near = near_family(keys)
    if near is not None:
        name, have, lack = near
        raise FamilyError(f"{path}: has {name} keys ({have}) but none matching {lack}: a damaged or partial {name} "
                          "file; refused (not merged key by key)")
    return True


def check_same_keys(models) -> None:
    """Every input of a key-by-key merge has model a's keys with model a's shapes; else one line naming the first
    key (in sorted order) that differs and both shapes."""
    a = models[0]
    ta = a.components["model"].tensors
    for m in models[1:]:
        tm = m.components["model"].tensors
        for k in sorted(set(ta) | set(tm)):
            sa, sm = ta.get(k), tm.get(k)
            if sa is None or sm is None or sa.shape != sm.shape:
                def show(r):
                    return list(r.shape) if r is not None else "missing"
                raise InputError(f"{m.path}: key {k} is {show(sm)} here and {show(sa)} in {a.path.name}; a "
                                 "model of an unrecognised architecture merges key by key only with models of "
                                 "the same keys and shapes")
