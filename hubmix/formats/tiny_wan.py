"""Tiny random Wan pipelines, built offline from configs: Wan 2.1 (one transformer) and Wan 2.2 A14B (two
experts: `transformer` for high noise, `transformer_2` for low noise, switched at `boundary_ratio`), a UMT5 text
encoder and a Wan VAE, at a small width. `I2V` is the image-to-video transformer's config (`img_emb`, the
cross-attention's image key/value projections) for key-map tests. `seed` adds small noise to the `base_seed`
weights; Wan 2.2's two experts differ from each other as the real ones do."""

from __future__ import annotations

from typing import Any

import torch

from hubmix.formats.tiny_flux import T5_VOCAB, t5_tokenizer

TRANSFORMER = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16,
                   out_channels=16, text_dim=32, freq_dim=16, ffn_dim=64, num_layers=3, cross_attn_norm=True,
                   qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=32)
I2V = dict(TRANSFORMER, in_channels=36, image_dim=24, added_kv_proj_dim=24)
UMT5 = dict(vocab_size=T5_VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
            use_cache=False, tie_word_embeddings=False)
VAE = dict(base_dim=16, z_dim=16, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[True])
SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)


def build(name: str = "wan", seed: int = 0, *, base_seed: int = 0, noise: float = 0.02, **_: Any):
    """`name`: wan (Wan 2.1: one transformer) or wan22 (Wan 2.2 A14B: two experts)."""
    import diffusers
    import transformers

    from hubmix.formats.tiny import perturb

    torch.manual_seed(base_seed)
    parts: dict[str, Any] = {
        "transformer": diffusers.WanTransformer3DModel(**TRANSFORMER),
        "vae": diffusers.AutoencoderKLWan(**VAE),
        "text_encoder": transformers.UMT5EncoderModel(transformers.UMT5Config(**UMT5)),
    }
    extra: dict[str, Any] = {}
    if name == "wan22":
        parts["transformer_2"] = diffusers.WanTransformer3DModel(**TRANSFORMER)
        extra["boundary_ratio"] = 0.875
    for i, part in enumerate(sorted(parts)):
        perturb(parts[part], seed * 1000 + i + 1, noise if seed else 0.0)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**SCHEDULER)
    return diffusers.WanPipeline(scheduler=scheduler, tokenizer=t5_tokenizer(), **parts, **extra)
