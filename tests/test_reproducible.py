"""Identical results on every machine: the per-tensor sums that decide output bytes (slerp's norms and dot product,
model_stock's cosines) are computed in one fixed order, so the bytes do not depend on the thread count, the CPU's
vector width (torch's ATEN_CPU_CAPABILITY, as another CPU would run it), the grouping torch's own reductions use,
chunking, or whether the native library computes them; and they equal numpy float64 references. Also: two-model
lossless selecting element by element, against numpy."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hubmix.engine import native
from hubmix.methods import get_method, statistics
from hubmix.methods.registry import Context
from hubmix.methods.statistics import BLOCK

ROOT = Path(__file__).resolve().parents[1]


def np_block_dots(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The documented order, written in numpy: exact float64 products, per block of BLOCK (zero-padded) the tree
    p[i] + p[i + h] for h = BLOCK/2, ..., 1."""
    p = x.astype(np.float64) * y.astype(np.float64)
    p = np.concatenate([p, np.zeros(-len(p) % BLOCK)]).reshape(-1, BLOCK)
    h = BLOCK // 2
    while h >= 1:
        p = p[:, :h] + p[:, h:2 * h]
        h //= 2
    return p[:, 0]


def wide(n: int, seed: int) -> torch.Tensor:
    """Values over many binades, so that any regrouping of a float sum shows in its bits."""
    g = np.random.default_rng(seed)
    return torch.from_numpy((g.standard_normal(n) * np.exp(3 * g.standard_normal(n))).astype(np.float32))


@pytest.fixture
def torch_sums(monkeypatch):
    """The torch path of the block sums (no native library installed)."""
    monkeypatch.setattr(statistics, "native_dots", None)


@pytest.mark.parametrize("n", [1, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 5, statistics.PIECE + 7])
def test_block_sums_follow_the_documented_order(n, torch_sums):
    """torch's block sums equal the numpy transcription of the order bit for bit; each is within the pairwise
    tree's error bound of the exactly rounded sum (math.fsum of the exact products)."""
    x, y = wide(n, 1), wide(n, 2)
    got = statistics.block_dots(x, y).numpy()
    want = np_block_dots(x.numpy(), y.numpy())
    assert got.tobytes() == want.tobytes()
    p = x.double().numpy() * y.double().numpy()
    for b in range(len(got)):
        block = p[b * BLOCK:(b + 1) * BLOCK]
        exact = math.fsum(block.tolist())
        assert abs(got[b] - exact) <= 12 * 2.0 ** -53 * math.fsum(np.abs(block).tolist()), b


def test_native_block_sums_equal_the_torch_ones(monkeypatch):
    if native.Native.library() is None:
        pytest.skip(f"no native kernels here: {native.Native.error()}")
    assert native.install_dropmask()
    for n in (1, BLOCK - 1, BLOCK, 5 * BLOCK + 3):
        x, y = wide(n, 3), wide(n, 4)
        with_c = statistics.block_dots(x, y)
        monkeypatch.setattr(statistics, "native_dots", None)
        assert statistics.block_dots(x, y).numpy().tobytes() == with_c.numpy().tobytes(), n
        monkeypatch.undo()


def test_chunk_and_block_order_do_not_matter():
    """Chunks (starting at multiples of BLOCK) give the block sums of the whole; the total (math.fsum) is the same
    whatever order the chunks' parts arrive in."""
    x, y = wide(7 * BLOCK + 11, 5), wide(7 * BLOCK + 11, 6)
    whole = statistics.block_dots(x, y)
    parts = [statistics.block_dots(x[s:s + 2 * BLOCK], y[s:s + 2 * BLOCK]) for s in range(0, x.numel(), 2 * BLOCK)]
    assert torch.equal(torch.cat(parts), whole)
    totals = []
    for order in (range(len(parts)), reversed(range(len(parts))), [2, 0, 3, 1]):
        t = statistics.Totals()
        for i in order:
            t.add({"s": parts[i]})
        totals.append(t.result()["s"])
    assert totals[0] == totals[1] == totals[2]


def _old_block_sums(x: torch.Tensor) -> torch.Tensor:
    """hubmix's previous statistics: float32 products summed by torch per block (grouped as torch likes)."""
    return x.view(-1, BLOCK).sum(1).double()


