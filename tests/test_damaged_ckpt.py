""".ckpt files of random bytes, and real checkpoints cut short: whatever torch's weights-only unpickler raises inside
(KeyError, IndexError, struct.error, ...) reaches the user as one InputError line naming the file."""

from __future__ import annotations

import io
import random

import pytest

from conftest import assert_one_line_error

PREFIXES = (b"", b"\x80\x02", b"\x80\x04\x95", b"PK\x03\x04", b"\x80\x02\x8a\x0alZ\xfc\x9cF\xf9 j\xa8")  # the last:
# torch's legacy magic number, so the bytes after it reach the legacy loader


def _random_ckpt(tmp_path, seed: int):
    r = random.Random(seed)
    data = r.choice(PREFIXES) + r.randbytes(r.choice([1, 7, 64, 512, 4096]))
    path = tmp_path / f"random-{seed}.ckpt"
    path.write_bytes(data)
    return path


def _one_line_naming(e: BaseException, path) -> None:
    assert str(path) in str(e) and "\n" not in str(e), str(e)


def test_random_bytes_end_in_one_line_naming_the_file(tmp_path, recwarn):
    from hubmix.errors import InputError
    from hubmix.formats.io.readers import open_weight_file

    kinds = set()
    for seed in range(400):
        path = _random_ckpt(tmp_path, seed)
        with pytest.raises(InputError) as e:
            open_weight_file(path)
        _one_line_naming(e.value, path)
        kinds.add(str(e.value).split("(", 1)[-1].split(":")[0])
        path.unlink()
    # the seeds reach the unpickler's internals, not only the readers' own checks (the bug this guards)
    assert {"KeyError", "IndexError"} <= kinds, kinds
    assert not [w for w in recwarn if "pickle protocol" in str(w.message)]  # no warning spam before the line


@pytest.mark.parametrize("legacy", [False, True])
def test_a_real_checkpoint_cut_anywhere_is_one_line(tmp_path, legacy):
    import torch

    from hubmix.errors import InputError
    from hubmix.formats.io.readers import open_weight_file

    g = torch.Generator().manual_seed(0)
    state = {"state_dict": {"model.diffusion_model.a.weight": torch.randn(32, 32, generator=g),
                            "model.diffusion_model.a.bias": torch.randn(32, generator=g)}}
    buf = io.BytesIO()
    torch.save(state, buf, _use_new_zipfile_serialization=not legacy)
    raw = buf.getvalue()
    whole = tmp_path / "whole.ckpt"
    whole.write_bytes(raw)
    assert torch.equal(open_weight_file(whole).tensor("model.diffusion_model.a.bias"),
                       state["state_dict"]["model.diffusion_model.a.bias"])  # the intact file reads
    path = tmp_path / "cut.ckpt"
    for cut in sorted({*range(0, len(raw), max(1, len(raw) // 60)), len(raw) - 1}):
        path.write_bytes(raw[:cut])
        with pytest.raises(InputError) as e:
            open_weight_file(path)
        _one_line_naming(e.value, path)


def test_the_cli_shows_a_damaged_ckpt_in_one_line(tmp_path, cli):
    for seed in (15, 130, 239):  # torch.load ends these in IndexError, KeyError and struct.error tracebacks
        path = _random_ckpt(tmp_path, seed)
        code, _, err = cli("inspect", path)
        assert_one_line_error(code, err, path)
        code, _, err = cli("merge", path, path, "-m", "weighted_sum", "--out", tmp_path / "o")
        assert_one_line_error(code, err, path)
        assert not (tmp_path / "o").exists()
