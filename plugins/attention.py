"""Attention that reads Q, K, V from the QKV GEMM's output and writes the context as the next GEMM reads it.

The engine's default attention is PyTorch's SDPA on strided views of the QKV output, then, for an INT8
attention-output GEMM, a pass that quantizes the transposed context (plugins/quantize.py). This kernel does both
in one launch, the way TensorRT's fused multi-head attention plugin does: each program takes BLOCK_M queries of
one (sequence, head), walks the keys in BLOCK_N blocks with an online softmax, and writes its context rows
straight into the [tokens, hidden] layout, as FP16/FP32 or as the next GEMM's codes (INT8, or FP8 E4M3 in an --fp8
build). At batch 1 that is one kernel fewer
per layer and one that takes part in programmatic dependent launch (plugins/common.await_inputs), which SDPA's
kernels do not; at large batch it saves the context's extra read and write. Whether it is faster than SDPA on a
given GPU and shape is for the builder's timing to say (engines/runtime.py: attention_candidates).

The math (attention_reference defines it), per sequence b and head h, keys j < S:

    scores[i, j] = float32(q_i . k_j) / sqrt(D) + bias[b, j]        q, k, v: FP16 rows of qkv
    p[i, :]      = softmax(scores[i, :])                            float32
    ctx[i]       = sum_j p[i, j] * float32(v_j)
    out          = codes(ctx) with out_recip (INT8's or E4M3's), else ctx.to(out_dtype)

`bias` is the engine's key-padding bias (0 for a real token, the dtype's lowest value for padding) or absent.
The kernel computes softmax with exp2 and the running maximum (flash attention's rescaling) and rounds p to
FP16 before the p.v product, as every flash kernel and SDPA's do; so its context differs from the float32
reference by about 1e-3 relative, and a code by one step where the context sits near a rounding boundary. The
codes come from the float32 context, with no FP16 rounding in between (one rounding fewer than SDPA + quantize).

INT8 attention (-imh: Q, K, V, the probabilities and the context INT8 where they are produced), one launch,
fused_attention_int8 (attention_int8_reference defines it). The QKV GEMM writes Q, K and V as codes with scales
s_q, s_k, s_v; the probabilities are quantized with the calibrated s_p after they are normalized:

    scores[i, j] = float32(qc_i . kc_j) * float32(s_q * s_k / sqrt(D)) + bias[b, j]    exact integer dot
    p[i, :]      = softmax(scores[i, :])                                            float32
    pc[i, j]     = codes(p[i, j], 1 / s_p)
    ctx[i]       = float32(sum_j pc[i, j] * vc_j) * float32(s_p * s_v)                 exact integer dot
    out          = codes(ctx) with out_recip, else ctx.to(out_dtype)

Normalizing before the rounding needs each row's maximum and sum first, so the kernel walks the keys twice: once
for the online maximum and sum, once for the probabilities' codes and their product with V (q.k again: an INT8
dot is cheap beside the softmax). Both integer dots are exact (|sums| < 2**24 for S <= 1040), through INT8
tensor cores for q.k and FP16 ones for pc.v (INT8 ones want V's tile transposed; integers below 2**11 are exact
in FP16 and their sums in the float32 accumulator). The softmax runs in the log2 domain with exp2 and one
reciprocal of the sum per row, so a probability's code can differ from the reference's by 1 where it sits on a
rounding boundary, which moves that query's context codes by up to context_code_step (rarely: 32 of 1,179,648
at BERT-large's heads, 3 x 384, in a CPU emulation of the kernel's float math).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from plugins import common
from plugins.common import await_inputs, codes, codes_reference, int8_codes, max_op, sum_op, tma_ok
from quant.formats import INT8, QuantFormat

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
    int8: bool = False  # the -imh kernel (fused_attention_int8), pointer loads only

    def __post_init__(self):
        for name in ("block_m", "block_n"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"AttentionConfig.{name} must be a power of two >= 16, got {v}")
        if self.num_warps < 1 or self.num_stages < 1:
            raise ValueError(f"AttentionConfig: num_warps and num_stages must be positive: {self}")
        if self.int8 and self.tma:
            raise ValueError("AttentionConfig: the INT8 kernel has no TMA loads")

    @property
    def name(self) -> str:
        tma = "+tma" if self.tma else ""
        kind = "int8-attention" if self.int8 else "fused-attention"
        return f"{kind}:{self.block_m}x{self.block_n}-w{self.num_warps}-s{self.num_stages}{tma}"

    @staticmethod
    def parse(name: str) -> "AttentionConfig":
        """Inverse of .name."""
        kind, _, rest = name.partition(":")
        body, plus, tma = rest.partition("+")
        try:
            if kind not in ("fused-attention", "int8-attention") or (plus and tma != "tma"):
                raise ValueError
            tiles, w, s = body.split("-")
            bm, bn = map(int, tiles.split("x"))
            return AttentionConfig(bm, bn, int(w[1:]), int(s[1:]), tma=bool(plus), int8=kind == "int8-attention")
        except ValueError:
            raise ValueError(f"not an attention configuration: {name!r}") from None


@dataclass(frozen=True)
class AttentionScales:
    """The -imh scales of one layer's attention: Q, K, V (the QKV GEMM's codes) and the probabilities."""
    q: float
    k: float
    v: float
    probs: float


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

# The -imh kernel's candidates: the FP16 kernel's block shapes, pointer loads. On an H200 (BENCHMARKS.md, call R7)
# 16x64 led at BERT-large 1 x 128 (10.0 us a layer; the FP16 kernel 8.1) and 128x64 with 8 warps at 128 x 384
# (516 us; the FP16 kernel 260, cuDNN 211): two passes over the keys, each with the softmax's exp2, make it bound
# by that arithmetic, not by the tensor cores.
INT8_CANDIDATE_CONFIGS: tuple[AttentionConfig, ...] = (
    AttentionConfig(16, 64, 4, 2, int8=True),
    AttentionConfig(64, 64, 4, 2, int8=True),
    AttentionConfig(64, 128, 4, 2, int8=True),
    AttentionConfig(128, 64, 4, 3, int8=True),
    AttentionConfig(128, 64, 8, 3, int8=True),
)


@triton.jit
def _load(ptrs, ok, EVEN: tl.constexpr):
    """A block of rows: every one in range when EVEN, else those where `ok` (the rest read as 0)."""
    if EVEN:
        return tl.load(ptrs)
    else:
        return tl.load(ptrs, mask=ok, other=0.0)


@triton.jit
def _program_block(S, HEADS, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program (query block, sequence * HEADS + head)'s sequence b, head h, query, key and head-dimension
    offsets, which queries are real (< S), and their token rows."""
    b = tl.program_id(1) // HEADS
    h = tl.program_id(1) % HEADS
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    return b, h, offs_m, tl.arange(0, BLOCK_N), tl.arange(0, D), offs_m < S, (b * S + offs_m).to(tl.int64)


