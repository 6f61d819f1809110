"""LoRA extraction benchmark: full-size SDXL (UNet + both text encoders) and the Flux.1 transformer, rank 32.

Builds BASE and TUNED as diffusers folders of the real shapes (accelerate.init_empty_weights for the structure,
random tensors written shard by shard) under --scratch, with TUNED - BASE a delta of decaying spectrum per layer
(singular values ~ i^-0.7 plus a small full-rank noise, the shape fine-tune deltas have; a flat random delta is
where a randomized SVD cannot be accurate and hubmix falls back to the exact one), then times:
- hubmix extract-lora (randomized SVD, checked per layer against the exact energy, falling back to exact), and
- the baseline in the same process: kohya's extraction, an exact `torch.linalg.svd(delta)` per layer (full
  matrices, as sd-scripts' extract_lora_from_models.py calls it) over the same layers.
Prints times, their ratio, the worst per-layer energy ratio (randomized / exact), and the peak RssAnon of the
hubmix run against the largest layer. Deletes the scratch models at the end (unless --keep or --build-only;
`--build-only` then `--reuse` builds on a busy machine and measures later on a quiet one, same options both times).

    python benchmarks/lora_bench.py --scratch /work/tmp/lora/bench [--flux-depth 4] [--sdxl-depth 10] [--layers N]

Times are wall clock and CPU (user + sys of the process, all its threads); on a shared machine the CPU ratio is
the steadier one. The baseline's time counts the SVD alone, hubmix's the whole extraction (reading included).
"""

from __future__ import annotations

import argparse
import json
import math
import os
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


def build(family: str, root: Path, flux_depth: int | None, limit: int | None, every_n: int = 1,
          sdxl_depth: int = 10) -> tuple[Path, Path, int]:
    """BASE and TUNED diffusers folders of `family`'s real shapes; returns them and the largest layer's bytes."""
    import torch
    from accelerate import init_empty_weights
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
                transformer_layers_per_block=(1, 2, sdxl_depth), attention_head_dim=(5, 10, 20),
                use_linear_projection=True,
                addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
            modules["text_encoder"] = transformers.CLIPTextModel(transformers.CLIPTextConfig(
                hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                projection_dim=768))
            modules["text_encoder_2"] = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
                hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                projection_dim=1280, hidden_act="gelu"))
        modules["vae"] = tiny_vae(4)  # an SDXL folder has one (same in BASE and TUNED, not extracted)
    else:
        import diffusers

        with init_empty_weights():
            modules["transformer"] = diffusers.FluxTransformer2DModel(
                num_layers=flux_depth or 19, num_single_layers=2 * (flux_depth or 19), guidance_embeds=True)
        import transformers

        # tiny text encoders and VAE (same in BASE and TUNED, not extracted): a Flux.1 folder has them
        modules["text_encoder"] = transformers.CLIPTextModel(transformers.CLIPTextConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, projection_dim=32))
        modules["text_encoder_2"] = transformers.T5EncoderModel(transformers.T5Config(
            d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4, vocab_size=128))
        modules["vae"] = tiny_vae(16)
    gen = torch.Generator().manual_seed(0)
    largest = 0
    for name, module in modules.items():
        for folder in (root / "base" / name, root / "tuned" / name):
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "config.json").write_text(json.dumps(
                dict(module.config) if hasattr(module.config, "keys") else module.config.to_dict(), default=str))
        base, tuned = {}, {}
        count = seen = 0
        every = every_n if name in ("unet", "transformer") or family == "sdxl" else 1
        shards = Shards(root, name)
        for key, p in module.state_dict().items():
            shape = tuple(p.shape)
            if not p.is_floating_point():
                continue
            b = (torch.randn(shape, generator=gen) * 0.02).to(torch.float16)
            base[key] = b
            t = b
            extracted = is_layer(key, shape) and name in EXTRACTED[family]
            seen += extracted
            if extracted and (limit is None or count < limit) and (seen - 1) % every == 0:
                count += 1
                m, n = shape[0], math.prod(shape[1:])
                d = synthetic_delta(m, n, gen)
                t = (b.float() + d.reshape(shape)).to(torch.float16)
                largest = max(largest, m * n * 4)
            tuned[key] = t
            if sum(v.numel() for v in base.values()) >= SHARD:
                shards.flush(base, tuned)
        shards.flush(base, tuned)
        shards.close()
    return root / "tuned", root / "base", largest


