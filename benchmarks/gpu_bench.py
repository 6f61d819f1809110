"""The GPU path against its goals: 3-way lossless at SDXL size (fp16) and Flux size (bf16) on a CUDA GPU, timed
against the I/O floor measured in the same run, and the output compared byte for byte with the CPU's merge.

    python benchmarks/gpu_bench.py                  # one command on a machine with a CUDA GPU
    python benchmarks/gpu_bench.py --dry            # no GPU: tiny shapes, the stage on the CPU (the test suite)

Goals, printed with every row: `hubmix merge --device cuda` within 1.2x the I/O floor; the output byte-identical
to `--device cpu` (selection methods copy stored values, and the comparisons are IEEE float32 on both).

- SDXL: three random SDXL single files in the real checkpoint layout (benchmarks/make_checkpoints.py, fp16, about
  6.9 GB each), built once under --cache.
- Flux: three random transformer-only files in BFL's key layout with FLUX.1's shapes (hidden 3072, 19 double and
  38 single blocks, 11.9B parameters, 23.8 GB each in bf16). Three inputs and an output of that size need about
  100 GB of disk; where less is free (a lent GPU machine has 64 GB) the first blocks only, as many as fit, and the
  row says how many of the 57.
- The I/O floor: `cat` of the three inputs (which also warms the page cache) plus writing and fsyncing an
  output-sized file, the median of --runs, as benchmarks/merge_bench.py measures it.
- --dry: Flux-keyed files of hidden size 64 in both dtypes; the "GPU" run goes through the engine's DeviceStage
  (pinned staging, streams, two slots) with the CPU standing in for the device (engine.transfer.HostBackend), so
  the path that differs from a CPU merge, and this script's printing, run in the test suite in seconds. Timing
  goals are not judged in dry mode; the byte identity is.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
import common  # noqa: E402

GOAL_RATIO = 1.2
FLUX_FULL = (3072, 128, 19, 38)  # hidden, head size, double blocks, single blocks
DRY = (64, 16, 2, 2)
MARGIN = 4e9  # disk left free
PARAMS = ["--alpha", "0.9", "--beta", "1.1"]  # selection that depends on every element


def flux_shapes(hidden: int, head: int, double: int, single: int) -> dict[str, tuple[int, ...]]:
    """BFL key -> shape of a FLUX.1 transformer (formats/families/layouts.yaml, flux_transformer)."""
    h = hidden
    s: dict[str, tuple[int, ...]] = {
        "img_in.weight": (h, 64), "img_in.bias": (h,), "txt_in.weight": (h, 4096), "txt_in.bias": (h,),
        "final_layer.linear.weight": (64, h), "final_layer.linear.bias": (64,),
        "final_layer.adaLN_modulation.1.weight": (2 * h, h), "final_layer.adaLN_modulation.1.bias": (2 * h,)}
    for name, fan_in in (("time_in", 256), ("vector_in", 768), ("guidance_in", 256)):
        s.update({f"{name}.in_layer.weight": (h, fan_in), f"{name}.in_layer.bias": (h,),
                  f"{name}.out_layer.weight": (h, h), f"{name}.out_layer.bias": (h,)})
    for i in range(double):
        for side in ("img", "txt"):
            p = f"double_blocks.{i}.{side}_"
            for k, (o, n) in {"mod.lin": (6 * h, h), "attn.qkv": (3 * h, h), "attn.proj": (h, h),
                              "mlp.0": (4 * h, h), "mlp.2": (h, 4 * h)}.items():
                s[p + k + ".weight"], s[p + k + ".bias"] = (o, n), (o,)
            s[p + "attn.norm.query_norm.scale"] = s[p + "attn.norm.key_norm.scale"] = (head,)
    for i in range(single):
        p = f"single_blocks.{i}."
        for k, (o, n) in {"modulation.lin": (3 * h, h), "linear1": (7 * h, h), "linear2": (h, 5 * h)}.items():
            s[p + k + ".weight"], s[p + k + ".bias"] = (o, n), (o,)
        s[p + "norm.query_norm.scale"] = s[p + "norm.key_norm.scale"] = (head,)
    return s


def flux_size_that_fits(folder: Path, itemsize: int) -> tuple[int, int, int, int]:
    """FLUX.1's shapes with as many of its blocks as four files (3 inputs, 1 output) fit in the free disk."""
    hidden, head, double, single = FLUX_FULL
    free = shutil.disk_usage(folder).free - MARGIN
    while double + single > 2:
        need = 4 * itemsize * sum(math.prod(v) for v in flux_shapes(hidden, head, double, single).values())
        if need <= free:
            break
        double, single = max(1, double - 1), max(1, single - 2)
    return hidden, head, double, single


