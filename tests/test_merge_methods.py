"""The field's methods (slerp, train_difference, triple_sum, sum_twice, ties, dare, model_stock) on tiny SD1.x and
SDXL models, element by element against independent numpy implementations written from the formulas in
docs/methods.md, with their edge cases; and the whole-tensor engine path (statistics, then elements) under
forced chunking."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch
from test_merge import COMPONENTS, _transform_model, tensors

import hubmix
from hubmix import Recipe
from hubmix.engine.pipeline import Settings

F = np.float32


# ---- the independent implementation -------------------------------------------------------------------------------

def np_triple_sum(key, a, b, c, alpha=0.33, beta=0.33):
    return F(1 - alpha - beta) * a + F(alpha) * b + F(beta) * c


def np_sum_twice(key, a, b, c, alpha=0.5, beta=0.5):
    return F(1 - beta) * (F(1 - alpha) * a + F(alpha) * b) + F(beta) * c


def np_train_difference(key, a, b, c, alpha=1.0):
    x = np.abs(b - a)
    d = b - c
    den = x + np.abs(d)
    with np.errstate(invalid="ignore", divide="ignore"):
        w = np.where(den == 0, F(0), x / den)
    return a + F(alpha) * d * F(1.8) * w


def np_slerp(key, a, b, alpha=0.5):
    """The formula as written (float64), the weighted sum where it is not finite."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    na, nb = np.linalg.norm(a64), np.linalg.norm(b64)
    with np.errstate(invalid="ignore", divide="ignore"):
        ua, ub = a64 / na, b64 / nb
        w = np.arccos(np.clip(np.sum(ua * ub), -1, 1))
        out = (np.sin((1 - alpha) * w) * ua + np.sin(alpha * w) * ub) / np.sin(w) * ((1 - alpha) * na + alpha * nb)
    if not np.isfinite(out).all():
        return F(1 - alpha) * a + F(alpha) * b
    return out.astype(np.float32)


def np_elect(ts):
    total = ts[0]
    for t in ts[1:]:
        total = total + t
    s = np.sign(total)
    agree = [np.sign(t) == s for t in ts]
    sums = sum(np.where(g, t, F(0)) for g, t in zip(agree, ts))
    count = sum(g.astype(np.float32) for g in agree)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, sums / count, F(0))


def np_ties(key, a, *ms, density=0.2, **kw):
    lam = kw.get("lambda", 1.0)
    trimmed = []
    for m in ms:
        t = m - a
        mag = np.abs(t).ravel()
        k = max(int((1 - density) * mag.size), 1)
        thr = np.partition(mag, k - 1)[k - 1]  # the k-th smallest magnitude
        trimmed.append(np.where(np.abs(t) >= thr, t, F(0)))
    return a + F(lam) * np_elect(trimmed)


def np_mix32(x):
    x = x.astype(np.uint32)
    x ^= x >> np.uint32(16)
    x *= np.uint32(0x7FEB352D)
    x ^= x >> np.uint32(15)
    x *= np.uint32(0x846CA68B)
    return x ^ (x >> np.uint32(16))


def np_keep(seed, key, model, n, p):
    """The documented drop mask: uint32 arithmetic wrapping mod 2^32 (tensors here are far below 2^32 elements)."""
    s = np_mix32(np_mix32(np_mix32(np.array(seed)) ^ np.uint32(zlib.crc32(key.encode()))) ^ np.uint32(model))
    lo = np.arange(n, dtype=np.uint32)
    with np.errstate(over="ignore"):
        h = np_mix32(np_mix32(lo ^ np_mix32(s ^ np.uint32(0))) ^ s)
    return h >= np.uint32(int(p * 2**32))


def np_dare(key, a, *ms, drop=0.9, seed=0, combine="sum", **kw):
    lam = kw.get("lambda", 1.0)
    ds = []
    for i, m in enumerate(ms, start=1):
        t = m - a
        keep = np_keep(seed, key, i, t.size, drop).reshape(t.shape)
        ds.append(np.where(keep, t / F(1 - drop), F(0)) if drop else t)
    if combine == "ties":
        return a + F(lam) * np_elect(ds)
    total = ds[0]
    for d in ds[1:]:
        total = total + d
    return a + F(lam) * total


