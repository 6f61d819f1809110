"""Tiny random Lumina 2 pipelines (Lumina2Pipeline), built offline from configs: the single-stream transformer with
grouped-query attention (4 query heads, 2 key/value heads) at a small width, a tiny Gemma 2 text encoder with a
character tokenizer, Flux's VAE structure."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def configs() -> dict[str, dict[str, Any]]:
    from hubmix.formats.tiny_flux import configs as flux

    return {
        # head 8 = rotary axes 4 + 2 + 2; feed-forward 4 x 32 rounded to a multiple of 16
        "transformer": dict(sample_size=16, patch_size=2, in_channels=4, hidden_size=32, num_layers=3,
                            num_refiner_layers=2, num_attention_heads=4, num_kv_heads=2, multiple_of=16,
                            cap_feat_dim=32, axes_dim_rope=[4, 2, 2], axes_lens=[512, 32, 32]),
        "text_encoder": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=8, max_position_embeddings=512),
        "vae": flux(False)["vae"],
        "scheduler": dict(num_train_timesteps=1000, shift=6.0, use_dynamic_shifting=False),
    }


def gemma_tokenizer():
    """A GemmaTokenizer over printable ASCII (a unigram model, no download)."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = [("<pad>", 0.0), ("<eos>", 0.0), ("<bos>", 0.0), ("<unk>", 0.0), ("▁", -1.0)]
    vocab += [(chr(c), -1.0) for c in range(32, 127)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=3))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    return transformers.GemmaTokenizer(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                       bos_token="<bos>", unk_token="<unk>", model_max_length=256)


def build(name: str, seed: int = 0, *, base_seed: int = 0, noise: float = 0.02,
          tokenizer_dir: str | Path | None = None, **_: Any):
    import diffusers
    import transformers

    from hubmix.formats.tiny import perturb

    cfg = configs()
    tok = gemma_tokenizer()
    torch.manual_seed(base_seed)
    parts: dict[str, Any] = {
        "transformer": diffusers.Lumina2Transformer2DModel(**cfg["transformer"]),
        "vae": diffusers.AutoencoderKL(**cfg["vae"]),
        "text_encoder": transformers.Gemma2Model(transformers.Gemma2Config(vocab_size=len(tok), **cfg["text_encoder"])),
    }
    for i, part in enumerate(sorted(parts)):
        perturb(parts[part], seed * 1000 + i + 1, noise if seed else 0.0)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**cfg["scheduler"])
    return diffusers.Lumina2Pipeline(scheduler=scheduler, tokenizer=tok, **parts)