EXTRACTED = {"sdxl": ("unet", "text_encoder", "text_encoder_2"), "flux": ("transformer",)}


def tiny_vae(latent_channels: int):
    import diffusers

    return diffusers.AutoencoderKL(block_out_channels=(32,), latent_channels=latent_channels, norm_num_groups=8,
                                   down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",))


def synthetic_delta(m: int, n: int, gen):
    """A fine-tune-like delta: a decaying spectrum over 256 directions plus a little full-rank noise."""
    import torch

    r = min(m, n, 256)
    s = torch.arange(1, r + 1, dtype=torch.float32) ** -0.7
    s *= 0.01 * 0.02 * math.sqrt(m * n) / s.norm()  # the delta's norm 1% of the base weight's (fp16's
    # rounding of TUNED then adds ~0.05% of its energy; at a fixed small scale it would swamp it)
    u = torch.linalg.qr(torch.randn(m, r, generator=gen)).Q
    v = torch.linalg.qr(torch.randn(n, r, generator=gen)).Q
    d = (u * s) @ v.T
    # full-rank noise holding 10% of the signal's energy (a flat random delta is what no rank-32 LoRA
    # represents and where hubmix falls back to the exact SVD)
    d += torch.randn(m, n, generator=gen) * math.sqrt(0.1 * float(s.square().sum()) / (m * n))
    return d


def profile(shapes: list[str], rank: int) -> None:
    """Per layer shape, CPU seconds (user + sys, this process) of hubmix's checked truncated SVD, of the former
    check (Gram matrix + eigvalsh) and of kohya's torch.linalg.svd (full matrices), on the synthetic delta."""
    import torch

    from hubmix.lora.svd import spectrum, threads_for, truncated

    def cpu(f):
        t = time.process_time()
        r = f()
        return r, round(time.process_time() - t, 3)

    gen = torch.Generator().manual_seed(0)
    for spec in shapes:
        m, n = map(int, spec.split("x"))
        a = synthetic_delta(m, n, gen)
        f, ours = cpu(lambda: truncated(a, rank))
        with threads_for(a.numel()):
            e, check = cpu(lambda: spectrum(a))
        _, kohya = cpu(lambda: torch.linalg.svd(a))
        exact = float(e[:rank].double().sum())
        print(json.dumps({"shape": spec, "hubmix_cpu_s": ours, "method": f.method, "check": f.check,
                          "gram_eigvalsh_cpu_s": check, "kohya_svd_cpu_s": kohya, "speedup_cpu": round(kohya / ours, 1),
                          "kept_vs_exact": round(f.kept / exact, 5), "ceiling_vs_exact": round(f.exact_kept / exact, 5),
                          "load_avg": os.getloadavg()}), flush=True)


SHARD = 1 << 29  # elements per shard (1 GB in fp16): base and tuned of one shard in memory, never a whole model


class Shards:
    """Writes a component of BASE and TUNED as safetensors shards with a diffusers weights index."""

    def __init__(self, root: Path, name: str):
        self.root, self.name, self.files, self.map = root, name, 0, {}
        self.stem = "model" if name.startswith("text_encoder") else "diffusion_pytorch_model"

    def flush(self, base: dict, tuned: dict) -> None:
        from safetensors.torch import save_file

        if not base:
            return
        self.files += 1
        fname = f"{self.stem}-{self.files:05d}-of-XXXXX.safetensors"
        save_file(base, str(self.root / "base" / self.name / fname))
        save_file(tuned, str(self.root / "tuned" / self.name / fname))
        self.map.update(dict.fromkeys(base, fname))
        base.clear()
        tuned.clear()

    def close(self) -> None:
        total = f"{self.files:05d}"
        for side in ("base", "tuned"):
            folder = self.root / side / self.name
            for f in folder.glob("*-of-XXXXX.safetensors"):
                f.rename(folder / f.name.replace("XXXXX", total))
            wmap = {k: v.replace("XXXXX", total) for k, v in self.map.items()}
            (folder / f"{self.stem}.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wmap}))


def layers(tuned: Path, base: Path, components: list[str]):
    """(component, key, shape, delta as [out, in*kh*kw] float32) of every changed Linear/Conv layer, lazily."""
    from safetensors import safe_open

    from hubmix.lora.extract import is_layer

    for comp in components:
        wmap = json.loads(next((tuned / comp).glob("*.index.json")).read_text())["weight_map"]
        for key in sorted(wmap):
            with safe_open(str(tuned / comp / wmap[key]), "pt") as t, safe_open(str(base / comp / wmap[key]), "pt") as b:
                shape = tuple(t.get_slice(key).get_shape())
                if not is_layer(key, shape):
                    continue
                d = (t.get_tensor(key).float() - b.get_tensor(key).float()).reshape(shape[0], -1)
            if d.any():
                yield comp, key, shape, d


def baseline(tuned: Path, base: Path, components: list[str], rank: int, sample: int | None) -> dict:
    """kohya's way: torch.linalg.svd (full matrices, as sd-scripts' extract_lora_from_models.py calls it) of every
    layer's float32 delta, then U*S, Vh truncated. With `sample`, only the first `sample` layers of every shape
    class (by sorted key) are timed and the time is extrapolated per class (count x mean time). On the timed
    layers it also checks hubmix's factors (lora.svd.truncated, as extract_lora calls it) against the exact
    energy: the independent oracle of the 0.5% goal."""
    import zlib

    import torch

    from hubmix.lora.svd import truncated

    classes: dict[tuple, list] = {}  # (rows, cols) -> [count, timed, seconds, cpu seconds]
    worst, checked = 1.0, 0
    for comp, key, shape, d in layers(tuned, base, components):
        c = classes.setdefault(tuple(d.shape), [0, 0, 0.0, 0.0])
        c[0] += 1
        if sample is not None and c[1] >= sample:
            continue
        start, cpu = time.perf_counter(), time.process_time()
        u, s, vh = torch.linalg.svd(d)
        u = u[:, :rank] @ torch.diag(s[:rank])
        vh = vh[:rank]
        c[1] += 1
        c[2] += time.perf_counter() - start
        c[3] += time.process_time() - cpu
        k = min(rank, *d.shape)
        exact = float(s[:k].square().sum())
        f = truncated(d, rank, seed=zlib.crc32(key.encode()))
        worst = min(worst, float(f.s.square().sum()) / exact)
        checked += 1
    est = sum(n * t / timed for n, timed, t, _ in classes.values() if timed)
    est_cpu = sum(n * t / timed for n, timed, _, t in classes.values() if timed)
    return {"exact_svd_s": round(est, 1), "exact_svd_cpu_s": round(est_cpu, 1),
            "exact_timed_layers": sum(c[1] for c in classes.values()),
            "extrapolated": sample is not None, "oracle_checked_layers": checked,
            "oracle_worst_kept_vs_exact": round(worst, 6),
            "shape_classes": {f"{m}x{n}": {"count": c[0], "timed": c[1], "mean_s": round(c[2] / c[1], 3),
                                           "mean_cpu_s": round(c[3] / c[1], 3)}
                              for (m, n), c in sorted(classes.items()) if c[1]}}


def model_index(root: Path, family: str) -> None:
    cls = {"sdxl": "StableDiffusionXLPipeline", "flux": "FluxPipeline"}[family]
    comps = [p.name for p in root.iterdir() if p.is_dir()]
    libs = {"vae": "diffusers", "unet": "diffusers", "transformer": "diffusers", "text_encoder": "transformers",
            "text_encoder_2": "transformers"}
    t5 = family == "flux"
    classes = {"vae": "AutoencoderKL", "unet": "UNet2DConditionModel", "transformer": "FluxTransformer2DModel",
               "text_encoder": "CLIPTextModel", "text_encoder_2": "T5EncoderModel" if t5 else "CLIPTextModelWithProjection"}
    (root / "model_index.json").write_text(json.dumps({"_class_name": cls, **{c: [libs[c], classes[c]]
                                                                              for c in comps}}))


def run(family: str, args) -> dict:
    from hubmix.lora.extract import ExtractOptions, extract_lora

    root = Path(args.scratch) / family
    built_json = root / "built.json"
    t0 = time.perf_counter()
    if args.reuse and built_json.exists():  # models built by an earlier --keep run: measure only
        tuned, base, largest = root / "tuned", root / "base", json.loads(built_json.read_text())["largest"]
    else:
        shutil.rmtree(root, ignore_errors=True)
        tuned, base, largest = build(family, root, args.flux_depth, args.layers, args.every, args.sdxl_depth)
        for r in (tuned, base):
            model_index(r, family)
        built_json.write_text(json.dumps({"largest": largest}))
    built = time.perf_counter() - t0
    if args.build_only:
        return {"family": family, "built_in_s": round(built, 1), "scratch": str(root)}
    comps = list(EXTRACTED[family])
    out = root / "lora.safetensors"
    with Peak() as peak:
        t, cpu = time.perf_counter(), time.process_time()
        res = extract_lora(str(tuned), str(base), out, ExtractOptions(rank=32, components=comps), overwrite=True,
                           quiet=True)
        ours, ours_cpu = time.perf_counter() - t, time.process_time() - cpu
    base_t = time.perf_counter()
    kohya = baseline(tuned, base, comps, 32, args.exact_sample)
    base_t = time.perf_counter() - base_t
    stats = {c: s.to_dict() for c, s in res.components.items()}
    report = {"family": family, "load_avg": os.getloadavg(), "build_s": round(built, 1), "hubmix_s": round(ours, 1),
              "hubmix_cpu_s": round(ours_cpu, 1), "kohya_exact_svd_s": kohya.pop("exact_svd_s"),
              "kohya_exact_svd_cpu_s": kohya.pop("exact_svd_cpu_s"), "baseline_wall_s": round(base_t, 1),
              "speedup": None, "speedup_cpu": None,
              "layers": sum(s["layers"] for s in stats.values()),
              "randomized": sum(s["randomized"] for s in stats.values()),
              "checked_by_spectrum": sum(s["randomized_checked_by_spectrum"] for s in stats.values()),
              "exact_fallbacks": sum(s["exact"] for s in stats.values()),
              "worst_randomized_vs_exact": min(s["worst_randomized_vs_exact"] for s in stats.values()),
              "peak_rss_anon_mb": round((peak.peak - peak.start) / 2**20, 1),
              "largest_layer_f32_mb": round(largest / 2**20, 1), "lora_mb": round(out.stat().st_size / 2**20, 1), **kohya}
    report["speedup"] = round(report["kohya_exact_svd_s"] / ours, 2)
    report["speedup_cpu"] = round(report["kohya_exact_svd_cpu_s"] / ours_cpu, 2)
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return report


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scratch", default="/work/tmp/lora/bench")
    ap.add_argument("--families", default="sdxl,flux")
    ap.add_argument("--flux-depth", type=int, default=4, help="Flux double blocks (single blocks: twice); 19 = full")
    ap.add_argument("--sdxl-depth", type=int, default=10, help="transformer layers per SDXL 1280-channel block "
                    "(10 = full; fewer cuts the model's size, every shape class stays)")
    ap.add_argument("--layers", type=int, help="Only the first N layers per component get a delta (quick runs)")
    ap.add_argument("--exact-sample", type=int, help="Time the exact SVD on the first N layers of every shape class "
                    "and extrapolate per class (default: every layer)")
    ap.add_argument("--every", type=int, default=1, help="Only every Nth layer gets a delta (the others are equal "
                    "in BASE and TUNED: read and skipped by hubmix); 1 = every layer")
    ap.add_argument("--keep", action="store_true", help="Keep the scratch models")
    ap.add_argument("--build-only", action="store_true", help="Build the scratch models and stop (implies --keep)")
    ap.add_argument("--reuse", action="store_true", help="Measure on the models an earlier --keep / --build-only "
                    "run left under --scratch (build them only if absent): builds on a busy machine, measures on a "
                    "quiet one")
    ap.add_argument("--profile-shapes", help="Only profile one synthetic layer per shape (e.g. 1280x1280,640x5760): "
                    "hubmix's checked SVD, the Gram + eigvalsh check, kohya's SVD, in CPU seconds")
    args = ap.parse_args()
    if args.profile_shapes:
        profile(args.profile_shapes.split(","), 32)
        return
    for fam in args.families.split(","):
        print(json.dumps(run(fam, args)), flush=True)


if __name__ == "__main__":
    main()
