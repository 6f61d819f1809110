"""One job's computation: a task's flat element range, its input views (torch tensors, or spans when the whole
merge runs without torch), and the output chunk made from them, with the inputs' NaN/inf counted on the way.

`pipeline` runs these on its threads; `span_ready` says whether a task can run on spans (formats.io.span): every
input viewable without torch and the result a copy or a native kernel's.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hubmix.engine import native
from hubmix.engine.kernels import Kernels
from hubmix.engine.plan import Task
from hubmix.formats.io.pages import populate
from hubmix.formats.io.span import Packed, Span, dtype_name, is_float
from hubmix.formats.layouts import COPYING
from hubmix.formats.model import TensorRef
from hubmix.methods.registry import Context
from hubmix.methods.statistics import run_passes

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Job:
    task: Task
    start: int  # flat element range of the task's tensor
    stop: int

    @property
    def whole(self) -> bool:
        return self.start == 0 and self.stop == self.task.numel

    @property
    def numel(self) -> int:
        return self.stop - self.start

    @property
    def out_nbytes(self) -> int:
        return self.numel * self.task.out_itemsize


def load_views(job: Job, spans: bool = False) -> list[Any]:
    """The job's input tensors in storage dtype: whole canonical views, or flat slices for a chunk; as spans when
    asked (the task must be `span_ready`)."""
    if spans:  # a quantized input: its stored blocks, which the worker unpacks (unpacked)
        if job.task.chunkable:
            return [r.packed(job.start, job.stop) if r.quant
                    else input_span(r).flat(job.start, job.stop) for r in job.task.refs]  # type: ignore[union-attr]
        return [r.packed(0, r.numel, r.shape) if r.quant else input_span(r) for r in job.task.refs]
    if job.task.chunkable:  # a quantized input dequantizes the chunk's range only
        return [r.load_flat(job.start, job.stop) if r.quant else r.load().reshape(-1)[job.start:job.stop]
                for r in job.task.refs]
    return [r.load() for r in job.task.refs]


def input_span(ref: TensorRef) -> Span | None:
    """A canonical input as a span: a view of the mapped file, or for a transposed or reordered tensor (always
    small: such tasks are never chunked) a native copy in canonical layout."""
    s = ref.span()
    if s is None and ref.place.transform in COPYING and (stored := ref.stored_span()) is not None:
        s = native.transformed(ref.place.transform, stored, ref.shape)
    return s


def span_ready(task: Task, kernels: Kernels) -> bool:
    """Whether the task runs on spans: every input has one, and the result is a plain copy of it (the same dtype,
    or a float dtype the native library converts) or comes from a native kernel of an element-wise method with
    these parameters; no LoRA or channel merge. Spans need the native library: its NaN/inf scan and transposes."""
    if task.lora is not None or task.channels is not None or native.Native.library() is None:
        return False
    if task.quant is not None:  # a quantized output: a format whose native encoders take spans
        from hubmix.formats.quant import codec

        if not codec(task.quant).spans:  # type: ignore[union-attr]
            return False
    if any((r.packed(0, 0) if r.quant else r.stored_span()) is None for r in task.refs):
        return False  # a quantized input needs a native dequantizer, a plain one a mapping
    dtypes = [r.dtype_name for r in task.refs]
    if is_float(dtypes[0]) and dtypes[0] not in native.DTYPES:
        return False  # float64: the native NaN/inf scan does not read it (the torch path counts it)
    if task.method is None:
        return dtypes[0] == task.dtype_name or kernels.native_kernel("convert", dtypes, task.dtype_name) is not None
    if task.method.element is not None or task.method.stats or not native.covers(task.method.name, task.params,
                                                                                  len(dtypes)):
        return False
    return kernels.native_kernel(task.method.name, dtypes, task.dtype_name) is not None


def compute_span(job: Job, job_views: list[Any], kernels: Kernels, out: Span, counts: list[int] | None = None,
                 store: str | None = None) -> Span:
    """`compute` on spans (and Packed quantized inputs, which the kernel dequantizes as it reads them): the input
    itself (a copy in its own dtype), else a native kernel's output in `out`. With `counts`, the inputs' NaN/inf
    elements are counted into it, by the kernel in its own pass. With `store` (a ggml type, Task.store), `out` is
    bytes and gets the output as that type's GGUF blocks, encoded in the same pass."""
    task = job.task
    views = unpacked(job_views, direct=True)
    names = [v.dtype for v in views]
    if task.method is None:
        if names[0] == task.dtype_name and store is None:
            views = unpacked(views)
            if counts is not None:
                counts[:] = count_nonfinite(views)
            if isinstance(job_views[0], Packed):  # unpacked into this worker's scratch: the writer gets a copy
                ctypes.memmove(out.address, views[0].address, views[0].nbytes)
                return Span(out.owner, out.address, out.dtype, views[0].shape)
            return views[0]
        kernel = kernels.native_kernel("convert", names, task.dtype_name)
        params: dict[str, float] = {}
    else:
        kernel = kernels.native_kernel(task.method.name, names, task.dtype_name)
        params = task.params
    assert kernel is not None, f"{task.key}: planned for spans without a native kernel"
    kernels.calls["native"] += 1
    return kernel(views, params, out, Context(f"{task.component}/{task.key}", job.start), counts, store)


