"""Block weights by label (`--block-alpha "D00-D01=0.3,S*=0.7,*=0.5"`): patterns, ranges, globs and BASE on tiny
Flux and SD1.x models, checked key by key against numpy with each key's block derived independently from its
diffusers name; the expanded values in the recipe, the card and the dry run; one-line errors."""

from __future__ import annotations

import re

import pytest
import torch
import yaml
from conftest import assert_one_line_error
from test_blocks import a1111_block
from test_merge import expected, np_weighted_sum, tensors

import hubmix
from hubmix.errors import RecipeError
from hubmix.methods.label_rules import assign, parse_label_rules


def flux_block(key: str) -> str:
    if m := re.match(r"transformer_blocks\.(\d+)\.", key):
        return f"D{int(m.group(1)):02d}"
    if m := re.match(r"single_transformer_blocks\.(\d+)\.", key):
        return f"S{int(m.group(1)):02d}"
    return "OUT" if key.startswith(("norm_out.", "proj_out.")) else "IN"


def check_component(out, inputs, comp, alpha_of):
    got = tensors(out, comp)
    alphas = {alpha_of(k) for k in got}
    ref = {a: expected(inputs, comp, np_weighted_sum, {"alpha": a}) for a in alphas}
    bad = [k for k, t in got.items() if not torch.equal(t, ref[alpha_of(k)][k])]
    assert not bad, (comp, bad[:5])


def test_most_specific_pattern_wins():
    labels = ["IN"] + [f"D{i:02d}" for i in range(19)] + [f"S{i:02d}" for i in range(38)] + ["OUT", "CLIP", "T5"]
    groups = {"BASE": {"CLIP", "T5"}}
    rules = parse_label_rules("*=0.5,D*=0.4,D03-D05=0.3,d04=0.2,BASE=0,T5=1", "t")
    got = assign(rules, labels, groups, "t")
    assert got["D04"] == 0.2 and got["D03"] == got["D05"] == 0.3 and got["D06"] == got["D00"] == 0.4
    assert got["S37"] == got["IN"] == got["OUT"] == 0.5 and got["CLIP"] == 0.0 and got["T5"] == 1.0
    # the order of the pairs never matters
    assert assign(dict(reversed(list(rules.items()))), labels, groups, "t") == got
    # generic labels: ranges with one prefix, both spellings
    gl = [f"blocks.{i}" for i in range(12)] + ["head", "img_in"]
    assert assign(parse_label_rules("blocks.0-blocks.3=1,blocks.4-11=0", "t"), gl, {}, "t") == {
        **{f"blocks.{i}": 1.0 for i in range(4)}, **{f"blocks.{i}": 0.0 for i in range(4, 12)}}
    with pytest.raises(RecipeError, match=r"'D\*' and '\*0'"):
        assign(parse_label_rules("D*=1,*0=2", "t"), labels, groups, "t")
    with pytest.raises(RecipeError, match="'D00-D05' and 'D04-D09'"):
        assign(parse_label_rules("D00-D05=1,D04-D09=2", "t"), labels, groups, "t")
    with pytest.raises(RecipeError, match=r"'X\*' matches no block.*D00\.\.D18"):
        assign(parse_label_rules("X*=1", "t"), labels, groups, "t")
    with pytest.raises(RecipeError, match="'D19-D29' matches no block"):
        assign(parse_label_rules("D19-D29=1", "t"), labels, groups, "t")
    for bad, msg in (("D00-S03=1", "one label prefix"), ("D05-D01=1", "backwards"), ("IN=x", "not a number"),
                     ("IN=1,in=2", "twice"), ("IN=1,0.5", "not LABEL=VALUE")):
        with pytest.raises(RecipeError, match=msg):
            parse_label_rules(bad, "t")


