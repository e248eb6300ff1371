"""Variable-length ("packed") attention: the windows of a batch back to back in one token stream, no padding.

The padded attention (plugins/attention.py) runs [batch, S] with a key bias: every window costs S queries and S
keys however short it is. Here the QKV GEMM's output holds only real tokens, `qkv` [T, 3H], window w being rows
cu_seqlens[w] to cu_seqlens[w + 1] (int32 [n + 1] on the device, cu_seqlens[0] = 0, non-decreasing; a window of
length 0 is allowed: CUDA graphs of the packed path keep cu_seqlens at a fixed size that way), and attends only
within its window; the context comes back in the same rows, [T, H], FP or as the next GEMM's codes (INT8, or FP8
E4M3 in an --fp8 build).

The math is the padded references' (attention_reference, attention_int8_reference), run per window:
varlen_attention_reference and varlen_attention_int8_reference define it that way, so it is written once. A
window is a batch of one without padding, which is what a padded sequence is once its padded keys get weight 0
(the key bias underflows exp to 0), so packed and padded attention agree to float rounding.

The kernels take one program per (query block, window * HEADS + head), as the padded ones do per sequence; a
program whose block starts past its window's length returns at once (the grid is sized by `max_seqlen`), so no
query row beyond a window's last block is computed, and keys are walked up to the window's length only. Rows of
`qkv` past cu_seqlens[-1] belong to no window: the kernels leave their context unwritten (the references zero),
and the engine never reads them (a CUDA graph's token budget holds such rows at its tail).

- fused_varlen_attention: FP16/BF16 Q, K, V; online softmax with exp2 and p rounded to FP16 before p.v, as the
  padded fused kernel's masked path. Tiles come by pointer loads, or (`+tma` configurations) through Hopper's TMA
  from descriptors over the whole QKV output: a TMA box may start at any row, so a block that runs past its
  window's end reads the next window's rows (or zeros past the tensor's end); those keys get score -inf, their V
  rows are zeroed before p.v (so no value from another window, not even a NaN, reaches this one's context), and
  those queries' rows are not stored.
- fused_varlen_attention_int8 (-imh): the padded INT8 kernel's two passes, the same Triton function
  (plugins.attention.int8_context): integer q.k and p.v, probabilities normalized and then rounded with s_p.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from plugins import common
from plugins.attention import (LOG2E, MAX_INT8_LENGTH, AttentionConfig, AttentionScales, attention_int8_reference,
                               attention_reference, context_out, int8_context, int8_scales, store_context)
from plugins.common import await_inputs, max_op, sum_op, tma_ok
from quant.formats import INT8, QuantFormat

# The padded kernels' block shapes, by pointer loads and (FP16) through TMA: which is fastest at packed BERT
# shapes is for the build's timing to say (engines/packed.py). Query blocks of 64 waste fewer rows past a window's
# end than 128 (a window of 176 tokens computes 192 query rows, not 256), at a lower tensor-core rate per block.
_SHAPES = ((16, 64, 4, 2), (64, 64, 4, 2), (64, 64, 4, 3), (64, 128, 4, 2), (128, 64, 4, 3), (128, 64, 8, 3))
CANDIDATE_CONFIGS: tuple[AttentionConfig, ...] = tuple(AttentionConfig(*c) for c in _SHAPES) + tuple(
    AttentionConfig(*c, tma=True) for c in _SHAPES if c[0] >= 64)
INT8_CANDIDATE_CONFIGS: tuple[AttentionConfig, ...] = tuple(AttentionConfig(*c, int8=True) for c in _SHAPES)


@triton.jit
def _window(cu_ptr, HEADS, BLOCK_M: tl.constexpr):
    """Program (query block, window * HEADS + head)'s head, its window's first row and length, and its query
    offsets within the window. Reads cu_seqlens: call after await_inputs."""
    w = tl.program_id(1) // HEADS
    first = tl.load(cu_ptr + w)
    length = tl.load(cu_ptr + w + 1) - first
    return tl.program_id(1) % HEADS, first, length, tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)


@triton.jit
def varlen_attention_kernel(qkv_ptr, cu_ptr, out_ptr, out_recip, HEADS, qk_scale, stride_qkv, stride_out,
                            OUT_FORMAT: tl.constexpr, RECIP_PER_CHANNEL: tl.constexpr, D: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr, q_desc=None,
                            kv_desc=None):
    # Row r of qkv holds [q | k | v], each HEADS * D wide, head h at columns h * D (as the padded kernel's).
    # q_desc / kv_desc: TMA descriptors over qkv, boxes of BLOCK_M and BLOCK_N rows by D columns (module docstring).
    hidden = HEADS * D
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    await_inputs(PDL)
    h, first, length, offs_m = _window(cu_ptr, HEADS, BLOCK_M)
    m_ok = offs_m < length
    rows = (first + offs_m).to(tl.int64)
    if tl.program_id(0) * BLOCK_M < length:  # else a block past the window: nothing to compute
        if q_desc is not None:
            q = q_desc.load([first + tl.program_id(0) * BLOCK_M, h * D])
        else:
            q = tl.load(qkv_ptr + rows[:, None] * stride_qkv + h * D + offs_d[None, :], mask=m_ok[:, None],
                        other=0.0)
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.full((BLOCK_M,), 0.0, tl.float32)
        acc = tl.full((BLOCK_M, D), 0.0, tl.float32)
        for start in range(0, length, BLOCK_N):
            keys = start + offs_n
            n_ok = keys < length
            key_rows = (first + keys).to(tl.int64)
            if kv_desc is not None:
                k = kv_desc.load([first + start, hidden + h * D]).T  # [D, BLOCK_N]
            else:
                k = tl.load(qkv_ptr + key_rows[None, :] * stride_qkv + hidden + h * D + offs_d[:, None],
                            mask=n_ok[None, :], other=0.0)  # [D, BLOCK_N]
            s = tl.where(n_ok[None, :], tl.dot(q, k, out_dtype=tl.float32) * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.reduce(s, 1, max_op))  # finite: every block holds a key of the window
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.reduce(p, 1, sum_op)
            if kv_desc is not None:  # rows past the window are another window's (or zeros): zeroed
                v = tl.where(n_ok[:, None], kv_desc.load([first + start, 2 * hidden + h * D]), 0.0)
            else:
                v = tl.load(qkv_ptr + key_rows[:, None] * stride_qkv + 2 * hidden + h * D + offs_d[None, :],
                            mask=n_ok[:, None], other=0.0)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], out_dtype=tl.float32)
            m_i = m_new
        store_context(acc / l_i[:, None], out_ptr, out_recip, rows, h * D + offs_d, m_ok, stride_out, OUT_FORMAT,
                      RECIP_PER_CHANNEL)


@triton.jit
def varlen_attention_int8_kernel(qkv_ptr, cu_ptr, out_ptr, out_recip, HEADS, qk_scale, p_recip, pv_scale,
                                 stride_qkv, stride_out, OUT_FORMAT: tl.constexpr, RECIP_PER_CHANNEL: tl.constexpr,
                                 D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr):
    # The layout of varlen_attention_kernel with qkv holding codes; the math is the padded INT8 kernel's.
    hidden = HEADS * D
    i8_dot: tl.constexpr = D >= 32
    offs_d = tl.arange(0, D)
    await_inputs(PDL)
    h, first, length, offs_m = _window(cu_ptr, HEADS, BLOCK_M)
    m_ok = offs_m < length
    rows = (first + offs_m).to(tl.int64)
    if tl.program_id(0) * BLOCK_M < length:
        q = tl.load(qkv_ptr + rows[:, None] * stride_qkv + h * D + offs_d[None, :], mask=m_ok[:, None], other=0)
        ctx = int8_context(q, qkv_ptr, qkv_ptr, first, length, hidden + h * D, 2 * hidden + h * D,
                           tl.arange(0, BLOCK_N), offs_d, stride_qkv, qk_scale, p_recip, pv_scale, False, False,
                           i8_dot, BLOCK_M, BLOCK_N, D)
        store_context(ctx, out_ptr, out_recip, rows, h * D + offs_d, m_ok, stride_out, OUT_FORMAT,
                      RECIP_PER_CHANNEL)


def check_packed(qkv: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, heads: int,
                 dtypes: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16)) -> tuple[int, int]:
    """The number of windows and the head size, after the checks that need no device read (a CUDA graph
    captures these calls); the references check cu_seqlens' values too."""
    if qkv.dim() != 2 or qkv.dtype not in dtypes or qkv.stride(1) != 1:
        kind = "INT8 codes" if dtypes == (torch.int8,) else "FP16/BF16"
        raise ValueError(f"varlen attention: qkv must be 2-D {kind} with unit column stride, got {qkv.dtype} "
                         f"{tuple(qkv.shape)}")
    if qkv.shape[1] % (3 * heads):
        raise ValueError(f"varlen attention: qkv {tuple(qkv.shape)} is not [tokens, 3 * heads * D] for {heads} heads")
    d = qkv.shape[1] // (3 * heads)
    if d < 16 or d & (d - 1):
        raise ValueError(f"varlen attention: head size must be a power of two >= 16, got {d}")
    if (cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype != torch.int32
            or not cu_seqlens.is_contiguous() or cu_seqlens.device != qkv.device):
        raise ValueError(f"varlen attention: cu_seqlens must be contiguous int32 [windows + 1] on {qkv.device}, "
                         f"got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)} on {cu_seqlens.device}")
    if not isinstance(max_seqlen, int) or isinstance(max_seqlen, bool) or max_seqlen < 0:
        raise ValueError(f"varlen attention: max_seqlen must be an integer >= 0, got {max_seqlen!r}")
    return cu_seqlens.numel() - 1, d


