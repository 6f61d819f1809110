"""The one registry of merge methods: name, model count, parameters, formula and reference.

The CLI's options and help, recipe validation, the dry-run report and the model card all read from here, so a
method is added in one place. A method's function takes float32 tensors (one per model, same shape) and its
parameters, and returns the merged float32 tensor; it must be element-wise unless it says otherwise, because large
tensors are merged in chunks.
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
    name: str
    default: float
    help: str
    min: float | None = None
    max: float | None = None
    only_with: tuple[int, ...] | None = None  # model counts the parameter applies to (None: all)

    def check(self, value: Any, where: str) -> float:
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise RecipeError(f"{where}: {self.name} must be a number, got {value!r}") from None
        if not math.isfinite(v):  # NaN or inf would turn a whole model into NaN/inf
            raise RecipeError(f"{where}: {self.name} must be a finite number, got {value!r}")
        if (self.min is not None and v < self.min) or (self.max is not None and v > self.max):
            raise RecipeError(f"{where}: {self.name}={v} is outside [{self.min}, {self.max}]")
        return v


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

    def check_models(self, n: int, where: str) -> None:
        if n not in self.models:
            want = " or ".join(str(m) for m in self.models)
            raise RecipeError(f"{where}: method {self.name} merges {want} models, got {n}")

    def __call__(self, xs: list[torch.Tensor], params: dict[str, float]) -> torch.Tensor:
        return self.fn(xs, **params)


REGISTRY: dict[str, Method] = {}


def register(name: str, *, models: tuple[int, ...], params: tuple[Param, ...] = (), formula: str, reference: str,
             summary: str, **extra: Any) -> Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]:
    def wrap(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
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
