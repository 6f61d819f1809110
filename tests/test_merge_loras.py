"""merge-loras on tiny SD1.x LoRAs (kohya and PEFT, different ranks and alphas): concat is the exact weighted sum,
rank R is numpy's truncated SVD of the summed update, block weights scale blocks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error
from safetensors.torch import load_file

import lora_files


def _updates(path) -> dict[str, torch.Tensor]:
    """Per canonical module path (dots): alpha/rank * up @ down, float64, from a kohya or PEFT file as written."""
    sd = load_file(str(path))
    out = {}
    for k in sd:
        for down_sfx, up_sfx in ((".lora_down.weight", ".lora_up.weight"), (".lora_A.weight", ".lora_B.weight")):
            if k.endswith(down_sfx):
                mod = k[: -len(down_sfx)]
                up, down = sd[mod + up_sfx].double(), sd[k].double()
                r = down.shape[0]
                alpha = float(sd[mod + ".alpha"]) if mod + ".alpha" in sd else r
                name = mod.replace("lora_unet_", "unet.").replace("lora_te_", "text_encoder.") \
                    if mod.startswith("lora_") else mod
                out[name.replace("_", ".") if mod.startswith("lora_") else mod.replace("_", ".")] = \
                    (up.reshape(up.shape[0], r) @ down.reshape(r, -1)) * alpha / r
    return out


@pytest.fixture
def three(zoo, tmp_path):
    a = zoo.diffusers("sd1", 1)
    k1 = lora_files.kohya(a, tmp_path / "k1.safetensors", "sd1", rank=4, alpha=2.0, seed=1)
    k2 = lora_files.kohya(a, tmp_path / "k2.safetensors", "sd1", rank=8, alpha=3.0, seed=2)
    p = lora_files.peft(a, tmp_path / "p.safetensors", "sd1", rank=4, seed=3)
    return a, [(k1, 0.7), (k2, -0.4), (p, 1.3)]


def _expected(inputs):
    want: dict[str, torch.Tensor] = {}
    for path, s in inputs:
        for k, v in _updates(path).items():
            want[k] = want.get(k, 0) + s * v
    return want


@pytest.mark.parametrize("rank", ["concat", "6"])
def test_merge_mixed_kohya_and_peft(three, tmp_path, cli, rank):
    a, inputs = three
    out = tmp_path / "m.safetensors"
    code, _, err = cli("merge-loras", *[f"{p}:{s}" for p, s in inputs], "--base", a, "--rank", rank,
                       "--dtype", "fp32", "-o", out, "-q")
    assert code == 0, err
    got, want = _updates(out), _expected(inputs)
    assert set(got) == set(want) and len(got) > 20
    for k, w in want.items():
        if rank == "concat":
            assert torch.allclose(got[k], w, rtol=1e-5, atol=1e-6), k
            continue
        m = w.reshape(w.shape[0], -1).numpy()
        u, s, vh = np.linalg.svd(m, full_matrices=False)
        trunc = (u[:, :6] * s[:6]) @ vh[:6]
        assert np.allclose(got[k].numpy(), trunc, rtol=1e-4, atol=1e-6), k
    if rank == "concat":
        sd = load_file(str(out))
        assert {v.shape[0] for k, v in sd.items() if k.endswith(".lora_down.weight")} == {16}


def test_by_name_block_weights_and_errors(three, tmp_path, cli):
    a, inputs = three
    kohya = inputs[:2]
    out = tmp_path / "byname.safetensors"
    code, _, err = cli("merge-loras", *[f"{p}:{s}" for p, s in kohya], "--dtype", "fp32", "-o", out, "-q")
    assert code == 0, err
    got, want = _updates(out), _expected(kohya)
    assert all(torch.allclose(got[k], w, rtol=1e-5, atol=1e-6) for k, w in want.items())
    code, _, err = cli("merge-loras", *[str(p) for p, _ in inputs], "-o", tmp_path / "x.safetensors", "-q")
    assert_one_line_error(code, err, "mix kohya and PEFT", "--base")
    # BASE 1, every UNet block 0: only the text encoder's updates are left
    blocks = ",".join(["1"] + ["0"] * 25)
    out = tmp_path / "blocks.safetensors"
    code, _, err = cli("merge-loras", *[f"{p}:{s}" for p, s in kohya], "--base", a, "--block-alpha", blocks,
                       "--dtype", "fp32", "-o", out, "-q")
    assert code == 0, err
    got = _updates(out)
    assert all(torch.allclose(got[k], w, rtol=1e-5, atol=1e-6) for k, w in want.items() if k.startswith("text"))
    assert all(not got[k].any() for k in want if k.startswith("unet"))
