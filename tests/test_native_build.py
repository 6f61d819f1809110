"""The native library's build: the compiler's version in the cache key, CC with arguments, a cached library that
does not load is built again, a killed build leaves no folder (or the next build sweeps it), functions are typed
before other threads see them, and the C under hubmix/engine/csrc compiles as C. Builds here compile only the
helpers units (csrc/scans.c, gguf_quants.c, quant.c), a few seconds, into a private cache."""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from hubmix.engine import native, native_build
from hubmix.engine.native_source import CSRC, csrc_text, helpers_unit

ROOT = Path(__file__).resolve().parents[1]
CC = next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
pytestmark = pytest.mark.skipif(CC is None, reason="no C compiler")


def small_units(variant: str = "") -> list[str]:
    """The units every library must hold for Native._prepare: the helpers, the GGUF block functions and the
    quantized outputs' encoders (fused_run)."""
    return [helpers_unit() + variant, csrc_text("gguf_quants.c"), csrc_text("quant.c")]


@pytest.fixture
def small(monkeypatch, tmp_path):
    """A fresh Native over the helpers unit alone, cached under tmp_path; the real one is restored after."""
    monkeypatch.setenv("HUBMIX_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(native, "source", small_units)
    for name in ("_lib", "_error", "build_seconds"):
        monkeypatch.setattr(native.Native, name, None)
    for name in ("scans", "scan_addresses", "helpers"):
        monkeypatch.setattr(native.Native, name, {})
    return tmp_path / "cache" / "native"


def reset() -> None:
    native.Native._lib = native.Native._error = None


def fake_cc(folder: Path, version: str = "fakecc 1.0", body: str = 'exec "$REAL_CC" "$@"') -> Path:
    """A compiler wrapper script: answers --version with `version`, else runs `body`."""
    script = folder / "fakecc"
    script.write_text(f'#!/bin/sh\nif [ "$1" = "--version" ]; then echo "{version}"; echo second line; exit 0; fi\n'
                      f"{body}\n")
    script.chmod(0o755)
    return script


def test_csrc_is_c_that_compiles_cleanly(tmp_path):
    r = subprocess.run([CC, "-std=c11", "-Wall", "-Wextra", "-Werror", "-fsyntax-only", "scans.c"], cwd=CSRC,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "#include" not in "".join(line for line in helpers_unit().splitlines() if '"' in line), \
        "local includes are inlined into the unit"


def test_fp8_tables_file_is_what_the_generator_gives():
    text = (CSRC / "fp8_tables.h").read_text()
    for name, var in (("float8_e4m3fn", "E4M3"), ("float8_e5m2", "E5M2")):
        body = re.search(rf"{var}\[256\] = \{{(.*?)\}};", text, re.S).group(1)
        assert [int(v, 16) for v in re.findall(r"0x([0-9a-f]{8})u", body)] == native.fp8_float32_bits(name)


def test_the_compiler_version_is_in_the_cache_key(tmp_path, monkeypatch, small):
    monkeypatch.setenv("REAL_CC", CC)
    cc = fake_cc(tmp_path)
    units = native.source()
    first = native_build.library_stem(units, [str(cc)])
    assert native_build.compiler_version((str(cc),)) == "fakecc 1.0"
    fake_cc(tmp_path, "fakecc 2.0")
    native_build.compiler_version.cache_clear()
    assert native_build.library_stem(units, [str(cc)]) != first
    real = native_build.compiler_version((CC,))
    assert real == subprocess.run([CC, "--version"], capture_output=True, text=True).stdout.splitlines()[0].strip()


def test_cc_with_arguments(tmp_path, monkeypatch, small):
    """CC="cc -DHUBMIX_TEST=1" (as "gcc -m64" would be): split like a shell, the build uses both words."""
    monkeypatch.setenv("REAL_CC", CC)
    log = tmp_path / "calls"
    cc = fake_cc(tmp_path, body=f'echo "$@" >> {log}\nexec "$REAL_CC" "$@"')
    monkeypatch.setenv("CC", f"{cc} -DHUBMIX_TEST=1")
    assert native_build.compiler() == [str(cc), "-DHUBMIX_TEST=1"]
    assert native.Native.library() is not None, native.Native.error()
    calls = log.read_text().splitlines()
    assert calls and all(c.startswith("-DHUBMIX_TEST=1 ") for c in calls)
    monkeypatch.setenv("CC", "no-such-compiler -m64")
    with pytest.raises(RuntimeError, match="no-such-compiler not found"):
        native_build.compiler()


def _cached(variant: str) -> Path:
    """Build the helpers unit (marked with `variant`: a library path this process never loaded, as dlopen hands
    back a loaded path's old handle) into the cache without loading it; `native.source` gives that unit."""
    units = small_units(f"/* {variant} */\n")
    native.source = lambda: units
    cmd = native_build.compiler()
    return native_build.build(units, cmd, native_build.library_stem(units, cmd))


def _replace(path: Path, data: bytes) -> None:
    """New bytes under the path as a new file (never overwrite a library in place: a process may map it)."""
    tmp = path.with_suffix(".new")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def test_a_cached_library_that_does_not_load_is_built_again(small):
    elf = (_cached("probe")).read_bytes()
    machine = bytearray(elf)  # the ELF header's e_machine: another architecture's
    machine[18:20] = (183).to_bytes(2, "little") if elf[18:20] != (183).to_bytes(2, "little") else b"\x3e\x00"
    cases = {"truncated": elf[:len(elf) // 3], "garbage": os.urandom(4096), "other-architecture": bytes(machine)}
    for variant, bad in cases.items():
        lib = _cached(variant)
        _replace(lib, bad)
        reset()
        assert native.Native.library() is not None, (variant, native.Native.error())
        assert native.Native.build_seconds is not None
        (new,) = native_build.cached(lib.with_name(lib.name.rsplit("-", 1)[0]))
        assert new.read_bytes() != bad
    assert native.nonfinite_count(__import__("torch").tensor([1.0, float("nan")])) == 1


def test_a_library_that_loads_without_an_expected_function_is_built_again(small, tmp_path):
    """A complete library (its digest matches) that loads but lacks a helper is replaced."""
    import hashlib

    lib = _cached("missing")
    (tmp_path / "x.c").write_text("int nothing(void) { return 0; }\n")
    subprocess.run([CC, "-shared", "-fPIC", "-o", str(tmp_path / "x.so"), str(tmp_path / "x.c")], check=True)
    data = (tmp_path / "x.so").read_bytes()
    lib.unlink()
    other = lib.with_name(f"{lib.name.rsplit('-', 1)[0]}-{hashlib.sha256(data).hexdigest()[:16]}.so")
    other.write_bytes(data)
    with pytest.raises(AttributeError):
        native.Native._prepare(ctypes.CDLL(str(tmp_path / "x.so")))
    reset()
    assert native.Native.library() is not None, native.Native.error()
    assert "block_dots" in native.Native.helpers and not other.exists()


_BUILD = """
import sys
sys.path.insert(0, sys.argv[1])
from hubmix.engine import native
from hubmix.engine.native_source import csrc_text, helpers_unit
native.source = lambda: [helpers_unit(), csrc_text("gguf_quants.c")]
native.Native.library()
print(native.Native.error())
"""


def _start_slow_build(tmp_path: Path) -> tuple[subprocess.Popen, Path, Path]:
    pids = tmp_path / "pids"
    cc = fake_cc(tmp_path, body=f'echo $$ >> {pids}\nexec sleep 300')
    env = {**os.environ, "HUBMIX_CACHE": str(tmp_path / "cache"), "CC": str(cc)}
    p = subprocess.Popen([sys.executable, "-c", _BUILD, str(ROOT)], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    folder = tmp_path / "cache" / "native"
    deadline = time.monotonic() + 60
    while not (pids.exists() and list(folder.glob("build-*"))):
        assert p.poll() is None and time.monotonic() < deadline, p.communicate()
        time.sleep(0.05)
    return p, folder, pids


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] == "Z"


def test_a_terminated_build_leaves_no_folder_and_no_compiler(tmp_path):
    p, folder, pids = _start_slow_build(tmp_path)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 128 + signal.SIGTERM, (out, err)
    assert list(folder.glob("build-*")) == []
    assert not any(_alive(int(x)) for x in pids.read_text().split())


def test_a_killed_build_is_swept_by_the_next(tmp_path, small, monkeypatch):
    monkeypatch.setenv("HUBMIX_CACHE", str(tmp_path / "cache"))
    p, folder, pids = _start_slow_build(tmp_path)
    p.kill()
    p.communicate(timeout=60)
    for x in pids.read_text().split():  # its compilers were orphaned: end them (our own test's processes)
        try:
            os.kill(int(x), signal.SIGKILL)
        except ProcessLookupError:
            pass
    stale = list(folder.glob("build-*"))
    assert stale, "SIGKILL gives no chance to clean up"
    mine = folder / f"build-{os.getpid()}-{native_build.BOOT}-live"  # a live build of another thread: kept
    mine.mkdir()
    assert native.Native.library() is not None, native.Native.error()
    assert list(folder.glob("build-*")) == [mine]


def test_kernels_are_typed_before_other_threads_see_them(monkeypatch):
    """Two threads call a fresh kernel at once; setting a function's types is slow here, so a function published
    before its types were set would be called untyped."""
    import torch

    errors = []

    class Fn:
        def __init__(self):
            object.__setattr__(self, "argtypes", None)

        def __setattr__(self, name, value):
            time.sleep(0.2)
            object.__setattr__(self, name, value)

        def __call__(self, *args):
            if self.argtypes is None:
                errors.append("called before its argument types were set")

    class Lib:
        def __getitem__(self, name):
            return Fn()

        def __getattr__(self, name):
            return self[name]

    monkeypatch.setattr(native.Native, "library", classmethod(lambda cls: Lib()))
    run = native.kernel("weighted_sum", [torch.float32] * 2, torch.float32)
    x = torch.zeros(8)
    barrier = threading.Barrier(2)

    def call():
        barrier.wait()
        run([x, x], {"alpha": 0.5}, torch.empty(8))

    threads = [threading.Thread(target=call) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
