"""The rendering conventions, in one place, so that anyone can reproduce an image with plain diffusers:

- the model's own scheduler (its `scheduler/scheduler_config.json`), the family's text-to-image pipeline;
- `generator=torch.Generator("cpu").manual_seed(seed)` passed to the pipeline, one image per call;
- `prompt`, `negative_prompt`, `num_inference_steps`, `guidance_scale`, `height`, `width` as recorded;
- no safety checker and no watermark; the pipeline's PIL image saved as PNG, untouched.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hubmix.errors import HubmixError

DEFAULT_PROMPTS = ("a photo of a cat",)
DEFAULT_STEPS = 20
# the family pipelines' own defaults; 7.5 otherwise (Qwen-Image's guidance_scale is unused by its undistilled
# transformer, as in diffusers)
GUIDANCE = {"sdxl": 5.0, "wan": 5.0, "flux2": 4.0, "qwen_image": 4.0}
DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


class RenderError(HubmixError):
    """Sampling settings or a model that cannot be rendered."""


@dataclass
class RenderSpec:
    prompts: list[str] = field(default_factory=lambda: list(DEFAULT_PROMPTS))
    seeds: list[int] = field(default_factory=lambda: [0])
    negative_prompt: str | None = None
    steps: int = DEFAULT_STEPS
    size: tuple[int, int] | None = None  # (width, height); None: the model's own (UNet sample_size x VAE scale)
    guidance: float | None = None  # None: 5.0 for SDXL, 7.5 otherwise
    device: str = "auto"
    dtype: str | None = None  # fp16, bf16, fp32; None: fp16 on a GPU, fp32 on a CPU
    quiet: bool = False

    def check(self) -> None:
        """Every setting, before any model is opened: one line naming the problem."""
        if not self.prompts or any(not str(p).strip() for p in self.prompts):
            raise RenderError("--prompt: give at least one non-empty prompt")
        if not self.seeds:
            raise RenderError("--seed: give at least one seed")
        if any(not isinstance(s, int) or s < 0 for s in self.seeds):
            raise RenderError(f"--seed: seeds are non-negative integers, got {self.seeds}")
        if len(set(self.seeds)) < len(self.seeds) or len(set(self.prompts)) < len(self.prompts):
            raise RenderError("--prompt/--seed: each prompt and each seed once (a repeat would render the same image)")
        if self.steps < 1:
            raise RenderError(f"--steps: at least 1, got {self.steps}")
        if self.size is not None:
            w, h = self.size
            if w <= 0 or h <= 0 or w % 8 or h % 8:
                raise RenderError(f"--size {w}x{h}: width and height must be positive multiples of 8")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise RenderError(f"--dtype {self.dtype}: one of {', '.join(DTYPES)}")

    def guidance_for(self, family: str) -> float:
        return self.guidance if self.guidance is not None else GUIDANCE.get(family, 7.5)

    def torch_dtype(self, device: Any):
        import torch

        name = self.dtype or ("fp32" if device.type == "cpu" else "fp16")
        return getattr(torch, DTYPES[name])


def parse_size(text: str | None) -> tuple[int, int] | None:
    """'512', '512x768' (width x height) -> (w, h)."""
    if text is None:
        return None
    w, sep, h = str(text).lower().partition("x")
    try:
        return (int(w), int(h) if sep else int(w))
    except ValueError:
        raise RenderError(f"--size {text}: expected WIDTHxHEIGHT such as 512x512, or one number") from None