def np_model_stock(key, a, *ms):
    ts = [(m - a).astype(np.float64).ravel() for m in ms]
    n = len(ts)
    cos = []
    for i in range(n):
        for j in range(i + 1, n):
            norms = np.linalg.norm(ts[i]) * np.linalg.norm(ts[j])
            cos.append(float(ts[i] @ ts[j] / norms) if norms > 0 else 0.0)
    c = float(np.mean(cos))
    t = n * c / (1 + (n - 1) * c) if 1 + (n - 1) * c != 0 else 0.0
    mean = sum(ms[1:], ms[0]) / F(n)
    return F(t) * mean + F(1 - t) * a


EXACT = [
    ("triple_sum", 3, {"alpha": 0.2, "beta": 0.45}, np_triple_sum),
    ("sum_twice", 3, {"alpha": 0.3, "beta": 0.6}, np_sum_twice),
    ("train_difference", 3, {"alpha": 0.8}, np_train_difference),
    ("ties", 3, {"density": 0.3, "lambda": 0.9}, np_ties),
    ("ties", 4, {"density": 1.0}, np_ties),
    ("dare", 2, {"drop": 0.3, "seed": 7}, np_dare),
    ("dare", 3, {"drop": 0.9, "lambda": 0.5, "seed": 1}, np_dare),
    ("dare", 3, {"drop": 0.5, "combine": "ties"}, np_dare),
]
CLOSE = [  # per-tensor float64 scalars (norms, cosines) computed two ways: within float32 rounding
    ("slerp", 2, {"alpha": 0.3}, np_slerp),
    ("model_stock", 3, {}, np_model_stock),
    ("model_stock", 4, {}, np_model_stock),
]


def expected(inputs, comp, fn, params):
    sds = [tensors(p, comp) for p in inputs]
    return {k: torch.from_numpy(np.asarray(fn(f"{comp}/{k}", *[sd[k].float().numpy() for sd in sds], **params),
                                           dtype=np.float32)) for k in sds[0]}


def merged(inputs, method, params, out, **settings):
    hubmix.merge(Recipe(models=[str(p) for p in inputs], method=method, params=params), out=out, quiet=True,
                 settings=Settings(**settings))
    return out


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("method, n, params, fn", EXACT + CLOSE,
                         ids=[f"{c[0]}-{c[1]}-{i}" for i, c in enumerate(EXACT + CLOSE)])
def test_method_matches_numpy(zoo, tmp_path, family, method, n, params, fn):
    inputs = [zoo.diffusers(family, seed) for seed in (1, 2, 3, 4)[:n]]
    out = merged(inputs, method, params, tmp_path / "out")
    for comp in COMPONENTS[family]:
        got, want = tensors(out, comp), expected(inputs, comp, fn, params)
        assert set(got) == set(want), comp
        if (method, n, params, fn) in EXACT:
            bad = [k for k in want if not torch.equal(got[k], want[k])]
            assert not bad, f"{comp}: {len(bad)} tensors differ, e.g. {bad[:3]}"
        else:
            a = tensors(inputs[0], comp)  # read once per component, not once per key
            for k in want:
                torch.testing.assert_close(got[k], want[k], rtol=2e-5, atol=1e-6, msg=f"{comp}/{k}")
                assert not torch.equal(got[k], a[k]), f"{comp}/{k} is model a"


def test_whole_tensor_methods_under_forced_chunking(zoo, tmp_path, monkeypatch):
    """Chunks of 4096 elements (statistics summed over many chunks, the top-k threshold from many histograms) give
    the bytes of whole tensors, with 1 or 4 workers, eager or native."""
    from hubmix.engine import pipeline as engine

    inputs = [zoo.diffusers("sd1", s, dtype="fp16") for s in (1, 2, 3)]
    for method, n, params in [("ties", 3, {"density": 0.25}), ("slerp", 2, {"alpha": 0.4}),
                              ("model_stock", 3, {}), ("dare", 3, {"drop": 0.6, "combine": "ties"})]:
        whole = merged(inputs[:n], method, params, tmp_path / f"{method}-whole", workers=1, kernels="eager")
        monkeypatch.setattr(engine, "chunk_elements", lambda *a, **k: 4096)
        small = merged(inputs[:n], method, params, tmp_path / f"{method}-small", workers=4)
        monkeypatch.undo()
        for f in sorted(whole.rglob("*.safetensors")):
            assert f.read_bytes() == (small / f.relative_to(whole)).read_bytes(), (method, f)


