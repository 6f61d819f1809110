"""LoRA extraction benchmark: full-size SDXL (UNet + both text encoders) and the Flux.1 transformer, rank 32.

Builds BASE and TUNED as diffusers folders of the real shapes (accelerate.init_empty_weights for the structure,
random tensors written shard by shard) under --scratch, with TUNED - BASE a delta of decaying spectrum per layer
(singular values ~ i^-0.7 plus a small full-rank noise, the shape fine-tune deltas have; a flat random delta is
where a randomized SVD cannot be accurate and hubmix falls back to the exact one), then times:
- hubmix extract-lora (randomized SVD, checked per layer against the exact energy, falling back to exact), and
- the baseline in the same process: kohya's extraction, an exact `torch.linalg.svd(delta)` per layer (full
  matrices, as sd-scripts' extract_lora_from_models.py calls it) over the same layers.
Prints times, their ratio, the worst per-layer energy ratio (randomized / exact), and the peak RssAnon of the
hubmix run against the largest layer. Deletes the scratch models at the end.

    python benchmarks/lora_bench.py --scratch /work/tmp/lora/bench [--flux-depth 4] [--layers N]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import threading
import time
from pathlib import Path


def rss_anon() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


class Peak:
    def __init__(self):
        self.peak, self._stop = 0, threading.Event()

    def __enter__(self):
        self.start = rss_anon()
        self.peak = self.start
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss_anon())

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def build(family: str, root: Path, flux_depth: int | None, limit: int | None) -> tuple[Path, Path, int]:
    """BASE and TUNED diffusers folders of `family`'s real shapes; returns them and the largest layer's bytes."""
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file

    from hubmix.lora.extract import is_layer

    modules = {}
    if family == "sdxl":
        import diffusers
        import transformers

        with init_empty_weights():
            modules["unet"] = diffusers.UNet2DConditionModel(
                sample_size=128, cross_attention_dim=2048, block_out_channels=(320, 640, 1280),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
                addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
            modules["text_encoder"] = transformers.CLIPTextModel(transformers.CLIPTextConfig(
                hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                projection_dim=768))
            modules["text_encoder_2"] = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
                hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                projection_dim=1280, hidden_act="gelu"))
    else:
        import diffusers

        with init_empty_weights():
            modules["transformer"] = diffusers.FluxTransformer2DModel(
                num_layers=flux_depth or 19, num_single_layers=2 * (flux_depth or 19), guidance_embeds=True)
    gen = torch.Generator().manual_seed(0)
    largest = 0
    for name, module in modules.items():
        for folder in (root / "base" / name, root / "tuned" / name):
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "config.json").write_text(json.dumps(
                dict(module.config) if hasattr(module.config, "keys") else module.config.to_dict(), default=str))
        base, tuned = {}, {}
        count = 0
        for key, p in module.state_dict().items():
            shape = tuple(p.shape)
            if not p.is_floating_point():
                continue
            b = (torch.randn(shape, generator=gen) * 0.02).to(torch.float16)
            base[key] = b
            t = b
            if is_layer(key, shape) and (limit is None or count < limit):
                count += 1
                m, n = shape[0], math.prod(shape[1:])
                r = min(m, n, 256)  # a decaying spectrum over 256 directions, plus a little full-rank noise
                s = torch.arange(1, r + 1, dtype=torch.float32) ** -0.7 * 0.01
                u = torch.linalg.qr(torch.randn(m, r, generator=gen)).Q
                v = torch.linalg.qr(torch.randn(n, r, generator=gen)).Q
                d = (u * s) @ v.T + torch.randn(m, n, generator=gen) * 2e-5
                t = (b.float() + d.reshape(shape)).to(torch.float16)
                largest = max(largest, m * n * 4)
            tuned[key] = t
        fname = "diffusion_pytorch_model.safetensors" if name in ("unet", "transformer") else "model.safetensors"
        save_file(base, str(root / "base" / name / fname))
        save_file(tuned, str(root / "tuned" / name / fname))
        del base, tuned
    return root / "tuned", root / "base", largest


def baseline(tuned: Path, base: Path, components: list[str], rank: int) -> float:
    """kohya's way: torch.linalg.svd (full matrices) of every layer's float32 delta, then U*S, Vh truncated."""
    import torch
    from safetensors import safe_open

    from hubmix.lora.extract import is_layer

    start = time.perf_counter()
    for comp in components:
        f_t = next((tuned / comp).glob("*.safetensors"))
        f_b = next((base / comp).glob("*.safetensors"))
        with safe_open(str(f_t), "pt") as t, safe_open(str(f_b), "pt") as b:
            for key in sorted(t.keys()):
                shape = tuple(t.get_slice(key).get_shape())
                if not is_layer(key, shape):
                    continue
                d = (t.get_tensor(key).float() - b.get_tensor(key).float()).reshape(shape[0], -1)
                if not d.any():
                    continue
                u, s, vh = torch.linalg.svd(d)
                u = u[:, :rank] @ torch.diag(s[:rank])
                vh = vh[:rank]
    return time.perf_counter() - start


def model_index(root: Path, family: str) -> None:
    cls = {"sdxl": "StableDiffusionXLPipeline", "flux": "FluxPipeline"}[family]
    comps = [p.name for p in root.iterdir() if p.is_dir()]
    libs = {"unet": "diffusers", "transformer": "diffusers", "text_encoder": "transformers",
            "text_encoder_2": "transformers"}
    classes = {"unet": "UNet2DConditionModel", "transformer": "FluxTransformer2DModel",
               "text_encoder": "CLIPTextModel", "text_encoder_2": "CLIPTextModelWithProjection"}
    (root / "model_index.json").write_text(json.dumps({"_class_name": cls, **{c: [libs[c], classes[c]]
                                                                              for c in comps}}))


def run(family: str, args) -> dict:
    from hubmix.lora.extract import ExtractOptions, extract_lora

    root = Path(args.scratch) / family
    shutil.rmtree(root, ignore_errors=True)
    t0 = time.perf_counter()
    tuned, base, largest = build(family, root, args.flux_depth, args.layers)
    for r in (tuned, base):
        model_index(r, family)
    built = time.perf_counter() - t0
    comps = ["unet", "text_encoder", "text_encoder_2"] if family == "sdxl" else ["transformer"]
    out = root / "lora.safetensors"
    with Peak() as peak:
        t = time.perf_counter()
        res = extract_lora(str(tuned), str(base), out, ExtractOptions(rank=32, components=comps), overwrite=True,
                           quiet=True)
        ours = time.perf_counter() - t
    kohya = baseline(tuned, base, comps, 32)
    stats = {c: s.to_dict() for c, s in res.components.items()}
    report = {"family": family, "build_s": round(built, 1), "hubmix_s": round(ours, 1),
              "kohya_exact_svd_s": round(kohya, 1), "speedup": round(kohya / ours, 2),
              "layers": sum(s["layers"] for s in stats.values()),
              "randomized": sum(s["randomized"] for s in stats.values()),
              "exact_fallbacks": sum(s["exact"] for s in stats.values()),
              "worst_randomized_vs_exact": min(s["worst_randomized_vs_exact"] for s in stats.values()),
              "peak_rss_anon_mb": round((peak.peak - peak.start) / 2**20, 1),
              "largest_layer_f32_mb": round(largest / 2**20, 1), "lora_mb": round(out.stat().st_size / 2**20, 1)}
    shutil.rmtree(root, ignore_errors=True)
    return report


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scratch", default="/work/tmp/lora/bench")
    ap.add_argument("--families", default="sdxl,flux")
    ap.add_argument("--flux-depth", type=int, default=4, help="Flux double blocks (single blocks: twice); 19 = full")
    ap.add_argument("--layers", type=int, help="Only the first N layers per component get a delta (quick runs)")
    args = ap.parse_args()
    for fam in args.families.split(","):
        print(json.dumps(run(fam, args)), flush=True)


if __name__ == "__main__":
    main()
