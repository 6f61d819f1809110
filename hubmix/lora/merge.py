"""`merge_loras`: LoRA files combined into one, module by module.

The merged update of a module is the strength-weighted sum of the inputs' updates, sum_i s_i * (alpha_i/r_i) *
up_i @ down_i, taken either exactly, by concatenating the factors (rank = sum of ranks, `rank="concat"`), or
re-compressed to rank R by the SVD of that sum. The SVD never forms the sum: with U = [s_i a_i/r_i up_i] and
D = [down_i] stacked, U = Q1 R1 and D^T = Q2 R2 (QR), so the sum is Q1 (R1 R2^T) Q2^T and only the small core
is factorized: exact, and cheap for any layer size.

Inputs are kohya or PEFT LoRA/LoCon files. Without `base`, modules are matched by their names in the files (which
must then share one format). With `base` (a model, only its headers are read), every module is mapped onto the
base's canonical keys as bake-in does, so kohya and PEFT files mix, and block weights apply: `block_weight(
component, key) -> factor` multiplies each input's strength (the A1111 `--block-alpha` list is one such function).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from hubmix.errors import InputError, RecipeError
from hubmix.lora.files import SUFFIXES, json_meta, module_name, write_lora


@dataclass
class Term:
    up: Any  # TensorRef-like
    down: Any
    scale: float  # strength * alpha / rank (* block weight)


@dataclass
class MergedLoras:
    output: Path
    modules: int
    rank: str
    names: str  # "kohya" or "diffusers"
    notes: list[str] = field(default_factory=list)


def parse_entry(text: str) -> tuple[str, float]:
    """`PATH[:STRENGTH]`."""
    ref, sep, tail = text.rpartition(":")
    if sep and ref:
        try:
            return ref, float(tail)
        except ValueError:
            pass
    return text, 1.0


def merge_loras(entries: list[tuple[str, float]], out: str | Path, *, rank: int | str = "concat",
                base: str | None = None, fmt: str | None = None, block_weight: Callable[[str, str], float] | None = None,
                block_alpha: str | None = None, dtype: str = "fp16", overwrite: bool = False) -> MergedLoras:
    import torch

    from hubmix import __version__
    from hubmix.lora.extract import DTYPES

    if not entries:
        raise RecipeError("merge-loras: name at least one LoRA")
    if rank != "concat" and (not isinstance(rank, int) or rank < 1):
        raise RecipeError(f"--rank: a positive number or concat, not {rank!r}")
    if (block_weight or block_alpha) and base is None:
        raise RecipeError("block weights need --base (a model of the LoRAs' family: its block labels)")
    groups: dict[Any, dict[str, Any]] = {}  # module identity -> {"name", "terms", "shape", ...}
    notes: list[str] = []
    if base is None:
        kinds = set()
        for path, strength in entries:
            kind = _read_by_name(Path(path), strength, groups)
            kinds.add(kind)
        if len(kinds) > 1:
            raise InputError("merge-loras: the inputs mix kohya and PEFT names; pass --base MODEL to map them onto "
                             "one model's keys")
        names = "kohya" if kinds == {"kohya"} else "diffusers"
        if fmt and fmt != names:
            raise RecipeError(f"--format {fmt} needs --base MODEL (the inputs are {names} files)")
    else:
        names = fmt or "kohya"
        _read_on_base(entries, base, groups, names, block_weight, block_alpha, notes)
    tdtype = getattr(torch, DTYPES[dtype])
    tensors: dict[str, Any] = {}
    ranks = []
    for g in groups.values():
        ups = [t.up.load().float() for t in g["terms"]]
        downs = [t.down.load().float() for t in g["terms"]]
        out_dim = ups[0].shape[0]
        shape = (out_dim, *downs[0].shape[1:])
        if any(d.shape[1:] != downs[0].shape[1:] or u.shape[0] != out_dim for u, d in zip(ups, downs)):
            raise InputError(f"merge-loras: module {g['name']} has inputs of different shapes")
        u = torch.cat([x.reshape(out_dim, -1) * t.scale for x, t in zip(ups, g["terms"])], 1)
        d = torch.cat([x.reshape(x.shape[0], -1) for x in downs], 0)
        if rank == "concat":
            k, up, down = u.shape[1], u, d
        else:
            up, down = _recompress(u, d, rank)
            k = up.shape[1]
        ranks.append(k)
        if len(shape) > 2:
            up, down = up.reshape(out_dim, k, 1, 1), down.reshape(k, *shape[1:])
        up_sfx, down_sfx = SUFFIXES[names]
        tensors[g["name"] + up_sfx] = up.contiguous().to(tdtype)
        tensors[g["name"] + down_sfx] = down.contiguous().to(tdtype)
        if names == "kohya":
            tensors[g["name"] + ".alpha"] = torch.tensor(float(k), dtype=tdtype)  # scale 1: alpha = rank
    if not tensors:
        raise InputError("merge-loras: the inputs hold no LoRA module")
    meta = {"hubmix.version": __version__, "hubmix.merge_loras": json_meta(
        {"inputs": [{"file": Path(p).name, "strength": s} for p, s in entries], "rank": str(rank),
         **({"base": Path(base).name if Path(base).exists() else base} if base else {})})}
    if names == "kohya":
        meta.update({"ss_network_module": "networks.lora", "ss_network_dim": str(max(ranks))})
    write_lora(Path(out), tensors, meta, overwrite)
    shown = "concat (rank " + (f"{min(ranks)}-{max(ranks)}" if min(ranks) != max(ranks) else str(ranks[0])) + ")" \
        if rank == "concat" else str(rank)
    return MergedLoras(Path(out), len(groups), shown, names, notes)


def _recompress(u, d, rank: int):
    """Rank-`rank` factors of u @ d by the SVD of the QR core (see the module docstring): up = U*sqrt(S),
    down = sqrt(S)*Vh."""
    import torch

    q1, r1 = torch.linalg.qr(u)
    q2, r2 = torch.linalg.qr(d.T)
    cu, s, cvh = torch.linalg.svd(r1 @ r2.T, full_matrices=False)
    k = min(rank, s.numel())
    root = s[:k].sqrt()
    return (q1 @ cu[:, :k]) * root, root[:, None] * (cvh[:k] @ q2.T)


def _read_by_name(path: Path, strength: float, groups: dict) -> str:
    """Add a file's modules keyed by their own names; returns its naming (kohya or peft)."""
    from hubmix.formats.io.readers import open_weight_file
    from hubmix.formats.lora import KOHYA_PREFIXES, _FileRef, _peft_metadata, _meta_alpha
    from hubmix.formats.lycoris import split_key

    if not path.is_file():
        raise InputError(f"{path}: no such LoRA file")
    f = open_weight_file(path)
    keys = f.keys()
    kind = "kohya" if any(k.startswith(tuple(KOHYA_PREFIXES)) for k in keys) else "peft"
    meta = _peft_metadata(f.metadata) if kind == "peft" else {}
    parts: dict[str, dict[str, str]] = {}
    for k in keys:
        parsed = split_key(k)
        if parsed is None or (parsed[1] not in (None, "lora")) or parsed[2] in ("mid", "dora"):
            what = parsed[1] if parsed else "unknown"
            raise InputError(f"{path.name}: merge-loras reads LoRA/LoCon modules (up/down); key {k} is {what}")
        parts.setdefault(parsed[0], {})[parsed[2]] = k
    for mod, p in sorted(parts.items()):
        if "up" not in p or "down" not in p:
            raise InputError(f"{path.name}: module {mod} lacks its up or down weight")
        down = _FileRef(f, p["down"])
        r = down.shape[0]
        if "alpha" in p:
            alpha = float(f.tensor(p["alpha"]).float().item())
        else:
            comp = mod.partition(".")[0] if kind == "peft" else ""
            alpha = _meta_alpha(meta, comp, mod, r) if kind == "peft" else float(r)
        g = groups.setdefault(mod, {"name": mod, "terms": []})
        g["terms"].append(Term(_FileRef(f, p["up"]), down, strength * alpha / r))
    return kind


