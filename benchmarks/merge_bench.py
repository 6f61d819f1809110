"""hubmix merge benchmark: full-size SD1.5 / SDXL checkpoints, against baselines measured in the same run.

    python benchmarks/merge_bench.py [--family sd15|sdxl|all] [--cache DIR] [--runs N] [--skip-mecha]
                                     [--skip-naive] [--methods seed|new|all] [--device cpu|cuda] [--json OUT]
    python benchmarks/merge_bench.py --family flux [--cache DIR] [--runs N] [--keep]   (see flux_bench.py)

What is measured, per family, on three similar random fp16 single files of the real key layout (built once by
make_checkpoints.py and cached outside the repo):

- hubmix's CLI (`hubmix merge ... -q`, a subprocess as users run it): the seed's methods (3-way lossless, 3-way
  maxdiff, 2-way weighted sum) and, with --methods new or all, the field's methods: element-wise triple_sum,
  sum_twice, train_difference (3-way; goal: within 1.5x the I/O floor) and whole-tensor slerp (2-way), ties, dare
  and model_stock (3-way; goal: within 3x), each output spot-checked against the method run on whole tensors. Wall time, and peak anonymous memory (max over time of RssAnon, sampled every 20 ms over the process tree):
  RssAnon is what a merge really costs in RAM, since memory-mapped inputs count in RSS (VmHWM, also shown) but are
  page cache the kernel can drop. hubmix hashes its inputs once per file version, while it merges them: each
  run first merges files never merged before (their entries removed from hubmix's hash cache; the native kernels
  already built), then the same files again; both are compared with the I/O floor (goals: 1.5x and 1.25x, start-up
  included). hubmix's cache is kept under --cache, so its native kernels are built once; what that build costs on
  a machine is measured apart, in an empty cache.
- The first merge as a new user meets it (issue 21): three never-seen files in a fresh, empty HUBMIX_CACHE into
  which only the already-built native kernels are copied, warm page cache, against a floor measured just before
  each run the way the issue did: `cat` of the inputs plus `dd if=/dev/zero bs=8M conv=fsync` of the output's size
  (goal: within 1.5x, the median of the runs' ratios); then the same merge again in that cache. `--first-only`
  measures only this row.
- The I/O floor: `cat` of the inputs to /dev/null plus writing and fsyncing an output-sized file, in the same cache
  state as the merges; the goals are stated against it. hubmix writes large outputs with O_DIRECT (no page-cache
  copy), which can write faster than that buffered floor, so a stricter floor whose write is O_DIRECT too is
  measured and the lossless ratios are printed against it as well.
- A naive script (naive_merge.py: load_file every input, float32 torch ops on every tensor, save_file), as a
  hand-written merge does it: what a streaming engine has to beat.
- sd-mecha's weighted sum (in its own venv), the closest existing streaming merger, with its default finite checks.
- Python startup with what a native-kernel merge imports (hubmix's CLI and merge flow; no torch): the fixed cost
  inside every hubmix row, and the RssAnon baseline.

Every merge reads inputs warmed into the page cache first (when they fit) and writes an fsynced output to the same
disk; outputs are deleted between runs. After the first lossless run, tensors of hubmix's output are compared byte
for byte with torch.where on the inputs, so a fast but wrong engine shows up. The CPU time other processes took
meanwhile is reported when it is large enough to make the numbers noisy. This prints numbers; it asserts no timings.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import make_checkpoints  # noqa: E402

MIB = 1 << 20
MECHA_VERSION = "1.1.8"
MECHA_CONFIG = {"sd15": "sd1-ldm", "sdxl": "sdxl-sgm"}
SEED_METHODS = [("lossless", 3), ("maxdiff", 3), ("weighted_sum", 2)]
NEW_METHODS = [("triple_sum", 3), ("sum_twice", 3), ("train_difference", 3), ("slerp", 2), ("ties", 3), ("dare", 3),
               ("model_stock", 3)]
WHOLE_TENSOR = {"slerp", "ties", "dare", "model_stock"}  # statistics pass, then the element pass
HUBMIX_METHODS = SEED_METHODS  # set from --methods


@dataclass
class Measure:
    wall_s: float
    peak_anon_mib: float | None  # max over time of RssAnon summed over the process tree
    hwm_mib: float | None  # VmHWM (peak RSS, mapped file pages included), summed over the process tree
    cpu_s: float | None = None  # user + system CPU seconds of the process and its waited children (wait4)


# ---- process measurement ------------------------------------------------------------------------------------------

def process_tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        for f in glob.glob(f"/proc/{p}/task/*/children"):
            try:
                todo.extend(int(c) for c in Path(f).read_text().split())
            except OSError:
                pass
    return pids


def memory_kib(pid: int) -> tuple[int, int]:
    """(RssAnon, VmHWM) of a process, in KiB; zeros once it is gone."""
    found = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(("RssAnon:", "VmHWM:")):
                found[line.split(":")[0]] = int(line.split()[1])
    except OSError:
        pass
    return found.get("RssAnon", 0), found.get("VmHWM", 0)


def run_measured(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> Measure:
    """Run cmd; wall time, peak RssAnon and VmHWM (20 ms samples over the process tree; wait4's ru_maxrss is no
    use here, as it counts the parent's pages the child had before exec)."""
    peak = [0, 0]
    stop = threading.Event()
    with open(log, "w") as logf:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env)

        def sample() -> None:
            while not stop.is_set():
                now = [memory_kib(p) for p in process_tree(proc.pid)]
                peak[0] = max(peak[0], sum(a for a, _ in now))
                peak[1] = max(peak[1], sum(h for _, h in now))
                stop.wait(0.02)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        stop.set()
        sampler.join()
    if proc.returncode != 0:
        tail = log.read_text()[-2000:]
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}; log {log}:\n{tail}")
    return Measure(wall, peak[0] / 1024, peak[1] / 1024, usage.ru_utime + usage.ru_stime)


