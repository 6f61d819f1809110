"""Where merge arithmetic runs: `--device auto|cpu|cuda|cuda:N|mps`, sized with accelerate's memory probe."""

from __future__ import annotations

import glob
import os
import sys
from typing import TYPE_CHECKING

from hubmix.errors import HubmixError

if TYPE_CHECKING:
    import torch


def plain_cpu(spec: str | None) -> bool:
    """Whether `spec` means the CPU, decided without importing torch: `cpu`, or `auto` on a machine with no GPU a
    torch build could use (no NVIDIA or AMD device nodes, not macOS, no CUDA_VISIBLE_DEVICES naming one)."""
    spec = (spec or "auto").lower()
    if spec == "cpu":
        return True
    if spec != "auto" or sys.platform == "darwin":
        return False
    if os.environ.get("CUDA_VISIBLE_DEVICES", "") not in ("", "-1"):
        return False
    return not (glob.glob("/dev/nvidia[0-9]*") or os.path.exists("/dev/kfd") or os.path.exists("/dev/dxg"))


def resolve_device(spec: str | None) -> torch.device:
    """`auto` takes a GPU when one is present (CUDA, then Apple's MPS), else the CPU."""
    import torch

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


def device_budget(device: torch.device | None, requested: int) -> int:
    """Bytes of chunk buffers that fit on `device` (None: the CPU): the request, capped at 80% of what accelerate
    reports free."""
    if device is None or device.type != "cuda":
        return requested
    from accelerate.utils import get_max_memory

    free = get_max_memory().get(device.index or 0, requested)
    return max(64 << 20, min(requested, int(free * 0.8)))
