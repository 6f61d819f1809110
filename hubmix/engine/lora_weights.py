"""The full weight update of one LoRA-file module (formats.lora.LoraModule), in float32, as ComfyUI's
comfy/weight_adapter and LyCORIS' modules' `get_weight(shape)` compute it: alpha / rank applied once.

LyCORIS' `get_diff_weight` / `merge_to` multiply by alpha / rank a second time; hubmix does not.
"""

from __future__ import annotations

from typing import Any

import torch


def module_update(m: Any, shape: tuple[int, ...]) -> torch.Tensor:
    """factor * U for module `m` (U: up @ down, the Hadamard or Kronecker product, the diff), shaped `shape`."""
    p = {k: r.load().float() for k, r in m.parts.items()}
    if m.kind == "lora":
        up, down = p["up"], p["down"]
        rank = down.shape[0]
        if "mid" in p:  # LoCon's CP decomposition: a kxk core between 1x1 down and up
            u = torch.einsum("m n ..., i m, n j -> i j ...", p["mid"], up.reshape(up.shape[0], rank),
                             down.reshape(rank, -1))
        else:
            u = up.reshape(up.shape[0], rank) @ down.reshape(rank, -1)
    elif m.kind == "loha":
        if "t1" in p:  # Tucker: w_a [rank, out], w_b [rank, in], t [rank, rank, kh, kw]
            u = _tucker(p["t1"], p["w1b"], p["w1a"]) * _tucker(p["t2"], p["w2b"], p["w2a"])
        else:
            u = (p["w1a"] @ p["w1b"]) * (p["w2a"] @ p["w2b"])
    elif m.kind == "lokr":
        w1 = p["w1"] if "w1" in p else p["w1a"] @ p["w1b"]
        if "w2" in p:
            w2 = p["w2"]
        elif "t2" in p:
            w2 = _tucker(p["t2"], p["w2b"], p["w2a"])
        else:
            w2 = p["w2a"] @ p["w2b"]
        while w1.dim() < w2.dim():
            w1 = w1.unsqueeze(-1)
        u = torch.kron(w1, w2.contiguous())
    elif m.kind == "full":
        u = p["diff"]
    else:
        raise ValueError(m.kind)
    u = u.reshape(shape)
    return u if m.factor == 1 else u.mul_(m.factor)


def _tucker(t: torch.Tensor, wb: torch.Tensor, wa: torch.Tensor) -> torch.Tensor:
    return torch.einsum("i j ..., j r, i p -> p r ...", t, wb, wa)


def dora(weight: torch.Tensor, update: torch.Tensor, scale: torch.Tensor, strength: float) -> torch.Tensor:
    """DoRA: W' = (W + update) * m / ||W + update|| (norm per output row, or per input column when the stored
    scale has the input's size in its second dimension, as kohya/ComfyUI write it), and with strength s:
    W + s * (W' - W), as ComfyUI applies it."""
    merged = weight + update
    scale = scale.float()
    shape = merged.shape
    if scale.dim() >= 2 and scale.shape[0] == 1 and shape[0] != 1 and scale.shape[1] == shape[1]:
        norm = merged.transpose(0, 1).reshape(shape[1], -1).norm(dim=1)
        norm = norm.reshape(1, shape[1], *[1] * (merged.dim() - 2))
    else:
        norm = merged.reshape(shape[0], -1).norm(dim=1).reshape(shape[0], *[1] * (merged.dim() - 1))
    norm = norm + torch.finfo(torch.float32).eps
    out = merged * (scale.reshape(norm.shape) / norm)
    return out if strength == 1 else weight + strength * (out - weight)
