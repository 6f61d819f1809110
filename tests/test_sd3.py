"""The SD3 family (SD3 Medium; SD3.5 Medium with attn2 and qk-norm): single files in the original all-in-one layout
checked against diffusers' own StableDiffusion3Pipeline.from_single_file, exact round trips, mixed-layout merges
and per-block parameters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import file_metadata, component_tensors, load_tensors

import hubmix
from hubmix import Recipe
from hubmix.flow.convert import convert
from hubmix.formats.model import open_model

COMPONENTS = ["transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae"]
PREFIXES = ("model.diffusion_model.", "first_stage_model.", "text_encoders.clip_l.transformer.",
            "text_encoders.clip_g.transformer.", "text_encoders.t5xxl.transformer.")


def canon(component: str, key: str) -> str:
    """transformers >= 5 saves CLIPTextModel without text_model.; hubmix's canonical keys carry it."""
    if component in ("text_encoder", "text_encoder_2") and not key.startswith(("text_model.", "text_projection")):
        return "text_model." + key
    return key


def tensors(folder: Path, component: str) -> dict[str, torch.Tensor]:
    return {canon(component, k): v for k, v in component_tensors(folder, component).items()}


@pytest.mark.parametrize("variant", ["sd3", "sd35m", "sd35l"])
def test_single_file_has_the_original_naming(zoo, variant):
    keys = set(load_tensors(zoo.single(variant)))
    assert all(k.startswith(PREFIXES) for k in keys), sorted(k for k in keys if not k.startswith(PREFIXES))[:5]
    # diffusers' own names would load without conversion too: assert the original ones
    assert not any("transformer_blocks" in k or ".to_q." in k or "time_text_embed" in k for k in keys)
    p = "model.diffusion_model."
    assert {p + "joint_blocks.0.x_block.attn.qkv.weight", p + "joint_blocks.0.context_block.attn.qkv.weight",
            p + "final_layer.adaLN_modulation.1.weight", p + "pos_embed", p + "x_embedder.proj.weight"} <= keys
    last = 3 if variant == "sd35l" else 2  # tiny models have 3 (Large: 4) joint blocks; the last is pre-only
    assert p + f"joint_blocks.{last}.context_block.attn.proj.weight" not in keys
    assert p + f"joint_blocks.{last}.context_block.mlp.fc1.weight" not in keys
    attn2 = {int(k.split(".")[3]) for k in keys if ".x_block.attn2." in k}
    assert attn2 == ({0, 1} if variant == "sd35m" else set())
    assert any(".ln_q." in k for k in keys) is (variant != "sd3")
    t5 = "text_encoders.t5xxl.transformer."
    assert {t5 + "shared.weight", t5 + "encoder.embed_tokens.weight"} <= keys  # both: see layouts.yaml comfy_t5


@pytest.mark.parametrize("variant", ["sd3", "sd35m", "sd35l"])
def test_diffusers_single_file_loader_reads_every_tensor(zoo, variant):
    """diffusers' from_single_file (config from a local folder) gives back the original pipeline, tensor by tensor;
    the one documented exception: its SD3 loader replaces CLIP-L's text_projection with an identity."""
    import diffusers

    src = zoo.diffusers(variant)
    orig = diffusers.StableDiffusion3Pipeline.from_pretrained(src)
    loaded = diffusers.StableDiffusion3Pipeline.from_single_file(str(zoo.single(variant)),
                                                                  config=str(zoo.configs_only(src)),
                                                                  local_files_only=True)
    for name in COMPONENTS:
        want, got = getattr(orig, name).state_dict(), getattr(loaded, name).state_dict()
        assert set(got) == set(want), (name, sorted(set(got) ^ set(want))[:5])
        for k, v in want.items():
            assert got[k].device.type != "meta", (name, k)
            if name == "text_encoder" and k == "text_projection.weight":
                assert torch.equal(got[k], torch.eye(v.shape[0]))
                continue
            assert torch.equal(got[k], v), (name, k)


