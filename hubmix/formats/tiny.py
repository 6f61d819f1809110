"""Tiny random pipelines of each family, built offline from configs, for the demo and the tests.

Their structure follows the real models (several down blocks with and without attention, SD2's linear
projections and OpenCLIP-style text encoder, SDXL's two text encoders and micro-conditioning), so key maps and
merges are exercised exactly as on full-size models. Models made with the same `base_seed` and different `seed`s
share a base and differ by small noise, like fine-tunes of one model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

MAX_TOKENS = 77


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_tokenizer(folder: str | Path) -> Path:
    """A byte-level CLIP tokenizer (vocab.json + merges.txt) that CLIPTokenizer.from_pretrained loads offline."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    merges = ["t h", "th e</w>", "a n", "an d</w>", "o f</w>", "i n", "c a", "ca t</w>"]
    vocab_list = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
         "pad_token": "<|endoftext|>"}))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"model_max_length": MAX_TOKENS, "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
         "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "tokenizer_class": "CLIPTokenizer"}))
    return folder


VOCAB = 256 * 2 + 8 + 2
BOS, EOS = VOCAB - 2, VOCAB - 1


def _text(width: int, layers: int, act: str, **extra: Any) -> dict[str, Any]:
    return dict(hidden_size=width, intermediate_size=width * 2, num_attention_heads=4, num_hidden_layers=layers,
                vocab_size=VOCAB, max_position_embeddings=MAX_TOKENS, hidden_act=act, bos_token_id=BOS,
                eos_token_id=EOS, pad_token_id=EOS, **extra)


_VAE = dict(block_out_channels=[32, 64], layers_per_block=1, latent_channels=4, in_channels=3, out_channels=3,
            down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2, sample_size=32)
_SCHED = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
              steps_offset=1, clip_sample=False, set_alpha_to_one=False)

CONFIGS: dict[str, dict[str, Any]] = {
    "sd1": {
        "unet": dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=[32, 64, 64],
                     layers_per_block=2, cross_attention_dim=32, attention_head_dim=8,
                     down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                     up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]),
        "text_encoder": _text(32, 3, "quick_gelu"),
        "vae": dict(_VAE, scaling_factor=0.18215),
        "scheduler": dict(_SCHED, _class_name="PNDMScheduler", skip_prk_steps=True, prediction_type="epsilon"),
    },
    "sd2": {
        "unet": dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=[32, 64, 64],
                     layers_per_block=2, cross_attention_dim=48, attention_head_dim=[2, 4, 4],
                     use_linear_projection=True,
                     down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                     up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]),
        "text_encoder": _text(48, 3, "gelu"),
        "vae": dict(_VAE, scaling_factor=0.18215),
        "scheduler": dict(_SCHED, _class_name="DDIMScheduler", prediction_type="v_prediction"),
    },
    "sdxl": {
        "unet": dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=[32, 64, 64],
                     layers_per_block=2, cross_attention_dim=96, attention_head_dim=[2, 4, 4],
                     use_linear_projection=True, transformer_layers_per_block=[1, 1, 2],
                     addition_embed_type="text_time", addition_time_embed_dim=8,
                     projection_class_embeddings_input_dim=32 + 6 * 8,
                     down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                     up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]),
        "text_encoder": _text(32, 2, "quick_gelu"),
        # wider than text_encoder, as in the real model (diffusers' single-file loader tells them apart by width)
        "text_encoder_2": _text(64, 3, "gelu", projection_dim=32),
        "vae": dict(_VAE, scaling_factor=0.13025),
        "scheduler": dict(_SCHED, _class_name="EulerDiscreteScheduler", prediction_type="epsilon",
                          timestep_spacing="leading"),
    },
}


# Tiny pipelines of families built elsewhere (their own module: a transformer family is a different pipeline):
# tiny name -> "module:function(name, seed, base_seed=, noise=, tokenizer_dir=)".
BUILDERS: dict[str, str] = {
    "flux": "hubmix.formats.tiny_flux:build",
    "flux-schnell": "hubmix.formats.tiny_flux:build",
    "sd3": "hubmix.formats.tiny_sd3:build",
    "sd35m": "hubmix.formats.tiny_sd3:build",
    "sd35l": "hubmix.formats.tiny_sd3:build",
    # Qwen-Image, Wan 2.1 / 2.2 (two experts), FLUX.2 Klein
    "qwen_image": "hubmix.formats.tiny_qwen_image:build",
    "wan": "hubmix.formats.tiny_wan:build",
    "wan22": "hubmix.formats.tiny_wan:build",
    "flux2": "hubmix.formats.tiny_flux2:build",
}


