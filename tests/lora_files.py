"""LoRA files for the tiny test models, made from the models' own keys with small random up/down matrices: kohya
(diffusers or original single-file module names, LoCon on 3x3 convs) and diffusers/PEFT."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

UNET_TARGETS = re.compile(r"(attn[12]\.(to_q|to_k|to_v|to_out\.0)|proj_in|proj_out|ff\.net\.0\.proj|ff\.net\.2"
                          r"|resnets\.\d+\.(conv1|conv2|time_emb_proj))\.weight$")
UNET_TARGETS_ORIGINAL = re.compile(r"(attn[12]\.(to_q|to_k|to_v|to_out\.0)|proj_in|proj_out|ff\.net\.0\.proj"
                                   r"|ff\.net\.2|in_layers\.2|out_layers\.3|emb_layers\.1)\.weight$")
TE_TARGETS = re.compile(r"(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.fc1|mlp\.fc2)\.weight$")


def _weights(folder: Path, component: str) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted((folder / component).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _pair(w: torch.Tensor, rank: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) for weight w: linear [out, r] @ [r, in]; conv: up [out, r, 1, 1], down [r, in, kh, kw]."""
    out = w.shape[0]
    down_shape = (rank, *w.shape[1:])
    up_shape = (out, rank) + ((1, 1) if w.dim() == 4 else ())
    return torch.randn(up_shape, generator=gen) * 0.05, torch.randn(down_shape, generator=gen) * 0.05


def kohya(folder: Path, path: Path, family: str, *, rank: int = 4, alpha: float = 2.0, seed: int = 0,
          single: Path | None = None) -> Path:
    """A kohya file for the diffusers model `folder`: UNet modules by diffusers names, or by original names when
    the model's single file is given (as sd-scripts writes SDXL LoRAs); text encoders by transformers names."""
    gen = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}

    def add(name: str, w: torch.Tensor) -> None:
        up, down = _pair(w, rank, gen)
        sd[f"{name}.lora_up.weight"], sd[f"{name}.lora_down.weight"] = up, down
        sd[f"{name}.alpha"] = torch.tensor(alpha)

    if single is None:
        for k, w in sorted(_weights(folder, "unet").items()):
            if UNET_TARGETS.search(k):
                add("lora_unet_" + k[: -len(".weight")].replace(".", "_"), w)
    else:
        for k, w in sorted(load_file(str(single)).items()):
            if k.startswith("model.diffusion_model.") and UNET_TARGETS_ORIGINAL.search(k):
                add("lora_unet_" + k[len("model.diffusion_model."): -len(".weight")].replace(".", "_"), w)
    tes = {"text_encoder": "lora_te_"} if family != "sdxl" else {"text_encoder": "lora_te1_",
                                                                  "text_encoder_2": "lora_te2_"}
    for comp, prefix in tes.items():
        for k, w in sorted(_weights(folder, comp).items()):
            k = k if k.startswith("text_model.") else "text_model." + k
            if TE_TARGETS.search(k):
                add(prefix + k[: -len(".weight")].replace(".", "_"), w)
    save_file(sd, str(path))
    return path


def peft(folder: Path, path: Path, family: str, *, rank: int = 4, seed: int = 0) -> Path:
    """A diffusers/PEFT file (`unet.<module>.lora_A.weight`, `text_encoder.<module>.lora_B.weight`), alpha = rank."""
    gen = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    comps = ["unet", "text_encoder"] + (["text_encoder_2"] if family == "sdxl" else [])
    for comp in comps:
        pattern = UNET_TARGETS if comp == "unet" else TE_TARGETS
        for k, w in sorted(_weights(folder, comp).items()):
            if comp != "unet" and not k.startswith("text_model."):
                k = "text_model." + k
            if pattern.search(k):
                up, down = _pair(w, rank, gen)
                mod = f"{comp}.{k[: -len('.weight')]}"
                sd[f"{mod}.lora_B.weight"], sd[f"{mod}.lora_A.weight"] = up, down
    save_file(sd, str(path))
    return path
