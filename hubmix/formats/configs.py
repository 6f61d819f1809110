"""Component configs inferred from a single-file checkpoint's shapes.

The structure (block counts, layers per block, widths, which blocks have attention, projection kinds) is read off
the shapes exactly, so key maps built from it are exact. What shapes cannot tell (attention heads, norm groups,
activation, VAE scaling factor, prediction type) comes from the family's defaults and is listed in the notes, so a
user knows to supply a real config (`--config-from`) when it matters.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable

from hubmix.formats.families import Family

Shapes = dict[str, tuple[int, ...]]

# Inferred config fields that come from family defaults, not from shapes: a borrowed real config overrides these.
DEFAULT_DERIVED = {"attention_head_dim", "sample_size", "scaling_factor", "force_upcast", "num_attention_heads",
                   "hidden_act", "bos_token_id", "eos_token_id", "pad_token_id", "shift_factor", "axes_dims_rope",
                   "num_heads", "d_kv", "feed_forward_proj", "dense_act_fn", "is_gated_act", "projection_dim",
                   "axes_dims", "axes_dim_rope", "axes_lens", "rope_theta", "t_scale", "norm_eps",  # DiT families
                   "multiple_of", "ffn_dim_multiplier"}  # Lumina 2: shapes give the width, not how it was rounded


def _indices(shapes: Shapes, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in shapes if (m := rx.match(k))})


def _heads(channels: int, head_dim: int) -> int:
    return max(1, channels // head_dim)


def infer_unet(s: Shapes, defaults: dict[str, Any], others: dict[str, Shapes]) -> tuple[dict[str, Any], list[str]]:
    notes = []
    conv_in = s["input_blocks.0.0.weight"]
    blocks: list[dict[str, Any]] = []  # per down block: layers, attention, channels, transformer depth
    current: dict[str, Any] = {"layers": 0, "attn": False, "ch": conv_in[0], "depth": 1}
    for i in _indices(s, r"input_blocks\.(\d+)\.")[1:]:
        if f"input_blocks.{i}.0.op.weight" in s:
            blocks.append(current)
            current = {"layers": 0, "attn": False, "ch": current["ch"], "depth": 1}
            continue
        current["layers"] += 1
        current["ch"] = s[f"input_blocks.{i}.0.out_layers.3.weight"][0]
        depth = _indices(s, rf"input_blocks\.{i}\.1\.transformer_blocks\.(\d+)\.")
        if depth:
            current["attn"] = True
            current["depth"] = len(depth)
    blocks.append(current)
    layers = [b["layers"] for b in blocks]
    up_attn = []
    i = 0
    for b in reversed(blocks):
        n = b["layers"] + 1
        up_attn.append(any(f"output_blocks.{j}.1.norm.weight" in s for j in range(i, i + n)))
        i += n
    proj = next((v for k, v in s.items() if k.endswith(".proj_in.weight")), None)
    to_k = next((v for k, v in s.items() if k.endswith("attn2.to_k.weight")), None)
    channels = [b["ch"] for b in blocks]
    cfg: dict[str, Any] = {
        "in_channels": conv_in[1],
        "out_channels": s["out.2.weight"][0],
        "block_out_channels": channels,
        "layers_per_block": layers[0] if len(set(layers)) == 1 else layers,
        "down_block_types": ["CrossAttnDownBlock2D" if b["attn"] else "DownBlock2D" for b in blocks],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in up_attn],
        "mid_block_type": "UNetMidBlock2DCrossAttn" if "middle_block.1.norm.weight" in s else "UNetMidBlock2D",
        "cross_attention_dim": to_k[1] if to_k else channels[-1],
        "use_linear_projection": bool(proj is not None and len(proj) == 2),
        "sample_size": defaults.get("sample_size", 64),
    }
    depths = [b["depth"] for b in blocks]
    cfg["transformer_layers_per_block"] = depths if len(set(depths)) > 1 else depths[0]
    time_dim = s["time_embed.0.weight"][0]
    cfg["time_embedding_dim"] = None if time_dim == channels[0] * 4 else time_dim
    if "attention_head_dim" in defaults:
        cfg["attention_head_dim"] = defaults["attention_head_dim"]
        notes.append(f"unet attention heads: family default attention_head_dim={defaults['attention_head_dim']}")
    else:
        cfg["attention_head_dim"] = [_heads(c, defaults["head_dim"]) for c in channels]
        notes.append(f"unet attention heads: family default head size {defaults['head_dim']}")
    notes.append("unet norm groups: default 32")
    if "label_emb.0.0.weight" in s:
        in_dim = s["label_emb.0.0.weight"][1]
        time_dim = defaults.get("addition_time_embed_dim", 256)
        te2 = others.get("text_encoder_2", {})
        if "text_projection" in te2:  # in_dim = pooled text width + 6 micro-conditioning embeddings
            time_dim = (in_dim - te2["text_projection"][1]) // 6
        cfg.update(addition_embed_type="text_time", addition_time_embed_dim=time_dim,
                   projection_class_embeddings_input_dim=in_dim)
    return cfg, notes


def infer_vae(s: Shapes, defaults: dict[str, Any], others: dict[str, Shapes]) -> tuple[dict[str, Any], list[str]]:
    downs = _indices(s, r"encoder\.down\.(\d+)\.")
    layers = len(_indices(s, r"encoder\.down\.0\.block\.(\d+)\."))
    channels = [s[f"encoder.down.{i}.block.{layers - 1}.conv2.weight"][0] for i in downs]
    cfg = {
        "in_channels": s["encoder.conv_in.weight"][1],
        "out_channels": s["decoder.conv_out.weight"][0],
        "latent_channels": s["decoder.conv_in.weight"][1],
        "block_out_channels": channels,
        "layers_per_block": layers,
        "down_block_types": ["DownEncoderBlock2D"] * len(downs),
        "up_block_types": ["UpDecoderBlock2D"] * len(downs),
        "mid_block_add_attention": "encoder.mid.attn_1.q.weight" in s,
    }
    if "quant_conv.weight" not in s:  # Flux's VAE has neither quant conv
        cfg.update(use_quant_conv=False, use_post_quant_conv="post_quant_conv.weight" in s)
    cfg.update({k: v for k, v in defaults.items()
                if k in ("scaling_factor", "shift_factor", "sample_size", "force_upcast")})
    notes = [f"vae scaling_factor: family default {defaults.get('scaling_factor')}", "vae norm groups: default 32"]
    return cfg, notes


def _text_config(vocab: int, width: int, positions: int, layers: int, inner: int, defaults: dict[str, Any]):
    cfg = {
        "vocab_size": vocab,
        "hidden_size": width,
        "max_position_embeddings": positions,
        "num_hidden_layers": layers,
        "intermediate_size": inner,
        "num_attention_heads": _heads(width, defaults.get("head_dim", 64)),
        "hidden_act": defaults.get("hidden_act", "quick_gelu"),
    }
    cfg.update({k: defaults[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in defaults})
    return cfg


def infer_clip(s: Shapes, defaults: dict[str, Any], others: dict[str, Shapes]) -> tuple[dict[str, Any], list[str]]:
    vocab, width = s["text_model.embeddings.token_embedding.weight"]
    layers = len(_indices(s, r"text_model\.encoder\.layers\.(\d+)\."))
    inner = s["text_model.encoder.layers.0.mlp.fc1.weight"][0]
    positions = s["text_model.embeddings.position_embedding.weight"][0]
    cfg = _text_config(vocab, width, positions, layers, inner, defaults)
    return cfg, [f"text encoder heads and activation: family defaults ({cfg['num_attention_heads']}, "
                 f"{cfg['hidden_act']})"]


def infer_openclip(s: Shapes, defaults: dict[str, Any], others: dict[str, Shapes]) -> tuple[dict[str, Any], list[str]]:
    vocab, width = s["token_embedding.weight"]
    layers = len(_indices(s, r"transformer\.resblocks\.(\d+)\.")) - defaults.get("drop_last_layers", 0)
    inner = s["transformer.resblocks.0.mlp.c_fc.weight"][0]
    cfg = _text_config(vocab, width, s["positional_embedding"][0], layers, inner, defaults)
    if "text_projection" in s:
        cfg["projection_dim"] = s["text_projection"][1]
    notes = [f"text encoder heads and activation: family defaults ({cfg['num_attention_heads']}, {cfg['hidden_act']})"]
    if defaults.get("drop_last_layers"):
        notes.append(f"text encoder uses {layers} of the file's {layers + defaults['drop_last_layers']} layers "
                     "(the family conditions on the penultimate layer)")
    return cfg, notes


def infer_mmdit(s: Shapes, defaults: dict[str, Any], others: dict[str, Shapes]) -> tuple[dict[str, Any], list[str]]:
    """SD3's transformer: everything from shapes but the head split (family default head size, 64 in every SD3)."""
    inner, in_ch, patch, _ = s["x_embedder.proj.weight"]
    layers = _indices(s, r"joint_blocks\.(\d+)\.")
    positions = s["pos_embed"][1]
    cfg = {
        "sample_size": defaults.get("sample_size", 128),
        "patch_size": patch,
        "in_channels": in_ch,
        "num_layers": len(layers),
        "attention_head_dim": defaults.get("head_dim", 64),
        "num_attention_heads": _heads(inner, defaults.get("head_dim", 64)),
        "joint_attention_dim": s["context_embedder.weight"][1],
        "caption_projection_dim": s["context_embedder.weight"][0],
        "pooled_projection_dim": s["y_embedder.mlp.0.weight"][1],
        "out_channels": s["final_layer.linear.weight"][0] // (patch * patch),
        "pos_embed_max_size": round(positions ** 0.5),
        "dual_attention_layers": _indices(s, r"joint_blocks\.(\d+)\.x_block\.attn2\."),
        "qk_norm": "rms_norm" if any(".ln_q." in k for k in s) else None,
    }
    return cfg, [f"transformer attention heads: family default head size {cfg['attention_head_dim']}"]


