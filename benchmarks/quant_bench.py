"""Quantized outputs of a full-size FLUX.1 transformer: 3-way lossless on three random fp8 transformer-only files
(flux_bench's inputs: BFL names, every tensor at its real size, depth cut to the first double/single blocks), written
as plain fp8 (the baseline: what hubmix wrote before quantized outputs), as `--dtype fp8_scaled` (ComfyUI's scaled
fp8: a per-tensor amax pass, then the encoding) and as `--dtype nf4`, against the I/O floor, with peak RssAnon.

    python benchmarks/quant_bench.py [--cache DIR] [--layers 2 4] [--runs N] [--keep]

Goal (issue 18): fp8_scaled within 1.5x the I/O floor, peak RssAnon under 1 GB. Every number of a table comes from
the same run on the same machine; the CPU time other processes took meanwhile is printed beside them, and each
merge's own CPU time (user + system, wait4's), which other programs' load changes less than its wall time. The outputs
are checked: the fp8_scaled file's values (weight x scale_weight, ComfyUI's rule) against the plain float32
merge on sampled tensors. This prints numbers; it asserts no timings.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402
import flux_bench as fb  # noqa: E402
import merge_bench as mb  # noqa: E402


def check_fp8_scaled(out: Path, inputs: list[Path]) -> str:
    """Sampled tensors: scaled fp8 values (ComfyUI's rule) against the lossless merge in float32, relative RMSE."""
    from safetensors import safe_open

    fs = [safe_open(str(p), "pt") for p in inputs]
    worst = 0.0
    with safe_open(str(out), "pt") as fo:
        keys = sorted(k for k in fo.keys() if k.endswith(".weight") and len(fo.get_slice(k).get_shape()) == 2)
        for k in [keys[i * len(keys) // 6] for i in range(6)]:
            a, b, c = (f.get_tensor(k).float() for f in fs)
            want = torch.where((a - 0.9 * b).abs() <= (a - 1.1 * c).abs(), b, c)
            got = fo.get_tensor(k).float() * fo.get_tensor(k[:-len(".weight")] + ".scale_weight").float()
            worst = max(worst, float((got - want).norm() / want.norm()))
    return f"sampled fp8_scaled tensors: relative RMSE against the float32 merge at most {worst:.4f}"


def run(args: argparse.Namespace) -> None:
    layers = tuple(args.layers)
    paths, build_s = fb.build(args.cache, layers)
    work, env, rec = common.workspace(args.cache, "quant")
    out = work / "quant-merged.safetensors"
    in_bytes = paths[0].stat().st_size
    busy0, ours0, t0 = *mb.user_cpu_s(), time.perf_counter()
    rows = [("plain fp8 output (baseline)", []), ("--dtype fp8_scaled", ["--dtype", "fp8_scaled"]),
            ("--dtype nf4", ["--dtype", "nf4"])]
    check = ""
    try:
        floor = mb.measure_floor(paths, in_bytes, work, args.runs)
        base = mb.hubmix_cmd("lossless", paths, out, "cpu") + ["--alpha", "0.9", "--beta", "1.1"]
        rec.measure("warm-up (hashes the inputs)", paths, base, env)
        mb.remove_output(out)
        for _ in range(args.runs):
            for label, extra in rows:
                rec.measure(label, paths, base + extra, env)
                if extra and extra[1] == "fp8_scaled" and not check and out.exists():
                    check = check_fp8_scaled(out, paths)
                mb.remove_output(out)
    finally:
        common.clean_up([out], paths, args.keep)
    noise = common.others_note(busy0, ours0, t0)
    med = common.medians(rec)
    print(f"\n=== quantized outputs: 3 inputs x {in_bytes / 1e9:.2f} GB fp8 Flux transformer-only files (first "
          f"{layers[0]} double and {layers[1]} single blocks, every tensor full size); runs: {args.runs} (median)")
    if build_s is not None:
        print(f"(built the inputs in {build_s:.0f} s)")
    print(f"{'':34} {'wall s':>8}  {'ratio':<24} {'RssAnon MiB':>11} {'CPU s':>7}  CPU ratio")
    print(common.floor_row(floor, 3, 34))
    base_s = med.get("plain fp8 output (baseline)")
    for label, _ in rows:
        m = med.get(label)
        if m is None:
            print(f"{label:34} FAILED: {rec.failures.get(label, ['?'])[0]}")
            continue
        ratio = f"{m.wall_s / floor['floor3_s']:.2f}x floor"
        if base_s is not None and label != rows[0][0]:
            ratio += f", {m.wall_s / base_s.wall_s:.2f}x plain"
        cpu = f" {m.cpu_s:7.1f}" if m.cpu_s is not None else ""
        if m.cpu_s and base_s is not None and base_s.cpu_s and label != rows[0][0]:
            cpu += f"  {m.cpu_s / base_s.cpu_s:.2f}x plain"
        print(common.measured_row(label, m, ratio, 34, 24) + cpu)
    print(check)
    print(noise)


def main(argv: list[str] | None = None) -> None:
    ap = common.bench_parser(__doc__)
    ap.add_argument("--layers", type=int, nargs=2, default=[2, 4], metavar=("DOUBLE", "SINGLE"),
                    help="double and single blocks kept (FLUX.1 has 19 and 38; every tensor stays full size)")
    run(common.parse_bench_args(ap, argv))


if __name__ == "__main__":
    main()
