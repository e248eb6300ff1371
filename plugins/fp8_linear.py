"""The FP8 E4M3 GEMM (issue 21): FP8 codes in, FP32 accumulation, the quantized GEMMs' shared epilogue.

An FP8 GEMM reads activation codes (one scale per tensor) and weight codes (one scale per output channel), both
float8_e4m3fn as quant.quantizer writes them, and accumulates their products in float32. An E4M3 value has four
significant bits, so each product is exact in float32; only the sum rounds, in whatever order a library adds.
Then the epilogue of every quantized GEMM (plugins.int8_linear.quantized_epilogue_reference): the accumulator times
a_scale * w_scale, + bias, GELU, + residual, and the output in FP or as the next GEMM's codes (FP8 ones in an FP8
build). `fp8_linear_reference` is the definition (any device). Two implementations on FP8 tensor cores:

- `fp8_linear`: our Triton GEMM (plugins/int8_linear.py's kernels, their tiles and loads, with E4M3 operands and
  float32 sums) with the whole epilogue fused: one kernel from codes in to codes (or FP16) out, as the INT8
  builds' GEMMs. Its output codes are E4M3's (or INT8's) round to nearest even of the float32 value, as the
  reference's cast; its sums run in another order than the reference's, so an output may differ in the last
  bits and a code by one step where the float32 value sits at a rounding boundary (engines.tuning.agrees).
- `fp8_scaled_mm`: cuBLASLt's FP8 GEMM through torch._scaled_mm, with unit scales so that it returns the float32
  accumulator itself, then the reference epilogue in separate torch ops.
"""
from __future__ import annotations

import torch

from plugins.int8_linear import GemmConfig, quantized_epilogue_reference, quantized_linear
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


def fp8_linear(a_q: torch.Tensor, w_q: torch.Tensor, a_scale: float, w_scale: torch.Tensor, bias: torch.Tensor, *,
               residual: torch.Tensor | None = None, residual_scale: float | torch.Tensor | None = None,
               gelu: bool = False, out_recip: float | torch.Tensor | None = None,
               out_format: QuantFormat = FP8_E4M3, out_dtype: torch.dtype = torch.float16,
               config: GemmConfig | None = None) -> torch.Tensor:
    """fp8_linear_reference's function in one Triton kernel: a_q float8_e4m3fn [M, K] (per-tensor `a_scale`) times
    w_q float8_e4m3fn [N, K] (per-row `w_scale` float32 [N]), + float32 `bias` [N], [GELU], [+ residual: FP, or
    codes (INT8, or E4M3: --fp8 -iln's residual stream) with their `residual_scale`], out as `out_format`'s codes
    (E4M3 or INT8) where `out_recip` (a float32 number or a contiguous float32 [N]) is given, else `out_dtype`.
    `config` picks the tiles and loads (plugins.int8_linear.GemmConfig; default_config when None). CUDA with
    compute capability 8.9 or later (fp8_kernels_available), or Triton's interpreter."""
    return quantized_linear(FP8_E4M3, a_q, w_q, a_scale, w_scale, bias, residual=residual,
                            residual_scale=residual_scale, gelu=gelu, out_recip=out_recip, out_format=out_format,
                            out_dtype=out_dtype, config=config)


def fp8_kernels_available() -> bool:
    """Whether our Triton kernels can read and write FP8 E4M3 here: a CUDA GPU of compute capability 8.9 or
    later (Triton has no E4M3 type below it)."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= MIN_CAPABILITY


def scaled_mm_supports(n: int, k: int) -> bool:
    """torch._scaled_mm's shape rule: the reduction and output widths multiples of 16."""
    return n % 16 == 0 and k % 16 == 0


def scaled_mm_available() -> bool:
    """Whether this process can run torch._scaled_mm's FP8 GEMM: CUDA with compute capability 8.9 or later."""
    return hasattr(torch, "_scaled_mm") and fp8_kernels_available()


def fp8_scaled_mm(a_q: torch.Tensor, w_q: torch.Tensor, a_scale: float, w_scale: torch.Tensor, bias: torch.Tensor,
                  *, out_format: QuantFormat = FP8_E4M3, **epilogue) -> torch.Tensor:
    """fp8_linear_reference's function with the accumulator from cuBLASLt's FP8 GEMM (torch._scaled_mm, unit
    scales, float32 out), then the reference epilogue: _scaled_mm's own per-channel scaling and bias would round
    in another order (and its row-wise scales want a bfloat16 output), so the epilogue stays exact."""
    _check(a_q, w_q)
    one = torch.ones((), dtype=torch.float32, device=a_q.device)
    acc = torch._scaled_mm(a_q.contiguous(), w_q.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
    return quantized_epilogue_reference(acc, a_scale, w_scale, bias, out_format=out_format, **epilogue)