def median(runs: list[Measure]) -> Measure:
    def med(name):
        vals = [getattr(r, name) for r in runs if getattr(r, name) is not None]
        return statistics.median(vals) if vals else None
    return Measure(med("wall_s"), med("peak_anon_mib"), med("hwm_mib"), med("cpu_s"))


# ---- page cache and I/O floor -------------------------------------------------------------------------------------

def read_files(paths: list[Path]) -> float:
    """Seconds to `cat` the files to /dev/null (also how inputs are warmed into the page cache)."""
    if not paths:
        return 0.0
    t0 = time.perf_counter()
    with open(os.devnull, "wb") as null:
        subprocess.run(["cat", *map(str, paths)], stdout=null, check=True)
    return time.perf_counter() - t0


def write_floor(path: Path, nbytes: int, direct: bool = False) -> float | None:
    """Seconds to write nbytes of random data (a 64 MiB buffer, repeated) and fsync it: through the page cache as
    cp and cat do, or with O_DIRECT as hubmix writes large outputs (None where the filesystem refuses it)."""
    import mmap

    buf = mmap.mmap(-1, 64 * MIB)  # page-aligned, as O_DIRECT wants
    buf.write(os.urandom(64 * MIB))
    nbytes = -(-nbytes // 4096) * 4096 if direct else nbytes
    t0 = time.perf_counter()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if direct else 0), 0o644)
    except OSError:
        return None
    try:
        left = nbytes
        while left:
            left -= os.write(fd, memoryview(buf)[:min(left, len(buf))])
        os.fsync(fd)
    except OSError:
        return None
    finally:
        os.close(fd)
        path.unlink()
    return time.perf_counter() - t0


def user_cpu_s() -> tuple[float, float]:
    """(user CPU seconds of the whole machine, of this process and its waited children): their difference over a
    family is what other programs took, the noise in these numbers (kernel time, such as page reclaim and
    writeback that the merges themselves cause, is left out)."""
    import resource

    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:3]]
    ours = sum(resource.getrusage(w).ru_utime for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return sum(f) / os.sysconf("SC_CLK_TCK"), ours


def mem_info() -> dict[str, int]:
    out = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        name, value = line.split(":")
        out[name] = int(value.split()[0]) * 1024
    return out


# ---- the tools ----------------------------------------------------------------------------------------------------

def hubmix_cmd(method: str, inputs: list[Path], out: Path, device: str | None) -> list[str]:
    """The CLI as `python -m hubmix`, so the hubmix this interpreter imports runs (PYTHONPATH can pick a checkout)."""
    cmd = [sys.executable, "-m", "hubmix", "merge", *map(str, inputs), "--method", method, "--out", str(out),
           "--overwrite", "-q"]
    if method == "weighted_sum":
        cmd += ["--alpha", "0.5"]
    if method == "ties":
        cmd += ["--density", "0.2"]
    if method == "dare":
        cmd += ["--drop", "0.9", "--dare-seed", "1"]
    if device:  # explicit, since hubmix's own default picks a GPU where there is one
        cmd += ["--device", device]
    return cmd


def hubmix_has_device_option() -> bool:
    helptext = subprocess.run([sys.executable, "-m", "hubmix", "merge", "--help"], capture_output=True,
                              text=True).stdout
    return "--device" in helptext


def ensure_mecha(cache: Path) -> tuple[Path | None, str]:
    """The Python of a venv with sd-mecha (made on first use: torch first, as the local CPU build), or a note."""
    venv = cache / "mecha-venv"
    py = venv / "bin" / "python"
    if py.exists() and subprocess.run([str(py), "-c", "import sd_mecha"], capture_output=True).returncode == 0:
        return py, ""
    print(f"installing sd-mecha {MECHA_VERSION} into {venv} (once)", flush=True)
    log = cache / "mecha-install.log"
    with open(log, "w") as f:
        for cmd in ([sys.executable, "-m", "venv", str(venv)], [str(py), "-m", "pip", "install", "torch==2.13.0"],
                    [str(py), "-m", "pip", "install", f"sd-mecha=={MECHA_VERSION}"]):
            if subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode != 0:
                return None, f"sd-mecha skipped: install failed (see {log})"
    return py, ""


def remove_output(path: Path) -> None:
    path.unlink(missing_ok=True)
    path.with_name(f"{path.stem}.recipe.yaml").unlink(missing_ok=True)


# ---- hubmix's once-per-machine and once-per-file costs --------------------------------------------------------------

def native_build_seconds(env: dict[str, str], work: Path, timed: bool = True) -> dict[str, float | None]:
    """What building hubmix's native kernels costs (once per machine): built in an empty cache, timed (unless not
    `timed`); then made sure to exist in the benchmark's own cache, so no timed merge pays for it."""
    code = ("import time; t = time.perf_counter(); from hubmix.engine.native import Native; lib = Native.library(); "
            "print(Native.build_seconds if lib is not None else -1, time.perf_counter() - t)")
    fresh = work / "native-build-cache"
    shutil.rmtree(fresh, ignore_errors=True)
    out = subprocess.run([sys.executable, "-c", code if timed else "pass"], capture_output=True, text=True,
                         env=dict(env, HUBMIX_CACHE=str(fresh)))
    shutil.rmtree(fresh, ignore_errors=True)
    subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)  # the bench's cache
    try:
        build, total = (float(x) for x in out.stdout.split())
    except ValueError:
        return {"build_s": None, "first_use_s": None}
    return {"build_s": build if build >= 0 else None, "first_use_s": total}


