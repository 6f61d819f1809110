"""The one registry of merge methods: name, model count, parameters, formula and reference.

The CLI's options and help, recipe validation, the dry-run report and the model card all read from here, so a
method is added in one place. A method's function takes float32 tensors (one per model, same shape) and its
parameters, and returns the merged float32 tensor; it must be element-wise unless it says otherwise, because large
tensors are merged in chunks.

Whole-tensor methods (slerp, ties, dare, model_stock) declare `stats`: passes over the tensor's chunks whose
partial results add up (block sums of products, histograms), each finished into per-tensor scalars, and an
`element` function that merges one chunk given those scalars and its place in the tensor (a `Context`). The engine
runs the passes, then the element pass, chunk by chunk; calling the method on whole tensors does the same in one
go (hubmix.methods.statistics).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from hubmix.errors import RecipeError

if TYPE_CHECKING:  # torch is imported by the code that runs a method, not by the registry (start-up)
    import torch


@dataclass(frozen=True)
class Param:
    name: str  # the recipe key
    default: Any  # a float; an int for integer parameters; one of `choices` for a choice
    help: str
    min: float | None = None
    max: float | None = None
    only_with: tuple[int, ...] | None = None  # model counts the parameter applies to (None: all)
    min_open: bool = False  # the range excludes min / max
    max_open: bool = False
    integer: bool = False
    choices: tuple[str, ...] | None = None
    cli: str | None = None  # the CLI option's name when not --<name> (dare's seed is --dare-seed)

    @property
    def option(self) -> str:
        return "--" + (self.cli or self.name.replace("_", "-"))

    @property
    def range_text(self) -> str:
        if self.choices:
            return "one of " + ", ".join(self.choices)
        if self.min is None and self.max is None:
            return ""
        lo = "(" if self.min_open else "["
        hi = ")" if self.max_open else "]"
        return f"{lo}{_num(self.min)}, {_num(self.max)}{hi}"

    def check(self, value: Any, where: str) -> Any:
        if self.choices:
            if value not in self.choices:
                raise RecipeError(f"{where}: {self.name} must be one of {', '.join(self.choices)}, got {value!r}")
            return value
        try:
            if self.integer:
                if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                    raise ValueError
                v: Any = int(value)
            else:
                v = float(value)
        except (TypeError, ValueError, OverflowError):
            kind = "an integer" if self.integer else "a number"
            raise RecipeError(f"{where}: {self.name} must be {kind}, got {value!r}") from None
        if not math.isfinite(v):  # NaN or inf would turn a whole model into NaN/inf
            raise RecipeError(f"{where}: {self.name} must be a finite number, got {value!r}")
        low = self.min is not None and (v <= self.min if self.min_open else v < self.min)
        high = self.max is not None and (v >= self.max if self.max_open else v > self.max)
        if low or high:
            raise RecipeError(f"{where}: {self.name}={v} is outside {self.range_text}")
        return v


def _num(x: float | None) -> str:
    if x is None:
        return "-inf"
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


@dataclass(frozen=True)
class Context:
    """Where a chunk lies: the tensor's canonical name (component/key) and the flat index of its first element."""

    key: str = ""
    start: int = 0

    def at(self, offset: int) -> "Context":
        return Context(self.key, self.start + offset)


@dataclass(frozen=True)
class StatPass:
    """One pass over a tensor's chunks: `partial(xs, params, stats)` maps float32 flat chunks (starting at a
    multiple of statistics.BLOCK) to additive parts (float64 per-block sums, int64 counts); `finish(sums, params,
    stats, numel)` turns their totals into per-tensor values for the next pass and the element pass."""

    partial: Callable[..., dict[str, Any]]
    finish: Callable[..., dict[str, Any]]


@dataclass(frozen=True)
class Method:
    name: str
    models: tuple[int, ...]  # accepted numbers of models
    params: tuple[Param, ...]
    formula: str
    reference: str
    summary: str
    fn: Callable[..., torch.Tensor]
    # Selection methods: `choose` returns a bool mask (True: first candidate) and `candidate_names` the indices of
    # the two models it picks from, so the engine can select in the storage dtype and the dry run count shares.
    choose: Callable[..., torch.Tensor] | None = None
    candidate_names: Callable[[int], tuple[int, int]] | None = None
    elementwise: bool = True
    # Settings that are valid but probably not what the user meant: (number of models, params) -> a note or None
    advice: Callable[[int, dict[str, float]], str | None] | None = None
    # Whole-tensor methods: statistics passes, then `element(xs, params_and_stats, context)` per chunk
    stats: tuple[StatPass, ...] = ()
    element: Callable[..., torch.Tensor] | None = None

    def applicable(self, n_models: int) -> dict[str, Param]:
        return {p.name: p for p in self.params if p.only_with is None or n_models in p.only_with}

    def resolve_params(self, given: dict[str, Any], n_models: int, where: str) -> dict[str, float]:
        """Every parameter that applies to `n_models` models, defaults filled in, ranges checked."""
        known = self.applicable(n_models)
        unknown = sorted(set(given) - set(known))
        if unknown:
            others = {p.name for p in self.params} - set(known)
            why = f" with {n_models} models" if set(unknown) <= others else ""
            raise RecipeError(f"{where}: method {self.name} takes no parameter {', '.join(unknown)}{why} "
                              f"(it takes: {', '.join(known) or 'none'})")
        return {name: p.check(given.get(name, p.default), where) for name, p in known.items()}

    @property
    def models_text(self) -> str:
        """`3 or 2`, or `3 to 26` for a run of counts."""
        m = self.models
        if len(m) > 2 and list(m) == list(range(m[0], m[-1] + 1)):
            return f"{m[0]} to {m[-1]}"
        return " or ".join(str(x) for x in m)

    def check_models(self, n: int, where: str) -> None:
        if n not in self.models:
            want = self.models_text
            raise RecipeError(f"{where}: method {self.name} merges {want} models, got {n}")

    def __call__(self, xs: list[torch.Tensor], params: dict[str, Any], ctx: Context | None = None) -> torch.Tensor:
        if self.element is None:
            return self.fn(xs, **params)
        from hubmix.methods.statistics import whole_tensor

        return whole_tensor(self, xs, params, ctx or Context())


REGISTRY: dict[str, Method] = {}


def register(name: str, *, models: tuple[int, ...], params: tuple[Param, ...] = (), formula: str, reference: str,
             summary: str, **extra: Any) -> Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]:
    def wrap(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        if extra.pop("element", False):  # fn(xs, params_and_stats, context): a whole-tensor method's element pass
            extra["element"] = fn
        method = Method(name=name, models=models, params=params, formula=formula, reference=reference,
                        summary=summary, fn=fn, **extra)
        if name in REGISTRY:
            raise ValueError(f"merge method {name!r} registered twice")
        REGISTRY[name] = method
        return fn

    return wrap


def get_method(name: str) -> Method:
    try:
        return REGISTRY[name]
    except KeyError:
        raise RecipeError(f"unknown merge method {name!r} (known: {', '.join(sorted(methods()))})") from None


def methods() -> dict[str, Method]:
    """Every registered method by name."""
    return dict(REGISTRY)
