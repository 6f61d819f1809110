"""The model a local folder or single file opens as: components of canonically named, lazily read tensors
(`TensorRef`: where the bytes are and how to view them in canonical shape). formats/model.py opens diffusers
folders, formats/single_file.py single files."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hubmix.formats.families import ComponentSpec, Family
from hubmix.formats.io.readers import TensorInfo, WeightFile
from hubmix.formats.io.span import Packed, Span
from hubmix.formats.layouts import COPYING, KeyMap, Placement, apply_to_canonical, part_rows
from hubmix.formats.prediction import Prediction

if TYPE_CHECKING:
    import torch

CONFIG_META = "hubmix.configs"  # single files written by hubmix embed their component configs under this key


@dataclass(frozen=True)
class TensorRef(TensorInfo):
    """One canonical tensor of one input: a (part of a) tensor in a weight file, viewed in canonical shape."""

    file: WeightFile
    key: str
    place: Placement = Placement("")

    @property
    def quant(self) -> str | None:
        """The quant type of a quantized input tensor ("nf4", "fp8_scaled e4m3fn"), None for a plain one."""
        of = getattr(self.file, "quant_type", None)
        return of(self.key) if of is not None else None

    def load(self) -> torch.Tensor:
        """A zero-copy view (a copy only for transposed tensors) in canonical shape; a quantized tensor
        dequantized to float32 (a fused part's rows only)."""
        if self.quant is not None and self.place.transform not in COPYING:
            return self.load_flat(0, self.numel).reshape(self.shape)
        t = self.file.tensor(self.key)
        if self.place.part is not None:
            start, rows = part_rows(self.place.part, t.shape[0])  # type: ignore[misc]  # checked on open
            t = t.narrow(0, start, rows)
        return apply_to_canonical(self.place.transform, t)

    def load_flat(self, start: int, stop: int) -> torch.Tensor:
        """Flat elements [start, stop) of the canonical tensor (a layout whose transform moves no bytes); a
        quantized tensor dequantizes only those."""
        ranged = getattr(self.file, "tensor_range", None)
        if ranged is None or self.place.transform in COPYING:
            return self.load().reshape(-1)[start:stop]
        base = self._base()
        return ranged(self.key, base + start, base + stop)

    def packed(self, start: int, stop: int, shape: tuple[int, ...] | None = None) -> Packed | None:
        """Flat elements [start, stop) of a quantized canonical tensor as stored blocks the native library unpacks
        (formats.io.span.Packed), or None where the reader has none (a type without a native dequantizer, a
        transform that moves bytes)."""
        of = getattr(self.file, "packed", None)
        if of is None or self.quant is None or self.place.transform in COPYING:
            return None
        base = self._base()
        return of(self.key, base + start, base + stop, shape)

    def _base(self) -> int:
        """The flat element where this canonical tensor starts in its stored one (a fused tensor's part)."""
        if self.place.part is None:
            return 0
        full = self.file.info(self.key).shape
        first, _ = part_rows(self.place.part, full[0])  # type: ignore[misc]  # checked on open
        return first * (math.prod(full[1:]) if len(full) > 1 else 1)

    def stored_span(self) -> Span | None:
        """The stored bytes as a torch-free span (no copy; a fused tensor's rows narrowed) in the file's shape, or
        None where the reader has no mapping to offer (a pickle, misaligned data)."""
        s = self.file.span(self.key)
        if s is not None and self.place.part is not None:
            start, rows = part_rows(self.place.part, s.shape[0])  # type: ignore[misc]  # checked on open
            s = s.rows(start, rows)
        return s

    def span(self) -> Span | None:
        """The tensor in canonical shape as a span without a copy; None also for transforms that move bytes
        (transpose, swap_halves), which the engine applies to `stored_span()`."""
        if self.place.transform in COPYING:
            return None
        s = self.stored_span()
        return None if s is None else s.reshape(self.shape)


@dataclass
class Component:
    name: str
    spec: ComponentSpec
    tensors: dict[str, TensorRef]
    config: dict[str, Any] | None
    config_source: str  # "folder", "embedded" or "inferred"
    keymap: KeyMap | None = None
    notes: list[str] = field(default_factory=list)
    dropped: list[tuple[str, str]] = field(default_factory=list)  # (original key, why)
    folder: Path | None = None  # the component's subfolder in a diffusers input


@dataclass
class LocalModel:
    path: Path
    layout: str  # "diffusers" or "single-file"
    family: Family
    components: dict[str, Component]
    files: list[Path]
    metadata: dict[str, str] = field(default_factory=dict)
    extra_components: dict[str, Path] = field(default_factory=dict)  # diffusers subfolders hubmix does not merge
    prediction: Prediction = Prediction()
    inpainting: bool = False
    unassigned: list[str] = field(default_factory=list)  # single-file keys outside every component
    main_only: bool = False  # a file with the main component alone (a Flux transformer-only file)
    main_prefix: str = ""  # a main-only file's key prefix: "" (bare) or ComfyUI's `model.diffusion_model.`

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def prediction_type(self) -> str | None:
        return self.prediction.type

    @property
    def model_variant(self) -> str | None:
        """The family's variant this model is (Flux dev or schnell), by its main component's keys."""
        main = self.components.get(self.family.main)
        return self.family.variant_of(main.tensors) if main is not None else None



def is_inpainting(model: LocalModel) -> bool:
    unet = model.components.get("unet")
    ref = unet.tensors.get("conv_in.weight") if unet else None
    return bool(ref and len(ref.shape) == 4 and ref.shape[1] == 9)

