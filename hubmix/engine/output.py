"""Where merged tensors go: output files planned from the tasks, the routing of every canonical tensor into them,
and the non-weight files of a diffusers folder (the atomic target that protects the output is engine.target).

A canonical tensor can land in several places at once (`--layout both`: the diffusers component file and the
single file at the folder's root), each with its own key, byte offset (a third of a fused q/k/v) and transform.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hubmix.engine import native
from hubmix.engine.pipeline import Job
from hubmix.errors import InputError
from hubmix.formats.families import ComponentSpec, Family
from hubmix.formats.io.writer import PlannedTensor, SafetensorsWriter
from hubmix.formats.layouts import COPYING, KeyMap, apply_to_original, part_rows, to_original_shape
from hubmix.formats.model import check_component_name
from hubmix.formats.quant import codec as quant_codec
from hubmix.engine.plan import Summary, Task
from hubmix.formats.io.span import Span, dtype_name

if TYPE_CHECKING:
    import torch


@dataclass
class OutputFile:
    path: Path
    metadata: dict[str, str]
    planned: dict[str, PlannedTensor] = field(default_factory=dict)
    generated: dict[str, Span] = field(default_factory=dict)
    writer: Any = None  # a SafetensorsWriter, or the writer of a codec's own container (a GGUFWriter)
    writer_of: tuple | None = None  # (the codec, the family's rules for it, model a's dtype of each key)


@dataclass(frozen=True)
class Route:
    file: OutputFile
    key: str
    byte_base: int
    transform: str | None
    codec: Any = None  # a formats.quant codec: the float32 result is encoded into its stored tensors
    shape: tuple[int, ...] = ()  # the stored logical tensor's shape (a fused tensor's whole shape)


class Router:
    """Plans output files and routes each task's result (whole or chunk) to its place(s) in them."""

    def __init__(self) -> None:
        self.files: list[OutputFile] = []
        self.routes: dict[tuple[str, str], list[Route]] = {}

    def add_component_file(self, path: Path, component: str, tasks: list[Task], metadata: dict[str, str]) -> None:
        """A diffusers component's weight file: canonical keys as they are."""
        f = OutputFile(path, metadata)
        for t in tasks:
            assert t.quant is None, f"{t.key}: quantized outputs are single files (outputs.plan_outputs refuses)"
            f.planned[t.key] = PlannedTensor(t.key, t.dtype_name, t.shape)
            self.routes.setdefault((component, t.key), []).append(Route(f, t.key, 0, None))
        self.files.append(f)

    def add_single_file(self, path: Path, parts: dict[str, tuple[KeyMap, list[Task]]], metadata: dict[str, str],
                        summary: Summary, name: str, extra: dict[str, Span] | None = None) -> None:
        """One original-layout file for all components, through each component's key map; `extra`: tensors
        outside every component (prediction markers) written as they are."""
        f = OutputFile(path, metadata)
        for okey, tensor in (extra or {}).items():
            f.generated[okey] = tensor
            f.planned[okey] = PlannedTensor(okey, tensor.dtype, tuple(tensor.shape))
        for component, (keymap, tasks) in parts.items():
            fused: dict[str, dict[int, Task]] = {}
            widths: dict[str, tuple[int, ...]] = {}
            for t in tasks:
                place = keymap.to_original(t.key)
                if place is None:
                    summary.add("note", f"{component}/{t.key}: no original-layout counterpart, not in {name}")
                    continue
                if place.part is None:
                    shape = to_original_shape(place.transform, t.shape)
                    if t.quant is not None and place.transform is not None and place.transform not in COPYING:
                        keep_high_precision([t])  # reshaped on the way out (a VAE's 1x1 conv): not a Linear weight
                    fmt = self._plan(f, place.key, t, shape)
                    self.routes.setdefault((component, t.key), []).append(
                        Route(f, place.key, 0, place.transform, fmt, shape))
                else:
                    fused.setdefault(place.key, {})[place.part[0]] = t
                    widths[place.key] = place.part[1]
            for okey, pieces in fused.items():
                order = _fused_parts(pieces, widths[okey])
                if order is None:
                    summary.add("note", f"{component}: {okey} needs {len(widths[okey])} parts of relative widths "
                                        f"{list(widths[okey])}, has {len(pieces)} that do not fit; not in {name}")
                    continue
                rows = sum(t.shape[0] for t in order)
                shape = (rows, *order[0].shape[1:])
                if any(t.quant is not None for t in order):
                    _quantize_together(order)
                fmt = self._plan(f, okey, order[0], shape)
                base = 0
                for t in order:
                    self.routes.setdefault((component, t.key), []).append(Route(f, okey, base, None, fmt, shape))
                    base += t.out_nbytes
            by_key = {t.key: t for t in tasks}
            for rel, canon in keymap.copies.items():  # the same tensor under a second original key (T5's tied one)
                t = by_key.get(canon)
                if t is not None:
                    okey = keymap.prefix + rel
                    fmt = self._plan(f, okey, t, t.shape)
                    self.routes.setdefault((component, t.key), []).append(Route(f, okey, 0, None, fmt, t.shape))
            for rel in keymap.generated:
                okey = keymap.prefix + rel
                tensor = keymap.generated_tensor(rel)
                f.generated[okey] = tensor
                f.planned[okey] = PlannedTensor(okey, tensor.dtype, tuple(tensor.shape))
        codecs = {r.codec for rs in self.routes.values() for r in rs if r.file is f and r.codec is not None}
        for fmt in codecs:  # a format's once-per-file tensors (ComfyUI's scaled_fp8 marker), under the denoiser
            prefix = next(km.prefix for c, (km, ts) in parts.items() if any(t.quant == fmt.name for t in ts))
            for okey, tensor in fmt.file_tensors(prefix).items():
                f.generated[okey] = tensor
                f.planned[okey] = PlannedTensor(okey, tensor.dtype, tuple(tensor.shape))
        self.files.append(f)

    @staticmethod
    def _plan(f: OutputFile, okey: str, t: Task, shape: tuple[int, ...]) -> Any:
        """Plan one output tensor: plain, or a quantized task's stored tensors; returns its codec (or None)."""
        fmt = quant_codec(t.quant) if t.quant is not None else None
        if fmt is None:
            f.planned[okey] = PlannedTensor(okey, t.dtype_name, shape)
            return None
        for st in fmt.plan(okey, shape):
            f.planned[st.key] = PlannedTensor(st.key, st.dtype, st.shape)
        return fmt

    def wanted(self, tasks: list[Task]) -> list[Task]:
        """The tasks whose result goes somewhere (after open()); those written transposed are marked whole-only,
        those whose one place is a GGUF tensor the merge pass can encode itself get its type (Task.store)."""
        out = []
        for t in tasks:
            routes = self.routes.get((t.component, t.key))
            if routes:
                t.whole_only = any(r.transform in COPYING for r in routes)
                t.store = _native_store(routes, t)
                out.append(t)
        return out

    def open(self) -> None:
        for f in self.files:
            f.path.parent.mkdir(parents=True, exist_ok=True)
            if f.writer_of is not None:
                fmt, rules, sources = f.writer_of
                f.writer = fmt.open_writer(f.path, f.planned, f.metadata, rules, sources)
                continue
            f.writer = SafetensorsWriter(f.path, list(f.planned.values()), f.metadata)
            for key, tensor in f.generated.items():
                f.writer.write(key, tensor)

    def write(self, job: Job, data: torch.Tensor | Span) -> None:
        for r in self.routes[(job.task.component, job.task.key)]:
            assert r.file.writer is not None
            if r.codec is not None:  # float32 chunk -> the format's stored pieces, at their own offsets
                start = r.byte_base // job.task.out_itemsize + job.start
                flat = data.reshape((job.numel,))
                if r.transform in COPYING:  # a whole tensor (swapped halves): moved first, then encoded
                    shaped = data.reshape(job.task.shape)
                    moved = (native.transformed(r.transform, shaped, to_original_shape(r.transform, job.task.shape))
                             if isinstance(shaped, Span) else apply_to_original(r.transform, shaped))
                    flat = moved.reshape((job.numel,))
                for key, offset, piece in r.codec.encode(r.key, r.shape, flat, start,
                                                         job.task.quant_stat):
                    r.file.writer.write(key, piece, offset)
            elif r.transform in COPYING:  # needs the whole tensor: such tasks are never split
                assert job.whole, f"{job.task.key}: a {r.transform} tensor cannot be written in chunks"
                shaped = data.reshape(job.task.shape)
                stored = (native.transformed(r.transform, shaped, to_original_shape(r.transform, job.task.shape))
                          if isinstance(shaped, Span) else apply_to_original(r.transform, shaped))
                r.file.writer.write(r.key, stored, r.byte_base)
            else:  # conv1x1 reshapes and row-blocks are the same bytes
                r.file.writer.write(r.key, data, r.byte_base + job.start * job.task.out_itemsize)

    def finish(self) -> None:
        for f in self.files:
            assert f.writer is not None
            f.writer.finish()

    def abort(self) -> None:
        for f in self.files:
            if f.writer is not None:
                f.writer.abort()


