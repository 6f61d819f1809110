"""The seed's methods: lossless and maxdiff (element-wise selection), weighted sum and add difference. torch is
imported where a method runs, so listing methods (CLI help, `hubmix methods`) does not load it."""

from __future__ import annotations

from hubmix.methods.registry import Param, register

ALPHA_SEL = Param("alpha", 1.0, "scale of the first candidate, in the comparison only")
BETA_SEL = Param("beta", 1.0, "scale of the second candidate, in the comparison only")
REF_ALPHA = Param("ref_alpha", 0.5, "with two models: the reference is (1-ref_alpha)*a + ref_alpha*b", 0.0, 1.0,
                  only_with=(2,))


def _selection_inputs(xs: list, ref_alpha: float = 0.5):
    """(reference, first candidate, second candidate): a, b, c; or with two models the weighted sum of a and b,
    computed tensor by tensor and never stored, against a and b."""
    if len(xs) == 3:
        return xs[0], xs[1], xs[2]
    a, b = xs
    return (1 - ref_alpha) * a + ref_alpha * b, a, b


def _selection_sources(n_models: int) -> tuple[int, int]:
    return (1, 2) if n_models == 3 else (0, 1)


def _lossless_choose(xs, alpha=1.0, beta=1.0, ref_alpha=0.5):
    ref, x, y = _selection_inputs(xs, ref_alpha)
    return (ref - alpha * x).abs() <= (ref - beta * y).abs()  # a tie keeps the first candidate


def _maxdiff_choose(xs, alpha=1.0, beta=1.0, ref_alpha=0.5):
    ref, x, y = _selection_inputs(xs, ref_alpha)
    return (ref - alpha * x).abs() > (ref - beta * y).abs()  # a tie goes to the second candidate


def _candidates(xs):
    return tuple(xs[1:]) if len(xs) == 3 else (xs[0], xs[1])


def _two_model_advice(n: int, p: dict[str, float]) -> str | None:
    """With two models and alpha = beta = 1, |ab - a| = ref_alpha*|a - b| and |ab - b| = (1-ref_alpha)*|a - b|:
    the same model wins every element, so the merge is a copy of it."""
    if n == 2 and p["alpha"] == p["beta"] == 1.0:
        r = p["ref_alpha"]
        winner = "a" if r < 0.5 else "b" if r > 0.5 else "a (only float rounding separates them at ref_alpha 0.5)"
        return (f"two-model selection with alpha = beta = 1 cannot choose element by element: |ab - a| = "
                f"ref_alpha*|a - b| and |ab - b| = (1-ref_alpha)*|a - b|, so the nearer one is {winner} everywhere; "
                "set alpha or beta (the dry run's ls scale suggests values)")
    return None


@register(
    "lossless",
    models=(3, 2),
    params=(ALPHA_SEL, BETA_SEL, REF_ALPHA),
    formula="out = where(|a - alpha*b| <= |a - beta*c|, b, c); with two models, a' = (1-ref_alpha)*a + "
            "ref_alpha*b and out = where(|a' - alpha*a| <= |a' - beta*b|, a, b)",
    reference="https://github.com/recoilme/losslessmix",
    summary="each element is taken unchanged from b or c, whichever is nearer to a (a tie takes b)",
    choose=_lossless_choose,
    candidate_names=_selection_sources,
    advice=_two_model_advice,
)
def lossless(xs, alpha=1.0, beta=1.0, ref_alpha=0.5):
    import torch

    x, y = _candidates(xs)
    return torch.where(_lossless_choose(xs, alpha, beta, ref_alpha), x, y)


@register(
    "maxdiff",
    models=(3, 2),
    params=(ALPHA_SEL, BETA_SEL, REF_ALPHA),
    formula="out = where(|a - alpha*b| > |a - beta*c|, b, c); with two models, a' = (1-ref_alpha)*a + "
            "ref_alpha*b and out = where(|a' - alpha*a| > |a' - beta*b|, a, b)",
    reference="https://www.reddit.com/r/StableDiffusion/comments/1012lto/comment/j7aoyso/",
    summary="each element is taken unchanged from b or c, whichever is farther from a (a tie takes c)",
    choose=_maxdiff_choose,
    candidate_names=_selection_sources,
    advice=_two_model_advice,
)
def maxdiff(xs, alpha=1.0, beta=1.0, ref_alpha=0.5):
    import torch

    x, y = _candidates(xs)
    return torch.where(_maxdiff_choose(xs, alpha, beta, ref_alpha), x, y)


@register(
    "weighted_sum",
    models=(2,),
    params=(Param("alpha", 0.5, "weight of b", 0.0, 1.0),),
    formula="out = (1-alpha)*a + alpha*b",
    reference="https://arxiv.org/abs/2203.05482",
    summary="linear interpolation between a and b (A1111's weighted sum; model soups)",
)
def weighted_sum(xs, alpha=0.5):
    a, b = xs
    return (1 - alpha) * a + alpha * b


@register(
    "add_difference",
    models=(3,),
    params=(Param("alpha", 1.0, "scale of the difference b - c"),),
    formula="out = a + alpha*(b - c)",
    reference="https://arxiv.org/abs/2212.04089",
    summary="adds what b learned relative to c onto a (A1111's add difference; task arithmetic)",
)
def add_difference(xs, alpha=1.0):
    a, b, c = xs
    return a + alpha * (b - c)


@register(
    "copy",
    models=(1,),
    formula="out = a",
    reference="https://github.com/huggingface/diffusers (layout conversion)",
    summary="model a unchanged: what `hubmix convert` runs to change layout or dtype",
)
def copy(xs):
    return xs[0]
