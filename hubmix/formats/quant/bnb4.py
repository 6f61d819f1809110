"""bitsandbytes 4-bit (NF4 / FP4) single files, as Forge and diffusers/transformers save them, read and written.

A layer `<w>` (`....weight`) is stored as: `<w>` the packed codes (two per byte, the first element in the high
nibble; uint8, or any dtype viewed as bytes), `<w>.absmax` (one float32 per block, or uint8 codes when nested),
`<w>.quant_map` (the 16 code values), and `<w>.quant_state.bitsandbytes__nf4|fp4`: JSON in a uint8 tensor with
quant_type, blocksize, dtype, shape and, when nested, nested_blocksize, nested_dtype, nested_offset beside the
tensors `<w>.nested_absmax` and `<w>.nested_quant_map`.

Values, as `bitsandbytes.functional.dequantize_4bit` computes them on the CPU: a nested absmax is first
nested_quant_map[code] x nested_absmax[block of nested_blocksize] + float32(nested_offset); each element is
TABLE[nibble] x absmax[block] in float32 (bitsandbytes' own table for the quant type, not the stored quant_map,
which is checked to hold 16 values; FP4's differs between its CPU kernel and, for a last dimension of odd size,
its Python fallback: both are followed), rounded to the state's dtype (bf16 in Forge's files), read back as float32.

Writing (`--dtype nf4`): block size 64, absmax float32 (not nested: no per-tensor pass, and the layout both
Forge's loader and diffusers/transformers' `QuantState.from_dict` read), the state's dtype bfloat16; codes as
bitsandbytes' reference quantize_4bit picks them (the NF4 value nearest x / absmax, by the midpoints). Quantized: the
denoiser's 2-D `.weight` matrices (Linear layers) of at least 1024 elements; the rest stays bf16.
"""

from __future__ import annotations

import json
import math
import struct
from typing import TYPE_CHECKING, Any

from hubmix.errors import InputError
from hubmix.formats.io.readers import WeightFile
from hubmix.formats.quant import QuantCodec, QuantGroup, QuantReader, StoredTensor, register_codec, register_reader
from hubmix.formats.quant import accel
from hubmix.formats.quant.view import stored_bytes

if TYPE_CHECKING:
    import torch

STATE = ".quant_state.bitsandbytes__"
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
STATE_DTYPES = ("float32", "float16", "bfloat16")
MIN_QUANT = 1024

# bitsandbytes' code tables (bitsandbytes/backends/utils.py), float32
NF4 = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0)
# FP4: the CPU kernel's table; its Python fallback (a last dimension of odd size) has +0 where the kernel has -0
FP4 = (0.0, 1 / 192, 2 / 3, 1.0, 1 / 3, 0.5, 1 / 6, 0.25, -0.0, -1 / 192, -2 / 3, -1.0, -1 / 3, -0.5, -1 / 6, -0.25)
FP4_ODD = (0.0, 1 / 192, 2 / 3, 1.0, 1 / 3, 0.5, 1 / 6, 0.25, 0.0, -1 / 192, -2 / 3, -1.0, -1 / 3, -0.5, -1 / 6, -0.25)
TABLES = {"nf4": NF4, "fp4": FP4, "fp4-odd": FP4_ODD}


def _f32(v: float) -> float:
    return struct.unpack("<f", struct.pack("<f", v))[0]


# the midpoints between NF4 values as torch computes them in float32: (table[:-1] + table[1:]) / 2 (a sum of two
# float32 values is exact in double, and halving it is exact: one rounding, torch's)
NF4_BOUNDS = tuple(_f32((_f32(a) + _f32(b)) / 2) for a, b in zip(NF4, NF4[1:]))


def _table(kind: str) -> torch.Tensor:
    import torch

    return torch.tensor(TABLES[kind], dtype=torch.float32)


class Bnb4Reader(QuantReader):
    name = "bitsandbytes 4-bit"

    def detect(self, f: WeightFile) -> bool:
        return any(STATE in k for k in f.keys())

    def groups(self, f: WeightFile) -> tuple[list[QuantGroup], set[str]]:
        keys = set(f.keys())
        groups = []
        for k in sorted(keys):
            if STATE in k:
                groups.append(_group(f, keys, k))
        consumed = set()
        for k in sorted(keys - {m for g in groups for m in g.members}):
            if k.endswith((".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map")):
                raise InputError(f"{f.path}: {k}: a bitsandbytes quant statistic without its quant_state")
        return groups, consumed


