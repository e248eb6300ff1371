"""Kernel backends: every implementation the engine can run for an encoder GEMM or an attention, by family.

A family declares its name, the input format it takes, its candidate configurations for a problem, and how to
run one; each format has one reference family ("library": plain torch ops and cuBLASLt) that defines the math,
and every other candidate must reproduce the reference's output before the build times it (engines/tuning.py).
An implementation is named "FAMILY" or "FAMILY:CONFIG" (e.g. "triton:128x128x128-g8-w4-s3"); engine headers and
the timing cache store those names. The runtime looks a name up here and runs it, so a new family (FP8) is a
`register_gemm` call beside its kernel, with no edit to the runtime or the build.

A `sparse` family (2:4 sparse tensor cores: "cusparselt", INT8 and FP16) computes the GEMM from the weight's 2:4
compressed form, so it is offered and run only for GEMMs whose weight is 2:4 in an engine built with --sparse
(the engine says which, `Gemm.sparse`); on a dense weight it would compute something else. The build times it
against the dense families like any other candidate, so it runs only where it was measured faster.

A family whose library is built on demand ("cutlass": plugins/cutlass_int8.py) says through `available` whether
the library is there; until it is, builds time the other families, and an engine that chose it runs the reference.

Attention families come in two layouts, in the same table: padded ([batch, S] with a key bias) and `varlen`
(the windows packed back to back, cu_seqlens; plugins/varlen_attention.py), each with its own library family per
format. A family name means one layout: "fused-attention" is padded, "varlen-attention" packed; the packed
forward (Engine.forward_packed) looks its choice up with varlen=True.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Callable, Protocol, Sequence

import torch
import torch.nn.functional as F

from common.errors import WorkbenchError
from engines.tuning import LIBRARY, GemmProblem  # LIBRARY: the reference family of every format
from quant.formats import FP8_E4M3, INT8, QuantFormat

# Configurations meant for a few rows (split K, weight prefetch: batch 1) are timed up to this many rows.
SMALL_M_ROWS = 2048


class GemmRun(Protocol):
    def __call__(self, config: str, a: torch.Tensor, w: torch.Tensor, a_scale: float | None,
                 w_scale: torch.Tensor | None, bias: torch.Tensor, *, residual: torch.Tensor | None = None,
                 residual_scale: float | torch.Tensor | None = None, gelu: bool = False,
                 gelu_tanh: bool = True, out_recip: float | torch.Tensor | None = None,
                 out_dtype: torch.dtype = torch.float16) -> torch.Tensor: ...


class AttentionRun(Protocol):
    def __call__(self, config: str, qkv: torch.Tensor, batch: int, heads: int, key_bias: torch.Tensor | None, *,
                 scales=None, out_recip: float | torch.Tensor | None = None,
                 out_dtype: torch.dtype = torch.float16, gpu_kernels: bool = False,
                 out_format: QuantFormat = INT8) -> torch.Tensor: ...


class VarlenAttentionRun(Protocol):
    def __call__(self, config: str, qkv: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, heads: int, *,
                 scales=None, out_recip: float | torch.Tensor | None = None,
                 out_dtype: torch.dtype = torch.float16, gpu_kernels: bool = False,
                 out_format: QuantFormat = INT8) -> torch.Tensor: ...


@dataclass(frozen=True)
class GemmBackend:
    """One GEMM family. `run(config, a, w, a_scale, w_scale, bias, ...)` computes
    [GELU](a @ w.T * scales + bias) [+ residual], as codes when `out_recip` is given; FP families ignore the
    scales. Codes are INT8's unless the engine passes `out_format` (the FP and FP8 families take it: an FP8
    build's next GEMM reads FP8; INT8 kernels write INT8 alone). `gpu_kernels`: the family runs only where our
    Triton kernels can (it launches them, or a CUDA library); `sparse`: it runs only 2:4 weights of --sparse
    builds; `available`: its library is present (and the GPU can run it)."""

    family: str
    format: str                                         # the input format it takes: "int8", "fp8_e4m3", "fp"
    configs: Callable[[GemmProblem], Sequence[str]]     # candidate configurations for a problem ("" = no config)
    run: GemmRun
    gpu_kernels: bool = False
    sparse: bool = False                                # runs 2:4 weights only (module docstring)
    available: Callable[[], bool] | None = None         # a capability check (a library this torch may lack)
    why_unavailable: Callable[[], str] | None = None    # why `available` says no, in words (for a warning)

    def impls(self, problem: GemmProblem) -> list[str]:
        return [implementation(self.family, c) for c in self.configs(problem)]


@dataclass(frozen=True)
class AttentionBackend:
    """One attention family: softmax(Q K^T / sqrt(d) + key bias) V from the QKV GEMM's output [b*s, 3H] to the
    context [b*s, H] (its codes when `out_recip` is given: INT8's, or `out_format`'s, which the engine passes
    only for FP8 context codes and only to "fp" families). `format`: "fp" takes the FP QKV output, "int8" the
    -imh codes with their AttentionScales. `varlen`: the packed layout instead, run as VarlenAttentionRun
    (configs then get (windows, max_seqlen)); `available`: its library is present (and the GPU can run it)."""

    family: str
    format: str
    configs: Callable[[int, int], Sequence[str]]        # (batch, seq_len) -> candidate configurations
    run: AttentionRun | VarlenAttentionRun
    gpu_kernels: bool = False
    varlen: bool = False
    available: Callable[[], bool] | None = None

    def impls(self, batch: int, seq_len: int) -> list[str]:
        return [implementation(self.family, c) for c in self.configs(batch, seq_len)]


_GEMMS: dict[tuple[str, str], GemmBackend] = {}
_ATTENTIONS: dict[tuple[str, str, bool], AttentionBackend] = {}  # (family, format, varlen)


def implementation(family: str, config: str) -> str:
    return f"{family}:{config}" if config else family


def split(impl: str) -> tuple[str, str]:
    """"triton:128x..." -> ("triton", "128x..."); "library" -> ("library", "")."""
    family, _, config = impl.partition(":")
    return family, config


def register_gemm(backend: GemmBackend) -> GemmBackend:
    """Add a GEMM family (replacing one of the same family and format)."""
    _GEMMS[backend.family, backend.format] = backend
    return backend


def register_attention(backend: AttentionBackend) -> AttentionBackend:
    _ATTENTIONS[backend.family, backend.format, backend.varlen] = backend
    return backend


def unregister(family: str, format: str) -> None:
    """Remove a family (tests register toy ones)."""
    _GEMMS.pop((family, format), None)
    for varlen in (False, True):
        _ATTENTIONS.pop((family, format, varlen), None)


def _lookup(table: dict, key: tuple, impl: str, format: str, what: str):
    found = table.get(key)
    if found is None:
        raise WorkbenchError(f"no {format} {what} implementation {impl!r} is registered in this workbench: "
                             "rebuild the engine here")
    return found


def gemm_backend(impl: str, format: str) -> GemmBackend:
    return _lookup(_GEMMS, (split(impl)[0], format), impl, format, "GEMM")


def attention_backend(impl: str, format: str, varlen: bool = False) -> AttentionBackend:
    return _lookup(_ATTENTIONS, (split(impl)[0], format, varlen), impl, format,
                   "variable-length attention" if varlen else "attention")


def _usable(b, gpu_kernels: bool, sparse: bool) -> bool:
    """Whether family b can run here (`gpu_kernels`: where our GPU kernels can) on a GEMM whose weight is 2:4
    under a --sparse build (`sparse`), and its library is present."""
    if (b.gpu_kernels and not gpu_kernels) or (getattr(b, "sparse", False) and not sparse):
        return False
    available = getattr(b, "available", None)
    return available is None or available()


def runnable(impl: str, format: str, gpu_kernels: bool, attention: bool = False, sparse: bool = False,
             varlen: bool = False) -> bool:
    """Whether `impl` is registered for `format` (an attention family of the `varlen` layout) and can run here
    (`_usable`)."""
    found = _ATTENTIONS.get((split(impl)[0], format, varlen)) if attention else _GEMMS.get((split(impl)[0], format))
    return found is not None and _usable(found, gpu_kernels, sparse)


def unavailable_families(impls: Sequence[str], formats: Sequence[str], gpu_kernels: bool) -> dict[str, str]:
    """The GEMM families of `formats` among `impls` whose kernels could run here (`gpu_kernels`) but whose library
    is missing, each with why: an engine naming them runs the reference in their place, correct but slower
    (CUTLASS's, until it is built)."""
    named = {split(impl)[0] for impl in impls}
    return {b.family: b.why_unavailable() if b.why_unavailable else f"{b.family}: not available on this machine"
            for b in _GEMMS.values() if b.family in named and b.format in formats and b.gpu_kernels <= gpu_kernels
            and b.available is not None and not b.sparse and not b.available()}


def is_sparse(impl: str) -> bool:
    """Whether `impl` belongs to a sparse GEMM family (of any format)."""
    return any(b.sparse for (family, _), b in _GEMMS.items() if family == split(impl)[0])


def _families(table: dict, format: str, gpu_kernels: bool, sparse: bool = False, varlen: bool = False) -> list:
    """The families registered for `format` (attention: of the `varlen` layout) that can run here, the reference
    (LIBRARY) first."""
    return sorted((b for b in table.values() if b.format == format and getattr(b, "varlen", False) == varlen
                   and _usable(b, gpu_kernels, sparse)), key=lambda b: b.family != LIBRARY)


def gemm_candidates(problem: GemmProblem, format: str, gpu_kernels: bool, sparse: bool = False) -> list[str]:
    """Every registered implementation of a `format` GEMM for `problem`, the reference first; sparse families
    only where `sparse` (the GEMM's weight is 2:4 under a --sparse build)."""
    return [impl for b in _families(_GEMMS, format, gpu_kernels, sparse) for impl in b.impls(problem)]


def attention_candidates(batch: int, seq_len: int, format: str, gpu_kernels: bool, varlen: bool = False
                         ) -> list[str]:
    """Every registered attention implementation of `format` for the shape, the reference first; `varlen`: of
    the packed layout, for `batch` windows of up to `seq_len` tokens."""
    return [impl for b in _families(_ATTENTIONS, format, gpu_kernels, varlen=varlen)
            for impl in b.impls(batch, seq_len)]


# ---------------------------------------------------------------- the Triton INT8 GEMM's configuration names

def triton_impl(config) -> str:
    """The implementation name of a plugins.int8_linear.GemmConfig, e.g. "triton:128x128x128-g8-w4-s3-st+tma"."""
    c = config
    split_k = f"-k{c.split_k}" if c.split_k > 1 else ""
    prefetch = "-pf" if c.prefetch else ""
    store = "-st" if c.tma_store else ""
    fast = "-fa" if c.fast_accum else ""
    loads = "" if c.loads == "ptr" else f"+{c.loads}"
    return (f"{TRITON}:{c.block_m}x{c.block_n}x{c.block_k}-g{c.group_m}-w{c.num_warps}-s{c.num_stages}"
            f"{split_k}{prefetch}{store}{fast}{loads}")


def parse_triton_impl(impl: str):
    """The GemmConfig an implementation name stands for (inverse of triton_impl)."""
    from plugins.int8_linear import GemmConfig

    body, _, loads = impl.removeprefix(f"{TRITON}:").partition("+")
    tiles, g, w, s, *options = body.split("-")
    bm, bn, bk = map(int, tiles.split("x"))
    split_k = [int(o[1:]) for o in options if o.startswith("k")]
    return GemmConfig(bm, bn, bk, int(g[1:]), int(w[1:]), int(s[1:]), loads or "ptr", split_k[0] if split_k else 1,
                      prefetch="pf" in options, tma_store="st" in options, fast_accum="fa" in options)


TRITON = "triton"


# ---------------------------------------------------------------- the built-in families

def _int8_library(config, a, w, a_scale, w_scale, bias, *, gelu_tanh=True, **kw):
    from plugins.int8_linear import int8_linear_reference

    return int8_linear_reference(a, w, a_scale, w_scale, bias, **kw)


def _int8_triton(config, a, w, a_scale, w_scale, bias, *, gelu_tanh=True, **kw):
    from plugins.int8_linear import int8_linear

    return int8_linear(a, w, a_scale, w_scale, bias, config=parse_triton_impl(implementation(TRITON, config)), **kw)


def _fp8_triton(config, a, w, a_scale, w_scale, bias, *, gelu_tanh=True, out_format=INT8, **kw):
    """plugins.fp8_linear.fp8_linear: the INT8 family's kernels and tiles on E4M3 codes, the epilogue fused."""
    from plugins.fp8_linear import fp8_linear

    return fp8_linear(a, w, a_scale, w_scale, bias, out_format=out_format,
                      config=parse_triton_impl(implementation(TRITON, config)), **kw)


def _fp8_kernels_available() -> bool:
    from plugins.fp8_linear import fp8_kernels_available

    return fp8_kernels_available()


def _tiles(problem: GemmProblem) -> list:
    """The Triton GEMM configurations timed for `problem` (small-M ones up to SMALL_M_ROWS rows)."""
    from plugins.int8_linear import CANDIDATE_CONFIGS

    return [c for c in CANDIDATE_CONFIGS if problem.m <= SMALL_M_ROWS or not c.small_m]


def _triton_configs(problem: GemmProblem) -> list[str]:
    return [split(triton_impl(c))[1] for c in _tiles(problem)]


def _fp8_triton_configs(problem: GemmProblem) -> list[str]:
    """The INT8 family's tiles, and each wgmma tile (64 rows or more, no split K) again with fast accumulation
    (GemmConfig.fast_accum): whether its sums still agree with the reference is the build's timing to find out."""
    tiles = _tiles(problem)
    fast = [replace(c, fast_accum=True) for c in tiles if c.block_m >= 64 and c.split_k == 1]
    return [split(triton_impl(c))[1] for c in tiles + fast]


def linear_gelu_tanh(a: torch.Tensor, w: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """GELU(a @ w.T + bias), tanh form: on CUDA one cuBLASLt GEMM with its GELU_BIAS epilogue (torch's
    _addmm_activation), instead of a GEMM and a pass over its output (BERT-large FC1 at 128 x 384: 400 MB read
    and written again per layer); elsewhere the same function in two ops."""
    if a.is_cuda:
        return torch._addmm_activation(bias, a, w.t(), use_gelu=True)
    return F.gelu(F.linear(a, w, bias), approximate="tanh")


def _fp_library(config, a, w, a_scale, w_scale, bias, *, residual=None, residual_scale=None, gelu=False,
                gelu_tanh=True, out_recip=None, out_format=INT8, out_dtype=torch.float16):
    """An FP GEMM (F.linear; cuBLASLt's GELU epilogue for the tanh GELU), then `fp_epilogue`."""
    if gelu and gelu_tanh:
        y = linear_gelu_tanh(a, w, bias)
    else:
        y = F.linear(a, w, bias)
        y = F.gelu(y) if gelu else y
    return fp_epilogue(y, residual, residual_scale, out_recip, out_format)


def fp_epilogue(y: torch.Tensor, residual: torch.Tensor | None, residual_scale: float | torch.Tensor | None,
                out_recip: float | torch.Tensor | None, out_format: QuantFormat = INT8) -> torch.Tensor:
    """What follows an FP GEMM (and its GELU): + the residual (one carried as codes dequantized first), and the
    output's codes (`out_format`'s: the next GEMM's input) where `out_recip` is given."""
    if residual_scale is not None:
        from plugins.int8_linear import residual_codes_value
        y = y + residual_codes_value(residual, residual_scale).to(y.dtype)
    elif residual is not None:
        y = y + residual
    if out_recip is None:
        return y
    from plugins.common import codes_reference
    return codes_reference(y, out_recip, out_format)


def _cusparselt_configs(problem: GemmProblem) -> list[str]:
    """cuSPARSELt's configurations (plugins/sparse_linear.py) where the weight's shape and dtype suit it."""
    from plugins.sparse_linear import CONFIGS, supports

    dtype = getattr(torch, problem.dtype, None)
    return list(CONFIGS) if isinstance(dtype, torch.dtype) and supports(problem.n, problem.k, dtype) else []


def _cusparselt_available() -> bool:
    from plugins.sparse_linear import available

    return available()


def _int8_cusparselt(config, a, w, a_scale, w_scale, bias, *, gelu_tanh=True, **kw):
    from plugins.sparse_linear import compressed, sparse_linear

    return sparse_linear(a, compressed(w), a_scale, w_scale, bias, config=config, **kw)


def _fp_cusparselt(config, a, w, a_scale, w_scale, bias, *, residual=None, residual_scale=None, gelu=False,
                   gelu_tanh=True, out_recip=None, out_format=INT8, out_dtype=torch.float16):
    """The FP library family's function with a 2:4 weight: cuSPARSELt's GEMM with the bias fused, then the
    GELU and `fp_epilogue`."""
    from plugins.sparse_linear import compressed, sparse_mm

    y = sparse_mm(a, compressed(w), bias=bias, config=config)
    if gelu:
        y = F.gelu(y, approximate="tanh" if gelu_tanh else "none")
    return fp_epilogue(y, residual, residual_scale, out_recip, out_format)


def _fp8_library(config, a, w, a_scale, w_scale, bias, *, gelu_tanh=True, out_format=INT8, **kw):
    from plugins.fp8_linear import fp8_linear_reference

    return fp8_linear_reference(a, w, a_scale, w_scale, bias, out_format=out_format, **kw)


def _fp8_cublaslt(config, a, w, a_scale, w_scale, bias, *, gelu_tanh=True, out_format=INT8, **kw):
    from plugins.fp8_linear import fp8_scaled_mm

    return fp8_scaled_mm(a, w, a_scale, w_scale, bias, out_format=out_format, **kw)


def _cublaslt_fp8_configs(problem: GemmProblem) -> list[str]:
    from plugins.fp8_linear import scaled_mm_supports

    return [""] if scaled_mm_supports(problem.n, problem.k) else []


def _cublaslt_fp8_available() -> bool:
    from plugins.fp8_linear import scaled_mm_available

    return scaled_mm_available()


def _cutlass_configs(problem: GemmProblem) -> list[str]:
    """CUTLASS's configurations where plugins/cutlass_int8.cu has a kernel for the problem's epilogue and shape."""
    from plugins.cutlass_int8 import CONFIGS, supports

    return list(CONFIGS) if problem.dtype == "int8" and supports(problem.epilogue, problem.n, problem.k) else []


def _int8_cutlass(config, a, w, a_scale, w_scale, bias, *, gelu_tanh=True, **kw):
    from plugins.cutlass_int8 import cutlass_int8_linear

    return cutlass_int8_linear(config, a, w, a_scale, w_scale, bias, **kw)


def _cutlass_available() -> bool:
    from plugins.cutlass_int8 import available

    return available()


def _cutlass_unavailable_reason() -> str:
    from plugins.cutlass_int8 import unavailable_reason

    return unavailable_reason()


def _sdpa(config, qkv, batch, heads, key_bias, *, scales=None, out_recip=None, out_dtype=torch.float16,
          gpu_kernels=False, out_format=INT8):
    """PyTorch's fused SDPA, then (where the next GEMM is quantized) the context's codes in one pass on CUDA."""
    s = qkv.shape[0] // batch
    d = qkv.shape[1] // (3 * heads)
    q, k, v = qkv.view(batch, s, 3, heads, d).permute(2, 0, 3, 1, 4)
    mask_bias = None if key_bias is None else key_bias.view(batch, 1, 1, s)
    context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_bias).transpose(1, 2)  # [b, s, h, d]
    return _context_rows(context, out_recip, gpu_kernels, out_format)


def _context_rows(context: torch.Tensor, out_recip, gpu_kernels: bool, out_format: QuantFormat = INT8
                  ) -> torch.Tensor:
    """A library attention's context ([..., heads, d], any strides) as [tokens, hidden] rows: as it is, or
    (where the next GEMM is quantized) its `out_format` codes in one pass on CUDA."""
    rows, hidden = context.shape[:-2].numel(), context.shape[-2] * context.shape[-1]
    if out_recip is None:
        return context.reshape(rows, hidden)
    if gpu_kernels:
        from plugins.quantize import quantize_rows
        codes = quantize_rows(context, out_recip, out_format)
    else:
        from plugins.quantize import quantize_rows_reference
        codes = quantize_rows_reference(context, out_recip, out_format)
    return codes.view(rows, hidden)


def _fused_attention(config, qkv, batch, heads, key_bias, *, scales=None, out_recip=None, out_dtype=torch.float16,
                     gpu_kernels=True, out_format=INT8):
    from plugins.attention import AttentionConfig, fused_attention

    return fused_attention(qkv, batch, heads, key_bias, out_recip=out_recip, out_dtype=out_dtype,
                           config=AttentionConfig.parse(implementation("fused-attention", config)),
                           out_format=out_format)


def _int8_attention_library(config, codes, batch, heads, key_bias, *, scales=None, out_recip=None,
                            out_dtype=torch.float16, gpu_kernels=False):
    from plugins.attention import attention_int8_reference

    return attention_int8_reference(codes, batch, heads, scales, key_bias, out_recip=out_recip, out_dtype=out_dtype)


def _int8_attention(config, codes, batch, heads, key_bias, *, scales=None, out_recip=None, out_dtype=torch.float16,
                    gpu_kernels=True):
    from plugins.attention import AttentionConfig, fused_attention_int8

    return fused_attention_int8(codes, batch, heads, scales, key_bias, out_recip=out_recip, out_dtype=out_dtype,
                                config=AttentionConfig.parse(implementation("int8-attention", config)))


def _attention_configs(int8: bool) -> Callable[[int, int], list[str]]:
    def configs(batch: int, seq_len: int) -> list[str]:
        from plugins.attention import CANDIDATE_CONFIGS, INT8_CANDIDATE_CONFIGS

        return [split(c.name)[1] for c in (INT8_CANDIDATE_CONFIGS if int8 else CANDIDATE_CONFIGS)]
    return configs


def _reference_only(*_args) -> list[str]:
    return [""]


# ---------------------------------------------------------------- variable-length (packed) attention families

def _padded_windows(attend, qkv: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, bias_dtype: torch.dtype,
                    hidden: int, out_dtype: torch.dtype) -> torch.Tensor:
    """A padded family's function `attend(padded_qkv, windows, key_bias)` on packed windows: each window gathered
    into a row of [windows, max_seqlen] with the padding bias, the context scattered back to its rows (rows past
    the last window zero). Device index ops only, no host read: a CUDA graph captures it."""
    from plugins.varlen_attention import padded_layout

    n, tokens = cu_seqlens.numel() - 1, qkv.shape[0]
    if n == 0 or max_seqlen == 0 or tokens == 0:
        return torch.zeros(tokens, hidden, dtype=out_dtype, device=qkv.device)
    gather, scatter, real = padded_layout(cu_seqlens, max_seqlen, tokens)
    bias = torch.zeros(real.shape, dtype=bias_dtype, device=qkv.device).masked_fill_(~real,
                                                                                     torch.finfo(bias_dtype).min)
    context = attend(qkv.index_select(0, gather), n, bias)
    # E4M3 codes travel as their bytes: torch has no index_copy_ for float8 (zero bytes are +0.0 in E4M3)
    fp8 = context.dtype == torch.float8_e4m3fn
    context = context.view(torch.uint8) if fp8 else context
    out = torch.zeros(tokens + 1, hidden, dtype=context.dtype, device=qkv.device)  # row `tokens`: padding's
    out = out.index_copy_(0, scatter, context)[:tokens]
    return out.view(torch.float8_e4m3fn) if fp8 else out


def _varlen_sdpa(config, qkv, cu_seqlens, max_seqlen, heads, *, scales=None, out_recip=None,
                 out_dtype=torch.float16, gpu_kernels=False, out_format=INT8):
    """The FP library family of packed windows: SDPA over the windows padded to max_seqlen (_padded_windows)."""
    return _padded_windows(lambda x, n, bias: _sdpa("", x, n, heads, bias, out_recip=out_recip,
                                                    gpu_kernels=gpu_kernels, out_format=out_format),
                           qkv, cu_seqlens, max_seqlen, qkv.dtype, qkv.shape[1] // 3,
                           out_format.dtype if out_recip is not None else qkv.dtype)


def _varlen_int8_library(config, codes, cu_seqlens, max_seqlen, heads, *, scales=None, out_recip=None,
                         out_dtype=torch.float16, gpu_kernels=False):
    """The -imh library family of packed windows: the INT8 reference over the windows padded to max_seqlen."""
    from plugins.attention import attention_int8_reference

    return _padded_windows(lambda x, n, bias: attention_int8_reference(x, n, heads, scales, bias, out_recip=out_recip,
                                                                       out_dtype=out_dtype),
                           codes, cu_seqlens, max_seqlen, out_dtype, codes.shape[1] // 3,
                           torch.int8 if out_recip is not None else out_dtype)


def _varlen_attention(config, qkv, cu_seqlens, max_seqlen, heads, *, scales=None, out_recip=None,
                      out_dtype=torch.float16, gpu_kernels=True, out_format=INT8):
    from plugins.attention import AttentionConfig
    from plugins.varlen_attention import fused_varlen_attention

    return fused_varlen_attention(qkv, cu_seqlens, max_seqlen, heads, out_recip=out_recip, out_dtype=out_dtype,
                                  config=AttentionConfig.parse(implementation("fused-attention", config)),
                                  out_format=out_format)


def _varlen_int8_attention(config, codes, cu_seqlens, max_seqlen, heads, *, scales=None, out_recip=None,
                           out_dtype=torch.float16, gpu_kernels=True):
    from plugins.attention import AttentionConfig
    from plugins.varlen_attention import fused_varlen_attention_int8

    return fused_varlen_attention_int8(codes, cu_seqlens, max_seqlen, heads, scales, out_recip=out_recip,
                                       out_dtype=out_dtype,
                                       config=AttentionConfig.parse(implementation("int8-attention", config)))


def _varlen_configs(int8: bool) -> Callable[[int, int], list[str]]:
    def configs(windows: int, max_seqlen: int) -> list[str]:
        from plugins.varlen_attention import CANDIDATE_CONFIGS, INT8_CANDIDATE_CONFIGS

        return [split(c.name)[1] for c in (INT8_CANDIDATE_CONFIGS if int8 else CANDIDATE_CONFIGS)]
    return configs


@functools.lru_cache(maxsize=None)
def _torch_varlen_available() -> bool:
    """torch.nn.attention.varlen (PyTorch 2.9 and later; flash attention: FP16/BF16 on Ampere or later); asked
    once per process (every packed forward looks its attention up)."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 8:
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def _torch_varlen(config, qkv, cu_seqlens, max_seqlen, heads, *, scales=None, out_recip=None,
                  out_dtype=torch.float16, gpu_kernels=True, out_format=INT8):
    """PyTorch's varlen_attn (flash attention over cu_seqlens) on strided Q, K, V views of the QKV output; the
    context's codes, where the next GEMM is quantized, in a pass of their own (as SDPA's). Called with the seven
    positional arguments every release since 2.9 takes (later ones made the rest keyword-only)."""
    from torch.nn.attention.varlen import varlen_attn

    tokens, d = qkv.shape[0], qkv.shape[1] // (3 * heads)
    q, k, v = qkv.view(tokens, 3, heads, d).unbind(1)
    context = varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen)  # [tokens, heads, d]
    return _context_rows(context, out_recip, gpu_kernels, out_format)


VARLEN_ATTENTION = "varlen-attention"
VARLEN_INT8_ATTENTION = "varlen-int8-attention"
TORCH_VARLEN = "torch-varlen"


register_gemm(GemmBackend(LIBRARY, "int8", _reference_only, _int8_library))
register_gemm(GemmBackend(TRITON, "int8", _triton_configs, _int8_triton, gpu_kernels=True))
CUTLASS = "cutlass"  # built on demand (plugins/cutlass_int8.py): unavailable until then
register_gemm(GemmBackend(CUTLASS, "int8", _cutlass_configs, _int8_cutlass, gpu_kernels=True,
                          available=_cutlass_available, why_unavailable=_cutlass_unavailable_reason))
register_gemm(GemmBackend(LIBRARY, "fp", _reference_only, _fp_library))
CUSPARSELT = "cusparselt"
for _format, _run in (("int8", _int8_cusparselt), ("fp", _fp_cusparselt)):
    register_gemm(GemmBackend(CUSPARSELT, _format, _cusparselt_configs, _run, gpu_kernels=True, sparse=True,
                              available=_cusparselt_available))
register_gemm(GemmBackend(LIBRARY, FP8_E4M3.name, _reference_only, _fp8_library))  # the FP8 math: any device
CUBLASLT = "cublaslt"
register_gemm(GemmBackend(CUBLASLT, FP8_E4M3.name, _cublaslt_fp8_configs, _fp8_cublaslt, gpu_kernels=True,
                          available=_cublaslt_fp8_available))
# the INT8 Triton family's kernels and tiles on E4M3 codes (FP8 operands are bytes too: the same tiles suit them)
register_gemm(GemmBackend(TRITON, FP8_E4M3.name, _fp8_triton_configs, _fp8_triton, gpu_kernels=True,
                          available=_fp8_kernels_available))
register_attention(AttentionBackend(LIBRARY, "fp", _reference_only, _sdpa))
register_attention(AttentionBackend("fused-attention", "fp", _attention_configs(False), _fused_attention,
                                    gpu_kernels=True))
register_attention(AttentionBackend(LIBRARY, "int8", _reference_only, _int8_attention_library))
register_attention(AttentionBackend("int8-attention", "int8", _attention_configs(True), _int8_attention,
                                    gpu_kernels=True))
register_attention(AttentionBackend(LIBRARY, "fp", _reference_only, _varlen_sdpa, varlen=True))
register_attention(AttentionBackend(VARLEN_ATTENTION, "fp", _varlen_configs(False), _varlen_attention,
                                    gpu_kernels=True, varlen=True))
register_attention(AttentionBackend(TORCH_VARLEN, "fp", _reference_only, _torch_varlen, gpu_kernels=True,
                                    varlen=True, available=_torch_varlen_available))
register_attention(AttentionBackend(LIBRARY, "int8", _reference_only, _varlen_int8_library, varlen=True))
register_attention(AttentionBackend(VARLEN_INT8_ATTENTION, "int8", _varlen_configs(True), _varlen_int8_attention,
                                    gpu_kernels=True, varlen=True))
