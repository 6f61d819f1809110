"""Time to render one image with a full-size SD1.5 pipeline (random weights from the SD1.5 configs), under hubmix's
rendering conventions: `python benchmarks/render_bench.py [--size 512] [--steps 3] [--device auto] [--dtype fp32]`.

Prints the seconds per denoising step (classifier-free guidance: a batch of 2 through the UNet), the text encoder and
VAE decode times, and the resulting seconds per image for 20 steps. Run long benchmarks under
`flock /tmp/hubmix-bench.lock`."""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=768,
                 attention_head_dim=8, block_out_channels=[320, 640, 1280, 1280],
                 down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                 up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)
SD15_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
                block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4, scaling_factor=0.18215)
SD15_TEXT = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                 vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
SD15_SCHED = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                  steps_offset=1, clip_sample=False, set_alpha_to_one=False, skip_prk_steps=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", choices=["fp16", "bf16", "fp32"])
    ap.add_argument("--json", help="also write the numbers here")
    args = ap.parse_args()

    import diffusers
    import torch
    import transformers

    from hubmix.engine.devices import resolve_device
    from hubmix.formats.tiny import write_tokenizer
    from hubmix.render.spec import RenderSpec

    device = resolve_device(args.device)
    dtype = RenderSpec(dtype=args.dtype).torch_dtype(device)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**SD15_UNET)
    vae = diffusers.AutoencoderKL(**SD15_VAE)
    te = transformers.CLIPTextModel(transformers.CLIPTextConfig(**SD15_TEXT))
    with tempfile.TemporaryDirectory() as tmp:
        tok = transformers.CLIPTokenizer.from_pretrained(str(write_tokenizer(tmp)))
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet,
                                             scheduler=diffusers.PNDMScheduler.from_config(SD15_SCHED), safety_checker=None,
                                             feature_extractor=None, requires_safety_checker=False)
    pipe = pipe.to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    build = time.perf_counter() - t0
    marks: list[float] = []

    def step_end(p, i, t, kw):
        marks.append(time.perf_counter())
        return kw

    start = time.perf_counter()
    pipe(prompt="a photo of a cat", num_inference_steps=args.steps, height=args.size, width=args.size,
         generator=torch.Generator("cpu").manual_seed(0), callback_on_step_end=step_end)
    end = time.perf_counter()
    steps = [b - a for a, b in zip(marks, marks[1:])]  # the first step includes the text encoder
    per_step = sorted(steps)[len(steps) // 2]
    decode = end - marks[-1]
    first = marks[0] - start
    result = {"device": str(device), "dtype": str(dtype).removeprefix("torch."), "size": args.size,
              "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "build_s": round(build, 2),
              "unet_steps_run": len(marks), "s_per_step": round(per_step, 2),
              "first_step_with_text_encoder_s": round(first, 2), "vae_decode_s": round(decode, 2),
              "s_per_image_20_steps": round(first - per_step + 20 * per_step + decode, 1)}
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