@triton.jit
def store_context(ctx, out_ptr, out_recip, rows, cols, m_ok, stride_out, OUT_FORMAT: tl.constexpr,
                  RECIP_PER_CHANNEL: tl.constexpr):
    """A float32 context block into out[rows, cols] ([tokens, hidden]): its codes in OUT_FORMAT ("int8" or
    "fp8_e4m3"; out_recip a float32 number, or with RECIP_PER_CHANNEL a pointer to float32 [hidden]), or with
    OUT_FORMAT "fp" the values in out's dtype."""
    out_ptrs = out_ptr + rows[:, None] * stride_out + cols[None, :]
    if OUT_FORMAT == "fp":
        tl.store(out_ptrs, ctx.to(out_ptr.dtype.element_ty), mask=m_ok[:, None])
    else:
        if RECIP_PER_CHANNEL:
            recip = tl.load(out_recip + cols)[None, :]
        else:
            recip = out_recip
        tl.store(out_ptrs, codes(ctx, recip, OUT_FORMAT), mask=m_ok[:, None])


@triton.jit
def attention_kernel(qkv_ptr, bias_ptr, out_ptr, out_recip, S, HEADS, qk_scale, stride_qkv, stride_out,
                     HAS_BIAS: tl.constexpr, OUT_FORMAT: tl.constexpr, RECIP_PER_CHANNEL: tl.constexpr,
                     D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN: tl.constexpr,
                     PDL: tl.constexpr, q_desc=None, kv_desc=None):
    # Program (query block, sequence * HEADS + head). Row r of qkv holds [q | k | v], each HEADS * D wide, head h
    # at columns h * D; the context of token r, head h goes to out[r, h * D:(h + 1) * D]. EVEN: S is a multiple of
    # both block sizes, so no block needs a mask. q_desc / kv_desc (TMA descriptors over qkv, blocks of BLOCK_M
    # and BLOCK_N rows by D columns; only with EVEN): the tiles come through TMA instead of pointer loads.
    b, h, offs_m, offs_n, offs_d, m_ok, rows = _program_block(S, HEADS, D, BLOCK_M, BLOCK_N)
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
        s = tl.dot(q, k, out_dtype=tl.float32)
        if HAS_BIAS or not EVEN:  # into the log2 domain (exp2(s) = exp(score)), the bias times log2(e) too
            s = s * qk_scale
            if HAS_BIAS:
                s += _load(bias_ptr + b * S + keys, n_ok, EVEN).to(tl.float32)[None, :] * 1.4426950408889634
            if not EVEN:
                s = tl.where(n_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.reduce(s, 1, max_op))  # finite: every block has a key, the bias is finite
            p = tl.exp2(s - m_new[:, None])
        else:  # no mask: the scale (> 0) taken after the maximum, into one multiply-add per score
            m_new = tl.maximum(m_i, tl.reduce(s, 1, max_op) * qk_scale)
            p = tl.exp2(s * qk_scale - m_new[:, None])
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
    store_context(ctx, out_ptr, out_recip, rows, h * D + offs_d, m_ok, stride_out, OUT_FORMAT, RECIP_PER_CHANNEL)