@pytest.mark.parametrize("variant", ["sd3", "sd35m"])
def test_diffusers_to_single_file_to_diffusers_is_exact(zoo, tmp_path, variant):
    src = zoo.diffusers(variant)
    back = tmp_path / "back"
    convert(zoo.single(variant), back, to="diffusers", config_from=str(src), quiet=True)
    for name in COMPONENTS:
        want, got = tensors(src, name), tensors(back, name)
        assert set(got) == set(want), (name, sorted(set(got) ^ set(want))[:5])
        assert all(torch.equal(got[k], want[k]) for k in want), name
    assert json.loads((back / "transformer" / "config.json").read_text())["dual_attention_layers"] == \
        json.loads((src / "transformer" / "config.json").read_text())["dual_attention_layers"]
    import diffusers

    from hubmix.formats.tiny import run_pipeline

    pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(back)
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    if variant == "sd35m":  # the round-tripped pipeline draws the original's pixels
        want_img = run_pipeline(diffusers.StableDiffusion3Pipeline.from_pretrained(src), steps=1, size=16)
        assert (run_pipeline(pipe, steps=1, size=16) == want_img).all()


def comfy_file(zoo, tmp: Path, variant: str = "sd35m", seed: int = 1) -> Path:
    """The tiny model as ComfyUI saves an all-in-one SD3 file: T5 with `shared.weight` only, `logit_scale`
    scalars beside the text encoders, no hubmix metadata (configs must come from shapes)."""
    from safetensors.torch import save_file

    sd = load_tensors(zoo.single(variant, seed))
    del sd["text_encoders.t5xxl.transformer.encoder.embed_tokens.weight"]
    for enc in ("clip_l", "clip_g", "t5xxl"):
        sd[f"text_encoders.{enc}.logit_scale"] = torch.tensor(4.6052)
    out = tmp / f"comfy-{variant}-{seed}.safetensors"
    save_file(sd, str(out), metadata={"format": "pt"})
    return out


def test_comfy_file_without_metadata(zoo, tmp_path):
    src = zoo.diffusers("sd35m")
    f = comfy_file(zoo, tmp_path)
    m = open_model(f)
    assert m.family.id == "sd3" and all(c.config_source == "inferred" for c in m.components.values())
    real = json.loads((src / "transformer" / "config.json").read_text())
    got = m.components["transformer"].config
    for k in ("patch_size", "in_channels", "num_layers", "joint_attention_dim", "caption_projection_dim",
              "pooled_projection_dim", "out_channels", "pos_embed_max_size", "qk_norm"):
        assert got[k] == real[k], k
    assert list(got["dual_attention_layers"]) == list(real["dual_attention_layers"])
    assert m.model_variant == "sd3.5-medium"
    assert open_model(zoo.single("sd3")).model_variant == "sd3-medium"
    assert open_model(zoo.diffusers("sd35l")).model_variant == "sd3.5-large"
    t5 = json.loads((src / "text_encoder_3" / "config.json").read_text())
    for k in ("d_model", "d_kv", "d_ff", "num_layers", "num_heads", "relative_attention_num_buckets", "vocab_size"):
        assert m.components["text_encoder_3"].config[k] == t5[k], k
    # the stated rule: scalars outside every component are reported as not used, never merged or written
    assert {f"text_encoders.{e}.logit_scale" for e in ("clip_l", "clip_g", "t5xxl")} <= set(m.unassigned)
    back = tmp_path / "back"
    convert(f, back, to="diffusers", config_from=str(src), quiet=True)
    for name in COMPONENTS:
        want, got_t = tensors(src, name), tensors(back, name)
        assert set(got_t) == set(want) and all(torch.equal(got_t[k], want[k]) for k in want), name


def test_mixed_layout_lossless_equals_the_all_diffusers_merge(zoo, tmp_path):
    a, b, c = (zoo.diffusers("sd35m", s) for s in (1, 2, 3))
    ref = tmp_path / "ref"
    hubmix.merge(Recipe(models=[str(a), str(b), str(c)], method="lossless"), out=ref, quiet=True)
    mixed = tmp_path / "mixed"
    hubmix.merge(Recipe(models=[str(zoo.single("sd35m", 1)), str(b), str(comfy_file(zoo, tmp_path, seed=3))],
                        method="lossless", config_from=str(a)), out=mixed, quiet=True)
    for name in COMPONENTS:
        want, got = tensors(ref, name), tensors(mixed, name)
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want), name
    # the merge is real: the transformer differs from every input
    assert not torch.equal(tensors(ref, "transformer")["proj_out.weight"], tensors(a, "transformer")["proj_out.weight"])
    # and the single-file output of the mixed merge holds the same tensors in the original layout
    single = tmp_path / "mixed.safetensors"
    hubmix.merge(Recipe(models=[str(zoo.single("sd35m", 1)), str(b), str(c)], method="lossless"), out=single,
                 quiet=True)
    back = tmp_path / "single-back"
    convert(single, back, to="diffusers", config_from=str(a), quiet=True)
    for name in COMPONENTS:
        want, got = tensors(ref, name), tensors(back, name)
        assert all(torch.equal(got[k], want[k]) for k in want), name