def test_regrouped_torch_reductions_change_the_old_sums_not_the_new(monkeypatch, torch_sums):
    """torch's sum regrouped (its operands rotated, as a CPU with another vector width groups them) changes the old
    float32 block sums, and changes nothing now: no torch reduction decides a bit, in the sums or in slerp's and
    model_stock's outputs."""
    x, y = wide(16 * BLOCK, 7), wide(16 * BLOCK, 8)
    xs = [wide(20 * BLOCK + 9, s) for s in (10, 11, 12)]
    ctx = Context("unet/k")

    def everything():
        return (_old_block_sums(x * y).numpy().tobytes(), statistics.block_dots(x, y).numpy().tobytes(),
                get_method("slerp")(xs[:2], {"alpha": 0.3}, ctx).numpy().tobytes(),
                get_method("model_stock")(xs, {}, ctx).numpy().tobytes())

    before = everything()
    sum_ = torch.Tensor.sum

    def regrouped(self, *args, **kwargs):
        return sum_(torch.roll(self, 3, -1), *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "sum", regrouped)
    monkeypatch.setattr(torch, "sum", regrouped)
    after = everything()
    assert before[0] != after[0], "the regrouping should show in float32 sums"
    assert before[1:] == after[1:]


_PROBE = r"""
import hashlib, json, sys, numpy as np, torch
sys.path.insert(0, sys.argv[1])
torch.set_num_threads(int(sys.argv[2]))
from hubmix.methods import get_method, statistics
from hubmix.methods.registry import Context
statistics.native_dots = None
def wide(n, seed):  # numpy's: torch's exp differs between vector widths, and the inputs must not
    g = np.random.default_rng(seed)
    return torch.from_numpy((g.standard_normal(n) * np.exp(3 * g.standard_normal(n))).astype(np.float32))
x, y = wide(64 * 4096, 1), wide(64 * 4096, 2)
xs = [wide(300_000, s) for s in (3, 4, 5)]
h = lambda t: hashlib.sha256(t.numpy().tobytes()).hexdigest()
print(json.dumps({"capability": torch.backends.cpu.get_cpu_capability(),
                  "new": h(statistics.block_dots(x, y)),
                  "slerp": h(get_method("slerp")(xs[:2], {"alpha": 0.3}, Context("k"))),
                  "stock": h(get_method("model_stock")(xs, {}, Context("k"))),
                  "ties": h(get_method("ties")(xs, {"density": 0.3, "lambda": 1.0}, Context("k"))),
                  "dare": h(get_method("dare")(xs, {"drop": 0.5, "lambda": 1.0, "seed": 1, "combine": "ties"},
                                               Context("k")))}))
"""


