"""GPU kernels (Triton) that fuse the INT8 engine's elementwise work into the ops around it.

Each module holds one kernel, the wrapper that allocates its outputs and launches it, and a `*_reference`
function in plain PyTorch that *defines* its math (it runs on the CPU and CUDA): tests hold every kernel to its
reference, and the reference to quant.quantizer, so the INT8 math still lives in one place.

- int8_linear: INT8 GEMM (int32 accumulation) + dequantize + bias [+ GELU] [+ residual] -> FP16/FP32 or codes
- fp8_linear:  the same kernels on FP8 E4M3 codes (float32 accumulation) -> FP16/FP32 or E4M3 (or INT8) codes
- layernorm:   LayerNorm -> x.dtype output and, optionally, its INT8 or E4M3 codes in the same pass
- quantize:    INT8 or E4M3 codes of a strided (e.g. transposed attention-context) tensor, written contiguously
- attention:   softmax(QK^T)V from the QKV GEMM's output -> the context in the next GEMM's layout, FP or codes
- varlen_attention: the same for windows packed back to back (cu_seqlens), no padding (build --varlen)

Beside them, wrappers of CUDA libraries with the same functions: sparse_linear (cuSPARSELt's 2:4 GEMM),
fp8_linear's cuBLASLt path, and cutlass_int8 (CUTLASS's Hopper INT8 GEMM with these epilogues, CUDA C++ that
`python -m plugins.cutlass_int8 build` compiles once per machine).

On Hopper and later GPUs every kernel launches with programmatic dependent launch and waits for the kernel before
it (plugins.common.await_inputs) before touching a tensor: batch-1 forwards are chains of short kernels, and PDL
took 14% off BERT-large INT8 at 1 x 128 (BENCHMARKS.md). The math and the memory order stay those of stream order.

Kernels run on CUDA tensors, or on CPU tensors through Triton's interpreter when TRITON_INTERPRET=1 was set
before these modules were imported (Triton reads it when it decorates a kernel); that is how the CPU tests run.
The kernels call only triton.language builtins and our own @triton.jit helpers, never triton.language's own
@jit functions (tl.sum, tl.cdiv, tl.zeros): those are decorated when triton itself is imported, so using them
would tie interpreter runs to setting the variable before anything in the process imports triton.
"""
from __future__ import annotations

import importlib.util
import os


def interpreted() -> bool:
    """Whether kernels defined from now on run in Triton's CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def available() -> bool:
    """Whether the Triton kernels can run here: Triton importable and a CUDA GPU, or the interpreter on."""
    if importlib.util.find_spec("triton") is None:
        return False
    if interpreted():
        return True
    import torch

    return torch.cuda.is_available()
