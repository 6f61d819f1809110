"""`extract_lora(TUNED, BASE)`: a LoRA holding TUNED - BASE, layer by layer, from the engine's lazy readers.

For every Linear and Conv weight of the chosen components (default: the denoiser and the text encoders): the
delta in float32, its truncated SVD (lora.svd: randomized where as accurate, checked per layer), up = U*sqrt(S),
down = sqrt(S)*Vh (kohya's split); convs reshaped to [out, in*kh*kw] and back. Only two layers are in memory at
a time (the inputs stay memory-mapped), never two models. Zero deltas are left out and listed; other tensors that
changed (biases, norms, embeddings) are listed, and written as kohya `diff`/`diff_b` entries with `with_diffs`.
"""

from __future__ import annotations

import math
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hubmix.errors import InputError, RecipeError
from hubmix.lora.files import SUFFIXES, json_meta, module_name, write_lora

NOT_LAYERS = re.compile(r"(token_embedding|position_embedding|embed_tokens|relative_attention_bias)\.weight$"
                        r"|^shared\.weight$")  # 2-D weights of embedding tables: not Linear layers
DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


@dataclass
class ExtractOptions:
    rank: int | None = 32  # None: auto (by energy)
    energy: float | None = None  # --rank auto: share of each layer's energy to keep
    max_rank: int = 128
    conv_rank: int | None = None  # 3x3 (k>1) convs; default: rank
    alpha: float | None = None  # kohya's alpha, one for the file; default: --rank (--max-rank with auto)
    clamp_quantile: float | None = None
    components: list[str] | None = None
    fmt: str = "kohya"
    with_diffs: bool = False
    dtype: str = "fp16"
    method: str = "auto"  # auto | exact (svd.truncated)
    tol: float = 0.005


@dataclass
class ComponentStats:
    layers: int = 0
    ranks: list[int] = field(default_factory=list)
    kept: float = 0.0
    total: float = 0.0
    randomized: int = 0
    by_spectrum: int = 0  # randomized layers the ceiling could not certify, checked by the exact spectrum instead
    exact: int = 0
    worst_vs_exact: float = 1.0  # lowest kept / exact-kept ratio of a randomized layer (a lower bound of it where
    # the ceiling certified the layer: kept / ceiling)

    def to_dict(self) -> dict[str, Any]:
        return {"layers": self.layers, "rank_min": min(self.ranks, default=0), "rank_max": max(self.ranks, default=0),
                "energy_kept": round(self.kept / self.total, 6) if self.total else 1.0,
                "randomized": self.randomized, "randomized_checked_by_spectrum": self.by_spectrum, "exact": self.exact,
                "worst_randomized_vs_exact": round(self.worst_vs_exact, 6)}


@dataclass
class Extraction:
    output: Path
    family: Any
    base: dict[str, Any]
    tuned: dict[str, Any]
    components: dict[str, ComponentStats]
    zero: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)  # changed tensors that are not layers
    skipped: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)


def is_layer(key: str, shape: tuple[int, ...]) -> bool:
    return key.endswith(".weight") and len(shape) in (2, 4) and not NOT_LAYERS.search(key)


def check_options(o: ExtractOptions) -> None:
    if o.fmt not in SUFFIXES:
        raise RecipeError(f"--format: kohya or diffusers, not {o.fmt}")
    if o.rank is None and not (o.energy and 0 < o.energy <= 1):
        raise RecipeError("--rank auto needs --energy E with 0 < E <= 1")
    if o.rank is not None and o.rank < 1 or (o.conv_rank is not None and o.conv_rank < 1):
        raise RecipeError("--rank and --conv-rank must be at least 1")
    if o.fmt == "diffusers" and (o.alpha is not None or o.with_diffs):
        raise RecipeError("--alpha and --with-diffs need --format kohya (diffusers files have scale 1 and no diffs)")
    if o.clamp_quantile is not None and not 0 < o.clamp_quantile <= 1:
        raise RecipeError("--clamp-quantile must be in (0, 1]")
    if o.dtype not in DTYPES:
        raise RecipeError(f"--dtype: one of {', '.join(DTYPES)}")


