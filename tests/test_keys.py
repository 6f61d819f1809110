"""Any architecture, key by key: safetensors files whose keys match no family merge key by key (against numpy),
keep model a's keys, dtypes and metadata, take LABEL=VALUE lists with labels from the key paths, run on the same
engine path as a family merge; differing keys or shapes and damaged known-family files are refused in one line."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, file_metadata, load_tensors
from safetensors.torch import save_file
from test_merge import np_lossless, np_weighted_sum

import hubmix
from hubmix import Recipe

META = {"format": "pt", "modelspec.title": "mystery", "trained.by": "someone"}


def mystery(path, seed: int, *, prefix: str = "", depth: int = 4, change: dict | None = None):
    """An architecture hubmix has never heard of: embedders, numbered blocks, a head; mixed dtypes, an int buffer."""
    gen = torch.Generator().manual_seed(0)
    shapes = {"img_in.weight": (16, 8), "img_in.bias": (16,), "time_embed.0.weight": (16, 4),
              "head.norm.weight": (16,), "head.proj.weight": (8, 16), "pos_embed": (1, 12, 16)}
    for i in range(depth):
        shapes.update({f"blocks.{i}.attn.qkv.weight": (48, 16), f"blocks.{i}.attn.out.weight": (16, 16),
                       f"blocks.{i}.mlp.0.weight": (32, 16), f"blocks.{i}.mlp.2.weight": (16, 32),
                       f"blocks.{i}.norm.weight": (16,)})
    shapes.update(change or {})
    noise = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in sorted(shapes.items()):
        base = torch.randn(shape, generator=gen)
        t = base + 0.05 * torch.randn(shape, generator=noise) if shape else base
        sd[prefix + k] = t.to(torch.bfloat16) if k.startswith("blocks.") else t
    sd[prefix + "step_counter"] = torch.tensor([7], dtype=torch.int64)
    save_file(sd, str(path), metadata=META)
    return path


@pytest.fixture
def inputs(tmp_path):
    return [mystery(tmp_path / f"m{s}.safetensors", s) for s in (1, 2, 3)]


def label(key: str) -> str:
    m = re.match(r"^(.*?\.\d+)(\.|$)", key)
    return m.group(1) if m else key.split(".")[0]


def test_merges_key_by_key_equal_to_numpy(inputs, tmp_path, cli):
    out = tmp_path / "out.safetensors"
    code, _, err = cli("merge", *inputs, "-m", "lossless", "--alpha", "0.9", "--beta", "1.1", "-o", out)
    assert code == 0, err
    assert "family not recognised: merged key by key" in err
    got = load_tensors(out)
    src = [load_tensors(p) for p in inputs]
    assert list(got) == list(src[0]) and all(got[k].dtype == src[0][k].dtype for k in got)
    for k, t in got.items():
        if not t.is_floating_point():
            assert torch.equal(t, src[0][k])
            continue
        a, b, c = (s[k].float().numpy() for s in src)
        want = torch.from_numpy(np.asarray(np_lossless(a, b, c, 0.9, 1.1), dtype=np.float32)).to(t.dtype)
        assert torch.equal(t, want), k
    meta = file_metadata(out)
    assert meta["trained.by"] == "someone" and meta["modelspec.title"] == "mystery"
    assert '"family":"keys"' in meta["hubmix.recipe"] and "hubmix.recipe_sha256" in meta
    # inspect names it; the card builds; the same merge again is byte-identical
    code, text, err = cli("inspect", out)
    assert code == 0 and "key by key" in text, err
    from hubmix.hub.card import build_card, load_result

    assert "load it as you load that model" in build_card(load_result(out)).text
    again = tmp_path / "again.safetensors"
    assert cli("merge", *inputs, "-m", "lossless", "--alpha", "0.9", "--beta", "1.1", "-o", again, "-q")[0] == 0
    assert out.read_bytes() == again.read_bytes()


def test_dtype_labels_and_dry_run(inputs, tmp_path, cli):
    out = tmp_path / "out.safetensors"
    spec = "blocks.0-1=0,blocks.2-blocks.3=1,head=0.8,*=0.5"
    r = hubmix.merge(Recipe(models=[str(p) for p in inputs[:2]], method="weighted_sum", dtype="fp16",
                            block_lists={"alpha": spec}), out=out, quiet=True)
    values = {"blocks.0": 0.0, "blocks.1": 0.0, "blocks.2": 1.0, "blocks.3": 1.0, "head": 0.8, "img_in": 0.5,
              "time_embed.0": 0.5, "pos_embed": 0.5, "step_counter": 0.5}
    assert r.canonical["components"]["model"]["blocks"] == {k: {"alpha": v} for k, v in sorted(values.items())}
    got = load_tensors(out)
    a, b = (load_tensors(p) for p in inputs[:2])
    for k, t in got.items():
        if not t.is_floating_point():
            continue
        assert t.dtype == torch.float16
        want = np_weighted_sum(a[k].float().numpy(), b[k].float().numpy(), values[label(k)])
        assert torch.equal(t, torch.from_numpy(np.asarray(want, dtype=np.float32)).half()), k
    code, outp, err = cli("merge", *inputs[:2], "-m", "weighted_sum", "--block-alpha", spec, "--dry")
    assert code == 0, err
    for lab, v in values.items():
        if lab == "step_counter":  # an int buffer: copied, not in the similarity table
            continue
        assert re.search(rf"\s{re.escape(lab)}\s.*alpha={v:g}$", outp, re.M), lab
    assert outp.index(" blocks.1 ") < outp.index(" blocks.2 ")
    code, _, err = cli("merge", *inputs[:2], "-m", "weighted_sum", "--block-alpha", "blocks.4-9=1", "-o",
                       tmp_path / "x.safetensors")
    assert_one_line_error(code, err, "'blocks.4-9' matches no block", "blocks.0..blocks.3")
    # a diffusers folder cannot hold an unknown architecture
    code, _, err = cli("merge", *inputs[:2], "-m", "weighted_sum", "-o", tmp_path / "folder")
    assert_one_line_error(code, err, ".safetensors")
    assert not (tmp_path / "folder").exists() and not (tmp_path / "x.safetensors").exists()


def test_same_engine_path_as_a_family_merge(inputs, zoo, tmp_path):
    keys = hubmix.merge(Recipe(models=[str(p) for p in inputs], method="lossless"), out=tmp_path / "k.safetensors",
                        quiet=True)
    fam = hubmix.merge(Recipe(models=[str(zoo.single("flux", s)) for s in (1, 2, 3)], method="lossless"),
                       out=tmp_path / "f.safetensors", quiet=True)
    assert keys.engine["torch"] == fam.engine["torch"]
    assert keys.engine["kernels"].get("eager", 0) == 0 or fam.engine["kernels"].get("eager", 0) > 0


def test_comfyui_prefix_labels(tmp_path, cli):
    ins = [mystery(tmp_path / f"p{s}.safetensors", s, prefix="model.diffusion_model.") for s in (1, 2)]
    code, outp, err = cli("merge", *ins, "-m", "weighted_sum", "--dry")
    assert code == 0, err
    assert " model.diffusion_model.blocks.3 " in outp


@pytest.mark.parametrize("change, needle", [
    ({"blocks.2.mlp.0.weight": (24, 16)}, "blocks.2.mlp.0.weight is [24, 16] here and [32, 16] in"),
    ({"extra.weight": (4,)}, "extra.weight is [4] here and missing in"),
])
def test_differing_keys_or_shapes_are_refused(inputs, tmp_path, cli, change, needle):
    odd = mystery(tmp_path / "odd.safetensors", 2, change=change)
    out = tmp_path / "out.safetensors"
    code, _, err = cli("merge", inputs[0], odd, "-m", "weighted_sum", "-o", out)
    assert_one_line_error(code, err, needle, "odd.safetensors")
    assert not out.exists()
    code, _, err = cli("merge", inputs[0], mystery(tmp_path / "short.safetensors", 2, depth=3), "-m",
                       "weighted_sum", "-o", out)
    assert_one_line_error(code, err, "blocks.3.attn.out.weight is missing here and [16, 16] in")


def test_damaged_family_file_is_refused_not_merged(zoo, tmp_path, cli):
    sd = load_tensors(zoo.single("flux", 1))
    bare = {k.removeprefix("model.diffusion_model."): v for k, v in sd.items()
            if k.startswith("model.diffusion_model.") and ".single_blocks." not in k
            and not k.startswith("model.diffusion_model.single_blocks.")}
    damaged = tmp_path / "damaged.safetensors"
    save_file(bare, str(damaged))
    code, _, err = cli("merge", damaged, damaged, "-m", "weighted_sum", "-o", tmp_path / "o.safetensors")
    assert_one_line_error(code, err, "damaged.safetensors", "FLUX.1", "single_blocks", "not merged key by key")
    code, _, err = cli("inspect", damaged)
    assert_one_line_error(code, err, "FLUX.1")
    # a .ckpt of no family is still an error (pickles are not merged blind)
    torch.save({"foo": torch.ones(2)}, tmp_path / "x.ckpt")
    code, _, err = cli("inspect", tmp_path / "x.ckpt")
    assert_one_line_error(code, err, "x.ckpt", "no family")