def _read_on_base(entries, base: str, groups: dict, names: str, block_weight, block_alpha, notes: list) -> None:
    from hubmix.formats.lora import read_lora
    from hubmix.flow.merging import open_inputs, resolve_local
    from hubmix.recipe import Recipe

    (model,), _ = open_inputs(Recipe(models=[base], method="weighted_sum", layout="single-file"), resolve_local)
    family = model.family
    comps = model.components
    if block_alpha is not None and block_weight is None:
        block_weight = a1111_block_weight(block_alpha, model)
    for path, strength in entries:
        modules, _ = read_lora(Path(path), Path(path).name, comps, {c: 1.0 for c in comps}, False)
        for m in modules:
            if m.kind != "lora" or "mid" in m.parts or m.dora is not None:
                raise InputError(f"{Path(path).name}: merge-loras reads LoRA/LoCon modules (up/down); {m.name} is "
                                 f"{m.kind}{' with DoRA' if m.dora is not None else ''}")
            w = block_weight(m.component, m.key) if block_weight else 1.0
            g = groups.setdefault((m.component, m.key), {"name": module_name(names, family, comps[m.component],
                                                                             m.key), "terms": []})
            g["terms"].append(Term(m.up, m.down, strength * m.factor * w))


def a1111_block_weight(text: str, model: Any) -> Callable[[str, str], float]:
    """--block-alpha LIST|PRESET as a block-weight function: the denoiser's keys by their block label, the
    BASE value for the text encoders, 1 elsewhere."""
    from hubmix.methods.presets import parse_block_list, resolve_block_list

    family = model.family
    if not family.block_list:
        raise RecipeError(f"--block-alpha: {family.name} models have no A1111 block list")
    values = resolve_block_list(parse_block_list(text, "--block-alpha"), family.block_list, family.id, "--block-alpha")
    main = model.components.get(family.main)

    def weight(component: str, key: str) -> float:
        if component in family.block_base:
            return float(values["BASE"])
        if component == family.main and main is not None and main.keymap is not None:
            return float(values.get(main.keymap.block_label(key), 1.0))
        return 1.0
    return weight


__all__ = ["merge_loras", "parse_entry", "a1111_block_weight"]
