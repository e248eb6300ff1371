"""2:4-sparse Linear through cuSPARSELt: the INT8 GEMM family's function (plugins/int8_linear.py) with the GEMM
run on sparse tensor cores, for engines built with --sparse (every encoder GEMM weight 2:4, calib/sparsity.py).

Layout, as in the other plugins: `sparse_linear` (the wrapper the engine's "cusparselt" family runs), `_check`
(its arguments), and the reference, which is the dense family's: a 2:4 weight is an ordinary weight with zeros,
so plugins.int8_linear.int8_linear_reference on the uncompressed weight defines the output. The FP16 family
(engines/backends.py) runs `sparse_mm` and the FP library's epilogue.

The library, as torch exposes it (read in torch's aten/src/ATen/native/sparse/cuda/cuSPARSELtOps.cpp,
torch/_meta_registrations.py `meta__cslt_sparse_mm` and torch/sparse/semi_structured.py, which runs F.linear on
a 2:4 weight the way `sparse_mm` does):

- `torch._cslt_compress(W)`: the 2:4 matrix W [N, K] (row-major, int8, float16 or bfloat16) as one 1-D tensor
  of its kept values and their position metadata. Made once per weight (`compressed`), before any CUDA graph
  capture. (float32 is 1:2 there, not 2:4, so FP32 engines get no sparse family.)
- `torch._cslt_sparse_mm(compressed_A, dense_B, bias=None, alpha=None, out_dtype=None, transpose_result=False,
  alg_id=0, ...)` computes A @ B with the *sparse operand first*: A is the compressed [m, k] matrix, B a dense
  [k, n] one (a non-contiguous B, e.g. a.t(), is read transposed in place). Here A = W and B = a.t(), so the
  product is W @ a.T = (a @ W.T).T, and `transpose_result=True` writes it as the row-major [M, N] the engine
  wants. `bias` [m] is added per row of A @ B, i.e. per output channel, inside the kernel (float16 inputs take
  a float16 bias, as torch's own sparse F.linear passes it; which bias dtype int8 inputs take is not exercised
  by torch's tests, so it is not used here). `alpha`: a float32 scale, per row of A @ B when it has more than
  one element (one element is read with .item(), a host sync no CUDA graph may hold); torch tests it for int8
  inputs only. `out_dtype`: only for int8 inputs (fp16, bf16 or int32; float32 is not accepted by every torch
  release); float16/bfloat16 inputs write their own dtype. `alg_id`: the kernel configuration, 0 the library's
  default. Each call plans anew on the host (descriptors, plan, workspace), so it
  is slow in eager mode; the engine replays CUDA graphs, where only the kernels remain.
- `torch._cslt_sparse_mm_search(...)` (same arguments, no alg_id) runs the library's own search. Not used: on an
  H100 (torch 2.11.0+cu130) it failed with an internal error in cusparseLtMatmulSearch at every BERT shape and
  left an illegal instruction behind that poisoned the CUDA context for the rest of the process (2026-12-06). The
  build times its candidates anyway, so the library's default algorithm (alg0) is the family's one candidate.

Shapes: the sparse operand's rows and columns multiples of 32 for int8, 16 for fp16/bf16 (`supports`); the
dense operand's rows (M here) multiples of 16 / 8, so M is padded with zero rows and the result sliced.

INT8 epilogue: the library's output is the exact int32 accumulator (out_dtype=int32) and the rest of the
epilogue runs after it in torch, in float32, op for op as int8_linear_reference does, so outputs equal the
reference's bit for bit. Fusing it would change our math: alpha with an FP16 output rounds acc * s to FP16
before the bias and the residual are added (codes then move at .5 boundaries), and the FP32 output that would
keep it exact is not accepted for int8 inputs by every torch release. FP16: the bias is fused (cuBLASLt's
F.linear adds it in its epilogue the same way); GELU, residual and codes run after it.
"""
from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass

import torch

from plugins.int8_linear import quantized_epilogue_reference

# "alg0": the library's default algorithm (its search is not used: module docstring); "algN" runs N.
CONFIGS = ("alg0",)
_SPARSE_MULTIPLE = {torch.int8: 32, torch.float16: 16, torch.bfloat16: 16}   # N and K of the 2:4 weight
_DENSE_ROWS = {torch.int8: 16, torch.float16: 8, torch.bfloat16: 8}          # M of the activation


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """Whether cuSPARSELt can run here: a CUDA GPU and a torch built with it."""
    return (torch.cuda.is_available() and hasattr(torch, "_cslt_sparse_mm")
            and bool(getattr(torch._C, "_has_cusparselt", False)))


def supports(n: int, k: int, dtype: torch.dtype) -> bool:
    """Whether a weight [N, K] of `dtype` meets cuSPARSELt's 2:4 shape rules."""
    multiple = _SPARSE_MULTIPLE.get(dtype)
    return multiple is not None and n > 0 and k > 0 and n % multiple == 0 and k % multiple == 0


# ---------------------------------------------------------------------------------- compressed weights

@dataclass(frozen=True, eq=False)
class Compressed:
    """A 2:4 weight [n, k] as torch._cslt_compress packs it."""

    data: torch.Tensor
    n: int
    k: int
    dtype: torch.dtype


def _compress(w: torch.Tensor) -> torch.Tensor:
    return torch._cslt_compress(w)


# id(weight) -> (weak reference to it, its stamp when compressed, the compressed form)
_COMPRESSED: dict[int, tuple[weakref.ref, tuple, Compressed]] = {}


