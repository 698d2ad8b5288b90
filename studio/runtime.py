"""Which device and dtype the pipeline runs in, and why, resolved from the settings when asked."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from studio.choices import Device, Precision
from studio.cpu_probe import choose_cpu_precision
from studio.errors import SettingsError

_DTYPES = {Precision.FP32: torch.float32, Precision.BF16: torch.bfloat16, Precision.FP16: torch.float16}


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    dtype: torch.dtype
    reason: str = ""  # why this dtype, for the model line and the report: "fp32: no native bf16 on this CPU ..."

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


def resolve_runtime(device: Device | str, precision: Precision | str, cache_dir: Path | None = None) -> Runtime:
    """auto: CUDA when present. Precision auto: fp16 on CUDA; on the CPU bf16 only where the CPU has native
    bf16 and a short probe confirms it (studio.cpu_probe, cached in `cache_dir`), else fp32; never fp16."""
    device, precision = Device(device), Precision(precision)
    if device is Device.AUTO:
        device = Device.CUDA if torch.cuda.is_available() else Device.CPU
    if device is Device.CUDA and not torch.cuda.is_available():
        raise SettingsError("`device` is cuda, but no CUDA GPU is available; choose auto or cpu")
    if device is Device.CPU and precision is Precision.FP16:
        raise SettingsError("`precision` fp16 on the CPU runs ~250x slower than fp32 (CPUs have no fast fp16 "
                            "matrix kernels); choose auto, fp32, or bf16 where the CPU has native bf16")
    if precision is not Precision.AUTO:
        reason = f"{precision.value}: asked for (precision = {precision.value})"
    elif device is Device.CUDA:
        precision, reason = Precision.FP16, "fp16: auto on CUDA"
    else:
        choice = choose_cpu_precision(cache_dir)
        precision, reason = (Precision.BF16 if choice.bf16 else Precision.FP32), choice.reason
    return Runtime(torch.device(device.value), _DTYPES[precision], reason)
