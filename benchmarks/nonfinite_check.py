"""Cost of the NaN/inf check (hubmix.engine.pipeline.count_nonfinite) on a full-size fp16 file, one thread, in
2M-element chunks, against the fp16 -> fp32 conversion a merge does on the same chunks. Prints numbers only.

    python benchmarks/nonfinite_check.py [FILE.safetensors]   (default: the SD1.5 file merge_bench.py builds)
"""
import os, glob, time, torch
from hubmix.formats.io.readers import SafetensorsFile
from hubmix.engine.pipeline import count_nonfinite
torch.set_num_threads(1)
import sys
f = SafetensorsFile(sys.argv[1] if len(sys.argv) > 1 else
                    sorted(glob.glob(os.path.expanduser("~/.cache/hubmix-bench/sd15/*.safetensors")))[0])
views = [f.tensor(k).reshape(-1) for k in f.keys()]
chunks = [v[s:s + (1 << 21)] for v in views for s in range(0, v.numel(), 1 << 21)]
n = sum(c.numel() * c.element_size() for c in chunks)
for c in chunks: c.sum()  # page in
for rnd in range(2):
    t = time.perf_counter(); [count_nonfinite([c]) for c in chunks]; dt = time.perf_counter() - t
    t = time.perf_counter(); [c.float() for c in chunks]; dt2 = time.perf_counter() - t
    print(f"check: {n/1e9:.2f} GB in {dt:.2f}s = {n/dt/1e9:.2f} GB/s one thread; fp16->fp32 copy alone {dt2:.2f}s")
