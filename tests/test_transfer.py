"""The GPU path's scheduling, on the CPU: a fake device backend logs every stream operation, so the order a GPU
would see (pinned staging, uploads on the copy stream, the kernel after the upload's event, the download after the
kernel's event, two chunks in flight, a slot reused only once its bytes were written) is checked here; a whole
merge through the stage gives the CPU's bytes. Also the device choice: a CPU-only torch keeps the torch-free path
on a machine with GPU device nodes, and the memory query asks only the chosen device."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import pytest
import torch

from hubmix.engine import devices
from hubmix.engine.transfer import DeviceStage


class FakeStream:
    def __init__(self, name, log):
        self.name, self.log = name, log

    def wait_event(self, event):
        self.log.append(("wait", self.name, event.name))


class FakeEvent:
    count = 0

    def __init__(self, log):
        FakeEvent.count += 1
        self.name, self.log, self.stream = f"e{FakeEvent.count}", log, None

    def record(self, stream):
        self.stream = stream.name
        self.log.append(("record", stream.name, self.name))

    def synchronize(self):
        self.log.append(("sync", self.name))


class FakeBackend:
    """The CPU as the 'device': operations run at once (so the bytes are real) and are logged."""

    def __init__(self):
        self.log: list[tuple] = []
        self.copy_stream, self.compute_stream = FakeStream("copy", self.log), FakeStream("compute", self.log)
        self.current = None
        self.pinned_made = []

    def pinned(self, nbytes):
        t = torch.empty(nbytes, dtype=torch.uint8)
        self.pinned_made.append(t)
        self.log.append(("pin", nbytes))
        return t

    def device_empty(self, nbytes):
        return torch.empty(nbytes, dtype=torch.uint8)

    def event(self):
        return FakeEvent(self.log)

    @contextmanager
    def on(self, stream):
        old, self.current = self.current, stream.name
        try:
            yield
        finally:
            self.current = old

    def copy(self, dst, src):
        pinned_src = any(src.untyped_storage().data_ptr() == p.untyped_storage().data_ptr() for p in self.pinned_made)
        self.log.append(("copy", self.current, "h2d" if pinned_src else "d2h"))
        dst.copy_(src)

    def keep_alive(self, t, stream):
        self.log.append(("keep", stream.name))


def kernel(log):
    def run(dev):
        log.append(("kernel",))
        a, b, c = (x.float() for x in dev)
        return torch.where((a - b).abs() <= (a - c).abs(), dev[1], dev[2])
    return run


def test_one_chunk_in_stream_order_and_its_bytes():
    be = FakeBackend()
    stage = DeviceStage(be)
    xs = [torch.randn(1000).half() for _ in range(3)]
    wait = stage.submit(xs, kernel(be.log))
    out, release = wait()
    a, b, c = (x.float() for x in xs)
    assert torch.equal(out, torch.where((a - b).abs() <= (a - c).abs(), xs[1], xs[2]))
    ops = [e for e in be.log if e[0] != "pin"]
    assert ops[:3] == [("copy", "copy", "h2d")] * 3
    up = ops[3]
    assert up[:2] == ("record", "copy")
    assert ops[4] == ("wait", "compute", up[2]) and ops[5] == ("kernel",)
    done_compute = ops[6]
    assert done_compute[:2] == ("record", "compute")
    assert ops[7] == ("wait", "copy", done_compute[2]) and ops[8] == ("keep", "copy")
    assert ops[9] == ("copy", "copy", "d2h") and ops[10][:2] == ("record", "copy") and ops[11] == ("sync", ops[10][2])
    release()


def test_two_chunks_in_flight_and_slots_reused_after_release():
    be = FakeBackend()
    stage = DeviceStage(be, slots=2)
    chunks = [[torch.randn(512).half() for _ in range(3)] for _ in range(3)]
    w0 = stage.submit(chunks[0], kernel(be.log))
    w1 = stage.submit(chunks[1], kernel(be.log))  # enqueued while chunk 0 is in flight: nothing waited yet
    assert not any(e[0] == "sync" for e in be.log)
    pins = len(be.pinned_made)
    third = []
    t = threading.Thread(target=lambda: third.append(stage.submit(chunks[2], kernel(be.log))))
    t.start()
    time.sleep(0.3)
    assert not third, "a third chunk waits for a free slot"
    out0, release0 = w0()
    out0 = out0.clone()
    release0()
    t.join(5)
    assert third
    assert len(be.pinned_made) == pins, "the freed slot's pinned buffers are reused"
    out1, release1 = w1()
    out2, release2 = third[0]()
    for out, xs in ((out0, chunks[0]), (out1, chunks[1]), (out2, chunks[2])):
        a, b, c = (x.float() for x in xs)
        assert torch.equal(out, torch.where((a - b).abs() <= (a - c).abs(), xs[1], xs[2]))
    release1()
    release2()


def test_an_error_in_a_kernel_frees_its_slot():
    be = FakeBackend()
    stage = DeviceStage(be, slots=1)

    def broken(dev):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        stage.submit([torch.zeros(4)], broken)
    out, release = stage.submit([torch.zeros(4)] * 3, kernel(be.log))()  # would block if the slot were lost
    release()


def test_a_merge_through_the_stage_gives_the_cpu_bytes(zoo, tmp_path, monkeypatch):
    """Every method chunk of a real merge (chunked small) goes through a stage whose device is the CPU: the same
    files as the CPU path, and every chunk used the stage."""
    import hubmix
    from hubmix import Recipe
    from hubmix.engine import kernels as kmod
    from hubmix.engine import pipeline as engine
    from hubmix.engine.pipeline import Settings

    inputs = [str(zoo.diffusers("sd1", s, dtype="fp16")) for s in (1, 2, 3)]
    recipe = Recipe(models=inputs, method="lossless", params={"alpha": 0.9, "beta": 1.1})
    hubmix.merge(recipe, out=tmp_path / "cpu", quiet=True, settings=Settings(kernels="eager"))
    be = FakeBackend()
    stage = DeviceStage(be)
    monkeypatch.setattr(kmod.Kernels, "stage", property(lambda self: stage))
    monkeypatch.setattr(engine, "chunk_elements", lambda *a, **k: 4096)
    hubmix.merge(recipe, out=tmp_path / "staged", quiet=True, settings=Settings(kernels="eager", workers=2))
    files = sorted((tmp_path / "cpu").rglob("*.safetensors"))
    assert files
    for f in files:
        assert f.read_bytes() == (tmp_path / "staged" / f.relative_to(tmp_path / "cpu")).read_bytes(), f
    assert sum(1 for e in be.log if e[:2] == ("wait", "compute")) > 10, "chunks went through the stage"


# ---- the device choice ------------------------------------------------------------------------------------------

def test_cpu_only_torch_keeps_the_torch_free_path_beside_gpu_device_nodes(monkeypatch, tmp_path):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(devices.glob, "glob", lambda pattern: ["/dev/nvidia0"] if "nvidia" in pattern else [])
    monkeypatch.setattr(devices.os.path, "exists", lambda p: p == "/dev/kfd" or p == "/dev/nvidiactl")
    if torch.version.cuda is None and torch.version.hip is None:
        assert devices.torch_builds() == (None, None)
        assert devices.plain_cpu("auto")
    fake = tmp_path / "torch"
    fake.mkdir()
    (fake / "version.py").write_text("__version__ = '2.13.0+cu128'\ncuda: Optional[str] = '12.8'\nhip = None\n")
    monkeypatch.setattr(devices, "_torch_folder", lambda: fake)
    assert devices.torch_builds() == ("12.8", None)
    assert not devices.plain_cpu("auto"), "a CUDA torch beside device nodes: ask torch"
    monkeypatch.setattr(devices.glob, "glob", lambda pattern: [])
    monkeypatch.setattr(devices.os.path, "exists", lambda p: False)
    assert devices.plain_cpu("auto"), "no device nodes: the CPU, whatever torch can do"


def test_the_memory_query_asks_the_chosen_device_only(monkeypatch):
    import accelerate.utils.modeling as modeling

    asked = []
    monkeypatch.setattr(modeling, "get_max_memory", lambda *a, **k: pytest.fail("queries every device"))
    monkeypatch.setattr(modeling, "get_torch_accelerator_backend", lambda: ("cuda", "module"), raising=False)
    monkeypatch.setattr(modeling, "get_accelerator_free_memory",
                        lambda module, i: asked.append((module, i)) or 10 << 30, raising=False)
    assert devices.device_budget(torch.device("cuda", 3), 4 << 30) == 4 << 30
    assert devices.device_budget(torch.device("cuda", 1), 64 << 30) == int((10 << 30) * 0.8)
    assert asked == [("module", 3), ("module", 1)]
    assert devices.device_budget(None, 123) == 123 and devices.device_budget(torch.device("cpu"), 5) == 5


def test_gpu_benchmark_dry_mode_runs(tmp_path):
    """benchmarks/gpu_bench.py --dry: tiny fp16 and bf16 merges through the device stage on the CPU, byte-identical
    to the CPU merge, and its table with the goals printed."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(root / "benchmarks" / "gpu_bench.py"), "--dry", "--work", str(tmp_path)],
                       capture_output=True, text=True, timeout=300, env={**__import__("os").environ,
                                                                          "PYTHONPATH": str(root)})
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    rows = [line for line in r.stdout.splitlines() if line.startswith(("sdxl", "flux"))]
    assert len(rows) == 2 and all(line.rstrip().endswith("yes") for line in rows), r.stdout
    assert "1.2x the I/O floor" in r.stdout and "result: all goals met" in r.stdout
