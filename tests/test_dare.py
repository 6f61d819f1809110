"""DARE's drop mask is a pure function of (seed, tensor name, model index, element index): the same bytes on every
run, with any workers, chunking and kernels; it drops a share p of the elements and rescales the rest by exactly
1/(1-p). Also the CLI spelling of its parameters (--dare-seed, --dare-combine) against the recipe keys."""

from __future__ import annotations

import pytest
import torch

import hubmix
from hubmix import Recipe
from hubmix.engine.pipeline import Settings
from hubmix.methods import dropmask, get_method
from hubmix.methods.registry import Context

RECIPE = {"drop": 0.7, "seed": 1234, "lambda": 0.8}


def _merge(zoo, out, params=RECIPE, **settings):
    inputs = [str(zoo.diffusers("sd1", s, dtype="fp16")) for s in (1, 2, 3)]
    return hubmix.merge(Recipe(models=inputs, method="dare", params=params), out=out, quiet=True,
                        settings=Settings(**settings))


def _files(folder):
    return {f.relative_to(folder): f.read_bytes() for f in sorted(folder.rglob("*.safetensors"))}


def test_same_bytes_across_runs_workers_budgets_and_kernels(zoo, tmp_path, monkeypatch):
    from hubmix.engine import pipeline as engine

    base = _files(_merge(zoo, tmp_path / "base", workers=1, kernels="eager").output)
    # every run below is another run of the same recipe: equal bytes also prove run-to-run stability
    assert base == _files(_merge(zoo, tmp_path / "w4", workers=4, max_memory=1 << 20).output)
    monkeypatch.setattr(engine, "chunk_elements", lambda *a, **k: 4096)  # many chunks per tensor
    monkeypatch.setattr("hubmix.engine.kernels.SUBCHUNK", 1000)  # eager pieces that do not divide the chunks
    assert base == _files(_merge(zoo, tmp_path / "small", workers=4, kernels="native").output)
    assert base == _files(_merge(zoo, tmp_path / "small-eager", workers=2, kernels="eager").output)
    other = _files(_merge(zoo, tmp_path / "seed", {**RECIPE, "seed": 1235}, workers=1).output)
    assert all(other[f] != base[f] for f in base)  # the seed matters


def test_drops_a_share_p_and_rescales_by_exactly_one_over_one_minus_p():
    m = get_method("dare")
    n = 4_000_000
    g = torch.Generator().manual_seed(0)
    t = torch.randn(n, generator=g) + 0.01  # no zeros: a zero output means a dropped element
    a = torch.zeros(n)
    for p in (0.1, 0.75, 0.9):
        out = m([a, t], m.resolve_params({"drop": p}, 2, "t"), Context("unet/big.weight"))
        dropped = float((out == 0).double().mean())
        assert abs(dropped - p) < 0.01 * p, (p, dropped)
        kept = out != 0
        assert torch.equal(out[kept], t[kept] / (1 - p))  # a + 1 * t/(1-p) with a = 0: the rescaled value itself
        if p == 0.75:
            assert torch.equal(out[kept], 4 * t[kept])
    # models and tensors get independent masks
    m1 = dropmask.keep(0, "unet/x", 1, 0, n, 0.5)
    m2 = dropmask.keep(0, "unet/x", 2, 0, n, 0.5)
    m3 = dropmask.keep(0, "unet/y", 1, 0, n, 0.5)
    for other in (m2, m3):
        assert abs(float((m1 & other).double().mean()) - 0.25) < 0.01


def test_a_chunk_is_masked_as_in_the_whole_tensor_and_native_equals_torch():
    from hubmix.engine import native

    s, t = dropmask.stream(9, "unet/k", 1), dropmask.threshold(0.4)
    whole = dropmask.hashes(0, 100_000, s) >= t
    assert torch.equal(whole[33_333:77_777], dropmask.hashes(33_333, 44_444, s) >= t)
    if native.Native.library() is None:
        pytest.skip(f"no native kernels here: {native.Native.error()}")
    saved = dropmask.native_keep
    try:
        assert native.install_dropmask()
        for start, count in ((0, 100_000), (2**32 - 5000, 10_000), (3 * 2**32 + 7, 999)):  # across 2^32 too
            want = dropmask.hashes(start, count, s) >= t
            assert torch.equal(dropmask.native_keep(start, count, s, t), want), start
    finally:
        dropmask.native_keep = saved


def test_cli_spelling_and_recipe_keys(zoo, tmp_path, cli):
    a, b, c = (zoo.diffusers("sd1", s) for s in (1, 2, 3))
    code, _, err = cli("merge", a, b, c, "--method", "dare", "--drop", "0.5", "--dare-seed", "3", "--dare-combine",
                       "ties", "--out", tmp_path / "cli", "-q", "--save-recipe", tmp_path / "r.yaml")
    assert code == 0, err
    text = (tmp_path / "r.yaml").read_text()
    assert "seed: 3" in text and "combine: ties" in text
    hubmix.merge(Recipe(models=[str(a), str(b), str(c)], method="dare",
                        params={"drop": 0.5, "seed": 3, "combine": "ties"}), out=tmp_path / "api", quiet=True)
    assert _files(tmp_path / "cli") == _files(tmp_path / "api")
    code, _, err = cli("merge", a, b, c, "--method", "dare", "--dare-combine", "mean", "--out", tmp_path / "x")
    assert code != 0 and "mean" in err
    code, _, err = cli("merge", "--recipe", tmp_path / "r.yaml", "--dare-seed", "4", "--out", tmp_path / "y")
    assert code != 0 and "--dare-seed" in err


@pytest.mark.parametrize("params, msg", [({"drop": 1.0}, "outside [0, 1)"), ({"seed": 1.5}, "must be an integer"),
                                         ({"seed": -1}, "outside"), ({"combine": "avg"}, "one of sum, ties")])
def test_parameter_validation(params, msg):
    from hubmix.errors import RecipeError

    with pytest.raises(RecipeError, match=msg.replace("[", r"\[").replace(")", r"\)")):
        get_method("dare").resolve_params(params, 3, "recipe.yaml")
