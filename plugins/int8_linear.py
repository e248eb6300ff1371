"""INT8 Linear with its epilogue fused: int8 x int8 -> int32 GEMM, dequantize, bias, [GELU], [residual], out.

One kernel replaces the engine's `_int_mm` + scale + bias + cast (+ GELU, + residual add, + the next GEMM's
quantization): the int32 accumulator never leaves registers, and the output is written once, in FP16/FP32 or
directly as the INT8 codes the next GEMM reads. GemmConfig picks the tiles and how operands reach shared memory
(pointer loads, or Hopper's TMA, optionally persistent); a small-M GEMM with a long K may split K over two
launches (int32 partials, summed exactly, then the same epilogue), which changes nothing in the math below.

The same kernels run the FP8 E4M3 GEMM (plugins/fp8_linear.py: fp8_linear, launched by `quantized_linear` here,
the one launch path): E4M3 codes in, each product exact in float32 and the sums float32 (partials of split K
too), so only the accumulation order differs from its reference; and every kernel writes INT8 or E4M3 codes out
(OUT_FORMAT; plugins.common.codes).

The math (int8_linear_reference defines it; float32 throughout the epilogue):

    acc[m, n] = sum_k a_q[m, k] * w_q[n, k]                      exact, int32
    s[n]      = float32(w_scale[n] * float32(a_scale))           one rounding
    y         = float32(acc) * s[n] + bias[n]
    y         = gelu_tanh(y)                                     if gelu (model.bert.gelu_tanh)
    y         = y + float32(residual[m, n])                      if residual is given (FP)
    y         = y + float32(residual[m, n]) * res_scale[n]       if it is given as codes (-iln: INT8, or E4M3)
    out       = codes(y) if out_recip is given else y.to(out_dtype)

codes(y) = clamp(round_half_even(y * out_recip), -127, 127), with out_recip a float32 number or one per output
channel (a float32 [N] vector: a site calibrated with smoothing, quant/smoothing.py), is taken from the float32
`y` itself, with no FP16 rounding in between: a deliberate change from the engine's unfused path (which rounds to
FP16 first), one rounding fewer. The kernel is compiled without FP contraction (enable_fp_fusion=False), so
`acc * s + bias` rounds twice, as the reference's separate torch ops do: without GELU its outputs equal the
reference bit for bit. The GELU is the tanh form (model.bert.gelu_tanh): BERT's exact-erf GELU made FC1 at
128 x 384 1.58x slower (docs/gelu-h200.md: the epilogue runs after the tensor-core work, not beside it). On the
GPU its tanh is the hardware's approximation (epilogue_gelu), so a value may differ from the reference by about 2**-11
relative, and an INT8 code by 1 where y * out_recip sits near a .5 boundary; under GELU, `acc * s + bias` is
one multiply-add (one rounding) and the codes skip the clamp at -127 where GELU's floor cannot reach it.

FC1's epilogue (GELU, codes of 200 M values at BERT-large 128 x 384) runs after its tile's tensor-core work, so
its instruction count shows in the GEMM's time: codes taken from the float's bits (no float-to-int conversion,
int8_codes), GELU in five multiplies and multiply-adds, no clamp at -127 took FC1 from 456 to 404 us on an H200
(BENCHMARKS.md, call T5).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from model.bert import gelu_tanh
from quant.formats import FP8_E4M3, INT8, QuantFormat
from plugins import common, interpreted
from plugins.common import await_inputs, codes, codes_reference, pdl, tma_ok

LOADS = ("ptr", "tma", "tma-persistent")


@dataclass(frozen=True)
class GemmConfig:
    """Tile shape and launch parameters; the engine builder times CANDIDATE_CONFIGS and stores the winner."""
    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3
    # How operand tiles reach shared memory: "ptr" (pointer loads, one program per output tile), "tma" (Hopper's
    # tensor memory accelerator, one program per tile) or "tma-persistent" (TMA, one program per SM looping over
    # tiles, so one tile's epilogue overlaps the next tile's loads). (Triton's automatic warp specialization of
    # these loops was slower on an H200, 1.06-1.8x, or did not compile: BENCHMARKS.md, "PDL" section.)
    loads: str = "ptr"
    # split_k > 1 (pointer loads only): K is cut into split_k slices, one program per (tile, slice) writes its
    # int32 partial sums, and a second kernel adds them (exactly) and runs the epilogue. More programs for the
    # few output tiles of a small-M GEMM with a long K (FC2 at batch 1: 16 tiles of 64 x 64 for 132 SMs).
    split_k: int = 1
    # prefetch (pointer loads only): under programmatic dependent launch (plugins.common.await_inputs) a program
    # starts while the kernel before it still runs; it first asks L2 for its own weight panel, which depends on
    # no earlier kernel, and only then waits for its inputs. At batch 1 the weights are most of a GEMM's bytes.
    prefetch: bool = False
    # tma_store (TMA loads only): the epilogue reads the residual tile and writes the output tile through TMA
    # descriptors (one bulk copy each, clipped at the edges by the copy engine) instead of a masked pointer access
    # per element in the accumulator's register layout.
    tma_store: bool = False
    # fast_accum (FP8 codes only; INT8 sums are exact int32 whatever it says): the wgmma accumulator runs the whole
    # K loop at the tensor cores' own precision (Triton's sm_90 default; cuBLASLt's use_fast_accum) instead of
    # being added into float32 after every BLOCK_K step, which takes a second accumulator's registers and an add
    # per accumulator register and step (benchmarks/kernel_ptx_stats.py --fp8). Its outputs move further from the
    # reference's float32 sums, and the build's agreement rule (engines.tuning.agrees) decides per GEMM whether
    # they still agree.
    fast_accum: bool = False

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"GemmConfig.{name} must be a power of two >= 16, got {v}")
        if self.group_m < 1 or self.num_warps < 1 or self.num_stages < 1:
            raise ValueError(f"GemmConfig: group_m, num_warps and num_stages must be positive: {self}")
        if self.loads not in LOADS:
            raise ValueError(f"GemmConfig.loads must be one of {', '.join(LOADS)}, got {self.loads!r}")
        if self.split_k < 1 or (self.split_k > 1 and self.tma):
            raise ValueError(f"GemmConfig.split_k must be >= 1, and 1 with TMA loads: {self}")
        if self.prefetch and self.tma:
            raise ValueError(f"GemmConfig.prefetch needs pointer loads: {self}")
        if self.tma_store and not self.tma:
            raise ValueError(f"GemmConfig.tma_store needs TMA loads: {self}")

    @property
    def small_m(self) -> bool:
        """Meant for a few rows only (batch 1): split K and weight prefetch; builds time them at m <= 2048."""
        return self.split_k > 1 or self.prefetch

    @property
    def tma(self) -> bool:
        return self.loads != "ptr"


# Hopper (H100) candidates. Narrow tiles give small-M problems (batch 1 x 128 tokens) enough programs to fill
# 132 SMs; 128-row tiles with 64/128-deep K steps feed the tensor cores (wgmma from block_m 64) at large M. int8
# blocks of 128 in K are 128-byte rows, the widest shared-memory swizzle. Shared memory per stage is
# (block_m + block_n) * block_k bytes, at most 144 KiB here. Compiled for sm_90 (Triton 3.9, ptxas), none spills
# registers except 128x256, in its GELU and residual epilogues (~100-300 bytes): still the widest tile for the
# plain epilogue at large M, and the builder's timing decides.
CANDIDATE_CONFIGS: tuple[GemmConfig, ...] = (
    GemmConfig(16, 32, 128, 8, 4, 4),
    GemmConfig(16, 64, 128, 8, 4, 4),
    GemmConfig(32, 64, 128, 8, 4, 4),
    GemmConfig(32, 128, 128, 8, 4, 4),
    GemmConfig(64, 64, 128, 8, 4, 4),
    GemmConfig(64, 128, 128, 8, 4, 4),
    GemmConfig(128, 64, 128, 8, 4, 4),
    GemmConfig(128, 128, 64, 8, 8, 4),
    GemmConfig(128, 128, 128, 8, 8, 3),
    GemmConfig(128, 256, 128, 8, 8, 3),
    GemmConfig(256, 128, 128, 8, 8, 3),
    GemmConfig(128, 256, 64, 8, 8, 4),
    GemmConfig(256, 128, 64, 8, 8, 4),
    GemmConfig(128, 128, 128, 8, 4, 4),
    # TMA loads (sm_90+; elsewhere they fail to compile and the builder's timing leaves them out).
    GemmConfig(64, 64, 128, 8, 4, 4, "tma"),
    GemmConfig(64, 128, 128, 8, 4, 4, "tma"),
    GemmConfig(128, 128, 128, 8, 8, 4, "tma"),
    # one warpgroup on a 128 x 128 tile, 3 stages (96 KiB): two programs fit on an SM, so one's epilogue runs
    # beside the other's tensor-core work (the best FC1 at 128 x 384 on an H200, docs/gelu-h200.md)
    GemmConfig(128, 128, 128, 8, 4, 3, "tma"),
    GemmConfig(128, 128, 128, 8, 8, 4, "tma-persistent"),
    GemmConfig(128, 256, 128, 8, 8, 3, "tma-persistent"),
    GemmConfig(256, 128, 128, 8, 8, 3, "tma-persistent"),
    GemmConfig(128, 256, 64, 8, 8, 4, "tma-persistent"),
    # The epilogue through TMA too (tma_store). On an H200 at BERT-large 128 x 384 (BENCHMARKS.md, call Q1) it
    # made 128x128x64 faster at every GEMM (1.02-1.11x; best for attention-out), FC1's 128x128x128 1.02x; the
    # two-program 128x128x128 tile with FP16 output lost its second program to the store buffer (1.3-1.4x slower);
    # 128x256 persistent came second for QKV but has no room for the residual's tile.
    GemmConfig(128, 128, 64, 8, 4, 4, "tma", tma_store=True),
    GemmConfig(128, 128, 128, 8, 4, 3, "tma", tma_store=True),
    # Split K, for batch-1 GEMMs with few output tiles and a long K.
    GemmConfig(64, 64, 128, 8, 4, 4, split_k=2),
    GemmConfig(64, 64, 128, 8, 4, 4, split_k=4),
    GemmConfig(32, 64, 128, 8, 4, 4, split_k=4),
    # Batch 1 with weight prefetch: H200 builds at 1 x 128 (BENCHMARKS.md, calls P2-P4) chose these for QKV,
    # attention-out and FC1, and for BERT-base's FC2 too. 128-row tiles (each weight read once at M = 128), with
    # and without split K, won no GEMM in P2 and were dropped.
    GemmConfig(16, 32, 128, 8, 4, 4, prefetch=True),
    GemmConfig(32, 64, 128, 8, 4, 4, prefetch=True),
    GemmConfig(64, 64, 128, 8, 4, 4, prefetch=True),
    GemmConfig(64, 64, 128, 8, 4, 4, split_k=4, prefetch=True),
)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # the interpreter: pretend to be an H100 so the choice is the same as on one


def default_config(m: int, n: int, device: torch.device | str = "cuda") -> GemmConfig:
    """The largest tile that still gives every SM a program; the smallest when even that is too few."""
    sms = _sm_count(torch.device(device))
    # TMA needs sm_90 and split K pays off only where the builder's timing says so
    portable = [c for c in CANDIDATE_CONFIGS if not c.tma and not c.small_m]
    by_area = sorted(portable, key=lambda c: (c.block_m * c.block_n, c.block_m, c.block_k), reverse=True)
    for c in by_area:
        if triton.cdiv(m, c.block_m) * triton.cdiv(n, c.block_n) >= sms:
            return c
    return by_area[-1]


@triton.jit
def _tile(t, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Output tile (row, column) of tile number t. Programs start roughly in order; walking GROUP_M row-tiles down
    a column of tiles before stepping right means the programs resident at one time share a few panels of A and
    W, which then stay in L2."""
    tiles_m = (M + BLOCK_M - 1) // BLOCK_M  # tl.cdiv, spelled out (plugins/__init__.py says why)
    per_group = GROUP_M * ((N + BLOCK_N - 1) // BLOCK_N)
    first_m = (t // per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    return first_m + (t % per_group) % group_rows, (t % per_group) // group_rows


@triton.jit
def _prefetch_l2(ptrs):
    """Ask L2 for the 128-byte line at each pointer (no register result: the load itself comes later)."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def _prefetch_weights(w_ptr, offs_n, n_ok, k0, steps, K, stride_wn, BLOCK_K: tl.constexpr):
    """Prefetch rows offs_n of W over K in [k0, k0 + steps * BLOCK_K), one 128-byte line per row and step (BLOCK_K
    is at least 128 in every prefetching candidate; a smaller one prefetches every other line, still correct)."""
    rows = w_ptr + tl.where(n_ok, offs_n, 0).to(tl.int64) * stride_wn
    for k in range(0, steps):
        kk = k0 + k * BLOCK_K
        if kk < K:
            _prefetch_l2(rows + kk)


@triton.jit
def _zero_acc(BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, FLOAT_ACC: tl.constexpr):
    """A tile's accumulator: float32 for float operands (FP8 codes, fp16_linear's FP16), else int32."""
    if FLOAT_ACC:
        return tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    else:
        return tl.full((BLOCK_M, BLOCK_N), 0, tl.int32)


@triton.jit
def _mma(a, w, acc, FP8: tl.constexpr, BLOCK_K: tl.constexpr, FAST_ACC: tl.constexpr):
    """acc + a @ w on the tensor cores, in acc's dtype. FP8 (E4M3 x E4M3, float32 sums): Hopper's wgmma adds FP8
    products in an accumulator that keeps fewer bits than float32 (about 14, DeepSeek-V3's report measured), and
    Triton's sm_90 default lets it run over the whole K loop; here each BLOCK_K step's sum (64 or 128 products,
    DeepSeek-V3's interval) is added to acc in float32 (max_num_imprecise_acc), as cuBLASLt does unless asked for
    fast accumulation (PTX: a fresh wgmma accumulator per step, then add.rn.f32 into acc). FAST_ACC
    (GemmConfig.fast_accum): the default instead, no step-wise add. The `cuda` tests hold both to the reference."""
    if FP8 and FAST_ACC:
        return tl.dot(a, w, acc, out_dtype=tl.float32)
    elif FP8:
        return tl.dot(a, w, acc, out_dtype=tl.float32, max_num_imprecise_acc=BLOCK_K)
    else:
        return tl.dot(a, w, acc, out_dtype=acc.dtype)


@triton.jit
def _load_k(ptrs, k_ok, EVEN_K: tl.constexpr, FP8: tl.constexpr):
    """An operand tile; without EVEN_K, elements past K (not k_ok) read as zero (FP8 0.0: a masked code must not
    be a NaN pattern, whose product with 0 would be NaN)."""
    if EVEN_K:
        return tl.load(ptrs)
    elif FP8:
        return tl.load(ptrs, mask=k_ok, other=0.0)
    else:
        return tl.load(ptrs, mask=k_ok, other=0)


@triton.jit
def _dot_k_range(a_ptr, w_ptr, offs_m, offs_n, m_ok, n_ok, k0, steps, K, stride_am, stride_wn,
                 EVEN_K: tl.constexpr, FP8: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, FAST_ACC: tl.constexpr = False):
    """The sum over K in [k0, k0 + steps * BLOCK_K) of an output tile (int32 exact, or float32 for FP8 codes), by
    pointer loads; EVEN_K: the range lies inside K (no masks). Rows/columns past the edge read row/column 0
    instead of masking every load; their results are not stored."""
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + tl.where(m_ok, offs_m, 0).to(tl.int64)[:, None] * stride_am + (k0 + offs_k)[None, :]
    # a [BLOCK_K, BLOCK_N] tile of W^T, K-major
    w_ptrs = w_ptr + tl.where(n_ok, offs_n, 0).to(tl.int64)[None, :] * stride_wn + (k0 + offs_k)[:, None]
    acc = _zero_acc(BLOCK_M, BLOCK_N, FP8)
    for k in range(0, steps):
        k_left = K - k0 - k * BLOCK_K
        a = _load_k(a_ptrs, offs_k[None, :] < k_left, EVEN_K, FP8)
        w = _load_k(w_ptrs, offs_k[:, None] < k_left, EVEN_K, FP8)
        acc = _mma(a, w, acc, FP8, BLOCK_K, FAST_ACC)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    return acc


@triton.jit
def quantized_linear_kernel(a_ptr, w_ptr, w_scale_ptr, bias_ptr, res_ptr, out_ptr,
                            M, N, K, a_scale, out_recip, res_scale,
                            stride_am, stride_wn, stride_rm, stride_om,
                            HAS_RESIDUAL: tl.constexpr, GELU: tl.constexpr, OUT_FORMAT: tl.constexpr,
                            RECIP_PER_CHANNEL: tl.constexpr, RES_CODES: tl.constexpr, RES_PER_CHANNEL: tl.constexpr,
                            CLAMP_LOW: tl.constexpr, EVEN_K: tl.constexpr, FP8: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, PDL: tl.constexpr,
                            PREFETCH: tl.constexpr, FAST_ACC: tl.constexpr = False):
    # FP8: the operands are E4M3 codes (float32 sums), else INT8 codes (int32 sums). OUT_FORMAT: "fp" (values in
    # out's dtype), "int8" or "fp8_e4m3" (that format's codes; plugins.common.codes).
    pid_m, pid_n = _tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    if PREFETCH:  # the weights: no earlier kernel writes them
        _prefetch_weights(w_ptr, offs_n, n_ok, 0, (K + BLOCK_K - 1) // BLOCK_K, K, stride_wn, BLOCK_K)
    await_inputs(PDL)
    acc = _dot_k_range(a_ptr, w_ptr, offs_m, offs_n, m_ok, n_ok, 0, (K + BLOCK_K - 1) // BLOCK_K, K,
                       stride_am, stride_wn, EVEN_K, FP8, BLOCK_M, BLOCK_N, BLOCK_K, FAST_ACC)
    mask = m_ok[:, None] & n_ok[None, :]
    rows = offs_m.to(tl.int64)[:, None]
    _epilogue(acc, offs_n, n_ok, rows, mask, w_scale_ptr, bias_ptr, res_ptr, out_ptr, a_scale, out_recip,
              res_scale, stride_rm, stride_om, HAS_RESIDUAL, GELU, OUT_FORMAT, RECIP_PER_CHANNEL, RES_CODES,
              RES_PER_CHANNEL, CLAMP_LOW)


@triton.jit
def _quantized_linear_tma_kernel(a_desc, w_desc, w_scale_ptr, bias_ptr, res_ptr, out_ptr,
                                 M, N, K, a_scale, out_recip, res_scale, stride_rm, stride_om,
                                 HAS_RESIDUAL: tl.constexpr, GELU: tl.constexpr, OUT_FORMAT: tl.constexpr,
                                 RECIP_PER_CHANNEL: tl.constexpr, RES_CODES: tl.constexpr,
                                 RES_PER_CHANNEL: tl.constexpr, CLAMP_LOW: tl.constexpr, FP8: tl.constexpr,
                                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                 BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, PERSISTENT: tl.constexpr,
                                 PDL: tl.constexpr, res_desc=None, out_desc=None, FLOAT_IN: tl.constexpr = False,
                                 FAST_ACC: tl.constexpr = False):
    """quantized_linear_kernel with operand tiles fetched by TMA (host-made descriptors; the copy engine zero-fills
    past the edges, so no masks and no K-tail branch). PERSISTENT: the grid is at most one program per SM and
    each walks tiles pid, pid + grid, ...; the flattened loop lets the compiler's pipeliner issue the next
    tile's loads while this tile's epilogue runs. out_desc (and res_desc with a residual): the epilogue's tiles
    go through TMA too (GemmConfig.tma_store)."""
    await_inputs(PDL)
    tiles = ((M + BLOCK_M - 1) // BLOCK_M) * ((N + BLOCK_N - 1) // BLOCK_N)
    k_steps = (K + BLOCK_K - 1) // BLOCK_K
    step = tl.num_programs(0) if PERSISTENT else tiles
    for tile in tl.range(tl.program_id(0), tiles, step, flatten=PERSISTENT):
        pid_m, pid_n = _tile(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        acc = _zero_acc(BLOCK_M, BLOCK_N, FLOAT_IN or FP8)  # FLOAT_IN: fp16_linear's FP16 operands
        for k in range(0, k_steps):
            a = a_desc.load([pid_m * BLOCK_M, k * BLOCK_K])
            # [BLOCK_N, BLOCK_K]: K-major, as wgmma wants INT8 and FP8 operands
            w = w_desc.load([pid_n * BLOCK_N, k * BLOCK_K])
            acc = _mma(a, w.T, acc, FP8, BLOCK_K, FAST_ACC)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        if out_desc is not None:
            y = _epilogue_math(acc, offs_n, n_ok, w_scale_ptr, bias_ptr, a_scale, GELU)
            if HAS_RESIDUAL:
                y = y + _residual(res_desc.load([pid_m * BLOCK_M, pid_n * BLOCK_N]), offs_n, n_ok, res_scale,
                                  RES_CODES, RES_PER_CHANNEL)
            out_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N],
                           _output(y, offs_n, n_ok, out_recip, out_ptr, OUT_FORMAT, RECIP_PER_CHANNEL, CLAMP_LOW))
        else:
            offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            mask = (offs_m < M)[:, None] & n_ok[None, :]
            _epilogue(acc, offs_n, n_ok, offs_m.to(tl.int64)[:, None], mask, w_scale_ptr, bias_ptr, res_ptr,
                      out_ptr, a_scale, out_recip, res_scale, stride_rm, stride_om, HAS_RESIDUAL, GELU,
                      OUT_FORMAT, RECIP_PER_CHANNEL, RES_CODES, RES_PER_CHANNEL, CLAMP_LOW)


@triton.jit
def _partial_kernel(a_ptr, w_ptr, part_ptr, M, N, K, k_slice, stride_am, stride_wn, stride_part,
                    EVEN_K: tl.constexpr, FP8: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, PDL: tl.constexpr,
                    PREFETCH: tl.constexpr, FAST_ACC: tl.constexpr = False):
    """Split K, step 1: program (tile, s) sums K slice s, [s * k_slice, (s + 1) * k_slice), of its output tile
    into part[s] ([M, N], int32, or float32 for FP8 codes; stride_part = M * N elements apart); EVEN_K: every
    slice is whole BLOCK_K steps inside K (no masks)."""
    pid_m, pid_n = _tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    k0 = tl.program_id(1) * k_slice

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    if PREFETCH:
        _prefetch_weights(w_ptr, offs_n, n_ok, k0, k_slice // BLOCK_K, K, stride_wn, BLOCK_K)
    await_inputs(PDL)
    acc = _dot_k_range(a_ptr, w_ptr, offs_m, offs_n, m_ok, n_ok, k0, k_slice // BLOCK_K, K, stride_am, stride_wn,
                       EVEN_K, FP8, BLOCK_M, BLOCK_N, BLOCK_K, FAST_ACC)
    offs = tl.program_id(1).to(tl.int64) * stride_part + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    tl.store(part_ptr + offs, acc, mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _splitk_epilogue_kernel(part_ptr, w_scale_ptr, bias_ptr, res_ptr, out_ptr, M, N, a_scale, out_recip,
                            res_scale, stride_rm, stride_om, stride_part, SPLIT_K: tl.constexpr,
                            HAS_RESIDUAL: tl.constexpr, GELU: tl.constexpr, OUT_FORMAT: tl.constexpr,
                            RECIP_PER_CHANNEL: tl.constexpr, RES_CODES: tl.constexpr, RES_PER_CHANNEL: tl.constexpr,
                            CLAMP_LOW: tl.constexpr, FP8: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr, PDL: tl.constexpr):
    """Split K, step 2: the sum of the slices' partials (exact in int32; for FP8 codes float32, slice by slice),
    then the one epilogue."""
    await_inputs(PDL)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    mask = (offs_m < M)[:, None] & n_ok[None, :]
    rows = offs_m.to(tl.int64)[:, None]
    acc = _zero_acc(BLOCK_M, BLOCK_N, FP8)
    part_ptrs = part_ptr + rows * N + offs_n[None, :]
    for s in range(SPLIT_K):
        acc += tl.load(part_ptrs, mask=mask, other=0)
        part_ptrs += stride_part
    _epilogue(acc, offs_n, n_ok, rows, mask, w_scale_ptr, bias_ptr, res_ptr, out_ptr, a_scale, out_recip,
              res_scale, stride_rm, stride_om, HAS_RESIDUAL, GELU, OUT_FORMAT, RECIP_PER_CHANNEL, RES_CODES,
              RES_PER_CHANNEL, CLAMP_LOW)


# GELU's tanh through the GPU's tanh instruction: one special-function op per element, where the exp form below
# needs two (exp and a reciprocal) and erf more; FC1 at BERT-large 128 x 384 on an H200 took 461 us with it, 597
# with the exp form and 728 with BERT's erf GELU, same run (docs/gelu-h200.md). The instruction's relative error
# is at most about 2**-11, so a code can differ from the reference by 1 near a .5 boundary. The interpreter (CPU
# tests) has no such instruction and computes the exp form, the reference's own.
_HW_TANH = tl.constexpr(not interpreted())
# The tanh-form GELU's minimum is -0.16997 (at y = -0.7518); with margin for the tanh instruction's error.
GELU_FLOOR = -0.1705


@triton.jit
def gelu_tanh_exp(y):
    """model.bert.gelu_tanh op for op: y / (1 + exp(-2u))."""
    u = y + 0.044715 * (y * y * y)
    return tl.fdiv(y, 1.0 + tl.exp(-1.5957691216057308 * u))


@triton.jit
def epilogue_gelu(y):
    """model.bert.gelu_tanh of a float32 block."""
    if _HW_TANH:  # u = sqrt(2/pi) (y + 0.044715 y^3), then 0.5 y (1 + tanh u): 3 multiplies, 2 multiply-adds
        u = y * tl.fma(y * y, 0.035677408136300125, 0.7978845608028654)  # sqrt(2/pi) * 0.044715, sqrt(2/pi)
        t = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [u], dtype=tl.float32, is_pure=True,
                                      pack=1)
        h = 0.5 * y
        return tl.fma(h, t, h)
    else:
        return gelu_tanh_exp(y)


@triton.jit
def _epilogue_math(acc, offs_n, n_ok, w_scale_ptr, bias_ptr, a_scale, GELU: tl.constexpr):
    """The epilogue up to the residual: dequantize (w_scale_ptr None: a float accumulator, nothing to do), bias,
    [GELU], in float32."""
    bias = tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0)
    if w_scale_ptr is None:
        y = acc + bias[None, :]
    else:
        scale = tl.load(w_scale_ptr + offs_n, mask=n_ok, other=0.0) * a_scale
        if GELU:  # one rounding fewer than the reference's: GELU's approximations are larger
            y = tl.fma(acc.to(tl.float32), scale[None, :], bias[None, :])
        else:
            y = acc.to(tl.float32) * scale[None, :] + bias[None, :]
    if GELU:
        y = epilogue_gelu(y)
    return y


@triton.jit
def _output(y, offs_n, n_ok, out_recip, out_ptr, OUT_FORMAT: tl.constexpr, RECIP_PER_CHANNEL: tl.constexpr,
            CLAMP_LOW: tl.constexpr):
    """What is stored: y's codes in OUT_FORMAT ("int8" or "fp8_e4m3"; without the clamp at -qmax unless
    CLAMP_LOW), or with OUT_FORMAT "fp" y in the output's dtype."""
    if OUT_FORMAT == "fp":
        return y.to(out_ptr.dtype.element_ty)
    else:
        if RECIP_PER_CHANNEL:  # out_recip points at float32 [N]
            recip = tl.load(out_recip + offs_n, mask=n_ok, other=0.0)[None, :]
        else:
            recip = out_recip
        return codes(y, recip, OUT_FORMAT, CLAMP_LOW)


@triton.jit
def _codes_to_float(c):
    """INT8 codes as float32, exactly, with integer and float adds: 0x4B400000 + c is the bit pattern of
    1.5 * 2**23 + c, and subtracting 1.5 * 2**23 leaves c. A conversion instruction (I2F) runs on the GPU's
    quarter-rate pipe, which the epilogue's other conversions keep busy."""
    return (c.to(tl.int32) + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0


@triton.jit
def _residual(r, offs_n, n_ok, res_scale, RES_CODES: tl.constexpr, RES_PER_CHANNEL: tl.constexpr):
    """A residual tile in float32: as stored, or codes (INT8, or E4M3 under --fp8 -iln) times their scale (-iln's
    residual stream; res_scale a float32 number, or with RES_PER_CHANNEL a pointer to float32 [N]).

    Codes become floats through _codes_to_float, with no conversion instruction: cast to FP16 and then to
    float32 (an earlier form), each code took an I2F on the quarter-rate pipe, and Triton moved the tile into
    the accumulator's layout as 16-bit values; a plain cast to float32 moved 32-bit ones (30 barriers in the
    128x128 epilogue against the FP16 residual's 22). Compiled for sm_90 on the CPU (triton 3.9, SASS through
    nvdisasm: `python3 -m benchmarks.kernel_ptx_stats --sass`), this form has no I2F, 18 barriers and 24 shared-memory
    stores against 22 and 32 for the FP16 residual."""
    r = _codes_to_float(r) if RES_CODES and r.dtype == tl.int8 else r.to(tl.float32)  # E4M3 codes: exact cast
    if RES_CODES:
        if RES_PER_CHANNEL:
            r = r * tl.load(res_scale + offs_n, mask=n_ok, other=0.0)[None, :]
        else:
            r = r * res_scale
    return r


@triton.jit
def _epilogue(acc, offs_n, n_ok, rows, mask, w_scale_ptr, bias_ptr, res_ptr, out_ptr, a_scale, out_recip,
              res_scale, stride_rm, stride_om, HAS_RESIDUAL: tl.constexpr, GELU: tl.constexpr,
              OUT_FORMAT: tl.constexpr, RECIP_PER_CHANNEL: tl.constexpr, RES_CODES: tl.constexpr,
              RES_PER_CHANNEL: tl.constexpr, CLAMP_LOW: tl.constexpr):
    y = _epilogue_math(acc, offs_n, n_ok, w_scale_ptr, bias_ptr, a_scale, GELU)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + rows * stride_rm + offs_n[None, :], mask=mask, other=0.0)
        y = y + _residual(r, offs_n, n_ok, res_scale, RES_CODES, RES_PER_CHANNEL)
    tl.store(out_ptr + rows * stride_om + offs_n[None, :],
             _output(y, offs_n, n_ok, out_recip, out_ptr, OUT_FORMAT, RECIP_PER_CHANNEL, CLAMP_LOW), mask=mask)


_NAMES = {INT8.name: "int8_linear", FP8_E4M3.name: "fp8_linear"}  # the wrappers, by input format, for messages
CODE_DTYPES = (INT8.dtype, FP8_E4M3.dtype)  # a residual of these dtypes is codes, read with its residual_scale


def check_arguments(fmt: QuantFormat, a_q, w_q, w_scale, bias, residual, residual_scale, out_dtype):
    """Raise ValueError unless the operands suit the quantized GEMM of `fmt` (any family's: the shapes, dtypes and
    layouts int8_linear documents)."""
    name = _NAMES[fmt.name]
    if a_q.dtype != fmt.dtype or w_q.dtype != fmt.dtype or a_q.dim() != 2 or w_q.dim() != 2:
        raise ValueError(f"{name}: a_q and w_q must be 2-D {fmt.dtype}, got {a_q.dtype} {tuple(a_q.shape)} and "
                         f"{w_q.dtype} {tuple(w_q.shape)}")
    (m, k), n = a_q.shape, w_q.shape[0]
    if w_q.shape[1] != k:
        raise ValueError(f"{name}: a_q is [M, {k}] but w_q is {tuple(w_q.shape)}, expected [N, {k}]")
    if a_q.stride(1) != 1 or not w_q.is_contiguous():
        raise ValueError(f"{name}: a_q needs unit stride along K and w_q must be contiguous")
    for what, t in (("w_scale", w_scale), ("bias", bias)):
        if t.dtype != torch.float32 or t.shape != (n,) or not t.is_contiguous():
            raise ValueError(f"{name}: {what} must be a contiguous float32 [{n}], got {t.dtype} {tuple(t.shape)}")
    res_codes = residual is not None and residual.dtype in CODE_DTYPES
    if residual is not None and (residual.shape != (m, n) or residual.stride(1) != 1
                                 or not (residual.dtype.is_floating_point or res_codes)):
        raise ValueError(f"{name}: residual must be floating or codes [{m}, {n}] with unit stride along N, got "
                         f"{residual.dtype} {tuple(residual.shape)}")
    if res_codes != (residual_scale is not None):
        raise ValueError(f"{name}: a residual given as codes (int8 or E4M3) needs its residual_scale, and only it "
                         "takes one")
    if out_dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"{name}: out_dtype must be float16, bfloat16 or float32, got {out_dtype}")
    devices = {t.device for t in (a_q, w_q, w_scale, bias) + ((residual,) if residual is not None else ())}
    if len(devices) != 1:
        raise ValueError(f"{name}: all tensors must be on one device, got {sorted(map(str, devices))}")
    check_vector(name, "residual_scale", residual_scale, n, a_q.device)


def check_vector(name: str, what: str, v, n: int, device: torch.device) -> None:
    """A per-channel scale or reciprocal (a tensor; a number or None needs no check) must be float32 [n]."""
    if isinstance(v, torch.Tensor) and (v.shape != (n,) or v.dtype != torch.float32 or not v.is_contiguous()
                                        or v.device != device):
        raise ValueError(f"{name}: a per-channel {what} must be a contiguous float32 [{n}] on {device}, got "
                         f"{v.dtype} {tuple(v.shape)} on {v.device}")


def int8_linear(a_q: torch.Tensor, w_q: torch.Tensor, a_scale: float, w_scale: torch.Tensor,
                bias: torch.Tensor, *, residual: torch.Tensor | None = None,
                residual_scale: float | torch.Tensor | None = None, gelu: bool = False,
                out_recip: float | torch.Tensor | None = None, out_dtype: torch.dtype = torch.float16,
                config: GemmConfig | None = None) -> torch.Tensor:
    """a_q int8 [M, K] (per-tensor `a_scale`) times w_q int8 [N, K] (per-row `w_scale` float32 [N]), plus
    float32 `bias` [N]; see the module docstring for the epilogue. Returns [M, N]: int8 codes when `out_recip`
    (a float32 reciprocal of the output scale, plugins.common.out_recip, or a contiguous float32 [N] tensor of
    them, one per channel) is given, else `out_dtype`. `residual` is FP, or INT8 codes with their
    `residual_scale` (a float, or a contiguous float32 [N] tensor): -iln's residual stream, read as 1 byte.

    `a_scale` is multiplied into w_scale inside the kernel, in float32 exactly as the reference does on the
    host, so calls need no extra launch and capture into CUDA graphs as they are. `config` picks the tiles
    (default_config when None).
    """
    return quantized_linear(INT8, a_q, w_q, a_scale, w_scale, bias, residual=residual, residual_scale=residual_scale,
                            gelu=gelu, out_recip=out_recip, out_format=INT8, out_dtype=out_dtype, config=config)


def quantized_linear(in_format: QuantFormat, a_q: torch.Tensor, w_q: torch.Tensor, a_scale: float,
                     w_scale: torch.Tensor, bias: torch.Tensor, *, residual: torch.Tensor | None,
                     residual_scale: float | torch.Tensor | None, gelu: bool,
                     out_recip: float | torch.Tensor | None, out_format: QuantFormat, out_dtype: torch.dtype,
                     config: GemmConfig | None) -> torch.Tensor:
    """The one launch path of the quantized GEMM kernels: int8_linear's function for `in_format`'s codes (INT8:
    int32 sums; FP8 E4M3, plugins.fp8_linear.fp8_linear: float32 sums), the output's codes in `out_format`
    where `out_recip` is given. Picks the kernel variant the configuration names (pointer, TMA, split K)."""
    check_arguments(in_format, a_q, w_q, w_scale, bias, residual, residual_scale, out_dtype)
    check_vector(_NAMES[in_format.name], "out_recip", out_recip, w_q.shape[0], a_q.device)
    m, k = a_q.shape
    n = w_q.shape[0]
    out_kind = common.kernel_format(out_recip, out_format)
    out = common.empty((m, n), out_format.dtype if out_recip is not None else out_dtype, a_q.device)
    if m == 0 or n == 0:
        return out
    if k == 0:
        raise ValueError(f"{_NAMES[in_format.name]}: K must be positive")
    cfg = config or default_config(m, n, a_q.device)
    res = residual if residual is not None else out  # never read when HAS_RESIDUAL is off
    per_channel = isinstance(out_recip, torch.Tensor)
    recip = out_recip if per_channel else float(out_recip) if out_recip is not None else 1.0
    res_per_channel = isinstance(residual_scale, torch.Tensor)
    res_scale = residual_scale if res_per_channel else float(residual_scale) if residual_scale is not None else 1.0
    flags = _flags(cfg, residual is not None, gelu, out_kind, per_channel, a_q.device, residual_scale is not None,
                   res_per_channel, recip, fp8=in_format is FP8_E4M3)
    tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
    if cfg.tma and tma_ok(a_q) and tma_ok(w_q):
        _launch_tma(a_q, w_q, w_scale, bias, residual, out, float(a_scale), recip, res_scale, cfg, flags)
        return out
    if cfg.split_k > 1:
        return _split_k(a_q, w_q, w_scale, bias, res, out, float(a_scale), recip, res_scale, cfg, flags)
    quantized_linear_kernel[(tiles,)](
        a_q, w_q, w_scale, bias, res, out, m, n, k, float(a_scale), recip, res_scale,
        a_q.stride(0), w_q.stride(0), res.stride(0), out.stride(0), EVEN_K=k % cfg.block_k == 0,
        PREFETCH=cfg.prefetch and flags["PDL"], **flags)
    return out


def fp16_linear(a: torch.Tensor, w: torch.Tensor, bias: torch.Tensor, *, residual: torch.Tensor | None = None,
                gelu: bool = False, config: GemmConfig) -> torch.Tensor:
    """FP16 a [M, K] @ w [N, K].T in float32, + float32 bias [N], [GELU], [+ residual], to FP16: the INT8 TMA
    kernel with FP16 operands and no dequantization (an experiment against cuBLASLt, benchmarks/device_gemm_explore;
    the engine does not use it). TMA configurations and aligned operands only."""
    if not (config.tma and a.dtype == w.dtype == torch.float16 and tma_ok(a) and tma_ok(w) and w.is_contiguous()):
        raise ValueError("fp16_linear: FP16 operands with 16-byte-aligned rows and a TMA configuration only")
    out = common.empty((a.shape[0], w.shape[0]), torch.float16, a.device)
    flags = _flags(config, residual is not None, gelu, common.FP, False, a.device)
    _launch_tma(a, w, None, bias, residual, out, 1.0, 1.0, 1.0, config, {**flags, "FLOAT_IN": True})
    return out


# The least y * out_recip that needs no clamp from below: it rounds to a code in range (plugins.common.codes)
_CLAMP_FREE_ABOVE = {INT8.name: -127.5, FP8_E4M3.name: -448.0}


def _flags(cfg: GemmConfig, residual: bool, gelu: bool, out_format: str, per_channel: bool,
           device: torch.device, res_codes: bool = False, res_per_channel: bool = False,
           recip: float | torch.Tensor = 1.0, fp8: bool = False) -> dict:
    """The GEMM kernels' compile-time switches and launch options for one call (`out_format`: the kernels'
    OUT_FORMAT, plugins.common.kernel_format; `fp8`: E4M3 operands)."""
    use_pdl = pdl(device)
    # GELU's output is at least GELU_FLOOR, so its codes need no clamp from below while GELU_FLOOR * recip stays
    # above _CLAMP_FREE_ABOVE; a per-channel recip (a device tensor, not read here) keeps the clamp.
    floor_free = gelu and out_format != common.FP and not per_channel and \
        GELU_FLOOR * float(recip) > _CLAMP_FREE_ABOVE[out_format]
    return dict(HAS_RESIDUAL=residual, GELU=bool(gelu), OUT_FORMAT=out_format, RECIP_PER_CHANNEL=per_channel,
                RES_CODES=res_codes, RES_PER_CHANNEL=res_per_channel, CLAMP_LOW=not floor_free, FP8=fp8,
                FAST_ACC=fp8 and cfg.fast_accum, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                GROUP_M=cfg.group_m,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=False, PDL=use_pdl,
                launch_pdl=use_pdl)


def _launch_tma(a, w, w_scale, bias, residual, out, a_scale: float, recip, res_scale, cfg: GemmConfig,
                flags: dict) -> None:
    """One launch of the TMA kernel (operand descriptors made here; the epilogue's too with cfg.tma_store, where
    the output and residual meet TMA's alignment rules)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    (m, k), n = a.shape, w.shape[0]
    tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
    persistent = cfg.loads == "tma-persistent"
    tile = [cfg.block_m, cfg.block_n]
    store = cfg.tma_store and all(tma_ok(t) for t in (out, residual) if t is not None)
    res = residual if residual is not None else out  # never read when HAS_RESIDUAL is off
    _quantized_linear_tma_kernel[(min(tiles, _sm_count(a.device)) if persistent else tiles,)](
        TensorDescriptor.from_tensor(a, [cfg.block_m, cfg.block_k]),
        TensorDescriptor.from_tensor(w, [cfg.block_n, cfg.block_k]),
        w_scale, bias, res, out, m, n, k, a_scale, recip, res_scale, res.stride(0), out.stride(0),
        PERSISTENT=persistent,
        res_desc=TensorDescriptor.from_tensor(residual, tile) if store and residual is not None else None,
        out_desc=TensorDescriptor.from_tensor(out, tile) if store else None, **flags)


_SPLITK_EPILOGUE_TILE = (16, 128)  # step 2 is a streaming pass: small tiles, many programs


def _split_k(a_q, w_q, w_scale, bias, res, out, a_scale, recip, res_scale, cfg: GemmConfig,
             flags: dict) -> torch.Tensor:
    """The two launches of a split-K GEMM (GemmConfig.split_k); the partials live in a workspace of
    split_k x M x N int32, or float32 for FP8 codes (2 MB for BERT-large's FC2 at batch 1 x 128, in L2)."""
    m, k = a_q.shape
    n = w_q.shape[0]
    steps = triton.cdiv(triton.cdiv(k, cfg.block_k), cfg.split_k)  # BLOCK_K steps per slice
    part = torch.empty((cfg.split_k, m, n), dtype=torch.float32 if flags["FP8"] else torch.int32, device=a_q.device)
    tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
    _partial_kernel[(tiles, cfg.split_k)](
        a_q, w_q, part, m, n, k, steps * cfg.block_k, a_q.stride(0), w_q.stride(0), part.stride(0),
        EVEN_K=k == steps * cfg.block_k * cfg.split_k, FP8=flags["FP8"], BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        PDL=flags["PDL"], launch_pdl=flags["launch_pdl"], PREFETCH=cfg.prefetch and flags["PDL"],
        FAST_ACC=flags["FAST_ACC"])
    bm, bn = _SPLITK_EPILOGUE_TILE
    epilogue_flags = {key: flags[key] for key in ("HAS_RESIDUAL", "GELU", "OUT_FORMAT", "RECIP_PER_CHANNEL",
                                                   "RES_CODES", "RES_PER_CHANNEL", "CLAMP_LOW", "FP8", "PDL",
                                                   "launch_pdl")}
    _splitk_epilogue_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn))](
        part, w_scale, bias, res, out, m, n, a_scale, recip, res_scale, res.stride(0), out.stride(0), part.stride(0),
        SPLIT_K=cfg.split_k, BLOCK_M=bm, BLOCK_N=bn, num_warps=4, enable_fp_fusion=False, **epilogue_flags)
    return out