def infer_clip_projection(s: Shapes, defaults: dict[str, Any], others: dict[str, Shapes]
                          ) -> tuple[dict[str, Any], list[str]]:
    """CLIPTextModelWithProjection in transformers names (SD3's CLIP-L and CLIP-G)."""
    cfg, notes = infer_clip(s, defaults, others)
    if "text_projection.weight" in s:
        cfg["projection_dim"] = s["text_projection.weight"][0]
    return cfg, notes


def infer_flux(s: Shapes, defaults: dict[str, Any], others: dict[str, Shapes]) -> tuple[dict[str, Any], list[str]]:
    inner, in_channels = s["img_in.weight"]
    head_dim = s["double_blocks.0.img_attn.norm.query_norm.scale"][0]
    patch = defaults.get("patch_size", 1)
    axes = list(defaults.get("axes_dims_rope", [16, 56, 56]))
    notes = [f"transformer rotary axes: family default {axes}"]
    if sum(axes) != head_dim:  # not a full-size model: split the head like the original (1:3.5:3.5)
        first = head_dim // 8
        axes = [first, (head_dim - first) // 2, head_dim - first - (head_dim - first) // 2]
        notes = [f"transformer rotary axes: {axes} (the family default does not fit head size {head_dim})"]
    cfg = {
        "patch_size": patch,
        "in_channels": in_channels,
        "out_channels": s["final_layer.linear.weight"][0] // (patch * patch),
        "num_layers": len(_indices(s, r"double_blocks\.(\d+)\.")),
        "num_single_layers": len(_indices(s, r"single_blocks\.(\d+)\.")),
        "attention_head_dim": head_dim,
        "num_attention_heads": inner // head_dim,
        "joint_attention_dim": s["txt_in.weight"][1],
        "pooled_projection_dim": s["vector_in.in_layer.weight"][1],
        "guidance_embeds": "guidance_in.in_layer.weight" in s,
        "axes_dims_rope": axes,
    }
    return cfg, notes


def infer_t5(s: Shapes, defaults: dict[str, Any], others: dict[str, Shapes]) -> tuple[dict[str, Any], list[str]]:
    vocab, d_model = s["shared.weight"]
    inner = s["encoder.block.0.layer.0.SelfAttention.q.weight"][0]
    buckets, heads = s["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]  # exact head count
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in s
    ff = s["encoder.block.0.layer.1.DenseReluDense." + ("wi_0" if gated else "wi") + ".weight"][0]
    cfg = {"vocab_size": vocab, "d_model": d_model, "d_kv": inner // heads, "d_ff": ff, "num_heads": heads,
           "num_layers": len(_indices(s, r"encoder\.block\.(\d+)\.")),
           "relative_attention_num_buckets": buckets,
           **{k: v for k, v in defaults.items() if k != "num_heads"}}
    if not gated:
        cfg.update(feed_forward_proj="relu", dense_act_fn="relu", is_gated_act=False)
    return cfg, [f"T5 activation: family default ({cfg['feed_forward_proj']}; heads from the position bias)"]


def _rope_axes(head_dim: int, default: list[int], parts: int) -> tuple[list[int], list[str]]:
    """Rotary axes: the family default where it fits the head size, else the head split in `parts` even axes."""
    if sum(default) == head_dim:
        return list(default), [f"transformer rotary axes: family default {list(default)}"]
    unit = head_dim // (2 * parts) * 2
    axes = [unit] * (parts - 1) + [head_dim - unit * (parts - 1)]
    return axes, [f"transformer rotary axes: {axes} (the family default does not fit head size {head_dim})"]


def infer_qwen_image(s: Shapes, defaults: dict[str, Any], others: dict[str, Shapes]
                     ) -> tuple[dict[str, Any], list[str]]:
    """Qwen-Image's transformer (diffusers names): all from shapes but the patch size and rotary axes."""
    inner, in_channels = s["img_in.weight"]
    head_dim = s["transformer_blocks.0.attn.norm_q.weight"][0]
    patch = defaults.get("patch_size", 2)
    axes, notes = _rope_axes(head_dim, defaults.get("axes_dims_rope", [16, 56, 56]), 3)
    cfg = {
        "patch_size": patch,
        "in_channels": in_channels,
        "out_channels": s["proj_out.weight"][0] // (patch * patch),
        "num_layers": len(_indices(s, r"transformer_blocks\.(\d+)\.")),
        "attention_head_dim": head_dim,
        "num_attention_heads": inner // head_dim,
        "joint_attention_dim": s["txt_in.weight"][1],
        "guidance_embeds": False,
        "axes_dims_rope": axes,
    }
    if "time_text_embed.addition_t_embedding.weight" in s:  # Qwen-Image-Layered's extra condition embedding
        cfg["use_additional_t_cond"] = True
    return cfg, notes + ["transformer zero_cond_t (Qwen-Image-Edit-2511): not in the shapes, family default off"]


def infer_wan(s: Shapes, defaults: dict[str, Any], others: dict[str, Shapes]) -> tuple[dict[str, Any], list[str]]:
    """Wan's transformer (original names): all from shapes but the head split (family default head size 128)."""
    inner, in_channels, *patch = s["patch_embedding.weight"]
    head_dim = defaults.get("head_dim", 128)
    if inner % head_dim:
        head_dim = inner
    cfg = {
        "patch_size": list(patch),
        "num_attention_heads": inner // head_dim,
        "attention_head_dim": head_dim,
        "in_channels": in_channels,
        "out_channels": s["head.head.weight"][0] // math.prod(patch),
        "text_dim": s["text_embedding.0.weight"][1],
        "freq_dim": s["time_embedding.0.weight"][1],
        "ffn_dim": s["blocks.0.ffn.0.weight"][0],
        "num_layers": len(_indices(s, r"blocks\.(\d+)\.")),
        "cross_attn_norm": "blocks.0.norm3.weight" in s,
        "qk_norm": "rms_norm_across_heads" if "blocks.0.self_attn.norm_q.weight" in s else None,
        "eps": 1e-6,
        "image_dim": s["img_emb.proj.0.weight"][0] if "img_emb.proj.0.weight" in s else None,
        "added_kv_proj_dim": s["blocks.0.cross_attn.k_img.weight"][1] if "blocks.0.cross_attn.k_img.weight" in s
        else None,
        "rope_max_seq_len": defaults.get("rope_max_seq_len", 1024),
        "pos_embed_seq_len": s["img_emb.emb_pos"][1] if "img_emb.emb_pos" in s else None,
    }
    return cfg, [f"transformer attention heads: {cfg['num_attention_heads']} of size {head_dim} (family default "
                 "head size; the shapes do not tell)"]


def infer_flux2(s: Shapes, defaults: dict[str, Any], others: dict[str, Shapes]) -> tuple[dict[str, Any], list[str]]:
    """FLUX.2's transformer (BFL names): all from shapes but the patch size and rotary axes."""
    inner, in_channels = s["img_in.weight"]
    head_dim = s["double_blocks.0.img_attn.norm.query_norm.scale"][0]
    patch = defaults.get("patch_size", 1)
    axes, notes = _rope_axes(head_dim, defaults.get("axes_dims_rope", [32, 32, 32, 32]), 4)
    mlp_in = s["double_blocks.0.img_mlp.0.weight"][0]  # gated: two halves of mlp_ratio * inner
    cfg = {
        "patch_size": patch,
        "in_channels": in_channels,
        "out_channels": s["final_layer.linear.weight"][0] // (patch * patch),
        "num_layers": len(_indices(s, r"double_blocks\.(\d+)\.")),
        "num_single_layers": len(_indices(s, r"single_blocks\.(\d+)\.")),
        "attention_head_dim": head_dim,
        "num_attention_heads": inner // head_dim,
        "joint_attention_dim": s["txt_in.weight"][1],
        "timestep_guidance_channels": s["time_in.in_layer.weight"][1],
        "mlp_ratio": mlp_in / 2 / inner,
        "axes_dims_rope": axes,
        "guidance_embeds": "guidance_in.in_layer.weight" in s,
    }
    return cfg, notes


INFER: dict[str, Callable[[Shapes, dict[str, Any], dict[str, Shapes]], tuple[dict[str, Any], list[str]]]] = {
    "ldm_unet": infer_unet,
    "ldm_vae": infer_vae,
    "clip": infer_clip,
    "openclip": infer_openclip,
    "flux_transformer": infer_flux,
    "t5": infer_t5,
    "mmdit": infer_mmdit,
    "clip_projection": infer_clip_projection,
    "qwen_image_transformer": infer_qwen_image,
    "wan_transformer": infer_wan,
    "flux2_transformer": infer_flux2,
}


def infer_component_configs(family: Family, shapes: dict[str, Shapes], where: str = "checkpoint"
                            ) -> tuple[dict[str, dict[str, Any]], dict[str, list[str]]]:
    """Configs, and what was assumed for each, for every component in `shapes` (component -> relative key -> shape)."""
    configs, notes = {}, {}
    for name, spec in family.components.items():
        if name not in shapes:
            continue
        try:
            cfg, n = _inferrer(spec.layout)(shapes[name], family.defaults.get(name, {}), shapes)
        except (KeyError, IndexError, StopIteration) as e:
            from hubmix.errors import FamilyError

            raise FamilyError(f"{where}: cannot infer the {name} config from its shapes (missing {e})") from None
        configs[name] = cfg
        notes[name] = n
    return configs, notes


def _inferrer(layout: str) -> Callable[[Shapes, dict[str, Any], dict[str, Shapes]], tuple[dict[str, Any], list[str]]]:
    """The config inference of a layout: INFER's, or the `infer: module:function` its layouts.yaml entry names
    (families added as data bring their own module: formats/configs_dit.py)."""
    if layout in INFER:
        return INFER[layout]
    import importlib

    from hubmix.formats.families import layouts

    module, fn = layouts()[layout]["infer"].split(":")
    return getattr(importlib.import_module(module), fn)
