"""FLUX.1: every single file hubmix writes (all-in-one, transformer-only) checked tensor by tensor with diffusers'
own loader, exact round trips, mixed-layout merges against the all-diffusers merge, per-block parameters, dev vs
schnell."""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

import pytest
import torch
from conftest import component_tensors, load_tensors
from safetensors.torch import save_file

import hubmix
from hubmix import Recipe
from hubmix.flow.convert import convert
from hubmix.recipe import ComponentRecipe

COMPONENTS = ("transformer", "text_encoder", "text_encoder_2", "vae")
BARE = "double_blocks.0.img_attn.qkv.weight"


@pytest.fixture
def flux_loader(monkeypatch):
    """diffusers' Flux converter with its hard-coded inner_dim = 3072 read from img_in.weight instead (so it can
    load a tiny model); everything else is diffusers' own code."""
    import diffusers.loaders.single_file_model as sfm
    import diffusers.loaders.single_file_utils as sfu

    src = inspect.getsource(sfu.convert_flux_transformer_checkpoint_to_diffusers)
    assert "inner_dim = 3072" in src
    src = src.replace("inner_dim = 3072", "inner_dim = checkpoint['img_in.weight'].shape[0]")
    namespace = dict(vars(sfu))
    exec(src, namespace)  # noqa: S102 - diffusers' own source, one constant changed
    entry = dict(sfm.SINGLE_FILE_LOADABLE_CLASSES["FluxTransformer2DModel"])
    entry["checkpoint_mapping_fn"] = namespace["convert_flux_transformer_checkpoint_to_diffusers"]
    monkeypatch.setitem(sfm.SINGLE_FILE_LOADABLE_CLASSES, "FluxTransformer2DModel", entry)


def canon(comp: str, key: str) -> str:
    if comp == "text_encoder" and not key.startswith("text_model."):
        return "text_model." + key
    return key


