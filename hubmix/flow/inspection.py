"""`inspect`: what a model is (family, layout, components, dtypes, sizes) and the recipe it was made with."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any


from hubmix.formats.model import open_model


def inspect_model(path: str | Path, *, variant: str | None = None) -> dict[str, Any]:
    m = open_model(path, variant=variant)
    info: dict[str, Any] = {
        "path": str(m.path),
        "family": m.family.id,
        "family_name": m.family.name,
        "layout": m.layout,
        "main_only": m.main_only,
        "variant": m.model_variant,
        "inpainting": m.inpainting,
        "prediction_type": m.prediction_type,
        "zero_terminal_snr": m.prediction.zero_snr,
        "prediction_source": m.prediction.source,
        "components": {},
        "files": [str(f) for f in m.files],
    }
    for name, c in m.components.items():
        dtypes = Counter(r.quant or r.dtype_name for r in c.tensors.values())  # a quantized group: its quant type
        info["components"][name] = {
            "tensors": len(c.tensors),
            "parameters": sum(r.numel for r in c.tensors.values()),
            "bytes": sum(_stored_nbytes(r) for r in c.tensors.values()),
            "dtypes": dict(sorted(dtypes.items())),
            "config_source": c.config_source,
            "config_notes": c.notes,
            "not_used": [f"{k} ({why})" for k, why in c.dropped],
        }
    if m.unassigned:
        info["outside_components"] = m.unassigned
    ema = [k for k in m.unassigned if k.startswith("model_ema.")]
    info["has_ema"] = bool(ema)
    info["recipe"] = _embedded_recipe(m)
    return info


def _stored_nbytes(ref) -> int:
    """Bytes a tensor takes in its file: a quantized one's share of its group's stored tensors."""
    group = getattr(ref.file, "groups", {}).get(ref.key)
    if group is None:
        return ref.nbytes
    inner = ref.file.inner
    total = sum(inner.info(k).nbytes for k in group.members)
    return total * ref.numel // max(1, math.prod(group.shape))


def _embedded_recipe(m) -> dict[str, Any] | None:
    from hubmix.flow.result import load_result
    from hubmix.errors import InputError

    try:
        return load_result(m.path).canonical
    except InputError:  # not made by hubmix
        return None


def render(info: dict[str, Any]) -> str:
    lines = [f"{info['path']}", f"  family:  {info['family_name']} ({info['family']})"
             f"{', ' + info['variant'] if info.get('variant') else ''}{', inpainting' if info['inpainting'] else ''}",
             f"  layout:  {info['layout']}{' (the transformer alone)' if info.get('main_only') else ''}"]
    if info["prediction_type"]:
        zsnr = ", zero terminal SNR" if info["zero_terminal_snr"] else ""
        lines.append(f"  prediction type: {info['prediction_type']}{zsnr} ({info['prediction_source']})")
    for name, c in info["components"].items():
        dt = ", ".join(f"{k} x{v}" for k, v in c["dtypes"].items())
        lines.append(f"  {name:<15} {c['tensors']:>5} tensors {c['parameters'] / 1e6:>9.2f}M params "
                     f"{c['bytes'] / 2**20:>9.1f} MiB  [{dt}]  config: {c['config_source']}")
        for note in c["config_notes"]:
            lines.append(f"      assumed: {note}")
        if c["not_used"]:
            lines.append(f"      not used: {len(c['not_used'])} keys, e.g. {c['not_used'][0]}")
    if info.get("outside_components"):
        lines.append(f"  outside components: {len(info['outside_components'])} keys"
                     f"{' (has EMA weights: --ema uses them)' if info['has_ema'] else ''}")
    r = info["recipe"]
    if r:
        comps = ", ".join(f"{k}: {v.get('method', 'from ' + str(v.get('from')))}"
                          for k, v in (r.get("components") or {}).items())
        lines.append(f"  recipe:  {r.get('method')} of {', '.join(m.get('ref', '?') for m in r.get('models', []))}"
                     f" ({comps})")
    else:
        lines.append("  recipe:  none recorded")
    return "\n".join(lines)
