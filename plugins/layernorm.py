"""LayerNorm over the last dimension that can also write the INT8 (or FP8 E4M3) codes of its output in the same pass.

Under --int8 a LayerNorm's output is both the residual stream and the next GEMM's input: one read of x gives
the x.dtype output and the codes. -iln rounds the output to INT8 where it is produced, so `codes_only` writes the
codes alone: the engine's residual stream is then the codes themselves, which the next GEMMs read as input and
as residual (plugins/int8_linear.py), 1 byte a value where an FP16 stream beside the codes took 3. Where an FP
consumer needs the rounded value itself (the QA head after the last LayerNorm), `round_scale` writes it, the
codes dequantized, in the same pass.

The math (layernorm_quant_reference defines it), per row of H values, statistics in float32:

    mean = sum(x) / H
    var  = sum((x - mean)**2) / H                    biased, as torch.nn.functional.layer_norm
    y    = (x - mean) * (1 / sqrt(var + eps)) * weight + bias      float32
    out  = y.to(x.dtype)
    codes = clamp(round_half_even(float32(out) * out_recip), -127, 127)
          (--fp8: E4M3's codes, float32(out) * out_recip saturated at +-448 and rounded to nearest even)

`out_recip` (and -iln's `round_scale`) is one float32 number, or a float32 vector [H], one per channel, for sites
calibrated with smoothing (quant/smoothing.py).

The codes are taken from the x.dtype-rounded output, not from the float32 y: that is what the engine's
separate `quantize(layer_norm(x))` on its FP16 tensor gives, so fusing changes nothing downstream, and the
codes always agree with the output tensor the residual stream carries. The kernel runs without FP contraction
(enable_fp_fusion=False), like the reference's separate ops, but its sums run in another order than torch's:
an output may differ from the reference in the last bit, and then a code by 1.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from plugins import common
from plugins.common import await_inputs, codes, codes_reference, sum_op
from quant.formats import INT8, QuantFormat


@triton.jit
def _store(ptrs, values, mask, EVEN: tl.constexpr):
    if EVEN:
        tl.store(ptrs, values)
    else:
        tl.store(ptrs, values, mask=mask)


@triton.jit
def _layernorm_kernel(x_ptr, w_ptr, b_ptr, y_ptr, q_ptr, R, H, eps, out_recip, out_scale,
                      stride_x, stride_y, stride_q,
                      QUANT: tl.constexpr, ROUND: tl.constexpr, PER_CHANNEL: tl.constexpr, ROWS: tl.constexpr,
                      BLOCK_H: tl.constexpr, PDL: tl.constexpr, STORE_Y: tl.constexpr, EVEN: tl.constexpr,
                      FORMAT: tl.constexpr):
    # QUANT: write FORMAT's codes ("int8" or "fp8_e4m3", plugins.common.codes) of the output too.
    # PER_CHANNEL: out_recip and out_scale are pointers to [H] float32 vectors, else float32 scalars.
    # ROWS rows per program, a whole row (H <= BLOCK_H) in registers: one read of x, one write per output.
    # EVEN: H == BLOCK_H and ROWS divides R, so no element needs a mask: the kernel is bound by instruction
    # issue more than by memory (28 SASS instructions a value at 4 rows x 1024, 27 without masks; BERT-large
    # 128 x 384 on an H200: 55.2 -> 53.6 us, BENCHMARKS.md call T7).
    await_inputs(PDL)
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_H)
    row_ok = rows < R
    col_ok = cols < H
    mask = row_ok[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    if EVEN:
        x = tl.load(x_ptr + rows64 * stride_x + cols[None, :]).to(tl.float32)
    else:
        x = tl.load(x_ptr + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    # IEEE-rounded division and square root (a plain `/` or tl.sqrt may lower to approximate instructions);
    # they run once per row, so exactness costs nothing.
    h = H * 1.0
    mean = tl.div_rn(tl.reduce(x, 1, sum_op), h)
    d = x - mean[:, None] if EVEN else tl.where(mask, x - mean[:, None], 0.0)
    var = tl.div_rn(tl.reduce(d * d, 1, sum_op), h)
    rstd = tl.div_rn(tl.full((ROWS,), 1.0, tl.float32), tl.sqrt_rn(var + eps))
    if EVEN:
        w = tl.load(w_ptr + cols).to(tl.float32)
        b = tl.load(b_ptr + cols).to(tl.float32)
    else:
        w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    y = (d * rstd[:, None] * w[None, :] + b[None, :]).to(x_ptr.dtype.element_ty)  # y_ptr is q_ptr without STORE_Y
    if QUANT:
        if PER_CHANNEL:
            recip = tl.load(out_recip + cols, mask=col_ok, other=0.0)[None, :]
        else:
            recip = out_recip
        q = codes(y.to(tl.float32), recip, FORMAT)
        _store(q_ptr + rows64 * stride_q + cols[None, :], q, mask, EVEN)
        if ROUND:  # -iln: the output itself is the quantized value, dequantized
            if PER_CHANNEL:
                scale = tl.load(out_scale + cols, mask=col_ok, other=0.0)[None, :]
            else:
                scale = out_scale
            y = (q.to(tl.float32) * scale).to(y_ptr.dtype.element_ty)
    if STORE_Y:
        _store(y_ptr + rows64 * stride_y + cols[None, :], y, mask, EVEN)


def _rows_per_program(h: int) -> int:
    # about 4K elements per program: several rows for BERT-base/MiniLM widths, fewer programs to schedule
    return max(1, min(16, 4096 // triton.next_power_of_2(h)))


# Up to this many rows (batch 1 x 128 tokens and the like) each program takes one row with 8 warps: more programs
# for the SMs where there are few rows. At BERT-large 1 x 128 on an H200 that took the kernel from 7.2 to 6.4 us
# (49 calls per forward); at 128 x 384 the default was within 3% of the best launch (BENCHMARKS.md, call Q4).
FEW_ROWS = 1024


def default_launch(r: int, h: int) -> tuple[int, int]:
    """Default (rows per program, warps) for r rows of width h."""
    return (1, 8) if r <= FEW_ROWS else (_rows_per_program(h), 4)


def _check_outputs(out_recip, round_scale, codes_only: bool) -> None:
    if round_scale is not None and out_recip is None:
        raise ValueError("layernorm_quant: round_scale needs out_recip")
    if codes_only and (out_recip is None or round_scale is not None):
        raise ValueError("layernorm_quant: codes_only needs out_recip and writes no FP output to round")


def layernorm_quant(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                    out_recip: float | torch.Tensor | None = None,
                    round_scale: float | torch.Tensor | None = None, *, codes_only: bool = False,
                    rows_per_program: int | None = None, num_warps: int | None = None,
                    fmt: QuantFormat = INT8) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """LayerNorm of x [..., H] (float16/bfloat16/float32) -> (y in x.dtype, `fmt`'s codes of y or None: int8, or
    float8_e4m3fn with fmt FP8_E4M3).

    Codes are written only when `out_recip` (float32 reciprocal of the output scale) is given; they are the
    codes of y as rounded to x.dtype (module docstring). With `round_scale` (the scale itself; needs
    out_recip), y is returned as those codes dequantized, in the same pass (-iln's last LayerNorm, for the QA head).
    Both are Python floats, or both contiguous float32 [H] tensors on x's device (per channel). `codes_only`
    (needs out_recip, not round_scale): write the codes alone and return (None, codes).
    Outputs are contiguous, shaped like x. `rows_per_program` and `num_warps` (powers of two; defaults by
    default_launch) are launch parameters (benchmarks/device_layernorm_explore times them), not math: the sums'
    order follows them, so an output may move by its last bit.
    """
    _check_outputs(out_recip, round_scale, codes_only)
    h = x.shape[-1]
    per_channel = isinstance(out_recip, torch.Tensor)
    for name, v in (("out_recip", out_recip), ("round_scale", round_scale)):
        if v is not None and isinstance(v, torch.Tensor) != per_channel:
            raise ValueError("layernorm_quant: out_recip and round_scale must both be floats or both tensors")
        if isinstance(v, torch.Tensor) and (v.shape != (h,) or v.dtype != torch.float32 or not v.is_contiguous()
                                            or v.device != x.device):
            raise ValueError(f"layernorm_quant: {name} must be a contiguous float32 [{h}] on {x.device}, got "
                             f"{v.dtype} {tuple(v.shape)} on {v.device}")
    if not x.dtype.is_floating_point or weight.shape != (h,) or bias.shape != (h,):
        raise ValueError(f"layernorm_quant: x must be floating [..., H] with weight and bias [H], got x "
                         f"{x.dtype} {tuple(x.shape)}, weight {tuple(weight.shape)}, bias {tuple(bias.shape)}")
    if h > 16384:
        raise ValueError(f"layernorm_quant: H = {h} exceeds the one-pass kernel's 16384")
    rows = x.reshape(-1, h)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    r = rows.shape[0]
    y = None if codes_only else common.empty(x.shape, x.dtype, x.device)
    common.kernel_format(out_recip, fmt)  # a format the kernels write
    q = common.empty(x.shape, fmt.dtype, x.device) if out_recip is not None else None
    if r == 0 or h == 0:
        return y, q
    per, warps = default_launch(r, h)
    per, num_warps = rows_per_program or per, num_warps or warps
    if per < 1 or num_warps < 1 or per & (per - 1) or num_warps & (num_warps - 1):
        raise ValueError(f"layernorm_quant: rows_per_program and num_warps must be powers of two, got {per}, "
                         f"{num_warps}")
    q2 = q.view(r, h) if q is not None else y.view(r, h)
    y2 = y.view(r, h) if y is not None else q2  # codes_only: y2 is never written
    if per_channel:
        recip, scale = out_recip, round_scale if round_scale is not None else out_recip  # unread without ROUND
    else:
        recip = float(out_recip) if out_recip is not None else 1.0
        scale = float(round_scale) if round_scale is not None else 1.0
    use_pdl = common.pdl(x.device)
    _layernorm_kernel[(triton.cdiv(r, per),)](
        rows, weight.contiguous(), bias.contiguous(), y2, q2, r, h, float(eps), recip, scale,
        rows.stride(0), y2.stride(0), q2.stride(0),
        QUANT=out_recip is not None, ROUND=round_scale is not None, STORE_Y=not codes_only,
        PER_CHANNEL=per_channel, ROWS=per, EVEN=h == triton.next_power_of_2(h) and r % per == 0,
        BLOCK_H=triton.next_power_of_2(h), num_warps=num_warps, enable_fp_fusion=False, PDL=use_pdl,
        launch_pdl=use_pdl, FORMAT=fmt.name)
    return y, q


def layernorm_quant_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                              out_recip: float | torch.Tensor | None = None,
                              round_scale: float | torch.Tensor | None = None, *, codes_only: bool = False,
                              fmt: QuantFormat = INT8) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The definition of layernorm_quant's outputs in plain float32 torch ops (module docstring); codes in
    `fmt`."""
    _check_outputs(out_recip, round_scale, codes_only)
    xf = x.float()
    mean = xf.mean(dim=-1, keepdim=True)
    d = xf - mean
    var = (d * d).mean(dim=-1, keepdim=True)
    y = (d * (1.0 / torch.sqrt(var + eps)) * weight.float() + bias.float()).to(x.dtype)
    if out_recip is None:
        return y, None
    q = codes_reference(y, out_recip, fmt)
    if codes_only:
        return None, q
    if round_scale is not None:
        scale = round_scale if isinstance(round_scale, torch.Tensor) else float(round_scale)
        y = (q.float() * scale).to(x.dtype)  # = quant.quantizer.dequantize(q, scale, x.dtype)
    return y, q
