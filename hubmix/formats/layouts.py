"""The mapping engine: turns a family's layout data (families/layouts.yaml) plus a component's config into an exact
two-way map between diffusers keys (hubmix's canonical keys) and original single-file keys, with shape transforms.

Every canonical tensor is found in the original layout as a `Placement`: an original key, optionally one row-block
of a tensor fused along dim 0 (OpenCLIP's q/k/v `in_proj`; Flux's `linear1` = q, k, v and the MLP input, whose
rows split in proportion to declared widths), optionally a shape transform (`conv1x1`: the VAE's attention
projections stored as 1x1 convolutions; `transpose`: OpenCLIP's `text_projection`; `swap_halves`: Flux's final
adaLN modulation, stored shift-then-scale where diffusers has scale-then-shift). Row-blocks and reshapes are
contiguous byte ranges, so readers and writers never copy or buffer for them; the copying transforms (transpose,
swap_halves) only touch small tensors, which are processed whole.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from hubmix.formats.families import ComponentSpec, layouts

if TYPE_CHECKING:
    import torch

    from hubmix.formats.io.span import Span


@dataclass(frozen=True)
class Placement:
    key: str  # full original key, component prefix included
    transform: str | None = None  # None, "conv1x1", "transpose" or "swap_halves"
    part: tuple[int, tuple[int, ...]] | None = None  # (index, relative widths) of row-blocks of a fused tensor


COPYING = frozenset({"transpose", "swap_halves"})  # transforms that move bytes: whole tensors only, never chunks


def part_rows(part: tuple[int, tuple[int, ...]], rows: int) -> tuple[int, int] | None:
    """(first row, row count) of part `index` in a fused tensor of `rows` rows, or None if they do not divide."""
    index, widths = part
    unit, rest = divmod(rows, sum(widths))
    if rest:
        return None
    return unit * sum(widths[:index]), unit * widths[index]


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    half = t.shape[0] // 2
    import torch

    return torch.cat([t[half:], t[:half]])


def to_canonical_shape(transform: str | None, shape: tuple[int, ...]) -> tuple[int, ...]:
    if transform == "conv1x1":
        return shape[:2] if len(shape) == 4 else shape
    if transform == "transpose":
        return tuple(reversed(shape))
    return shape


def to_original_shape(transform: str | None, shape: tuple[int, ...]) -> tuple[int, ...]:
    if transform == "conv1x1":
        return (*shape, 1, 1) if len(shape) == 2 else shape
    if transform == "transpose":
        return tuple(reversed(shape))
    return shape


def apply_to_canonical(transform: str | None, t: torch.Tensor) -> torch.Tensor:
    if transform == "conv1x1":
        return t.reshape(t.shape[:2]) if t.dim() == 4 else t
    if transform == "transpose":
        return t.t()
    if transform == "swap_halves":
        return _swap_halves(t)
    return t


def apply_to_original(transform: str | None, t: torch.Tensor) -> torch.Tensor:
    if transform == "conv1x1":
        return t.reshape(*t.shape, 1, 1) if t.dim() == 2 else t
    if transform == "transpose":
        return t.t().contiguous()
    if transform == "swap_halves":
        return _swap_halves(t)
    return t


# ---- structure walkers: (diffusers prefix, original prefix, module kind) from a component config ----------------

Rule = tuple[str, str, str | None]


def _unet2d(cfg: dict[str, Any]) -> list[Rule]:
    down = list(cfg["down_block_types"])
    up = list(cfg["up_block_types"])
    lpb = cfg.get("layers_per_block", 2)
    lpb = list(lpb) if isinstance(lpb, (list, tuple)) else [lpb] * len(down)
    rules: list[Rule] = []
    i = 1  # input_blocks.0 is conv_in
    for b, kind in enumerate(down):
        attn = "Attn" in kind
        for layer in range(lpb[b]):
            rules.append((f"down_blocks.{b}.resnets.{layer}", f"input_blocks.{i}.0", "resnet"))
            if attn:
                rules.append((f"down_blocks.{b}.attentions.{layer}", f"input_blocks.{i}.1", "transformer"))
            i += 1
        if b < len(down) - 1:
            rules.append((f"down_blocks.{b}.downsamplers.0", f"input_blocks.{i}.0", "downsampler"))
            i += 1
    mid = cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid is not None:
        parts = ["resnets.0", "attentions.0", "resnets.1"] if "Attn" in mid else ["resnets.0", "resnets.1"]
        for j, name in enumerate(parts):
            rules.append((f"mid_block.{name}", f"middle_block.{j}", "transformer" if "attn" in name else "resnet"))
    i = 0
    for b, kind in enumerate(up):
        attn = "Attn" in kind
        n = list(reversed(lpb))[b] + 1
        for layer in range(n):
            rules.append((f"up_blocks.{b}.resnets.{layer}", f"output_blocks.{i}.0", "resnet"))
            if attn:
                rules.append((f"up_blocks.{b}.attentions.{layer}", f"output_blocks.{i}.1", "transformer"))
            if layer == n - 1 and b < len(up) - 1:
                rules.append((f"up_blocks.{b}.upsamplers.0", f"output_blocks.{i}.{2 if attn else 1}", "upsampler"))
            i += 1
    return rules


def _vae(cfg: dict[str, Any]) -> list[Rule]:
    n = len(cfg["block_out_channels"])
    lpb = cfg.get("layers_per_block", 2)
    rules: list[Rule] = []
    for i in range(n):
        for j in range(lpb):
            rules.append((f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}", "resnet"))
        if i < n - 1:
            rules.append((f"encoder.down_blocks.{i}.downsamplers.0", f"encoder.down.{i}.downsample", "sampler"))
    for side in ("encoder", "decoder"):
        rules.append((f"{side}.mid_block.resnets.0", f"{side}.mid.block_1", "resnet"))
        rules.append((f"{side}.mid_block.resnets.1", f"{side}.mid.block_2", "resnet"))
        if cfg.get("mid_block_add_attention", True):
            rules.append((f"{side}.mid_block.attentions.0", f"{side}.mid.attn_1", "attention"))
    for i in range(n):
        o = n - 1 - i  # the original numbers decoder blocks from the bottom up
        for j in range(lpb + 1):
            rules.append((f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{o}.block.{j}", "resnet"))
        if i < n - 1:
            rules.append((f"decoder.up_blocks.{i}.upsamplers.0", f"decoder.up.{o}.upsample", "sampler"))
    return rules


def _openclip(cfg: dict[str, Any]) -> list[Rule]:
    return [(f"text_model.encoder.layers.{i}", f"transformer.resblocks.{i}", "layer")
            for i in range(cfg["num_hidden_layers"])]


def _indexed(stacks: list[dict[str, Any]], cfg: dict[str, Any]) -> list[Rule]:
    """A transformer's stacks of numbered blocks, as data: [{diffusers: transformer_blocks, original: double_blocks,
    count: num_layers, kind: double}]: block i of each stack, `count` (a config field) blocks long; an optional
    `last` kind for the stack's last block (SD3's pre-only context stream)."""
    rules = []
    for s in stacks:
        n = int(cfg.get(s["count"], 0))
        rules += [(f"{s['diffusers']}.{i}", f"{s['original']}.{i}", s.get("last", s["kind"]) if i == n - 1
                   else s["kind"]) for i in range(n)]
    return rules


STRUCTURES: dict[str, Callable[[dict[str, Any]], list[Rule]]] = {
    "unet2d": _unet2d,
    "vae": _vae,
    "openclip": _openclip,
    "none": lambda cfg: [],
}


# ---- the map ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Leaf:
    name: str
    transform: str | None = None
    part: tuple[int, tuple[int, ...]] | None = None


def _leaf(value: str | dict[str, Any], config: dict[str, Any] | None = None) -> _Leaf:
    """A leaf spec: a name, or {name, transform} or {name, part, of}: `of` is a count of equal row-blocks (3 for
    q/k/v) or a list of relative widths ([1, 1, 1, 4]: q, k, v and an MLP four times as wide), each a number or a
    config field ([num_attention_heads, num_kv_heads, num_kv_heads]: grouped-query attention's fused q/k/v)."""
    if isinstance(value, str):
        return _Leaf(value)
    part = None
    if "part" in value:
        of = value["of"]
        widths = tuple(of) if isinstance(of, list) else (1,) * of
        part = (value["part"], tuple(int((config or {})[w]) if isinstance(w, str) else w for w in widths))
    return _Leaf(value["name"], value.get("transform"), part)


def _templated(name: str, config: dict[str, Any]) -> str:
    """A static rule's name with config values filled in (`all_x_embedder.{all_patch_size[0]}-{all_f_patch_size[0]}`:
    Z-Image's per-patch-size modules); plain names as they are."""
    return name.format(**config) if "{" in name else name


def _split(key: str, prefix: str) -> str | None:
    """The rest of `key` after `prefix` at a dot boundary ('' for an exact match), or None."""
    if key == prefix:
        return ""
    if not prefix:
        return key
    if key.startswith(prefix) and key[len(prefix)] == ".":
        return key[len(prefix) + 1:]
    return None


def _longest(key: str, prefixes: list[str]) -> tuple[str, str] | None:
    best = None
    for p in prefixes:
        rest = _split(key, p)
        if rest is not None and (best is None or len(p) > len(best[0])):
            best = (p, rest)
    return best


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


class KeyMap:
    """Canonical (diffusers) keys <-> original single-file keys for one component of one family and config."""

    def __init__(self, spec: ComponentSpec, config: dict[str, Any]):
        data = layouts()[spec.layout]
        self.spec = spec
        self.prefix = spec.prefix
        self.config = config
        # static rules may carry a leaf spec (exact-key transforms); structure rules name a module kind
        self._d2o: dict[str, tuple[str, str | None, _Leaf | None]] = {}
        for d, o in (data.get("static") or {}).items():
            leaf = _leaf(o, config)
            self._d2o[_templated(d, config)] = (leaf.name, None, leaf if leaf.transform or leaf.part else None)
        structure = data.get("structure", "none")
        walk = STRUCTURES[structure] if isinstance(structure, str) else lambda cfg: _indexed(structure, cfg)
        for d, o, kind in walk(config):
            self._d2o[d] = (o, kind, None)
        self._o2d: dict[str, list[tuple[str, str | None, _Leaf | None]]] = {}
        for d, (o, kind, leaf) in self._d2o.items():
            self._o2d.setdefault(o, []).append((d, kind, leaf))
        self._modules = {kind: {k: _leaf(v, config) for k, v in (m or {}).items()}
                         for kind, m in (data.get("modules") or {}).items()}
        self._modules_inv: dict[str, dict[str, list[tuple[str, _Leaf]]]] = {}
        for kind, m in self._modules.items():
            inv: dict[str, list[tuple[str, _Leaf]]] = {}
            for d_name, leaf in m.items():
                inv.setdefault(leaf.name, []).append((d_name, leaf))
            self._modules_inv[kind] = inv
        self._aliases = [(re.compile(a["match"]), a["replace"]) for a in data.get("aliases") or []]
        self.dropped: dict[str, str] = {**(data.get("dropped") or {}), **spec.dropped}
        self.generated: dict[str, str] = dict(data.get("generated") or {})
        self.copies: dict[str, str] = dict(data.get("copies") or {})  # original key -> canonical key it repeats
        self._blocks = [(re.compile(b["match"]), b["label"]) for b in data.get("blocks") or []]
        # the number of the last `output_blocks.N` of this config: the final `out.` layers go with it
        self._last_output = max((int(o.split(".")[1]) for o in self._o2d if o.startswith("output_blocks.")),
                                default=0)
        self.ema = data.get("ema")

    # diffusers side ------------------------------------------------------------------------------------------
    def normalize(self, key: str) -> str:
        """Older diffusers/transformers spellings of a diffusers-layout key -> the canonical spelling."""
        for pattern, repl in self._aliases:
            new, n = pattern.subn(repl, key, count=1)
            if n:
                return new
        return key

    def to_original(self, key: str) -> Placement | None:
        hit = _longest(key, list(self._d2o))
        if hit is None:
            return None
        d_prefix, rest = hit
        o_prefix, kind, leaf = self._d2o[d_prefix]
        if leaf is not None:  # an exact-key rule with a transform or a part
            return Placement(self.prefix + o_prefix, leaf.transform, leaf.part) if rest == "" else None
        if kind is None or not rest:
            return Placement(self.prefix + _join(o_prefix, rest))
        mod = self._modules.get(kind, {})
        sub = _longest(rest, list(mod))
        if sub is None:
            return Placement(self.prefix + _join(o_prefix, rest))
        m_name, tail = sub
        lf = mod[m_name]
        if lf.part is not None:
            return Placement(self.prefix + _join(o_prefix, lf.name), part=lf.part) if tail == "" else None
        transform = lf.transform if tail in ("weight", "") else None
        return Placement(self.prefix + _join(o_prefix, lf.name, tail), transform)

    # original side -------------------------------------------------------------------------------------------
    def from_original(self, key: str) -> list[tuple[str, Placement]] | None:
        """Canonical keys stored in original key `key` (several for a fused tensor), or None if it has none."""
        if not key.startswith(self.prefix):
            return None
        rel = key[len(self.prefix):]
        hit = _longest(rel, list(self._o2d))
        if hit is None:
            return None
        o_prefix, rest = hit
        rules = self._o2d[o_prefix]
        if rules[0][2] is not None:  # exact-key rules (several for a fused tensor)
            out = [(d, Placement(key, lf.transform, lf.part)) for d, _, lf in rules if lf is not None and rest == ""]
            return sorted(out, key=lambda kv: kv[1].part or (0, ())) or None
        d_prefix, kind, leaf = rules[0]
        if kind is None or not rest:
            return [(_join(d_prefix, rest), Placement(key))]
        inv = self._modules_inv.get(kind, {})
        sub = _longest(rest, list(inv))
        if sub is None:
            return [(_join(d_prefix, rest), Placement(key))]
        o_name, tail = sub
        out = []
        for d_name, lf in inv[o_name]:
            if lf.part is not None:
                if tail == "":
                    out.append((_join(d_prefix, d_name), Placement(key, part=lf.part)))
            else:
                transform = lf.transform if tail in ("weight", "") else None
                out.append((_join(d_prefix, d_name, tail), Placement(key, transform)))
        return sorted(out, key=lambda kv: kv[1].part or (0, ())) or None

    def dropped_reason(self, key: str) -> str | None:
        """Why an original key that maps to nothing is not kept, if the layout or family says so."""
        rel = key[len(self.prefix):] if key.startswith(self.prefix) else key
        hit = _longest(rel, list(self.dropped))
        return self.dropped[hit[0]] if hit else None

    def ema_key(self, key: str) -> str | None:
        """The EMA copy's key of original key `key` (`model_ema.` + the key without `model.` and dots)."""
        if not self.ema or not key.startswith(self.ema["strip"]):
            return None
        return self.ema["prefix"] + key[len(self.ema["strip"]):].replace(".", "")

    @property
    def has_blocks(self) -> bool:
        """Whether the layout labels this component's keys by block (a UNet, a transformer), not as a whole."""
        return bool(self._blocks)

    def block_label(self, key: str) -> str | None:
        """The block a canonical key belongs to, by the layout's rules (A1111's IN00..OUT11, M00, BASE; Flux's IN,
        D00.., S00.., OUT), else the component's own label (CLIP, T5), else None."""
        if not self._blocks:
            return self.spec.label
        place = self.to_original(key)
        rel = place.key[len(self.prefix):] if place else key
        for pattern, label in self._blocks:
            m = pattern.match(rel)
            if m:
                groups = (int(g) if g.isdigit() else g for g in m.groups())  # numbers, or key paths (generic)
                return label.format(*groups, last_output=self._last_output)
        return None


    def generated_tensor(self, key: str) -> Span:
        from hubmix.formats.io.span import Span, int64_range

        kind = self.generated[key]
        if kind == "positions":
            n = self.config["max_position_embeddings"]
            return Span.of_bytes(int64_range(n), "int64", (1, n))
        raise ValueError(f"unknown generated tensor kind {kind!r}")