# ---- edge cases ---------------------------------------------------------------------------------------------------

def test_slerp_falls_back_to_the_weighted_sum_for_parallel_and_zero_tensors(zoo, tmp_path):
    a = zoo.diffusers("sd1", 1)
    doubled = _transform_model(a, tmp_path / "doubled", lambda t: 2 * t)
    zeros = _transform_model(a, tmp_path / "zeros", torch.zeros_like)
    for b in (doubled, zeros):
        out = merged([a, b], "slerp", {"alpha": 0.3}, tmp_path / f"slerp-{b.name}")
        for comp in COMPONENTS["sd1"]:
            got, x, y = tensors(out, comp), tensors(a, comp), tensors(b, comp)
            for k in got:
                assert torch.equal(got[k], F(0.7).item() * x[k] + F(0.3).item() * y[k]), (b.name, comp, k)
                assert torch.isfinite(got[k]).all()


def test_train_difference_zero_over_zero_is_zero(zoo, tmp_path):
    a = zoo.diffusers("sd1", 1)
    out = merged([a, a, a], "train_difference", {"alpha": 1.0}, tmp_path / "td")
    for comp in COMPONENTS["sd1"]:
        got, want = tensors(out, comp), tensors(a, comp)
        assert all(torch.equal(got[k], want[k]) for k in want), comp


def test_ties_where_no_sign_agrees_gives_the_base(zoo, tmp_path):
    """a = 0, b = m, c = -m: the task vectors cancel everywhere; with density 1 nothing is trimmed, no element
    agrees with the elected sign 0, the mean is 0 and out = a (no NaN from 0/0)."""
    m = zoo.diffusers("sd1", 2)
    a = _transform_model(m, tmp_path / "zeros", torch.zeros_like)
    c = _transform_model(m, tmp_path / "negated", torch.neg)
    out = merged([a, m, c], "ties", {"density": 1.0}, tmp_path / "ties")
    for comp in COMPONENTS["sd1"]:
        got = tensors(out, comp)
        assert all(torch.equal(v, torch.zeros_like(v)) for v in got.values()), comp


def test_model_stock_zero_task_vectors(zoo, tmp_path):
    """A zero task vector has cosine 0 with every other: with N=2 and one zero, cos = 0, t = 0 and out = a; with
    every task vector zero, out = a too."""
    a, b = zoo.diffusers("sd1", 1), zoo.diffusers("sd1", 2)
    for models in ([a, a, b], [a, a, a]):
        out = merged(models, "model_stock", {}, tmp_path / f"stock-{len(set(models))}")
        for comp in COMPONENTS["sd1"]:
            got, want = tensors(out, comp), tensors(a, comp)
            assert all(torch.equal(got[k], want[k]) for k in want), comp


def test_top_k_threshold_equals_kthvalue():
    """The radix select over float bits, fed in chunks, finds torch.kthvalue's value, duplicates and zeros
    included."""
    from hubmix.methods.statistics import BLOCK, Totals, bits_to_float, high_histogram, low_histogram, select_bin

    g = torch.Generator().manual_seed(0)
    t = torch.randn(50_000, generator=g)
    t[:5000] = 0.0
    t[5000:9000] = -0.5
    t[9000:9100] = float("inf")
    for k in (1, 2, 4999, 5000, 5001, 9000, 12_345, 49_999, 50_000):
        parts = [t[s:s + 3 * BLOCK] for s in range(0, t.numel(), 3 * BLOCK)]
        hi = Totals()
        for p in parts:
            hi.add({"h": high_histogram(p)})
        h, rank = select_bin(hi.result()["h"], k)
        lo = Totals()
        for p in parts:
            lo.add({"l": low_histogram(p, h)})
        value = bits_to_float(h, select_bin(lo.result()["l"], rank)[0])
        assert value == float(torch.kthvalue(t.abs(), k).values), k


def test_dry_run_works_for_whole_tensor_methods(zoo, tmp_path, cli):
    import json

    a, b, c = (zoo.diffusers("sd1", s) for s in (1, 2, 3))
    code, out, err = cli("merge", a, b, c, "--method", "ties", "--density", "0.5", "--dry", "--json", "-q")
    assert code == 0, err
    unet = json.loads(out)["report"]["unet"]["total"]
    assert "share" not in unet and unet["inputs"]["b"]["cosine"] is not None
    assert not list(tmp_path.iterdir())
