"""The streaming safetensors writer: O_DIRECT and page-cache writes give the same bytes whatever the order and cut
of the writes, the final header replaces the planned one, and faults end in one line naming the file."""

from __future__ import annotations

import errno
import os
import random

import pytest
import torch
from safetensors.torch import load_file

import hubmix
from hubmix import Recipe
from hubmix.errors import OutputError
from hubmix.formats.io import writer as w
from hubmix.formats.io.writer import PlannedTensor, SafetensorsWriter


def _direct_supported(folder) -> bool:
    if not hasattr(os, "O_DIRECT"):
        return False
    try:
        fd = os.open(folder / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
    except OSError:
        return False
    try:
        buf = torch.zeros(2 * w.BLOCK, dtype=torch.uint8)
        off = -buf.data_ptr() % w.BLOCK
        os.pwrite(fd, memoryview(buf[off:off + w.BLOCK].numpy()), 0)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        os.unlink(folder / "probe")


def _plan(seed: int) -> tuple[list[PlannedTensor], dict[str, torch.Tensor]]:
    """Tensors of awkward sizes: smaller than a block, spanning many, odd byte counts, three dtypes."""
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    planned, data = [], {}
    for i in range(40):
        dtype = rng.choice([torch.float16, torch.float32, torch.bfloat16, torch.uint8])
        n = rng.choice([1, 3, 17, 1000, 2049, 4096, 5000, 33333, 70001])
        t = torch.randn(n, generator=g).to(dtype) if dtype.is_floating_point else torch.randint(
            0, 255, (n,), generator=g, dtype=torch.uint8)
        key = f"t{i:02d}." + "x" * rng.randint(0, 200)  # long keys: a header over a block
        planned.append(PlannedTensor(key, dtype, (n,)))
        data[key] = t
    return planned, data


def _write(path, planned, data, direct, seed, metadata, final):
    writer = SafetensorsWriter(path, planned, metadata, direct=direct)
    pieces = []
    rng = random.Random(seed)
    for p in planned:  # every tensor cut into random pieces, written in a random order
        n = p.shape[0]
        cuts = sorted({0, n, *(rng.randrange(n) for _ in range(rng.randint(0, 4)))})
        pieces += [(p.key, a, b) for a, b in zip(cuts, cuts[1:])]
    rng.shuffle(pieces)
    for key, a, b in pieces:
        t = data[key]
        writer.write(key, t[a:b], a * t.element_size())
    writer.set_metadata(final)
    used = writer._direct is not None
    writer.finish()
    return used


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_direct_and_buffered_writes_give_the_same_bytes(tmp_path, seed):
    planned, data = _plan(seed)
    meta = {"format": "pt", "hash": "0" * 64}
    final = {"format": "pt", "hash": "f" * 64}
    used = _write(tmp_path / "d.safetensors", planned, data, True, seed, meta, final)
    assert used == _direct_supported(tmp_path)
    assert not _write(tmp_path / "b.safetensors", planned, data, False, seed, meta, final)
    direct, buffered = (tmp_path / "d.safetensors").read_bytes(), (tmp_path / "b.safetensors").read_bytes()
    assert direct == buffered
    loaded = load_file(tmp_path / "d.safetensors")
    assert loaded.keys() == data.keys()
    for k, t in data.items():
        assert torch.equal(loaded[k], t), k
    from safetensors import safe_open

    with safe_open(str(tmp_path / "d.safetensors"), "pt") as f:
        assert f.metadata() == final


def test_a_tensor_never_fully_written_is_an_error_and_direct_blocks_know_it(tmp_path):
    planned = [PlannedTensor("a", torch.float32, (3000,)), PlannedTensor("b", torch.float32, (3000,))]
    writer = SafetensorsWriter(tmp_path / "x.safetensors", planned, {}, direct=True)
    writer.write("a", torch.ones(3000))
    writer.write("b", torch.ones(2000))
    with pytest.raises(AssertionError, match="not fully written"):
        writer.finish()


def test_direct_io_choice(monkeypatch):
    monkeypatch.delenv("HUBMIX_DIRECT_IO", raising=False)
    has = hasattr(os, "O_DIRECT")
    assert w.direct_wanted(w.DIRECT_MIN, None) == has and not w.direct_wanted(w.DIRECT_MIN - 1, None)
    monkeypatch.setenv("HUBMIX_DIRECT_IO", "0")
    assert not w.direct_wanted(1 << 40, None) and w.direct_wanted(1, True) == has
    monkeypatch.setenv("HUBMIX_DIRECT_IO", "1")
    assert w.direct_wanted(1, None) == has and not w.direct_wanted(1 << 40, False)


def test_a_full_disk_at_the_reservation_names_the_file(tmp_path, monkeypatch):
    if not _direct_supported(tmp_path):
        pytest.skip("this filesystem has no O_DIRECT")

    def fallocate(*_a):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", fallocate)
    path = tmp_path / "x.safetensors"
    with pytest.raises(OutputError, match=f"{path}: cannot write \\(No space left on device\\)"):
        SafetensorsWriter(path, [PlannedTensor("a", torch.float32, (10,))], {}, direct=True)


def test_merges_give_the_same_bytes_direct_or_not(zoo, tmp_path, monkeypatch):
    inputs = [str(zoo.diffusers("sd1", s, dtype="fp16")) for s in (1, 2, 3)]
    outs = {}
    for mode in ("0", "1"):
        monkeypatch.setenv("HUBMIX_DIRECT_IO", mode)
        (tmp_path / mode).mkdir()
        out = tmp_path / mode / "merged.safetensors"
        hubmix.merge(Recipe(models=inputs, method="lossless", params={"alpha": 0.9, "beta": 1.1}), out=out,
                     quiet=True)
        outs[mode] = out.read_bytes()
    assert outs["0"] == outs["1"]
