"""INT8 (or FP8 E4M3) codes of a strided tensor, written contiguously: quantize and "make contiguous" in one pass.

The attention context leaves SDPA as [B, heads, S, D] and the next GEMM wants [B*S, heads*D] rows; the engine's
`transpose(1, 2).reshape(...)` copies it in FP16 and then quantizes that copy. quantize_rows reads the
transposed view directly and writes its codes in the view's logical (row-major) order.

codes = clamp(round_half_even(float32(x) * recip), -127, 127), as quant.quantizer.quantize (recip is the
float32 reciprocal of the scale); FP8 E4M3's: float32(x) * recip saturated at +-448, rounded to nearest even. No
arithmetic beyond that one product, so codes equal the reference exactly.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from plugins import common
from plugins.common import await_inputs, codes, codes_reference
from quant.formats import INT8, QuantFormat


@triton.jit
def _quantize_kernel(x_ptr, q_ptr, recip, R, C, size1, size2, stride0, stride1, stride2, stride_c,
                     ROWS: tl.constexpr, BLOCK_C: tl.constexpr, PDL: tl.constexpr, FORMAT: tl.constexpr):
    # Rows are the flattened outer dims [size0, size1, size2] of the view; columns its last dim. Index math is
    # per row (a few divisions per ROWS elements), the last dim is addressed directly.
    await_inputs(PDL)
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    i2 = rows % size2
    i1 = (rows // size2) % size1
    i0 = rows // (size2 * size1)
    src = i0.to(tl.int64) * stride0 + i1.to(tl.int64) * stride1 + i2.to(tl.int64) * stride2
    mask = (rows < R)[:, None] & (cols < C)[None, :]
    x = tl.load(x_ptr + src[:, None] + cols.to(tl.int64)[None, :] * stride_c, mask=mask, other=0.0)
    dst = rows.to(tl.int64)[:, None] * C + cols[None, :]
    tl.store(q_ptr + dst, codes(x.to(tl.float32), recip, FORMAT), mask=mask)


def _outer_dims(shape, strides) -> list[tuple[int, int]]:
    """(size, stride) of the dims before the last, size-1 dims dropped and neighbours merged where the memory
    layout allows (stride[i] == size[i+1] * stride[i+1]), so most views need at most three."""
    dims: list[tuple[int, int]] = []
    for size, stride in zip(shape, strides):
        if size == 1:
            continue
        if dims and dims[-1][1] == size * stride:
            dims[-1] = (dims[-1][0] * size, stride)
        else:
            dims.append((size, stride))
    return dims


def quantize_rows(x: torch.Tensor, recip: float, fmt: QuantFormat = INT8) -> torch.Tensor:
    """`fmt`'s codes (int8, or float8_e4m3fn) of x (float16/bfloat16/float32, any strides), contiguous and shaped
    like x, so that `.view(-1, H)` gives the GEMM's rows. `recip` is the float32 reciprocal of the scale."""
    if not x.dtype.is_floating_point:
        raise ValueError(f"quantize_rows: x must be floating, got {x.dtype}")
    common.kernel_format(recip, fmt)  # a format the kernels write
    q = common.empty(x.shape, fmt.dtype, x.device)
    if x.numel() == 0:
        return q
    view = x if x.dim() > 0 else x.reshape(1)
    outer = _outer_dims(view.shape[:-1], view.stride()[:-1])
    if len(outer) > 3:  # rare: more than three non-mergeable outer dims; one copy makes it a single dim
        view = view.contiguous()
        outer = _outer_dims(view.shape[:-1], view.stride()[:-1])
    (s0, st0), (s1, st1), (s2, st2) = [(1, 0)] * (3 - len(outer)) + outer
    r, c = s0 * s1 * s2, view.shape[-1]
    block_c = min(triton.next_power_of_2(c), 1024)
    rows = min(max(1, 4096 // block_c), triton.next_power_of_2(r))
    grid = (triton.cdiv(r, rows), triton.cdiv(c, block_c))
    use_pdl = common.pdl(x.device)
    _quantize_kernel[grid](view, q, float(recip), r, c, s1, s2, st0, st1, st2, view.stride(-1),
                           ROWS=rows, BLOCK_C=block_c, num_warps=4, PDL=use_pdl, launch_pdl=use_pdl, FORMAT=fmt.name)
    return q


def quantize_rows_reference(x: torch.Tensor, recip: float, fmt: QuantFormat = INT8) -> torch.Tensor:
    """The definition: quant.quantizer's formula with the reciprocal given, laid out contiguously."""
    return codes_reference(x, recip, fmt).contiguous()