def unpacked(views: list[Any], direct: bool = False) -> list[Any]:
    """Packed quantized inputs unpacked to float32 in this worker's scratch memory (one buffer per input
    position, reused by its next chunk); spans as they are; with `direct`, the Packed views a native kernel reads
    as they are (Packed.direct) too."""
    from hubmix.engine.native_quant import scratch

    return [v.into(scratch(f"unpacked{i}", v.blocks * v.block * 4))
            if isinstance(v, Packed) and not (direct and v.direct) else v for i, v in enumerate(views)]


def compute(job: Job, views: list[torch.Tensor], kernels: Kernels | None = None,
            out: torch.Tensor | None = None) -> torch.Tensor:
    """The output chunk, in the task's output dtype, from storage-dtype views; arithmetic in float32. A native
    kernel writes into `out` (a reused flat buffer) when given."""
    task = job.task
    dtype = task.out_dtype
    if task.lora is not None:  # baked LoRAs: the merge in float32 (eager, on the CPU) plus the LoRA delta
        return task.lora.apply(_float32(task, views, job.start), job.start, job.stop).to(dtype)
    if task.method is None:
        x = views[0]
        if x.dtype == dtype:
            return x
        return x.float().to(dtype) if x.dtype.is_floating_point and dtype.is_floating_point else x.to(dtype)
    if task.channels is not None:
        return _float32(task, views).to(dtype)
    kernels = kernels or Kernels("eager")
    device = kernels.torch_device
    views, params, ctx = element_args(job, views)
    if device.type != "cpu":
        views = [v.to(device) for v in views]
    kernel, kind = kernels.function(task.method, [v.dtype for v in views], dtype)
    if kind == "native":
        result = kernel(views, params, out, ctx)
        if result is not None:
            return result
        kernel = kernels.eager(task.method, [v.dtype for v in views], dtype)  # parameters it has no form for
    result = kernel(views, params) if ctx is None else kernel(views, params, ctx)
    return result.to("cpu") if device.type != "cpu" else result


def element_args(job: Job, views: list[Any]) -> tuple[list[Any], dict[str, Any], Context | None]:
    """A method's views, parameters and context for a chunk: a whole-tensor method's element pass runs on flat views
    with the tensor's statistics among its parameters and the chunk's context; other methods as they are."""
    task = job.task
    if task.method is None or task.method.element is None:
        return views, task.params, None
    return ([v.reshape(-1) for v in views], {**task.params, **(task.stats or {})},
            Context(f"{task.component}/{task.key}", job.start))


