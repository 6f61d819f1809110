"""What the Flux-shaped benchmarks (flux, zimage, quant, gguf, gpu) share: random similar models written tensor by
tensor, the CPU time other programs took meanwhile, and the table rows. Process measurement and the I/O floor
itself live in merge_bench.py."""

from __future__ import annotations

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
