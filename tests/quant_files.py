"""Quantized files built the way their reference tools write them, and the reference dequantizations, independent
of hubmix: ComfyUI's scaled fp8 (legacy `scale_weight` + `scaled_fp8` marker, and the newer `weight_scale` with
`_quantization_metadata` or `.comfy_quant` tensors), bitsandbytes NF4/FP4 through bitsandbytes itself."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

PREFIX = "model.diffusion_model."


def _meta(src: Path) -> dict:
    with safe_open(str(src), "pt") as f:
        return f.metadata() or {}


def linear_weights(sd: dict, prefix: str = PREFIX) -> list[str]:
    """The keys a quantizer of the denoiser's Linear layers takes: 2-D float `.weight` tensors under `prefix`."""
    return sorted(k for k, v in sd.items() if k.startswith(prefix) and k.endswith(".weight") and v.ndim == 2
                  and v.is_floating_point())


def comfy_scaled_fp8(src: Path, out: Path, form: str = "legacy", fp8=torch.float8_e4m3fn, per_row: bool = False,
                     input_scale: float | None = None, prefix: str = PREFIX) -> Path:
    """`src` with the denoiser's Linear weights as ComfyUI scaled fp8: weight = fp8(w / scale), scale = amax/448
    (per row with `per_row`), those under `prefix` (a transformer-only file's are bare). form: legacy (scale_weight + scaled_fp8 marker), metadata (_quantization_metadata +
    weight_scale) or tensors (.comfy_quant uint8 JSON + weight_scale)."""
    sd = load_file(str(src))
    meta = dict(_meta(src))
    fmax = torch.finfo(fp8).max
    layers = {}
    for k in linear_weights(sd, prefix):
        w = sd[k].float()
        amax = w.abs().amax(dim=1, keepdim=True) if per_row else w.abs().amax()
        scale = (amax / fmax).clamp(min=1e-12).float()
        sd[k] = (w / scale).clamp(-fmax, fmax).to(fp8)
        layer = k[:-len(".weight")]
        sd[layer + (".scale_weight" if form == "legacy" else ".weight_scale")] = scale if per_row else scale.reshape(())
        if input_scale is not None:
            sd[layer + (".scale_input" if form == "legacy" else ".input_scale")] = torch.tensor(input_scale)
        conf = {"format": str(fp8).removeprefix("torch.")}
        layers[layer] = conf
        if form == "tensors":
            sd[layer + ".comfy_quant"] = torch.tensor(list(json.dumps(conf).encode()), dtype=torch.uint8)
    if form == "legacy":
        sd[prefix + "scaled_fp8"] = torch.empty(0, dtype=fp8)
    elif form == "metadata":
        meta["_quantization_metadata"] = json.dumps({"format_version": "1.0", "layers": layers})
    save_file(sd, str(out), metadata=meta)
    return out


def comfy_dequantize(path: Path) -> dict:
    """The file's tensors as ComfyUI computes its scaled fp8 layers (convert_old_quants, then weight x scale in
    float32), every other tensor as stored; markers, scales and layer configs dropped."""
    sd = load_file(str(path))
    meta = _meta(path)
    formats = {}
    if "_quantization_metadata" in meta:
        formats = {k: v["format"] for k, v in json.loads(meta["_quantization_metadata"])["layers"].items()}
    for k in [k for k in sd if k.endswith(".comfy_quant")]:
        formats[k[:-len(".comfy_quant")]] = json.loads(bytes(sd.pop(k).tolist()))["format"]
    for k in [k for k in sd if k.endswith(".scale_weight")]:  # legacy: renamed weight_scale, read as scaled fp8
        sd[k[:-len(".scale_weight")] + ".weight_scale"] = sd.pop(k)
        formats[k[:-len(".scale_weight")]] = "float8"
    out = {}
    for k, v in sd.items():
        if k.endswith(("scaled_fp8", ".weight_scale", ".input_scale", ".scale_input")):
            continue
        layer = k[:-len(".weight")]
        if k.endswith(".weight") and layer in formats:
            scale = sd.get(layer + ".weight_scale", torch.tensor(1.0)).float()
            v = v.float() * (scale if scale.numel() == 1 else scale.reshape(-1, 1))
        out[k] = v
    return out


def bnb_4bit(src: Path, out: Path, quant_type: str = "nf4", nested: bool = False, dtype=torch.bfloat16) -> Path:
    """`src` with the denoiser's Linear weights through bitsandbytes' quantize_4bit, saved as its packed state dict
    (what Forge's NF4 checkpoints and diffusers/transformers' serialization hold)."""
    import bitsandbytes.functional as F

    sd = load_file(str(src))
    for k in linear_weights(sd):
        q, state = F.quantize_4bit(sd[k].to(dtype), blocksize=64, compress_statistics=nested, quant_type=quant_type)
        sd[k] = q
        for name, v in state.as_dict(packed=True).items():
            sd[f"{k}.{name}"] = v
    save_file(sd, str(out), metadata=_meta(src))
    return out


def bnb_dequantize(path: Path) -> dict:
    """The file's tensors with every 4-bit layer through bitsandbytes' dequantize_4bit (as float32, in the logical
    shape), the rest as stored."""
    import bitsandbytes.functional as F
    from bitsandbytes.functional import QuantState

    sd = load_file(str(path))
    states = [k for k in sd if ".quant_state.bitsandbytes__" in k]
    out = dict(sd)
    for sk in states:
        w = sk.split(".quant_state.")[0]
        parts = {k[len(w) + 1:]: out.pop(k) for k in list(out) if k.startswith(w + ".")}
        state = QuantState.from_dict(parts, device=torch.device("cpu"))
        out[w] = F.dequantize_4bit(out[w], state).float().reshape(tuple(state.shape))
    return out


def save_float(sd: dict, out: Path, src: Path) -> Path:
    """A plain file of the given tensors (float32 where floating), with `src`'s metadata."""
    save_file({k: v.float() if v.is_floating_point() else v for k, v in sd.items()}, str(out), metadata=_meta(src))
    return out
