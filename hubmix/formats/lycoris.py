"""The tensors of one LoRA-file module, by kind: which key suffix is which part, the alpha scaling each kind takes,
and the shape of the full weight update the parts make. Data and shape arithmetic only (no torch).

Kinds (the reading follows ComfyUI's comfy/weight_adapter, which agrees with LyCORIS' own modules' forward pass):
- lora: kohya `lora_up`/`lora_down` (LoCon on convs, with an optional CP middle `lora_mid`), PEFT `lora_B`/`lora_A`;
  scale alpha / rank, rank = down's first dimension.
- loha: `hada_w1_a/b`, `hada_w2_a/b` (with Tucker cores `hada_t1/t2` on convs); scale alpha / rank, rank =
  `hada_w1_b`'s first dimension.
- lokr: `lokr_w1` or `lokr_w1_a/b`, `lokr_w2` or `lokr_w2_a/b` (with `lokr_t2` on convs); scale alpha / rank with
  the rank of the decomposed factor (`lokr_w2_b`'s, else `lokr_w1_b`'s first dimension), 1 when both factors are full.
  (lycoris-lora's own file loader takes the rank from `lokr_w2_a`'s second dimension, the output size when a Tucker
  core is present; ComfyUI and this reader take `lokr_w2_b`'s first.)
- full: `diff` (the weight's delta) and `diff_b` (the bias's), no alpha.
Any of lora/loha/lokr may carry `dora_scale` (DoRA's magnitude, per output row or per input column by its shape).
"""

from __future__ import annotations

import math

# key suffix -> (kind or None for shared entries, part name)
SUFFIXES = {
    ".lora_up.weight": ("lora", "up"), ".lora_down.weight": ("lora", "down"), ".lora_mid.weight": ("lora", "mid"),
    ".lora_B.weight": ("lora", "up"), ".lora_A.weight": ("lora", "down"),
    ".hada_w1_a": ("loha", "w1a"), ".hada_w1_b": ("loha", "w1b"), ".hada_w2_a": ("loha", "w2a"),
    ".hada_w2_b": ("loha", "w2b"), ".hada_t1": ("loha", "t1"), ".hada_t2": ("loha", "t2"),
    ".lokr_w1": ("lokr", "w1"), ".lokr_w1_a": ("lokr", "w1a"), ".lokr_w1_b": ("lokr", "w1b"),
    ".lokr_w2": ("lokr", "w2"), ".lokr_w2_a": ("lokr", "w2a"), ".lokr_w2_b": ("lokr", "w2b"), ".lokr_t2": ("lokr", "t2"),
    ".diff": ("full", "diff"), ".diff_b": ("full", "diff_b"),
    ".alpha": (None, "alpha"), ".dora_scale": (None, "dora"),
}
# key fragments of formats hubmix does not bake, refused by name
REFUSED = {
    ".oft_blocks": "OFT", ".oft_diag": "OFT", ".oft_R": "BOFT", ".w_norm": "LyCORIS norm", ".b_norm": "LyCORIS norm",
    ".on_input": "(IA)^3", ".a1.weight": "GLoRA", ".lora_magnitude_vector": "PEFT DoRA (lora_magnitude_vector)",
}
REQUIRED = {"lora": [("up", "down")], "loha": [("w1a", "w1b", "w2a", "w2b")],
            "lokr": [("w1",), ("w1a", "w1b")], "full": [("diff",), ("diff_b",)]}
REQUIRED_2 = {"lokr": [("w2",), ("w2a", "w2b")]}


def split_key(key: str) -> tuple[str, str | None, str] | None:
    """(module name, kind, part) of a LoRA file key, or None when no suffix is known (longest suffix wins)."""
    for sfx in sorted(SUFFIXES, key=len, reverse=True):
        if key.endswith(sfx):
            kind, part = SUFFIXES[sfx]
            return key[: -len(sfx)], kind, part
    return None


def missing_parts(kind: str, parts: set[str]) -> str | None:
    """The part names a module of `kind` lacks, or None when it is complete."""
    for table in (REQUIRED, REQUIRED_2):
        options = table.get(kind)
        if options and not any(set(o) <= parts for o in options):
            return " or ".join("+".join(o) for o in options)
    if kind == "loha" and ("t1" in parts) != ("t2" in parts):
        return "t1+t2"
    return None


def rank_of(kind: str, shapes: dict[str, tuple[int, ...]]) -> int | None:
    """The rank alpha is divided by; None: the kind takes no alpha (full, LoKr with both factors full)."""
    if kind == "lora":
        return shapes["down"][0]
    if kind == "loha":
        return shapes["w1b"][0]
    if kind == "lokr":
        if "w2b" in shapes:
            return shapes["w2b"][0]
        return shapes["w1b"][0] if "w1b" in shapes else None
    return None


def update_shape(kind: str, shapes: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
    """The shape the module's update has before it is reshaped onto its weight: (out, in, *kernel) or (out, n)."""
    s = shapes
    if kind == "lora":
        inner = math.prod(s["down"][1:])
        if "mid" in s:
            return (s["up"][0], s["down"][1], *s["mid"][2:])
        return (s["up"][0], inner)
    if kind == "loha":
        if "t1" in s:
            return (s["w1a"][1], s["w1b"][1], *s["t1"][2:])
        return (s["w1a"][0], s["w1b"][1])
    if kind == "lokr":
        a, b = s["w1"][:2] if "w1" in s else (s["w1a"][0], s["w1b"][1])
        if "w2" in s:
            c, d, rest = s["w2"][0], s["w2"][1], tuple(s["w2"][2:])
        elif "t2" in s:
            c, d, rest = s["w2a"][1], s["w2b"][1], tuple(s["t2"][2:])
        else:
            c, d, rest = s["w2a"][0], s["w2b"][1], ()
        return (a * c, b * d, *rest)
    return tuple(s["diff"] if "diff" in s else s["diff_b"])


def fits(kind: str, shapes: dict[str, tuple[int, ...]], target: tuple[int, ...]) -> bool:
    """Whether the update can be reshaped onto a weight of shape `target` (same rows, same size)."""
    try:
        u = update_shape(kind, shapes)
    except (KeyError, IndexError, ValueError):
        return False
    if kind == "lora" and (len(shapes["up"]) < 2 or shapes["up"][1] != shapes["down"][0]
                           or any(x != 1 for x in shapes["up"][2:])):
        return False
    return math.prod(u) == math.prod(target) and (not target or u[0] == target[0])
