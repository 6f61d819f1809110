"""Tiny random Chroma pipelines (ChromaPipeline), built offline from configs: Flux-like double and single blocks
without modulation linears, a small distilled guidance network, a T5 encoder, Flux's VAE structure."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def configs() -> dict[str, dict[str, Any]]:
    from hubmix.formats.tiny_flux import configs as flux

    cfg = flux(False)
    return {
        "transformer": dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=3, attention_head_dim=16,
                            num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=[4, 6, 6],
                            approximator_num_channels=8, approximator_hidden_dim=32, approximator_layers=2),
        "text_encoder": cfg["text_encoder_2"],
        "vae": cfg["vae"],
        "scheduler": flux(False)["scheduler"],
    }


def build(name: str, seed: int = 0, *, base_seed: int = 0, noise: float = 0.02,
          tokenizer_dir: str | Path | None = None, **_: Any):
    import diffusers
    import transformers

    from hubmix.formats.tiny import perturb
    from hubmix.formats.tiny_flux import t5_tokenizer

    cfg = configs()
    torch.manual_seed(base_seed)
    parts: dict[str, Any] = {
        "transformer": diffusers.ChromaTransformer2DModel(**cfg["transformer"]),
        "vae": diffusers.AutoencoderKL(**cfg["vae"]),
        "text_encoder": transformers.T5EncoderModel(transformers.T5Config(**cfg["text_encoder"])),
    }
    for i, part in enumerate(sorted(parts)):
        perturb(parts[part], seed * 1000 + i + 1, noise if seed else 0.0)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**cfg["scheduler"])
    return diffusers.ChromaPipeline(scheduler=scheduler, tokenizer=t5_tokenizer(), image_encoder=None,
                                    feature_extractor=None, **parts)