def extract_lora(tuned: str, base: str, out: str | Path, options: ExtractOptions | None = None, *,
                 overwrite: bool = False, quiet: bool = False, resolver: Any = None) -> Extraction:
    """Extract TUNED - BASE as a LoRA file at `out` (see the module docstring)."""
    import torch
    from tqdm.auto import tqdm

    from hubmix import __version__
    from hubmix.formats.model import check_same_family
    from hubmix.flow.merging import open_inputs, resolve_local
    from hubmix.recipe import Recipe

    o = options or ExtractOptions()
    check_options(o)
    out = Path(out)
    if out.exists() and not overwrite:
        raise InputError(f"{out}: exists; pass --overwrite to replace it")
    recipe = Recipe(models=[tuned, base], method="weighted_sum", layout="single-file")
    (mt, mb), (it, ib) = open_inputs(recipe, resolver or resolve_local)
    family = check_same_family([mt, mb])
    text_encoders = [c for c in family.components if c.startswith("text_encoder")]
    chosen = o.components or [family.main, *text_encoders]
    unknown = [c for c in chosen if c not in family.components]
    if unknown:
        raise RecipeError(f"--components: {', '.join(unknown)} not in {family.name} ({', '.join(family.components)})")
    result = Extraction(out, family, ib, it, {})
    work = []
    for cname in chosen:
        ct, cb = mt.components.get(cname), mb.components.get(cname)
        if ct is None or cb is None:
            result.skipped.append(f"{cname}: not in {'both inputs' if ct is cb else mt.name if ct is None else mb.name}")
            continue
        result.components[cname] = ComponentStats()
        for key, rt in sorted(ct.tensors.items()):
            rb = cb.tensors.get(key)
            if rb is None or rb.shape != rt.shape:
                result.skipped.append(f"{cname}/{key}: " + ("not in the base" if rb is None else
                                                              f"shape {list(rt.shape)} vs base {list(rb.shape)}"))
                continue
            if rt.dtype_name.startswith(("int", "uint", "bool")):
                continue
            work.append((cname, ct, key, rt, rb))
    tensors: dict[str, Any] = {}
    dtype = getattr(torch, DTYPES[o.dtype])
    with tqdm(total=sum(math.prod(w[3].shape) for w in work), unit="w", unit_scale=True, desc="extracting",
              disable=quiet, dynamic_ncols=True) as bar:
        for cname, comp, key, rt, rb in work:
            delta = rt.load().to(torch.float32, copy=True)  # in place below: two float32 copies at a time, not three
            delta.sub_(rb.load().float())
            name = f"{cname}/{key}"
            if is_layer(key, rt.shape):
                if not bool(delta.any()):
                    result.zero.append(name)
                else:
                    _layer(delta, key, rt.shape, module_name(o.fmt, family, comp, key), o, dtype, tensors,
                           result.components[cname])
            elif bool(delta.any()):
                result.changed.append(name)
                if o.with_diffs and key.endswith((".weight", ".bias")):
                    suffix = ".diff" if key.endswith(".weight") else ".diff_b"
                    tensors[module_name(o.fmt, family, comp, key) + suffix] = delta.to(dtype)
            del delta
            bar.update(math.prod(rt.shape))
    if not tensors:
        raise InputError(f"{tuned} and {base}: no Linear/Conv weight differs in {', '.join(chosen)}; nothing to extract")
    result.metadata = _metadata(result, o, __version__)
    write_lora(out, tensors, result.metadata, overwrite)
    return result


