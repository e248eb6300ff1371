"""Quantization formats as data: what a code is, its largest magnitude, and how a scaled value becomes one.

A site's format says how its tensor is stored between kernels. INT8 is symmetric with zero point 0, codes in
[-127, 127], rounded half to even (TensorRT's INT8). FP8 E4M3 (Hopper's tensor cores, the FP8 issue's format)
stores the scaled value in float8_e4m3fn, saturated at +-448 and rounded to nearest even by the cast. A new format
is one `register_format` call here plus the kernels that read and write it; quant.quantizer, the fake-quant
reference, the engine header and calibration all take it from this registry.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from common.errors import WorkbenchError


@dataclass(frozen=True)
class QuantFormat:
    """`qmax`: the largest code magnitude (scale = amax / qmax). `integer`: codes are whole numbers (round half
    to even, then clamp); otherwise the saturated scaled value is cast to `dtype`, which rounds it."""

    name: str
    dtype: torch.dtype
    qmax: float
    integer: bool

    def codes(self, scaled: torch.Tensor) -> torch.Tensor:
        """float32 x / scale -> codes of this format."""
        clamped = torch.clamp(torch.round(scaled) if self.integer else scaled, -self.qmax, self.qmax)
        return clamped.to(self.dtype)

    def __str__(self) -> str:
        return self.name


_FORMATS: dict[str, QuantFormat] = {}


def register_format(fmt: QuantFormat) -> QuantFormat:
    _FORMATS[fmt.name] = fmt
    return fmt


def unregister_format(name: str) -> None:
    """Remove a format (tests register toy ones)."""
    _FORMATS.pop(name, None)


def get_format(name: str) -> QuantFormat:
    try:
        return _FORMATS[name]
    except KeyError:
        raise WorkbenchError(f"unknown quantization format {name!r} (this workbench knows "
                             f"{', '.join(sorted(_FORMATS))})") from None


def formats() -> tuple[str, ...]:
    return tuple(sorted(_FORMATS))


INT8 = register_format(QuantFormat("int8", torch.int8, 127, integer=True))
FP8_E4M3 = register_format(QuantFormat("fp8_e4m3", torch.float8_e4m3fn, 448.0, integer=False))