# ---------------------------------------------------------------------------------------------- reference

_MIN_ROWS_CUDA = 32  # cuBLASLt's int8 GEMM behind torch._int_mm needs more than 16 rows


def int32_matmul(a_q: torch.Tensor, w_q: torch.Tensor) -> torch.Tensor:
    """Exact a_q @ w_q.T in int32: torch._int_mm where it runs (any shape on the CPU; on CUDA rows padded past
    16, K and N multiples of 8), else a float64 product, exact while |acc| < 2**53 (127 * 127 * K is far less)."""
    m, k = a_q.shape
    n = w_q.shape[0]
    if not a_q.is_cuda:
        return torch._int_mm(a_q.contiguous(), w_q.t())
    if k % 8 == 0 and n % 8 == 0 and k >= 16:
        a = a_q.contiguous()
        if m < _MIN_ROWS_CUDA:
            a = torch.nn.functional.pad(a, (0, 0, 0, _MIN_ROWS_CUDA - m))
        return torch._int_mm(a, w_q.t())[:m]
    return (a_q.double() @ w_q.double().t()).to(torch.int32)


def int8_linear_reference(a_q: torch.Tensor, w_q: torch.Tensor, a_scale: float, w_scale: torch.Tensor,
                          bias: torch.Tensor, *, residual: torch.Tensor | None = None,
                          residual_scale: float | torch.Tensor | None = None, gelu: bool = False,
                          out_recip: float | torch.Tensor | None = None,
                          out_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """The definition of int8_linear's output, one float32 op at a time (module docstring)."""
    if (residual is not None and residual.dtype == torch.int8) != (residual_scale is not None):
        raise ValueError("int8_linear_reference: an int8 residual (codes) needs its residual_scale, and only it "
                         "takes one")
    return quantized_epilogue_reference(int32_matmul(a_q, w_q), a_scale, w_scale, bias, residual=residual,
                                        residual_scale=residual_scale, gelu=gelu, out_recip=out_recip,
                                        out_dtype=out_dtype)


def quantized_epilogue_reference(acc: torch.Tensor, a_scale: float, w_scale: torch.Tensor, bias: torch.Tensor, *,
                                 residual: torch.Tensor | None = None,
                                 residual_scale: float | torch.Tensor | None = None, gelu: bool = False,
                                 out_recip: float | torch.Tensor | None = None, out_format: QuantFormat = INT8,
                                 out_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """The epilogue of every quantized GEMM, one float32 op at a time, on its accumulator of code products: the
    exact int32 one of int8_linear_reference (any library's: cuBLASLt, cuSPARSELt) or FP8's float32 one
    (plugins/fp8_linear.py). Output codes are `out_format`'s, the next GEMM's input format."""
    s = w_scale.float() * float(a_scale)  # a Python float meets a float32 tensor as float32(a_scale)
    y = acc.float() * s + bias.float()
    if gelu:
        y = gelu_tanh(y)
    if residual_scale is not None:
        y = y + residual_codes_value(residual, residual_scale)
    elif residual is not None:
        y = y + residual.float()
    if out_recip is not None:
        return codes_reference(y, out_recip, out_format)
    return y.to(out_dtype)


def residual_codes_value(codes: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """float32(codes) * float32(scale): the residual the epilogue adds when it is given as codes, INT8 or E4M3 (a
    Python float meets a float32 tensor as float32(scale); a per-channel scale broadcasts over rows)."""
    return codes.float() * (scale.float() if isinstance(scale, torch.Tensor) else float(scale))
