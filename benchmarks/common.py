"""What the Flux-shaped benchmarks (flux, zimage, quant, gguf, gpu) share: random similar models written tensor by
tensor, the CPU time other programs took meanwhile, and the table rows. Process measurement and the I/O floor
itself live in merge_bench.py."""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

CHUNK = 1 << 24  # elements generated at a time
BASE_STD, NOISE_STD = 0.05, 0.005


def write_random(writers: list, paths: list[Path], shapes: dict[str, tuple[int, ...]], dtype=None, itemsize: int = 4,
                 bump: Callable[[str], bool] = lambda key: False) -> None:
    """Fill every writer with similar random models: base = 0.05*randn (+1 where bump(key): norm scales), model i =
    base + 0.005*randn rolled by 7919*i, seeded per tensor and chunk; cast to dtype (None: float32 as generated),
    written at byte offset element * itemsize. Finishes the writers; on any failure aborts them, deletes paths."""
    import torch

    try:
        g = torch.Generator()
        for j, (key, shape) in enumerate(sorted(shapes.items())):
            n = math.prod(shape)
            for s in range(0, n, CHUNK):
                m = min(CHUNK, n - s)
                g.manual_seed(j * 1_000_003 + s // CHUNK)
                base = torch.randn(m, generator=g).mul_(BASE_STD)
                if bump(key):
                    base.add_(1.0)
                noise = torch.randn(m, generator=g).mul_(NOISE_STD)
                for i, w in enumerate(writers):
                    value = base + noise.roll(7919 * i)
                    w.write(key, value if dtype is None else value.to(dtype), s * itemsize)
        for w in writers:
            w.finish()
    except BaseException:
        for w in writers:
            w.abort()
        for p in paths:
            p.unlink(missing_ok=True)
        raise


def machine_line() -> str:
    import torch

    return (f"python {sys.version.split()[0]}, torch {torch.__version__}, {os.cpu_count()} cores, "
            f"load average {os.getloadavg()[0]:.1f}")


def others_note(busy0: float, ours0: float, t0: float) -> str:
    """The CPU time other programs took since (busy0, ours0, t0) = (*merge_bench.user_cpu_s(), perf_counter())."""
    import merge_bench as mb

    busy1, ours1 = mb.user_cpu_s()
    others = max(0.0, (busy1 - busy0) - (ours1 - ours0))
    share = others / ((time.perf_counter() - t0) * (os.cpu_count() or 1))
    return f"note: other programs used {others:.0f} CPU-seconds ({share:.0%} of the machine) during these runs"


def floor_row(floor: dict[str, float], n: int, width: int) -> str:
    """The I/O floor's row of a table: cat of n inputs + write and fsync."""
    return (f"{f'I/O floor, {n} inputs':{width}} {floor[f'floor{n}_s']:8.2f}  cat {floor[f'read{n}_s']:.1f} s + "
            f"write {floor['write_s']:.1f} s")


def failure_stub() -> dict:
    """spot_check's answer when the merge left no output."""
    return {"same_keys": False, "checked": 0, "mismatched": ["-"]}


def measured_row(label: str, m, ratio: str, width: int, ratio_width: int, hwm: bool = False) -> str:
    """A merge's row: wall seconds, its ratio, peak RssAnon (and VmHWM) in MiB of a merge_bench.Measure."""
    row = f"{label:{width}} {m.wall_s:8.2f}  {ratio:<{ratio_width}} {m.peak_anon_mib:11.0f}"
    return row + f" {m.hwm_mib:10.0f}" if hwm else row


def bench_parser(doc: str | None, keep_help: str | None = None, device: bool = False) -> argparse.ArgumentParser:
    """The options every Flux-shaped benchmark takes: --cache, --runs, --keep (and --device)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, default=Path("~/.cache/hubmix-bench"))
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--keep", action="store_true", help=keep_help)
    if device:
        ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    return ap


def parse_bench_args(ap: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse, make --cache absolute and present, print the machine line."""
    args = ap.parse_args(argv)
    args.cache = args.cache.expanduser().resolve()
    args.cache.mkdir(parents=True, exist_ok=True)
    print(machine_line(), flush=True)
    return args


def workspace(cache: Path, name: str):
    """(out folder, env with hubmix's cache under `cache`, merge_bench.Recorder logging under cache/logs)."""
    import merge_bench as mb

    work, logs = cache / "out", cache / "logs"
    work.mkdir(exist_ok=True)
    logs.mkdir(exist_ok=True)
    env = dict(os.environ, HUBMIX_CACHE=str(cache / "hubmix-cache"))
    return work, env, mb.Recorder(name, logs)


def original_shapes(family: str, model) -> dict[str, tuple[int, ...]]:
    """Original-layout key -> shape of a diffusers transformer (built on the meta device), through hubmix's own key
    map for `family` (fused tensors summed by rows)."""
    import dataclasses

    from hubmix.formats.families import get_family
    from hubmix.formats.layouts import KeyMap, to_original_shape

    spec = get_family(family).components["transformer"]
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


def spot_check_lossless(out: Path, inputs: list[Path], dtype, samples: int, extra: set[str]) -> dict:
    """A 3-way lossless (alpha 0.9, beta 1.1) output: keys and shapes equal the inputs'; `samples` evenly spaced
    tensors and `extra` in `dtype` and byte-identical to torch.where on the float32 inputs."""
    import torch
    from safetensors import safe_open

    fs = [safe_open(str(p), "pt") for p in inputs]
    with safe_open(str(out), "pt") as fo:
        keys = sorted(fs[0].keys())
        same = set(fo.keys()) == set(keys) and all(
            fo.get_slice(k).get_shape() == fs[0].get_slice(k).get_shape() for k in keys)
        picks = sorted({keys[i * len(keys) // samples] for i in range(samples)} | extra)
        bad = []
        for k in picks:
            a, b, c = (f.get_tensor(k) for f in fs)
            want = torch.where((a.float() - 0.9 * b.float()).abs() <= (a.float() - 1.1 * c.float()).abs(), b, c)
            got = fo.get_tensor(k)
            if got.dtype != dtype or not torch.equal(want.view(torch.uint8), got.view(torch.uint8)):
                bad.append(k)
    return {"same_keys": same, "checked": len(picks), "mismatched": bad}


def clean_up(outs: list[Path], inputs: list[Path], keep: bool) -> None:
    """Remove the outputs (and their temporary siblings); the inputs too unless keep."""
    import merge_bench as mb

    for out in outs:
        mb.remove_output(out)
    if not keep:
        for p in inputs:
            p.unlink(missing_ok=True)


def medians(rec) -> dict:
    """label -> the median Measure of a merge_bench.Recorder's runs."""
    import merge_bench as mb

    return {k: mb.median(v) for k, v in rec.results.items()}


def check_line(check: dict) -> str:
    """spot_check_lossless's answer in words."""
    bad = f"; MISMATCHED {check['mismatched']}" if check["mismatched"] else ""
    return (f"keys/shapes {'match' if check['same_keys'] else 'DIFFER from'} the inputs; "
            f"{check['checked'] - len(check['mismatched'])}/{check['checked']} sampled tensors byte-identical to "
            f"torch.where on the float32 inputs{bad}")
