"""The one streaming loop every command uses: tasks -> chunks -> float32 -> method -> output dtype -> sink.

Inputs are memory-mapped views, so a chunk costs only the float32 copies the method needs; large tensors are cut
into flat chunks (every built-in method is element-wise), a small pool of threads works on several chunks at once
(torch and pwrite release the GIL), and a bounded number of chunks is in flight, so memory stays bounded whatever
the model's size. The sink (an output router or the dry-run statistics) receives each chunk's result.
"""

from __future__ import annotations

import os
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from tqdm.auto import tqdm

from .plan import Task

DEFAULT_CHUNK = 1 << 22  # elements per chunk: 16 MB of float32 per input


@dataclass(frozen=True)
class Job:
    task: Task
    start: int  # flat element range of the task's tensor
    stop: int

    @property
    def whole(self) -> bool:
        return self.start == 0 and self.stop == self.task.numel

    @property
    def out_nbytes(self) -> int:
        return (self.stop - self.start) * self.task.out_dtype.itemsize


def split_jobs(tasks: Iterable[Task], chunk: int | None = None) -> list[Job]:
    chunk = chunk or DEFAULT_CHUNK
    jobs = []
    for t in tasks:
        if t.chunkable and t.numel > chunk:
            jobs.extend(Job(t, s, min(s + chunk, t.numel)) for s in range(0, t.numel, chunk))
        else:
            jobs.append(Job(t, 0, t.numel))
    return jobs


def load_views(job: Job) -> list[torch.Tensor]:
    """The job's input tensors in storage dtype: whole canonical views, or flat slices for a chunk."""
    views = [r.load() for r in job.task.refs]
    if job.task.chunkable:
        return [v.reshape(-1)[job.start:job.stop] for v in views]
    return views


def compute(job: Job, views: list[torch.Tensor]) -> torch.Tensor:
    """The output chunk, in the task's output dtype, from storage-dtype views; arithmetic in float32."""
    task = job.task
    dtype = task.out_dtype
    if task.method is None:
        x = views[0]
        if x.dtype == dtype:
            return x
        return x.float().to(dtype) if x.dtype.is_floating_point and dtype.is_floating_point else x.to(dtype)
    xs = [v.float() for v in views]
    if task.channels is not None:
        n = task.channels
        y = task.method([x.narrow(1, 0, n) for x in xs], task.params)
        out = xs[0].clone() if xs[0].data_ptr() == views[0].data_ptr() else xs[0]
        out.narrow(1, 0, n).copy_(y)
        return out.to(dtype)
    return task.method(xs, task.params).to(dtype)


def default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def run(jobs: list[Job], consume: Callable[[Job], None], *, workers: int | None = None, desc: str = "merging",
        quiet: bool = False, in_flight: int | None = None) -> None:
    """Run `consume` on every job over a thread pool, a bounded number at a time, with a progress bar over bytes."""
    workers = workers or default_workers()
    in_flight = in_flight or workers * 2
    total = sum(j.out_nbytes for j in jobs)
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=quiet,
              dynamic_ncols=True) as bar:
        if workers == 1:
            for j in jobs:
                consume(j)
                bar.update(j.out_nbytes)
            return
        with ThreadPoolExecutor(workers, thread_name_prefix="hubmix") as pool:
            pending: dict[Future, Job] = {}
            it = iter(jobs)
            try:
                for j in it:
                    pending[pool.submit(consume, j)] = j
                    if len(pending) >= in_flight:
                        _drain(pending, bar, FIRST_COMPLETED)
                _drain(pending, bar, None)
            except BaseException:
                for f in pending:
                    f.cancel()
                raise


def _drain(pending: dict[Future, Job], bar: tqdm, until) -> None:
    done, _ = wait(list(pending), return_when=until or "ALL_COMPLETED")
    for f in done:
        job = pending.pop(f)
        f.result()  # re-raises a worker's exception here
        bar.update(job.out_nbytes)
