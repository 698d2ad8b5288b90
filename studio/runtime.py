"""Which device and dtype the pipeline runs in, resolved from the settings when asked."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from studio.errors import SettingsError
from studio.choices import Device, Precision

_DTYPES = {Precision.FP32: torch.float32, Precision.BF16: torch.bfloat16, Precision.FP16: torch.float16}


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    dtype: torch.dtype

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


def resolve_runtime(device: Device | str, precision: Precision | str) -> Runtime:
    """auto: CUDA when present. Precision auto: fp16 on CUDA, bf16 on CPU (CPU fp16 matmul is ~250x slower)."""
    device, precision = Device(device), Precision(precision)
    if device is Device.AUTO:
        device = Device.CUDA if torch.cuda.is_available() else Device.CPU
    if device is Device.CUDA and not torch.cuda.is_available():
        raise SettingsError("`device` is cuda, but no CUDA GPU is available; choose auto or cpu")
    if precision is Precision.AUTO:
        precision = Precision.FP16 if device is Device.CUDA else Precision.BF16
    if device is Device.CPU and precision is Precision.FP16:
        raise SettingsError("`precision` fp16 on the CPU runs ~250x slower than bf16; choose bf16 or fp32")
    return Runtime(torch.device(device.value), _DTYPES[precision])