@triton.jit
def _int8_scores(q, qkv_ptr, bias_ptr, row0, col, start, offs_n, offs_d, S, stride_qkv, qk_scale,
                 HAS_BIAS: tl.constexpr, EVEN: tl.constexpr, I8_DOT: tl.constexpr):
    """Scores of a block of query codes against keys [start, start + BLOCK_N) of the sequence of S tokens whose
    first token is row row0 of qkv (and of the key bias, [batch, S] contiguous), K's columns from col; log2
    domain: the exact integer q.k times qk_scale (which holds log2 e), plus the key bias times log2 e; keys past
    S at -inf. I8_DOT: on INT8 tensor cores (K = D of at least 32), else FP16 ones (exact too)."""
    keys = start + offs_n
    n_ok = keys < S
    k = _load(qkv_ptr + (row0 + keys).to(tl.int64)[None, :] * stride_qkv + col + offs_d[:, None], n_ok[None, :],
              EVEN)  # [D, BLOCK_N]
    if I8_DOT:
        dot = tl.dot(q, k, out_dtype=tl.int32).to(tl.float32)
    else:
        dot = tl.dot(q.to(tl.float16), k.to(tl.float16), out_dtype=tl.float32)
    s = dot * qk_scale
    if HAS_BIAS:
        s += _load(bias_ptr + row0 + keys, n_ok, EVEN).to(tl.float32)[None, :] * 1.4426950408889634
    if not EVEN:
        s = tl.where(n_ok[None, :], s, float("-inf"))
    return s


