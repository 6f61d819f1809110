"""SDXL v-prediction (NoobAI-style): the `v_pred` / `ztsnr` marker keys and `modelspec.predict_key` metadata are
read, kept in single-file outputs and turned into the diffusers scheduler's settings; mixing is refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import file_metadata, assert_one_line_error, load_tensors

import hubmix
from hubmix.flow.convert import convert
from hubmix import Recipe
from hubmix.formats.model import open_model


def noob(zoo, tmp: Path, seed: int, *, keys=("v_pred", "ztsnr"), predict_key: str | None = "v") -> Path:
    """An SDXL single file as ComfyUI saves a v-prediction (zero terminal SNR) model: empty marker tensors and
    `modelspec.predict_key`; hubmix's own prediction metadata removed."""
    from safetensors.torch import save_file

    src = zoo.single("sdxl", seed)
    sd = load_tensors(src)
    for k in keys:
        sd[k] = torch.tensor([])
    meta = {k: v for k, v in file_metadata(src).items() if not k.startswith(("modelspec.pred", "hubmix.recipe"))}
    if predict_key:
        meta["modelspec.predict_key"] = predict_key
    out = tmp / f"noob-{seed}-{'-'.join(keys) or 'meta'}.safetensors"
    save_file(sd, str(out), metadata=meta)
    return out


def test_markers_are_read(zoo, tmp_path):
    m = open_model(noob(zoo, tmp_path, 1))
    assert (m.prediction.type, m.prediction.zero_snr) == ("v_prediction", True)
    assert "v_pred" not in m.unassigned and "ztsnr" not in m.unassigned
    m = open_model(noob(zoo, tmp_path, 1, keys=()))  # metadata alone
    assert (m.prediction.type, m.prediction.zero_snr) == ("v_prediction", None)
    plain = open_model(noob(zoo, tmp_path, 1, keys=(), predict_key=None))  # SDXL without markers: epsilon
    assert plain.prediction.type == "epsilon"


def test_markers_survive_a_single_file_merge(zoo, tmp_path):
    a, b = noob(zoo, tmp_path, 1), noob(zoo, tmp_path, 2)
    out = tmp_path / "merged.safetensors"
    hubmix.merge(Recipe(models=[str(a), str(b)], method="weighted_sum", params={"alpha": 0.5}), out=out, quiet=True)
    got = load_tensors(out)
    assert got["v_pred"].shape == (0,) and got["ztsnr"].shape == (0,)
    meta = file_metadata(out)
    assert meta["modelspec.predict_key"] == "v"
    key = "model.diffusion_model.out.2.weight"
    want = 0.5 * load_tensors(a)[key] + 0.5 * load_tensors(b)[key]
    assert torch.allclose(got[key], want, atol=1e-6)
    again = open_model(out)  # and hubmix reads its own output as it read the inputs
    assert (again.prediction.type, again.prediction.zero_snr) == ("v_prediction", True)


def test_metadata_only_input_gets_v_pred_but_no_ztsnr(zoo, tmp_path):
    a = noob(zoo, tmp_path, 1, keys=())
    out = tmp_path / "merged.safetensors"
    convert(a, out, to="single-file", quiet=True)
    got = load_tensors(out)
    assert "v_pred" in got and "ztsnr" not in got


def test_diffusers_scheduler_gets_v_prediction_and_zero_snr(zoo, tmp_path):
    import diffusers

    a, b = noob(zoo, tmp_path, 1), noob(zoo, tmp_path, 2)
    out = tmp_path / "merged"
    hubmix.merge(Recipe(models=[str(a), str(b)], method="weighted_sum", config_from=str(zoo.diffusers("sdxl", 1))),
                 out=out, quiet=True)
    sched = diffusers.EulerDiscreteScheduler.from_pretrained(out, subfolder="scheduler")
    assert sched.config.prediction_type == "v_prediction" and sched.config.rescale_betas_zero_snr is True
    # and back: the diffusers folder, converted to a single file, carries the markers again
    single = tmp_path / "back.safetensors"
    convert(out, single, to="single-file", quiet=True)
    assert {"v_pred", "ztsnr"} <= set(load_tensors(single))


def test_epsilon_output_has_no_markers(zoo, tmp_path):
    src = zoo.diffusers("sdxl", 1)
    out = tmp_path / "eps.safetensors"
    convert(src, out, to="single-file", quiet=True)
    assert not {"v_pred", "ztsnr"} & set(load_tensors(out))
    assert file_metadata(out)["modelspec.predict_key"] == "epsilon"


def test_diffusers_v_prediction_input(zoo, tmp_path):
    src = tmp_path / "vpred"
    shutil.copytree(zoo.diffusers("sdxl", 1), src)
    cfg_path = src / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(prediction_type="v_prediction")
    cfg_path.write_text(json.dumps(cfg))
    out = tmp_path / "v.safetensors"
    convert(src, out, to="single-file", quiet=True)
    got = load_tensors(out)
    assert "v_pred" in got and "ztsnr" not in got


def test_mixing_v_prediction_and_epsilon_is_an_error_unless_chosen(zoo, tmp_path, cli):
    v, eps = noob(zoo, tmp_path, 1), zoo.single("sdxl", 2)
    out = tmp_path / "mixed.safetensors"
    code, _, err = cli("merge", v, eps, "--method", "weighted_sum", "--out", out, "-q")
    assert_one_line_error(code, err, "prediction type", v.name, eps.name, "--prediction-type")
    assert not out.exists()
    code, _, err = cli("merge", v, eps, "--method", "weighted_sum", "--dry", "-q")
    assert_one_line_error(code, err, "prediction type")
    for chosen, has_markers in (("epsilon", False), ("v_prediction", True)):
        target = tmp_path / f"{chosen}.safetensors"
        code, _, err = cli("merge", v, eps, "--method", "weighted_sum", "--prediction-type", chosen, "--out", target,
                           "-q")
        assert code == 0, err
        got = load_tensors(target)
        assert ("v_pred" in got) is has_markers and ("ztsnr" in got) is has_markers  # zero SNR from the v input
        assert file_metadata(target)["modelspec.predict_key"] == ("v" if has_markers else "epsilon")


@pytest.mark.parametrize("order", ["v-first", "eps-first"])
def test_text_encoders_from_an_epsilon_model_are_fine(zoo, tmp_path, cli, order):
    """Only the inputs that feed the unet decide the prediction type."""
    v, eps = noob(zoo, tmp_path, 1), zoo.single("sdxl", 2)
    models = [v, eps] if order == "v-first" else [eps, v]
    out = tmp_path / "te.safetensors"
    code, _, err = cli("merge", *models, "--method", "weighted_sum", "--components", "text_encoder,text_encoder_2",
                       "--out", out, "-q")
    assert code == 0, err  # the unet is model a's, alone: nothing to disagree about
    assert ("v_pred" in load_tensors(out)) is (order == "v-first")
