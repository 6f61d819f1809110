"""The methods themselves: the seed's exact semantics on hand-made tensors, and the registry's contract."""

import pytest
import torch

from hubmix.errors import RecipeError
from hubmix.methods import get_method, methods


def run(name, xs, n=None, **params):
    m = get_method(name)
    return m([torch.tensor(x, dtype=torch.float32) for x in xs], m.resolve_params(params, n or len(xs), "test"))


def test_seed_example():
    out = run("lossless", [[0.2, -0.02], [0.25, -0.06], [0.3, -0.03]])
    assert out.tolist() == pytest.approx([0.25, -0.03])
    assert torch.equal(out, torch.tensor([0.25, -0.03]))  # values taken unchanged, not recomputed


def test_lossless_tie_takes_b_and_maxdiff_tie_takes_c():
    a, b, c = [1.0, 0.0], [2.0, 1.0], [0.0, -1.0]  # |a-b| == |a-c| everywhere
    assert run("lossless", [a, b, c]).tolist() == b
    assert run("maxdiff", [a, b, c]).tolist() == c


def test_maxdiff_takes_the_farther():
    out = run("maxdiff", [[0.2, -0.02], [0.25, -0.06], [0.3, -0.03]])
    assert out.tolist() == pytest.approx([0.3, -0.06])


def test_alpha_beta_change_only_the_selection():
    a, b, c = [1.0, 1.0], [2.0, 0.5], [3.0, 1.75]
    plain = run("lossless", [a, b, c])
    assert plain.tolist() == [2.0, 0.5]
    # beta scales c in the comparison only: |1 - 0.4*3| = 0.2 < |1 - 2| -> c's unscaled value 3.0 is taken,
    # and |1 - 0.4*1.75| = 0.3 < |1 - 0.5| -> 1.75, not 0.7
    assert run("lossless", [a, b, c], beta=0.4).tolist() == [3.0, 1.75]
    # alpha likewise: |1 - 3*2| = 5 > |1 - 3| -> c's 3.0; |1 - 3*0.5| = 0.5 < 0.75 -> b's unscaled 0.5
    assert run("lossless", [a, b, c], alpha=3.0).tolist() == [3.0, 0.5]


def test_two_model_lossless_runs_against_the_weighted_sum():
    a = torch.tensor([0.0, 1.0, 4.0])
    b = torch.tensor([1.0, 0.0, 2.0])
    m = get_method("lossless")
    out = m([a, b], m.resolve_params({"ref_alpha": 0.25}, 2, "t"))
    ref = 0.75 * a + 0.25 * b
    expect = torch.where((ref - a).abs() <= (ref - b).abs(), a, b)
    assert torch.equal(out, expect)
    assert torch.equal(out, a)  # the reference is nearer to a everywhere with ref_alpha < 0.5


def test_weighted_sum_and_add_difference_formulas():
    a, b, c = torch.randn(100), torch.randn(100), torch.randn(100)
    ws = get_method("weighted_sum")
    assert torch.equal(ws([a, b], {"alpha": 0.3}), (1 - 0.3) * a + 0.3 * b)
    ad = get_method("add_difference")
    assert torch.equal(ad([a, b, c], {"alpha": 0.7}), a + 0.7 * (b - c))


def test_registry_declares_everything_the_cli_and_card_need():
    for m in methods().values():
        assert m.formula and m.reference and m.summary and m.models
        for p in m.params:
            assert p.help
            if p.choices:
                assert p.default in p.choices
            else:
                assert isinstance(p.default, int if p.integer else float)
                assert p.check(p.default, "default") == p.default  # the default is within its own range
        assert m.reference.startswith("https://")


@pytest.mark.parametrize("name, n, params, msg", [
    ("weighted_sum", 2, {"alpha": 1.5}, "outside"),
    ("weighted_sum", 2, {"beta": 1.0}, "no parameter beta"),
    ("lossless", 3, {"ref_alpha": 0.5}, "with 3 models"),
    ("lossless", 3, {"alpha": "x"}, "must be a number"),
])
def test_parameter_validation(name, n, params, msg):
    with pytest.raises(RecipeError, match=msg):
        get_method(name).resolve_params(params, n, "recipe.yaml")


def test_model_count_and_unknown_method():
    with pytest.raises(RecipeError, match="merges 3 models, got 2"):
        get_method("add_difference").check_models(2, "x")
    with pytest.raises(RecipeError, match="unknown merge method 'nope'"):
        get_method("nope")
