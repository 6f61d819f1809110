"""The one streaming loop every command uses: tasks -> chunks -> float32 -> method -> output dtype -> sink.

Inputs are memory-mapped views. Large tensors are cut into flat chunks sized from a memory budget. Every built-in
method is element-wise once it knows a few per-tensor statistics: for whole-tensor methods (slerp, ties, dare,
model_stock) the statistics passes run first over the tensor's chunks on the same workers (the loop waits for them;
memory stays at a chunk per worker), then the tensor's chunks are merged with those statistics. Three kinds of
thread overlap the work: a prefetcher maps the next chunks' input pages (so compute never waits on page faults or,
with a cold cache, on the disk), compute workers turn views into output chunks (engine.chunk: fused kernels, eager
torch code, on the chosen device), and the sink writes finished chunks in the background. Chunks in flight are
bounded by bytes, so memory stays within the budget whatever the model's size.

Views are torch tensors, or spans (formats.io.span) when every task of a merge is a copy or has a native kernel
on the CPU (`chunk.span_ready`): then the whole loop runs without torch, which is not even imported.
"""

from __future__ import annotations

import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable

from hubmix.engine.chunk import (Job, compute, compute_on_device, compute_quantized, compute_span, count_nonfinite,
                                 load_views, needs_quant_stat, needs_stats, on_device, prefetch, quant_kernel,
                                 quant_stat, task_stats)
from hubmix.engine.kernels import Kernels
from hubmix.engine.plan import Task
from hubmix.formats.io.span import Span
from hubmix.methods.statistics import BLOCK

if TYPE_CHECKING:
    import torch

DEFAULT_CHUNK = 1 << 22  # elements per chunk when no budget says otherwise
DEFAULT_MAX_MEMORY = 512 << 20  # bytes of chunk buffers in flight (not counting torch itself, ~300 MB)


@dataclass
class Settings:
    workers: int | None = None  # compute threads (default: CPU cores, at most 4)
    max_memory: int = DEFAULT_MAX_MEMORY
    device: str = "auto"  # auto, cpu, cuda, cuda:N, mps
    kernels: str = "auto"  # auto, native, compile, eager (hubmix.kernels)
    quiet: bool = False
    progress: Callable[[int, int], None] | None = None  # (bytes written, bytes in all), from the writer thread
    cancel: threading.Event | None = None  # set: stop between chunks and raise errors.Cancelled


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
              nonfinite: Callable[[Job, list[int]], None] | None = None, spans: bool = False,
              progress: Callable[[int, int], None] | None = None, cancel: threading.Event | None = None) -> None:
    """Compute every job's output chunk and write it: compute on the workers, writes on a background thread.
    Native kernels write into output buffers that circulate between the two (a fresh buffer per chunk would cost
    a page fault per 4 KB of output). `nonfinite(job, counts)` hears of inputs with NaN/inf elements. With
    `spans`, every task must be `span_ready`: views, buffers and results are spans, and torch is not used.
    `progress(done, total)` hears of every chunk written; `cancel`, once set, stops the loop between chunks and
    raises errors.Cancelled (the caller aborts its output)."""
    free: list[Any] = []  # list.pop/append are atomic: no lock needed
    size = max((j.out_nbytes for j in jobs), default=0)  # chunks are bounded by the budget, whole tasks are small

    def produce(job: Job, views: list[Any]) -> Callable[[], None]:
        if not spans and on_device(job, kernels):  # a GPU: enqueued now, finished on the writer's thread
            counts = None if nonfinite is None else count_nonfinite(views)
            if counts is not None and any(counts):
                nonfinite(job, counts)
            wait = compute_on_device(job, views, kernels)

            def finish_device() -> None:
                out, release = wait()
                try:
                    write(job, out)
                finally:
                    release()

            finish_device.cancel = lambda: wait()[1]()  # type: ignore[attr-defined]  # after an error: free the slot
            return finish_device
        try:
            buf = free.pop()
        except IndexError:
            buf = Span.allocate(size) if spans else _torch_buffer(size)
        counts = None if nonfinite is None else [0] * len(views)
        fused = quant_kernel(job, views, kernels) if job.task.quant_scale is not None else None
        if fused is not None:  # merged and encoded (scaled fp8) in one native pass, NaN/inf counted in it
            out = compute_quantized(job, fused, buf, counts)
            used = True
        elif spans:  # the kernel counts NaN/inf in its own pass over the inputs
            store = job.task.store  # a GGUF output: the chunk's blocks, encoded in the same pass
            dest = (Span(buf.owner, buf.address, "uint8", (buf.nbytes,)) if store is not None
                    else Span(buf.owner, buf.address, job.task.dtype_name, (job.numel,)))
            out = compute_span(job, views, kernels, dest, counts, store)
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
              stats=True, spans=spans, progress=progress, cancel=cancel, kernels=kernels)


class _Quiet:
    def update(self, n: int) -> None:
        pass


def _progress_bar(total: int, desc: str, quiet: bool) -> Any:
    """A tqdm bar of bytes written; a quiet run does not import tqdm (0.1 s: it imports asyncio and metadata)."""
    if quiet:
        from contextlib import nullcontext

        return nullcontext(_Quiet())
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, dynamic_ncols=True)


def _torch_buffer(size: int) -> torch.Tensor:
    import torch

    return torch.empty(size, dtype=torch.uint8)


def _pipeline(jobs: list[Job], produce, *, workers: int, desc: str, quiet: bool, in_flight: int | None,
              prefetch_views: bool, stats: bool = False, spans: bool = False,
              progress: Callable[[int, int], None] | None = None, cancel: threading.Event | None = None,
              kernels: Kernels | None = None) -> None:
    """prefetcher -> `workers` compute threads -> one writer thread, with at most `in_flight` jobs between the
    first and the last stage. `cancel` is looked at before each chunk is read and before each is written."""
    in_flight = in_flight or 2 * workers + 2
    total = sum(j.out_nbytes for j in jobs)
    slots = threading.Semaphore(in_flight)
    done_q: queue.Queue = queue.Queue()
    errors: list[BaseException] = []
    stop = threading.Event()
    written = [0]

    def halted() -> bool:  # an error, or the caller's cancel: every stage stops
        return stop.is_set() or (cancel is not None and cancel.is_set())

    def writer() -> None:
        while True:
            item = done_q.get()
            if item is None:
                return
            job, finish = item
            try:
                if not halted():
                    finish()
                    bar.update(job.out_nbytes)
                    written[0] += job.out_nbytes
                    if progress is not None:
                        progress(written[0], total)
                elif hasattr(finish, "cancel"):  # a GPU chunk in flight: wait for it and free its slot
                    finish.cancel()
            except BaseException as e:  # noqa: BLE001 - re-raised on the caller's thread
                errors.append(e)
                stop.set()
            finally:
                slots.release()

    def work(job: Job, views: list[torch.Tensor]) -> None:
        try:
            if not halted():
                done_q.put((job, produce(job, views)))
                return
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
            stop.set()
        slots.release()

    with _progress_bar(total, desc, quiet) as bar:
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
                    if stats and needs_quant_stat(job.task):  # a quantized output's per-tensor scale, first
                        quant_stat(job.task, by_task, pool.submit, kernels, spans)
                    while not slots.acquire(timeout=0.1):
                        if halted():
                            break
                    if halted():
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
    if cancel is not None and cancel.is_set():
        from hubmix.errors import Cancelled

        raise Cancelled(f"{desc}: cancelled after {written[0]} of {total} bytes")
