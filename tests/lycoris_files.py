"""LyCORIS files (LoHa, LoKr, full diffs, DoRA) for the tiny test models, written from lycoris-lora's own modules
(random parameters) under kohya names, with the update each module's own `get_weight(shape)` computes: the oracle
the bake-in is checked against."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

# (kohya module name, diffusers component, canonical key, algorithm, options)
SPECS = [
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", "unet",
     "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight", "loha", {}),
    ("lora_unet_down_blocks_0_resnets_0_conv1", "unet", "down_blocks.0.resnets.0.conv1.weight", "loha",
     {"use_tucker": True}),
    ("lora_unet_down_blocks_0_resnets_0_conv2", "unet", "down_blocks.0.resnets.0.conv2.weight", "loha", {}),
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj", "unet",
     "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj.weight", "lokr", {"factor": 4}),
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k", "unet",
     "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k.weight", "lokr",
     {"factor": 4, "decompose_both": True, "lora_dim": 2}),
    ("lora_unet_down_blocks_0_resnets_1_conv1", "unet", "down_blocks.0.resnets.1.conv1.weight", "lokr",
     {"factor": 2, "use_tucker": True, "lora_dim": 4}),  # lokr_t2: the rank lycoris' own loader misreads
    ("lora_unet_down_blocks_0_resnets_1_conv2", "unet", "down_blocks.0.resnets.1.conv2.weight", "lokr",
     {"factor": 4, "lora_dim": 8}),  # both factors full: no alpha scaling
    ("lora_unet_down_blocks_0_attentions_0_proj_in", "unet", "down_blocks.0.attentions.0.proj_in.weight", "full",
     {}),
    ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", "text_encoder",
     "text_model.encoder.layers.0.self_attn.q_proj.weight", "loha", {}),
    ("lora_te_text_model_encoder_layers_0_mlp_fc1", "text_encoder", "text_model.encoder.layers.0.mlp.fc1.weight",
     "full", {}),
]
DORA_SPECS = [
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_q", "unet",
     "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q.weight", "loha", {"weight_decompose": True}),
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_v", "unet",
     "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v.weight", "lokr",
     {"factor": 4, "weight_decompose": True, "wd_on_out": False}),
    ("lora_unet_down_blocks_0_resnets_1_conv2", "unet", "down_blocks.0.resnets.1.conv2.weight", "loha",
     {"weight_decompose": True}),
]


def _layer(w: torch.Tensor, bias: torch.Tensor | None) -> torch.nn.Module:
    if w.dim() == 4:
        layer = torch.nn.Conv2d(w.shape[1], w.shape[0], w.shape[2:], padding=1, bias=bias is not None)
    else:
        layer = torch.nn.Linear(w.shape[1], w.shape[0], bias=bias is not None)
    with torch.no_grad():
        layer.weight.copy_(w)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


def write(path: Path, weights: dict[tuple[str, str], torch.Tensor], specs=SPECS, *, alpha: float = 3.0,
          seed: int = 0) -> dict[tuple[str, str], torch.Tensor]:
    """Write a LyCORIS file for `weights` ((component, canonical key) -> base tensor, biases too); returns the
    weights after baking at strength 1 as lycoris-lora computes them: W + get_weight(shape), DoRA's
    weight_decompose(W + get_weight(shape)), full: W + get_diff_weight()."""
    from lycoris.functional.general import weight_decompose
    from lycoris.modules.full import FullModule
    from lycoris.modules.loha import LohaModule
    from lycoris.modules.lokr import LokrModule

    torch.manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    want: dict[tuple[str, str], torch.Tensor] = {}
    for name, comp, key, algo, opts in specs:
        w = weights[(comp, key)]
        bias_key = key[: -len("weight")] + "bias"
        bias = weights.get((comp, bias_key))
        layer = _layer(w, bias)
        with torch.no_grad():
            if algo == "full":
                diff, diff_b = torch.randn_like(w) * 0.05, None if bias is None else torch.randn_like(bias) * 0.05
                m = FullModule.make_module_from_state_dict(name, layer, diff, diff_b)
                sd[f"{name}.diff"] = diff
                d_w, d_b = m.get_diff_weight(multiplier=1)
                want[(comp, key)] = w + d_w
                if diff_b is not None:
                    sd[f"{name}.diff_b"] = diff_b
                    want[(comp, bias_key)] = bias + d_b
                continue
            opts = dict(opts)
            dim = opts.pop("lora_dim", 4)
            cls = LohaModule if algo == "loha" else LokrModule
            m = cls(name, layer, 1.0, lora_dim=dim, alpha=alpha, **opts)
            for p in m.parameters():
                if p is not m.org_module[0].weight and p.dim() > 0 and p is not getattr(m, "dora_scale", None):
                    p.copy_(torch.randn_like(p) * 0.3)
            if m.wd:
                m.dora_scale.mul_(1 + 0.1 * torch.randn_like(m.dora_scale))
            upd = m.get_weight(tuple(w.shape))
            want[(comp, key)] = weight_decompose(w + upd, m.dora_scale, 1, m.wd_on_out) if m.wd else w + upd
            for k, v in m.custom_state_dict().items():
                sd[f"{name}.{k}"] = v.detach().clone().contiguous()
    save_file(sd, str(path))
    return want
