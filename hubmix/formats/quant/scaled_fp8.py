"""ComfyUI's scaled fp8: read in both forms, written in the legacy one (which every ComfyUI since 2024 loads).

Reading, as ComfyUI's `convert_old_quants` and its quantized layers do (comfy/utils.py, comfy/ops.py, quant_ops.py):
- legacy: a `scaled_fp8` marker tensor (any prefix; 2 elements = full-precision matmul, nothing else changes) and
  per layer `<layer>.weight` in float8 with `<layer>.scale_weight`; ComfyUI renames these `.weight_scale`;
- new: `_quantization_metadata` in the header (`{"format_version": ..., "layers": {layer: {"format": ...}}}`)
  and/or `<layer>.comfy_quant` uint8 tensors holding the same per-layer JSON, with `<layer>.weight_scale`.
A layer's value is float32(weight) x float32(scale), the weight read in its stored fp8 dtype; the scale is one
number (per tensor) or one per output row. Input scales (`.scale_input` / `.input_scale`: calibration of the
activations' fp8 matmul for these very weights) do not describe a merged weight: they are read and dropped.
Formats of that family hubmix does not dequantize (nvfp4, mxfp8, int8_tensorwise...) are refused by name.

Writing (`--dtype fp8_scaled`): float8_e4m3fn with a per-tensor float32 `scale_weight` = amax / 448 (1 for an
all-zero tensor), values round(x / scale) clamped to +-448, the file marked by `<denoiser prefix>scaled_fp8` (an
empty e4m3fn tensor: not the 2-element full-precision form) so ComfyUI and Forge pick the scaled-fp8 operations. Quantized: the
denoiser's 2-D `.weight` matrices (its Linear layers) of at least 1024 elements; kept in high precision (bf16):
1-D tensors (biases, norms), embeddings and convolutions, and every other component (text encoders, VAE), as
ComfyUI's own scaled-fp8 releases keep them.
"""

from __future__ import annotations

import json
import math
import struct
from typing import TYPE_CHECKING, Any

from hubmix.errors import InputError
from hubmix.formats.io.readers import WeightFile
from hubmix.formats.io.span import FP8, dtype_name
from hubmix.formats.quant import (QuantCodec, QuantGroup, QuantReader, StoredTensor, register_codec,
                                  register_reader)
from hubmix.formats.quant import accel
from hubmix.formats.quant.view import stored_bytes

if TYPE_CHECKING:
    import torch

META = "_quantization_metadata"
MARKER = "scaled_fp8"
FP8_MAX = 448.0  # float8_e4m3fn's largest finite value
READ_FORMATS = {"float8_e4m3fn", "float8_e5m2"}  # ComfyUI's per-tensor fp8 layouts
MIN_QUANT = 1024  # smaller matrices stay high precision (ComfyUI-GGUF's threshold; too small to matter)


def _marker(key: str) -> bool:
    return key == MARKER or key.endswith("." + MARKER)


class ScaledFp8Reader(QuantReader):
    name = "ComfyUI scaled fp8"

    def detect(self, f: WeightFile) -> bool:
        return META in f.metadata or any(
            k.endswith((".scale_weight", ".weight_scale", ".comfy_quant")) or _marker(k)
            for k in f.keys())

    def groups(self, f: WeightFile) -> tuple[list[QuantGroup], set[str]]:
        keys = set(f.keys())
        consumed = {k for k in keys if _marker(k)}
        consumed |= {k for k in keys if k.endswith((".scale_input", ".input_scale"))}
        layers: dict[str, dict[str, Any]] = {}  # layer -> its conf (format)
        if META in f.metadata:
            try:
                meta = json.loads(f.metadata[META])
                for layer, conf in meta["layers"].items():
                    layers[layer] = {"format": conf} if isinstance(conf, str) else dict(conf)
            except (ValueError, KeyError, TypeError, AttributeError):
                raise InputError(f"{f.path}: corrupt {META} metadata (expected JSON with a 'layers' mapping)") from None
        for k in sorted(keys):
            if k.endswith(".comfy_quant"):
                consumed.add(k)
                try:
                    conf = json.loads(stored_bytes(f, k).decode("utf-8"))
                    layers[k[:-len(".comfy_quant")]] = {"format": conf} if isinstance(conf, str) else dict(conf)
                except (ValueError, TypeError, UnicodeDecodeError):
                    raise InputError(f"{f.path}: {k}: not a JSON layer configuration") from None
        for k in sorted(keys):  # legacy: the layer is read as scaled fp8 in its stored dtype
            if k.endswith(".scale_weight"):
                layers.setdefault(k[:-len(".scale_weight")], {"format": "legacy"})
        groups = []
        for layer, conf in sorted(layers.items()):
            fmt = conf.get("format")
            wkey = _weight_key(f, keys, layer)
            if fmt not in READ_FORMATS and fmt != "legacy":
                raise InputError(f"{f.path}: {wkey or layer}: ComfyUI quant format {fmt!r}, which hubmix does not "
                                 f"dequantize (it reads {', '.join(sorted(READ_FORMATS))} scaled layers)")
            if wkey is None:
                raise InputError(f"{f.path}: {layer}: quantized layer without its weight tensor")
            skey = next((layer + s for s in (".weight_scale", ".scale_weight") if layer + s in keys), None)
            groups.append(_group(f, wkey, skey, fmt))
            consumed.update(x for x in (skey,) if x)
        for k in sorted(keys - consumed - {g.key for g in groups}):
            if k.endswith((".weight_scale", ".scale_weight")):
                raise InputError(f"{f.path}: {k}: a weight scale of no quantized layer")
        return groups, consumed