def forget_hashes(env: dict[str, str], paths: list[Path]) -> None:
    """Remove the inputs from hubmix's hash cache: the next merge sees files it never merged before."""
    cache = Path(env["HUBMIX_CACHE"], "sha256.json")
    try:
        data = json.loads(cache.read_text())
    except (OSError, ValueError):
        return
    for p in paths:
        data.pop(str(p.resolve()), None)
    cache.write_text(json.dumps(data))


def fresh_cache(env: dict[str, str], where: Path) -> dict[str, str]:
    """An empty hubmix cache as a new user has it (no input hashes), with only the native kernels copied in from
    the benchmark's cache ("native kernels built beforehand"): the env for a first merge in it."""
    shutil.rmtree(where, ignore_errors=True)
    where.mkdir(parents=True)
    native = Path(env["HUBMIX_CACHE"], "native")
    if native.is_dir():
        shutil.copytree(native, where / "native")
    return dict(env, HUBMIX_CACHE=str(where))


def cat_dd_floor(paths: list[Path], out_bytes: int, work: Path) -> dict[str, float]:
    """The floor as issue 21 measured it, with the inputs warm: `cat` of the inputs to /dev/null, plus an
    output-sized file written by `dd if=/dev/zero bs=8M conv=fsync` (buffered, fsynced), as two timed commands."""
    read_files(paths)  # warm, as before every merge
    cat_s = read_files(paths)
    target = work / "floor-dd.bin"
    count = -(-out_bytes // (8 * MIB))
    t0 = time.perf_counter()
    subprocess.run(["dd", "if=/dev/zero", f"of={target}", "bs=8M", f"count={count}", "conv=fsync"],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    dd_s = time.perf_counter() - t0
    target.unlink()
    return {"cat_s": cat_s, "dd_s": dd_s, "floor_s": cat_s + dd_s}


def first_merge_rows(paths: list[Path], out: Path, work: Path, hub_env: dict[str, str], rec: "Recorder",
                     device: str | None, runs: int) -> tuple[list[dict[str, float]], dict | None]:
    """Issue 21's row: per run, the cat + dd floor, then a 3-way lossless of never-seen files in a fresh
    HUBMIX_CACHE (native kernels copied in), then the same merge again in that cache; each ratio is against the
    floor measured just before it. Also the first run's output spot-checked against torch.where."""
    rows, check = [], None
    for i in range(runs):
        floor = cat_dd_floor(paths, out_bytes=paths[0].stat().st_size, work=work)
        env = fresh_cache(hub_env, work / "fresh-hubmix-cache")
        cmd = hubmix_cmd("lossless", paths, out, device)
        row = dict(floor)
        if rec.measure("hubmix lossless, first merge, fresh cache", paths, cmd, env):
            row["first_s"] = rec.results["hubmix lossless, first merge, fresh cache"][-1].wall_s
            if check is None:
                check = spot_check_lossless(out, paths)
        remove_output(out)
        if rec.measure("hubmix lossless, again, same cache", paths, cmd, env):
            row["again_s"] = rec.results["hubmix lossless, again, same cache"][-1].wall_s
        remove_output(out)
        shutil.rmtree(work / "fresh-hubmix-cache", ignore_errors=True)
        load = os.getloadavg()[0]
        row["load1"] = load
        rows.append(row)
        got = "  ".join(f"{k.split('_')[0]} {row[k]:.2f} s ({row[k] / row['floor_s']:.2f}x)"
                        for k in ("first_s", "again_s") if k in row)
        print(f"  fresh-cache run {i + 1}: floor cat {floor['cat_s']:.2f} + dd {floor['dd_s']:.2f} = "
              f"{floor['floor_s']:.2f} s; {got}; load average {load:.2f}", flush=True)
    return rows, check


# ---- correctness --------------------------------------------------------------------------------------------------

def spot_check_lossless(out: Path, inputs: list[Path], n_extra: int = 6) -> dict:
    """Key set and shapes of the output equal the inputs'; chosen tensors byte-identical to torch.where in float32."""
    import torch
    from safetensors import safe_open

    fs = [safe_open(str(p), "pt") for p in inputs]
    with safe_open(str(out), "pt") as fo:
        same_keys = set(fo.keys()) == set(fs[0].keys())
        same_shapes = same_keys and all(fo.get_slice(k).get_shape() == fs[0].get_slice(k).get_shape()
                                        for k in fo.keys())
        floats = sorted(k for k in fs[0].keys() if fs[0].get_slice(k).get_dtype() in ("F16", "F32", "BF16"))
        numel = {k: math.prod(fs[0].get_slice(k).get_shape()) for k in floats}
        picks = {max(floats, key=numel.get)}  # the largest tensor (chunked by the engine)
        picks |= {k for k in floats if k.endswith(("attn_1.q.weight", "token_embedding.weight"))}
        picks |= {next(k for k in floats if "norm" in k and k.endswith(".weight"))}
        picks |= {floats[i * len(floats) // n_extra] for i in range(n_extra)}
        bad = []
        for k in sorted(picks):
            a, b, c = (f.get_tensor(k) for f in fs)
            want = torch.where((a.float() - b.float()).abs() <= (a.float() - c.float()).abs(), b.float(), c.float())
            got = fo.get_tensor(k)
            if got.dtype != a.dtype or not torch.equal(want.to(a.dtype).view(torch.uint8), got.view(torch.uint8)):
                bad.append(k)
    return {"same_keys": same_keys, "same_shapes": same_shapes, "checked": len(picks), "mismatched": bad,
            "ok": same_keys and same_shapes and not bad}


def spot_check_method(method: str, out: Path, inputs: list[Path], n_picks: int = 6) -> dict:
    """A few tensors of a merge's output, byte for byte, against the method run on the whole input tensors (in
    float32, then the output dtype). Fused q/k/v tensors (in_proj) are left out: hubmix merges their three parts as separate tensors,
    and dare, whose mask depends on the canonical tensor name, is checked on no tensor here (tests/test_dare.py)."""
    import torch
    from safetensors import safe_open

    from hubmix.methods import get_method

    if method == "dare":
        return {"checked": 0, "mismatched": [], "ok": True}
    m = get_method(method)
    params = m.resolve_params({"alpha": 0.5} if method == "weighted_sum" else
                              {"density": 0.2} if method == "ties" else {}, len(inputs), "bench")
    fs = [safe_open(str(p), "pt") for p in inputs]
    with safe_open(str(out), "pt") as fo:
        floats = sorted(k for k in fs[0].keys() if fs[0].get_slice(k).get_dtype() in ("F16", "F32", "BF16")
                        and "in_proj" not in k)
        picks = {floats[i * len(floats) // n_picks] for i in range(n_picks)}
        picks |= {k for k in floats if k.endswith(("attn_1.q.weight", "token_embedding.weight"))}
        bad = []
        for k in sorted(picks):
            xs = [f.get_tensor(k) for f in fs]
            want = m([x.float() for x in xs], params).to(xs[0].dtype)
            got = fo.get_tensor(k)
            # exact: per-tensor sums are block sums added by fsum, the same bits over chunks or whole tensors
            if got.dtype != want.dtype or not torch.equal(want.view(torch.uint8), got.view(torch.uint8)):
                bad.append(k)
    return {"checked": len(picks), "mismatched": bad, "ok": not bad}


# ---- one family ---------------------------------------------------------------------------------------------------

class Recorder:
    """Runs measured commands with their inputs warmed first; keeps every run, and failures apart."""

    def __init__(self, family: str, logs: Path):
        self.family, self.logs = family, logs
        self.results: dict[str, list[Measure]] = {}
        self.failures: dict[str, list[str]] = {}

    def measure(self, name: str, inputs: list[Path], cmd: list[str], env: dict[str, str] | None = None) -> bool:
        read_files(inputs)  # warm the page cache (as far as it holds them)
        try:
            m = run_measured(cmd, self.logs / f"{self.family}-{name}.log", env)
        except RuntimeError as e:  # a crash is a result too: reported, not timed
            self.failures.setdefault(name, []).append(str(e).splitlines()[-1][:300])
            print(f"  {name}: FAILED ({e})", flush=True)
            return False
        self.results.setdefault(name, []).append(m)
        print(f"  {name}: {m.wall_s:.2f} s, peak RssAnon {m.peak_anon_mib:.0f} MiB", flush=True)
        return True


def measure_floor(paths: list[Path], out_bytes: int, work: Path, runs: int) -> dict[str, float]:
    """cat of the first 3 and first 2 inputs (warm), and an output-sized write + fsync; medians of `runs`."""
    floors = {"write_s": statistics.median(write_floor(work / "floor.bin", out_bytes) for _ in range(runs))}
    direct = [write_floor(work / "floor.bin", out_bytes, direct=True) for _ in range(runs)]
    floors["direct_write_s"] = None if None in direct else statistics.median(direct)
    for n in (3, 2):
        read_files(paths[:n])
        floors[f"read{n}_s"] = statistics.median(read_files(paths[:n]) for _ in range(runs))
        floors[f"floor{n}_s"] = floors[f"read{n}_s"] + floors["write_s"]
        if floors["direct_write_s"] is not None:
            floors[f"direct_floor{n}_s"] = floors[f"read{n}_s"] + floors["direct_write_s"]
    return floors


def bench_family(family: str, args: argparse.Namespace, mecha_py: Path | None, mecha_note: str) -> dict:
    paths, build_s = make_checkpoints.build(family, args.cache)
    busy0, ours0, t0 = *user_cpu_s(), time.perf_counter()
    work = args.cache / "out"
    logs = args.cache / "logs"
    work.mkdir(exist_ok=True)
    logs.mkdir(exist_ok=True)
    in_bytes = [p.stat().st_size for p in paths]
    out_bytes = in_bytes[0]
    mem = mem_info()
    notes = [mecha_note] if mecha_note else []
    fits = sum(in_bytes) + out_bytes < 0.8 * mem["MemTotal"]
    if not fits:
        notes.append(f"the 3 inputs ({sum(in_bytes) / 1e9:.1f} GB) plus the output do not fit in the page cache "
                     f"(RAM {mem['MemTotal'] / 1e9:.1f} GB): 3-input runs read partly from disk; the floor is "
                     "measured in the same state (warmed by the same cat)")
    hub_env = dict(os.environ, HUBMIX_CACHE=str(args.cache / "hubmix-cache"))
    out = work / f"{family}-merged.safetensors"
    rec = Recorder(family, logs)
    measure = rec.measure
    runs = max(1, args.runs)

    print(f"{family}: I/O floor", flush=True)
    floors = measure_floor(paths, out_bytes, work, runs)
    print(f"{family}: native kernels (built once per machine)", flush=True)
    native = native_build_seconds(hub_env, work, timed=not args.first_only)

    print(f"{family}: hubmix's first merge as a new user runs it (fresh HUBMIX_CACHE, native kernels copied in; "
          "floor: cat + dd conv=fsync, before each run)", flush=True)
    fresh, fresh_check = first_merge_rows(paths, out, work, hub_env, rec, args.hub_device, runs)
    print(f"{family}: hubmix (each run: files never merged before, then the same files again)", flush=True)
    measure("startup", [], [sys.executable, "-c", "import hubmix.cli, hubmix.flow.merging"])
    check = fresh_check or {"ok": False, "same_keys": False, "same_shapes": False, "checked": 0,
                            "mismatched": ["no output"]}
    checks = {}
    for i in range(0 if args.first_only else runs):
        forget_hashes(hub_env, paths)
        first = hubmix_cmd("lossless", paths, out, args.hub_device)
        if measure("hubmix lossless, first merge", paths, first, hub_env) and i == 0:
            check = spot_check_lossless(out, paths)
        remove_output(out)
        for method, n in HUBMIX_METHODS:
            measure(f"hubmix {method}", paths[:n], hubmix_cmd(method, paths[:n], out, args.hub_device), hub_env)
            if i == 0 and method in dict(NEW_METHODS) and out.exists():
                checks[method] = spot_check_method(method, out, paths[:n])
            remove_output(out)

    need = 1.2 * out_bytes  # load_file maps the inputs; the whole output dict is anonymous memory
    if args.skip_naive or args.first_only:
        notes.append("naive skipped (--skip-naive)")
    elif need > 0.85 * mem_info()["MemAvailable"]:
        notes.append(f"naive skipped: its output alone needs about {need / 1e9:.1f} GB of RAM, more than is "
                     f"available ({mem_info()['MemAvailable'] / 1e9:.1f} GB)")
    else:
        print(f"{family}: naive load-everything script", flush=True)
        notes.append("naive: safetensors' load_file maps the input files lazily (file-backed pages, in VmHWM but not "
                     "RssAnon), so its RssAnon is mostly the whole output held as a dict before save_file")
        for _ in range(runs):
            measure("naive lossless", paths, [sys.executable, str(HERE / "naive_merge.py"), "--method", "lossless",
                                              *map(str, paths), "--out", str(out), "--device", args.device])
            remove_output(out)

    if mecha_py is not None and not args.first_only:
        print(f"{family}: sd-mecha", flush=True)
        notes.append("sd-mecha runs with its default checks (omit_non_finite_inputs, check_finite_output), which "
                     "scan every tensor and cost time; that is how users run it")
        for _ in range(runs):
            measure("sd-mecha weighted_sum", paths[:2], [str(mecha_py), str(HERE / "mecha_merge.py"),
                                                         *map(str, paths[:2]), "--config", MECHA_CONFIG[family],
                                                         "--out", str(out), "--device", args.device])
            remove_output(out)

    busy1, ours1 = user_cpu_s()
    others = max(0.0, (busy1 - busy0) - (ours1 - ours0))
    share = others / ((time.perf_counter() - t0) * (os.cpu_count() or 1))
    if share > 0.10:
        notes.append(f"other programs used {others:.0f} CPU-seconds, {share:.0%} of the machine, during these runs: "
                     "the times are noisy; use --runs 3 or more on a quiet machine")
    med = {name: median(ms) for name, ms in rec.results.items()}
    hub = {m: med[f"hubmix {m}"].wall_s for m, _ in HUBMIX_METHODS if f"hubmix {m}" in med}
    ratios = {f"hubmix {m} / floor{n}": hub[m] / floors[f"floor{n}_s"] for m, n in HUBMIX_METHODS if m in hub}
    if (first := med.get("hubmix lossless, first merge")) is not None:
        ratios["hubmix lossless, first merge / floor3"] = first.wall_s / floors["floor3_s"]
    if "direct_floor3_s" in floors:  # the stricter floor: hubmix itself writes large outputs with O_DIRECT
        for name, key in (("hubmix lossless, first merge", "first merge"), ("hubmix lossless", "again")):
            if name in med:
                ratios[f"hubmix lossless {key} / direct floor3"] = med[name].wall_s / floors["direct_floor3_s"]
    done = [r for r in fresh if "first_s" in r]
    if done:  # issue 21's row: the median of the runs' ratios, each against the floor measured just before it
        ratios["hubmix lossless, first merge, fresh cache / cat+dd floor"] = statistics.median(
            r["first_s"] / r["floor_s"] for r in done)
    if again := [r for r in fresh if "again_s" in r]:
        ratios["hubmix lossless, again, same cache / cat+dd floor"] = statistics.median(
            r["again_s"] / r["floor_s"] for r in again)
    if "naive lossless" in med and "lossless" in hub:
        ratios["naive / hubmix lossless"] = med["naive lossless"].wall_s / hub["lossless"]
    if "sd-mecha weighted_sum" in med and "weighted_sum" in hub:
        ratios["sd-mecha / hubmix weighted_sum"] = med["sd-mecha weighted_sum"].wall_s / hub["weighted_sum"]
    return {"family": family, "inputs": [str(p) for p in paths], "input_bytes": in_bytes, "build_s": build_s,
            "inputs_fit_page_cache": fits, "floor": floors, "native_kernels": native,
            "runs": {k: [asdict(m) for m in v] for k, v in rec.results.items()},
            "median": {k: asdict(v) for k, v in med.items()}, "failures": rec.failures, "other_cpu_s": others,
            "fresh_cache_runs": fresh,
            "ratios": ratios, "check": check, "method_checks": checks, "notes": notes}


# ---- report -------------------------------------------------------------------------------------------------------

def machine_info(mecha_py: Path | None) -> dict:
    import torch

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    mecha = None
    if mecha_py is not None:
        mecha = subprocess.run([str(mecha_py), "-c", "import importlib.metadata as m; print(m.version('sd-mecha'))"],
                               capture_output=True, text=True).stdout.strip() or None
    import hubmix

    src = Path(hubmix.__file__).resolve().parent.parent
    git = subprocess.run(["git", "-C", str(src), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--", "hubmix"], capture_output=True,
                           text=True).stdout.split("\n")
    state = (f"git {git.stdout.strip()}" + (f" + {sum(1 for ln in dirty if ln.strip())} uncommitted file(s) in "
             "hubmix/" if any(ln.strip() for ln in dirty) else "") if git.returncode == 0 else "not a git checkout")
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gb": round(mem_info()["MemTotal"] / 1e9, 1),
            "python": platform.python_version(), "torch": torch.__version__, "hubmix": hubmix.__version__,
            "hubmix_source": f"{src} ({state})", "sd_mecha": mecha, "kernel": platform.release()}


def print_family(r: dict) -> None:
    gb = r["input_bytes"][0] / 1e9
    fl = r["floor"]
    cache = "inputs fit in the page cache" if r["inputs_fit_page_cache"] else "inputs do NOT fit in the page cache"
    print(f"\n=== {r['family']}: 3 inputs x {gb:.2f} GB fp16 single files, output {gb:.2f} GB ({cache})")
    if r["build_s"] is not None:
        print(f"(built the inputs in {r['build_s']:.0f} s)")
    print(f"{'':36} {'wall s':>8}  {'ratio':<34} {'RssAnon MiB':>11} {'VmHWM MiB':>10}")
    for n in (3, 2):
        parts = f"cat {fl[f'read{n}_s']:.2f} s + write+fsync {fl['write_s']:.2f} s"
        print(f"{f'I/O floor, {n} inputs':36} {fl[f'floor{n}_s']:8.2f}  {parts:<34}")
    if fl.get("direct_floor3_s") is not None:
        parts = f"cat {fl['read3_s']:.2f} s + direct write {fl['direct_write_s']:.2f} s"
        print(f"{'I/O floor, 3 inputs, O_DIRECT write':36} {fl['direct_floor3_s']:8.2f}  {parts:<34}")
    for i, row in enumerate(r.get("fresh_cache_runs", [])):
        parts = f"cat {row['cat_s']:.2f} s + dd conv=fsync {row['dd_s']:.2f} s"
        print(f"{f'I/O floor (cat + dd), run {i + 1}':36} {row['floor_s']:8.2f}  {parts:<34}")
        for key, label in (("first_s", "first merge, fresh cache"), ("again_s", "again, same cache")):
            if key in row:
                ratio = f"{row[key] / row['floor_s']:.2f}x that floor (load {row['load1']:.1f})"
                print(f"{f'  lossless 3-way, {label}':36} {row[key]:8.2f}  {ratio:<34}")
    rows = [("python + import hubmix (no torch)", "startup", None),
            ("hubmix lossless 3-way, first merge", "hubmix lossless, first merge",
             "hubmix lossless, first merge / floor3"),
            ("hubmix lossless 3-way, again", "hubmix lossless", "hubmix lossless / floor3"),
            ("hubmix maxdiff 3-way", "hubmix maxdiff", "hubmix maxdiff / floor3"),
            ("hubmix weighted_sum 2-way", "hubmix weighted_sum", "hubmix weighted_sum / floor2"),
            ("naive load-all lossless 3-way", "naive lossless", "naive / hubmix lossless"),
            ("sd-mecha weighted_sum 2-way", "sd-mecha weighted_sum", "sd-mecha / hubmix weighted_sum")]
    rows[5:5] = [(f"hubmix {m} {n}-way", f"hubmix {m}", f"hubmix {m} / floor{n}") for m, n in NEW_METHODS]
    for label, name, ratio in rows:
        fails = r["failures"].get(name, [])
        if fails:
            print(f"{label:36} FAILED {len(fails)} run(s): {fails[0]}")
        m = r["median"].get(name)
        if m is None:
            continue
        rtext = ""
        if ratio in r["ratios"]:
            what = ratio.split(" / ")
            rtext = f"{r['ratios'][ratio]:.2f}x " + ("the I/O floor" if "floor" in what[1] else "hubmix")
        if name == "startup":
            rtext = "part of every row below"
        print(f"{label:36} {m['wall_s']:8.2f}  {rtext:<34} {m['peak_anon_mib']:11.0f} {m['hwm_mib']:10.0f}")
    for m, c in r.get("method_checks", {}).items():
        goal = 3.0 if m in WHOLE_TENSOR else 1.5
        ratio = r["ratios"].get(f"hubmix {m} / floor{dict(NEW_METHODS)[m]}")
        verdict = "" if ratio is None else f"; {ratio:.2f}x the floor ({'within' if ratio <= goal else 'OVER'} " \
                                          f"the {goal}x goal)"
        peak = r["median"].get(f"hubmix {m}", {}).get("peak_anon_mib")
        mem = "" if peak is None else f"; RssAnon {peak:.0f} MiB ({'under' if peak < 1024 else 'OVER'} 1 GiB)"
        bad = f", MISMATCHED {c['mismatched']}" if c["mismatched"] else ""
        print(f"{m}: {c['checked'] - len(c['mismatched'])}/{c['checked']} spot-checked tensors match the method on "
              f"whole tensors{bad}{verdict}{mem}")
    goals = [("never-seen files in a fresh HUBMIX_CACHE (cat + dd floor, median of the runs' ratios)",
              "hubmix lossless, first merge, fresh cache / cat+dd floor", 1.5),
             ("files never merged before", "hubmix lossless, first merge / floor3", 1.5),
             ("the same files again", "hubmix lossless / floor3", 1.25)]
    got = [f"{what} {r['ratios'][k]:.2f}x the I/O floor (goal {goal}x: "
           f"{'met' if r['ratios'][k] <= goal else 'NOT met'})" for what, k, goal in goals if k in r["ratios"]]
    if got:
        print("hubmix lossless 3-way, start-up included: " + "; ".join(got))
    strict = [f"{key} {r['ratios'][f'hubmix lossless {key} / direct floor3']:.2f}x" for key in ("first merge", "again")
              if f"hubmix lossless {key} / direct floor3" in r["ratios"]]
    if strict:
        print("against the stricter floor whose write is O_DIRECT, as hubmix writes (cat + direct write + fsync): "
              + ", ".join(strict))
    nk = r.get("native_kernels") or {}
    if nk.get("build_s") is not None:
        print(f"native kernels: built once per machine in {nk['build_s']:.2f} s ({nk['first_use_s']:.2f} s with "
              "Python start-up and imports); every merge above loaded them from hubmix's cache")
    c = r["check"]
    bad = f"; MISMATCHED: {c['mismatched']}" if c["mismatched"] else ""
    print(f"correctness: output keys/shapes {'match' if c['same_shapes'] else 'DIFFER from'} the inputs; "
          f"{c['checked'] - len(c['mismatched'])}/{c['checked']} spot-checked tensors of hubmix lossless "
          f"byte-identical to torch.where on the inputs{bad}")
    if any(v < 1 for k, v in r["ratios"].items() if "floor" in k):
        print("note: under 1.0x the floor: the floor reads, then writes; a streaming merge overlaps the two, which "
              "shows when reads come from the disk")
    for note in r["notes"]:
        print(f"note: {note}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=["sd15", "sdxl", "all", "flux"], default="sd15",
                    help="flux: full-size fp8 Flux transformers, 3-way lossless vs the I/O floor (flux_bench.py)")
    ap.add_argument("--cache", type=Path, default=Path("~/.cache/hubmix-bench"),
                    help="where the inputs, outputs and the sd-mecha venv live (default ~/.cache/hubmix-bench)")
    ap.add_argument("--runs", type=int, default=1, help="repeat each measurement N times; report medians")
    ap.add_argument("--skip-mecha", action="store_true", help="do not install or run sd-mecha")
    ap.add_argument("--skip-naive", action="store_true", help="do not run the naive load-everything script")
    ap.add_argument("--methods", choices=["seed", "new", "all"], default="seed",
                    help="hubmix methods to time: the seed's (lossless, maxdiff, weighted_sum), the field's (triple_sum, "
                         "sum_twice, train_difference, slerp, ties, dare, model_stock), or all")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="merge device for hubmix (if it has --device), the naive script and sd-mecha")
    ap.add_argument("--first-only", action="store_true",
                    help="only the first merge as a new user runs it (fresh HUBMIX_CACHE with the native kernels "
                         "copied in, against cat + dd conv=fsync) and the same merge again")
    ap.add_argument("--json", type=Path, help="also write every number to this file")
    args, rest = ap.parse_known_args()
    if args.family == "flux":
        import flux_bench

        flux_bench.main([a for a in sys.argv[1:] if a not in ("--family", "flux")])
        return
    if rest:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    global HUBMIX_METHODS
    HUBMIX_METHODS = {"seed": SEED_METHODS, "new": NEW_METHODS, "all": SEED_METHODS + NEW_METHODS}[args.methods]
    args.cache = args.cache.expanduser().resolve()
    args.cache.mkdir(parents=True, exist_ok=True)
    mecha_py, mecha_note = (None, "sd-mecha skipped (--skip-mecha)") if args.skip_mecha else ensure_mecha(args.cache)
    top_notes = []
    args.hub_device = args.device if hubmix_has_device_option() else None
    if args.device != "cpu" and args.hub_device is None:
        top_notes.append(f"hubmix has no --device option: hubmix runs on the CPU, the baselines on {args.device}")
    machine = machine_info(mecha_py)
    header = (f"machine: {machine['cpu']}, {machine['cores']} cores, {machine['ram_gb']} GB RAM, Python "
              f"{machine['python']}, torch {machine['torch']}, hubmix {machine['hubmix']}, sd-mecha "
              f"{machine['sd_mecha'] or '-'}, device {args.device}\nhubmix from {machine['hubmix_source']}")
    print(header, flush=True)
    reports = [bench_family(fam, args, mecha_py, mecha_note)
               for fam in (["sd15", "sdxl"] if args.family == "all" else [args.family])]
    print(f"\n{header}\nruns per number: {args.runs} (median); RssAnon = peak anonymous memory, VmHWM = peak RSS "
          "incl. mapped files")
    for note in top_notes:
        print(f"note: {note}")
    for r in reports:
        print_family(r)
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "args": {k: str(v) for k, v in vars(args).items()},
                                         "notes": top_notes, "families": reports}, indent=2))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