def build_flux(folder: Path, size: tuple[int, int, int, int], dtype_name: str) -> list[Path]:
    """Three similar random models (base + small noise per model, fixed seeds), written tensor by tensor."""
    import torch

    from hubmix.formats.io.writer import PlannedTensor, SafetensorsWriter

    tag = f"flux-{dtype_name}-{size[0]}h{size[2]}d{size[3]}s"
    paths = [folder / f"{tag}-model{i}.safetensors" for i in range(3)]
    if all(p.exists() for p in paths):
        return paths
    folder.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, dtype_name)
    shapes = flux_shapes(*size)
    planned = [PlannedTensor(k, dtype, s) for k, s in shapes.items()]
    writers = [SafetensorsWriter(p, planned, {"format": "pt"}) for p in paths]
    common.write_random(writers, paths, shapes, dtype, dtype.itemsize)
    return paths


def digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(64 << 20):
            h.update(block)
    return h.hexdigest()


def floor_seconds(paths: list[Path], out_bytes: int, work: Path, runs: int) -> tuple[float, float]:
    import merge_bench as mb

    read = statistics.median(mb.read_files(paths) for _ in range(runs))
    write = statistics.median(mb.write_floor(work / "floor.bin", out_bytes) for _ in range(runs))
    (work / "floor.bin").unlink(missing_ok=True)
    return read, write


def merge_cli(paths: list[Path], out: Path, device: str) -> float:
    """`hubmix merge` as a user runs it; wall seconds."""
    out.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "hubmix", "merge", *map(str, paths), "--method", "lossless", *PARAMS,
           "--device", device, "--out", str(out), "-q"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": str(HERE.parent)})
    return time.perf_counter() - t0


def merge_in_process(paths: list[Path], out: Path, staged: bool) -> float:
    """The dry run's merges, in this process (no interpreter start-up per run): on the CPU as `--device cpu`, or
    as its "GPU", every chunk through a DeviceStage whose device is the CPU, chunked small so that several chunks
    are in flight."""
    import hubmix
    from hubmix import Recipe
    from hubmix.engine import kernels, pipeline
    from hubmix.engine.pipeline import Settings
    from hubmix.engine.transfer import DeviceStage, HostBackend

    recipe = Recipe(models=[str(p) for p in paths], method="lossless", params={"alpha": 0.9, "beta": 1.1})
    old_stage, old_chunk = kernels.Kernels.stage, pipeline.chunk_elements
    if staged:
        stage = DeviceStage(HostBackend())
        kernels.Kernels.stage = property(lambda self: stage)  # type: ignore[assignment]
        pipeline.chunk_elements = lambda *a, **k: 1 << 14
    out.unlink(missing_ok=True)
    t0 = time.perf_counter()
    try:
        hubmix.merge(recipe, out=out, quiet=True,
                     settings=Settings(kernels="eager" if staged else "auto", device="cpu", workers=2))
    finally:
        kernels.Kernels.stage, pipeline.chunk_elements = old_stage, old_chunk
    return time.perf_counter() - t0


