"""Full-size random fp16 SD1.5 / SDXL single-file checkpoints for the merge benchmark, built without the weights.

Each component's model is instantiated under `accelerate.init_empty_weights()` (meta device: no memory) only to
list its real key names and shapes; the three models are then written tensor by tensor into diffusers folders
(so memory stays at a few tensors), converted to one single file each with `hubmix convert`, and the folders
deleted. The models are similar, like fine-tunes of one base: base = 0.02*randn (norm weights near 1), model
i = base + 0.002*randn, each tensor from its own fixed seed, so the files are the same on every machine.

    python benchmarks/make_checkpoints.py --family sd15 --cache ~/.cache/hubmix-bench
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
import zlib
from pathlib import Path

import torch

N_MODELS = 3
BASE_STD, NOISE_STD = 0.02, 0.002

CLIP_L = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
              vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
              bos_token_id=0, eos_token_id=2, pad_token_id=1)
CLIP_BIGG = dict(CLIP_L, hidden_size=1280, num_hidden_layers=32, num_attention_heads=20, intermediate_size=5120,
                 projection_dim=1280, hidden_act="gelu")
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
           block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
           up_block_types=["UpDecoderBlock2D"] * 4)

# family -> component -> (library class, constructor config); text encoders take a CLIPTextConfig.
FAMILIES = {
    "sd15": {
        "pipeline": "StableDiffusionPipeline",
        "unet": ("UNet2DConditionModel", dict(sample_size=64, in_channels=4, out_channels=4, cross_attention_dim=768,
                                              attention_head_dim=8)),
        "text_encoder": ("CLIPTextModel", CLIP_L),
        "vae": ("AutoencoderKL", dict(VAE, sample_size=512, scaling_factor=0.18215)),
    },
    "sdxl": {
        "pipeline": "StableDiffusionXLPipeline",
        "unet": ("UNet2DConditionModel", dict(
            sample_size=128, in_channels=4, out_channels=4, block_out_channels=[320, 640, 1280], layers_per_block=2,
            transformer_layers_per_block=[1, 2, 10], attention_head_dim=[5, 10, 20], cross_attention_dim=2048,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
            down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"])),
        "text_encoder": ("CLIPTextModel", CLIP_L),
        "text_encoder_2": ("CLIPTextModelWithProjection", CLIP_BIGG),
        "vae": ("AutoencoderKL", dict(VAE, sample_size=1024, scaling_factor=0.13025)),
    },
}
WEIGHT_NAME = {"UNet2DConditionModel": "diffusion_pytorch_model", "AutoencoderKL": "diffusion_pytorch_model",
               "CLIPTextModel": "model", "CLIPTextModelWithProjection": "model"}


def empty_component(cls_name: str, config: dict):
    """(library, model on the meta device): real structure, no memory."""
    import diffusers
    import transformers
    from accelerate import init_empty_weights

    with init_empty_weights():
        if hasattr(diffusers, cls_name) and cls_name != "CLIPTextModel":
            return "diffusers", getattr(diffusers, cls_name)(**config)
        return "transformers", getattr(transformers, cls_name)(transformers.CLIPTextConfig(**config))


def tensor_values(key: str, shape: tuple[int, ...], index: int) -> list[torch.Tensor]:
    """The N_MODELS fp16 versions of one tensor: a shared base plus per-model noise, from fixed seeds."""
    g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    base = torch.randn(shape, generator=g).mul_(BASE_STD)
    if "norm" in key and key.endswith(".weight"):
        base.add_(1.0)
    out = []
    for i in range(N_MODELS):
        g.manual_seed(1_000_003 * (i + 1) + index)
        out.append(torch.randn(shape, generator=g).mul_(NOISE_STD).add_(base).half())
    return out


def write_folders(family: str, folders: list[Path]) -> None:
    """Write N_MODELS diffusers folders at once, tensor by tensor (each base tensor is made once)."""
    from hubmix.formats.io.writer import PlannedTensor, SafetensorsWriter

    spec = FAMILIES[family]
    for f in folders:
        f.mkdir(parents=True, exist_ok=True)
    index = {"_class_name": spec["pipeline"], "_diffusers_version": "0.30.0"}
    for cname, (cls_name, config) in ((k, v) for k, v in spec.items() if k != "pipeline"):
        lib, model = empty_component(cls_name, config)
        index[cname] = [lib, cls_name]
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        planned = [PlannedTensor(k, torch.float16, s) for k, s in shapes.items()]
        writers = []
        for f in folders:
            (f / cname).mkdir(exist_ok=True)
            if lib == "diffusers":
                model.save_config(f / cname)
            else:
                model.config.save_pretrained(f / cname)
            writers.append(SafetensorsWriter(f / cname / f"{WEIGHT_NAME[cls_name]}.safetensors", planned,
                                             {"format": "pt"}))
        for j, (key, shape) in enumerate(shapes.items()):
            for w, t in zip(writers, tensor_values(f"{cname}.{key}", shape, j)):
                w.write(key, t)
        for w in writers:
            w.finish()
        print(f"  {cname}: {len(shapes)} tensors, {sum(p.nbytes for p in planned) / 1e9:.2f} GB each", flush=True)
        del model
    for f in folders:
        (f / "model_index.json").write_text(json.dumps(index, indent=2))


def checkpoint_paths(family: str, cache: Path) -> list[Path]:
    return [cache / family / f"{family}-model{i}.safetensors" for i in range(N_MODELS)]


def build(family: str, cache: Path) -> tuple[list[Path], float | None]:
    """The family's N_MODELS single files under cache/family/, built once; (paths, build seconds or None)."""
    paths = checkpoint_paths(family, cache)
    if all(p.exists() for p in paths):
        return paths, None
    t0 = time.perf_counter()
    print(f"building {N_MODELS} random {family} checkpoints under {cache / family} (once)", flush=True)
    folders = [cache / family / f"tmp-folder{i}" for i in range(N_MODELS)]
    write_folders(family, folders)
    hubmix = Path(sys.executable).with_name("hubmix")
    for folder, path in zip(folders, paths):
        subprocess.run([str(hubmix), "convert", str(folder), "--to", "single-file", "--out", str(path),
                        "--overwrite", "-q"], check=True)
        shutil.rmtree(folder)
        path.with_name(f"{path.stem}.recipe.yaml").unlink(missing_ok=True)  # convert's sidecar
    check_layout(family, paths[0])
    seconds = time.perf_counter() - t0
    print(f"built {family} in {seconds:.0f} s", flush=True)
    return paths, seconds


def check_layout(family: str, path: Path) -> None:
    """The single file has the real checkpoint's key layout (fails loudly if the converter changed)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        expect = {"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
                  if family == "sd15" else
                  "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn1.to_q.weight": 2,
                  "first_stage_model.decoder.mid.attn_1.q.weight": 4}
        if family == "sd15":
            expect["cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight"] = 2
        else:
            expect["conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc2.weight"] = 2
            expect["conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight"] = 2
        for key, ndim in expect.items():
            if key not in keys or len(f.get_slice(key).get_shape()) != ndim:
                raise SystemExit(f"{path}: expected {key} ({ndim}-D) in the real single-file layout")
    print(f"  {path.name}: {len(keys)} keys, real single-file layout", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=["sd15", "sdxl", "all"], default="sd15")
    ap.add_argument("--cache", type=Path, default=Path("~/.cache/hubmix-bench").expanduser())
    args = ap.parse_args()
    for fam in (["sd15", "sdxl"] if args.family == "all" else [args.family]):
        build(fam, args.cache)


if __name__ == "__main__":
    main()
