"""GGUF benchmark on FLUX.1 transformer shapes: two random Q8_0 GGUF transformers (ComfyUI-GGUF's layout, every
tensor at its real size, depth cut to the first double and single blocks as the Flux benchmark cuts it) merged with
lossless into GGUF outputs: Q8_0 against the I/O floor (read both inputs, write and fsync an output-sized file),
Q4_K against Q4_0 (same run), with peak RssAnon and the CPU time (user + sys) of the merge process.

    python benchmarks/gguf_bench.py [--cache /work/tmp/gguf] [--layers 3,6] [--runs 1] [--keep] [--baseline DIR]

Inputs: values base = 0.05*randn (norm scales near 1) and model i = base + 0.005*randn (rolled per model), written
tensor by tensor with hubmix's own GGUF writer (whose Q8_0 blocks are byte-identical to the gguf package's). Every
file is deleted at the end unless --keep. This prints numbers; it asserts no timings.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402
import merge_bench as mb  # noqa: E402
from flux_bench import original_shapes  # noqa: E402


def build(cache: Path, layers: tuple[int, int]) -> list[Path]:
    from hubmix.engine.native import Native
    from hubmix.formats.families import get_family
    from hubmix.formats.quant.gguf_write import GGUFWriter, stored_type

    paths = [cache / f"flux-q8_0-{layers[0]}d{layers[1]}s-model{i}.gguf" for i in range(2)]
    if all(p.exists() for p in paths):
        return paths
    shapes = original_shapes(layers)
    rules = get_family("flux").gguf
    tensors = [stored_type(rules, k, s, "bfloat16", "gguf-q8_0") for k, s in sorted(shapes.items())]
    print(f"building 2 random Q8_0 Flux transformers ({sum(map(math.prod, shapes.values())) / 1e9:.2f}B parameters "
          f"each) under {cache}", flush=True)
    Native.library()  # the native quantizers
    writers = [GGUFWriter(p, "flux", "gguf-q8_0", tensors) for p in paths]
    common.write_random(writers, paths, shapes, bump=lambda key: key.endswith(".scale"))  # float32 values
    return paths


def check(out: Path, inputs: list[Path], qtype: str) -> str:
    """A few output tensors against the reference: gguf's dequantization of the inputs, lossless in float32, the
    output type's quantization of that (hubmix's quantizer, byte-identical to gguf's/llama.cpp's), gguf's reader."""
    import gguf

    from hubmix.engine.native import Native
    from hubmix.formats.quant.gguf_blocks import quantize

    Native.library()  # the native quantizers (the numpy port of the K-quants takes minutes on these tensors)
    rs = [gguf.GGUFReader(str(p)) for p in (*inputs, out)]
    by = [{t.name: t for t in r.tensors} for r in rs]
    picks = ["double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight",
             "double_blocks.0.img_mlp.2.weight"]
    bad = []
    for k in picks:
        a, b = (gguf.quants.dequantize(d[k].data, d[k].tensor_type).reshape(-1) for d in by[:2])
        ref = np.float32(0.5) * a + np.float32(0.5) * b
        want = np.where(np.abs(ref - np.float32(0.9) * a) <= np.abs(ref - np.float32(1.1) * b), a, b)
        t = by[2][k]
        if t.tensor_type.name != qtype or quantize(want, qtype).tobytes() != np.asarray(t.data).tobytes():
            bad.append(k)
    return f"{len(picks) - len(bad)}/{len(picks)} sampled {qtype} tensors byte-identical to the reference" + (
        f"; MISMATCHED {bad}" if bad else "")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", type=Path, default=Path("/work/tmp/gguf"))
    ap.add_argument("--layers", default="3,6", help="double,single blocks kept (FLUX.1 has 19,38)")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--baseline", type=Path, help="another hubmix checkout whose Q8_0 merge is measured too")
    args = ap.parse_args()
    layers = tuple(int(x) for x in args.layers.split(","))
    cache = args.cache
    cache.mkdir(parents=True, exist_ok=True)
    (cache / "logs").mkdir(exist_ok=True)
    env = dict(os.environ, HUBMIX_CACHE=str(cache / "hubmix-cache"))
    busy0, ours0, t0 = *mb.user_cpu_s(), time.perf_counter()
    paths = build(cache, layers)
    rec = mb.Recorder("gguf", cache / "logs")
    outs = {q: cache / f"merged-{q}.gguf" for q in ("q8_0", "q4_0", "q4_k")}
    notes: dict[str, str] = {}
    cpu: dict[str, list[float]] = {}
    try:
        in_bytes = paths[0].stat().st_size
        print("I/O floor (cat 2 inputs + write and fsync an output-sized file)", flush=True)
        floor = mb.measure_floor(paths, in_bytes, cache, args.runs)
        runs = [(q, q, env) for q in outs]
        if args.baseline:  # the same merge by another checkout, in the same run
            runs.insert(0, ("q8_0 baseline", "q8_0", dict(env, PYTHONPATH=str(args.baseline))))
        for label, q, run_env in runs:
            out = outs[q]
            cmd = mb.hubmix_cmd("lossless", paths, out, None) + ["--alpha", "0.9", "--beta", "1.1",
                                                                  "--dtype", f"gguf-{q}"]
            for _ in range(args.runs):
                t = os.times()
                rec.measure(f"lossless -> gguf-{label}", paths, cmd, run_env)
                t1 = os.times()  # the merge's CPU time (user + sys): the number a loaded machine does not blur
                cpu.setdefault(label, []).append(t1.children_user - t.children_user + t1.children_system
                                             - t.children_system)
                if out.exists():
                    notes[label] = notes.get(label) or check(out, paths, q.upper())
                    mb.remove_output(out)
    finally:
        for out in outs.values():
            mb.remove_output(out)
        if not args.keep:
            for p in paths:
                p.unlink(missing_ok=True)
    noise = common.others_note(busy0, ours0, t0)
    med = {k: mb.median(v) for k, v in rec.results.items()}
    print(f"\n=== gguf: 2 Q8_0 inputs x {in_bytes / 1e9:.2f} GB (Flux transformer, {layers[0]} of 19 double, "
          f"{layers[1]} of 38 single blocks, every tensor full size); runs per number: {args.runs} (median)")
    print(f"{'':30} {'wall s':>8}  {'ratio':<26} {'RssAnon MiB':>11} {'CPU s':>7}  CPU ratio")
    print(common.floor_row(floor, 2, 30))
    q40 = med.get("lossless -> gguf-q4_0")
    for q in [label for label, _, _ in runs]:
        m = med.get(f"lossless -> gguf-{q}")
        if m is None:
            print(f"lossless -> gguf-{q:<14} FAILED {rec.failures.get(f'lossless -> gguf-{q}')}")
            continue
        ratio = (f"{m.wall_s / floor['floor2_s']:.2f}x the I/O floor" if q.startswith("q8_0") else
                 f"{m.wall_s / q40.wall_s:.2f}x Q4_0's time" if q == "q4_k" and q40 else "")
        c = mb.statistics.median(cpu[q])
        cratio = f"{c / mb.statistics.median(cpu['q4_0']):.2f}x Q4_0's" if q == "q4_k" and "q4_0" in cpu else ""
        print(common.measured_row("lossless -> gguf-" + q, m, ratio, 30, 26) + f" {c:7.2f}  {cratio}")
    for q, note in notes.items():
        print(f"correctness ({q}): {note}")
    print(noise)


if __name__ == "__main__":
    main()