def gpu_name() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def run_case(name: str, paths: list[Path], work: Path, args: argparse.Namespace, note: str) -> dict:
    file = name.split()[0] + ".safetensors"  # one name: the recipe in the metadata names the output
    out_gpu, out_cpu = work / "gpu" / file, work / "cpu" / file
    out_gpu.parent.mkdir(exist_ok=True)
    out_cpu.parent.mkdir(exist_ok=True)
    size = paths[0].stat().st_size
    read, write = floor_seconds(paths, size, work, args.runs)
    floor = read + write
    if args.dry:
        gpu = merge_in_process(paths, out_gpu, staged=True)
        cpu = merge_in_process(paths, out_cpu, staged=False)
    else:
        merge_cli(paths, out_gpu, "cuda")  # first run: CUDA context, kernels; the median of the rest counts
        gpu = statistics.median(merge_cli(paths, out_gpu, "cuda") for _ in range(args.runs))
        cpu = merge_cli(paths, out_cpu, "cpu")
    same = digest(out_gpu) == digest(out_cpu)
    row = {"case": name, "note": note, "gb": size / 1e9, "read": read, "write": write, "floor": floor, "gpu": gpu,
           "cpu": cpu, "ratio": gpu / floor, "identical": same}
    for p in (out_gpu, out_cpu):
        if not args.keep:
            p.unlink(missing_ok=True)
    return row


def report(rows: list[dict], dry: bool, device: str) -> bool:
    print(f"\nhubmix GPU benchmark, 3-way lossless ({' '.join(PARAMS)}), device: {device}")
    print(f"{'case':18} {'input GB':>9} {'floor s':>8} {'(cat + write)':>15} {'GPU s':>7} {'ratio':>6} "
          f"{'goal':>6} {'CPU s':>7}  byte-identical to the CPU")
    ok = True
    for r in rows:
        meets = r["ratio"] <= GOAL_RATIO
        verdict = "n/a" if dry else ("PASS" if meets else "FAIL")
        ok &= r["identical"] and (dry or meets)
        print(f"{r['case']:18} {r['gb']:9.3f} {r['floor']:8.2f} {r['read']:7.2f} + {r['write']:5.2f} {r['gpu']:7.2f} "
              f"{r['ratio']:5.2f}x {verdict:>6} {r['cpu']:7.2f}  {'yes' if r['identical'] else 'NO'}")
        if r["note"]:
            print(f"{'':18} {r['note']}")
    print(f"goals: GPU merge <= {GOAL_RATIO}x the I/O floor{' (not judged in --dry)' if dry else ''}; output "
          f"byte-identical to --device cpu")
    print("result:", "all goals met" if ok else "GOALS NOT MET")
    return ok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry", action="store_true", help="no GPU: tiny shapes, the device stage on the CPU")
    ap.add_argument("--cache", type=Path, default=Path("~/.cache/hubmix-bench").expanduser())
    ap.add_argument("--work", type=Path, default=None, help="where outputs go (default: under --cache)")
    ap.add_argument("--cases", default="sdxl,flux")
    ap.add_argument("--runs", type=int, default=None, help="timed runs per figure (default 3; 1 with --dry)")
    ap.add_argument("--keep", action="store_true", help="keep the outputs")
    args = ap.parse_args(argv)
    args.runs = args.runs or (1 if args.dry else 3)
    device = "CPU standing in for a GPU (--dry)" if args.dry else gpu_name()
    if device is None:
        print("no CUDA GPU here: run with --dry for the CPU-only check", file=sys.stderr)
        return 2
    work = args.work or args.cache / "gpu-bench"
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for case in args.cases.split(","):
        dtype = "float16" if case == "sdxl" else "bfloat16"
        if args.dry:
            paths = build_flux(work / "inputs", DRY, dtype)
            rows.append(run_case(f"{case} ({dtype}, dry)", paths, work, args, "tiny Flux-keyed files"))
        elif case == "sdxl":
            import make_checkpoints

            paths, _ = make_checkpoints.build("sdxl", args.cache)
            rows.append(run_case("sdxl (float16)", paths, work, args, ""))
        else:
            size = flux_size_that_fits(args.cache, 2)
            paths = build_flux(args.cache / "flux", size, dtype)
            note = "" if size == FLUX_FULL else f"FLUX.1 shapes, {size[2]} of 19 double and {size[3]} of 38 single " \
                                                f"blocks (disk)"
            rows.append(run_case("flux (bfloat16)", paths, work, args, note))
    return 0 if report(rows, args.dry, device) else 1


if __name__ == "__main__":
    sys.exit(main())
