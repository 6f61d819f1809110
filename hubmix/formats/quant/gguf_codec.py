"""The GGUF output formats (`--dtype gguf-q8_0` ... `gguf-f16`) as registered codecs, beside fp8_scaled and nf4.

A GGUF codec is a codec whose container is the file itself: the engine hands it float32 results of every output
tensor (`keep_dtype`), and its writer (formats.quant.gguf_write.GGUFWriter) gives each tensor its stored type by
ComfyUI-GGUF's rules (`stored_type`) and quantizes it on the way in, so `quantizes` marks no task for `encode`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hubmix.formats.quant import QuantCodec, register_codec
from hubmix.formats.quant.gguf_types import GGUF_DTYPES

LOADER = ("a GGUF file of the denoiser in ComfyUI-GGUF's layout ({qtype}): load it with ComfyUI-GGUF's "
          "`Unet Loader (GGUF)`, or with diffusers' `from_single_file(..., quantization_config="
          "GGUFQuantizationConfig(compute_dtype=torch.bfloat16))` on the family's transformer class.")


class GGUFCodec(QuantCodec):
    container = "gguf"
    extension = ".gguf"
    layout = "gguf"
    keep_dtype = "float32"  # every output tensor reaches the writer in float32; the writer picks its stored type
    spans = True  # the writer stores float32 spans natively (gguf_blocks.native_quantizer)

    def __init__(self, name: str, qtype: str):
        self.name, self.qtype = name, qtype
        self.describe = f"GGUF {qtype} (ComfyUI-GGUF's names and keep-high-precision rules)"
        self.loader = LOADER.format(qtype=qtype)

    def quantizes(self, component: str, key: str, shape: tuple[int, ...], main: bool) -> bool:
        return False  # the writer quantizes (stored_type), not the router's encode

    def open_writer(self, path: Path, planned: dict[str, Any], metadata: dict[str, str], rules: dict[str, Any],
                    sources: dict[str, str]) -> Any:
        """The file's writer: each planned tensor's stored type from model a's dtype of it (`sources`)."""
        from hubmix.formats.quant.gguf_write import GGUFWriter, stored_type

        tensors = [stored_type(rules, k, p.shape, sources.get(k, "float32"), self.name)
                   for k, p in sorted(planned.items())]
        return GGUFWriter(path, rules["architecture"], self.name, tensors, metadata)


for _name, _qtype in GGUF_DTYPES.items():
    register_codec(GGUFCodec(_name, _qtype))
