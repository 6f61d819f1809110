"""Where merge arithmetic runs: `--device auto|cpu|cuda|cuda:N|mps`, sized with accelerate's memory probe."""

from __future__ import annotations

import torch

from hubmix.errors import HubmixError


def resolve_device(spec: str | None) -> torch.device:
    """`auto` takes a GPU when one is present (CUDA, then Apple's MPS), else the CPU."""
    spec = (spec or "auto").lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise HubmixError(f"--device {spec}: not a device (use auto, cpu, cuda, cuda:N or mps)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise HubmixError(f"--device {spec}: CUDA is not available in this torch build or machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise HubmixError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise HubmixError(f"--device {spec}: MPS is not available")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise HubmixError(f"--device {spec}: unsupported device type {dev.type}")
    return dev


def device_budget(device: torch.device, requested: int) -> int:
    """Bytes of chunk buffers that fit on `device`: the request, capped at 80% of what accelerate reports free."""
    if device.type != "cuda":
        return requested
    from accelerate.utils import get_max_memory

    free = get_max_memory().get(device.index or 0, requested)
    return max(64 << 20, min(requested, int(free * 0.8)))
