"""Tuned copies of the tiny models for LoRA extraction: every Linear/Conv weight of the chosen components moved by
random noise (so the delta is known), one weight (and those in `keep`) left as it was, one bias moved."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from hubmix.lora.extract import is_layer


def tuned_copy(base: Path, out: Path, components: list[str], *, seed: int = 0, scale: float = 0.02,
               low_rank: int | None = None, keep: tuple[str, ...] = ()) -> dict[str, dict[str, torch.Tensor]]:
    """`out`: `base` with its layers moved (a rank-`low_rank` move when given); returns the tuned tensors of the
    components (canonical keys as stored)."""
    shutil.copytree(base, out)
    gen = torch.Generator().manual_seed(seed)
    result = {}
    for comp in components:
        tensors = {}
        for f in sorted((out / comp).glob("*.safetensors")):
            sd = load_file(str(f))
            keys = sorted(sd)
            kept = next(k for k in keys if is_layer(k, tuple(sd[k].shape)))  # the first layer stays unchanged
            bias = next(k for k in keys if k.endswith(".bias"))
            for k in keys:
                w = sd[k]
                if k == kept or k in keep or not w.is_floating_point():
                    continue
                if is_layer(k, tuple(w.shape)):
                    if low_rank:
                        a = torch.randn(w.shape[0], low_rank, generator=gen)
                        b = torch.randn(low_rank, w[0].numel(), generator=gen)
                        sd[k] = w + (a @ b).reshape(w.shape) * scale / low_rank
                    else:
                        sd[k] = w + torch.randn(w.shape, generator=gen) * scale
                elif k == bias:
                    sd[k] = w + 0.1
            save_file(sd, str(f))
            tensors.update(sd)
        result[comp] = tensors
    return result
