"""How one chunk is computed, fastest first: a native fused kernel (built-in methods, hubmix.native), a
torch.compile fused kernel (any registered method, once compiled), or the method's own torch code run eagerly in
cache-sized pieces. All three give the same bytes (the tests compare them), so the choice is only about speed.

The eager and compiled paths run the same Python function: stored views in, output dtype out, float32 arithmetic
in between. inductor compiles CPU code without floating-point contraction or unsafe math, and parameters stay
runtime floats (no recompiling per alpha). Selection methods pick from the stored values directly when the output
dtype is the candidates' own, so a value taken is the value stored.

Fusing pays only on large merges: a native build costs about 8.5 s once per machine, torch.compile several
seconds per process even with its persistent cache, so `auto` uses them only above a size, compiling on a
background thread while chunks run eagerly; where they are unavailable (no compiler, an unsupported platform, an
error) everything runs eagerly.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, Callable

from . import native
from hubmix.cache import cache_root
from hubmix.formats.io.span import FP8, dtype_name, torch_dtype
from hubmix.methods import Method

if TYPE_CHECKING:
    import torch

SUBCHUNK = 1 << 18  # eager pieces: ~1 MB of float32 per intermediate, so a chain of ops stays in cache
NATIVE_MIN_ELEMENTS = 20_000_000  # below this, building the native library once is not worth a second
COMPILE_MIN_ELEMENTS = 500_000_000  # torch.compile's per-process start-up must be repaid
MODES = ("auto", "native", "compile", "eager")

ChunkFn = Callable[..., "torch.Tensor"]
Kernel = Callable[[list["torch.Tensor"], dict[str, float]], "torch.Tensor"]


def selects_in_storage(method: Method, dtypes: list[torch.dtype], out_dtype: torch.dtype) -> bool:
    """Whether the output can be picked straight from the stored candidates (no float round trip)."""
    if method.choose is None or method.candidate_names is None:
        return False
    x, y = method.candidate_names(len(dtypes))
    return dtypes[x] == dtypes[y] == out_dtype


def chunk_function(method: Method, dtypes: list[torch.dtype], out_dtype: torch.dtype) -> ChunkFn:
    """The whole computation of one chunk as one function of the stored views: what eager runs and what
    torch.compile fuses into a single pass over memory."""
    import torch

    if method.element is not None:  # a whole-tensor method's element pass: statistics are in params
        element = method.element

        def whole(*views: torch.Tensor, ctx, **params) -> torch.Tensor:
            return element([v.float() for v in views], params, ctx).to(out_dtype)

        return whole
    if selects_in_storage(method, dtypes, out_dtype):
        choose = method.choose
        x_i, y_i = method.candidate_names(len(dtypes))  # type: ignore[misc]

        def select(*views: torch.Tensor, **params: float) -> torch.Tensor:
            xs = [v.float() for v in views]
            return torch.where(choose(xs, **params), views[x_i], views[y_i])  # type: ignore[misc]

        return select
    fn = method.fn

    def arithmetic(*views: torch.Tensor, **params: float) -> torch.Tensor:
        return fn([v.float() for v in views], **params).to(out_dtype)

    return arithmetic


def eager_kernel(fn: ChunkFn, out_dtype: torch.dtype, device: torch.device) -> Kernel:
    """`fn` over flat CPU views in cache-sized pieces into one output buffer; on a GPU, in one go. A whole-tensor
    method's element pass also gets each piece's place in the tensor (`ctx`)."""
    import torch

    def run(views: list[torch.Tensor], params: dict[str, float], ctx=None) -> torch.Tensor:
        n = views[0].numel()
        where = {} if ctx is None else {"ctx": ctx}
        if device.type != "cpu" or n <= SUBCHUNK or views[0].dim() != 1:
            return fn(*views, **where, **params)
        out = torch.empty(n, dtype=out_dtype)
        for s in range(0, n, SUBCHUNK):
            e = min(s + SUBCHUNK, n)
            if ctx is not None:
                where["ctx"] = ctx.at(s)
            out[s:e] = fn(*(v[s:e] for v in views), **where, **params)
        return out

    return run


def compiler_available() -> bool:
    if sys.platform not in ("linux", "darwin"):
        return False
    cxx = os.environ.get("CXX") or "c++"
    return any(shutil.which(c) for c in (cxx, "g++", "clang++"))


Signature = tuple[Method, list[Any], Any]  # method, input dtypes, output dtype (torch dtypes or their names)


class Kernels:
    """Hands out the kernel for each (method, input dtypes, output dtype) and counts which kind ran."""

    def __init__(self, mode: str = "auto", *, device: torch.device | None = None, total_elements: int = 0,
                 log: Callable[[str], None] | None = None):
        """`device` None is the CPU, without importing torch (a merge on spans may never need it)."""
        if mode not in MODES:
            raise ValueError(f"kernels mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.device = device
        self.log = log or (lambda msg: None)
        cpu = device is None or device.type == "cpu"
        self.use_native = cpu and (mode == "native" or (mode == "auto" and total_elements >= NATIVE_MIN_ELEMENTS))
        self.use_compile = cpu and (mode == "compile" or (mode == "auto" and total_elements >= COMPILE_MIN_ELEMENTS))
        self._kernels: dict[tuple, tuple[Kernel, str]] = {}
        self._native: dict[tuple, Callable[..., Any] | None] = {}
        self._compiled: dict[tuple, Kernel] = {}
        self._thread: threading.Thread | None = None
        self._quant = False  # the native encoders of quantized outputs are installed (formats.quant.accel)
        self.calls = {"native": 0, "compiled": 0, "eager": 0}
        self.compile_seconds: float | None = None
        self.native_build_seconds: float | None = None
        self._stage: Any = None

    @property
    def stage(self) -> Any:
        """On a CUDA device, the DeviceStage that overlaps copies and kernels (engine.transfer); else None."""
        if self._stage is None and self.device is not None and self.device.type == "cuda":
            from hubmix.engine.transfer import CudaBackend, DeviceStage

            self._stage = DeviceStage(CudaBackend(self.device))
        return self._stage

    @stage.setter
    def stage(self, value: Any) -> None:
        self._stage = value

    @property
    def torch_device(self) -> torch.device:
        if self.device is None:
            import torch

            self.device = torch.device("cpu")
        return self.device

    @staticmethod
    def key(method: Method | str, dtypes: list[Any], out_dtype: Any) -> tuple:
        name = method if isinstance(method, str) else method.name
        return (name, tuple(dtype_name(d) for d in dtypes), dtype_name(out_dtype))

    def native_kernel(self, method: str, dtypes: list[Any], out_dtype: Any) -> Callable[..., Any] | None:
        """The native kernel for a signature (a method's name, or "convert" for a copy into another dtype) when
        this merge uses native kernels and the library has one; None otherwise."""
        if not self.use_native:
            return None
        k = self.key(method, dtypes, out_dtype)
        if k not in self._native:
            self._native[k] = native.kernel(method, dtypes, out_dtype)
        return self._native[k]

    def start(self, signatures: list[Signature], quantized: bool = False) -> None:
        """Prepare fused kernels for the signatures a merge uses: native ones now (a build costs seconds,
        once), torch.compile for the rest on a background thread."""
        rest = signatures
        if self.use_native and signatures:
            rest = []
            for method, dtypes, out_dtype in signatures:
                k = self.native_kernel(method.name, dtypes, out_dtype)
                if k is None:
                    rest.append((method, dtypes, out_dtype))
                else:
                    self._kernels[self.key(method, dtypes, out_dtype)] = (k, "native")
            if native.Native.build_seconds is not None:
                self.native_build_seconds = native.Native.build_seconds
            native.install_dropmask()
            if native.Native.error():
                self.log(f"native kernels unavailable ({native.Native.error()}); using the next fastest")
            elif self.mode == "native" and rest:
                self.log(f"no native kernel for {', '.join(sorted({m.name for m, _, _ in rest}))} with these "
                         f"dtypes; those run eagerly")
        if self.use_native and quantized:  # quantized outputs' encoders (formats.quant) in C while this merge runs
            from hubmix.engine import native_quant

            self._quant = native_quant.install()
        rest = [sig for sig in rest if sig[0].element is None]  # their statistics and contexts are not traced
        # inductor cannot promote fp8 (torch.where, mixed arithmetic): fp8 chunks run native or eagerly
        rest = [sig for sig in rest if not any(dtype_name(d) in FP8 for d in (*sig[1], sig[2]))]
        if self.use_compile and rest:
            if not compiler_available():
                self.log("torch.compile unavailable (no C++ compiler); running eagerly")
                return
            self._thread = threading.Thread(target=self._compile_all, args=(rest,), name="hubmix-compile",
                                            daemon=True)
            self._thread.start()
            if self.mode == "compile":
                self._thread.join()  # asked for fused kernels: every chunk runs fused

    def _compile_all(self, signatures: list[Signature]) -> None:
        import torch

        t0 = time.perf_counter()
        try:
            _configure_inductor()
            for method, names, out_name in signatures:
                dtypes = [torch_dtype(d) for d in names]
                out_dtype = torch_dtype(out_name)
                fn = torch.compile(chunk_function(method, dtypes, out_dtype), dynamic=True)
                probe = [torch.zeros(4096, dtype=d) for d in dtypes]  # compile now, off the critical path
                with torch.no_grad():
                    fn(*probe, **method.resolve_params({}, len(dtypes), "compile"))
                self._compiled[self.key(method, dtypes, out_dtype)] = \
                    lambda views, params, fn=fn: fn(*views, **params)
            self.compile_seconds = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001 - any failure: the eager path is equally correct
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            self.log(f"torch.compile unavailable ({type(e).__name__}: {msg}); running eagerly")

    def close(self) -> None:
        """Wait for a compile still running: a daemon thread inside torch.compile at interpreter exit aborts the
        process. Only merges that started one (large, with a method without a native kernel) ever wait here."""
        if self._quant:
            from hubmix.engine import native_quant

            native_quant.uninstall()
            self._quant = False
        if self._thread is not None and self._thread.is_alive():
            self.log("waiting for torch.compile to finish before exiting (it outlasted the merge)")
            self._thread.join()

    def function(self, method: Method, dtypes: list[torch.dtype], out_dtype: torch.dtype) -> tuple[Kernel, str]:
        """(kernel, kind) for one chunk: kind is native, compiled or eager."""
        k = self.key(method, dtypes, out_dtype)
        hit = self._kernels.get(k)
        if hit is None or hit[1] == "eager":
            compiled = self._compiled.get(k)
            if compiled is not None:
                hit = self._kernels[k] = (compiled, "compiled")
            elif hit is None:
                hit = self._kernels[k] = (self.eager(method, dtypes, out_dtype), "eager")
        self.calls[hit[1]] += 1  # approximate under threads; only reported
        return hit

    def eager(self, method: Method, dtypes: list[torch.dtype], out_dtype: torch.dtype) -> Kernel:
        return eager_kernel(chunk_function(method, dtypes, out_dtype), out_dtype, self.torch_device)


def _configure_inductor() -> None:
    """A persistent compile cache under hubmix's cache folder (unless the user chose one), no worker pool."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_root() / "inductor"))
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    import torch._dynamo

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
