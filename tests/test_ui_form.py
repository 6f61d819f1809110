"""The web UI's form without a browser: the recipe a form makes is the one `hubmix merge --save-recipe` writes for
the same choices, an uploaded recipe fills the form back, the sliders are the registry's parameters, and each model
line shows what `hubmix inspect` says."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import run_cli
from hubmix.errors import RecipeError
from hubmix.methods import methods
from hubmix.ui.form import build_recipe, component_names, describe_models, form_values, recipe_from_yaml, sliders


@pytest.mark.parametrize("method,params,cli", [
    ("weighted_sum", {"alpha": 0.3}, ["--alpha", "0.3"]),
    ("add_difference", {"alpha": 0.7}, ["--alpha", "0.7"]),
    ("lossless", {"alpha": 1.2, "beta": 0.9}, ["--alpha", "1.2", "--beta", "0.9"]),
])
def test_form_recipe_is_the_cli_recipe(zoo, tmp_path, method, params, cli):
    models = [zoo.diffusers("sd1", s) for s in (1, 2, 3)][: 2 if method == "weighted_sum" else 3]
    form = build_recipe("\n".join(map(str, models)) + "\n\n# a comment\n", method, params,
                        components=["unet", "vae"], dtype="fp16", block_alpha="GRAD_V" if method == "weighted_sum"
                        else None)
    extra = ["--block-alpha", "GRAD_V"] if method == "weighted_sum" else []
    code, _, err = run_cli("merge", *models, "--method", method, *cli, *extra, "--components", "unet,vae",
                           "--dtype", "fp16", "--dry", "-q", "--save-recipe", tmp_path / "r.yaml")
    assert code == 0, err
    cli_recipe = yaml.safe_load((tmp_path / "r.yaml").read_text())
    assert yaml.safe_load(form.to_yaml()) == cli_recipe
    back = form_values(recipe_from_yaml(form.to_yaml()))  # an uploaded recipe fills the form again
    assert sorted(back["components"]) == ["unet", "vae"] and back["dtype"] == "fp16" and back["method"] == method
    again = build_recipe(back["models"], back["method"], back["params"], components=back["components"],
                         dtype=back["dtype"], block_alpha=back["block_alpha"])
    assert again.to_yaml() == form.to_yaml()


def test_every_registry_parameter_has_a_slider_with_its_default_and_range():
    for m in methods().values():
        by_name = {s.name: s for s in sliders(m.name)}
        for p in m.params:
            s = by_name[p.name]
            assert m.name in s.methods and s.help.startswith(p.help) and s.default == p.default
            if not p.choices:
                assert s.minimum <= float(p.default) <= s.maximum
                if p.min is not None:
                    assert s.minimum == p.min
                if p.max is not None:
                    assert s.maximum == p.max
    assert set(component_names()) >= {"unet", "vae", "text_encoder"}


def test_form_errors_are_one_line():
    with pytest.raises(RecipeError, match="at least one reference"):
        build_recipe("  \n", "weighted_sum")
    with pytest.raises(RecipeError, match="alpha=3.0 is outside"):
        build_recipe("a\nb", "weighted_sum", {"alpha": 3})
    with pytest.raises(RecipeError, match="not valid YAML"):
        recipe_from_yaml("models: [a\n")


def test_each_model_line_shows_what_inspect_says(zoo, tmp_path):
    a, c = zoo.diffusers("sd1", 1), zoo.single("sdxl", 3)
    rows = describe_models(f"{a}\n{c}\n{tmp_path / 'nope.safetensors'}")
    for row, path in zip(rows, (a, c)):
        code, out, err = run_cli("inspect", path, "--json")
        info = json.loads(out)
        assert row == [str(path), f"{info['family_name']} ({info['family']})", info["layout"],
                       ", ".join(info["components"])]
    assert rows[2][0].endswith("nope.safetensors") and "no such file" in rows[2][1]


def test_ui_without_gradio_says_how_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` raises ImportError
    code, out, err = run_cli("ui", "--port", "1")
    assert code == 1 and err.strip() == ("error: the web UI needs Gradio: pip install 'hubmix[ui]' (or pip install "
                                         "'gradio>=5')")


def test_block_sliders_are_the_family_blocks_and_presets_fill_them():
    from hubmix.methods.presets import for_labels, presets
    from hubmix.ui.form import block_list_text, block_values, first_family

    sd1 = block_values("sd1", "GRAD_V")
    assert [label for label, _ in sd1][:2] == ["BASE", "IN00"] and len(sd1) == 26
    assert [v for _, v in sd1] == list(presets()["GRAD_V"])
    xl = block_values("sdxl", "GRAD_V")
    assert len(xl) == 20 and tuple(v for _, v in xl) == for_labels(presets()["GRAD_V"], tuple(l for l, _ in xl))
    assert block_values("flux") == [] and block_values(None) == []
    r = build_recipe("a\nb", "weighted_sum", block_alpha=block_list_text([v for _, v in xl]))
    assert r.block_lists["alpha"] == [v for _, v in xl]  # exact: no rounding on the way
    assert first_family([["x", "error: no", "", ""], ["a", "Stable Diffusion XL (sdxl)", "diffusers", ""]]) == "sdxl"
