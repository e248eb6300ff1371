"""What the kernels share: the INT8 rounding step (device side) and its PyTorch twin, output allocation."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from calib.quantizer import QMAX, _reciprocal

# Tests set this to fill every output with a value no kernel writes (int8 -128, float NaN) before the launch,
# so an element a kernel forgot to store cannot pass for a stale copy of the right answer.
POISON = False


def empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if POISON:
        return torch.full(shape, -128 if dtype == torch.int8 else float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def out_recip(scale: float) -> float:
    """The float32 reciprocal of an output scale, as calib.quantizer.quantize multiplies by it."""
    return _reciprocal(float(scale), torch.device("cpu"))


def codes_reference(y: torch.Tensor, recip: float | torch.Tensor) -> torch.Tensor:
    """clamp(round_half_even(float32(y) * recip), -127, 127) as int8.

    calib.quantizer.quantize(y, scale) is exactly this with recip = out_recip(scale) (a test holds them equal);
    the kernels take the reciprocal itself so that no division happens on the device.
    """
    return torch.clamp(torch.round(y.float() * recip), -QMAX, QMAX).to(torch.int8)


@triton.jit
def int8_codes(y, recip):
    """Device twin of codes_reference for an fp32 block `y` and an fp32 scalar `recip`.

    Rounding half to even, portably: tl.math has no rint that lowers everywhere (libdevice's rint is CUDA-only
    and does not run in the interpreter), and a float->int cast truncates. Adding 1.5 * 2**23 to an fp32 value
    with |y| < 2**22 lands in [2**23, 2**24), where the fp32 spacing is exactly 1, so the add itself rounds y to
    an integer with the FPU's round-to-nearest-even; subtracting the constant back is exact. Clamping first keeps
    |y| <= 127 (and gives the same result as clamping after rounding, since the bounds are integers). Neither
    Triton nor LLVM reassociates floating-point adds by default, so the pair is not folded away.
    """
    y = y * recip
    y = tl.minimum(tl.maximum(y, -127.0), 127.0)
    y = (y + 12582912.0) - 12582912.0
    return y.to(tl.int8)