def _weight_key(f: WeightFile, keys: set[str], layer: str) -> str | None:
    if layer + ".weight" in keys:
        return layer + ".weight"
    found = [k for k in keys if k.endswith("." + layer + ".weight")]  # layer names stored without their prefix
    return found[0] if len(found) == 1 else None


def _group(f: WeightFile, wkey: str, skey: str | None, fmt: str) -> QuantGroup:
    info = f.info(wkey)
    if info.dtype_name not in FP8 or (fmt in READ_FORMATS and info.dtype_name != fmt):
        want = fmt if fmt in READ_FORMATS else "float8_e4m3fn or float8_e5m2"
        raise InputError(f"{f.path}: {wkey}: a scaled fp8 weight stored as {info.dtype_name}, not {want}")
    shape = info.shape
    numel = math.prod(shape)
    rows = shape[0] if shape else 1
    if skey is not None:
        sinfo = f.info(skey)
        if sinfo.numel not in (1, rows) or not sinfo.dtype_name.startswith(("float", "bfloat")):
            raise InputError(f"{f.path}: {skey}: a scale of shape {list(sinfo.shape)} {sinfo.dtype_name} for "
                             f"{wkey} of shape {list(shape)} (expected one float, or one per row: {rows})")
    per_row = skey is not None and f.info(skey).numel == rows and rows != 1
    cols = numel // rows if rows else 0
    cache: dict[str, Any] = {}

    def scale() -> torch.Tensor:
        if "s" not in cache:
            cache["s"] = (f.tensor(skey).float().reshape(-1) if skey is not None else None)
        return cache["s"]

    def dequantize(start: int, stop: int) -> torch.Tensor:
        w = f.tensor(wkey).reshape(-1)[start:stop].float()
        s = scale()
        if s is None:
            return w
        if not per_row:
            return w * s[0]
        import torch

        idx = torch.arange(start, stop, dtype=torch.int64) // cols
        return w * s[idx]

    kind = info.dtype_name.removeprefix("float8_")
    return QuantGroup(wkey, shape, f"fp8_scaled {kind}{' per-row' if per_row else ''}",
                      (wkey, *((skey,) if skey else ())), dequantize)


register_reader(ScaledFp8Reader())


class ScaledFp8Codec(QuantCodec):
    name = "fp8_scaled"
    needs_amax = True
    spans = True
    describe = "ComfyUI scaled fp8: float8_e4m3fn weights with a per-tensor scale_weight (amax/448)"
    loader = ("ComfyUI scaled fp8 (float8_e4m3fn weights with a per-tensor `scale_weight`): load it with ComfyUI's "
              "checkpoint or diffusion-model loader (or Forge), which apply the scales.")

    def quantizes(self, component: str, key: str, shape: tuple[int, ...], main: bool) -> bool:
        return main and key.endswith(".weight") and len(shape) == 2 and math.prod(shape) >= MIN_QUANT

    def plan(self, key: str, shape: tuple[int, ...]) -> list[StoredTensor]:
        return [StoredTensor(key, "float8_e4m3fn", shape), StoredTensor(scale_key(key), "float32", ())]

    def encode(self, key: str, shape: tuple[int, ...], x: torch.Tensor, start: int,
               stat: float | None) -> list[tuple[str, int, Any]]:
        s = fp8_scale(stat or 0.0)
        pre = dtype_name(x.dtype) == "float8_e4m3fn"  # the merge kernel stored the codes (kernel_scale)
        q = x if pre else accel.call("fp8_e4m3", x, s)
        if q is None:
            import torch

            q = (x / torch.tensor(s, dtype=torch.float32)).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        pieces: list[tuple[str, int, Any]] = [(key, start, q)]
        if start == 0:
            pieces.append((scale_key(key), 0, accel.constant(struct.pack("<f", s), "float32", (), x)))
        return pieces

    def kernel_scale(self, stat: float | None) -> float | None:
        return fp8_scale(stat or 0.0)

    def file_tensors(self, prefix: str) -> dict[str, Any]:
        from hubmix.formats.io.span import Span

        return {prefix + MARKER: Span.of_bytes(b"", "float8_e4m3fn", (0,))}


def scale_key(key: str) -> str:
    return key[:-len(".weight")] + ".scale_weight"


def fp8_scale(amax: float) -> float:
    """The per-tensor scale: amax / 448 rounded to float32 (a float32 quotient computed in double and rounded once
    is the correctly rounded float32 one), 1 for an all-zero or non-finite amax (zeros stay zeros)."""
    s = struct.unpack("<f", struct.pack("<f", amax / FP8_MAX))[0] if math.isfinite(amax) else 0.0
    return s if s > 0 else 1.0


register_codec(ScaledFp8Codec())