def _state(f: WeightFile, skey: str) -> dict[str, Any]:
    try:
        state = json.loads(stored_bytes(f, skey).decode("utf-8"))
        if not isinstance(state, dict):
            raise ValueError
    except (ValueError, UnicodeDecodeError):
        raise InputError(f"{f.path}: {skey}: not a bitsandbytes quant state (JSON)") from None
    return state


def _group(f: WeightFile, keys: set[str], skey: str) -> QuantGroup:
    w, kind = skey.split(STATE, 1)
    state = _state(f, skey)
    bad = lambda why: InputError(f"{f.path}: {w}: {why}")  # noqa: E731
    if kind not in TABLES or state.get("quant_type") != kind:
        raise bad(f"unknown bitsandbytes quant type {state.get('quant_type', kind)!r} (hubmix reads nf4 and fp4)")
    shape, bs, dtype = state.get("shape"), state.get("blocksize"), state.get("dtype")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise bad(f"quant state shape {shape!r} is not a list of dimensions")
    if bs not in BLOCKSIZES or dtype not in STATE_DTYPES:
        raise bad(f"quant state blocksize {bs!r} / dtype {dtype!r} is not one bitsandbytes writes")
    shape = tuple(shape)
    n = math.prod(shape)
    blocks = -(-n // bs)
    for part in ("", ".absmax", ".quant_map"):
        if w + part not in keys:
            raise bad(f"no {w + part} tensor")
    if f.info(w).nbytes != -(-n // 2):
        raise bad(f"{f.info(w).nbytes} packed bytes for shape {list(shape)} ({-(-n // 2)} expected)")
    if f.info(w + ".quant_map").numel != 16:
        raise InputError(f"{f.path}: {w}.quant_map: {f.info(w + '.quant_map').numel} values, not 16")
    absmax = f.info(w + ".absmax")
    if absmax.numel != blocks:
        raise InputError(f"{f.path}: {w}.absmax: {absmax.numel} block maxima for shape {list(shape)} in blocks "
                         f"of {bs} ({blocks} expected)")
    members = [w, w + ".absmax", w + ".quant_map", skey]
    nested = "nested_blocksize" in state or w + ".nested_absmax" in keys
    if nested:
        nbs, off = state.get("nested_blocksize"), state.get("nested_offset")
        if nbs not in BLOCKSIZES or not isinstance(off, (int, float)) or state.get("nested_dtype") not in STATE_DTYPES:
            raise bad("nested quant state without a valid nested_blocksize / nested_offset / nested_dtype")
        for part in (".nested_absmax", ".nested_quant_map"):
            if w + part not in keys:
                raise bad(f"no {w + part} tensor")
        if absmax.dtype_name != "uint8":
            raise InputError(f"{f.path}: {w}.absmax: {absmax.dtype_name}, a nested absmax is uint8 codes")
        if f.info(w + ".nested_absmax").numel != -(-blocks // nbs):
            raise InputError(f"{f.path}: {w}.nested_absmax: {f.info(w + '.nested_absmax').numel} values for "
                             f"{blocks} blocks in groups of {nbs} ({-(-blocks // nbs)} expected)")
        if f.info(w + ".nested_quant_map").numel != 256:
            raise InputError(f"{f.path}: {w}.nested_quant_map: not 256 values")
        members += [w + ".nested_absmax", w + ".nested_quant_map"]
    elif not absmax.dtype_name.startswith(("float", "bfloat")):
        raise InputError(f"{f.path}: {w}.absmax: {absmax.dtype_name}, not float block maxima")
    cache: dict[str, Any] = {}

    def block_max(b0: int, b1: int) -> torch.Tensor:
        """absmax of blocks b0..b1 in float32, as dequantize_4bit sees it."""
        import torch

        a = f.tensor(w + ".absmax").reshape(-1)
        if not nested:
            return a[b0:b1].float()
        if "code2" not in cache:
            cache["code2"] = f.tensor(w + ".nested_quant_map").float().reshape(-1)
            cache["abs2"] = f.tensor(w + ".nested_absmax").float().reshape(-1)
            cache["off"] = torch.tensor(float(state["nested_offset"]), dtype=torch.float32)
        idx = torch.arange(b0, b1, dtype=torch.int64) // state["nested_blocksize"]
        return cache["code2"][a[b0:b1].to(torch.int64)] * cache["abs2"][idx] + cache["off"]

    def dequantize(start: int, stop: int) -> torch.Tensor:
        import torch

        if stop <= start:
            return torch.empty(0, dtype=torch.float32)
        lo = start // bs * bs  # whole blocks, from an even element
        hi = min(-(-stop // bs) * bs, n)
        packed = f.tensor(w).reshape(-1).view(torch.uint8)[lo // 2:-(-hi // 2)]
        codes = torch.stack((packed >> 4, packed & 15), dim=1).reshape(-1)[:hi - lo].to(torch.int64)
        if "table" not in cache:
            odd = kind == "fp4" and shape and shape[-1] % 2  # bitsandbytes falls back to its Python table there
            cache["table"] = _table("fp4-odd" if odd else kind)
        vals = cache["table"][codes]
        scale = block_max(lo // bs, -(-hi // bs))
        full = (hi - lo) // bs * bs
        vals[:full].view(-1, bs).mul_(scale[:full // bs].view(-1, 1))
        if full < hi - lo:
            vals[full:].mul_(scale[-1])
        if dtype != "float32":
            vals = vals.to(getattr(torch, dtype)).float()
        return vals[start - lo:stop - lo]

    return QuantGroup(w, shape, kind if not nested else f"{kind} (nested absmax)", tuple(members), dequantize)


register_reader(Bnb4Reader())


class Nf4Codec(QuantCodec):
    name = "nf4"
    block = 64
    spans = True
    describe = "bitsandbytes NF4: 4-bit codes in blocks of 64 with a float32 absmax each (Forge, diffusers)"
    loader = ("bitsandbytes NF4 (blocks of 64): load it with Forge, or dequantize it with bitsandbytes' "
              "`QuantState.from_dict` and `dequantize_4bit`.")

    def quantizes(self, component: str, key: str, shape: tuple[int, ...], main: bool) -> bool:
        return main and key.endswith(".weight") and len(shape) == 2 and math.prod(shape) >= MIN_QUANT

    def plan(self, key: str, shape: tuple[int, ...]) -> list[StoredTensor]:
        n = math.prod(shape)
        state = state_bytes(shape)
        return [StoredTensor(key, "uint8", (-(-n // 2), 1)),
                StoredTensor(key + ".absmax", "float32", (-(-n // self.block),)),
                StoredTensor(key + ".quant_map", "float32", (16,)),
                StoredTensor(key + STATE + "nf4", "uint8", (len(state),))]

    def encode(self, key: str, shape: tuple[int, ...], x: Any, start: int,
               stat: float | None) -> list[tuple[str, int, Any]]:
        packed, absmax = quantize_nf4(x, self.block)
        pieces: list[tuple[str, int, Any]] = [(key, start // 2, packed), (key + ".absmax", start // self.block * 4,
                                                                          absmax)]
        if start == 0:
            table = struct.pack("<16f", *NF4)
            pieces.append((key + ".quant_map", 0, accel.constant(table, "float32", (16,), x)))
            state = state_bytes(shape)
            pieces.append((key + STATE + "nf4", 0, accel.constant(state, "uint8", (len(state),), x)))
        return pieces


def state_bytes(shape: tuple[int, ...]) -> bytes:
    """The packed quant state, as bitsandbytes' pack_dict_to_tensor writes it (json.dumps of the non-tensor items)."""
    return json.dumps({"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": list(shape)}).encode()


def quantize_nf4(x: Any, block: int) -> tuple[Any, Any]:
    """bitsandbytes' quantize_4bit (its reference CPU code): per block absmax, x / absmax clamped to [-1, 1], the
    code whose interval (midpoints between table values) holds it, packed two per byte, high nibble first. `x`: a
    float32 tensor, or a Span when the native hooks are installed."""
    fast = accel.call("nf4", x, block, NF4_BOUNDS) if block % 2 == 0 and block <= 4096 else None
    if fast is not None:
        return fast
    import torch

    table = _table("nf4")
    bounds = (table[:-1] + table[1:]) / 2
    x = x.reshape(-1).float()
    n = x.numel()
    full = n - n % block
    absmax = x[:full].view(-1, block).abs().amax(dim=1)
    scaled = (x[:full].view(-1, block) * (1.0 / absmax.clamp(min=1e-38)).view(-1, 1)).clamp_(-1, 1).reshape(-1)
    if full < n:
        am = x[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, am.reshape(1)])
        scaled = torch.cat([scaled, (x[full:] / am).clamp(-1, 1)])
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    q = torch.bucketize(scaled, bounds, out_int32=True).to(torch.uint8)
    packed = ((q[::2] << 4) | q[1::2]).reshape(-1, 1)
    return packed, absmax


register_codec(Nf4Codec())