def perturb(module: torch.nn.Module, seed: int, noise: float) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * noise)


def build_pipeline(family: str = "sd1", seed: int = 0, *, base_seed: int = 0, noise: float = 0.02,
                   inpainting: bool = False, tokenizer_dir: str | Path | None = None):
    """A tiny random pipeline of `family`; `seed` picks the noise added to the shared `base_seed` weights."""
    import importlib.util

    conventional = f"hubmix.formats.tiny_{family.replace('-', '_')}"  # a family's own module: tiny_<family>.py
    if family not in BUILDERS and family not in CONFIGS and importlib.util.find_spec(conventional) is not None:
        return importlib.import_module(conventional).build(family, seed, base_seed=base_seed, noise=noise,
                                                           tokenizer_dir=tokenizer_dir)
    if family in BUILDERS:
        import importlib

        module, fn = BUILDERS[family].split(":")
        return getattr(importlib.import_module(module), fn)(family, seed, base_seed=base_seed, noise=noise,
                                                            tokenizer_dir=tokenizer_dir)
    import diffusers
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel

    cfg = CONFIGS[family]
    torch.manual_seed(base_seed)
    unet_cfg = dict(cfg["unet"], in_channels=9) if inpainting else cfg["unet"]
    unet = UNet2DConditionModel(**unet_cfg)
    vae = AutoencoderKL(**cfg["vae"])
    te = transformers.CLIPTextModel(transformers.CLIPTextConfig(**cfg["text_encoder"]))
    parts: dict[str, Any] = {"unet": unet, "vae": vae, "text_encoder": te}
    if "text_encoder_2" in cfg:
        parts["text_encoder_2"] = transformers.CLIPTextModelWithProjection(
            transformers.CLIPTextConfig(**cfg["text_encoder_2"]))
    for i, name in enumerate(sorted(parts)):
        perturb(parts[name], seed * 1000 + i + 1, noise if seed else 0.0)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        tok = transformers.CLIPTokenizer.from_pretrained(str(tokenizer_dir or write_tokenizer(tmp)))
    sched_cfg = dict(cfg["scheduler"])
    scheduler = getattr(diffusers, sched_cfg.pop("_class_name")).from_config(sched_cfg)
    if family == "sdxl":
        cls = diffusers.StableDiffusionXLInpaintPipeline if inpainting else diffusers.StableDiffusionXLPipeline
        return cls(vae=vae, text_encoder=te, text_encoder_2=parts["text_encoder_2"], tokenizer=tok, tokenizer_2=tok,
                   unet=unet, scheduler=scheduler)
    cls = diffusers.StableDiffusionInpaintPipeline if inpainting else diffusers.StableDiffusionPipeline
    return cls(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=scheduler, safety_checker=None,
               feature_extractor=None, requires_safety_checker=False)


def save_tiny(folder: str | Path, family: str = "sd1", seed: int = 0, *, dtype: torch.dtype = torch.float32,
              variant: str | None = None, max_shard_size: str | None = None, **kw: Any) -> Path:
    """Build a tiny pipeline and save it as a diffusers folder (safetensors; optional variant and sharding)."""
    pipe = build_pipeline(family, seed, **kw).to(dtype)
    extra: dict[str, Any] = {"variant": variant}
    if max_shard_size:
        extra["max_shard_size"] = max_shard_size
    pipe.save_pretrained(str(folder), safe_serialization=True, **extra)
    return Path(folder)


def run_pipeline(pipe, steps: int = 2, size: int = 32, seed: int = 0):
    """Run `steps` inference steps on a tiny pipeline; returns the output image(s) as a numpy array."""
    gen = torch.Generator().manual_seed(seed)
    kwargs: dict[str, Any] = dict(prompt="a cat", num_inference_steps=steps, height=size, width=size, generator=gen,
                                  output_type="np")
    if "Inpaint" in type(pipe).__name__:
        from PIL import Image

        kwargs.update(image=Image.new("RGB", (size, size), "gray"), mask_image=Image.new("L", (size, size), 255))
    return pipe(**kwargs).images