def _layer(delta, key: str, shape: tuple[int, ...], module: str, o: ExtractOptions, dtype, tensors: dict,
           stats: ComponentStats) -> None:
    import torch

    from hubmix.lora.svd import threads_for, rank_for_energy, spectrum, truncated

    a = delta.reshape(shape[0], -1)
    conv_k = len(shape) == 4 and shape[2] * shape[3] > 1
    energies = None
    if o.rank is None:
        with threads_for(a.numel()):
            energies = spectrum(a)
        rank = rank_for_energy(energies, o.energy, o.max_rank)  # type: ignore[arg-type]
    else:
        rank = (o.conv_rank or o.rank) if conv_k else o.rank
    f = truncated(a, rank, method=o.method, tol=o.tol, seed=zlib.crc32(key.encode()), energies=energies)
    k = f.s.numel()
    root = f.s.sqrt()
    up, down = f.u * root, root[:, None] * f.vh
    # one alpha for the whole file (--alpha, else --rank / --max-rank, as kohya's script writes): diffusers' kohya
    # reader applies a single lora_alpha to every module of a component; the weights are scaled so that
    # up @ down * alpha / k is still the delta
    alpha = float(o.alpha if o.alpha is not None else (o.rank or o.max_rank))
    if o.fmt == "kohya" and alpha != k:
        c = math.sqrt(k / alpha)
        up, down = up * c, down * c
    if o.clamp_quantile is not None:  # kohya's: clamp both at the quantile of their joint absolute values
        dist = torch.cat([up.flatten(), down.flatten()])
        hi = torch.quantile(dist, o.clamp_quantile) if dist.numel() < (1 << 24) else \
            dist.kthvalue(max(1, int(o.clamp_quantile * dist.numel()))).values
        up, down = up.clamp(-hi, hi), down.clamp(-hi, hi)
    if len(shape) == 4:
        up, down = up.reshape(shape[0], k, 1, 1), down.reshape(k, *shape[1:])
    up_sfx, down_sfx = SUFFIXES[o.fmt]
    tensors[module + up_sfx] = up.to(dtype)
    tensors[module + down_sfx] = down.to(dtype)
    if o.fmt == "kohya":
        tensors[module + ".alpha"] = torch.tensor(alpha, dtype=dtype)
    stats.layers += 1
    stats.ranks.append(k)
    stats.kept += f.kept
    stats.total += f.total
    if f.method == "randomized":
        stats.randomized += 1
        stats.by_spectrum += f.check == "spectrum"
        stats.worst_vs_exact = min(stats.worst_vs_exact, f.kept / f.exact_kept if f.exact_kept else 1.0)
    else:
        stats.exact += 1


def _ident(x: dict[str, Any]) -> str:
    return f"{x['repo']}@{x['revision']}" if x.get("repo") else x.get("ref", "")


def _metadata(r: Extraction, o: ExtractOptions, version: str) -> dict[str, str]:
    rank = str(o.rank) if o.rank is not None else f"auto(energy={o.energy:g}, max={o.max_rank})"
    meta = {
        "hubmix.version": version,
        "hubmix.family": r.family.id,
        "hubmix.base_model": _ident(r.base),
        "hubmix.tuned_model": _ident(r.tuned),
        "hubmix.rank": rank,
        "hubmix.conv_rank": str(o.conv_rank or rank),
        "hubmix.format": o.fmt,
        "hubmix.energy": json_meta({c: s.to_dict()["energy_kept"] for c, s in r.components.items()}),
        "hubmix.components": json_meta({c: s.to_dict() for c, s in r.components.items()}),
    }
    if o.clamp_quantile is not None:
        meta["hubmix.clamp_quantile"] = f"{o.clamp_quantile:g}"
    if o.fmt == "kohya":
        meta.update({"ss_network_module": "networks.lora", "ss_network_dim": str(o.rank or o.max_rank),
                     "ss_network_alpha": f"{o.alpha:g}" if o.alpha is not None else str(o.rank or o.max_rank),
                     "ss_base_model_version": r.family.id})
    return meta
