"""Full-size Z-Image transformer benchmark: 3-way lossless on three random bf16 transformer-only files (the
original layout, every tensor at its real size), against the I/O floor, with peak anonymous memory; then the same
files merged key by key (the generic path for architectures hubmix does not know), to show that path is as fast.

    python benchmarks/zimage_bench.py [--cache DIR] [--runs N] [--layers N] [--refiners N] [--keep]

The inputs are written tensor by tensor with hubmix's planned writer: the key names and shapes of Z-Image's
transformer (ZImageTransformer2DModel's defaults: dim 3840, 30 layers + 2 + 2 refiners, 6.15B parameters, built on
the meta device and mapped to the original names through hubmix's own key map), depth cut by --layers/--refiners
(default: 2 layers and 2 + 2 refiners, 2.2 GB a file, so three inputs and the output fit 10 GB of disk), values base
= 0.05*randn (norm weights near 1) and model i = base + 0.005*randn rolled by a different offset per model, bf16.
For the key-by-key run the same files' headers are edited in place (same-length renames of the keys that identify
Z-Image: `x_pad_token`, `cap_embedder`, `adaLN_modulation`), so both runs read identical bytes. Inputs that fit the
page cache are read warm by both hubmix and the floor (cat). This prints numbers; it asserts no timings.
"""

from __future__ import annotations

import argparse
import json
import math
import struct
import time
from pathlib import Path

import torch

import common
import merge_bench as mb

N_MODELS = 3
DTYPE = torch.bfloat16
FULL = (30, 2)  # Z-Image's layers and refiners (each of noise and context)
RENAMES = {"x_pad_token": "x_pad_tokex", "cap_embedder": "cap_embeddex", "adaLN_modulation": "adaLN_modulatiox"}


def original_shapes(layers: int, refiners: int) -> dict[str, tuple[int, ...]]:
    import diffusers
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = diffusers.ZImageTransformer2DModel(n_layers=layers, n_refiner_layers=refiners)
    return common.original_shapes("z_image", model)


def build(cache: Path, layers: int, refiners: int) -> tuple[list[Path], float | None]:
    from hubmix.formats.io.writer import PlannedTensor, SafetensorsWriter

    paths = [cache / "zimage" / f"zimage-bf16-{layers}l{refiners}r-model{i}.safetensors" for i in range(N_MODELS)]
    if all(p.exists() for p in paths):
        restore_headers(paths)
        return paths, None
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    shapes = original_shapes(layers, refiners)
    planned = [PlannedTensor(k, DTYPE, s) for k, s in shapes.items()]
    print(f"building {N_MODELS} random bf16 Z-Image transformers ({sum(math.prod(s) for s in shapes.values()) / 1e9:.2f}"
          f"B parameters each, {N_MODELS * sum(p.nbytes for p in planned) / 1e9:.1f} GB in all)", flush=True)
    t0 = time.perf_counter()
    writers = [SafetensorsWriter(p, planned, {"format": "pt"}) for p in paths]
    common.write_random(writers, paths, shapes, DTYPE, DTYPE.itemsize, bump=lambda key: "norm" in key)
    return paths, time.perf_counter() - t0


def _edit_headers(paths: list[Path], renames: dict[str, str]) -> None:
    """Rename keys in place: same-length replacements in the JSON header, the tensor bytes untouched."""
    for p in paths:
        with open(p, "r+b") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            header = f.read(n).decode()
            new = header
            for a, b in renames.items():
                assert len(a) == len(b)
                new = new.replace(a, b)
            assert len(new) == len(header)
            json.loads(new)
            f.seek(8)
            f.write(new.encode())


def unknown_headers(paths: list[Path]) -> None:
    _edit_headers(paths, RENAMES)


def restore_headers(paths: list[Path]) -> None:
    _edit_headers(paths, {b: a for a, b in RENAMES.items()})


def run(args: argparse.Namespace) -> None:
    cache = args.cache
    busy0, ours0, t0 = *mb.user_cpu_s(), time.perf_counter()
    paths, build_s = build(cache, args.layers, args.refiners)
    work, env, rec = common.workspace(cache, "zimage")
    out = work / "zimage-merged.safetensors"
    in_bytes = paths[0].stat().st_size
    runs = max(1, args.runs)
    checks = {}
    try:
        mb.native_build_seconds(env, work)  # built once, never inside a timed merge
        print("zimage: I/O floor (cat 3 inputs + write and fsync an output-sized file)", flush=True)
        floor = mb.measure_floor(paths, in_bytes, work, runs)
        cmd = mb.hubmix_cmd("lossless", paths, out, args.hub_device) + ["--alpha", "0.9", "--beta", "1.1"]
        for name, prepare in (("family path (z_image)", restore_headers), ("key by key (same bytes)", unknown_headers)):
            prepare(paths)
            mb.forget_hashes(env, paths)
            rec.measure(f"{name}, first merge", [], cmd, env)
            checks[name] = (common.spot_check_lossless(out, paths, DTYPE, 6, {"layers.0.feed_forward.w1.weight"})
                            if out.exists() else common.failure_stub())
            mb.remove_output(out)
            for _ in range(runs):
                rec.measure(name, [], cmd, env)
                mb.remove_output(out)
    finally:
        restore_headers(paths)
        common.clean_up([out], paths, args.keep)
    noise = common.others_note(busy0, ours0, t0)
    med = common.medians(rec)
    print(f"\n=== zimage: 3 inputs x {in_bytes / 1e9:.2f} GB bf16 transformer-only files ({args.layers} of 30 layers, "
          f"{args.refiners} + {args.refiners} of 2 + 2 refiners, every tensor full size); runs per number: {runs}")
    if build_s is not None:
        print(f"(built the inputs in {build_s:.0f} s)")
    print(f"{'':40} {'wall s':>8}  {'ratio':<22} {'RssAnon MiB':>11} {'VmHWM MiB':>10}")
    print(common.floor_row(floor, 3, 40))
    for name in ("family path (z_image)", "key by key (same bytes)"):
        for label in (name, f"{name}, first merge"):
            if label in rec.failures:
                print(f"{label:40} FAILED: {rec.failures[label][0]}")
            m = med.get(label)
            if m is not None:
                ratio = f"{m.wall_s / floor['floor3_s']:.2f}x the I/O floor"
                print(common.measured_row(label, m, ratio, 40, 22, hwm=True))
    fam, keys = med.get("family path (z_image)"), med.get("key by key (same bytes)")
    if fam and keys:
        print(f"key by key / family path: {keys.wall_s / fam.wall_s:.2f}x (same files, same run)")
    for name, check in checks.items():
        print(f"correctness, {name}: {common.check_line(check)}")
    print(noise)


def main(argv: list[str] | None = None) -> None:
    ap = common.bench_parser(__doc__, "keep the inputs for another run", device=True)
    ap.add_argument("--layers", type=int, default=2, help="main layers to keep (30 at full size)")
    ap.add_argument("--refiners", type=int, default=2, help="noise and context refiner layers each (2 at full size)")
    args = common.parse_bench_args(ap, argv)
    args.hub_device = args.device
    run(args)


if __name__ == "__main__":
    main()