def _probe(threads: int, capability: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    if capability:
        env["ATEN_CPU_CAPABILITY"] = capability
    r = subprocess.run([sys.executable, "-c", _PROBE, str(ROOT), str(threads)], env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_same_bytes_with_other_threads_and_vector_widths():
    """torch with 1 thread and its scalar kernels (ATEN_CPU_CAPABILITY=default) against 2 threads and this CPU's
    vector kernels, in fresh processes: the sums and the methods' outputs are the same bytes. (torch 2.13 happens
    to group its float32 block sums alike under both here; the regrouping test above shows what another grouping
    does to them.)"""
    scalar, vector = _probe(1, "default"), _probe(2, None)
    assert scalar["capability"] == "DEFAULT"
    for k in ("new", "slerp", "stock", "ties", "dare"):
        assert scalar[k] == vector[k], k


def test_threads_in_process(torch_sums):
    xs = [wide(40 * BLOCK + 1, s) for s in (20, 21, 22)]
    threads = torch.get_num_threads()
    out = []
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            out.append((get_method("slerp")(xs[:2], {"alpha": 0.7}, Context()).numpy().tobytes(),
                        get_method("model_stock")(xs, {}, Context()).numpy().tobytes(),
                        get_method("ties")(xs, {"density": 0.2, "lambda": 1.0}, Context()).numpy().tobytes()))
    finally:
        torch.set_num_threads(threads)
    assert out[0] == out[1]


# ---- against numpy float64 references --------------------------------------------------------------------------

EPS32 = 2.0 ** -24


def test_slerp_and_model_stock_equal_float64_references():
    """Every element within a few float32 roundings of its terms: |out - ref| <= 4 eps32 (|ka a| + |kb b|) for
    slerp with ka, kb from float64 numpy; likewise for model_stock's t*mean + (1-t)*a."""
    a, b, c = (wide(5 * BLOCK + 3, s).numpy() for s in (30, 31, 32))
    a64, b64, c64 = (v.astype(np.float64) for v in (a, b, c))
    alpha = 0.3
    got = get_method("slerp")([torch.from_numpy(a), torch.from_numpy(b)], {"alpha": alpha}, Context()).numpy()
    na, nb = math.sqrt(math.fsum(a64 * a64)), math.sqrt(math.fsum(b64 * b64))
    w = math.acos(max(-1.0, min(1.0, math.fsum(a64 * b64) / (na * nb))))
    scale = (1 - alpha) * na + alpha * nb
    ka, kb = math.sin((1 - alpha) * w) / math.sin(w) * scale / na, math.sin(alpha * w) / math.sin(w) * scale / nb
    ref = ka * a64 + kb * b64
    assert np.all(np.abs(got - ref) <= 4 * EPS32 * (np.abs(ka * a64) + np.abs(kb * b64)))

    got = get_method("model_stock")([torch.from_numpy(v) for v in (a, b, c)], {}, Context()).numpy()
    t1, t2 = b64 - a64, c64 - a64
    cos = math.fsum(t1 * t2) / math.sqrt(math.fsum(t1 * t1) * math.fsum(t2 * t2))
    t = 2 * cos / (1 + cos)
    mean = (b64 + c64) / 2
    ref = t * mean + (1 - t) * a64
    terms = abs(t) * (np.abs(b64) + np.abs(c64)) / 2 + abs(1 - t) * np.abs(a64)
    assert np.all(np.abs(got - ref) <= 6 * EPS32 * terms)


# ---- two-model lossless, as configs/lossless-2way.yaml ships it ------------------------------------------------

def test_two_model_lossless_example_selects_element_by_element(zoo, tmp_path):
    """The shipped example's parameters merge two models into a third: every element taken unchanged from a or b
    as numpy (float32, from the formula) decides, and the result is neither input."""
    import hubmix
    from hubmix import Recipe
    from test_merge import COMPONENTS, tensors

    CONFIG = ROOT / "configs" / "lossless-2way.yaml"
    p = Recipe.load(CONFIG).params
    r, alpha, beta = (np.float32(p.get(k, d)) for k, d in (("ref_alpha", 0.5), ("alpha", 1.0), ("beta", 1.0)))
    a_dir, b_dir = zoo.diffusers("sd1", 1), zoo.diffusers("sd1", 2)
    out = tmp_path / "out"
    hubmix.merge(Recipe(models=[str(a_dir), str(b_dir)], method="lossless", params=p), out=out, quiet=True)
    shares = []
    for comp in COMPONENTS["sd1"]:
        got, ta, tb = tensors(out, comp), tensors(a_dir, comp), tensors(b_dir, comp)
        for k in got:
            a, b = ta[k].float().numpy(), tb[k].float().numpy()
            ref = (np.float32(1) - r) * a + r * b
            take_a = np.abs(ref - alpha * a) <= np.abs(ref - beta * b)
            want = torch.where(torch.from_numpy(take_a), ta[k], tb[k])
            assert torch.equal(got[k], want), (comp, k)
            if not torch.equal(ta[k], tb[k]):
                shares.append(take_a.mean())
    assert 0.1 < float(np.mean(shares)) < 0.9, "the example should take elements from both models"
    assert any(0 < s < 1 for s in shares)


# ---- a baked LoRA's delta -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("rows, rank, cols", [(7, 1, 5), (64, 3, 33), (96, 16, 100), (40, 32, 9)])
def test_lora_delta_in_a_fixed_order(rows, rank, cols):
    """total += scale * up @ down without a matmul: torch's element-wise path and the native one give the same
    bits, with 1 and 2 threads, within float64 rounding of the exact products' sum."""
    from hubmix.engine import lora

    g = np.random.default_rng(rows)
    up = torch.from_numpy(g.standard_normal((rows, rank)).astype(np.float32))
    down = torch.from_numpy((g.standard_normal((rank, cols)) * np.exp(2 * g.standard_normal((rank, cols))))
                            .astype(np.float32))
    start = torch.from_numpy(g.standard_normal((rows, cols)))
    results = []
    threads = torch.get_num_threads()
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            total = start.clone()
            lora.add_delta(up, down, 0.7, total)
            results.append(total.numpy().tobytes())
    finally:
        torch.set_num_threads(threads)
    assert results[0] == results[1]
    if native.Native.library() is not None:
        total = start.clone()
        assert native.lora_delta(up, down, 0.7, total)
        assert total.numpy().tobytes() == results[0]
    exact = np.array([[math.fsum(float(up[i, k]) * float(down[k, j]) for k in range(rank)) for j in range(cols)]
                      for i in range(rows)])
    terms = np.abs(up.double().numpy()) @ np.abs(down.double().numpy())
    got = np.frombuffer(results[0]).reshape(rows, cols)
    want = start.numpy() + 0.7 * exact
    assert np.all(np.abs(got - want) <= (rank + 3) * 2.0 ** -52 * (0.7 * terms + np.abs(want)))
