"""Tiny random Z-Image pipelines (ZImagePipeline), built offline from configs: the single-stream transformer with
its refiners at a small width, a tiny Qwen3 text encoder with a byte-level tokenizer and chat template, Flux's VAE
structure. `seed` adds small noise to the `base_seed` weights, like fine-tunes of one model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def configs() -> dict[str, dict[str, Any]]:
    from hubmix.formats.tiny_flux import configs as flux

    return {
        # head 16 = rotary axes 4 + 6 + 6; in_channels = the VAE's latent channels (2x2 patches inside)
        "transformer": dict(all_patch_size=[2], all_f_patch_size=[1], in_channels=4, dim=32, n_layers=3,
                            n_refiner_layers=2, n_heads=2, n_kv_heads=2, cap_feat_dim=32, axes_dims=[4, 6, 6],
                            axes_lens=[512, 32, 32]),
        "text_encoder": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=8, max_position_embeddings=512),
        "vae": flux(False)["vae"],
        "scheduler": dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False),
    }


def qwen_tokenizer():
    """A byte-level BPE Qwen2Tokenizer without merges (every byte a token), with the chat tokens Qwen uses."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from hubmix.formats.tiny import _bytes_to_unicode

    vocab = {c: i for i, c in enumerate(_bytes_to_unicode().values())}
    for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        vocab[t] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    q = transformers.Qwen2Tokenizer(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                    model_max_length=512)
    q.chat_template = CHAT
    return q


def build(name: str, seed: int = 0, *, base_seed: int = 0, noise: float = 0.02,
          tokenizer_dir: str | Path | None = None, **_: Any):
    import diffusers
    import transformers

    from hubmix.formats.tiny import perturb

    cfg = configs()
    tok = qwen_tokenizer()
    torch.manual_seed(base_seed)
    parts: dict[str, Any] = {
        "transformer": diffusers.ZImageTransformer2DModel(**cfg["transformer"]),
        "vae": diffusers.AutoencoderKL(**cfg["vae"]),
        "text_encoder": transformers.Qwen3Model(transformers.Qwen3Config(vocab_size=len(tok), **cfg["text_encoder"])),
    }
    for i, part in enumerate(sorted(parts)):
        perturb(parts[part], seed * 1000 + i + 1, noise if seed else 0.0)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**cfg["scheduler"])
    return diffusers.ZImagePipeline(scheduler=scheduler, tokenizer=tok, **parts)
