"""Quantized tensor formats: a reader and a writer per format, behind the tensor interface the engine already reads.

Reading. A format's `QuantReader` looks at an opened file's header (keys, dtypes, shapes, metadata; no tensor data)
and returns one `QuantGroup` per logical tensor: the key the unquantized file would have (`<layer>.weight`), its
shape, the quant type's name as `inspect` shows it ("fp8_scaled e4m3fn", "nf4", "gguf q4_k"), the stored keys the
group consumes (weight, scale, absmax, quant_map, quant_state...) and `dequantize(start, stop)`: float32 values of the
flat element range [start, stop), exactly the reference implementation's values. `QuantizedFile` wraps the file so
that it looks like a plain float32 file to everything above it: `keys()` are the logical keys (members and markers
gone), `info(key)` says float32 and the logical shape, `tensor(key)` / `tensor_range(key, start, stop)` dequantize
(the engine asks for a chunk's range only, so peak memory stays a chunk), `quant_type(key)` names the format.
`wrap(file)` applies the first reader whose `detect` claims the file; `refuse(file)` names the quantized formats of
this family hubmix does not dequantize (nvfp4, mxfp8, int8, LLM.int8), so they are never misread as plain weights.
A container that is not safetensors (GGUF) is a WeightFile of its own whose tensors are groups the same way.

Writing. `--dtype NAME` where NAME is a registered `QuantCodec` (`fp8_scaled`, `nf4`, `gguf-q8_0`...). For every output
tensor the codec decides whether it is quantized (`quantizes(component, key, shape)`: the keep-high-precision rule;
tensors it keeps are written in `keep_dtype`), plans its stored tensors (`plan(key, shape)` -> [StoredTensor]) and
encodes float32 chunks (`encode(key, shape, x, start, stat)` -> [(stored key, byte offset, tensor)]), chunks starting
at multiples of `block` elements. A codec with `needs_amax` gets the whole tensor's max |x| as `stat` (the engine
computes it in a pass over the chunks first: a per-tensor scale); tensors fused in the output (Flux's qkv) share
one stat, the largest of their parts'. `file_tensors()` and `file_metadata()` are what the codec adds once per
output file (ComfyUI's `scaled_fp8` marker, GGUF's header fields). `container` names the file type the codec
writes into ("safetensors" or "gguf"). A codec whose encode also takes Spans (`spans = True`, through the native
hooks the engine installs in `accel`) lets a merge of plain inputs run without torch.

Where it plugs in: formats/model.py opens every weight file as `quant.wrap(open_weight_file(path))`; TensorRef
`quant` / `load_flat` read groups chunk by chunk; engine/plan.py marks the tasks a codec quantizes (Task.quant,
computed in float32); engine/output.py plans each task's stored tensors and routes chunks through `encode`;
engine/chunk.py's `quant_stat` runs the amax pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from hubmix.formats.quant.gguf_types import GGUF_DTYPES

if TYPE_CHECKING:
    import torch

    from hubmix.formats.io.readers import WeightFile


@dataclass(frozen=True)
class StoredTensor:
    """One tensor a codec writes for a logical tensor (or once per file)."""

    key: str
    dtype: str  # torch's name: "float8_e4m3fn", "uint8", "float32"
    shape: tuple[int, ...]


@dataclass
class QuantGroup:
    """One logical tensor of a quantized file and how to get its float32 values."""

    key: str  # the logical key, as an unquantized file names it
    shape: tuple[int, ...]
    quant: str  # the quant type's name ("fp8_scaled e4m3fn", "nf4", "fp4")
    members: tuple[str, ...]  # the stored keys this group consumes
    dequantize: Callable[[int, int], "torch.Tensor"]  # flat [start, stop) -> float32 (1-D)


class QuantReader:
    """A quantized format's reader: recognises a file and splits its stored tensors into groups."""

    name = ""

    def detect(self, f: WeightFile) -> bool:  # pragma: no cover - interface
        raise NotImplementedError

    def groups(self, f: WeightFile) -> tuple[list[QuantGroup], set[str]]:  # pragma: no cover - interface
        """The file's groups and the other stored keys the format consumes without a group of their own (markers,
        input scales). Raises InputError naming the file and tensor for anything malformed."""
        raise NotImplementedError


