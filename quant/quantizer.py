"""The one quantizer definition: symmetric, zero point 0, codes of a quant.formats format (INT8 by default:
[-127, 127], round half to even).

Codes are round(x * (1 / scale)): a multiplication is correctly rounded in every backend (eager CPU and CUDA,
Triton kernels from torch.compile), where a division may be approximated, so every path gets the same codes.

Activations: one scale per tensor (amax / qmax) from calibration or QAT. Weights: one scale per output channel
(row max |w| / qmax). Engines, QAT and the fake-quant reference all call these functions, so the quantized math
exists in one place.
"""
from __future__ import annotations

import numpy as np
import torch

from quant.formats import INT8, QuantFormat

QMAX = int(INT8.qmax)  # INT8's largest code, for the INT8-only calibrators and TensorRT's cache


def scale_from_amax(amax: torch.Tensor | float, fmt: QuantFormat = INT8) -> torch.Tensor:
    """amax / qmax in float32, with a zero range mapped to scale 1 (every value then quantizes to 0 exactly)."""
    amax = torch.as_tensor(amax, dtype=torch.float32)
    return torch.where(amax > 0, amax / fmt.qmax, torch.ones_like(amax))


def _on(scale: torch.Tensor | float, device: torch.device) -> torch.Tensor | float:
    """Python numbers stay numbers (no host-to-device copy, so CUDA-graph capture works); PyTorch applies them
    in float32 against a float32 tensor, exactly like a float32 scale tensor."""
    if isinstance(scale, (int, float)):
        return float(scale)
    return torch.as_tensor(scale, dtype=torch.float32, device=device)


def reciprocal(scale: torch.Tensor | float, device: torch.device) -> torch.Tensor | float:
    """1 / scale rounded to float32 (a Python float is rounded to float32 first, as a float32 tensor would be)."""
    if isinstance(scale, (int, float)):
        return float(np.float32(1.0) / np.float32(scale))
    return 1.0 / torch.as_tensor(scale, dtype=torch.float32, device=device)


def quantize(x: torch.Tensor, scale: torch.Tensor | float, fmt: QuantFormat = INT8) -> torch.Tensor:
    """x -> codes; `scale` is a scalar or broadcasts against x (per-channel scales along dim 0)."""
    return fmt.codes(x.float() * reciprocal(scale, x.device))


def dequantize(q: torch.Tensor, scale: torch.Tensor | float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.float() * _on(scale, q.device)).to(dtype)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor | float, fmt: QuantFormat = INT8) -> torch.Tensor:
    """quantize then dequantize, in x's dtype: what a quantized kernel's input looks like to FP math."""
    return dequantize(quantize(x, scale, fmt), scale, x.dtype)


def weight_scales(w: torch.Tensor, fmt: QuantFormat = INT8) -> torch.Tensor:
    """Per-output-channel scales [out, 1] of a Linear weight [out, in]."""
    return scale_from_amax(w.detach().abs().amax(dim=1, keepdim=True).float(), fmt)
