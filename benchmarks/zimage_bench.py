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
import os
import struct
import sys
import time
from pathlib import Path

import torch

import merge_bench as mb

N_MODELS = 3
BASE_STD, NOISE_STD = 0.05, 0.005
CHUNK = 1 << 24
DTYPE = torch.bfloat16
FULL = (30, 2)  # Z-Image's layers and refiners (each of noise and context)
RENAMES = {"x_pad_token": "x_pad_tokex", "cap_embedder": "cap_embeddex", "adaLN_modulation": "adaLN_modulatiox"}


def original_shapes(layers: int, refiners: int) -> dict[str, tuple[int, ...]]:
    import dataclasses

    import diffusers
    from accelerate import init_empty_weights

    from hubmix.formats.families import get_family
    from hubmix.formats.layouts import KeyMap, to_original_shape

    with init_empty_weights():
        model = diffusers.ZImageTransformer2DModel(n_layers=layers, n_refiner_layers=refiners)
    spec = get_family("z_image").components["transformer"]
    keymap = KeyMap(dataclasses.replace(spec, prefix=""), dict(model.config))
    shapes: dict[str, tuple[int, ...]] = {}
    for key, t in model.state_dict().items():
        place = keymap.to_original(key)
        assert place is not None, key
        shape = to_original_shape(place.transform, tuple(t.shape))
        if place.part is not None and place.key in shapes:
            shape = (shapes[place.key][0] + shape[0], *shape[1:])
        shapes[place.key] = shape
    return shapes


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
    try:
        g = torch.Generator()
        for j, (key, shape) in enumerate(sorted(shapes.items())):
            n = math.prod(shape)
            for s in range(0, n, CHUNK):
                m = min(CHUNK, n - s)
                g.manual_seed(j * 1_000_003 + s // CHUNK)
                base = torch.randn(m, generator=g).mul_(BASE_STD)
                if "norm" in key:
                    base.add_(1.0)
                noise = torch.randn(m, generator=g).mul_(NOISE_STD)
                for i, w in enumerate(writers):
                    w.write(key, (base + noise.roll(7919 * i)).to(DTYPE), s * 2)  # a byte offset
        for w in writers:
            w.finish()
    except BaseException:
        for w in writers:
            w.abort()
        for p in paths:
            p.unlink(missing_ok=True)
        raise
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


def spot_check(out: Path, inputs: list[Path]) -> dict:
    """Output keys/shapes/dtype equal the inputs'; sampled tensors byte-identical to torch.where in float32."""
    from safetensors import safe_open

    fs = [safe_open(str(p), "pt") for p in inputs]
    with safe_open(str(out), "pt") as fo:
        keys = sorted(fs[0].keys())
        same = set(fo.keys()) == set(keys) and all(
            fo.get_slice(k).get_shape() == fs[0].get_slice(k).get_shape() for k in keys)
        picks = sorted({keys[i * len(keys) // 6] for i in range(6)} | {"layers.0.feed_forward.w1.weight"})
        bad = []
        for k in picks:
            a, b, c = (f.get_tensor(k) for f in fs)
            want = torch.where((a.float() - 0.9 * b.float()).abs() <= (a.float() - 1.1 * c.float()).abs(), b, c)
            got = fo.get_tensor(k)
            if got.dtype != DTYPE or not torch.equal(want.view(torch.uint8), got.view(torch.uint8)):
                bad.append(k)
    return {"same_keys": same, "checked": len(picks), "mismatched": bad}


def run(args: argparse.Namespace) -> None:
    cache = args.cache
    busy0, ours0, t0 = *mb.user_cpu_s(), time.perf_counter()
    paths, build_s = build(cache, args.layers, args.refiners)
    work, logs = cache / "out", cache / "logs"
    work.mkdir(exist_ok=True)
    logs.mkdir(exist_ok=True)
    out = work / "zimage-merged.safetensors"
    in_bytes = paths[0].stat().st_size
    env = dict(os.environ, HUBMIX_CACHE=str(cache / "hubmix-cache"))
    rec = mb.Recorder("zimage", logs)
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
            checks[name] = spot_check(out, paths) if out.exists() else {"same_keys": False, "checked": 0,
                                                                       "mismatched": ["-"]}
            mb.remove_output(out)
            for _ in range(runs):
                rec.measure(name, [], cmd, env)
                mb.remove_output(out)
    finally:
        mb.remove_output(out)
        restore_headers(paths)
        if not args.keep:
            for p in paths:
                p.unlink(missing_ok=True)
    busy1, ours1 = mb.user_cpu_s()
    others = max(0.0, (busy1 - busy0) - (ours1 - ours0))
    share = others / ((time.perf_counter() - t0) * (os.cpu_count() or 1))
    med = {k: mb.median(v) for k, v in rec.results.items()}
    print(f"\n=== zimage: 3 inputs x {in_bytes / 1e9:.2f} GB bf16 transformer-only files ({args.layers} of 30 layers, "
          f"{args.refiners} + {args.refiners} of 2 + 2 refiners, every tensor full size); runs per number: {runs}")
    if build_s is not None:
        print(f"(built the inputs in {build_s:.0f} s)")
    print(f"{'':40} {'wall s':>8}  {'ratio':<22} {'RssAnon MiB':>11} {'VmHWM MiB':>10}")
    print(f"{'I/O floor, 3 inputs':40} {floor['floor3_s']:8.2f}  cat {floor['read3_s']:.1f} s + write "
          f"{floor['write_s']:.1f} s")
    for name in ("family path (z_image)", "key by key (same bytes)"):
        for label in (name, f"{name}, first merge"):
            if label in rec.failures:
                print(f"{label:40} FAILED: {rec.failures[label][0]}")
            m = med.get(label)
            if m is not None:
                ratio = f"{m.wall_s / floor['floor3_s']:.2f}x the I/O floor"
                print(f"{label:40} {m.wall_s:8.2f}  {ratio:<22} {m.peak_anon_mib:11.0f} {m.hwm_mib:10.0f}")
    fam, keys = med.get("family path (z_image)"), med.get("key by key (same bytes)")
    if fam and keys:
        print(f"key by key / family path: {keys.wall_s / fam.wall_s:.2f}x (same files, same run)")
    for name, check in checks.items():
        bad = f"; MISMATCHED {check['mismatched']}" if check["mismatched"] else ""
        print(f"correctness, {name}: keys/shapes {'match' if check['same_keys'] else 'DIFFER'}; "
              f"{check['checked'] - len(check['mismatched'])}/{check['checked']} sampled tensors byte-identical to "
              f"torch.where on the float32 inputs{bad}")
    print(f"note: other programs used {others:.0f} CPU-seconds ({share:.0%} of the machine) during these runs")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, default=Path("~/.cache/hubmix-bench"))
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--layers", type=int, default=2, help="main layers to keep (30 at full size)")
    ap.add_argument("--refiners", type=int, default=2, help="noise and context refiner layers each (2 at full size)")
    ap.add_argument("--keep", action="store_true", help="keep the inputs for another run")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = ap.parse_args(argv)
    args.cache = args.cache.expanduser().resolve()
    args.cache.mkdir(parents=True, exist_ok=True)
    args.hub_device = args.device
    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    run(args)


if __name__ == "__main__":
    main()