def quant_kernel(job: Job, views: list[Any], kernels: Kernels) -> tuple[Any, list[Any], dict[str, Any], Context] | None:
    """(kernel, views, params, context) of a native kernel that does a quantized output's work in the pass that
    merges the chunk (native.kernel's `quant`: the chunk's amax, or its codes with the codec's kernel_scale), so
    the float32 results are never stored: the task's own float32 kernel (a conversion for a copy), where its codec
    takes such codes and the chunk is a plain native merge on the CPU. None otherwise: compute, then encode."""
    from hubmix.formats.quant import codec

    task = job.task
    if task.quant is None or task.whole_only or task.lora is not None or task.channels is not None:
        return None
    if codec(task.quant).kernel_scale(0.0) is None:  # type: ignore[union-attr]
        return None
    views = unpacked(views, direct=True)  # GGUF blocks read by the kernel itself
    dtypes = [v.dtype for v in views]
    views, params, ctx = element_args(job, views)
    if task.method is None:
        name = "convert"
        if dtype_name(dtypes[0]) == task.dtype_name:  # the input itself: encoded on the writer thread
            return None
    elif native.covers(task.method.name, params, len(views)):
        name = task.method.name
    else:
        return None
    kernel = kernels.native_kernel(name, dtypes, task.dtype_name)
    if kernel is None:
        return None
    kernels.calls["native"] += 1
    return kernel, views, params, ctx or Context(f"{task.component}/{task.key}", job.start)


def compute_quantized(job: Job, fused: tuple[Any, list[Any], dict[str, Any], Context], buf: Any,
                      counts: list[int] | None) -> Any:
    """The chunk merged and stored as its codec's codes (scaled fp8: float8_e4m3fn) into `buf` (a Span, or a uint8
    tensor), in one native pass (`quant_kernel`); with `counts`, the inputs' NaN/inf counted in it too."""
    kernel, views, params, ctx = fused
    if isinstance(buf, Span):
        dest = Span(buf.owner, buf.address, "float8_e4m3fn", (job.numel,))
    else:
        import torch

        dest = buf[:job.numel].view(torch.float8_e4m3fn)
    return kernel(views, params, dest, ctx, counts, job.task.quant_scale)


def on_device(job: Job, kernels: Kernels) -> bool:
    """Whether the job's method runs through the GPU's stage (engine.transfer): a method task on a CUDA device;
    copies, LoRA bake-ins and channel merges stay on the CPU."""
    task = job.task
    return task.method is not None and task.lora is None and task.channels is None and kernels.stage is not None


def compute_on_device(job: Job, views: list[torch.Tensor], kernels: Kernels):
    """`compute` through the stage: returns at once with `wait()` -> (output chunk in pinned memory, release)."""
    task = job.task
    views, params, ctx = element_args(job, views)
    kernel, _ = kernels.function(task.method, [v.dtype for v in views], task.out_dtype)  # type: ignore[arg-type]
    return kernels.stage.submit(views, lambda dev: kernel(dev, params) if ctx is None else kernel(dev, params, ctx))


def needs_stats(task: Task) -> bool:
    return task.method is not None and bool(task.method.stats) and task.channels is None and task.stats is None


def needs_quant_stat(task: Task) -> bool:
    return task.quant is not None and task.quant_stat is None


def quant_stat(task: Task, by_task: dict[int, list[Job]], submit, kernels: Kernels, spans: bool = False) -> None:
    """The per-tensor statistic a quantized output format needs before its first chunk is encoded: the largest
    |x| of the merged values over every task of the stored tensor (the parts of a fused one), 0 for formats that
    need none; and the scale native kernels store codes with (codec.kernel_scale). The merged values are computed
    here chunk by chunk, and again for writing: where a native kernel computes them (`quant_kernel`), this pass
    keeps only their maximum and the writing pass stores the codes, each in one pass over the inputs."""
    from hubmix.formats.quant import accel, codec

    group = task.quant_group or [task]
    stat = 0.0
    fmt = codec(task.quant)  # type: ignore[arg-type]
    if fmt.needs_amax:  # type: ignore[union-attr]
        for t in group:  # a whole-tensor method's own statistics come first (the merged values depend on them)
            if needs_stats(t) and by_task.get(id(t)):
                task_stats(t, by_task[id(t)], submit)

        def amax(job: Job) -> float:
            views = load_views(job, spans)
            fused = quant_kernel(job, views, kernels)
            if fused is not None:  # the merge reduced to its amax as it runs: nothing stored
                kernel, views, params, ctx = fused
                return kernel(views, params, None, ctx, None, "amax")
            if spans:  # into this worker's scratch buffer: only its maximum is kept
                from hubmix.engine.native_quant import scratch

                buf = scratch("amax", job.numel * 4)
                x = compute_span(job, views, kernels, Span(buf.owner, buf.address, "float32", (job.numel,)))
            else:
                x = compute(job, views, kernels)
            fast = accel.call("amax", x)
            return fast if fast is not None else float(x.float().abs().amax()) if x.numel() else 0.0

        futures = [submit(amax, j) for t in group for j in by_task.get(id(t), [])]
        values = [f.result() for f in futures]
        stat = float("nan") if any(v != v for v in values) else max(values, default=0.0)
    for t in group:
        t.quant_stat, t.quant_scale = stat, fmt.kernel_scale(stat)  # type: ignore[union-attr]