def window_bounds(cu_seqlens: torch.Tensor, max_seqlen: int, tokens: int) -> list[tuple[int, int]]:
    """Each window's (first row, end row), read on the host, after checking that they tile a prefix of the
    tokens in order and that none is longer than max_seqlen."""
    cu = [int(c) for c in cu_seqlens.tolist()]
    if cu[0] != 0 or any(b < a for a, b in zip(cu, cu[1:])) or cu[-1] > tokens:
        raise ValueError(f"varlen attention: cu_seqlens must start at 0 and not decrease up to at most {tokens} "
                         f"tokens, got {cu[:8]}{'...' if len(cu) > 8 else ''}")
    longest = max(b - a for a, b in zip(cu, cu[1:]))
    if longest > max_seqlen:
        raise ValueError(f"varlen attention: a window of {longest} tokens exceeds max_seqlen {max_seqlen}")
    return list(zip(cu, cu[1:]))


def padded_layout(cu_seqlens: torch.Tensor, max_seqlen: int,
                  tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """How packed windows map onto a padded [windows, max_seqlen] batch, in device ops alone (no host read, so a
    CUDA graph captures it): `gather` [windows * max_seqlen], the packed row each padded position reads (row 0
    for padding); `scatter`, the packed row each padded position's result goes to (row `tokens`, one past the
    end, for padding); `real` [windows, max_seqlen], which positions are tokens. The library families run the
    padded functions through it (engines/backends.py)."""
    starts = cu_seqlens[:-1].long()
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    position = torch.arange(max_seqlen, device=cu_seqlens.device)
    real = position[None, :] < lengths[:, None]
    rows = starts[:, None] + position[None, :]
    return torch.where(real, rows, 0).view(-1), torch.where(real, rows, tokens).view(-1), real


def _per_window(attend, qkv: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, hidden: int,
                out_recip, out_dtype: torch.dtype, out_format: QuantFormat = INT8) -> torch.Tensor:
    """`attend(rows)` (a padded reference on one window, a batch of one) for every window, into [T, hidden];
    rows past the last window zero."""
    out = torch.zeros(qkv.shape[0], hidden, dtype=out_format.dtype if out_recip is not None else out_dtype,
                      device=qkv.device)
    for a, b in window_bounds(cu_seqlens, max_seqlen, qkv.shape[0]):
        if b > a:
            out[a:b] = attend(qkv[a:b])
    return out


def varlen_attention_reference(qkv: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, heads: int, *,
                               out_recip: float | torch.Tensor | None = None, out_dtype: torch.dtype = torch.float16,
                               out_format: QuantFormat = INT8) -> torch.Tensor:
    """The definition of fused_varlen_attention's output: attention_reference on each window alone."""
    _, d = check_packed(qkv, cu_seqlens, max_seqlen, heads)
    return _per_window(lambda rows: attention_reference(rows, 1, heads, out_recip=out_recip, out_dtype=out_dtype,
                                                        out_format=out_format),
                       qkv, cu_seqlens, max_seqlen, heads * d, out_recip, out_dtype, out_format)


def varlen_attention_int8_reference(codes: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, heads: int,
                                    scales: AttentionScales, *, out_recip: float | torch.Tensor | None = None,
                                    out_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """The definition of fused_varlen_attention_int8's output: attention_int8_reference on each window alone."""
    _, d = _check_int8(codes, cu_seqlens, max_seqlen, heads)
    return _per_window(lambda rows: attention_int8_reference(rows, 1, heads, scales, out_recip=out_recip,
                                                             out_dtype=out_dtype),
                       codes, cu_seqlens, max_seqlen, heads * d, out_recip, out_dtype)


def _check_int8(codes, cu_seqlens, max_seqlen: int, heads: int) -> tuple[int, int]:
    n, d = check_packed(codes, cu_seqlens, max_seqlen, heads, dtypes=(torch.int8,))
    if max_seqlen > MAX_INT8_LENGTH:
        raise ValueError(f"varlen attention: windows of up to {max_seqlen} tokens exceed {MAX_INT8_LENGTH}, where "
                         "the integer dot products stop being exact in float32")
    return n, d


def _config(config: AttentionConfig | None, int8: bool) -> AttentionConfig:
    cfg = config or (INT8_CANDIDATE_CONFIGS if int8 else CANDIDATE_CONFIGS)[0]
    if cfg.int8 != int8:
        raise ValueError(f"varlen attention: {cfg.name} is not an {'INT8' if int8 else 'FP16'} configuration of "
                         "this kernel")
    return cfg


def fused_varlen_attention(qkv: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, heads: int, *,
                           out_recip: float | torch.Tensor | None = None, out_dtype: torch.dtype = torch.float16,
                           config: AttentionConfig | None = None, out_format: QuantFormat = INT8) -> torch.Tensor:
    """Context [T, heads * D] of the packed windows of qkv [T, 3 * heads * D]; `out_recip` (a float32 number or
    a contiguous float32 [heads * D]) makes it `out_format`'s codes (INT8 or FP8 E4M3). See the module
    docstring."""
    n, d = check_packed(qkv, cu_seqlens, max_seqlen, heads)
    out, per_channel, recip = context_out(qkv.shape[0], heads * d, out_recip, out_dtype, qkv.device, out_format)
    if n == 0 or max_seqlen == 0 or qkv.shape[0] == 0:
        return out
    cfg = _config(config, int8=False)
    use_pdl = common.pdl(qkv.device)
    descs = {}
    if cfg.tma and tma_ok(qkv):  # else the pointer loads, the same math
        from triton.tools.tensor_descriptor import TensorDescriptor

        descs = dict(q_desc=TensorDescriptor.from_tensor(qkv, [cfg.block_m, d]),
                     kv_desc=TensorDescriptor.from_tensor(qkv, [cfg.block_n, d]))
    varlen_attention_kernel[(triton.cdiv(max_seqlen, cfg.block_m), n * heads)](
        qkv, cu_seqlens, out, recip, heads, LOG2E / math.sqrt(d), qkv.stride(0), out.stride(0),
        OUT_FORMAT=common.kernel_format(out_recip, out_format), RECIP_PER_CHANNEL=per_channel, D=d,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, PDL=use_pdl, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        launch_pdl=use_pdl, **descs)
    return out


def fused_varlen_attention_int8(codes: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, heads: int,
                                scales: AttentionScales, *, out_recip: float | torch.Tensor | None = None,
                                out_dtype: torch.dtype = torch.float16,
                                config: AttentionConfig | None = None) -> torch.Tensor:
    """-imh: context [T, heads * D] of the packed windows of `codes` [T, 3 * heads * D] (Q, K, V's INT8 codes
    with `scales`); out_recip as in fused_varlen_attention."""
    n, d = _check_int8(codes, cu_seqlens, max_seqlen, heads)
    out, per_channel, recip = context_out(codes.shape[0], heads * d, out_recip, out_dtype, codes.device)
    if n == 0 or max_seqlen == 0 or codes.shape[0] == 0:
        return out
    cfg = _config(config, int8=True)
    use_pdl = common.pdl(codes.device)
    qk, pv = int8_scales(scales, d)
    varlen_attention_int8_kernel[(triton.cdiv(max_seqlen, cfg.block_m), n * heads)](
        codes, cu_seqlens, out, recip, heads, qk * LOG2E, common.out_recip(scales.probs), pv, codes.stride(0),
        out.stride(0), OUT_FORMAT=common.kernel_format(out_recip), RECIP_PER_CHANNEL=per_channel, D=d,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, PDL=use_pdl, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        launch_pdl=use_pdl)
    return out
