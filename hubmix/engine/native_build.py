"""Building and loading the native library: once per machine, compiler and source, into hubmix's cache.

- The cache key holds the units' text, the compiler command and its version (`cc --version`'s first line), the
  flags, the machine and the CPU's features: a compiler upgrade or another CPU sharing the folder builds anew.
- `CC` may carry arguments (`CC="gcc -m64"`, `CC="ccache cc"`): it is split like a shell would.
- A build runs in a private folder `build-PID-BOOT-RANDOM` of the cache, removed on every way out (an error,
  KeyboardInterrupt, SIGTERM on the main thread), its compiler processes killed first; a build killed outright
  (SIGKILL, a power cut) leaves its folder, which the next build removes once its process is gone.
- A cached library that does not load (truncated, corrupt, another architecture, a symbol missing) is removed and
  built again, once, instead of leaving every later merge on the slow path. Its file name ends in the sha256 of
  its bytes, checked before it is opened: dlopen of a truncated library can kill the process with SIGBUS instead
  of failing.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterator

from hubmix.cache import cache_root
from hubmix.engine.target import BOOT, _alive

_STALE = re.compile(r"build-(\d+)-([0-9a-f]+)-.+")


def compiler() -> list[str]:
    """The C compiler command: `$CC` split into words (it may carry arguments), else cc, gcc or clang."""
    env = os.environ.get("CC", "").strip()
    if env:
        cmd = shlex.split(env)
        if shutil.which(cmd[0]) is None:
            raise RuntimeError(f"CC={env!r}: {cmd[0]} not found")
        return cmd
    found = next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
    if found is None:
        raise RuntimeError("no C compiler (cc, gcc or clang) on PATH")
    return [found]


@lru_cache(maxsize=8)
def compiler_version(cmd: tuple[str, ...]) -> str:
    """The first line `cmd --version` prints (gcc, clang and their wrappers all answer it)."""
    try:
        r = subprocess.run([*cmd, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RuntimeError(f"{shlex.join(cmd)} --version failed: {e}") from None
    lines = (r.stdout or r.stderr).strip().splitlines()
    if r.returncode != 0 or not lines:
        raise RuntimeError(f"{shlex.join(cmd)} --version failed: {(r.stderr or r.stdout).strip()[-200:]}")
    return lines[0].strip()


def flags() -> list[str]:
    return ["-O3", "-march=native" if platform.machine() in ("x86_64", "AMD64") else "-mcpu=native",
            "-ffp-contract=off", "-fno-fast-math", "-fno-math-errno", "-fPIC"]


def _cpu_signature() -> str:
    """-march=native code must not run on another CPU that shares the cache folder."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def library_stem(units: list[str], cmd: list[str]) -> Path:
    """Where the library of these units, built by `cmd`, is cached: `<stem>-<sha256 of its bytes>.so`."""
    key = hashlib.sha256("\n".join([*units, shlex.join(cmd), compiler_version(tuple(cmd)), *flags(),
                                    platform.machine(), _cpu_signature()]).encode())
    return cache_root() / "native" / f"kernels-{key.hexdigest()[:16]}"


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def cached(stem: Path) -> list[Path]:
    """The complete cached libraries of a stem (their bytes match the digest in their name); the others are
    removed."""
    good = []
    for path in sorted(stem.parent.glob(stem.name + "-*.so")):
        try:
            ok = path.name == f"{stem.name}-{_digest(path)}.so"
        except OSError:
            continue
        if ok:
            good.append(path)
        else:
            path.unlink(missing_ok=True)
    return good


def sweep(folder: Path) -> list[Path]:
    """Remove the build folders of builds whose process is gone (this boot's dead pids, any of an earlier boot)."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        m = _STALE.fullmatch(name)
        if m and (m.group(2) != BOOT or not _alive(int(m.group(1)))):
            shutil.rmtree(folder / name, ignore_errors=True)
            removed.append(folder / name)
    return removed


def build(units: list[str], cmd: list[str], stem: Path) -> Path:
    """Compile every unit (in parallel, as many at once as there are cores), link, and rename into the cache as
    `<stem>-<digest>.so` (atomic). Nothing is left behind on any way out that runs Python code."""
    folder = stem.parent
    folder.mkdir(parents=True, exist_ok=True)
    sweep(folder)
    tmp = Path(tempfile.mkdtemp(prefix=f"build-{os.getpid()}-{BOOT}-", dir=folder))
    procs = _Processes()
    try:
        with _sigterm_raises():
            objects = []
            pending = []
            for i, text in enumerate(units):
                c_file, obj = tmp / f"unit{i}.c", tmp / f"unit{i}.o"
                c_file.write_text(text)
                objects.append(obj)
                pending.append([*cmd, *flags(), "-c", "-o", obj.name, c_file.name])
            # relative names, compiled in the build folder: no temporary path ends up in the library's bytes
            out = tmp / "kernels.so"
            with ThreadPoolExecutor(max(1, min(len(units), os.cpu_count() or 1))) as pool:
                try:
                    _wait_all(pool, procs, pending, tmp)
                    _wait_all(pool, procs, [[*cmd, "-shared", "-o", out.name, *(o.name for o in objects)]], tmp)
                except BaseException:
                    procs.kill()  # before the pool waits for its threads, which wait for their compilers
                    raise
            lib = folder / f"{stem.name}-{_digest(out)}.so"
            os.replace(out, lib)
            return lib
    finally:
        procs.kill()
        shutil.rmtree(tmp, ignore_errors=True)


def _wait_all(pool: ThreadPoolExecutor, procs: "_Processes", cmds: list[list[str]], cwd: Path) -> None:
    """Run the commands on the pool; this thread waits in short steps, so a signal handler runs promptly (a
    signal delivered to a worker thread would otherwise leave it blocked until the compilers finish)."""
    futures = [pool.submit(procs.run, c, cwd) for c in cmds]
    while futures:
        done, rest = wait(futures, timeout=0.1, return_when=FIRST_EXCEPTION)
        for f in done:
            f.result()
        futures = list(rest)


def load(units: list[str], prepare: Callable[[ctypes.CDLL], None]) -> tuple[ctypes.CDLL, bool]:
    """(the library, whether it was built now): the cached one when it loads and `prepare` finds what it needs,
    else built (again) and loaded."""
    cmd = compiler()
    stem = library_stem(units, cmd)
    for lib in cached(stem):
        try:
            return _open(lib, prepare), False
        except (OSError, AttributeError):  # another architecture, a helper missing: build it again
            lib.unlink(missing_ok=True)
    return _open(build(units, cmd, stem), prepare), True


def _open(path: Path, prepare: Callable[[ctypes.CDLL], None]) -> ctypes.CDLL:
    loaded = ctypes.CDLL(str(path))
    prepare(loaded)
    return loaded


class _Processes:
    """The compiler processes of one build, so an interrupted build can kill them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._live: list[subprocess.Popen] = []
        self._stopped = False

    def run(self, cmd: list[str], cwd: Path) -> None:
        with self._lock:
            if self._stopped:
                raise RuntimeError("build stopped")
            p = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            self._live.append(p)
        out, _ = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"{cmd[0]} failed: {(out or '').strip()[-300:]}")

    def kill(self) -> None:
        with self._lock:
            self._stopped = True
            live = list(self._live)
        for p in live:
            if p.poll() is None:
                p.kill()
            p.wait()


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    """On the main thread, with SIGTERM at its default (the process would die without unwinding), SIGTERM raises
    SystemExit(143) for the build's duration, so its cleanup runs; elsewhere the next build sweeps instead."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def terminate(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
