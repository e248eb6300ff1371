"""What the kernels share: the rounding steps to INT8 and FP8 E4M3 codes (device side) and their PyTorch twin,
output allocation."""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from quant.formats import FP8_E4M3, INT8, QuantFormat
from quant.quantizer import reciprocal
from plugins import interpreted

# Tests set this to fill every output with a value no kernel writes (int8 -128, float NaN) before the launch,
# so an element a kernel forgot to store cannot pass for a stale copy of the right answer.
POISON = False


def empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if POISON:
        return torch.full(shape, -128 if dtype == torch.int8 else float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


# Programmatic dependent launch (Hopper and later): a kernel launched with it may start while the kernel before it
# in the stream is still running; it waits (griddepcontrol.wait) for that kernel to finish, and for its writes to
# be visible, before reading any input or writing anything, so the math and the memory order are those of plain
# stream order. What it saves is the launch and ramp-up gap between dependent kernels, which at batch 1 (about
# 170 short kernels per BERT-large forward) is a large share of the time. BERTQA_PDL=0 turns it off (for
# comparison runs); the interpreter and pre-Hopper GPUs never use it.
PDL_ENABLED = os.environ.get("BERTQA_PDL", "1").strip() not in ("0", "off", "false", "no")


@functools.lru_cache(maxsize=None)
def _pdl_capable(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device)[0] >= 9


def pdl(device: torch.device) -> bool:
    """Whether to launch kernels on `device` with programmatic dependent launch."""
    return PDL_ENABLED and device.type == "cuda" and not interpreted() and _pdl_capable(device)


@triton.jit
def await_inputs(PDL: tl.constexpr):
    """Under PDL: wait for the kernel before this one to finish (its writes visible), then let the next kernel
    launch; it waits in turn, so at most two kernels are ever resident and each sees everything before it.
    Every program of a kernel calls this before it touches any tensor a previous kernel may write or read."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


@triton.jit
def sum_op(a, b):
    # tl.reduce(x, axis, sum_op) is what tl.sum compiles to; tl.sum itself is a triton.language @jit function,
    # which the interpreter cannot run unless triton was imported in interpreter mode (plugins/__init__.py).
    return a + b


@triton.jit
def max_op(a, b):
    return tl.maximum(a, b)


def tma_ok(t: torch.Tensor) -> bool:
    """TMA's rules for a 2-D tensor with unit column stride: base address and row stride (in bytes) multiples of
    16. The kernels take their pointer path, with the same math, for tensors that break them (odd K, an unaligned
    view)."""
    return t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0


def out_recip(scale: float) -> float:
    """The float32 reciprocal of an output scale, as quant.quantizer.quantize multiplies by it."""
    return reciprocal(float(scale), torch.device("cpu"))


def codes_reference(y: torch.Tensor, recip: float | torch.Tensor, fmt: QuantFormat = INT8) -> torch.Tensor:
    """`fmt`'s codes of float32(y) * recip: INT8's clamp(round_half_even(.), -127, 127) as int8, or FP8's
    saturating cast.

    quant.quantizer.quantize(y, scale, fmt) is exactly this with recip = out_recip(scale) (a test holds them
    equal); the kernels take the reciprocal itself so that no division happens on the device.
    """
    return fmt.codes(y.float() * recip)


@triton.jit
def int8_codes(y, recip, CLAMP_LOW: tl.constexpr = True):
    """Device twin of codes_reference for an fp32 block `y` and an fp32 scalar `recip`. CLAMP_LOW=False leaves
    out the clamp at -127, for callers whose y * recip cannot fall below -127.5 (the clamp is a half-rate op).

    Rounding half to even, portably: tl.math has no rint that lowers everywhere (libdevice's rint is CUDA-only
    and does not run in the interpreter), and a float->int cast truncates. Adding 1.5 * 2**23 to an fp32 value
    with |y| < 2**22 lands in [2**23, 2**24), where the fp32 spacing is exactly 1, so the add itself rounds y to
    an integer c with the FPU's round-to-nearest-even. Clamping first keeps |y| <= 127 (the same result as
    clamping after rounding, since the bounds are integers). The sum's bit pattern is then 0x4B400000 + c, whose
    low byte is c in two's complement: the code is that byte, taken with integer ops. Converting the float back
    to an integer instead (cvt.rzi) runs on the GPU's quarter-rate conversion pipe, beside the tanh and the
    accumulator's int-to-float in a GEMM epilogue; this way costs one add and a truncation.
    """
    y = y * recip
    if CLAMP_LOW:
        y = tl.maximum(y, -127.0)
    y = tl.minimum(y, 127.0)
    return (y + 12582912.0).to(tl.int32, bitcast=True).to(tl.int8)


# The hardware's float32 -> E4M3 conversion (cvt.rn.satfinite.e4m3x2.f32 on sm_89 and later, what Triton emits for
# `.to(tl.float8e4nv)`) rounds to nearest even, as torch's cast (the reference) does. Triton's interpreter (the CPU
# tests) converts with its own bit arithmetic instead, which rounds ties away from zero and drops the carry when a
# mantissa rounds up into the exponent (-127.99 became -64 in a check): there the value is first rounded to E4M3's
# grid in float32 (round_to_e4m3), so the conversion has nothing left to round and the tests see the GPU's math.
_HW_FP8_CVT = tl.constexpr(not interpreted())


@triton.jit
def round_to_e4m3(y):
    """float32 y (|y| <= 448) rounded to the nearest E4M3 value, ties to even, still in float32. Normal range: a
    carry-propagating round of the bit pattern to 3 mantissa bits (add half an E4M3 step minus one, plus the kept
    lowest bit, then drop the 20 bits below: the float->bfloat16 trick at E4M3's width). Subnormal range: adding
    1.5 * 2**14, whose float32 spacing is E4M3's subnormal step 2**-9, rounds to it with the FPU's ties-to-even;
    the sign is put back, so a tiny negative value gives -0 as the hardware's conversion does."""
    bits = y.to(tl.int32, bitcast=True)
    normal = (bits + (0x7FFFF + ((bits >> 20) & 1))) & -1048576  # & 0xFFF00000
    # 2**-6 = 0.015625: E4M3's smallest normal value
    rounded = tl.where(tl.abs(y) < 0.015625, ((y + 24576.0) - 24576.0).to(tl.int32, bitcast=True), normal)
    return (rounded | ((bits >> 31) << 31)).to(tl.float32, bitcast=True)  # y's sign: a tiny negative y gives -0


@triton.jit
def fp8_codes(y, recip, CLAMP_LOW: tl.constexpr = True):
    """Device twin of codes_reference(y, recip, FP8_E4M3) for an fp32 block: y * recip saturated at +-448 (the
    clamp at -448 left out unless CLAMP_LOW, as int8_codes), then E4M3's round to nearest even."""
    y = tl.minimum(y * recip, 448.0)
    if CLAMP_LOW:
        y = tl.maximum(y, -448.0)
    if _HW_FP8_CVT:
        return y.to(tl.float8e4nv, fp_downcast_rounding="rtne")
    else:
        return round_to_e4m3(y).to(tl.float8e4nv)


@triton.jit
def codes(y, recip, FORMAT: tl.constexpr, CLAMP_LOW: tl.constexpr = True):
    """`FORMAT`'s codes of an fp32 block y times recip: "int8" (int8_codes) or "fp8_e4m3" (fp8_codes), the names
    of quant.formats' formats; the kernels take the format as this compile-time string."""
    if FORMAT == "fp8_e4m3":
        return fp8_codes(y, recip, CLAMP_LOW)
    else:
        return int8_codes(y, recip, CLAMP_LOW)


FP = "fp"  # a kernel's OUT_FORMAT when it writes values in its output's dtype, not codes
CODE_FORMATS = (INT8, FP8_E4M3)  # the code formats our kernels write


def kernel_format(recip, fmt: QuantFormat = INT8) -> str:
    """A kernel's OUT_FORMAT: `fmt`'s name where codes are written (an output reciprocal is given), else FP."""
    if recip is None:
        return FP
    if fmt not in CODE_FORMATS:
        raise ValueError(f"kernels write {' or '.join(f.name for f in CODE_FORMATS)} codes, not {fmt.name}")
    return fmt.name
