"""sd-mecha's weighted sum of two checkpoints, as a baseline; run with the Python of a venv that has sd-mecha.

    python benchmarks/mecha_merge.py A B --config sd1-ldm --out X.safetensors [--device cpu|cuda]

The call is sd-mecha's documented one, with its default checks (finite inputs and outputs) left on as users run
it; the output is fsynced inside the run so its wall time compares with hubmix's.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import sd_mecha
import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--config", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--alpha", type=float, default=0.5)
    args = ap.parse_args()
    a = sd_mecha.model(Path(args.a).resolve(), config=args.config)
    b = sd_mecha.model(Path(args.b).resolve(), config=args.config)
    recipe = sd_mecha.weighted_sum(a, b, alpha=args.alpha)
    out = Path(args.out).resolve()
    sd_mecha.merge(recipe, output=out, merge_device=args.device, merge_dtype=torch.float32, output_device="cpu",
                   output_dtype=torch.float16, threads=None)
    fd = os.open(out, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


if __name__ == "__main__":
    main()
