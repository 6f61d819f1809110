"""Chunks through a GPU, overlapped: pinned host buffers, copies on their own stream, double buffering.

A chunk's inputs are memory-mapped (pageable) views: a GPU copies from pageable memory only through a bounce
buffer and synchronously. So each chunk takes a slot (2 by default: double buffering) holding pinned host
buffers; the worker copies the views into them (the CPU's share, which also faults the pages in), then enqueues
on the copy stream the host-to-device copies, on the compute stream (after an event says they landed) the
kernel, and on the copy stream again (after the kernel's event) the device-to-host copy into the slot's pinned
output, and returns at once. The writer thread waits for that last event, writes the pinned bytes and frees the
slot. Meanwhile the next chunk's copies run on the copy stream while this one computes: uploads, kernels and
downloads of neighbouring chunks overlap, and the CPU's copying overlaps all three.

The GPU is reached through a small `Backend` (torch.cuda's streams, events, pinned allocation), so the scheduling
is tested on the CPU with a fake one (tests/test_transfer.py) and the bytes with a backend whose device is the
CPU. Arithmetic on the GPU is element-wise IEEE float32 like the CPU's, so the bytes equal the CPU's.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import torch

SLOTS = 2


class CudaBackend:
    """torch.cuda's streams, events and pinned memory for one device."""

    def __init__(self, device: torch.device):
        import torch

        self.torch = torch
        self.device = device
        self.copy_stream = torch.cuda.Stream(device)
        self.compute_stream = torch.cuda.Stream(device)

    def pinned(self, nbytes: int) -> torch.Tensor:
        return self.torch.empty(nbytes, dtype=self.torch.uint8, pin_memory=True)

    def device_empty(self, nbytes: int) -> torch.Tensor:
        return self.torch.empty(nbytes, dtype=self.torch.uint8, device=self.device)

    def event(self) -> Any:
        return self.torch.cuda.Event()

    def on(self, stream: Any):
        return self.torch.cuda.stream(stream)

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """On the current stream, without blocking the host (pinned memory makes it a true async copy)."""
        dst.copy_(src, non_blocking=True)

    def keep_alive(self, t: torch.Tensor, stream: Any) -> None:
        """A tensor made on one stream and read on another must not be reused before that stream is done."""
        t.record_stream(stream)


@dataclass
class Slot:
    """One chunk in flight: pinned inputs and output on the host, their device copies, and its events."""

    index: int
    pinned_in: list[Any] = field(default_factory=list)
    device_in: list[Any] = field(default_factory=list)
    pinned_out: Any = None
    done: Any = None  # the device-to-host copy's event


def _fit(buf: Any, nbytes: int, make: Callable[[int], Any]) -> Any:
    return buf if buf is not None and buf.numel() >= nbytes else make(max(nbytes, 1))


class DeviceStage:
    """Runs kernels on a GPU for the pipeline's workers, `slots` chunks in flight at most."""

    def __init__(self, backend: Any, slots: int = SLOTS):
        self.backend = backend
        self._free = [Slot(i) for i in range(slots)]
        self._cond = threading.Condition()
        self._launch = threading.Lock()  # one chunk's operations are enqueued together, in order

    def _take(self) -> Slot:
        with self._cond:
            while not self._free:
                self._cond.wait()
            return self._free.pop(0)

    def _give(self, slot: Slot) -> None:
        with self._cond:
            self._free.append(slot)
            self._cond.notify()

    def submit(self, views: list[torch.Tensor], kernel: Callable[[list[torch.Tensor]], torch.Tensor]
               ) -> Callable[[], tuple[torch.Tensor, Callable[[], None]]]:
        """Stage `views` (CPU tensors) through a slot, run `kernel` on their device copies, bring its result back.
        Returns `wait()` -> (the result in pinned host memory, release): call release once the bytes are used."""
        be = self.backend
        slot = self._take()
        try:
            hosts = []
            for i, v in enumerate(views):  # the CPU's share: pageable mapped pages -> pinned
                nbytes = v.numel() * v.element_size()
                if len(slot.pinned_in) <= i:
                    slot.pinned_in.append(None)
                    slot.device_in.append(None)
                slot.pinned_in[i] = _fit(slot.pinned_in[i], nbytes, be.pinned)
                slot.device_in[i] = _fit(slot.device_in[i], nbytes, be.device_empty)
                host = slot.pinned_in[i][:nbytes].view(v.dtype).view(v.shape)
                host.copy_(v)
                hosts.append(host)
            with self._launch:
                uploaded, computed, slot.done = be.event(), be.event(), be.event()
                with be.on(be.copy_stream):
                    dev = []
                    for i, h in enumerate(hosts):
                        d = slot.device_in[i][:h.numel() * h.element_size()].view(h.dtype).view(h.shape)
                        be.copy(d, h)
                        dev.append(d)
                    uploaded.record(be.copy_stream)
                with be.on(be.compute_stream):
                    be.compute_stream.wait_event(uploaded)
                    result = kernel(dev)
                    computed.record(be.compute_stream)
                with be.on(be.copy_stream):
                    be.copy_stream.wait_event(computed)
                    be.keep_alive(result, be.copy_stream)
                    nbytes = result.numel() * result.element_size()
                    slot.pinned_out = _fit(slot.pinned_out, nbytes, be.pinned)
                    out = slot.pinned_out[:nbytes].view(result.dtype).view(result.shape)
                    be.copy(out, result)
                    slot.done.record(be.copy_stream)
        except BaseException:
            self._give(slot)
            raise

        def wait() -> tuple[torch.Tensor, Callable[[], None]]:
            slot.done.synchronize()
            return out, lambda: self._give(slot)

        return wait


class _HostStream:
    def wait_event(self, event: Any) -> None:
        pass


class _HostEvent:
    def record(self, stream: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass


class HostBackend:
    """The CPU standing in for a device (operations run at once): the stage's data path without a GPU, for
    benchmarks/gpu_bench.py --dry and the tests."""

    def __init__(self) -> None:
        self.copy_stream, self.compute_stream = _HostStream(), _HostStream()

    def pinned(self, nbytes: int) -> Any:
        import torch

        return torch.empty(nbytes, dtype=torch.uint8)

    device_empty = pinned

    def event(self) -> _HostEvent:
        return _HostEvent()

    def on(self, stream: Any):
        from contextlib import nullcontext

        return nullcontext()

    def copy(self, dst: Any, src: Any) -> None:
        dst.copy_(src)

    def keep_alive(self, t: Any, stream: Any) -> None:
        pass