@triton.jit
def int8_context(q, qkv_ptr, bias_ptr, row0, S, col_k, col_v, offs_n, offs_d, stride_qkv, qk_scale, p_recip,
                 pv_scale, HAS_BIAS: tl.constexpr, EVEN: tl.constexpr, I8_DOT: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr):
    """The float32 context of a block of query codes q over the S keys of the sequence whose first token is row
    row0 (K's columns from col_k, V's from col_v), as the module docstring defines it. Pass 1: each row's maximum
    m and sum l of exp2(s - m), online; pass 2: p = exp2(s - m) / l, its codes, and their product with V's codes.
    The padded kernel and the variable-length one (plugins/varlen_attention.py) share it: the math once."""
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.full((BLOCK_M,), 0.0, tl.float32)
    for start in range(0, S, BLOCK_N):
        s = _int8_scores(q, qkv_ptr, bias_ptr, row0, col_k, start, offs_n, offs_d, S, stride_qkv, qk_scale,
                         HAS_BIAS, EVEN, I8_DOT)
        m_new = tl.maximum(m_i, tl.reduce(s, 1, max_op))  # finite: every block has a key, padding bias is finite
        l_i = l_i * tl.exp2(m_i - m_new) + tl.reduce(tl.exp2(s - m_new[:, None]), 1, sum_op)
        m_i = m_new
    inv_l = tl.fdiv(tl.full((BLOCK_M,), 1.0, tl.float32), l_i)
    acc = tl.full((BLOCK_M, D), 0.0, tl.float32)
    for start in range(0, S, BLOCK_N):
        s = _int8_scores(q, qkv_ptr, bias_ptr, row0, col_k, start, offs_n, offs_d, S, stride_qkv, qk_scale,
                         HAS_BIAS, EVEN, I8_DOT)
        pc = int8_codes(tl.exp2(s - m_i[:, None]) * inv_l[:, None], p_recip, False)  # p >= 0: no clamp at -127
        keys = start + offs_n
        v = _load(qkv_ptr + (row0 + keys).to(tl.int64)[:, None] * stride_qkv + col_v + offs_d[None, :],
                  (keys < S)[:, None], EVEN)
        acc = tl.dot(pc.to(tl.float16), v.to(tl.float16), acc, out_dtype=tl.float32)  # exact: integers < 2**24
    return acc * pv_scale


@triton.jit
def attention_int8_kernel(qkv_ptr, bias_ptr, out_ptr, out_recip, S, HEADS, qk_scale, p_recip, pv_scale,
                          stride_qkv, stride_out, HAS_BIAS: tl.constexpr, OUT_FORMAT: tl.constexpr,
                          RECIP_PER_CHANNEL: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, EVEN: tl.constexpr, PDL: tl.constexpr):
    # Program (query block, sequence * HEADS + head), the layout of attention_kernel with qkv holding codes.
    b, h, offs_m, offs_n, offs_d, m_ok, rows = _program_block(S, HEADS, D, BLOCK_M, BLOCK_N)
    hidden = HEADS * D
    i8_dot: tl.constexpr = D >= 32
    await_inputs(PDL)
    q = _load(qkv_ptr + rows[:, None] * stride_qkv + h * D + offs_d[None, :], m_ok[:, None], EVEN)
    ctx = int8_context(q, qkv_ptr, bias_ptr, b * S, S, hidden + h * D, 2 * hidden + h * D, offs_n, offs_d,
                       stride_qkv, qk_scale, p_recip, pv_scale, HAS_BIAS, EVEN, i8_dot, BLOCK_M, BLOCK_N, D)
    store_context(ctx, out_ptr, out_recip, rows, h * D + offs_d, m_ok, stride_out, OUT_FORMAT, RECIP_PER_CHANNEL)


