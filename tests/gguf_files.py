"""GGUF test inputs built with the `gguf` package's own writer (the reference), from tiny zoo models."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def bare_main(single: Path, prefix: str = "model.diffusion_model.") -> dict[str, np.ndarray]:
    """The denoiser's tensors of an all-in-one single file, without the prefix, as float32 numpy."""
    from safetensors.numpy import load_file

    sd = load_file(str(single))
    return {k[len(prefix):]: v.astype(np.float32) for k, v in sd.items() if k.startswith(prefix)}


def write_gguf(path: Path, arch: str, tensors: dict[str, np.ndarray], qtype: str = "Q8_0",
               types: dict[str, str] | None = None, orig: dict[str, tuple[int, ...]] | None = None) -> Path:
    """A GGUF file as ComfyUI-GGUF's converter writes it, through gguf.GGUFWriter: 2-D tensors of more than 1024
    elements with whole-block rows in `qtype` (quantized by gguf.quants, or by hubmix for K-quants, which the
    package cannot), the rest F32; `types` overrides per key; `orig` stores tensors reshaped with their shape."""
    import gguf

    from hubmix.formats.quant.gguf_blocks import quantize

    w = gguf.GGUFWriter(str(path), arch)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, a in tensors.items():
        if orig and key in orig:
            w.add_array(f"comfy.gguf.orig_shape.{key}", [int(d) for d in orig[key]])
        t = (types or {}).get(key)
        if t is None:
            bs = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]][0]
            t = qtype if a.ndim == 2 and a.size > 1024 and a.shape[-1] % bs == 0 else "F32"
        gt = gguf.GGMLQuantizationType[t]
        if t in ("Q4_K", "Q5_K", "Q6_K"):
            _, ts = gguf.GGML_QUANT_SIZES[gt]
            data = quantize(a.reshape(-1), t).reshape(*a.shape[:-1], a.shape[-1] // 256 * ts)
        else:
            data = gguf.quants.quantize(a, gt)
        w.add_tensor(key, data, raw_dtype=gt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def read_reference(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF file dequantized by the gguf package, in the shape ComfyUI-GGUF's loader gives it
    (the orig_shape entry where there is one)."""
    import gguf

    r = gguf.GGUFReader(str(path))
    out = {}
    for t in r.tensors:
        field = r.get_field(f"comfy.gguf.orig_shape.{t.name}")
        shape = ([int(field.parts[i][0]) for i in field.data] if field is not None
                 else [int(d) for d in reversed(t.shape)])
        out[t.name] = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
    return out


def types_of(path: Path) -> dict[str, str]:
    import gguf

    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
