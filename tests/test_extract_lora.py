"""LoRA extraction on tiny SD1.x / SDXL / Flux / SD3 models: full rank reproduces TUNED through diffusers' own
load_lora_weights + fuse_lora; rank R equals numpy's truncated SVD of each delta; the randomized SVD is checked."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error
from safetensors import safe_open

import lora_extract_models
from hubmix.lora.extract import is_layer

PIPE_COMPONENTS = {"sd1": ["unet", "text_encoder"], "sdxl": ["unet", "text_encoder", "text_encoder_2"],
                   "flux": ["transformer", "text_encoder"], "sd3": ["transformer", "text_encoder", "text_encoder_2"]}


def _canon(comp: str, sd: dict) -> dict:
    """CLIP keys as transformers saves them -> canonical (text_model. prefix); T5 and the rest as they are."""
    clip = ("embeddings.", "encoder.layers.", "final_layer_norm.")
    return {("text_model." + k if comp.startswith("text_encoder") and k.startswith(clip) else k): v
            for k, v in sd.items()}


@pytest.mark.parametrize("family, fmt", [("sd1", "kohya"), ("sdxl", "kohya"), ("sd1", "diffusers"),
                                         ("flux", "diffusers"), ("sd3", "diffusers")])
def test_full_rank_loads_in_diffusers_and_equals_tuned(zoo, tmp_path, cli, family, fmt):
    from diffusers import DiffusionPipeline

    base = zoo.diffusers(family, 1)
    comps = PIPE_COMPONENTS[family]
    # diffusers builds text_encoder_2's adapter with one rank, so its 64->32 text_projection (rank 32 at full rank,
    # 64 elsewhere) fails to load there: the tiny SDXL keeps that layer unchanged (full-size ones are square)
    keep = ("text_projection.weight",) if family == "sdxl" else ()
    tuned = lora_extract_models.tuned_copy(base, tmp_path / "tuned", comps, keep=keep)
    lora = tmp_path / "l.safetensors"
    code, out, err = cli("extract-lora", tmp_path / "tuned", base, "--rank", "100000", "--dtype", "fp32",
                         "--format", fmt, "--components", ",".join(comps), "-o", lora, "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert len(summary["zero_deltas"]) == len(comps) + len(keep)  # the layers left unchanged
    assert sum(k.endswith(".bias") for k in summary["changed_not_layers"]) == len(comps)
    pipe = DiffusionPipeline.from_pretrained(str(base))
    pipe.load_lora_weights(str(lora))
    pipe.fuse_lora(components=comps)  # Flux/SD3 pipelines fuse the transformer alone by default
    pipe.unload_lora_weights()
    for comp in comps:
        got = _canon(comp, getattr(pipe, comp).state_dict())
        want = _canon(comp, tuned[comp])
        layers = [k for k in want if is_layer(k, tuple(want[k].shape)) and k in got]
        assert len(layers) > 5
        for k in layers:
            assert torch.allclose(got[k], want[k], rtol=1e-5, atol=1e-5), (comp, k)


def test_rank_r_is_the_truncated_svd_and_diffs_bake_back(zoo, tmp_path, cli):
    base = zoo.diffusers("sd1", 1)
    tuned = lora_extract_models.tuned_copy(base, tmp_path / "tuned", ["unet", "text_encoder"])
    lora = tmp_path / "r4.safetensors"
    code, _, err = cli("extract-lora", tmp_path / "tuned", base, "--rank", "4", "--conv-rank", "2", "--alpha", "1",
                       "--with-diffs", "--dtype", "fp32", "-o", lora, "-q")
    assert code == 0, err
    from conftest import component_tensors

    bases = {c: _canon(c, component_tensors(base, c)) for c in ("unet", "text_encoder")}
    tuned = {c: _canon(c, t) for c, t in tuned.items()}
    with safe_open(str(lora), "pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
        assert meta["hubmix.rank"] == "4" and meta["hubmix.base_model"] == base.name
        assert set(json.loads(meta["hubmix.energy"])) == {"unet", "text_encoder"}
        checked = 0
        for k in sorted(keys):
            if not k.endswith(".lora_down.weight"):
                continue
            mod = k[: -len(".lora_down.weight")]
            up, down = f.get_tensor(mod + ".lora_up.weight"), f.get_tensor(k)
            alpha = float(f.get_tensor(mod + ".alpha"))
            assert alpha == 1.0
            rank = down.shape[0]
            prod = (up.reshape(up.shape[0], rank) @ down.reshape(rank, -1)) * alpha / rank
            if mod.startswith("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"):
                comp, key = "unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
            elif mod == "lora_te_text_model_encoder_layers_1_mlp_fc1":
                comp, key = "text_encoder", "text_model.encoder.layers.1.mlp.fc1.weight"
            elif mod == "lora_unet_down_blocks_0_resnets_1_conv1":
                comp, key = "unet", "down_blocks.0.resnets.1.conv1.weight"
            else:
                continue
            d = (tuned[comp][key] - bases[comp][key]).double().numpy().reshape(prod.shape[0], -1)
            u, s, vh = np.linalg.svd(d, full_matrices=False)
            want_rank = 2 if "conv1" in key else 4
            assert rank == want_rank
            want = (u[:, :rank] * s[:rank]) @ vh[:rank]
            assert np.allclose(prod.double().numpy(), want, rtol=1e-4, atol=1e-5), key
            checked += 1
        assert checked == 3
        assert any(k.endswith(".diff_b") for k in keys)
    # the diffs bake back through hubmix's own reader: each changed bias becomes the tuned one
    code, _, err = cli("merge", base, "-m", "copy", "--lora", lora, "-o", tmp_path / "baked", "-q")
    assert code == 0, err
    got = component_tensors(tmp_path / "baked", "unet")
    moved = [k for k in got if k.endswith(".bias") and not torch.equal(tuned["unet"][k], bases["unet"][k])]
    assert moved and all(torch.allclose(got[k], tuned["unet"][k], atol=1e-6) for k in moved)


def _spectrum_matrix(gen, m, n, s):
    u, _ = torch.linalg.qr(torch.randn(m, len(s), generator=gen))
    v, _ = torch.linalg.qr(torch.randn(n, len(s), generator=gen))
    return (u * s) @ v.T, u, v


def _numpy_top(a, k):
    sv = np.linalg.svd(a.double().numpy(), compute_uv=False)
    return float((sv[:k] ** 2).sum()), sv


def test_randomized_svd_is_certified_by_the_ceiling_and_flat_spectra_fall_back():
    from hubmix.lora import svd

    gen = torch.Generator().manual_seed(0)
    s = 1.0 / torch.arange(1, 301, dtype=torch.float32) ** 1.5  # a decaying spectrum, as fine-tune deltas have
    a, u, v = _spectrum_matrix(gen, 400, 300, s)
    f = svd.truncated(a, 16)
    assert (f.method, f.check) == ("randomized", "ceiling")
    exact, sv = _numpy_top(a, 16)
    assert f.exact_kept >= exact * (1 - 1e-6) and f.kept >= 0.995 * exact  # the ceiling is above numpy's energy
    assert np.allclose(((f.u * f.s) @ f.vh).numpy(), (u[:, :16] * s[:16]) @ v[:, :16].T, atol=2e-4)
    flat = torch.randn(400, 300, generator=gen)  # a flat spectrum: the randomized SVD misses, the exact one runs
    g = svd.truncated(flat, 16)
    assert g.method == "exact"
    assert abs(g.kept - _numpy_top(flat, 16)[0]) < 1e-4 * g.kept
    # a plateau over the rank: the randomized factors are accurate, but the residual's norm is as large as the
    # kept singular values, so the ceiling cannot certify them; the exact spectrum does
    plateau = torch.cat([torch.ones(40), torch.full((200,), 1e-3)])
    p, _, _ = _spectrum_matrix(gen, 400, 300, plateau)
    h = svd.truncated(p, 16)
    exact = _numpy_top(p, 16)[0]
    assert (h.method, h.check) == ("randomized", "spectrum")
    assert abs(h.exact_kept - exact) < 1e-4 * exact and h.kept >= 0.995 * exact
    assert svd.rank_for_energy(torch.tensor(sv ** 2), 0.9, 1000) == int(np.searchsorted(
        np.cumsum(sv ** 2) / (sv ** 2).sum(), 0.9) + 1)


@pytest.mark.parametrize("power, noise", [(0.5, 0.0), (0.7, 0.1), (1.0, 0.5), (0.0, 1.0), (2.0, 0.01)])
def test_energy_ceiling_is_above_the_exact_energy(power, noise):
    """The certificate's guarantee against numpy's SVD, for good bases (power iterations) and poor ones (none,
    random): the ceiling is never below the exact top-k energy; Lanczos never overestimates ||R||_2^2 and is
    within its margin of it."""
    from hubmix.lora import ceiling, svd

    gen = torch.Generator().manual_seed(int(power * 10 + noise * 100))
    m, n, k = 300, 200, 12
    s = torch.arange(1, 201, dtype=torch.float32) ** -power
    a, _, _ = _spectrum_matrix(gen, m, n, s)
    a += torch.randn(m, n, generator=gen) * noise * float(s.norm()) / (m * n) ** 0.5
    exact = _numpy_top(a, k)[0]
    for iterations in (0, 2):
        basis = svd.range_basis(a, svd.oversampled(k, m, n), gen, iterations)
        proj = basis.T @ a
        top = ceiling.energy_ceiling(a, basis, proj, k, gen)
        kept = float((torch.linalg.svdvals(proj.double())[:k] ** 2).sum())
        assert kept * (1 - 1e-6) <= exact <= top * (1 + 1e-6), (iterations, kept, exact, top)
        r = (a - basis @ proj).double().numpy()
        norm2 = float(np.linalg.norm(r, 2) ** 2)
        theta = ceiling.top_eigenvalue(a - basis @ proj, gen)
        assert (1 - ceiling.EPS) * norm2 <= theta <= norm2 * (1 + 1e-5)
    random = torch.linalg.qr(torch.randn(m, 24, generator=gen)).Q  # a basis that knows nothing of a
    assert ceiling.energy_ceiling(a, random, random.T @ a, k, gen) >= exact * (1 - 1e-6)


def test_auto_rank_and_errors(zoo, tmp_path, cli):
    base = zoo.diffusers("sd1", 1)
    lora_extract_models.tuned_copy(base, tmp_path / "tuned", ["unet"], low_rank=3)
    out = tmp_path / "auto.safetensors"
    code, stdout, err = cli("extract-lora", tmp_path / "tuned", base, "--rank", "auto", "--energy", "0.999",
                            "--max-rank", "8", "--components", "unet", "-o", out, "--json")
    assert code == 0, err
    stats = json.loads(stdout)["components"]["unet"]
    assert stats["rank_max"] == 3 and stats["energy_kept"] > 0.999  # the moves were rank 3
    code, _, err = cli("extract-lora", tmp_path / "tuned", base, "--rank", "auto", "-o", tmp_path / "x.safetensors")
    assert_one_line_error(code, err, "--energy")
    code, _, err = cli("extract-lora", base, base, "--components", "unet", "-o", tmp_path / "y.safetensors", "-q")
    assert_one_line_error(code, err, "nothing to extract")
    assert not (tmp_path / "y.safetensors").exists()


def test_push_lora_card_and_samples(zoo, tmp_path, monkeypatch, cli):
    """BASE from the (loopback) Hub, TUNED local: the pushed repo has the LoRA, its samples (base, base + LoRA at
    0.5 and 1, tuned) and a card naming the base as base_model with base_model_relation adapter."""
    import yaml
    from hubserver import configure_hf_client, guard_loopback, start_hub_server

    base = zoo.diffusers("sd1", 1)
    # scale 0.05, not 0.5: with 0.5 the tiny random UNet is chaotic (2e-5 noise on TUNED's own weights moves its
    # image by up to 187 levels), so no render could show that base + LoRA at 1 is TUNED
    lora_extract_models.tuned_copy(base, tmp_path / "tuned", ["unet"], low_rank=2, scale=0.05)
    server = start_hub_server(tokens={"tok": "user"})
    try:
        server.create_repo("org/base")
        files = {p.relative_to(base).as_posix(): p for p in base.rglob("*") if p.is_file()}
        sha = server.commit("org/base", files)
        off_loopback = guard_loopback(monkeypatch)
        configure_hf_client(monkeypatch, server.url, tmp_path / "hf_home")
        monkeypatch.setenv("HUBMIX_CACHE", str(tmp_path / "hubmix-cache"))
        monkeypatch.setenv("HF_TOKEN", "tok")
        lora = tmp_path / "style.safetensors"
        code, out, err = cli("extract-lora", tmp_path / "tuned", "org/base", "--rank", "2", "--components", "unet",
                             "--with-diffs", "--dtype", "fp32", "-o", lora, "--push", "user/style-lora", "--samples",
                             "--json")
        assert code == 0, err
        assert off_loopback == []
        pushed = server.files("user/style-lora")
    finally:
        server.stop()
    assert json.loads(out)["push"]["repo_id"] == "user/style-lora"
    assert pushed["style.safetensors"] == lora.read_bytes()
    assert {"samples/grid.png", "samples/samples.json"} <= set(pushed)
    index = json.loads(pushed["samples/samples.json"])
    assert [im["model"] for im in index["images"]] == ["base", "base + LoRA 0.5", "base + LoRA 1", "tuned"]
    card = pushed["README.md"].decode()
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == "org/base" and front["base_model_relation"] == "adapter"
    assert {"lora", "sd1"} <= set(front["tags"])
    assert "unet" in card and "energy kept" in card
    with safe_open(str(lora), "pt") as f:
        meta = f.metadata()
    assert meta["hubmix.base_model"] == f"org/base@{sha}" and meta["hubmix.family"] == "sd1"
    assert float(json.loads(meta["hubmix.energy"])["unet"]) > 0.999  # the moves were rank 2
    # the LoRA rows render something else than the base row, and strength 1 renders TUNED
    from PIL import Image

    def img(name):
        return np.asarray(Image.open(tmp_path / "style.samples" / name)).astype(float)
    assert np.abs(img("base-LoRA-1-p0-s0.png") - img("base-p0-s0.png")).max() > 20
    # base + LoRA at strength 1 renders TUNED (the rank-2 move is extracted exactly, in float32)
    assert np.abs(img("base-LoRA-1-p0-s0.png") - img("tuned-p0-s0.png")).max() <= 2
    assert np.abs(img("base-LoRA-0.5-p0-s0.png") - img("base-LoRA-1-p0-s0.png")).max() > 2