class QuantCodec:
    """A quantized output format, registered under its --dtype name."""

    name = ""
    container = "safetensors"
    block = 1  # chunks of one tensor start at multiples of this many elements
    needs_amax = False
    keep_dtype = "bfloat16"  # the dtype of the tensors the codec does not quantize
    describe = ""  # one line for --help, the card and docs
    spans = False  # encode() takes torch-free Spans too (through formats.quant.accel's native hooks)
    extension = ".safetensors"  # of the file it writes
    layout = "single-file"  # the one output layout it writes (a diffusers folder is refused, naming this one)
    loader = ""  # the card's "Use it": what the file is and what loads it

    def open_writer(self, path: Any, planned: dict[str, Any], metadata: dict[str, str], rules: dict[str, Any],
                    sources: dict[str, str]) -> Any:
        """A writer of its own container (GGUF); the safetensors formats are written by the engine's writer."""
        return None

    def quantizes(self, component: str, key: str, shape: tuple[int, ...], main: bool) -> bool:  # pragma: no cover
        """Whether this output tensor is quantized (`main`: the tensor belongs to the family's denoiser)."""
        raise NotImplementedError

    def plan(self, key: str, shape: tuple[int, ...]) -> list[StoredTensor]:  # pragma: no cover - interface
        raise NotImplementedError

    def encode(self, key: str, shape: tuple[int, ...], x: torch.Tensor, start: int,
               stat: float | None) -> list[tuple[str, int, Any]]:  # pragma: no cover - interface
        """Stored pieces of the float32 flat chunk `x` (elements start.. of the tensor): (stored key, byte offset
        into that stored tensor, data in its planned dtype)."""
        raise NotImplementedError

    def kernel_scale(self, stat: float | None) -> float | None:
        """The scale with which a native merge kernel may store this tensor's codes itself, in the same pass as the
        merge (float8_e4m3fn of x / scale, saturated at 448: engine.native's fused store); `encode` then gets those
        codes instead of float32. None (the default): the codec encodes float32 chunks."""
        return None

    def file_tensors(self, prefix: str) -> dict[str, Any]:
        """Tensors the format adds once per output file, as Spans (a marker); `prefix`: the denoiser's key prefix
        in that file ("model.diffusion_model." in a checkpoint, "" in a denoiser-only file)."""
        return {}

    def file_metadata(self) -> dict[str, str]:
        return {}


READERS: list[QuantReader] = []
CODECS: dict[str, QuantCodec] = {}


def register_reader(reader: QuantReader) -> QuantReader:
    READERS.append(reader)
    return reader


def register_codec(codec: QuantCodec) -> QuantCodec:
    CODECS[codec.name] = codec
    return codec


_BUILTIN: list[bool] = []  # [True] once the built-in formats are imported (one imported directly fills a registry)


def _load_builtin() -> None:
    """Import the built-in formats (each registers itself); kept lazy so `hubmix --help` imports none of them."""
    import importlib
    import importlib.util

    _BUILTIN.append(True)

    for name in ("scaled_fp8", "bnb4", "gguf_codec"):
        if importlib.util.find_spec(f"{__name__}.{name}") is not None:
            importlib.import_module(f"{__name__}.{name}")


def codec(name: str) -> QuantCodec | None:
    """The codec of a --dtype name, None for a plain dtype (fp16, bf16...)."""
    if not _BUILTIN:
        _load_builtin()
    return CODECS.get(name)


def codec_names() -> tuple[str, ...]:
    """The quantized --dtype names (static, so the CLI's choices cost no import)."""
    return QUANT_DTYPES


# Every registered codec's --dtype name, in --help's order: the one list the CLI's choices, recipe validation, the
# UI's dtype dropdown and the card read (static, so none of them imports a format; a test checks it is CODECS').
QUANT_DTYPES = ("fp8_scaled", "nf4", *GGUF_DTYPES)


def wrap(f: WeightFile) -> WeightFile:
    """`f` itself, or a QuantizedFile view of it when a quantized format claims it."""
    if not _BUILTIN:
        _load_builtin()
    from hubmix.formats.quant.view import QuantizedFile, refuse

    refuse(f)
    for reader in READERS:
        if reader.detect(f):
            return QuantizedFile(f, reader)
    return f


__all__ = ["StoredTensor", "QuantGroup", "QuantReader", "QuantCodec", "READERS", "CODECS", "register_reader",
           "register_codec", "codec", "codec_names", "wrap", "QUANT_DTYPES"]
