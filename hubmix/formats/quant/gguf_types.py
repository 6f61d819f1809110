"""GGUF's tensor types and hubmix's GGUF output dtypes, as data (no numpy, no torch: headers are read without them).

The table is ggml's (`gguf.GGML_QUANT_SIZES`, which a test compares it with): type name -> (id, elements per block,
bytes per block). `DEQUANTIZED` are the types the `gguf` package dequantizes, which hubmix therefore reads.
"""

from __future__ import annotations

GGML_TYPES: dict[str, tuple[int, int, int]] = {
    "F32": (0, 1, 4), "F16": (1, 1, 2), "Q4_0": (2, 32, 18), "Q4_1": (3, 32, 20), "Q5_0": (6, 32, 22),
    "Q5_1": (7, 32, 24), "Q8_0": (8, 32, 34), "Q8_1": (9, 32, 40), "Q2_K": (10, 256, 84), "Q3_K": (11, 256, 110),
    "Q4_K": (12, 256, 144), "Q5_K": (13, 256, 176), "Q6_K": (14, 256, 210), "Q8_K": (15, 256, 292),
    "IQ2_XXS": (16, 256, 66), "IQ2_XS": (17, 256, 74), "IQ3_XXS": (18, 256, 98), "IQ1_S": (19, 256, 50),
    "IQ4_NL": (20, 32, 18), "IQ3_S": (21, 256, 110), "IQ2_S": (22, 256, 82), "IQ4_XS": (23, 256, 136),
    "I8": (24, 1, 1), "I16": (25, 1, 2), "I32": (26, 1, 4), "I64": (27, 1, 8), "F64": (28, 1, 8),
    "IQ1_M": (29, 256, 56), "BF16": (30, 1, 2), "TQ1_0": (34, 256, 54), "TQ2_0": (35, 256, 66),
    "MXFP4": (39, 32, 17), "NVFP4": (40, 64, 36), "Q1_0": (41, 128, 18),
}
BY_ID = {v[0]: k for k, v in GGML_TYPES.items()}
DEQUANTIZED = frozenset({"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K",
                         "Q5_K", "Q6_K", "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ4_NL", "IQ3_S", "IQ2_S",
                         "IQ4_XS", "IQ1_M", "TQ1_0", "TQ2_0", "MXFP4", "NVFP4"})
PLAIN = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}  # stored as they are: viewed, not dequantized

# --dtype -> the GGUF type of the tensors that are quantized (the others follow the converter's rules)
GGUF_DTYPES = {"gguf-q8_0": "Q8_0", "gguf-q6_k": "Q6_K", "gguf-q5_k": "Q5_K", "gguf-q5_0": "Q5_0",
               "gguf-q4_k": "Q4_K", "gguf-q4_0": "Q4_0", "gguf-bf16": "BF16", "gguf-f16": "F16"}


def type_id(name: str) -> int:
    return GGML_TYPES[name][0]


def block_size(name: str) -> int:
    return GGML_TYPES[name][1]


def type_nbytes(name: str, numel: int) -> int:
    """Bytes of `numel` elements of a type (a whole number of blocks)."""
    _, bs, ts = GGML_TYPES[name]
    return numel // bs * ts