def _check(qkv: torch.Tensor, batch: int, heads: int, key_bias: torch.Tensor | None,
           dtypes: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16)):
    if qkv.dim() != 2 or qkv.dtype not in dtypes or qkv.stride(1) != 1:
        kind = "INT8 codes" if dtypes == (torch.int8,) else "FP16/BF16"
        raise ValueError(f"fused_attention: qkv must be 2-D {kind} with unit column stride, got {qkv.dtype} "
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
                    config: AttentionConfig | None = None, out_format: QuantFormat = INT8) -> torch.Tensor:
    """Context [batch * S, heads * D] of qkv [batch * S, 3 * heads * D] (the QKV GEMM's output); `key_bias`
    [batch, S] is added to every query's scores (padding), `out_recip` (a float32 number, or a contiguous
    float32 [heads * D] vector) makes the output `out_format`'s codes (INT8 or FP8 E4M3). See the module
    docstring."""
    s, d = _check(qkv, batch, heads, key_bias)
    out, per_channel, recip = context_out(batch * s, heads * d, out_recip, out_dtype, qkv.device, out_format)
    if s == 0:
        return out
    cfg = config or CANDIDATE_CONFIGS[0]
    use_pdl = common.pdl(qkv.device)
    even = s % cfg.block_m == 0 and s % cfg.block_n == 0
    descs = {}
    if cfg.tma and even and tma_ok(qkv):
        from triton.tools.tensor_descriptor import TensorDescriptor

        descs = dict(q_desc=TensorDescriptor.from_tensor(qkv, [cfg.block_m, d]),
                     kv_desc=TensorDescriptor.from_tensor(qkv, [cfg.block_n, d]))
    grid = (triton.cdiv(s, cfg.block_m), batch * heads)
    attention_kernel[grid](
        qkv, key_bias if key_bias is not None else qkv, out, recip, s, heads, LOG2E / math.sqrt(d),
        qkv.stride(0), out.stride(0), HAS_BIAS=key_bias is not None,
        OUT_FORMAT=common.kernel_format(out_recip, out_format), RECIP_PER_CHANNEL=per_channel, D=d,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, EVEN=even, PDL=use_pdl, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages, launch_pdl=use_pdl, **descs)
    return out


def attention_reference(qkv: torch.Tensor, batch: int, heads: int, key_bias: torch.Tensor | None = None, *,
                        out_recip: float | torch.Tensor | None = None, out_dtype: torch.dtype = torch.float16,
                        out_format: QuantFormat = INT8) -> torch.Tensor:
    """The definition of fused_attention's output, in float32 torch ops (module docstring)."""
    s, d = _check(qkv, batch, heads, key_bias)
    q, k, v = qkv.float().view(batch, s, 3, heads, d).permute(2, 0, 3, 1, 4)  # each [batch, heads, S, D]
    scores = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(d))
    if key_bias is not None:
        scores = scores + key_bias.float()[:, None, None, :]
    ctx = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch * s, heads * d)
    if out_recip is not None:
        return codes_reference(ctx, out_recip, out_format)
    return ctx.to(out_dtype)


def context_out(rows: int, hidden: int, out_recip: float | torch.Tensor | None, out_dtype: torch.dtype,
                device: torch.device, out_format: QuantFormat = INT8
                ) -> tuple[torch.Tensor, bool, float | torch.Tensor]:
    """Both kernels' context output [rows, hidden] (`out_format`'s codes when out_recip is given), whether out_recip
    is per channel (after checking that such a vector fits), and out_recip as the kernels take it."""
    per_channel = isinstance(out_recip, torch.Tensor)
    if per_channel and (out_recip.shape != (hidden,) or out_recip.dtype != torch.float32
                        or not out_recip.is_contiguous() or out_recip.device != device):
        raise ValueError(f"fused_attention: a per-channel out_recip must be a contiguous float32 [{hidden}] on "
                         f"{device}, got {out_recip.dtype} {tuple(out_recip.shape)} on {out_recip.device}")
    out = common.empty((rows, hidden), out_format.dtype if out_recip is not None else out_dtype, device)
    recip = out_recip if per_channel else float(out_recip) if out_recip is not None else 1.0
    return out, per_channel, recip


def context_code_step(scales: AttentionScales, out_recip: float | torch.Tensor) -> int:
    """The most a context code moves when one probability's code moves by 1: s_p * s_v * 127 in the context's
    units (the largest of per-channel reciprocals), plus 1 for the rounding. The INT8 kernel's exp2 and
    reciprocal round a probability the other way from the reference now and then, so builds and tests hold its
    codes to the reference within this step, in few places, not within 1."""
    r = float(out_recip.max()) if isinstance(out_recip, torch.Tensor) else float(out_recip)
    return math.ceil(scales.probs * scales.v * 127 * r) + 1


