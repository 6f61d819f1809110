"""Faster forms of the codecs' inner loops, installed by the engine while a merge with native kernels runs
(engine/native_quant.py); each returns exactly what the torch code beside its use returns, or None to let that
code run. Empty by default: the torch code is the reference."""

from __future__ import annotations

from typing import Any, Callable

HOOKS: dict[str, Callable[..., Any]] = {}


def install(**hooks: Callable[..., Any]) -> None:
    """Replace every hook (none: back to the torch code)."""
    HOOKS.clear()
    HOOKS.update(hooks)


def call(name: str, *args: Any) -> Any:
    fn = HOOKS.get(name)
    return None if fn is None else fn(*args)


def constant(data: bytes, dtype: str, shape: tuple[int, ...], like: Any) -> Any:
    """A small stored tensor (a scale, a code table, a JSON state) of the kind `like` is: a Span on the engine's
    torch-free path, else a torch tensor."""
    from hubmix.formats.io.span import Span

    if isinstance(like, Span):
        return Span.of_bytes(data, dtype, shape)
    import torch

    return torch.frombuffer(bytearray(data), dtype=getattr(torch, dtype)).reshape(shape)
