"""Full-size FLUX.1 transformer benchmark: 3-way lossless on three random fp8 transformer-only files (BFL layout,
12B parameters, about 12 GB each), against the I/O floor, with peak anonymous memory.

    python benchmarks/merge_bench.py --family flux [--cache DIR] [--runs N] [--keep]

The inputs are written tensor by tensor with hubmix's planned writer (never a whole tensor set in memory): the
real key names and shapes of FLUX.1-dev (FluxTransformer2DModel's defaults, built on the meta device, mapped to
BFL's fused names through hubmix's own Flux key map), values base = 0.05*randn (norm scales near 1) and model i =
base + 0.005*randn (the noise block rolled by a different offset per model), rounded once to float8_e4m3fn. Three
inputs and the output need about 48 GB of disk: the script checks the free space first (on a shared disk with
less, it keeps the first double and single blocks that fit, every tensor full size, and says so; --full refuses
instead) and deletes every file it made at the end unless --keep. The inputs do not fit in the page cache of a small machine, so merges and floor
both read from disk. This prints numbers; it asserts no timings.
"""

from __future__ import annotations

import argparse
import math
import shutil
import time
from pathlib import Path

import torch

import common
import merge_bench as mb

N_MODELS = 3
DTYPE = torch.float8_e4m3fn


FULL_LAYERS = (19, 38)  # FLUX.1's double and single blocks
FULL_BYTES = 11.9e9  # one fp8 file of the full transformer
MARGIN = 6e9  # disk left to the other users of a shared machine


def original_shapes(layers: tuple[int, int] = FULL_LAYERS) -> dict[str, tuple[int, ...]]:
    """BFL key -> shape of FLUX.1-dev's transformer (or its first double/single blocks)."""
    import diffusers
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = diffusers.FluxTransformer2DModel(guidance_embeds=True, num_layers=layers[0],
                                                 num_single_layers=layers[1])
    return common.original_shapes("flux", model)


def input_paths(cache: Path, layers: tuple[int, int]) -> list[Path]:
    tag = "" if layers == FULL_LAYERS else f"-{layers[0]}d{layers[1]}s"
    return [cache / "flux" / f"flux-fp8{tag}-model{i}.safetensors" for i in range(N_MODELS)]


def build(cache: Path, layers: tuple[int, int]) -> tuple[list[Path], float | None]:
    from hubmix.formats.io.writer import PlannedTensor, SafetensorsWriter

    paths = input_paths(cache, layers)
    if all(p.exists() for p in paths):
        return paths, None
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    shapes = original_shapes(layers)
    planned = [PlannedTensor(k, DTYPE, s) for k, s in shapes.items()]
    need = N_MODELS * sum(p.nbytes for p in planned)
    print(f"building {N_MODELS} random fp8 Flux transformers ({sum(math.prod(s) for s in shapes.values()) / 1e9:.2f}"
          f"B parameters, {need / 1e9:.1f} GB in all) under {paths[0].parent}", flush=True)
    t0 = time.perf_counter()
    writers = [SafetensorsWriter(p, planned, {"format": "pt"}) for p in paths]
    common.write_random(writers, paths, shapes, DTYPE, DTYPE.itemsize, bump=lambda key: key.endswith(".scale"))
    seconds = time.perf_counter() - t0
    print(f"built in {seconds:.0f} s", flush=True)
    return paths, seconds


def run(args: argparse.Namespace) -> None:
    cache = args.cache
    layers = FULL_LAYERS
    files = 1 if all(p.exists() for p in input_paths(cache, layers)) else N_MODELS + 1
    free = shutil.disk_usage(cache).free
    scale = min(1.0, (free - MARGIN) / (files * FULL_BYTES))
    if scale < 1.0:  # a shared disk: the first blocks of the model, every tensor at full size
        if args.full:
            raise SystemExit(f"{cache}: {free / 1e9:.0f} GB free; the full-size benchmark needs about "
                             f"{files * FULL_BYTES / 1e9 + MARGIN / 1e9:.0f} GB")
        layers = (max(1, int(FULL_LAYERS[0] * scale)), max(1, int(FULL_LAYERS[1] * scale)))
        print(f"note: {free / 1e9:.0f} GB free on {cache}: not enough for three full-size inputs and the output; "
              f"using the first {layers[0]} double and {layers[1]} single blocks (every tensor full size)", flush=True)
    busy0, ours0, t0 = *mb.user_cpu_s(), time.perf_counter()
    paths, build_s = build(cache, layers)
    work, env, rec = common.workspace(cache, "flux")
    out = work / "flux-merged.safetensors"
    in_bytes = [p.stat().st_size for p in paths]
    Path(env["HUBMIX_CACHE"], "sha256.json").unlink(missing_ok=True)
    runs = max(1, args.runs)
    try:
        print("flux: I/O floor (cat 3 inputs + write and fsync an output-sized file)", flush=True)
        floor = mb.measure_floor(paths, in_bytes[0], work, runs)
        cmd = mb.hubmix_cmd("lossless", paths, out, args.hub_device) + ["--alpha", "0.9", "--beta", "1.1"]
        print("flux: hubmix lossless 3-way (first run hashes the inputs)", flush=True)
        rec.measure("hubmix lossless, cold hash cache", [], cmd, env)
        check = (common.spot_check_lossless(out, paths, DTYPE, 8, {"final_layer.adaLN_modulation.1.weight",
                                                                     "single_blocks.0.linear1.weight"})
                 if out.exists() else common.failure_stub())
        mb.remove_output(out)
        for _ in range(runs):
            rec.measure("hubmix lossless", [], cmd, env)
            mb.remove_output(out)
    finally:
        common.clean_up([out], paths, args.keep)
    noise = common.others_note(busy0, ours0, t0)
    med = common.medians(rec)
    size = "full size" if layers == FULL_LAYERS else f"{layers[0]} of 19 double, {layers[1]} of 38 single blocks"
    print(f"\n=== flux: 3 inputs x {in_bytes[0] / 1e9:.2f} GB fp8 (float8_e4m3fn) transformer-only files ({size}), "
          f"output {in_bytes[0] / 1e9:.2f} GB; runs per number: {runs} (median)")
    if build_s is not None:
        print(f"(built the inputs in {build_s:.0f} s)")
    print(f"{'':36} {'wall s':>8}  {'ratio':<22} {'RssAnon MiB':>11} {'VmHWM MiB':>10}")
    print(common.floor_row(floor, 3, 36))
    for label, name in (("hubmix lossless 3-way", "hubmix lossless"),
                        ("  first run (empty hash cache)", "hubmix lossless, cold hash cache")):
        if name in rec.failures:
            print(f"{label:36} FAILED: {rec.failures[name][0]}")
        m = med.get(name)
        if m is not None:
            ratio = f"{m.wall_s / floor['floor3_s']:.2f}x the I/O floor"
            print(common.measured_row(label, m, ratio, 36, 22, hwm=True))
    print(f"correctness: output {common.check_line(check)}")
    print(noise)
    if not args.keep:
        print("note: the inputs were deleted (--keep keeps them under the cache)")


def main(argv: list[str] | None = None) -> None:
    ap = common.bench_parser(__doc__, "keep the 36 GB of inputs for another run", device=True)
    ap.add_argument("--full", action="store_true", help="refuse to shrink the model when the disk is short")
    args = common.parse_bench_args(ap, argv)
    args.hub_device = args.device
    run(args)


if __name__ == "__main__":
    main()
