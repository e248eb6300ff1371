"""The FP8 E4M3 GEMM (issue 21): FP8 codes in, FP32 accumulation, the quantized GEMMs' shared epilogue.

An FP8 GEMM reads activation codes (one scale per tensor) and weight codes (one scale per output channel), both
float8_e4m3fn as quant.quantizer writes them, and accumulates their products in float32. An E4M3 value has four
significant bits, so each product is exact in float32; only the sum rounds, in whatever order a library adds.
Then the epilogue of every quantized GEMM (plugins.int8_linear.quantized_epilogue_reference): the accumulator times
a_scale * w_scale, + bias, GELU, + residual, and the output in FP or as the next GEMM's codes (FP8 ones in an FP8
build). `fp8_linear_reference` is the definition (any device); `fp8_scaled_mm` is the same function on Hopper's
FP8 tensor cores through torch._scaled_mm, with unit scales so that it returns the float32 accumulator itself and
the epilogue is exactly the reference's.
"""
from __future__ import annotations

import torch

from plugins.int8_linear import quantized_epilogue_reference
from quant.formats import FP8_E4M3, QuantFormat

MIN_CAPABILITY = (8, 9)  # FP8 tensor cores: Ada (8.9) and Hopper (9.0) on


def fp8_matmul(a_q: torch.Tensor, w_q: torch.Tensor) -> torch.Tensor:
    """a_q @ w_q.T of FP8 codes, accumulated in float32 (exact products; TF32 would round them, so it is off for
    this product whatever the global setting)."""
    a, w = a_q.float(), w_q.float()
    if not a.is_cuda:
        return a @ w.t()
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        return a @ w.t()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


def _check(a_q: torch.Tensor, w_q: torch.Tensor) -> None:
    if a_q.dtype != FP8_E4M3.dtype or w_q.dtype != FP8_E4M3.dtype:
        raise ValueError(f"fp8 GEMM: codes must be {FP8_E4M3.dtype}, got {a_q.dtype} and {w_q.dtype}")


def fp8_linear_reference(a_q: torch.Tensor, w_q: torch.Tensor, a_scale: float, w_scale: torch.Tensor,
                         bias: torch.Tensor, *, residual: torch.Tensor | None = None,
                         residual_scale: float | torch.Tensor | None = None, gelu: bool = False,
                         out_recip: float | torch.Tensor | None = None, out_format: QuantFormat = FP8_E4M3,
                         out_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """The definition of an FP8 GEMM's output: float32 accumulation of the code products, then the shared
    epilogue (module docstring); codes in `out_format` where `out_recip` is given."""
    _check(a_q, w_q)
    return quantized_epilogue_reference(fp8_matmul(a_q, w_q), a_scale, w_scale, bias, residual=residual,
                                        residual_scale=residual_scale, gelu=gelu, out_recip=out_recip,
                                        out_format=out_format, out_dtype=out_dtype)


def scaled_mm_supports(n: int, k: int) -> bool:
    """torch._scaled_mm's shape rule: the reduction and output widths multiples of 16."""
    return n % 16 == 0 and k % 16 == 0


def scaled_mm_available() -> bool:
    """Whether this process can run torch._scaled_mm's FP8 GEMM: CUDA with compute capability 8.9 or later."""
    return torch.cuda.is_available() and hasattr(torch, "_scaled_mm") and \
        torch.cuda.get_device_capability() >= MIN_CAPABILITY


def fp8_scaled_mm(a_q: torch.Tensor, w_q: torch.Tensor, a_scale: float, w_scale: torch.Tensor, bias: torch.Tensor,
                  *, out_format: QuantFormat = FP8_E4M3, **epilogue) -> torch.Tensor:
    """fp8_linear_reference's function with the accumulator from cuBLASLt's FP8 GEMM (torch._scaled_mm, unit
    scales, float32 out), then the reference epilogue: _scaled_mm's own per-channel scaling and bias would round
    in another order (and its row-wise scales want a bfloat16 output), so the epilogue stays exact."""
    _check(a_q, w_q)
    one = torch.ones((), dtype=torch.float32, device=a_q.device)
    acc = torch._scaled_mm(a_q.contiguous(), w_q.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
    return quantized_epilogue_reference(acc, a_scale, w_scale, bias, out_format=out_format, **epilogue)
