"""The naive way to merge checkpoints, as a baseline: load every input fully into RAM, merge in float32, save.

    python benchmarks/naive_merge.py --method lossless A B C --out X.safetensors [--device cpu|cuda]

This is what a short hand-written script does (safetensors.torch.load_file + plain torch ops + save_file). Recent
safetensors versions map the files in load_file, so the inputs are page cache (VmHWM, not RssAnon) and the anonymous
memory is mostly the whole output dict held until save_file. The output is fsynced so its wall time compares with
hubmix's, which fsyncs too.
"""

from __future__ import annotations

import argparse
import os

import torch
from safetensors.torch import load_file, save_file


def merge_tensor(method: str, xs: list[torch.Tensor]) -> torch.Tensor:
    """One output tensor from the inputs' float32 copies (same formulas as hubmix's built-in methods)."""
    if method == "lossless":
        a, b, c = xs
        return torch.where((a - b).abs() <= (a - c).abs(), b, c)
    if method == "maxdiff":
        a, b, c = xs
        return torch.where((a - b).abs() > (a - c).abs(), b, c)
    if method == "weighted_sum":
        a, b = xs
        return 0.5 * a + 0.5 * b
    raise SystemExit(f"unknown method {method}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", required=True, choices=["lossless", "maxdiff", "weighted_sum"])
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("inputs", nargs="+")
    args = ap.parse_args()
    models = [load_file(p) for p in args.inputs]
    out = {}
    for key, first in models[0].items():
        if not first.is_floating_point():
            out[key] = first
            continue
        xs = [m[key].to(args.device, torch.float32) for m in models]
        out[key] = merge_tensor(args.method, xs).to("cpu", first.dtype)
    save_file(out, args.out, metadata={"format": "pt"})
    fd = os.open(args.out, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


if __name__ == "__main__":
    main()
