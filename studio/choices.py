"""Every choice a user or caller makes, as a `str` Enum, defined once.

Settings, the memory engine and the LoRA patcher all read these; a value is spelled the
same in settings.toml, on the CLI, in reports and in the code.
"""

from __future__ import annotations

from enum import StrEnum


class Device(StrEnum):
    AUTO = "auto"  # CUDA when present
    CPU = "cpu"
    CUDA = "cuda"


class Precision(StrEnum):
    AUTO = "auto"  # fp16 on CUDA; on the CPU bf16 only with native bf16 a probe confirms, else fp32 (studio.cpu_probe)
    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"


class LoraMode(StrEnum):
    MERGED = "merged"  # full inference speed; weights rewritten on a switch
    SIDECAR = "sidecar"  # instant switch; the LoRA is computed in forward
    AUTO = "auto"  # merged, except layers the memory engine forbids merging into (fp8, streamed)


class MemoryMode(StrEnum):
    AUTO = "auto"  # picked from the budgets
    FULL = "full"  # everything on the GPU
    OFFLOAD = "offload"  # components move to the GPU for their phase
    STREAM = "stream"  # UNet layers stream from pinned RAM, N layers ahead


class StreamImpl(StrEnum):
    """How stream mode moves the UNet (the benchmark compares them)."""

    RING = "ring"  # ours: bounded N-lookahead ring (studio.models.stream)
    DIFFUSERS_LEAF = "diffusers_leaf"  # diffusers group offloading, leaf level, lookahead 1
    DIFFUSERS_BLOCK = "diffusers_block"  # diffusers group offloading, one block a group


def allowed(enum: type[StrEnum]) -> str:
    """"a, b, c" for messages."""
    return ", ".join(member.value for member in enum)
