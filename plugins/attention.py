"""Attention that reads Q, K, V from the QKV GEMM's output and writes the context as the next GEMM reads it.

The engine's default attention is PyTorch's SDPA on strided views of the QKV output, then, for an INT8
attention-output GEMM, a pass that quantizes the transposed context (plugins/quantize.py). This kernel does both
in one launch, the way TensorRT's fused multi-head attention plugin does: each program takes BLOCK_M queries of
one (sequence, head), walks the keys in BLOCK_N blocks with an online softmax, and writes its context rows
straight into the [tokens, hidden] layout, as FP16/FP32 or as INT8 codes. At batch 1 that is one kernel fewer
per layer and one that takes part in programmatic dependent launch (plugins/_common.await_inputs), which SDPA's
kernels do not; at large batch it saves the context's extra read and write. Whether it is faster than SDPA on a
given GPU and shape is for the builder's timing to say (engines/runtime.py: attention_candidates).

The math (attention_reference defines it), per sequence b and head h, keys j < S:

    scores[i, j] = float32(q_i . k_j) / sqrt(D) + bias[b, j]        q, k, v: FP16 rows of qkv
    p[i, :]      = softmax(scores[i, :])                            float32
    ctx[i]       = sum_j p[i, j] * float32(v_j)
    out          = codes(ctx) with out_recip, else ctx.to(out_dtype)

`bias` is the engine's key-padding bias (0 for a real token, the dtype's lowest value for padding) or absent.
The kernel computes softmax with exp2 and the running maximum (flash attention's rescaling) and rounds p to
FP16 before the p.v product, as every flash kernel and SDPA's do; so its context differs from the float32
reference by about 1e-3 relative, and an INT8 code by 1 where the context sits near a rounding boundary. The
codes come from the float32 context, with no FP16 rounding in between (one rounding fewer than SDPA + quantize).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from plugins import _common
from plugins._common import await_inputs, codes_reference, int8_codes, max_op, sum_op, tma_ok

LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class AttentionConfig:
    """Query and key block sizes and launch parameters; the engine builder times CANDIDATE_CONFIGS."""
    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2
    # Q, K and V tiles through Hopper's TMA (descriptors over the QKV output) where every block lies inside one
    # sequence (S a multiple of both block sizes); pointer loads otherwise, with the same math.
    tma: bool = False

    def __post_init__(self):
        for name in ("block_m", "block_n"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"AttentionConfig.{name} must be a power of two >= 16, got {v}")
        if self.num_warps < 1 or self.num_stages < 1:
            raise ValueError(f"AttentionConfig: num_warps and num_stages must be positive: {self}")

    @property
    def name(self) -> str:
        tma = "+tma" if self.tma else ""
        return f"fused-attention:{self.block_m}x{self.block_n}-w{self.num_warps}-s{self.num_stages}{tma}"

    @staticmethod
    def parse(name: str) -> "AttentionConfig":
        """Inverse of .name."""
        body, plus, tma = name.removeprefix("fused-attention:").partition("+")
        if plus and tma != "tma":
            raise ValueError(f"not an attention configuration: {name!r}")
        tiles, w, s = body.split("-")
        bm, bn = map(int, tiles.split("x"))
        return AttentionConfig(bm, bn, int(w[1:]), int(s[1:]), tma=bool(plus))


# Small query blocks give batch 1 (16 heads x 128 tokens) enough programs for the SMs; 128-query blocks are the
# usual flash-attention tile for long batches. On an H200 (BENCHMARKS.md, call Q1; docs/attention-h200.md) the
# fastest were 64x128 at 1 x 128, and at 128 x 384 TMA tiles with 3 stages: 128x64 with 4 warps with the padding
# bias (1.20x SDPA), 64x128 or 128x64 with 8 warps without a mask (0.83x cuDNN); 128-key blocks with 128
# queries, 32-query blocks and 2-stage 128x64 tiles never came first, and were dropped.
CANDIDATE_CONFIGS: tuple[AttentionConfig, ...] = (
    AttentionConfig(16, 64, 4, 2),
    AttentionConfig(64, 64, 4, 2),
    AttentionConfig(64, 128, 4, 2),
    AttentionConfig(64, 128, 4, 2, tma=True),
    AttentionConfig(128, 64, 4, 3, tma=True),
    AttentionConfig(128, 64, 8, 3, tma=True),
)


@triton.jit
def _load(ptrs, ok, EVEN: tl.constexpr):
    """A block of rows: every one in range when EVEN, else those where `ok` (the rest read as 0)."""
    if EVEN:
        return tl.load(ptrs)
    else:
        return tl.load(ptrs, mask=ok, other=0.0)


@triton.jit
def _attention_kernel(qkv_ptr, bias_ptr, out_ptr, out_recip, S, HEADS, qk_scale, stride_qkv, stride_out,
                      HAS_BIAS: tl.constexpr, INT8_OUT: tl.constexpr, RECIP_PER_CHANNEL: tl.constexpr,
                      D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN: tl.constexpr,
                      PDL: tl.constexpr, q_desc=None, kv_desc=None):
    # Program (query block, sequence * HEADS + head). Row r of qkv holds [q | k | v], each HEADS * D wide, head h
    # at columns h * D; the context of token r, head h goes to out[r, h * D:(h + 1) * D]. EVEN: S is a multiple of
    # both block sizes, so no block needs a mask. q_desc / kv_desc (TMA descriptors over qkv, blocks of BLOCK_M
    # and BLOCK_N rows by D columns; only with EVEN): the tiles come through TMA instead of pointer loads.
    b = tl.program_id(1) // HEADS
    h = tl.program_id(1) % HEADS
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    m_ok = offs_m < S
    rows = (b * S + offs_m).to(tl.int64)
    hidden = HEADS * D
    await_inputs(PDL)
    if q_desc is not None:
        q = q_desc.load([b * S + tl.program_id(0) * BLOCK_M, h * D])
    else:
        q = _load(qkv_ptr + rows[:, None] * stride_qkv + h * D + offs_d[None, :], m_ok[:, None], EVEN)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.full((BLOCK_M,), 0.0, tl.float32)
    acc = tl.full((BLOCK_M, D), 0.0, tl.float32)
    for start in range(0, S, BLOCK_N):
        keys = start + offs_n
        n_ok = keys < S
        key_rows = (b * S + keys).to(tl.int64)
        if kv_desc is not None:
            k = kv_desc.load([b * S + start, hidden + h * D]).T  # [D, BLOCK_N]
        else:
            k = _load(qkv_ptr + key_rows[None, :] * stride_qkv + hidden + h * D + offs_d[:, None], n_ok[None, :],
                      EVEN)  # [D, BLOCK_N]
        s = tl.dot(q, k, out_dtype=tl.float32) * qk_scale  # log2 domain: exp2(s) = exp(score)
        if HAS_BIAS:  # into the log2 domain too: times log2(e), LOG2E
            s += _load(bias_ptr + b * S + keys, n_ok, EVEN).to(tl.float32)[None, :] * 1.4426950408889634
        if not EVEN:
            s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.reduce(s, 1, max_op))  # finite: every block has a key, padding bias is finite
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.reduce(p, 1, sum_op)
        if kv_desc is not None:
            v = kv_desc.load([b * S + start, 2 * hidden + h * D])
        else:
            v = _load(qkv_ptr + key_rows[:, None] * stride_qkv + 2 * hidden + h * D + offs_d[None, :], n_ok[:, None],
                      EVEN)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], out_dtype=tl.float32)
        m_i = m_new
    ctx = acc / l_i[:, None]
    out_ptrs = out_ptr + rows[:, None] * stride_out + h * D + offs_d[None, :]
    if INT8_OUT:
        if RECIP_PER_CHANNEL:  # out_recip points at float32 [HEADS * D]
            recip = tl.load(out_recip + h * D + offs_d)[None, :]
        else:
            recip = out_recip
        tl.store(out_ptrs, int8_codes(ctx, recip), mask=m_ok[:, None])
    else:
        tl.store(out_ptrs, ctx.to(out_ptr.dtype.element_ty), mask=m_ok[:, None])


def _check(qkv: torch.Tensor, batch: int, heads: int, key_bias: torch.Tensor | None):
    if qkv.dim() != 2 or qkv.dtype not in (torch.float16, torch.bfloat16) or qkv.stride(1) != 1:
        raise ValueError(f"fused_attention: qkv must be 2-D FP16/BF16 with unit column stride, got {qkv.dtype} "
                         f"{tuple(qkv.shape)}")
    tokens, width = qkv.shape
    if batch < 1 or tokens % batch or width % (3 * heads):
        raise ValueError(f"fused_attention: qkv {tuple(qkv.shape)} is not [batch * S, 3 * heads * D] for "
                         f"batch {batch}, heads {heads}")
    d = width // (3 * heads)
    if d < 16 or d & (d - 1):
        raise ValueError(f"fused_attention: head size must be a power of two >= 16, got {d}")
    if key_bias is not None and (key_bias.shape != (batch, tokens // batch) or not key_bias.is_contiguous()
                                 or key_bias.device != qkv.device):
        raise ValueError(f"fused_attention: key_bias must be contiguous [{batch}, {tokens // batch}] on "
                         f"{qkv.device}, got {tuple(key_bias.shape)} on {key_bias.device}")
    return tokens // batch, d


def fused_attention(qkv: torch.Tensor, batch: int, heads: int, key_bias: torch.Tensor | None = None, *,
                    out_recip: float | torch.Tensor | None = None, out_dtype: torch.dtype = torch.float16,
                    config: AttentionConfig | None = None) -> torch.Tensor:
    """Context [batch * S, heads * D] of qkv [batch * S, 3 * heads * D] (the QKV GEMM's output); `key_bias`
    [batch, S] is added to every query's scores (padding), `out_recip` (a float32 number, or a contiguous
    float32 [heads * D] vector) makes the output INT8 codes. See the module docstring."""
    s, d = _check(qkv, batch, heads, key_bias)
    hidden = heads * d
    per_channel = isinstance(out_recip, torch.Tensor)
    if per_channel and (out_recip.shape != (hidden,) or out_recip.dtype != torch.float32
                        or not out_recip.is_contiguous() or out_recip.device != qkv.device):
        raise ValueError(f"fused_attention: a per-channel out_recip must be a contiguous float32 [{hidden}] on "
                         f"{qkv.device}, got {out_recip.dtype} {tuple(out_recip.shape)} on {out_recip.device}")
    out = _common.empty((batch * s, hidden), torch.int8 if out_recip is not None else out_dtype, qkv.device)
    if s == 0:
        return out
    cfg = config or CANDIDATE_CONFIGS[0]
    recip = out_recip if per_channel else float(out_recip) if out_recip is not None else 1.0
    use_pdl = _common.pdl(qkv.device)
    even = s % cfg.block_m == 0 and s % cfg.block_n == 0
    descs = {}
    if cfg.tma and even and tma_ok(qkv):
        from triton.tools.tensor_descriptor import TensorDescriptor

        descs = dict(q_desc=TensorDescriptor.from_tensor(qkv, [cfg.block_m, d]),
                     kv_desc=TensorDescriptor.from_tensor(qkv, [cfg.block_n, d]))
    grid = (triton.cdiv(s, cfg.block_m), batch * heads)
    _attention_kernel[grid](
        qkv, key_bias if key_bias is not None else qkv, out, recip, s, heads, LOG2E / math.sqrt(d),
        qkv.stride(0), out.stride(0), HAS_BIAS=key_bias is not None, INT8_OUT=out_recip is not None,
        RECIP_PER_CHANNEL=per_channel, D=d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, EVEN=even, PDL=use_pdl,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, launch_pdl=use_pdl, **descs)
    return out


def attention_reference(qkv: torch.Tensor, batch: int, heads: int, key_bias: torch.Tensor | None = None, *,
                        out_recip: float | torch.Tensor | None = None,
                        out_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """The definition of fused_attention's output, in float32 torch ops (module docstring)."""
    s, d = _check(qkv, batch, heads, key_bias)
    q, k, v = qkv.float().view(batch, s, 3, heads, d).permute(2, 0, 3, 1, 4)  # each [batch, heads, S, D]
    scores = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(d))
    if key_bias is not None:
        scores = scores + key_bias.float()[:, None, None, :]
    ctx = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch * s, heads * d)
    if out_recip is not None:
        return codes_reference(ctx, out_recip)
    return ctx.to(out_dtype)
