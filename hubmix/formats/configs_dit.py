"""Transformer configs of the single-stream and Flux-like DiT families (Z-Image, Lumina 2, Chroma), inferred from a
transformer-only file's shapes (original key names, prefix stripped). Counts and widths come from the shapes; the
head size from the q/k norm's width (exact); what shapes cannot tell (rotary axes, patch size) from the family's
defaults, listed in the notes. layouts.yaml names these functions (`infer:`)."""

from __future__ import annotations

from typing import Any

from hubmix.formats.configs import Shapes, _indices


def _axes(head_dim: int, default: list[int]) -> tuple[list[int], str]:
    """The family's rotary axes when they fit the head, else a split in the same proportions (a tiny model)."""
    if sum(default) == head_dim:
        return list(default), f"transformer rotary axes: family default {default}"
    first = head_dim * default[0] // sum(default)
    first -= first % 2
    rest = head_dim - first
    half = (rest // 2) - (rest // 2) % 2
    axes = [first, half, rest - half]
    return axes, f"transformer rotary axes: {axes} (the family default {default} does not fit head size {head_dim})"


def infer_z_image(s: Shapes, defaults: dict[str, Any], others: dict[str, Shapes]) -> tuple[dict[str, Any], list[str]]:
    patch = defaults.get("all_patch_size", [2])
    fpatch = defaults.get("all_f_patch_size", [1])
    dim, inputs = s["x_embedder.weight"]
    head = s["layers.0.attention.q_norm.weight"][0]
    heads = dim // head
    rows = s["layers.0.attention.qkv.weight"][0] // head
    axes, note = _axes(head, list(defaults.get("axes_dims", [32, 48, 48])))
    cfg = {
        "all_patch_size": list(patch), "all_f_patch_size": list(fpatch),
        "in_channels": inputs // (patch[0] * patch[0] * fpatch[0]),
        "dim": dim,
        "n_layers": len(_indices(s, r"layers\.(\d+)\.")),
        "n_refiner_layers": len(_indices(s, r"noise_refiner\.(\d+)\.")),
        "n_heads": heads,
        "n_kv_heads": (rows - heads) // 2,
        "qk_norm": True,
        "cap_feat_dim": s["cap_embedder.0.weight"][0],
        "axes_dims": axes,
        **{k: defaults[k] for k in ("axes_lens", "rope_theta", "t_scale", "norm_eps") if k in defaults},
    }
    return cfg, [note, f"transformer patch size: family default {patch[0]} (frames {fpatch[0]})"]


def infer_lumina2(s: Shapes, defaults: dict[str, Any], others: dict[str, Shapes]) -> tuple[dict[str, Any], list[str]]:
    patch = defaults.get("patch_size", 2)
    hidden, inputs = s["x_embedder.weight"]
    head = s["layers.0.attention.q_norm.weight"][0]
    heads = hidden // head
    kv = (s["layers.0.attention.qkv.weight"][0] // head - heads) // 2
    ffn = s["layers.0.feed_forward.w1.weight"][0]
    multiple = defaults.get("multiple_of", 256)
    notes = []
    if multiple * ((4 * hidden + multiple - 1) // multiple) == ffn:
        mult = None
    elif ffn >= 4 * hidden:  # rounded up to a multiple of itself
        multiple, mult = ffn, None
    else:
        multiple, mult = 1, (ffn + 0.5) / (4 * hidden)
    if multiple != defaults.get("multiple_of", 256):
        notes.append(f"transformer feed-forward width {ffn}: multiple_of={multiple}, ffn_dim_multiplier={mult}")
    axes, note = _axes(head, list(defaults.get("axes_dim_rope", [32, 32, 32])))
    out = s["final_layer.linear.weight"][0] // (patch * patch)
    cfg = {
        "sample_size": defaults.get("sample_size", 128), "patch_size": patch,
        "in_channels": inputs // (patch * patch),
        "out_channels": None if out == inputs // (patch * patch) else out,  # None: as in_channels (the configs')
        "hidden_size": hidden,
        "num_layers": len(_indices(s, r"layers\.(\d+)\.")),
        "num_refiner_layers": len(_indices(s, r"noise_refiner\.(\d+)\.")),
        "num_attention_heads": heads,
        "num_kv_heads": kv,
        "multiple_of": multiple,
        "ffn_dim_multiplier": mult,
        "cap_feat_dim": s["cap_embedder.0.weight"][0],
        "axes_dim_rope": axes,
        **{k: defaults[k] for k in ("axes_lens", "norm_eps", "scaling_factor") if k in defaults},
    }
    return cfg, [note, f"transformer patch size: family default {patch}", *notes]


def infer_chroma(s: Shapes, defaults: dict[str, Any], others: dict[str, Shapes]) -> tuple[dict[str, Any], list[str]]:
    inner, in_channels = s["img_in.weight"]
    head = s["double_blocks.0.img_attn.norm.query_norm.scale"][0]
    patch = defaults.get("patch_size", 1)
    axes, note = _axes(head, list(defaults.get("axes_dims_rope", [16, 56, 56])))
    hidden, channels = s["distilled_guidance_layer.in_proj.weight"]
    out = s["final_layer.linear.weight"][0] // (patch * patch)
    cfg = {
        "patch_size": patch,
        "in_channels": in_channels,
        "out_channels": None if out == in_channels else out,
        "num_layers": len(_indices(s, r"double_blocks\.(\d+)\.")),
        "num_single_layers": len(_indices(s, r"single_blocks\.(\d+)\.")),
        "attention_head_dim": head,
        "num_attention_heads": inner // head,
        "joint_attention_dim": s["txt_in.weight"][1],
        "axes_dims_rope": axes,
        "approximator_num_channels": channels,
        "approximator_hidden_dim": hidden,
        "approximator_layers": len(_indices(s, r"distilled_guidance_layer\.layers\.(\d+)\.")),
    }
    return cfg, [note]
