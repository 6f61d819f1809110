"""Qwen-Image, Wan 2.1/2.2 and FLUX.2 (Klein): every transformer-only single file hubmix writes (bare and
ComfyUI-prefixed) read back by diffusers' own from_single_file, exact round trips, mixed-layout merges against
the all-diffusers merge and numpy, per-block parameters, Wan 2.2's two experts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import load_tensors
from famb_helpers import (COMFY, FAMILIES, assert_tensors_equal, bare, folder_tensors, load_single_transformer,
                          prefixed)

import hubmix
from hubmix import Recipe
from hubmix.flow.convert import convert
from hubmix.formats.model import open_model
from hubmix.recipe import ComponentRecipe

NAMES = list(FAMILIES)


@pytest.mark.parametrize("name", NAMES)
def test_single_files_load_in_diffusers_equal_to_source(zoo, tmp_path, name):
    fid, cls, marker, _ = FAMILIES[name]
    src = zoo.diffusers(name, 1)
    single = zoo.single(name, 1)
    keys = load_tensors(single)
    assert marker in keys and not any(k.startswith((COMFY, "vae.", "text_encoder")) for k in keys)  # bare, alone
    want = folder_tensors(src)["transformer"]
    configs = zoo.configs_only(src)
    got = load_single_transformer(cls, single, configs).state_dict()
    assert_tensors_equal(want, got, f"{name} bare")
    # ComfyUI's prefixed form: hubmix reads it, and a merge whose first input is prefixed writes it prefixed
    comfy = prefixed(single, tmp_path / "comfy.safetensors")
    m = open_model(comfy)
    assert m.family.id == fid and m.main_only and m.main_prefix == COMFY
    assert_tensors_equal(want, {k: r.load() for k, r in m.components["transformer"].tensors.items()}, "read")
    out = tmp_path / "out.safetensors"
    convert(comfy, out, to="single-file", quiet=True)
    written = load_tensors(out)
    assert all(k.startswith(COMFY) for k in written) and COMFY + marker in written
    assert_tensors_equal(want, load_single_transformer(cls, out, configs).state_dict(), f"{name} prefixed")
    # a file without hubmix's embedded configs (as the authors and ComfyUI publish them): configs from shapes
    foreign = bare(single, tmp_path / "foreign.safetensors")
    back = tmp_path / "back"
    convert(foreign, back, to="diffusers", config_from=str(src), quiet=True)
    assert_tensors_equal(want, folder_tensors(back)["transformer"], f"{name} inferred")
    cfg_want = json.loads((src / "transformer" / "config.json").read_text())
    inferred = open_model(foreign).components["transformer"].config
    for k in ("num_layers", "num_single_layers", "in_channels", "out_channels", "joint_attention_dim", "text_dim",
              "ffn_dim", "freq_dim", "guidance_embeds", "attention_head_dim", "mlp_ratio"):
        if cfg_want.get(k) is not None and k in inferred and not (name == "wan" and k == "attention_head_dim"):
            assert inferred[k] == cfg_want[k], (k, inferred[k], cfg_want[k])


@pytest.mark.parametrize("name", NAMES)
def test_round_trip_diffusers_single_diffusers_is_exact(zoo, tmp_path, name):
    src = zoo.diffusers(name, 1)
    back = tmp_path / "back"
    r = convert(zoo.single(name, 1), back, to="diffusers", config_from=str(src), quiet=True)
    want, got = folder_tensors(src), folder_tensors(back)
    for comp in want:  # the transformer from the file, text encoder and VAE from --config-from's weights
        assert_tensors_equal(want[comp], got[comp], comp)
    assert json.loads((back / "transformer" / "config.json").read_text()) == json.loads(
        (src / "transformer" / "config.json").read_text())
    idx, idx_src = (json.loads((p / "model_index.json").read_text()) for p in (back, src))
    assert idx["_class_name"] == idx_src["_class_name"] and idx["transformer"] == idx_src["transformer"]
    assert r.family.id == FAMILIES[name][0]
    again = tmp_path / "again.safetensors"
    r = convert(back, again, to="single-file", quiet=True)
    a, b = load_tensors(zoo.single(name, 1)), load_tensors(again)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert any("not in" in n and "single files" in n for n in r.summary.events["note"])  # TE and VAE left out


@pytest.mark.parametrize("name", NAMES)
def test_mixed_layout_merge_equals_all_diffusers_and_numpy(zoo, tmp_path, name):
    params = {"alpha": 0.3}
    folders = [zoo.diffusers(name, s) for s in (1, 2, 3)]
    ref = tmp_path / "ref"
    hubmix.merge(Recipe(models=[str(p) for p in folders], method="add_difference", params=params), out=ref,
                 quiet=True)
    comfy = prefixed(zoo.single(name, 2), tmp_path / "b.safetensors")
    mixed = tmp_path / "mixed"
    hubmix.merge(Recipe(models=[str(folders[0]), str(comfy), str(zoo.single(name, 3))], method="add_difference",
                        params=params), out=mixed, quiet=True)
    want, got = folder_tensors(ref), folder_tensors(mixed)
    assert_tensors_equal(want["transformer"], got["transformer"], "transformer")
    for comp in ("text_encoder", "vae"):  # the single files have none: model a's, copied
        assert_tensors_equal(folder_tensors(folders[0])[comp], got[comp], comp)
    a, b, c = (folder_tensors(p)["transformer"] for p in folders)
    for k, v in got["transformer"].items():  # add_difference: a + alpha (b - c), in float32 numpy
        expect = a[k].numpy() + np.float32(0.3) * (b[k].numpy() - c[k].numpy())
        np.testing.assert_allclose(v.numpy(), expect, rtol=0, atol=1e-6, err_msg=k)
    # all transformer-only inputs -> a transformer-only file equal to the same tensors
    single = tmp_path / "m.safetensors"
    hubmix.merge(Recipe(models=[str(zoo.single(name, s)) for s in (1, 2, 3)], method="add_difference",
                        params=params), out=single, quiet=True)
    back = tmp_path / "back"
    convert(single, back, to="diffusers", config_from=str(folders[0]), quiet=True)
    assert_tensors_equal(want["transformer"], folder_tensors(back)["transformer"], "single")


@pytest.mark.parametrize("name", NAMES)
def test_per_block_parameters_and_dry_run_labels(zoo, tmp_path, cli, name):
    _, _, _, labels = FAMILIES[name]
    a, b = zoo.diffusers(name, 1), zoo.diffusers(name, 2)
    chosen = {"IN", "OUT", sorted(x for x in labels if x[0] not in "IO")[-1]}
    out = tmp_path / "out"
    hubmix.merge(Recipe(models=[str(a), str(b)], method="weighted_sum", params={"alpha": 0.0},
                        components={"transformer": ComponentRecipe(blocks={x: {"alpha": 1.0} for x in chosen})}),
                 out=out, quiet=True)
    ta, tb, got = (folder_tensors(p)["transformer"] for p in (a, b, out))
    keymap = open_model(a).components["transformer"].keymap
    seen = set()
    for key, v in got.items():
        label = keymap.block_label(key)
        seen.add(label)
        assert torch.equal(v, tb[key] if label in chosen else ta[key]), (key, label)
    assert seen == labels
    code, outp, err = cli("merge", str(a), str(b), "--method", "weighted_sum", "--dry")
    assert code == 0, err
    order = [outp.index(f" {x} ") for x in sorted(labels, key=lambda x: (x != "IN", x == "OUT", x))]
    assert order == sorted(order)


def test_flux2_dev_and_klein_told_apart_and_not_flux1(zoo, tmp_path):
    m = open_model(zoo.single("flux2", 1))
    assert m.family.id == "flux2" and m.model_variant == "klein"
    assert open_model(zoo.diffusers("flux2", 1)).model_variant == "klein"
    import diffusers

    from hubmix.formats.tiny_flux2 import DEV

    torch.manual_seed(0)
    dev = diffusers.Flux2Transformer2DModel(**DEV)
    folder = tmp_path / "dev"
    dev.save_pretrained(str(folder))
    # a dev transformer as BFL names it (fused qkv, swapped final modulation) by hubmix's key map, read back by
    # diffusers' loader and by hubmix
    from hubmix.formats.families import get_family
    from hubmix.formats.layouts import KeyMap

    km = KeyMap(get_family("flux2").components["transformer"], dict(dev.config))
    sd = dev.state_dict()
    fused: dict[str, list[tuple[int, torch.Tensor]]] = {}
    orig = {}
    for k, v in sd.items():
        p = km.to_original(k)
        if p.part is not None:
            fused.setdefault(p.key, []).append((p.part[0], v))
        elif p.transform == "swap_halves":
            orig[p.key] = torch.cat([v[v.shape[0] // 2:], v[: v.shape[0] // 2]])
        else:
            orig[p.key] = v
    for k, parts in fused.items():
        orig[k] = torch.cat([v for _, v in sorted(parts, key=lambda x: x[0])])
    from safetensors.torch import save_file

    f = tmp_path / "dev.safetensors"
    save_file({k.removeprefix(COMFY): v.contiguous() for k, v in orig.items()}, str(f))
    loaded = diffusers.Flux2Transformer2DModel.from_single_file(str(f), config=str(folder), local_files_only=True)
    assert_tensors_equal(sd, loaded.state_dict(), "dev via diffusers")
    m = open_model(f)
    assert m.family.id == "flux2" and m.model_variant == "dev"
    assert_tensors_equal(sd, {k: r.load() for k, r in m.components["transformer"].tensors.items()}, "dev via hubmix")
    assert open_model(f).components["transformer"].config["guidance_embeds"] is True


def test_wan_i2v_keys_map_both_ways(tmp_path):
    """Wan I2V's image embedding and image key/value projections, checked by diffusers' loader."""
    import diffusers
    from safetensors.torch import save_file

    from hubmix.formats.families import get_family
    from hubmix.formats.layouts import KeyMap
    from hubmix.formats.tiny_wan import I2V

    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(**I2V)
    folder = tmp_path / "i2v"
    model.save_pretrained(str(folder))
    km = KeyMap(get_family("wan").components["transformer"], dict(model.config))
    sd = model.state_dict()
    orig = {km.to_original(k).key: v for k, v in sd.items()}
    assert any(".k_img." in k for k in orig) and any(k.startswith(COMFY + "img_emb.proj.") for k in orig)
    f = tmp_path / "i2v.safetensors"
    save_file(orig, str(f))  # ComfyUI-prefixed: diffusers' Wan converter strips the prefix itself
    loaded = diffusers.WanTransformer3DModel.from_single_file(str(f), config=str(folder), local_files_only=True)
    assert_tensors_equal(sd, loaded.state_dict(), "i2v via diffusers")
    m = open_model(f)
    assert m.main_prefix == COMFY
    assert_tensors_equal(sd, {k: r.load() for k, r in m.components["transformer"].tensors.items()}, "i2v via hubmix")
    cfg = m.components["transformer"].config
    assert (cfg["image_dim"], cfg["added_kv_proj_dim"], cfg["in_channels"]) == (24, 24, 36)


def test_wan22_experts_merge_with_their_own_parameters(zoo, tmp_path):
    folders = [zoo.diffusers("wan22", s) for s in (1, 2)]
    out = tmp_path / "out"
    hubmix.merge(Recipe(models=[str(p) for p in folders], method="weighted_sum", params={"alpha": 0.5},
                        components={"transformer": ComponentRecipe(params={"alpha": 0.25}),
                                    "transformer_2": ComponentRecipe(params={"alpha": 0.75})}), out=out, quiet=True)
    got = folder_tensors(out)
    a, b = folder_tensors(folders[0]), folder_tensors(folders[1])
    for comp, alpha in (("transformer", 0.25), ("transformer_2", 0.75), ("vae", 0.5)):
        for k, v in got[comp].items():
            expect = (np.float32(1 - alpha) * a[comp][k].numpy() + np.float32(alpha) * b[comp][k].numpy())
            np.testing.assert_allclose(v.numpy(), expect, rtol=0, atol=1e-6, err_msg=f"{comp}/{k}")
    assert json.loads((out / "model_index.json").read_text())["boundary_ratio"] == 0.875
    # a single-file output of both experts: two files named from --out, each a transformer-only file
    single = tmp_path / "wan22.safetensors"
    r = hubmix.merge(Recipe(models=[str(p) for p in folders], method="weighted_sum", params={"alpha": 0.5},
                            components={"transformer": ComponentRecipe(params={"alpha": 0.25}),
                                        "transformer_2": ComponentRecipe(params={"alpha": 0.75})}),
                     out=single, quiet=True)
    high, low = tmp_path / "wan22_high_noise.safetensors", tmp_path / "wan22_low_noise.safetensors"
    assert not single.exists() and high.is_file() and low.is_file() and (tmp_path / "wan22.recipe.yaml").is_file()
    assert set(r.files) >= {high, low}
    configs = zoo.configs_only(folders[0])
    for path, comp in ((high, "transformer"), (low, "transformer_2")):
        loaded = load_single_transformer("WanTransformer3DModel", path, configs, subfolder=comp).state_dict()
        assert_tensors_equal(got[comp], loaded, path.name)
    assert any("wan22_high_noise.safetensors, wan22_low_noise.safetensors" in n for n in r.summary.events["note"])
    # the split result is one result: its recipe, its files to push, its card's usage
    from hubmix.hub.card import write_card
    from hubmix.flow.result import load_result, result_files

    assert load_result(single).canonical["components"]["transformer_2"]["params"]["alpha"] == 0.75
    assert set(result_files(single)) == {high.name, low.name, "wan22.recipe.yaml"}
    text = write_card(single).text
    assert "transformer_2 = WanTransformer3DModel.from_single_file(\"./wan22_low_noise.safetensors\")" in text
    # the same with a diffusers folder: both files beside it, inside the folder
    both = tmp_path / "both"
    hubmix.merge(Recipe(models=[str(p) for p in folders], method="weighted_sum", params={"alpha": 0.5},
                        layout="both"), out=both, quiet=True)
    for suffix, comp in (("_high_noise", "transformer"), ("_low_noise", "transformer_2")):
        loaded = load_single_transformer("WanTransformer3DModel", both / f"both{suffix}.safetensors", configs,
                                         subfolder=comp).state_dict()
        assert_tensors_equal(folder_tensors(both)[comp], loaded, suffix)
    # each expert file merges on its own as a transformer-only file
    m = open_model(low)
    assert m.main_only and list(m.components) == ["transformer"]
    merged = tmp_path / "low.safetensors"
    hubmix.merge(Recipe(models=[str(low), str(high)], method="weighted_sum", params={"alpha": 0.0}), out=merged,
                 quiet=True)
    assert_tensors_equal(load_tensors(low), {k: v for k, v in load_tensors(merged).items()}, "low expert alone")
    # a Wan 2.1 folder (one transformer) and a Wan 2.2 folder: the second expert comes from the model that has it
    mix = tmp_path / "mix"
    hubmix.merge(Recipe(models=[str(folders[0]), str(zoo.diffusers("wan", 2))], method="weighted_sum",
                        params={"alpha": 0.5}), out=mix, quiet=True)
    assert_tensors_equal(a["transformer_2"], folder_tensors(mix)["transformer_2"], "second expert copied")


def test_edit_pipeline_class_is_kept(zoo, tmp_path):
    """Qwen-Image-Edit shares the transformer: a merged Edit model stays an Edit pipeline (any other class name in
    a model_index.json becomes the family's pipeline)."""
    import shutil

    edit = tmp_path / "edit"
    shutil.copytree(zoo.diffusers("qwen_image", 1), edit)
    index = json.loads((edit / "model_index.json").read_text())
    (edit / "model_index.json").write_text(json.dumps({**index, "_class_name": "QwenImageEditPipeline"}))
    out = tmp_path / "out"
    hubmix.merge(Recipe(models=[str(edit), str(zoo.diffusers("qwen_image", 2))], method="weighted_sum"), out=out,
                 quiet=True)
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "QwenImageEditPipeline"
    (edit / "model_index.json").write_text(json.dumps({**index, "_class_name": "SomethingElsePipeline"}))
    hubmix.merge(Recipe(models=[str(edit), str(zoo.diffusers("qwen_image", 2))], method="weighted_sum"),
                 out=tmp_path / "other", quiet=True)
    assert json.loads((tmp_path / "other" / "model_index.json").read_text())["_class_name"] == "QwenImagePipeline"


def test_text_encoder_labels_name_components_in_recipes(zoo, tmp_path):
    a, b = zoo.diffusers("wan", 1), zoo.diffusers("wan", 2)
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(f"models: [{a}, {b}]\nmethod: weighted_sum\nparams: {{alpha: 0.0}}\n"
                           "components:\n  UMT5: {from: b}\n")
    out = tmp_path / "out"
    r = hubmix.merge(Recipe.load(recipe_file), out=out, quiet=True)
    assert r.canonical["components"]["text_encoder"] == {"from": "b"}
    got, ta, tb = folder_tensors(out), folder_tensors(a), folder_tensors(b)
    assert_tensors_equal(tb["text_encoder"], got["text_encoder"], "UMT5")
    assert_tensors_equal(ta["transformer"], got["transformer"], "transformer")
    with pytest.raises(hubmix.RecipeError, match="UMT5"):
        hubmix.merge(Recipe(models=[str(zoo.diffusers("flux2", 1)), str(zoo.diffusers("flux2", 2))],
                            method="weighted_sum", components={"UMT5": ComponentRecipe(from_="a")}),
                     out=tmp_path / "f", quiet=True)
