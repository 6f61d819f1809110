"""Tiny random FLUX.2 Klein pipelines, built offline from configs: a Flux2Transformer2DModel of two double and
three single blocks (no guidance embedder, as Klein), a Qwen3 text encoder and a FLUX.2 VAE, at a small width.
`dev` is FLUX.2 dev's transformer config (a guidance embedder) for key-map tests. `seed` adds small noise to the
`base_seed` weights, like fine-tunes of one model."""

from __future__ import annotations

from typing import Any

import torch

from hubmix.formats.tiny_qwen_image import QWEN_VOCAB, qwen2_tokenizer

# head 16 = four rotary axes of 4; in_channels = 4 latent channels x FLUX.2's 2x2 VAE patch; Klein: 3 text layers
# stacked -> joint_attention_dim = 3 x the text encoder's width; the pipeline reads its text encoder's layers 9, 18
# and 27: 27 narrow layers
TRANSFORMER = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=3, attention_head_dim=16,
                   num_attention_heads=2, joint_attention_dim=96, timestep_guidance_channels=16, mlp_ratio=3.0,
                   axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False)
DEV = dict(TRANSFORMER, guidance_embeds=True)
QWEN3 = dict(vocab_size=QWEN_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=27, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, bos_token_id=256, eos_token_id=258, pad_token_id=256)
VAE = dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
           up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4, sample_size=32)
SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15,
                 num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)


def build(name: str = "flux2", seed: int = 0, *, base_seed: int = 0, noise: float = 0.02, **_: Any):
    import diffusers
    import transformers

    from hubmix.formats.tiny import perturb

    torch.manual_seed(base_seed)
    parts: dict[str, Any] = {
        "transformer": diffusers.Flux2Transformer2DModel(**TRANSFORMER),
        "vae": diffusers.AutoencoderKLFlux2(**VAE),
        "text_encoder": transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**QWEN3)),
    }
    for i, part in enumerate(sorted(parts)):
        perturb(parts[part], seed * 1000 + i + 1, noise if seed else 0.0)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**SCHEDULER)
    return diffusers.Flux2KleinPipeline(scheduler=scheduler, tokenizer=qwen2_tokenizer(), is_distilled=True,
                                        **parts)
