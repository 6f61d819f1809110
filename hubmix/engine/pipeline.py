"""The one streaming loop every command uses: tasks -> chunks -> float32 -> method -> output dtype -> sink.

Inputs are memory-mapped views. Large tensors are cut into flat chunks sized from a memory budget. Every
built-in method is element-wise once it knows a few per-tensor statistics: for whole-tensor methods (slerp, ties,
dare, model_stock) the statistics passes run first over the tensor's chunks on the same workers (the loop waits
for them; memory stays at a chunk per worker), then the tensor's chunks are merged with those statistics. Three kinds of thread overlap the work: a prefetcher maps the next chunks' input pages
(so compute never waits on page faults or, with a cold cache, on the disk), compute workers turn views into output
chunks (fused kernels once compiled, eagerly before that or where compiling is unavailable, on the chosen device),
and the sink writes finished chunks in the background. Chunks in flight are bounded by bytes, so memory stays
within the budget whatever the model's size.

Views are torch tensors, or spans (formats.io.span) when every task of a merge is a copy or has a native kernel
on the CPU (`span_ready`): then the whole loop runs without torch, which is not even imported.
"""

from __future__ import annotations

import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable

from tqdm.auto import tqdm

from hubmix.engine import native
from hubmix.engine.kernels import Kernels
from hubmix.engine.plan import Task
from hubmix.formats.layouts import COPYING
from hubmix.formats.model import TensorRef
from hubmix.formats.io.pages import populate
from hubmix.formats.io.span import Span, is_float
from hubmix.methods.registry import Context
from hubmix.methods.statistics import BLOCK, run_passes

if TYPE_CHECKING:
    import torch

DEFAULT_CHUNK = 1 << 22  # elements per chunk when no budget says otherwise
DEFAULT_MAX_MEMORY = 512 << 20  # bytes of chunk buffers in flight (not counting torch itself, ~300 MB)


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


@dataclass
class Settings:
    workers: int | None = None  # compute threads (default: CPU cores, at most 4)
    max_memory: int = DEFAULT_MAX_MEMORY
    device: str = "auto"  # auto, cpu, cuda, cuda:N, mps
    kernels: str = "auto"  # auto, native, compile, eager (hubmix.kernels)
    quiet: bool = False


