"""Tiny random Qwen-Image pipelines, built offline from configs: a QwenImageTransformer2DModel of two
`transformer_blocks`, a Qwen2.5-VL text encoder (language model and vision tower) and a Qwen-Image VAE, at a
small width. `seed` adds small noise to the `base_seed` weights, like fine-tunes of one model."""

from __future__ import annotations

from typing import Any

import torch

QWEN_VOCAB = 300  # 256 byte tokens and the chat template's special tokens


def qwen2_tokenizer():
    """A byte-level Qwen2Tokenizer (every byte one token, no merges), with Qwen's chat special tokens."""
    import transformers

    from hubmix.formats.tiny import _bytes_to_unicode

    vocab = {c: i for i, c in enumerate(_bytes_to_unicode().values())}
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                    "<|image_pad|>", "<|video_pad|>"):
        vocab[special] = len(vocab)
    tok = transformers.Qwen2Tokenizer(vocab=vocab, merges=[], eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                      model_max_length=256)
    tok.chat_template = CHAT_TEMPLATE  # FLUX.2 Klein's pipeline formats its prompt with it
    return tok


CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def configs() -> dict[str, dict[str, Any]]:
    return {
        # head 16 = rotary axes 4 + 6 + 6; in_channels = 16 latent channels x a 2x2 patch
        "transformer": dict(patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=16,
                            num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6)),
        "text_encoder": dict(
            text_config=dict(vocab_size=QWEN_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, bos_token_id=256, eos_token_id=258,
                             rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}),
            vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                               patch_size=2, spatial_merge_size=1, temporal_patch_size=1, window_size=4,
                               fullatt_block_indexes=[0]),
            image_token_id=261, video_token_id=262, vision_start_token_id=259, vision_end_token_id=260),
        "vae": dict(base_dim=16, z_dim=16, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False]),
        "scheduler": dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9,
                          num_train_timesteps=1000, shift=1.0, shift_terminal=0.02, time_shift_type="exponential",
                          use_dynamic_shifting=True),
    }


def build(name: str = "qwen_image", seed: int = 0, *, base_seed: int = 0, noise: float = 0.02, **_: Any):
    import diffusers
    import transformers

    from hubmix.formats.tiny import perturb

    cfg = configs()
    torch.manual_seed(base_seed)
    parts: dict[str, Any] = {
        "transformer": diffusers.QwenImageTransformer2DModel(**cfg["transformer"]),
        "vae": diffusers.AutoencoderKLQwenImage(**cfg["vae"]),
        "text_encoder": transformers.Qwen2_5_VLForConditionalGeneration(
            transformers.Qwen2_5_VLConfig(**cfg["text_encoder"])),
    }
    for i, part in enumerate(sorted(parts)):
        perturb(parts[part], seed * 1000 + i + 1, noise if seed else 0.0)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**cfg["scheduler"])
    return diffusers.QwenImagePipeline(scheduler=scheduler, tokenizer=qwen2_tokenizer(), **parts)


