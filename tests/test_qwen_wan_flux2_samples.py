"""Samples of Qwen-Image, Wan and FLUX.2 Klein: `hubmix samples` pixel for pixel what a fresh diffusers pipeline
renders under the documented conventions; Wan's sample is its first frame, with the whole clip beside it as an
animated WebP."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

ARGS = ["--prompt", "a cat", "--seed", "3", "--steps", "2", "--size", "32x32", "-q"]
GUIDANCE = {"qwen_image": 4.0, "wan": 5.0, "wan22": 5.0, "flux2": 4.0}


def _fresh(folder, name: str):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    kw = dict(prompt="a cat", num_inference_steps=2, guidance_scale=GUIDANCE[name], width=32, height=32,
              generator=torch.Generator("cpu").manual_seed(3))
    if name.startswith("wan"):
        return [np.asarray(f) for f in pipe(output_type="pil", **kw).frames[0]]
    return [np.asarray(pipe(**kw).images[0])]


@pytest.mark.parametrize("name", ["qwen_image", "flux2", "wan22"])
def test_samples_equal_fresh_pipeline(zoo, cli, tmp_path, name):
    from PIL import Image

    folder = zoo.diffusers(name, 1)
    code, _, err = cli("samples", folder, *ARGS, "--out", tmp_path / "s")
    assert code == 0, err
    (image,) = json.loads((tmp_path / "s" / "samples.json").read_text())["images"]
    want = _fresh(folder, name)
    with Image.open(tmp_path / "s" / image["file"]) as im:
        got = np.asarray(im.convert("RGB"))
    assert got.std() > 0 and (got == want[0]).all()
    if name.startswith("wan"):  # the clip beside the frame: every frame, losslessly
        with Image.open(tmp_path / "s" / image["clip"]) as clip:
            assert clip.format == "WEBP" and clip.n_frames == len(want) > 1
            for i in range(clip.n_frames):
                clip.seek(i)
                assert (np.asarray(clip.convert("RGB")) == want[i]).all(), i
