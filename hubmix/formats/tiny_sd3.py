"""Tiny random SD3 pipelines (SD3 Medium, SD3.5 Medium with attn2 and qk-norm, SD3.5 Large), built offline from configs.

The structure follows the real models: joint blocks whose last context stream is pre-only, SD3.5 Medium's second
attention in its first blocks and RMS qk-norm, CLIP-L and CLIP-G of different widths (diffusers' single-file loader
tells them apart by width, real: 768 and 1280), a T5 v1.1 (gated-GELU) encoder and a 16-channel VAE without quant
convs.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from hubmix.formats.tiny import _text, perturb, write_tokenizer
from hubmix.formats.tiny_flux import T5_VOCAB, t5_tokenizer

_T5 = dict(vocab_size=T5_VOCAB, d_model=48, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
           relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", dense_act_fn="gelu_new",
           is_encoder_decoder=False, use_cache=False, pad_token_id=0, eos_token_id=1)
_TRANSFORMER = dict(sample_size=8, patch_size=2, in_channels=16, num_layers=3, attention_head_dim=8,
                    num_attention_heads=4, joint_attention_dim=48, caption_projection_dim=32,
                    pooled_projection_dim=32 + 64, out_channels=16, pos_embed_max_size=16)
_VAE = dict(block_out_channels=[32, 64], layers_per_block=1, latent_channels=16, in_channels=3, out_channels=3,
            down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2, sample_size=32,
            scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)

VARIANTS: dict[str, dict[str, Any]] = {
    "sd3": dict(_TRANSFORMER),  # SD3 Medium: no qk-norm, no attn2
    "sd35m": dict(_TRANSFORMER, dual_attention_layers=(0, 1), qk_norm="rms_norm"),  # SD3.5 Medium
    "sd35l": dict(_TRANSFORMER, num_layers=4, qk_norm="rms_norm"),  # SD3.5 Large: qk-norm, no attn2
}


def build(variant: str = "sd35m", seed: int = 0, *, base_seed: int = 0, noise: float = 0.02,
          tokenizer_dir: str | Path | None = None, **_: Any):
    """`variant`: sd3 (SD3 Medium), sd35m (SD3.5 Medium) or sd35l (SD3.5 Large); registered in tiny.BUILDERS under these names."""
    import diffusers
    import transformers

    torch.manual_seed(base_seed)
    parts: dict[str, Any] = {
        "transformer": diffusers.SD3Transformer2DModel(**VARIANTS[variant]),
        "vae": diffusers.AutoencoderKL(**_VAE),
        "text_encoder": transformers.CLIPTextModelWithProjection(
            transformers.CLIPTextConfig(**_text(32, 2, "quick_gelu", projection_dim=32))),
        "text_encoder_2": transformers.CLIPTextModelWithProjection(
            transformers.CLIPTextConfig(**_text(64, 2, "gelu", projection_dim=64))),
        "text_encoder_3": transformers.T5EncoderModel(transformers.T5Config(**_T5)),
    }
    for i, name in enumerate(sorted(parts)):
        perturb(parts[name], seed * 1000 + i + 1, noise if seed else 0.0)
    with tempfile.TemporaryDirectory() as tmp:
        clip_tok = transformers.CLIPTokenizer.from_pretrained(str(tokenizer_dir or write_tokenizer(tmp)))
    return diffusers.StableDiffusion3Pipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0), tokenizer=clip_tok, tokenizer_2=clip_tok,
        tokenizer_3=t5_tokenizer(), **parts)