def test_labels_on_flux_hit_their_keys(zoo, tmp_path, cli):
    a, b = zoo.diffusers("flux", 1), zoo.diffusers("flux", 2)
    out = tmp_path / "out"
    spec = "D00-D01=0.3,S*=0.7,S01=0.9,IN=1,BASE=0,T5=0.8,*=0.5"
    code, _, err = cli("merge", a, b, "-m", "weighted_sum", "--alpha", "0.25", "--block-alpha", spec, "-o", out, "-q")
    assert code == 0, err
    want = {"D00": 0.3, "D01": 0.3, "S00": 0.7, "S01": 0.9, "S02": 0.7, "IN": 1.0, "OUT": 0.5}
    check_component(out, [a, b], "transformer", lambda k: want[flux_block(k)])
    check_component(out, [a, b], "text_encoder", lambda k: 0.0)
    check_component(out, [a, b], "text_encoder_2", lambda k: 0.8)
    check_component(out, [a, b], "vae", lambda k: 0.25)  # no label: the global value
    canonical = yaml.safe_load((out / "recipe.yaml").read_text())
    assert canonical["components"]["transformer"]["blocks"] == {k: {"alpha": v} for k, v in want.items()}
    assert canonical["components"]["text_encoder_2"]["params"]["alpha"] == 0.8
    assert "block_alpha" not in canonical
    from hubmix.hub.card import build_card, load_result

    text = build_card(load_result(out)).text
    assert "| S01 | 0.9 |" in text and "| D00 | 0.3 |" in text
    # the dry run lists every label with the value it merges with
    code, outp, err = cli("merge", a, b, "-m", "weighted_sum", "--block-alpha", spec, "--dry")
    assert code == 0, err
    for label, v in want.items():
        assert re.search(rf"\s{label}\s.*alpha={v:g}$", outp, re.M), label
    assert re.search(r"\sT5\s.*alpha=0.8$", outp, re.M) and re.search(r"\sCLIP\s.*alpha=0$", outp, re.M)
    # an unknown label or a range that matches nothing: one line naming it, nothing written
    for bad, needle in (("D02=1", "'D02'"), ("S03-S09=1", "'S03-S09'"), ("M*=1", "'M*'")):
        code, _, err = cli("merge", a, b, "-m", "weighted_sum", "--block-alpha", bad, "-o", tmp_path / "x")
        assert_one_line_error(code, err, needle, "matches no block", "D00..D01")
    assert not (tmp_path / "x").exists()


def test_labels_on_sd1_with_base_and_explicit_blocks(zoo, tmp_path):
    a, b = zoo.diffusers("sd1", 1), zoo.diffusers("sd1", 2)
    out = tmp_path / "out"
    recipe = hubmix.Recipe.from_dict({
        "models": [str(a), str(b)], "method": "weighted_sum", "params": {"alpha": 0.1},
        "block_alpha": {"BASE": 0.0, "IN00-IN05": 0.2, "OUT*": 0.8, "M00": 0.6},
        "components": {"unet": {"blocks": {"out03": {"alpha": 0.95}}}}}, "test")
    hubmix.merge(recipe, out=out, quiet=True)

    def alpha(k):
        label = a1111_block(k, "sd1")
        if label == "OUT03":
            return 0.95  # explicit blocks win, whatever their case
        return 0.2 if label <= "IN05" and label.startswith("IN") else 0.8 if label.startswith("OUT") else \
            0.6 if label == "M00" else 0.1

    check_component(out, [a, b], "unet", alpha)
    check_component(out, [a, b], "text_encoder", lambda k: 0.0)
    check_component(out, [a, b], "vae", lambda k: 0.1)
    # the A1111 list on a family without one points to the label form
    with pytest.raises(RecipeError, match="LABEL=VALUE"):
        hubmix.merge(hubmix.Recipe(models=[str(zoo.diffusers("flux", 1)), str(zoo.diffusers("flux", 2))],
                                   method="weighted_sum", block_lists={"alpha": "GRAD_V"}), out=tmp_path / "y",
                     quiet=True)