def test_per_block_parameters_hit_the_right_keys(zoo, tmp_path):
    a, b = zoo.diffusers("sd35m", 1), zoo.diffusers("sd35m", 2)
    out = tmp_path / "blocks"
    recipe = Recipe.from_dict({
        "models": [str(a), str(b)], "method": "weighted_sum", "params": {"alpha": 0.0},
        "components": {"transformer": {"blocks": {"IN": {"alpha": 1.0}, "J02": {"alpha": 1.0},
                                                  "OUT": {"alpha": 1.0}}}},
    })
    hubmix.merge(recipe, out=out, quiet=True)
    ta, tb, got = tensors(a, "transformer"), tensors(b, "transformer"), tensors(out, "transformer")
    from_b = {k for k in got if k.startswith(("transformer_blocks.2.", "pos_embed.", "time_text_embed.",
                                              "context_embedder.", "norm_out.", "proj_out."))}
    assert from_b and len(from_b) < len(got)
    for k in got:
        src = tb if k in from_b else ta
        assert torch.equal(got[k], src[k]), k
    assert not torch.equal(ta["transformer_blocks.2.attn.to_q.weight"], tb["transformer_blocks.2.attn.to_q.weight"])
    labels = {open_model(a).components["transformer"].keymap.block_label(k) for k in ta}
    assert labels == {"IN", "J00", "J01", "J02", "OUT"}


def test_unknown_block_is_refused(zoo, tmp_path, cli):
    from conftest import assert_one_line_error

    a, b = zoo.diffusers("sd35m", 1), zoo.diffusers("sd35m", 2)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"models": [str(a), str(b)], "method": "weighted_sum",
                                  "components": {"transformer": {"blocks": {"J07": {"alpha": 1.0}}}}}))
    code, _, err = cli("merge", "--recipe", recipe, "--out", tmp_path / "o", "-q")
    assert_one_line_error(code, err, "J07", "J02")


def test_single_file_metadata_and_recipe(zoo):
    meta = file_metadata(zoo.single("sd35m"))
    assert meta["modelspec.architecture"].startswith("stable-diffusion-v3")
    assert set(json.loads(meta["hubmix.configs"])) == set(COMPONENTS)


def transformer_only(zoo, tmp: Path, seed: int) -> Path:
    """An SD3 file with the transformer alone, under its usual prefix (as sd3.5_large.safetensors is published)."""
    from safetensors.torch import save_file

    sd = {k: v for k, v in load_tensors(zoo.single("sd35m", seed)).items() if k.startswith("model.diffusion_model.")}
    out = tmp / f"transformer-only-{seed}.safetensors"
    save_file(sd, str(out), metadata={"format": "pt"})
    return out


def test_transformer_only_files_merge_with_full_models(zoo, tmp_path):
    a, b, c = (zoo.diffusers("sd35m", s) for s in (1, 2, 3))
    m = open_model(transformer_only(zoo, tmp_path, 1))
    assert list(m.components) == ["transformer"]
    ref = tmp_path / "ref"
    hubmix.merge(Recipe(models=[str(a), str(b), str(c)], method="lossless"), out=ref, quiet=True)
    out = tmp_path / "partial"
    hubmix.merge(Recipe(models=[str(transformer_only(zoo, tmp_path, 1)), str(b), str(c)], method="lossless",
                        config_from=str(a)), out=out, quiet=True)
    want, got = tensors(ref, "transformer"), tensors(out, "transformer")
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    for name in COMPONENTS[1:]:  # not in model a: copied whole from the first input that has it (b)
        want, got = tensors(b, name), tensors(out, name)
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want), name
    # two transformer-only files: a transformer-only single file, prefix kept
    single = tmp_path / "t.safetensors"
    hubmix.merge(Recipe(models=[str(transformer_only(zoo, tmp_path, 1)), str(transformer_only(zoo, tmp_path, 2))],
                        method="weighted_sum"), out=single, quiet=True)
    keys = set(load_tensors(single))
    assert keys and all(k.startswith("model.diffusion_model.") for k in keys)