def default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def chunk_elements(settings: Settings, workers: int, bytes_per_element: int = 32) -> int:
    """Chunk size from the budget: each worker holds its inputs' float32 copies and the output, and as many
    finished chunks again wait for the writer."""
    per_chunk = settings.max_memory // (2 * workers + 2)
    return max(1 << 16, min(1 << 24, per_chunk // bytes_per_element))


@contextmanager
def parallel_across_chunks(workers: int):
    """With several workers, each torch op runs on one thread: the parallelism is across chunks (and a fused kernel
    compiled meanwhile is built single-threaded to match), not inside each op."""
    import torch

    threads = torch.get_num_threads()
    if workers > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def split_jobs(tasks: Iterable[Task], chunk: int | None = None) -> list[Job]:
    """Jobs in task order; chunks start at multiples of statistics.BLOCK, so per-tensor sums are the same bits
    with any budget."""
    chunk = chunk or DEFAULT_CHUNK
    chunk = max(BLOCK, chunk - chunk % BLOCK)
    jobs = []
    for t in tasks:
        if t.chunkable and t.numel > chunk:
            jobs.extend(Job(t, s, min(s + chunk, t.numel)) for s in range(0, t.numel, chunk))
        else:
            jobs.append(Job(t, 0, t.numel))
    return jobs


def load_views(job: Job, spans: bool = False) -> list[Any]:
    """The job's input tensors in storage dtype: whole canonical views, or flat slices for a chunk; as spans when
    asked (the task must be `span_ready`)."""
    if spans:
        whole = [input_span(r) for r in job.task.refs]
        return [s.flat(job.start, job.stop) for s in whole] if job.task.chunkable else whole  # type: ignore[union-attr]
    views = [r.load() for r in job.task.refs]
    if job.task.chunkable:
        return [v.reshape(-1)[job.start:job.stop] for v in views]
    return views


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
    if any(r.stored_span() is None for r in task.refs):
        return False
    dtypes = [r.dtype_name for r in task.refs]
    if task.method is None:
        return dtypes[0] == task.dtype_name or kernels.native_kernel("convert", dtypes, task.dtype_name) is not None
    if task.method.element is not None or task.method.stats or not native.covers(task.method.name, task.params,
                                                                                  len(dtypes)):
        return False
    return kernels.native_kernel(task.method.name, dtypes, task.dtype_name) is not None


def compute_span(job: Job, views: list[Span], kernels: Kernels, out: Span, counts: list[int] | None = None) -> Span:
    """`compute` on spans: the input itself (a copy in its own dtype), else a native kernel's output in `out`.
    With `counts`, the inputs' NaN/inf elements are counted into it, by the kernel in its own pass."""
    task = job.task
    names = [v.dtype for v in views]
    if task.method is None:
        if names[0] == task.dtype_name:
            if counts is not None:
                counts[:] = count_nonfinite(views)
            return views[0]
        kernel = kernels.native_kernel("convert", names, task.dtype_name)
        params: dict[str, float] = {}
    else:
        kernel = kernels.native_kernel(task.method.name, names, task.dtype_name)
        params = task.params
    assert kernel is not None, f"{task.key}: planned for spans without a native kernel"
    kernels.calls["native"] += 1
    return kernel(views, params, out, Context(f"{task.component}/{task.key}", job.start), counts)


def compute(job: Job, views: list[torch.Tensor], kernels: Kernels | None = None,
            out: torch.Tensor | None = None) -> torch.Tensor:
    """The output chunk, in the task's output dtype, from storage-dtype views; arithmetic in float32. A native
    kernel writes into `out` (a reused flat buffer) when given."""
    task = job.task
    dtype = task.out_dtype
    if task.lora is not None:  # baked LoRAs: the merge in float32 (eager, on the CPU) plus the LoRA delta
        delta = task.lora.take(job.start, job.stop).view(views[0].shape)
        return (_float32(task, views, job.start) + delta).to(dtype)
    if task.method is None:
        x = views[0]
        if x.dtype == dtype:
            return x
        return x.float().to(dtype) if x.dtype.is_floating_point and dtype.is_floating_point else x.to(dtype)
    if task.channels is not None:
        return _float32(task, views).to(dtype)
    kernels = kernels or Kernels("eager")
    device = kernels.torch_device
    params, ctx = task.params, None
    if task.method.element is not None:  # a whole-tensor method's element pass: flat, with the tensor's statistics
        views = [v.reshape(-1) for v in views]
        params = {**params, **(task.stats or {})}
        ctx = Context(f"{task.component}/{task.key}", job.start)
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


def needs_stats(task: Task) -> bool:
    return task.method is not None and bool(task.method.stats) and task.channels is None and task.stats is None


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

    name = str(v.dtype).removeprefix("torch.")
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
        if isinstance(v, Span):
            if v.numel:
                populate(v.address, v.nbytes)
        elif v.device.type == "cpu" and v.numel():
            populate(v.data_ptr(), v.numel() * v.element_size())


# ---- the runner ------------------------------------------------------------------------------------------------

def run(jobs: list[Job], consume: Callable[[Job, list[torch.Tensor]], None], *, workers: int | None = None,
        desc: str = "merging", quiet: bool = False, in_flight: int | None = None) -> None:
    """Run `consume(job, views)` on every job over the same pipeline, with nothing to write. Used by the dry run,
    whose consumer only accumulates statistics."""
    def produce(job: Job, views: list[torch.Tensor]) -> Callable[[], None]:
        consume(job, views)
        return lambda: None

    _pipeline(jobs, produce, workers=workers or default_workers(), desc=desc, quiet=quiet,
              in_flight=in_flight, prefetch_views=True)


def run_merge(jobs: list[Job], write: Callable[[Job, Any], None], kernels: Kernels, *, workers: int,
              desc: str = "merging", quiet: bool = False,
              nonfinite: Callable[[Job, list[int]], None] | None = None, spans: bool = False) -> None:
    """Compute every job's output chunk and write it: compute on the workers, writes on a background thread.
    Native kernels write into output buffers that circulate between the two (a fresh buffer per chunk would cost
    a page fault per 4 KB of output). `nonfinite(job, counts)` hears of inputs with NaN/inf elements. With
    `spans`, every task must be `span_ready`: views, buffers and results are spans, and torch is not used."""
    free: list[Any] = []  # list.pop/append are atomic: no lock needed
    size = max((j.out_nbytes for j in jobs), default=0)  # chunks are bounded by the budget, whole tasks are small

    def produce(job: Job, views: list[Any]) -> Callable[[], None]:
        try:
            buf = free.pop()
        except IndexError:
            buf = Span.allocate(size) if spans else _torch_buffer(size)
        counts = None if nonfinite is None else [0] * len(views)
        if spans:  # the kernel counts NaN/inf in its own pass over the inputs
            dest = Span(buf.owner, buf.address, job.task.dtype_name, (job.numel,))
            out = compute_span(job, views, kernels, dest, counts)
            used = out.address == buf.address
        else:
            if counts is not None:
                counts = count_nonfinite(views)
            out = compute(job, views, kernels, buf[:job.out_nbytes].view(job.task.out_dtype))
            used = out.data_ptr() == buf.data_ptr()
        if counts is not None and any(counts):
            nonfinite(job, counts)  # type: ignore[misc]
        if not used:
            free.append(buf)  # the kernel did not use it (eager, a copy)
            return lambda: write(job, out)

        def finish() -> None:
            write(job, out)
            free.append(buf)

        return finish

    _pipeline(jobs, produce, workers=workers, desc=desc, quiet=quiet, in_flight=None, prefetch_views=True,
              stats=True, spans=spans)


def _torch_buffer(size: int) -> torch.Tensor:
    import torch

    return torch.empty(size, dtype=torch.uint8)


def _pipeline(jobs: list[Job], produce, *, workers: int, desc: str, quiet: bool, in_flight: int | None,
              prefetch_views: bool, stats: bool = False, spans: bool = False) -> None:
    """prefetcher -> `workers` compute threads -> one writer thread, with at most `in_flight` jobs between the
    first and the last stage."""
    in_flight = in_flight or 2 * workers + 2
    total = sum(j.out_nbytes for j in jobs)
    slots = threading.Semaphore(in_flight)
    done_q: queue.Queue = queue.Queue()
    errors: list[BaseException] = []
    stop = threading.Event()

    def writer() -> None:
        while True:
            item = done_q.get()
            if item is None:
                return
            job, finish = item
            try:
                if not stop.is_set():
                    finish()
                    bar.update(job.out_nbytes)
            except BaseException as e:  # noqa: BLE001 - re-raised on the caller's thread
                errors.append(e)
                stop.set()
            finally:
                slots.release()

    def work(job: Job, views: list[torch.Tensor]) -> None:
        try:
            if not stop.is_set():
                done_q.put((job, produce(job, views)))
                return
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
            stop.set()
        slots.release()

    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=quiet,
              dynamic_ncols=True) as bar:
        wthread = threading.Thread(target=writer, name="hubmix-writer", daemon=True)
        wthread.start()
        try:
            by_task: dict[int, list[Job]] = {}
            if stats:
                for job in jobs:
                    by_task.setdefault(id(job.task), []).append(job)
            with ThreadPoolExecutor(workers, thread_name_prefix="hubmix") as pool:
                for job in jobs:
                    if stats and needs_stats(job.task):
                        task_stats(job.task, by_task[id(job.task)], pool.submit)
                    while not slots.acquire(timeout=0.1):
                        if stop.is_set():
                            break
                    if stop.is_set():
                        break
                    views = load_views(job, spans)
                    if prefetch_views:
                        prefetch(views)  # this thread maps pages while the workers compute earlier chunks
                    pool.submit(work, job, views)
        except BaseException:
            stop.set()
            raise
        finally:
            done_q.put(None)
            wthread.join()
    if errors:
        raise errors[0]
