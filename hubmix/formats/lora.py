"""LoRA files: recipe entries, format detection, and the map from a LoRA's module names to canonical keys.

Two families of files are read:
- kohya / A1111 (`lora_unet_*`, `lora_te_*`, SDXL's `lora_te1_*` / `lora_te2_*`, with `.lora_down.weight`,
  `.lora_up.weight` and optional `.alpha`; conv LoRA / LoCon included). A kohya module name is a module path
  (diffusers' or the original single-file one) with '.' written '_': the lookup is built from the model's own
  canonical keys and their original-layout placements, never from string rewrites of the LoRA's names.
- diffusers / PEFT (`<component>.<module>.lora_A.weight` / `.lora_B.weight`, alpha from `.alpha` keys or the
  file's `lora_adapter_metadata`, else alpha = rank).
- LyCORIS (kohya names): LoHa, LoKr, LoCon with a CP middle, full diffs, DoRA scales (formats.lycoris); OFT,
  (IA)^3, GLoRA, norms and PEFT DoRA are refused by name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hubmix.errors import InputError, RecipeError, recipe_number

KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_transformer_": "transformer", "lora_te_": "text_encoder",
                  "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2", "lora_te3_": "text_encoder_3"}


def lora_entry(x: Any, where: str) -> dict[str, Any]:
    """A recipe's LoRA (`path`, `org/repo/file.safetensors`, or a mapping with ref, strength, components) as a
    normalised mapping: ref, strength and, when given, per-component strengths; a canonical entry's pins kept."""
    if isinstance(x, str):
        x = {"ref": x}
    if not isinstance(x, dict) or not isinstance(x.get("ref"), str) or not x["ref"]:
        raise RecipeError(f"{where}: a LoRA is a path or Hub reference, or a mapping with 'ref'")
    known = {"ref", "strength", "components", "repo", "revision", "file", "sha256"}
    unknown = sorted(set(x) - known)
    if unknown:
        raise RecipeError(f"{where}: unknown field(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    out = dict(x)
    out["strength"] = _number(x.get("strength", 1.0), f"{where}.strength")
    comps = x.get("components")
    if comps is not None:
        from hubmix.formats.families import all_component_names

        if isinstance(comps, list):
            comps = {c: out["strength"] for c in comps}
        if not isinstance(comps, dict):
            raise RecipeError(f"{where}.components: a list of components or a mapping component -> strength")
        bad = [c for c in comps if c not in all_component_names()]
        if bad:
            raise RecipeError(f"{where}.components: unknown {', '.join(bad)} (known: "
                              f"{', '.join(all_component_names())})")
        out["components"] = {c: _number(v, f"{where}.components.{c}") for c, v in sorted(comps.items())}
    return out


def parse_lora_option(text: str) -> dict[str, Any]:
    """`REF[:STRENGTH]` as the CLI's --lora takes it."""
    ref, sep, tail = text.rpartition(":")
    if sep and ref:
        try:
            return {"ref": ref, "strength": float(tail)}
        except ValueError:
            pass
    return {"ref": text, "strength": 1.0}


def _number(v: Any, where: str) -> float:
    return recipe_number(v, f"{where}: must be a number, got {{got}}")


# ---- reading a file -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LoraModule:
    """One update in a LoRA file (formats.lycoris names the kinds and their parts): W += strength * factor * U,
    U the update the parts make (up @ down for a LoRA); or, with `dora`, DoRA's rescaling of W + factor * U."""

    lora: str  # the LoRA's name, for messages
    name: str  # the module's name in the file
    component: str
    key: str  # the canonical key it updates
    kind: str  # lora, loha, lokr, full
    parts: dict[str, Any]  # part name -> TensorRef-like (.shape, .load())
    factor: float  # alpha / rank, once (1 where the kind takes no alpha)
    strength: float
    dora: Any = None  # TensorRef-like dora_scale, or None

    @property
    def scale(self) -> float:
        return self.strength * self.factor

    @property
    def up(self) -> Any:
        return self.parts["up"]

    @property
    def down(self) -> Any:
        return self.parts["down"]

    @property
    def rank(self) -> int:
        return self.down.shape[0]


@dataclass(frozen=True)
class _FileRef:
    file: Any
    key: str

    @property
    def shape(self) -> tuple[int, ...]:
        return self.file.info(self.key).shape

    def load(self):
        return self.file.tensor(self.key)


def read_lora(path: Path, name: str, components: dict[str, Any], strengths: dict[str, float],
              skip_unknown: bool) -> tuple[list[LoraModule], list[str]]:
    """The modules of LoRA file `path` mapped onto `components` (name -> formats.model.Component, the output's
    structure), with their scales; and the keys that matched nothing (an error unless `skip_unknown`)."""
    from hubmix.formats.io.readers import open_weight_file
    from hubmix.formats.lycoris import REFUSED, missing_parts, rank_of, split_key

    f = open_weight_file(path)
    keys = f.keys()
    for k in keys:
        for frag, fmt in REFUSED.items():
            if frag in k:
                raise InputError(f"{name}: {fmt} files are not supported (key {k}); hubmix bakes LoRA / LoCon, "
                                 "LoHa, LoKr, full diffs (with DoRA scales) and diffusers/PEFT files")
    fmt = "kohya" if any(k.startswith(tuple(KOHYA_PREFIXES)) for k in keys) else "peft"
    meta = _peft_metadata(f.metadata) if fmt == "peft" else {}
    grouped: dict[str, dict[str, Any]] = {}
    unknown: list[str] = []
    for k in sorted(keys):
        parsed = split_key(k)
        if parsed is None:
            unknown.append(k)
            continue
        mod, kind, part = parsed
        # a bias diff is its own update, beside whatever updates the module's weight (ComfyUI reads it so)
        g = grouped.setdefault(mod + "\0bias" if part == "diff_b" else mod,
                               {"mod": mod, "kinds": set(), "parts": {}, "keys": []})
        if kind:
            g["kinds"].add(kind)
        g["parts"][part] = k
        g["keys"].append(k)
    indexes: dict[str, dict[str, str | None]] = {}
    modules = []
    for g in grouped.values():
        mod = g["mod"]
        if not g["kinds"]:
            unknown += g["keys"]  # an alpha or dora_scale alone
            continue
        if len(g["kinds"]) > 1:
            raise InputError(f"{name}: module {mod} mixes {' and '.join(sorted(g['kinds']))} tensors")
        kind = next(iter(g["kinds"]))
        lack = missing_parts(kind, set(g["parts"]))
        if lack:
            raise InputError(f"{name}: {kind} module {mod} lacks {lack} (has {', '.join(sorted(g['keys']))})")
        comp, targets = _locate(fmt, mod, components, indexes)
        if comp in components and comp not in strengths:
            continue  # the recipe bakes this LoRA into other components only
        if not targets:
            unknown += g["keys"]
            continue
        parts = {p: _FileRef(f, k) for p, k in g["parts"].items() if p not in ("alpha", "dora")}
        alpha = float(f.tensor(g["parts"]["alpha"]).float().item()) if "alpha" in g["parts"] else None
        dora = _FileRef(f, g["parts"]["dora"]) if "dora" in g["parts"] else None
        if kind == "full":
            for target, rows in targets:
                for p, suffix in (("diff", None), ("diff_b", "bias")):
                    if p in parts:
                        key = target if suffix is None else target[: -len("weight")] + suffix
                        diff = parts[p] if rows is None else _Rows(parts[p], *rows)
                        m = LoraModule(name, mod, comp, key, kind, {"diff": diff}, 1.0, strengths[comp])
                        _check_shapes(m, components[comp].tensors.get(key))
                        modules.append(m)
            continue
        shapes = {p: r.shape for p, r in parts.items()}
        rank = rank_of(kind, shapes)
        if kind == "lora":
            alpha = alpha if alpha is not None else _meta_alpha(meta, comp, mod, rank) if fmt == "peft" else None
            factor = (alpha if alpha is not None else rank) / rank
        else:  # LyCORIS: no alpha (or none that applies) means scale 1
            factor = alpha / rank if alpha is not None and rank else 1.0
        for target, rows in targets:
            own = parts if rows is None else _part_rows(name, mod, kind, parts, dora, rows)
            m = LoraModule(name, mod, comp, target, kind, own, factor, strengths[comp], dora)
            _check_shapes(m, components[comp].tensors[target])
            modules.append(m)
    if unknown and not skip_unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise InputError(f"{name}: LoRA key {unknown[0]} matches no tensor of these models{more}; "
                         "--lora-skip-unknown bakes the rest")
    return modules, unknown


def _locate(kind: str, mod: str, components: dict[str, Any], indexes: dict) -> tuple[str | None, Targets]:
    """(component, targets) a LoRA module updates: (canonical key, rows or None) pairs, several when the module
    is a fused original tensor (FLUX's `qkv`) split into diffusers modules; (component or None, ()) when nothing
    matches."""
    if kind == "kohya":
        prefix = next((p for p in sorted(KOHYA_PREFIXES, key=len, reverse=True) if mod.startswith(p)), None)
        if prefix is None:
            return None, ()
        comp, rest = KOHYA_PREFIXES[prefix], mod[len(prefix):]
    else:
        head, _, rest = mod.partition(".")
        comp = head if head in components else "unet"
        rest = rest if head in components or head == "diffusion_model" else mod  # ComfyUI's / musubi's prefix
    if comp == "unet" and comp not in components and "transformer" in components:  # lora_unet_ of a DiT
        comp = "transformer"
    if comp not in components:
        return comp, ()
    if comp not in indexes:
        indexes[comp] = module_index(components[comp])
    c = components[comp]
    if kind == "peft" and c.keymap is not None:
        rest = c.keymap.normalize(rest + ".weight")[: -len(".weight")]
    return comp, indexes[comp].get(rest) or ()


# (canonical key, rows): rows None (the module's weight), (first row, count) of a fused tensor, or SWAP: the
# original stores the halves the other way round (FLUX's final adaLN: shift, scale vs diffusers' scale, shift)
Targets = tuple[tuple[str, Any], ...]
SWAP = (0, -1)


def module_index(component: Any) -> dict[str, Targets | None]:
    """Module name -> the canonical weight key(s) it updates, for one component, from its own keys: each weight's
    diffusers module path and its original single-file module path, both dotted and with '.' written '_' (kohya's
    spelling). An original tensor the layout splits into several diffusers weights (`part` in layouts.yaml: a
    fused qkv) names all of them, each with its rows of the fused tensor. A name two modules would share maps to
    None (ambiguous, reported as unknown)."""
    from hubmix.formats.layouts import part_rows

    index: dict[str, Targets | None] = {}
    fused: dict[str, list[tuple[str, Any]]] = {}
    keymap = component.keymap
    for key in component.tensors:
        if not key.endswith(".weight"):
            continue
        names = {key[: -len(".weight")]}
        place = keymap.to_original(key) if keymap is not None else None
        if place is not None and place.transform in (None, "conv1x1", "swap_halves") \
                and place.key.endswith(".weight"):
            orig = place.key[len(keymap.prefix): -len(".weight")]
            if place.part is not None:
                fused.setdefault(orig, []).append((key, place.part))
            elif place.transform == "swap_halves" and orig != key[: -len(".weight")]:
                _add(index, orig, ((key, SWAP),))
            else:
                names.add(orig)
        for n in names:
            _add(index, n, ((key, None),))
    for orig, members in fused.items():
        total = sum(component.tensors[k].shape[0] for k, _ in members)
        rows = [part_rows(part, total) for _, part in members]
        if any(r is None or r[1] != component.tensors[k].shape[0] for (k, _), r in zip(members, rows)):
            continue  # parts missing from this model, or widths that do not divide: no module of that name
        _add(index, orig, tuple((k, r) for (k, _), r in sorted(zip(members, rows), key=lambda kr: kr[1])))
    return index


def _add(index: dict, name: str, targets: Targets) -> None:
    for n in {name, name.replace(".", "_")}:
        index[n] = targets if index.get(n, targets) == targets else None


@dataclass(frozen=True)
class _Rows:
    """Rows [start, start + count) of a part (dimension `dim`): a fused tensor's LoRA part for one of the
    diffusers weights it is split into. A row of up @ down (or of a diff) depends on that row of up alone."""

    ref: Any
    start: int
    count: int  # -1 with start 0 (SWAP): every row, the two halves swapped
    dim: int = 0

    @property
    def shape(self) -> tuple[int, ...]:
        s = list(self.ref.shape)
        s[self.dim] = self.count if self.count >= 0 else s[self.dim]
        return tuple(s)

    def load(self):
        t = self.ref.load()
        if self.count < 0:
            return t.roll(t.shape[self.dim] // 2, self.dim)
        return t.narrow(self.dim, self.start, self.count)


ROW_PARTS = {"lora": ("up",), "loha": ("w1a", "w2a")}  # the parts whose rows are the update's rows


def _part_rows(name: str, mod: str, kind: str, parts: dict[str, Any], dora: Any,
               rows: tuple[int, int]) -> dict[str, Any]:
    """`parts` restricted to `rows` of the fused tensor they update."""
    if kind not in ROW_PARTS or dora is not None or {"t1", "t2"} & set(parts):
        what = "DoRA " if dora is not None else ""
        raise InputError(f"{name}: {what}{kind} module {mod} updates a tensor the model stores split or with its "
                         "rows reordered; only LoRA/LoCon, LoHa and full-diff modules can be split by rows")
    return {p: _Rows(r, *rows) if p in ROW_PARTS[kind] else r for p, r in parts.items()}


def _check_shapes(m: LoraModule, ref: Any) -> None:
    from hubmix.formats.lycoris import fits

    shapes = {p: tuple(r.shape) for p, r in m.parts.items()}
    if ref is None or not fits(m.kind, shapes, tuple(ref.shape)):
        desc = ", ".join(f"{p} {list(s)}" for p, s in sorted(shapes.items()))
        where = f"{m.component}/{m.key} {list(ref.shape)}" if ref is not None else f"{m.component}/{m.key} (absent)"
        raise InputError(f"{m.lora}: {m.kind} module {m.name} ({desc}) does not fit {where}")


def _peft_metadata(meta: dict[str, str]) -> dict[str, Any]:
    raw = meta.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        return json.loads(raw)
    except ValueError:
        return {}


def _meta_alpha(meta: dict[str, Any], comp: str, mod: str, rank: int) -> float:
    """PEFT's alpha for a module: diffusers' `lora_adapter_metadata` (per component `lora_alpha`, and
    `alpha_pattern` entries whose key ends the module's name), else alpha = rank (scale 1), as diffusers does."""
    if meta.get(f"{comp}.use_rslora"):
        raise InputError(f"{comp}: rank-stabilised LoRA (use_rslora) is not supported")
    rel = mod.partition(".")[2] if mod.startswith(comp + ".") else mod
    for pattern, value in (meta.get(f"{comp}.alpha_pattern") or {}).items():
        if rel == pattern or rel.endswith("." + pattern):
            return float(value)
    alpha = meta.get(f"{comp}.lora_alpha")
    return float(alpha) if alpha is not None else float(rank)