def test_dry_run_prints_sd3_block_labels(zoo, cli):
    a, b = zoo.diffusers("sd35m", 1), zoo.diffusers("sd35m", 2)
    code, out, err = cli("merge", a, b, "--method", "weighted_sum", "--dry")
    assert code == 0, err
    rows = [ln.split()[0] for ln in out.splitlines() if ln.split() and ln.split()[0] in ("IN", "J00", "J01", "J02",
                                                                                           "OUT")]
    assert rows[:5] == ["IN", "J00", "J01", "J02", "OUT"], out


FULL_SIZE = {  # the published transformer configs (shapes only: built on the meta device, no weights)
    "sd3": dict(num_layers=24, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=192),
    "sd35_medium": dict(num_layers=24, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=384,
                        dual_attention_layers=tuple(range(13)), qk_norm="rms_norm"),
    "sd35_large": dict(num_layers=38, num_attention_heads=38, caption_projection_dim=2432, pos_embed_max_size=192,
                       qk_norm="rms_norm"),
}


@pytest.mark.parametrize("model_type", sorted(FULL_SIZE))
def test_full_size_keys_are_what_diffusers_detects(model_type):
    """At full size (meta tensors): hubmix's original keys make diffusers' single-file detection name the right
    model, the shapes convert back to diffusers' own state dict, and hubmix infers the real config from them."""
    import diffusers
    from diffusers.loaders.single_file_utils import (convert_sd3_transformer_checkpoint_to_diffusers,
                                                     infer_diffusers_model_type)

    from hubmix.formats.configs import infer_mmdit
    from hubmix.formats.families import get_family
    from hubmix.formats.layouts import KeyMap, to_original_shape

    cfg = dict(sample_size=128, patch_size=2, in_channels=16, attention_head_dim=64, joint_attention_dim=4096,
               pooled_projection_dim=2048, out_channels=16, **FULL_SIZE[model_type])
    with torch.device("meta"):
        sd = diffusers.SD3Transformer2DModel(**cfg).state_dict()
    km = KeyMap(get_family("sd3").components["transformer"], cfg)
    original: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}
    for k, v in sd.items():
        place = km.to_original(k)
        assert place is not None, k
        if place.part is None:
            original[place.key] = torch.empty(to_original_shape(place.transform, tuple(v.shape)), device="meta")
        else:
            rows[place.key] = rows.get(place.key, 0) + v.shape[0]
            original[place.key] = torch.empty((rows[place.key], *v.shape[1:]), device="meta")
    assert infer_diffusers_model_type(original) == model_type
    back = convert_sd3_transformer_checkpoint_to_diffusers(dict(original))
    assert {k: tuple(v.shape) for k, v in back.items()} == {k: tuple(v.shape) for k, v in sd.items()}
    rel = {k.removeprefix("model.diffusion_model."): tuple(v.shape) for k, v in original.items()}
    got, _ = infer_mmdit(rel, get_family("sd3").defaults["transformer"], {})
    for k, v in cfg.items():
        assert (list(got[k]) if k == "dual_attention_layers" else got[k]) == (list(v) if isinstance(v, tuple) else v), k
    assert got.get("qk_norm") == cfg.get("qk_norm") and list(got["dual_attention_layers"]) == \
        list(cfg.get("dual_attention_layers", ()))


def test_component_labels_name_sd3_text_encoders(zoo, tmp_path):
    """CLIP_L, CLIP_G and T5 (the dry run's labels) name text_encoder, text_encoder_2 and text_encoder_3."""
    a, b = zoo.diffusers("sd35m", 1), zoo.diffusers("sd35m", 2)
    out = tmp_path / "labels"
    hubmix.merge(Recipe.from_dict({"models": [str(a), str(b)], "method": "weighted_sum", "params": {"alpha": 0.0},
                                   "components": {"T5": {"params": {"alpha": 1.0}},
                                                  "CLIP_G": {"params": {"alpha": 1.0}}}}), out=out, quiet=True)
    for name in COMPONENTS:
        src = b if name in ("text_encoder_2", "text_encoder_3") else a
        want, got = tensors(src, name), tensors(out, name)
        assert all(torch.equal(got[k], want[k]) for k in want), name