def folder_tensors(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {c: {canon(c, k): v for k, v in component_tensors(folder, c).items()} for c in COMPONENTS
            if (folder / c).is_dir()}


def module_tensors(module, comp: str) -> dict[str, torch.Tensor]:
    return {canon(comp, k): v for k, v in module.state_dict().items()}


def assert_tensors_equal(want: dict[str, torch.Tensor], got: dict[str, torch.Tensor], where: str) -> None:
    missing = sorted(set(want) - set(got))
    assert not missing, f"{where}: missing {missing[:5]}"
    bad = [k for k in want if not torch.equal(want[k], got[k])]
    assert not bad, f"{where}: {len(bad)} tensors differ, e.g. {bad[:5]}"


def bare_transformer(single: Path, out: Path) -> Path:
    """BFL's transformer-only file from an all-in-one: the model.diffusion_model.* keys without the prefix."""
    sd = load_tensors(single)
    save_file({k.removeprefix("model.diffusion_model."): v for k, v in sd.items()
               if k.startswith("model.diffusion_model.")}, str(out))
    return out


@pytest.mark.parametrize("name", ["flux", "flux-schnell"])
def test_all_in_one_loads_in_diffusers_equal_to_source(zoo, flux_loader, name):
    import diffusers

    src = zoo.diffusers(name, 1)
    single = zoo.single(name, 1)
    keys = load_tensors(single)
    # original naming, as ComfyUI saves it (a file with diffusers names would load without any conversion)
    assert "model.diffusion_model." + BARE in keys and "model.diffusion_model.single_blocks.0.linear1.weight" in keys
    assert ("model.diffusion_model.guidance_in.in_layer.weight" in keys) == (name == "flux")
    assert not any(k.startswith("transformer.") or ".to_q." in k for k in keys)
    prefixes = {re.match(r"(model\.diffusion_model\.|text_encoders\.clip_l\.transformer\.text_model\."
                         r"|text_encoders\.t5xxl\.transformer\.|vae\.)", k) is not None for k in keys}
    assert prefixes == {True}
    t5 = "text_encoders.t5xxl.transformer."
    assert torch.equal(keys[t5 + "shared.weight"], keys[t5 + "encoder.embed_tokens.weight"])
    pipe = diffusers.FluxPipeline.from_single_file(str(single), config=str(zoo.configs_only(src)),
                                                   local_files_only=True)
    for comp, want in folder_tensors(src).items():
        got = module_tensors(getattr(pipe, comp), comp)
        assert_tensors_equal(want, got, f"{name} {comp}")


def test_round_trip_diffusers_single_diffusers_is_exact(zoo, tmp_path):
    src = zoo.diffusers("flux", 1)
    back = tmp_path / "back"
    convert(zoo.single("flux", 1), back, to="diffusers", config_from=str(src), quiet=True)
    want, got = folder_tensors(src), folder_tensors(back)
    assert set(want) == set(got)
    for comp in want:
        assert set(want[comp]) == set(got[comp]), comp
        assert_tensors_equal(want[comp], got[comp], comp)
    for comp in ("transformer", "vae"):
        assert json.loads((back / comp / "config.json").read_text()) == json.loads(
            (src / comp / "config.json").read_text())
    index = json.loads((back / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline" and index["transformer"] == ["diffusers", "FluxTransformer2DModel"]
    # and the single file again, byte for byte in every tensor
    again = tmp_path / "again.safetensors"
    convert(back, again, to="single-file", quiet=True)
    a, b = load_tensors(zoo.single("flux", 1)), load_tensors(again)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_configs_inferred_from_shapes_load(zoo, tmp_path):
    """A single file without hubmix's embedded configs (as ComfyUI writes it): configs come from the shapes."""
    src = zoo.diffusers("flux", 1)
    sd = load_tensors(zoo.single("flux", 1))
    plain = tmp_path / "comfy.safetensors"
    save_file(sd, str(plain))  # no metadata
    from hubmix.formats.model import open_model

    m = open_model(plain)
    assert all(m.components[c].config_source == "inferred" for c in COMPONENTS)
    cfg = json.loads((src / "transformer" / "config.json").read_text())
    inferred = m.components["transformer"].config
    for k in ("num_layers", "num_single_layers", "attention_head_dim", "num_attention_heads", "in_channels",
              "joint_attention_dim", "pooled_projection_dim", "guidance_embeds", "patch_size"):
        assert inferred[k] == cfg[k], k
    vae = json.loads((src / "vae" / "config.json").read_text())
    assert m.components["vae"].config["latent_channels"] == vae["latent_channels"]
    assert m.components["vae"].config["use_quant_conv"] is False
    t5 = json.loads((src / "text_encoder_2" / "config.json").read_text())
    for k in ("d_model", "d_ff", "num_layers", "vocab_size", "relative_attention_num_buckets"):
        assert m.components["text_encoder_2"].config[k] == t5[k], k


def test_dev_and_schnell_told_apart(zoo):
    from hubmix.formats.model import open_model

    for name, want in (("flux", "dev"), ("flux-schnell", "schnell")):
        for path in (zoo.diffusers(name, 1), zoo.single(name, 1)):
            m = open_model(path)
            assert m.family.id == "flux"
            assert m.model_variant == want, path
    from hubmix.flow.inspection import inspect_model, render

    info = inspect_model(zoo.single("flux-schnell", 1))
    assert info["variant"] == "schnell" and "FLUX.1 (flux), schnell" in render(info)


def test_transformer_only_file_loads_and_merges(zoo, tmp_path, flux_loader):
    """BFL transformer-only files: read bare, merged with each other and with full models."""
    import diffusers

    src = zoo.diffusers("flux", 1)
    bare = [bare_transformer(zoo.single("flux", s), tmp_path / f"t{s}.safetensors") for s in (1, 2, 3)]
    from hubmix.formats.model import open_model

    m = open_model(bare[0])
    assert m.main_only and list(m.components) == ["transformer"]
    assert_tensors_equal(folder_tensors(src)["transformer"], {k: r.load() for k, r in
                                                              m.components["transformer"].tensors.items()}, "bare")
    # transformer-only inputs -> a transformer-only output (bare keys), equal to the all-diffusers merge
    out = tmp_path / "merged.safetensors"
    hubmix.merge(Recipe(models=[str(p) for p in bare], method="lossless", params={"alpha": 0.9, "beta": 1.1}),
                 out=out, quiet=True)
    keys = load_tensors(out)
    assert BARE in keys and not any(k.startswith(("model.", "vae.", "text_encoders.")) for k in keys)
    ref = tmp_path / "ref"
    hubmix.merge(Recipe(models=[str(zoo.diffusers("flux", s)) for s in (1, 2, 3)], method="lossless",
                        params={"alpha": 0.9, "beta": 1.1}), out=ref, quiet=True)
    want = folder_tensors(ref)
    model = diffusers.FluxTransformer2DModel.from_single_file(str(out), config=str(zoo.configs_only(src)),
                                                              subfolder="transformer", local_files_only=True)
    assert_tensors_equal(want["transformer"], module_tensors(model, "transformer"), "transformer-only merge")
    # with a full model first: the transformer merged, the rest copied from it
    mixed = tmp_path / "mixed"
    r = hubmix.merge(Recipe(models=[str(zoo.single("flux", 1)), str(bare[1]), str(bare[2])], method="lossless",
                            params={"alpha": 0.9, "beta": 1.1}, config_from=str(src)), out=mixed, quiet=True)
    got = folder_tensors(mixed)
    assert_tensors_equal(want["transformer"], got["transformer"], "mixed transformer")
    for comp in ("text_encoder", "text_encoder_2", "vae"):
        assert_tensors_equal(folder_tensors(src)[comp], got[comp], comp)
    assert any("copied from" in n for n in r.summary.events["note"])
    # transformer-only inputs to a diffusers folder: the rest from --config-from's weights, else a clear error
    with pytest.raises(hubmix.InputError, match="--config-from"):
        hubmix.merge(Recipe(models=[str(p) for p in bare[:2]], method="weighted_sum"), out=tmp_path / "x",
                     quiet=True)
    assert not (tmp_path / "x").exists()
    donor = tmp_path / "donor"
    hubmix.merge(Recipe(models=[str(p) for p in bare], method="lossless", params={"alpha": 0.9, "beta": 1.1},
                        config_from=str(src)), out=donor, quiet=True)
    got = folder_tensors(donor)
    assert_tensors_equal(want["transformer"], got["transformer"], "donor transformer")
    assert_tensors_equal(folder_tensors(src)["vae"], got["vae"], "donor vae")


def test_mixed_layout_merge_equals_all_diffusers(zoo, tmp_path):
    params = {"alpha": 0.9, "beta": 1.1}
    ref = tmp_path / "ref"
    hubmix.merge(Recipe(models=[str(zoo.diffusers("flux", s)) for s in (1, 2, 3)], method="lossless",
                        params=params), out=ref, quiet=True)
    mixed = tmp_path / "mixed"
    hubmix.merge(Recipe(models=[str(zoo.single("flux", 1)), str(zoo.diffusers("flux", 2)),
                                str(zoo.single("flux", 3))], method="lossless", params=params,
                        config_from=str(zoo.diffusers("flux", 1))), out=mixed, quiet=True)
    want, got = folder_tensors(ref), folder_tensors(mixed)
    for comp in COMPONENTS:
        assert_tensors_equal(want[comp], got[comp], comp)
    # and as a single file: the same tensors under the original names
    single = tmp_path / "mixed.safetensors"
    hubmix.merge(Recipe(models=[str(zoo.diffusers("flux", 1)), str(zoo.single("flux", 2)),
                                str(zoo.single("flux", 3))], method="lossless", params=params), out=single,
                 quiet=True)
    back = tmp_path / "back"
    convert(single, back, to="diffusers", config_from=str(zoo.diffusers("flux", 1)), quiet=True)
    got = folder_tensors(back)
    for comp in COMPONENTS:
        assert_tensors_equal(want[comp], got[comp], comp)


def test_per_block_parameters_hit_their_keys(zoo, tmp_path, cli):
    a, b = zoo.diffusers("flux", 1), zoo.diffusers("flux", 2)
    out = tmp_path / "out"
    blocks = {"IN": {"alpha": 1.0}, "D01": {"alpha": 1.0}, "S02": {"alpha": 1.0}, "OUT": {"alpha": 1.0}}

    hubmix.merge(Recipe(models=[str(a), str(b)], method="weighted_sum", params={"alpha": 0.0},
                        components={"transformer": ComponentRecipe(blocks=blocks)}), out=out, quiet=True)
    ta, tb, got = (component_tensors(p, "transformer") for p in (a, b, out))

    def block(key: str) -> str:
        if m := re.match(r"transformer_blocks\.(\d+)\.", key):
            return f"D{int(m.group(1)):02d}"
        if m := re.match(r"single_transformer_blocks\.(\d+)\.", key):
            return f"S{int(m.group(1)):02d}"
        return "OUT" if key.startswith(("norm_out.", "proj_out.")) else "IN"

    seen = set()
    for key, v in got.items():
        label = block(key)
        seen.add(label)
        want = tb[key] if label in blocks else ta[key]
        assert torch.equal(v, want), (key, label)
    assert seen == {"IN", "D00", "D01", "S00", "S01", "S02", "OUT"}
    # the dry run's table names the blocks and the text encoders
    code, outp, err = cli("merge", str(a), str(b), "--method", "lossless", "--dry")
    assert code == 0, err
    for label in ("IN", "D00", "D01", "S00", "S02", "OUT", "CLIP", "T5"):
        assert re.search(rf"\s{label}\s", outp), label
    assert outp.index(" IN ") < outp.index(" D00 ") < outp.index(" S00 ") < outp.index(" OUT ")
    # an unknown label names the valid ones
    with pytest.raises(hubmix.RecipeError, match="D00"):
        hubmix.merge(Recipe(models=[str(a), str(b)], method="weighted_sum",
                            components={"transformer": ComponentRecipe(blocks={"IN05": {"alpha": 1.0}})}),
                     out=tmp_path / "bad", quiet=True)


def test_keys_without_weights_follow_the_rule(zoo, tmp_path):
    """ComfyUI files carry CLIP-L's logit_scale and an identity text_projection: reported as not used, never
    merged, not written; the rest merges as usual."""
    sd = load_tensors(zoo.single("flux", 1))
    sd["text_encoders.clip_l.logit_scale"] = torch.tensor(4.6052)
    sd["text_encoders.clip_l.transformer.text_projection.weight"] = torch.eye(32)
    del sd["text_encoders.t5xxl.transformer.encoder.embed_tokens.weight"]  # ComfyUI writes shared.weight only
    comfy = tmp_path / "comfy.safetensors"
    save_file(sd, str(comfy))
    out = tmp_path / "out.safetensors"
    r = hubmix.merge(Recipe(models=[str(comfy), str(zoo.single("flux", 2))], method="weighted_sum",
                            params={"alpha": 0.0}), out=out, quiet=True)
    assert any("logit_scale" in x for x in r.summary.events["unassigned"])
    assert any("text_projection" in x for x in r.summary.events["dropped"])
    got = load_tensors(out)
    assert not any("logit_scale" in k or "text_projection" in k for k in got)
    t5 = "text_encoders.t5xxl.transformer."
    assert torch.equal(got[t5 + "encoder.embed_tokens.weight"], sd[t5 + "shared.weight"])
    for k, v in got.items():
        if k in sd and v.is_floating_point():
            assert torch.equal(v, sd[k]), k


def test_clip_and_t5_name_the_text_encoders_in_recipes(zoo, tmp_path):
    a, b = zoo.diffusers("flux", 1), zoo.diffusers("flux", 2)
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(f"models: [{a}, {b}]\nmethod: weighted_sum\nparams: {{alpha: 0.0}}\n"
                           "components:\n  CLIP: {from: b}\n  T5: {method: weighted_sum, params: {alpha: 1.0}}\n")
    out = tmp_path / "out"
    r = hubmix.merge(Recipe.load(recipe_file), out=out, quiet=True)
    assert r.canonical["components"]["text_encoder"] == {"from": "b"}
    assert r.canonical["components"]["text_encoder_2"]["params"]["alpha"] == 1.0
    got, ta, tb = folder_tensors(out), folder_tensors(a), folder_tensors(b)
    assert_tensors_equal(tb["text_encoder"], got["text_encoder"], "CLIP")
    assert_tensors_equal(tb["text_encoder_2"], got["text_encoder_2"], "T5")
    assert_tensors_equal(ta["transformer"], got["transformer"], "transformer")
    with pytest.raises(hubmix.RecipeError, match="T5"):
        hubmix.merge(Recipe(models=[str(zoo.diffusers("sd1", 1)), str(zoo.diffusers("sd1", 2))],
                            method="weighted_sum", components={"T5": ComponentRecipe(from_="a")}),
                     out=tmp_path / "sd1", quiet=True)
