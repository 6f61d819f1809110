"""Plan a merge: align every component's keys across the inputs and decide, key by key, what the output gets.

The rule for inputs that do not line up (stated once here, in the README and in every run's summary):
- The output's structure follows the component's first model (model a unless the recipe says otherwise): its
  keys, shapes and config.
- A key missing from any other input is copied unchanged from the first model.
- A key only other inputs have is left out (the first model's config could not load it).
- A shape that differs is copied from the first model, except a conv weight that differs only in input channels
  (an inpainting UNet's 9-channel conv_in against a 4-channel one): the channels all inputs share are merged and
  the rest come from the first model (A1111's rule; put the inpainting model first to get an inpainting result).
- Non-float tensors (position ids, counters) are copied from the first model.
Nothing is broadcast and nothing fails deep in the loop: every case is listed in the summary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hubmix.errors import RecipeError
from hubmix.formats.families import Family
from hubmix.formats.layouts import COPYING
from hubmix.methods import Method, get_method
from hubmix.formats.io.span import FP8, ITEMSIZE, is_float, torch_dtype
from hubmix.formats.model import LocalModel, TensorRef
from hubmix.formats.quant import QUANT_DTYPES, codec
from hubmix.recipe import Recipe, letter

if TYPE_CHECKING:
    import torch

DTYPE_NAMES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32", "fp8_e4m3fn": "float8_e4m3fn",
               "fp8_e5m2": "float8_e5m2"}  # --dtype -> torch's name


@dataclass
class Task:
    """One output tensor: merge `refs` with `method` (or copy refs[0]), in canonical key space."""

    component: str
    key: str
    shape: tuple[int, ...]
    dtype_name: str  # the output dtype, torch's name for it ("float16"): planning needs no torch
    refs: list[TensorRef]
    sources: list[int]  # index of the model each ref comes from
    method: Method | None = None
    params: dict[str, float] = field(default_factory=dict)
    block: str | None = None
    channels: int | None = None  # merge only the first `channels` input channels (dim 1); the rest is refs[0]'s
    whole_only: bool = False  # an output needs the whole tensor at once (a transposed copy)
    stats: dict[str, Any] | None = None  # a whole-tensor method's per-tensor statistics, once computed
    lora: Any = None  # engine.lora.LoraDelta: LoRA updates added to this tensor
    quant: str | None = None  # the quantized output format (a formats.quant codec): computed in float32, encoded
    quant_group: list[Task] | None = None  # tasks whose outputs share one stored tensor (fused qkv): one scale
    quant_stat: float | None = None  # the codec's per-tensor statistic (amax) once computed, shared by the group
    quant_scale: float | None = None  # then its codec.kernel_scale: native kernels store the codes themselves
    store: str | None = None  # a GGUF output's ggml type that a span merge stores the chunks in (Router.wanted)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def out_dtype(self) -> torch.dtype:
        return torch_dtype(self.dtype_name)

    @property
    def out_itemsize(self) -> int:
        return ITEMSIZE[self.dtype_name]

    @property
    def out_nbytes(self) -> int:
        return self.numel * self.out_itemsize

    @property
    def chunkable(self) -> bool:
        """Element-wise over contiguous views: safe to process in flat chunks."""
        if self.channels is not None or self.whole_only or (self.method is not None and not self.method.elementwise):
            return False
        if self.lora is not None and self.lora.needs_whole:  # DoRA: norms over the whole weight
            return False
        return all(r.place.transform not in COPYING for r in self.refs)


@dataclass
class Summary:
    """What happened to keys that did not line up, and other facts a user should see after a merge."""

    merged: int = 0
    copied: int = 0
    events: dict[str, list[str]] = field(default_factory=dict)

    TITLES = {
        "missing": "missing from some inputs, copied from the first model",
        "extra": "only in other inputs, left out (the first model's structure wins)",
        "shape": "shape differs, copied from the first model",
        "channels": "input channels differ (inpainting), shared channels merged, the rest from the first model",
        "nonfloat": "non-float tensors, copied from the first model",
        "dropped": "original-layout keys with no diffusers counterpart, not used",
        "unassigned": "single-file keys outside every component (EMA, schedule buffers), not used",
        "config": "configs inferred from shapes (what shapes cannot tell came from family defaults)",
        "lora": "LoRA keys that match no tensor, skipped (--lora-skip-unknown)",
        "note": "notes",
    }  # "nonfinite" events (NaN/inf inputs, per component and model) are printed as warnings, even with -q

    def add(self, kind: str, line: str) -> None:
        self.events.setdefault(kind, []).append(line)

    def to_dict(self) -> dict[str, Any]:
        return {"merged": self.merged, "copied": self.copied, "events": self.events}

    def render(self, limit: int = 8) -> str:
        lines = [f"merged {self.merged} tensors, copied {self.copied} unchanged"]
        for kind, title in self.TITLES.items():
            items = self.events.get(kind)
            if not items:
                continue
            lines.append(f"{title}: {len(items)}")
            lines.extend(f"  {x}" for x in items[:limit])
            if len(items) > limit:
                lines.append(f"  ... and {len(items) - limit} more (--json lists all)")
        return "\n".join(lines)


def out_dtype_for(recipe: Recipe, ref: TensorRef, others: list[TensorRef | None] = ()) -> str:
    """The output dtype's name: --dtype, else model a's dtype; but fp8 only when every input is fp8 (a merge with a
    wider input keeps the first wider dtype rather than rounding it to 8 bits). A quantized input (read as
    float32) counts as bf16, the dtype its loaders compute in. A quantized --dtype is planned by `quant_plan`."""
    if not is_float(ref.dtype_name):
        return ref.dtype_name
    if recipe.dtype in QUANT_DTYPES:  # a GGUF codec's float32: its writer quantizes results as it writes them
        return codec(recipe.dtype).keep_dtype  # type: ignore[union-attr]
    if recipe.dtype:
        return DTYPE_NAMES[recipe.dtype]
    if ref.quant is not None:
        plain = [r.dtype_name for r in others if r is not None and r.quant is None and is_float(r.dtype_name)
                 and r.dtype_name not in FP8]
        return plain[0] if plain else "bfloat16"
    if ref.dtype_name in FP8:
        wider = [r.dtype_name for r in others if r is not None and is_float(r.dtype_name) and r.dtype_name not in FP8]
        return wider[0] if wider else ref.dtype_name
    return ref.dtype_name


def plan_merge(models: list[LocalModel], recipe: Recipe, family: Family) -> tuple[list[Task], Summary, dict[str, int]]:
    """Tasks for every output tensor, the summary of mismatches, and each output component's structure model index.

    A component some inputs lack (transformer-only files) is copied from the first of its models that has it;
    `models` may end with a donor beyond the recipe's inputs (--config-from) that only such copies use."""
    summary = Summary()
    tasks: list[Task] = []
    structure: dict[str, int] = {}
    letters = [letter(i) for i in range(len(models))]
    for m in models:
        for comp in m.components.values():
            for key, why in comp.dropped:
                summary.add("dropped", f"{m.name}: {key} ({why})")
        for key in m.unassigned:
            summary.add("unassigned", f"{m.name}: {key}")
    for cname in family.components:
        rp = recipe.plan_for(cname)
        have = [i for i, m in enumerate(models) if cname in m.components]
        if not have:
            summary.add("note", f"{cname}: in none of the inputs (transformer-only files); not in the output")
            continue
        wanted = [letters.index(rp["from"])] if "from" in rp else [letters.index(x) for x in rp["models"]]
        lacking = [models[i].name for i in wanted if i not in have]
        if lacking:  # a transformer-only input: the component comes whole from the first model that has it
            src = next((i for i in wanted if i in have), have[0])
            summary.add("note", f"{cname}: not in {', '.join(lacking)}; copied from {models[src].name}")
            rp = {"from": letters[src]}
        if "from" in rp:
            idx = letters.index(rp["from"])
            structure[cname] = idx
            for key, ref in sorted(models[idx].components[cname].tensors.items()):
                tasks.append(Task(cname, key, ref.shape, out_dtype_for(recipe, ref), [ref], [idx]))
            continue
        idxs = [letters.index(x) for x in rp["models"]]
        structure[cname] = idxs[0]
        method = get_method(rp["method"])
        advice = method.advice(len(idxs), rp["params"]) if method.advice else None
        if advice:
            summary.add("note", f"{cname}: {advice}")
        comps = [models[i].components[cname] for i in idxs]
        first = comps[0]
        labels = {first.keymap.block_label(k) for k in first.tensors} if first.keymap else set()
        unknown = sorted(set(rp["blocks"]) - labels)
        if unknown:
            valid = ", ".join(sorted(x for x in labels if x)) or "none: this component has no blocks"
            raise RecipeError(f"{recipe.source}: components.{cname}.blocks: unknown block(s) {', '.join(unknown)} "
                              f"(this model's: {valid})")
        for key, ref0 in sorted(first.tensors.items()):
            refs = [c.tensors.get(key) for c in comps]
            dtype = out_dtype_for(recipe, ref0, refs)
            block = first.keymap.block_label(key) if first.keymap else None
            params = rp["blocks"].get(block, rp["params"])
            copy = Task(cname, key, ref0.shape, dtype, [ref0], [idxs[0]])
            if not is_float(ref0.dtype_name):
                summary.add("nonfloat", f"{cname}/{key}")
                tasks.append(copy)
                continue
            lacking = [models[i].name for i, r in zip(idxs, refs) if r is None]
            if lacking:
                summary.add("missing", f"{cname}/{key} (not in {', '.join(lacking)})")
                tasks.append(copy)
                continue
            task = Task(cname, key, ref0.shape, dtype, refs, idxs, method, params, block)  # type: ignore[arg-type]
            shapes = {r.shape for r in refs}  # type: ignore[union-attr]
            if len(shapes) > 1:
                shared = _shared_channels(ref0.shape, [r.shape for r in refs])  # type: ignore[union-attr]
                if shared is None:
                    desc = ", ".join(f"{models[i].name} {list(r.shape)}" for i, r in zip(idxs, refs))  # type: ignore
                    summary.add("shape", f"{cname}/{key}: {desc}")
                    tasks.append(copy)
                    continue
                task.channels = shared
                desc = ", ".join(f"{models[i].name} {r.shape[1]}" for i, r in zip(idxs, refs))  # type: ignore
                summary.add("channels", f"{cname}/{key}: {desc} input channels; first {shared} merged")
            tasks.append(task)
        for i, c in zip(idxs[1:], comps[1:]):
            for key in sorted(set(c.tensors) - set(first.tensors)):
                summary.add("extra", f"{cname}/{key} (in {models[i].name})")
    if recipe.dtype in QUANT_DTYPES:
        quant_plan(tasks, recipe.dtype, family)
    for t in tasks:
        if t.method is None:
            summary.copied += 1
        else:
            summary.merged += 1
    return tasks, summary, structure


def quant_plan(tasks: list[Task], name: str, family: Family) -> None:
    """Mark the tasks a quantized output format quantizes (its keep-high-precision rule): they compute in float32
    and the output router encodes them; the rest keep the codec's high-precision dtype (set by out_dtype_for)."""
    fmt = codec(name)
    assert fmt is not None
    for t in tasks:
        if is_float(t.dtype_name) and t.channels is None and fmt.quantizes(t.component, t.key, t.shape,
                                                                          t.component == family.main):
            t.quant, t.dtype_name = name, "float32"


def _shared_channels(first: tuple[int, ...], shapes: list[tuple[int, ...]]) -> int | None:
    """For conv weights that differ only in input channels (dim 1): how many all of them share."""
    if len(first) != 4 or any(len(s) != 4 or s[0] != first[0] or s[2:] != first[2:] for s in shapes):
        return None
    return min(s[1] for s in shapes)
