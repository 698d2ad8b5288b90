"""Facts about weight files that the model loader and the LoRA reader share.

Only safetensors is ever read: pickle formats can run code when loaded, so they are refused
by name before a byte is read (DESIGN.md 6).
"""

from __future__ import annotations

PICKLE_SUFFIXES: frozenset[str] = frozenset({".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle"})
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit; SDXL's header is ~250 KB
# Bytes per element of each safetensors dtype name, to check a header's offsets against its shapes.
SAFETENSORS_DTYPE_BYTES: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}
