"""Merges of tiny SD1.x and SDXL models, checked element by element against an independent numpy implementation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import component_tensors, load_tensors

import hubmix
from hubmix import Recipe

COMPONENTS = {"sd1": ["unet", "text_encoder", "vae"], "sdxl": ["unet", "text_encoder", "text_encoder_2", "vae"]}


def canon(component: str, key: str) -> str:
    """transformers >= 5 saves CLIPTextModel without the text_model. prefix; hubmix writes the prefixed form."""
    if component.startswith("text_encoder") and not key.startswith(("text_model.", "text_projection")):
        return "text_model." + key
    return key


def tensors(folder: Path, component: str) -> dict[str, torch.Tensor]:
    return {canon(component, k): v for k, v in component_tensors(folder, component).items()}


# The independent implementation: numpy, float32, written from the formulas in the README.
def np_lossless(a, b, c, alpha=1.0, beta=1.0):
    return np.where(np.abs(a - alpha * b) <= np.abs(a - beta * c), b, c)


def np_maxdiff(a, b, c, alpha=1.0, beta=1.0):
    return np.where(np.abs(a - alpha * b) > np.abs(a - beta * c), b, c)


def np_lossless2(a, b, alpha=1.0, beta=1.0, ref_alpha=0.5):
    ref = np.float32(1 - ref_alpha) * a + np.float32(ref_alpha) * b
    return np_lossless(ref, a, b, alpha, beta)


def np_weighted_sum(a, b, alpha=0.5):
    return np.float32(1 - alpha) * a + np.float32(alpha) * b


def np_add_difference(a, b, c, alpha=1.0):
    return a + np.float32(alpha) * (b - c)


CASES = [
    ("lossless", 3, {}, np_lossless),
    ("lossless", 3, {"alpha": 0.9, "beta": 1.1}, np_lossless),
    ("lossless", 2, {"ref_alpha": 0.3}, np_lossless2),
    ("maxdiff", 3, {}, np_maxdiff),
    ("weighted_sum", 2, {"alpha": 0.3}, np_weighted_sum),
    ("add_difference", 3, {"alpha": 0.7}, np_add_difference),
]


def expected(inputs: list[Path], component: str, fn, params, dtype=torch.float32) -> dict[str, torch.Tensor]:
    sds = [tensors(p, component) for p in inputs]
    out = {}
    for k in sds[0]:
        arrays = [sd[k].float().numpy() for sd in sds]
        out[k] = torch.from_numpy(np.asarray(fn(*arrays, **params), dtype=np.float32)).to(dtype)
    return out


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("method, n, params, fn", CASES, ids=[f"{c[0]}-{c[1]}-{len(c[2])}" for c in CASES])
def test_method_matches_independent_implementation(zoo, tmp_path, family, method, n, params, fn):
    inputs = [zoo.diffusers(family, seed) for seed in (1, 2, 3)[:n]]
    out = tmp_path / "out"
    hubmix.merge(Recipe(models=[str(p) for p in inputs], method=method, params=params), out=out, quiet=True)
    for comp in COMPONENTS[family]:
        got = tensors(out, comp)
        want = expected(inputs, comp, fn, params)
        assert set(got) == set(want), comp
        bad = [k for k in want if not torch.equal(got[k], want[k])]
        assert not bad, f"{comp}: {len(bad)} tensors differ, e.g. {bad[:3]}"
    # selection methods only ever take stored values
    if method in ("lossless", "maxdiff"):
        k = "conv_in.weight"
        got = tensors(out, "unet")[k]
        cands = [tensors(p, "unet")[k] for p in inputs[-2:]]
        assert torch.all((got == cands[0]) | (got == cands[1]))


@pytest.mark.parametrize("family, cls", [("sd1", "StableDiffusionPipeline"), ("sdxl", "StableDiffusionXLPipeline")])
def test_merged_pipeline_loads_and_runs(zoo, tmp_path, family, cls):
    import diffusers

    from hubmix.formats.tiny import run_pipeline

    inputs = [str(zoo.diffusers(family, s)) for s in (1, 2, 3)]
    out = tmp_path / "merged"
    hubmix.merge(Recipe(models=inputs, method="lossless"), out=out, quiet=True)
    pipe = getattr(diffusers, cls).from_pretrained(out)
    images = run_pipeline(pipe, steps=2)
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()
    # DiffusionPipeline picks the class from model_index.json
    assert type(diffusers.DiffusionPipeline.from_pretrained(out)).__name__ == cls


def test_fp16_inputs_are_merged_in_float32(zoo, tmp_path):
    inputs = [zoo.diffusers("sd1", s, dtype="fp16") for s in (1, 2)]
    out = tmp_path / "out"
    hubmix.merge(Recipe(models=[str(p) for p in inputs], method="weighted_sum", params={"alpha": 0.3}), out=out,
                 quiet=True)
    got = tensors(out, "unet")
    want = expected(inputs, "unet", np_weighted_sum, {"alpha": 0.3}, dtype=torch.float16)
    assert all(v.dtype == torch.float16 for v in got.values())  # default: a's dtype
    assert all(torch.equal(got[k], want[k]) for k in want)
    # merging in fp16 would round differently somewhere: the check above is not vacuous
    a, b = (tensors(p, "unet") for p in inputs)
    in_half = {k: (0.7 * a[k] + 0.3 * b[k]) for k in want}
    assert any(not torch.equal(in_half[k], want[k]) for k in want)


def test_output_dtype_option(zoo, tmp_path):
    inputs = [str(zoo.diffusers("sd1", s)) for s in (1, 2)]
    out = tmp_path / "out"
    hubmix.merge(Recipe(models=inputs, method="weighted_sum", dtype="bf16"), out=out, quiet=True)
    for comp in COMPONENTS["sd1"]:
        got = tensors(out, comp)
        want = expected([Path(p) for p in inputs], comp, np_weighted_sum, {"alpha": 0.5}, dtype=torch.bfloat16)
        assert all(got[k].dtype == torch.bfloat16 and torch.equal(got[k], want[k]) for k in want)
    cfg = json.loads((out / "text_encoder" / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16"


def test_components_option_copies_the_rest_from_a(zoo, tmp_path, cli):
    a, b, c = (zoo.diffusers("sd1", s) for s in (1, 2, 3))
    out = tmp_path / "out"
    code, _, err = cli("merge", a, b, c, "--method", "lossless", "--components", "unet", "--out", out, "-q")
    assert code == 0, err
    for comp in ("text_encoder", "vae"):
        got, src = tensors(out, comp), tensors(a, comp)
        assert all(torch.equal(got[k], src[k]) for k in src)
    want = expected([a, b, c], "unet", np_lossless, {})
    got = tensors(out, "unet")
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_per_component_recipe(zoo, tmp_path):
    a, b, c = (zoo.diffusers("sd1", s) for s in (1, 2, 3))
    recipe = Recipe.from_dict({
        "models": [str(a), str(b), str(c)],
        "method": "add_difference",
        "params": {"alpha": 1.0},
        "components": {
            "vae": {"from": "c"},
            "text_encoder": {"params": {"alpha": 0.25}},
            "unet": {"method": "weighted_sum", "models": ["a", "c"], "alpha": 0.4,
                     "blocks": {"OUT05": {"alpha": 0.9}}},
        },
    }, "test")
    out = tmp_path / "out"
    result = hubmix.merge(recipe, out=out, quiet=True)
    got_vae, c_vae = tensors(out, "vae"), tensors(c, "vae")
    assert all(torch.equal(got_vae[k], c_vae[k]) for k in c_vae)
    want_te = expected([a, b, c], "text_encoder", np_add_difference, {"alpha": 0.25})
    got_te = tensors(out, "text_encoder")
    assert all(torch.equal(got_te[k], want_te[k]) for k in want_te)
    got_unet = tensors(out, "unet")
    base = expected([a, c], "unet", np_weighted_sum, {"alpha": 0.4})
    block = expected([a, c], "unet", np_weighted_sum, {"alpha": 0.9})
    # output_blocks.5 is up_blocks.1.attentions.2 / resnets.2 / upsamplers in the tiny UNet
    in_block = [k for k in base if k.startswith(("up_blocks.1.resnets.2.", "up_blocks.1.attentions.2.",
                                                  "up_blocks.1.upsamplers."))]
    assert in_block
    assert all(torch.equal(got_unet[k], block[k]) for k in in_block)
    assert all(torch.equal(got_unet[k], base[k]) for k in base if k not in in_block)
    comps = result.canonical["components"]
    assert comps["vae"] == {"from": "c"}
    assert comps["unet"]["blocks"] == {"OUT05": {"alpha": 0.9}}
    assert comps["text_encoder"]["params"] == {"alpha": 0.25}


def _edit_unet(src: Path, dst: Path, edit) -> Path:
    from safetensors.torch import save_file

    shutil.copytree(src, dst)
    f = dst / "unet" / "diffusion_pytorch_model.safetensors"
    sd = load_tensors(f)
    edit(sd)
    save_file(sd, str(f), metadata={"format": "pt"})
    return dst


def test_missing_extra_and_mismatched_keys_follow_the_rule(zoo, tmp_path):
    a, b, c = (zoo.diffusers("sd1", s) for s in (1, 2, 3))

    def edit(sd):
        del sd["conv_out.bias"]
        sd["time_embedding.linear_1.weight"] = torch.zeros(5, 5)
        sd["extra.weight"] = torch.ones(3)

    b2 = _edit_unet(b, tmp_path / "b-edited", edit)
    out = tmp_path / "out"
    result = hubmix.merge(Recipe(models=[str(a), str(b2), str(c)], method="lossless"), out=out, quiet=True)
    got, src = tensors(out, "unet"), tensors(a, "unet")
    assert torch.equal(got["conv_out.bias"], src["conv_out.bias"])
    assert torch.equal(got["time_embedding.linear_1.weight"], src["time_embedding.linear_1.weight"])
    assert "extra.weight" not in got
    ev = result.summary.events
    assert any("conv_out.bias" in x and "b-edited" in x for x in ev["missing"])
    assert any("time_embedding.linear_1.weight" in x for x in ev["shape"])
    assert any("extra.weight" in x for x in ev["extra"])
    rendered = result.summary.render()
    assert "copied from the first model" in rendered and "left out" in rendered


def test_inpainting_conv_in_merges_shared_channels(zoo, tmp_path):
    a = zoo.diffusers("sd1", 1, inpainting=True)
    b, c = zoo.diffusers("sd1", 2), zoo.diffusers("sd1", 3)
    out = tmp_path / "out"
    result = hubmix.merge(Recipe(models=[str(a), str(b), str(c)], method="add_difference"), out=out, quiet=True)
    got = tensors(out, "unet")["conv_in.weight"]
    ta, tb, tc = (tensors(p, "unet")["conv_in.weight"] for p in (a, b, c))
    assert got.shape[1] == 9
    assert torch.equal(got[:, :4], ta[:, :4] + 1.0 * (tb - tc))
    assert torch.equal(got[:, 4:], ta[:, 4:])
    assert any("conv_in.weight" in x for x in result.summary.events["channels"])
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "StableDiffusionInpaintPipeline"


def test_family_mismatch_is_refused_before_any_work(zoo, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(hubmix.FamilyError) as e:
        hubmix.merge(Recipe(models=[str(zoo.diffusers("sd1", 1)), str(zoo.diffusers("sdxl", 1))],
                            method="weighted_sum"), out=out, quiet=True)
    assert "Stable Diffusion 1.x" in str(e.value) and "Stable Diffusion XL" in str(e.value)
    assert not out.exists()


def test_sharded_and_variant_inputs(zoo, tmp_path):
    plain = [zoo.diffusers("sd1", s) for s in (1, 2)]
    sharded = zoo.diffusers("sd1", 1, shard="2MB")
    assert len(list((sharded / "unet").glob("*.safetensors"))) > 1
    assert list((sharded / "unet").glob("*.index.json"))
    r1 = hubmix.merge(Recipe(models=[str(p) for p in plain], method="weighted_sum"), out=tmp_path / "o1", quiet=True)
    r2 = hubmix.merge(Recipe(models=[str(sharded), str(plain[1])], method="weighted_sum"), out=tmp_path / "o2",
                      quiet=True)
    for comp in COMPONENTS["sd1"]:
        t1, t2 = tensors(tmp_path / "o1", comp), tensors(tmp_path / "o2", comp)
        assert all(torch.equal(t1[k], t2[k]) for k in t1)
    assert r1.summary.merged == r2.summary.merged
    # an fp16 variant folder: found on its own, and asked for by --variant
    var = zoo.diffusers("sd1", 2, dtype="fp16", variant="fp16")
    assert list((var / "unet").glob("*.fp16.safetensors"))
    hubmix.merge(Recipe(models=[str(var), str(var)], method="weighted_sum", variant="fp16"), out=tmp_path / "o3",
                 quiet=True)
    assert (tmp_path / "o3" / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    hubmix.merge(Recipe(models=[str(var), str(plain[0])], method="weighted_sum"), out=tmp_path / "o4", quiet=True)
    with pytest.raises(hubmix.InputError, match="no 'bf16' variant"):
        hubmix.merge(Recipe(models=[str(var)] * 2, method="weighted_sum", variant="bf16"), out=tmp_path / "o5",
                     quiet=True)


def test_cli_and_recipe_give_byte_identical_output(zoo, tmp_path, cli):
    a, b, c = (zoo.diffusers("sd1", s) for s in (1, 2, 3))
    r1, r2, r3 = tmp_path / "cli", tmp_path / "recipe", tmp_path / "again"
    recipe_file = tmp_path / "r.yaml"
    code, _, err = cli("merge", a, b, c, "--method", "lossless", "--beta", "1.05", "--dtype", "fp16",
                       "--out", r1, "-q", "--save-recipe", recipe_file)
    assert code == 0, err
    code, _, err = cli("merge", "--recipe", recipe_file, "--out", r2, "-q")
    assert code == 0, err
    code, _, err = cli("merge", a, b, c, "-m", "lossless", "--beta", "1.05", "--dtype", "fp16", "--out", r3, "-q")
    files = sorted(p.relative_to(r1) for p in r1.rglob("*") if p.is_file())
    assert any(str(f).endswith(".safetensors") for f in files)
    for f in files:
        assert (r1 / f).read_bytes() == (r2 / f).read_bytes() == (r3 / f).read_bytes(), f
    meta = json.loads(__import__("safetensors").safe_open(str(r1 / "unet" / "diffusion_pytorch_model.safetensors"),
                                                           "pt").metadata()["hubmix.recipe"])
    assert meta["components"]["unet"]["params"] == {"alpha": 1.0, "beta": 1.05}
    assert meta["models"][0]["ref"] == a.name and str(a.parent) not in json.dumps(meta)  # no local paths


def test_small_chunks_give_the_same_bytes(zoo, tmp_path, monkeypatch):
    from hubmix.engine import pipeline as engine

    inputs = [str(zoo.diffusers("sd1", s)) for s in (1, 2, 3)]
    hubmix.merge(Recipe(models=inputs, method="lossless"), out=tmp_path / "whole", quiet=True)
    monkeypatch.setattr(engine, "DEFAULT_CHUNK", 1000)
    hubmix.merge(Recipe(models=inputs, method="lossless"), out=tmp_path / "chunked", quiet=True, workers=3)
    f = Path("unet") / "diffusion_pytorch_model.safetensors"
    assert (tmp_path / "whole" / f).read_bytes() == (tmp_path / "chunked" / f).read_bytes()


def test_failed_merge_leaves_the_target_as_it_was(zoo, tmp_path, monkeypatch):
    from hubmix.engine import pipeline as engine

    inputs = [str(zoo.diffusers("sd1", s)) for s in (1, 2, 3)]
    out = tmp_path / "out"
    calls = {"n": 0}
    real = engine.compute

    def flaky(job, views, *rest):
        calls["n"] += 1
        if calls["n"] == 50:
            raise RuntimeError("disk on fire")
        return real(job, views, *rest)

    monkeypatch.setattr(engine, "compute", flaky)
    with pytest.raises(RuntimeError, match="disk on fire"):
        hubmix.merge(Recipe(models=inputs, method="lossless"), out=out, quiet=True)
    assert list(tmp_path.iterdir()) == []  # no target, no temporary sibling
    # an existing target survives a failed --overwrite untouched
    out.mkdir()
    (out / "keep.txt").write_text("old")
    calls["n"] = 0
    with pytest.raises(RuntimeError):
        hubmix.merge(Recipe(models=inputs, method="lossless"), out=out, overwrite=True, quiet=True)
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (out / "keep.txt").read_text() == "old"
    monkeypatch.setattr(engine, "compute", real)
    with pytest.raises(hubmix.OutputError, match="already exists"):
        hubmix.merge(Recipe(models=inputs, method="lossless"), out=out, quiet=True)
    hubmix.merge(Recipe(models=inputs, method="lossless"), out=out, overwrite=True, quiet=True)
    assert not (out / "keep.txt").exists() and (out / "model_index.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_dry_run_reports_similarity_and_writes_nothing(zoo, tmp_path, cli):
    a, b, c = (zoo.diffusers("sd1", s) for s in (1, 2, 3))
    code, out, err = cli("merge", a, b, c, "--method", "lossless", "--dry", "--json", "-q")
    assert code == 0, err
    data = json.loads(out)
    unet = data["report"]["unet"]
    assert {"IN00", "IN01", "M00", "OUT00"} <= set(unet["blocks"]) and "BASE" not in unet["blocks"]
    # check the totals against an independent computation
    ta, tb, tc = (tensors(p, "unet") for p in (a, b, c))
    av = torch.cat([ta[k].reshape(-1) for k in sorted(ta)]).double()
    bv = torch.cat([tb[k].reshape(-1) for k in sorted(ta)]).double()
    cv = torch.cat([tc[k].reshape(-1) for k in sorted(ta)]).double()
    row = unet["total"]["inputs"]["b"]
    assert row["cosine"] == pytest.approx(float(av @ bv / (av.norm() * bv.norm())), rel=1e-5)
    assert row["rel_l2"] == pytest.approx(float((bv - av).norm() / av.norm()), rel=1e-4)
    assert row["ls_scale"] == pytest.approx(float(av @ bv / (bv @ bv)), rel=1e-5)
    share_b = float(((av - bv).abs() <= (av - cv).abs()).double().mean())
    assert unet["total"]["share"]["b"] == pytest.approx(share_b, abs=2e-3)
    assert unet["total"]["share"]["b"] + unet["total"]["share"]["c"] == pytest.approx(1.0)
    code, text, _ = cli("merge", a, b, c, "--method", "lossless", "--dry", "-q")
    assert code == 0 and "cosine" in text and "IN00" in text and "share" in text
    assert not any(p.name.startswith(".") for p in Path.cwd().iterdir() if "hubmix-tmp" in p.name)


def test_progress_bar_and_quiet(zoo, tmp_path, cli):
    inputs = [zoo.diffusers("sd1", s) for s in (1, 2)]
    code, _, err = cli("merge", *inputs, "-m", "weighted_sum", "--out", tmp_path / "o1")
    assert code == 0 and "merging" in err and "100%" in err
    code, out, err = cli("merge", *inputs, "-m", "weighted_sum", "--out", tmp_path / "o2", "-q")
    assert code == 0 and err == "" and out == ""


def _transform_model(src: Path, dst: Path, fn) -> Path:
    """A copy of a diffusers folder with every float tensor replaced by fn(tensor)."""
    from safetensors.torch import save_file

    shutil.copytree(src, dst)
    for f in dst.rglob("*.safetensors"):
        sd = {k: (fn(v) if v.is_floating_point() else v) for k, v in load_tensors(f).items()}
        save_file(sd, str(f), metadata={"format": "pt"})
    return dst


def test_ties_on_whole_models(zoo, tmp_path):
    """a = 0, c = -b: every element is a tie; lossless must take b everywhere and maxdiff c everywhere."""
    b = zoo.diffusers("sd1", 2)
    a = _transform_model(b, tmp_path / "zeros", torch.zeros_like)
    c = _transform_model(b, tmp_path / "negated", torch.neg)
    for method, winner in (("lossless", b), ("maxdiff", c)):
        out = tmp_path / method
        hubmix.merge(Recipe(models=[str(a), str(b), str(c)], method=method), out=out, quiet=True)
        for comp in COMPONENTS["sd1"]:
            got, want = tensors(out, comp), tensors(winner, comp)
            assert all(torch.equal(got[k], want[k]) for k in want), (method, comp)


def test_two_model_selection_with_unit_scales_is_flagged(zoo, tmp_path):
    """|ab - a| = ref_alpha*|a - b| and |ab - b| = (1-ref_alpha)*|a - b|: with alpha = beta = 1 one model wins
    everywhere. The merge does as asked, and the summary says so."""
    a, b = (zoo.diffusers("sd1", s, dtype="fp16") for s in (1, 2))
    r = hubmix.merge(Recipe(models=[str(a), str(b)], method="lossless"), out=tmp_path / "plain", quiet=True)
    assert any("cannot choose element by element" in x for x in r.summary.events["note"])
    got, want = tensors(tmp_path / "plain", "unet"), tensors(a, "unet")
    assert all(torch.equal(got[k], want[k]) for k in want)  # fp16 values: exact in float32, a wins every tie
    r = hubmix.merge(Recipe(models=[str(a), str(b)], method="lossless", params={"beta": 1.05}),
                     out=tmp_path / "scaled", quiet=True)
    assert not any("element by element" in x for x in r.summary.events.get("note", []))
    got = tensors(tmp_path / "scaled", "unet")
    assert any(not torch.equal(got[k], want[k]) for k in want)  # now b supplies some elements