def _native_store(routes: list[Route], task: Task) -> str | None:
    """The ggml type in which workers store the task's chunks themselves (one native pass: merged, then encoded as
    GGUF blocks; the writer thread only writes them): where its one place is a tensor of a GGUF file, as it is
    (not moved), at a block boundary, of a type the native unit stores."""
    r = routes[0]
    encodes = getattr(r.file.writer, "encodes", None)
    if len(routes) != 1 or r.codec is not None or r.transform not in (None, "conv1x1") or encodes is None:
        return None
    return encodes(r.key, r.byte_base // task.out_itemsize)


def keep_high_precision(tasks: list[Task]) -> None:
    """Tasks a quantized format cannot encode where they land: written in its high-precision dtype instead."""
    for t in tasks:
        if t.quant is not None:
            t.dtype_name = quant_codec(t.quant).keep_dtype  # type: ignore[union-attr]
            t.quant = None


def _quantize_together(order: list[Task]) -> None:
    """The parts of one fused output tensor (Flux's qkv) are quantized as one tensor, sharing one statistic (a
    per-tensor scale), when all are quantized and each starts on a block of the format; else none is."""
    fmt = quant_codec(order[0].quant) if order[0].quant else None
    base, ok = 0, fmt is not None and len({t.quant for t in order}) == 1
    for t in order:
        ok = ok and base % (2 * fmt.block) == 0  # type: ignore[union-attr]
        base += t.numel
    if not ok:
        keep_high_precision(order)
        return
    for t in order:
        t.quant_group = order


def _fused_parts(pieces: dict[int, Task], widths: tuple[int, ...]) -> list[Task] | None:
    """The parts of one fused original tensor in row order, if all are there, alike in trailing shape and dtype,
    and sized in the declared relative widths; else None."""
    order = [pieces.get(i) for i in range(len(widths))]
    if any(t is None for t in order):
        return None
    parts: list[Task] = order  # type: ignore[assignment]
    if len({(t.shape[1:], t.dtype_name) for t in parts}) != 1:
        return None
    rows = sum(t.shape[0] for t in parts)
    starts = [sum(t.shape[0] for t in parts[:i]) for i in range(len(parts))]
    if any(part_rows((i, widths), rows) != (starts[i], t.shape[0]) for i, t in enumerate(parts)):
        return None
    return parts


# ---- diffusers folder files ------------------------------------------------------------------------------------

def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def diffusers_version() -> str:
    """The installed diffusers' version, read from its metadata: importing diffusers to ask costs a second."""
    from importlib.metadata import version

    return version("diffusers")


def component_config_json(spec: ComponentSpec, config: dict[str, Any], dtype: str | None) -> dict[str, Any]:
    """The config.json of a component: the library's own format, with the output dtype recorded."""
    cfg = {k: v for k, v in config.items()}
    if spec.library == "diffusers":
        cfg.setdefault("_class_name", spec.cls)
        cfg.setdefault("_diffusers_version", diffusers_version())
        return cfg
    if "model_type" in cfg:  # a real config.json: keep it as it is
        full = cfg
    else:  # inferred from shapes: let transformers spell out the rest, with the model class's own config class
        import transformers

        full = getattr(transformers, spec.cls).config_class(**cfg).to_dict()
    full.setdefault("architectures", [spec.cls])
    if dtype is not None:
        for key in ("torch_dtype", "dtype"):
            if key in full or key == "dtype":
                full[key] = dtype_name(dtype)
    return full


def model_index(family: Family, inpainting: bool, scheduler_cls: str, base: dict[str, Any] | None) -> dict[str, Any]:
    """model_index.json: a diffusers input's own when there is one, else built from the family's data."""
    if base is not None:
        idx = dict(base)
        for name, entry in idx.items():  # a borrowed index (--config-from) names the output's folders
            if not name.startswith("_") and isinstance(entry, list):
                check_component_name(name, "model_index.json of the config source")
    else:
        idx = {"_diffusers_version": diffusers_version(), **family.pipeline_extra,
               "scheduler": ["diffusers", scheduler_cls]}
        for name, spec in family.components.items():
            idx[name] = [spec.library, spec.cls]
        for name, cls in family.tokenizers.items():
            idx[name] = ["transformers", cls]
    if idx.get("_class_name") not in family.pipelines:  # Qwen-Image-Edit, FLUX.2 Klein keep their own
        idx["_class_name"] = family.inpaint_pipeline if inpainting else family.pipeline
    return idx


def need_folder(path: Path | None, what: str, family: Family) -> Path:
    if path is None:
        raise InputError(
            f"cannot build a diffusers folder: the {what} cannot be inferred from weights; pass --config-from "
            f"<a diffusers folder or Hub repo of this family>, e.g. --config-from {family.default_config_repo}"
        )
    return path
