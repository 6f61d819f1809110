"""A1111/supermerger block lists (--block-alpha/--block-beta, presets) on tiny SD1.x and SDXL models, checked key by
key against an expectation derived independently from the diffusers module structure."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error
from test_merge import expected, np_weighted_sum, tensors

from hubmix.formats.tiny import CONFIGS
from hubmix.methods.presets import presets

SD_LABELS = ["BASE"] + [f"IN{i:02d}" for i in range(12)] + ["M00"] + [f"OUT{i:02d}" for i in range(12)]
XL_LABELS = ["BASE"] + [f"IN{i:02d}" for i in range(9)] + ["M00"] + [f"OUT{i:02d}" for i in range(9)]
# supermerger's ISXLBLOCK: which of the 26 SD1.x entries an SDXL list keeps
IS_XL = [True] * 10 + [False] * 3 + [True] * 10 + [False] * 3


def a1111_block(key: str, family: str) -> str:
    """The A1111 block of a diffusers UNet key, from the diffusers structure of the tiny config: each down block
    holds layers_per_block layers then a downsampler, each up block layers_per_block + 1 layers (the upsampler
    with the last); conv_in and the embeddings go with IN00, the final norm/conv with the last output block."""
    cfg = CONFIGS[family]["unet"]
    lpb = cfg["layers_per_block"]
    n_up = len(cfg["up_block_types"])
    if key.startswith(("conv_in.", "time_embedding.", "add_embedding.")):
        return "IN00"
    if key.startswith(("conv_norm_out.", "conv_out.")):
        return f"OUT{n_up * (lpb + 1) - 1:02d}"
    if key.startswith("mid_block."):
        return "M00"
    m = re.match(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.", key)
    if m:
        b, kind, i = int(m[1]), m[2], int(m[3])
        return f"IN{1 + b * (lpb + 1) + (lpb if kind == 'downsamplers' else i):02d}"
    m = re.match(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.", key)
    b, kind, i = int(m[1]), m[2], int(m[3])
    return f"OUT{b * (lpb + 1) + (lpb if kind == 'upsamplers' else i):02d}"


def check(out, inputs, family, by_label, vae_alpha):
    got = tensors(out, "unet")
    ref = {alpha: expected(inputs, "unet", np_weighted_sum, {"alpha": alpha}) for alpha in set(by_label.values())}
    labels = {k: a1111_block(k, family) for k in got}
    assert {"IN00", "M00"} <= set(labels.values())
    for k, t in got.items():
        assert torch.equal(t, ref[by_label[labels[k]]][k]), (k, labels[k])
    tes = ["text_encoder", "text_encoder_2"] if family == "sdxl" else ["text_encoder"]
    for te in tes:
        want = expected(inputs, te, np_weighted_sum, {"alpha": by_label["BASE"]})
        g = tensors(out, te)
        assert all(torch.equal(g[k], want[k]) for k in want)
    want = expected(inputs, "vae", np_weighted_sum, {"alpha": vae_alpha})
    g = tensors(out, "vae")
    assert all(torch.equal(g[k], want[k]) for k in want)
    return labels


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_block_list_in_a1111_order(zoo, tmp_path, cli, family):
    labels = SD_LABELS if family == "sd1" else XL_LABELS
    values = [round(0.03 + 0.9 * i / len(labels), 4) for i in range(len(labels))]  # all different
    a, b = zoo.diffusers(family, 1), zoo.diffusers(family, 2)
    out = tmp_path / "out"
    code, _, err = cli("merge", a, b, "-m", "weighted_sum", "--alpha", "0.37", "--block-alpha",
                       ",".join(map(str, values)), "-o", out, "-q")
    assert code == 0, err
    by_label = dict(zip(labels, values))
    used = set(check(out, [a, b], family, by_label, 0.37).values())
    import yaml

    canonical = yaml.safe_load((out / "recipe.yaml").read_text())
    blocks = canonical["components"]["unet"]["blocks"]
    assert blocks == {label: {"alpha": by_label[label]} for label in sorted(used)}  # expanded, only blocks it has
    assert canonical["components"]["text_encoder"]["params"] == {"alpha": by_label["BASE"]}
    assert "block_alpha" not in canonical
    if family == "sd1":  # the tiny UNet has 9 input and 9 output blocks: the list's IN09..IN11, OUT09..OUT11 unused
        assert used == set(SD_LABELS[1:10] + ["M00"] + SD_LABELS[14:23])


def test_preset_on_sdxl_keeps_supermergers_xl_entries(zoo, tmp_path):
    import hubmix
    from hubmix import Recipe

    a, b = zoo.diffusers("sdxl", 1), zoo.diffusers("sdxl", 2)
    out = tmp_path / "out"
    recipe = Recipe.from_dict({"models": [str(a), str(b)], "method": "weighted_sum", "params": {"alpha": 0.2},
                               "block_alpha": "grad_v"}, "test")
    hubmix.merge(recipe, out=out, quiet=True)
    published = presets()["GRAD_V"]
    assert len(published) == 26 and published[:3] == (0.0, 1.0, 0.9166666667) and published[13] == 0.0
    xl = [v for v, keep in zip(published, IS_XL) if keep]
    check(out, [a, b], "sdxl", dict(zip(XL_LABELS, xl)), 0.2)


def test_explicit_block_params_win_and_card_table(zoo, tmp_path):
    import hubmix
    from hubmix import Recipe
    from hubmix.hub.card import build_card, load_result

    a, b = zoo.diffusers("sd1", 1), zoo.diffusers("sd1", 2)
    out = tmp_path / "out"
    recipe = Recipe.from_dict({"models": [str(a), str(b)], "method": "weighted_sum", "block_alpha": "FLAT_25",
                               "components": {"unet": {"blocks": {"OUT02": {"alpha": 0.9}}},
                                              "text_encoder": {"alpha": 0.6}}}, "test")
    result = hubmix.merge(recipe, out=out, quiet=True)
    by_label = {label: 0.25 for label in SD_LABELS}
    by_label.update(OUT02=0.9, BASE=0.6)
    check(out, [a, b], "sd1", by_label, 0.5)
    assert any("IN09, IN10, IN11" in n for n in result.summary.events["note"])
    text = build_card(load_result(out)).text
    assert "| block | alpha |" in text and "| OUT02 | 0.9 |" in text and "| IN05 | 0.25 |" in text


def test_block_list_errors(zoo, tmp_path, cli):
    a, b = zoo.diffusers("sd1", 1), zoo.diffusers("sd1", 2)
    code, _, err = cli("merge", a, b, "-m", "weighted_sum", "--block-alpha", ",".join(["0.5"] * 25), "-o",
                       tmp_path / "x")
    assert_one_line_error(code, err, "--block-alpha" if "--block-alpha" in err else "block_alpha", "25 values", "26")
    code, _, err = cli("merge", a, b, "-m", "weighted_sum", "--block-alpha", "NOPE", "-o", tmp_path / "x")
    assert_one_line_error(code, err, "NOPE", "GRAD_V")
    xa, xb = zoo.diffusers("sdxl", 1), zoo.diffusers("sdxl", 2)
    code, _, err = cli("merge", xa, xb, "-m", "weighted_sum", "--block-alpha", ",".join(["0.5"] * 26), "-o",
                       tmp_path / "x")
    assert_one_line_error(code, err, "26 values", "take 20")
    assert not (tmp_path / "x").exists()


def test_presets_listed(cli):
    code, out, _ = cli("methods", "--presets")
    assert code == 0
    lines = dict(ln.split(": ", 1) for ln in out.splitlines()[1:])
    assert set(lines) == set(presets()) and {"GRAD_V", "GRAD_A", "FLAT_25", "FLAT_75", "WRAP08"} <= set(lines)
    assert np.allclose([float(v) for v in lines["WRAP08"].split(",")], presets()["WRAP08"])