def task_stats(task: Task, jobs: list[Job], submit) -> None:
    """Run the task's statistics passes over its chunks with `submit` (a pool's), in order; sets task.stats."""
    def partial_of(fn, job: Job):
        return fn([v.reshape(-1).float() for v in load_views(job)])

    def chunks(fn):
        futures = [submit(partial_of, fn, j) for j in jobs]
        return [f.result() for f in futures]

    task.stats = run_passes(task.method, chunks, task.params, task.numel)


def _float32(task: Task, views: list[torch.Tensor], start: int = 0) -> torch.Tensor:
    """The task's result in float32, computed eagerly (copies, inpainting channels, LoRA bake-in)."""
    xs = [v.float() for v in views]
    if task.method is None:
        return xs[0]
    name = f"{task.component}/{task.key}"
    if task.channels is None:
        if task.method.element is not None and task.stats is not None:  # a chunk: the tensor's statistics
            flat = [x.reshape(-1) for x in xs]
            return task.method.element(flat, {**task.params, **task.stats}, Context(name, start)).view(xs[0].shape)
        return task.method(xs, task.params, Context(name, start))
    n = task.channels  # inpainting conv_in: merge the shared input channels, keep the rest
    y = task.method([x.narrow(1, 0, n) for x in xs], task.params, Context(name))
    out = xs[0].clone() if xs[0].data_ptr() == views[0].data_ptr() else xs[0]
    out.narrow(1, 0, n).copy_(y)
    return out


# float8 codes that are not finite: e4m3fn has only NaN (S.1111.111), e5m2 has inf and NaN (S.11111.xx)
_FP8_NONFINITE = {"float8_e4m3fn": 0x7F, "float8_e5m2": 0x7C}


def count_nonfinite(views: list[Any]) -> list[int]:
    """NaN/inf elements of each input view, on data the kernel is about to read anyway. The native library's scan
    of the exponent bits where it is loaded (exact in one pass: 1.4-3x faster than aminmax on clean fp16 here, 20x
    and more on fp8 or a view with NaN/inf); else a min/max reduction per view is the cheap check (NaN propagates
    through both, an inf is an extreme; ~4 GB/s on one core against isfinite's ~0.3 GB/s), and the exact count runs
    only on a view that fails it."""
    out = []
    for v in views:
        if isinstance(v, Span):  # a span merge has the library loaded, and only its dtypes (span_ready)
            out.append((native.nonfinite_count(v) or 0) if is_float(v.dtype) else 0)
            continue
        if not v.dtype.is_floating_point or v.numel() == 0:
            out.append(0)
            continue
        n = native.nonfinite_count(v)
        out.append(n if n is not None else _count_with_torch(v))
    return out


def _count_with_torch(v: torch.Tensor) -> int:
    import torch

    name = dtype_name(v.dtype)
    if name in _FP8_NONFINITE:  # torch has no aminmax/isfinite for float8: read the bit patterns
        mask = _FP8_NONFINITE[name]
        return int(((v.view(torch.uint8) & mask) == mask).sum())
    lo, hi = torch.aminmax(v)
    if torch.isfinite(lo) and torch.isfinite(hi):
        return 0
    return int(v.numel() - torch.isfinite(v).sum())


# ---- prefetch: map the next chunks' pages ahead of compute ------------------------------------------------------

def prefetch(views: list[Any]) -> None:
    for v in views:
        if isinstance(v, Packed):
            v = v.raw
        if isinstance(v, Span):
            if v.numel:
                populate(v.address, v.nbytes)
        elif v.device.type == "cpu" and v.numel():
            populate(v.data_ptr(), v.numel() * v.element_size())
