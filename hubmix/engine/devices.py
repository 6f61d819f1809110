"""Where merge arithmetic runs: `--device auto|cpu|cuda|cuda:N|mps`, sized with accelerate's memory probe."""

from __future__ import annotations

import glob
import importlib.util
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from hubmix.errors import HubmixError

if TYPE_CHECKING:
    import torch


def _torch_folder() -> Path | None:
    """The installed torch package's folder, found without importing it."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def torch_builds() -> tuple[str | None, str | None]:
    """(CUDA version, ROCm version) the installed torch was built for, read from torch/version.py without
    importing torch; (None, None) for a CPU-only build. Unreadable: ("?", "?"), which counts as maybe."""
    folder = _torch_folder()
    try:
        text = (folder / "version.py").read_text() if folder else ""
    except OSError:
        text = ""
    found = {}
    for name in ("cuda", "hip"):
        m = re.search(rf"^{name}\s*(?::[^=]*)?=\s*(.+)$", text, re.M)
        if m is None:
            return "?", "?"
        value = m.group(1).strip()
        found[name] = None if value == "None" else value.strip("'\"")
    return found["cuda"], found["hip"]


def plain_cpu(spec: str | None) -> bool:
    """Whether `spec` means the CPU, decided without importing torch: `cpu`, or `auto` where no GPU can be used: no
    NVIDIA or AMD device nodes, or a CPU-only torch build beside them (so merges there keep the torch-free path);
    not macOS (MPS), no CUDA_VISIBLE_DEVICES naming a device for a GPU torch."""
    spec = (spec or "auto").lower()
    if spec == "cpu":
        return True
    if spec != "auto" or sys.platform == "darwin":
        return False
    nodes = glob.glob("/dev/nvidia[0-9]*") or os.path.exists("/dev/kfd") or os.path.exists("/dev/dxg")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "") not in ("", "-1")
    if not (nodes or visible):
        return True
    return torch_builds() == (None, None)


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
    reports free on that device. Only that device is asked (accelerate's get_max_memory would create a context,
    hundreds of MB, on every GPU of the machine)."""
    if device is None or device.type != "cuda":
        return requested
    free = free_memory(device.index if device.index is not None else _current_cuda())
    return max(64 << 20, min(requested, int(free * 0.8)))


def _current_cuda() -> int:
    import torch

    return torch.cuda.current_device()


def free_memory(index: int) -> int:
    """Free bytes on CUDA device `index`: accelerate's per-device query where it has one, else torch's."""
    try:
        from accelerate.utils.modeling import get_accelerator_free_memory, get_torch_accelerator_backend
    except ImportError:  # an accelerate without the per-device query
        import torch

        return torch.cuda.mem_get_info(index)[0]
    _, module = get_torch_accelerator_backend()
    return get_accelerator_free_memory(module, index)