MAX_INT8_LENGTH = 1040  # 127 * 127 * S < 2**24: the integer dots stay exact in a float32 accumulator


def _check_int8(codes: torch.Tensor, batch: int, heads: int, key_bias: torch.Tensor | None) -> tuple[int, int]:
    s, d = _check(codes, batch, heads, key_bias, dtypes=(torch.int8,))
    if s > MAX_INT8_LENGTH:
        raise ValueError(f"fused_attention_int8: sequences of {s} tokens exceed {MAX_INT8_LENGTH}, where the "
                         f"integer dot products stop being exact in float32")
    return s, d


def fused_attention_int8(codes: torch.Tensor, batch: int, heads: int, scales: AttentionScales,
                         key_bias: torch.Tensor | None = None, *, out_recip: float | torch.Tensor | None = None,
                         out_dtype: torch.dtype = torch.float16,
                         config: AttentionConfig | None = None) -> torch.Tensor:
    """-imh attention: context [batch * S, heads * D] of `codes` [batch * S, 3 * heads * D] (Q, K, V's INT8
    codes as the QKV GEMM writes them, with `scales`); key_bias and out_recip as in fused_attention. See the
    module docstring for the math."""
    s, d = _check_int8(codes, batch, heads, key_bias)
    out, per_channel, recip = context_out(batch * s, heads * d, out_recip, out_dtype, codes.device)
    if s == 0:
        return out
    cfg = config or INT8_CANDIDATE_CONFIGS[0]
    if not cfg.int8:
        raise ValueError(f"fused_attention_int8: {cfg.name} is not an INT8 attention configuration")
    use_pdl = common.pdl(codes.device)
    qk, pv = int8_scales(scales, d)
    grid = (triton.cdiv(s, cfg.block_m), batch * heads)
    attention_int8_kernel[grid](
        codes, key_bias if key_bias is not None else codes, out, recip, s, heads, qk * LOG2E,
        common.out_recip(scales.probs), pv, codes.stride(0), out.stride(0),
        HAS_BIAS=key_bias is not None, OUT_FORMAT=common.kernel_format(out_recip), RECIP_PER_CHANNEL=per_channel, D=d,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, EVEN=s % cfg.block_m == 0 and s % cfg.block_n == 0, PDL=use_pdl,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, launch_pdl=use_pdl)
    return out


def int8_scales(scales: AttentionScales, d: int) -> tuple[float, float]:
    """float32(s_q * s_k / sqrt(d)) and float32(s_p * s_v), each product rounded once."""
    f32 = lambda x: float(torch.tensor(x, dtype=torch.float32))  # noqa: E731
    return f32(scales.q * scales.k / math.sqrt(d)), f32(scales.probs * scales.v)


def attention_int8_reference(codes: torch.Tensor, batch: int, heads: int, scales: AttentionScales,
                             key_bias: torch.Tensor | None = None, *, out_recip: float | torch.Tensor | None = None,
                             out_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """The definition of fused_attention_int8's output in torch ops (module docstring): the integer dots exact
    (float64), the rest float32."""
    s, d = _check_int8(codes, batch, heads, key_bias)
    qk, pv = int8_scales(scales, d)
    q, k, v = codes.double().view(batch, s, 3, heads, d).permute(2, 0, 3, 1, 4)  # each [batch, heads, S, D]
    scores = (q @ k.transpose(-1, -2)).float() * qk
    if key_bias is not None:
        scores = scores + key_bias.float()[:, None, None, :]
    pc = codes_reference(scores.softmax(-1), common.out_recip(scales.probs))
    ctx = ((pc.double() @ v).float() * pv).transpose(1, 2).reshape(batch * s, heads * d)
    if out_recip is not None:
        return codes_reference(ctx, out_recip)
    return ctx.to(out_dtype)