def _stamp(w: torch.Tensor) -> tuple:
    """What must not change for a compression to stay valid: storage, shape, dtype, in-place writes."""
    version = 0 if w.is_inference() else w._version  # inference tensors keep no version counter
    return w.data_ptr(), tuple(w.shape), w.dtype, w.device, version


def compressed(w: torch.Tensor) -> Compressed:
    """W's compressed form, made on its first use (the build's timing, or a graph's warm-up) and reused while W
    is the same, unmodified tensor: the cache holds W weakly, so a new weight tensor or a new engine's weights
    are compressed afresh and a dead weight's entry goes with it. Refuses a weight that is not 2:4 (the sparse
    kernel would compute something else), and compressing inside a CUDA graph capture."""
    key, stamp = id(w), _stamp(w)
    entry = _COMPRESSED.get(key)
    if entry is not None and entry[0]() is w and entry[1] == stamp:
        return entry[2]
    if w.is_cuda and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("sparse_linear: a weight is met for the first time inside a CUDA graph capture; run the "
                           "forward once before capturing (its 2:4 weights are compressed then)")
    from calib.sparsity import is_2to4_sparse

    if w.dim() != 2 or not is_2to4_sparse(w):
        raise ValueError(f"sparse_linear: the weight {w.dtype} {tuple(w.shape)} is not 2:4 sparse along K")
    result = Compressed(_compress(w.contiguous()), w.shape[0], w.shape[1], w.dtype)

    def forget(ref, key=key):
        if _COMPRESSED.get(key, (None,))[0] is ref:
            del _COMPRESSED[key]

    _COMPRESSED[key] = (weakref.ref(w, forget), stamp, result)
    return result


# ---------------------------------------------------------------------------------- the GEMM

def _alg_id(config: str) -> int:
    """The algorithm of a configuration: "algN" is N."""
    if config.startswith("alg") and config[3:].isdigit():
        return int(config[3:])
    raise ValueError(f"sparse_linear: unknown configuration {config!r} (one of {', '.join(CONFIGS)}, or algN)")


def sparse_mm(a: torch.Tensor, cw: Compressed, *, bias: torch.Tensor | None = None,
              out_dtype: torch.dtype | None = None, config: str = "alg0") -> torch.Tensor:
    """a [M, K] @ W.T (+ bias [N], added in the kernel) as a row-major [M, N] tensor, W given compressed;
    `out_dtype` only for int8 inputs (torch.int32: the exact accumulator)."""
    m, k = a.shape
    if a.dtype != cw.dtype or k != cw.k or not supports(cw.n, cw.k, cw.dtype):
        raise ValueError(f"sparse_mm: a is {a.dtype} {tuple(a.shape)}, the weight {cw.dtype} [{cw.n}, {cw.k}]")
    if bias is not None and (bias.dtype != a.dtype or bias.shape != (cw.n,) or not bias.is_contiguous()):
        raise ValueError(f"sparse_mm: the fused bias must be a contiguous {a.dtype} [{cw.n}], got {bias.dtype} "
                         f"{tuple(bias.shape)}")
    pad = -m % _DENSE_ROWS[a.dtype]
    b = (torch.nn.functional.pad(a, (0, 0, 0, pad)) if pad else a.contiguous()).t()  # [K, M']: read transposed
    out = torch._cslt_sparse_mm(cw.data, b, bias=bias, out_dtype=out_dtype, transpose_result=True,
                                alg_id=_alg_id(config))
    return out[:m] if pad else out


# ---------------------------------------------------------------------------------- the INT8 family

def _check(a_q, cw, w_scale, bias, residual, residual_scale):
    if a_q.dtype != torch.int8 or a_q.dim() != 2 or cw.dtype != torch.int8:
        raise ValueError(f"sparse_linear: a_q and the weight must be int8, a_q 2-D: got {a_q.dtype} "
                         f"{tuple(a_q.shape)} and {cw.dtype}")
    m, n = a_q.shape[0], cw.n
    for name, t in (("w_scale", w_scale), ("bias", bias)):
        if t.dtype != torch.float32 or t.shape != (n,):
            raise ValueError(f"sparse_linear: {name} must be float32 [{n}], got {t.dtype} {tuple(t.shape)}")
    if residual is not None and residual.shape != (m, n):
        raise ValueError(f"sparse_linear: residual must be [{m}, {n}], got {tuple(residual.shape)}")
    if (residual is not None and residual.dtype == torch.int8) != (residual_scale is not None):
        raise ValueError("sparse_linear: an int8 residual (codes) needs its residual_scale, and only it takes one")


def sparse_linear(a_q: torch.Tensor, cw: Compressed, a_scale: float, w_scale: torch.Tensor, bias: torch.Tensor, *,
                  residual: torch.Tensor | None = None, residual_scale: float | torch.Tensor | None = None,
                  gelu: bool = False, out_recip: float | torch.Tensor | None = None,
                  out_dtype: torch.dtype = torch.float16, config: str = "alg0") -> torch.Tensor:
    """plugins.int8_linear.int8_linear's function (same arguments, the weight given compressed: `compressed(w)`)
    with the int32 GEMM on sparse tensor cores; `config` is one of CONFIGS or "algN"."""
    _check(a_q, cw, w_scale, bias, residual, residual_scale)
    acc = sparse_mm(a_q, cw, out_dtype=torch.int32, config=config)
    return quantized_epilogue_reference(acc, a_scale, w_scale, bias, residual=residual,
                                        residual_scale=residual_scale, gelu=gelu, out_recip=out_recip,
                                        out_dtype=out_dtype)

