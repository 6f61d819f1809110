"""Tiny random FLUX.1 pipelines (dev with a guidance embedder, schnell without), built offline from configs.

Their structure follows the real model at a small width: double and single blocks, q/k/v and MLP fused the
original way once converted, CLIP-L and T5 encoders, a VAE without quant convs. `seed` adds small noise to the
`base_seed` weights, like fine-tunes of one model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

T5_VOCAB = 128


def configs(schnell: bool) -> dict[str, dict[str, Any]]:
    from hubmix.formats.tiny import MAX_TOKENS, VOCAB, BOS, EOS

    return {
        # head 16 = rotary axes 4 + 6 + 6; in_channels = 4 latent channels x a 2x2 patch
        "transformer": dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=3, attention_head_dim=16,
                            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                            guidance_embeds=not schnell, axes_dims_rope=[4, 6, 6]),
        "text_encoder": dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                             vocab_size=VOCAB, max_position_embeddings=MAX_TOKENS, hidden_act="quick_gelu",
                             bos_token_id=BOS, eos_token_id=EOS, pad_token_id=EOS),
        "text_encoder_2": dict(vocab_size=T5_VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                               relative_attention_num_buckets=8, feed_forward_proj="gated-gelu",
                               is_encoder_decoder=False, use_cache=False, tie_word_embeddings=False),
        "vae": dict(block_out_channels=[32, 64], layers_per_block=1, latent_channels=4, in_channels=3, out_channels=3,
                    down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                    sample_size=32, use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611,
                    shift_factor=0.1159),
        "scheduler": dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15,
                          num_train_timesteps=1000, shift=1.0 if schnell else 3.0, use_dynamic_shifting=not schnell),
    }


def t5_tokenizer():
    """A T5TokenizerFast over printable ASCII (a unigram model, no download)."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)] + [(chr(c), -1.0) for c in range(32, 127)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    return transformers.T5TokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                        extra_ids=0, model_max_length=64)


def build(name: str, seed: int = 0, *, base_seed: int = 0, noise: float = 0.02,
          tokenizer_dir: str | Path | None = None, **_: Any):
    """`name` is flux (dev) or flux-schnell."""
    import tempfile

    import diffusers
    import transformers

    from hubmix.formats.tiny import perturb, write_tokenizer

    cfg = configs(name == "flux-schnell")
    torch.manual_seed(base_seed)
    parts: dict[str, Any] = {
        "transformer": diffusers.FluxTransformer2DModel(**cfg["transformer"]),
        "vae": diffusers.AutoencoderKL(**cfg["vae"]),
        "text_encoder": transformers.CLIPTextModel(transformers.CLIPTextConfig(**cfg["text_encoder"])),
        "text_encoder_2": transformers.T5EncoderModel(transformers.T5Config(**cfg["text_encoder_2"])),
    }
    for i, part in enumerate(sorted(parts)):
        perturb(parts[part], seed * 1000 + i + 1, noise if seed else 0.0)
    with tempfile.TemporaryDirectory() as tmp:
        tok = transformers.CLIPTokenizer.from_pretrained(str(tokenizer_dir or write_tokenizer(tmp)))
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**cfg["scheduler"])
    return diffusers.FluxPipeline(scheduler=scheduler, tokenizer=tok, tokenizer_2=t5_tokenizer(), **parts)
