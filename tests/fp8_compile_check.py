"""Compile the FP8 paths of our kernels for sm_90 and sm_89 on a machine without a GPU; print the instructions
that matter as one JSON line: {name: [PTX opcodes found]}. Run by tests/test_plugins_fp8.py in a process of its
own, so the kernels are Triton's compiled ones, not the interpreter's (which the other plugins tests import).

Triton compiles for any target on any machine (ptxas ships with it), so this checks what the interpreter cannot:
that the FP8 dot lowers to E4M3 tensor-core instructions, the E4M3 codes to the hardware's conversion, and the
compile-time format strings and flags type-check in compiled mode.
"""
from __future__ import annotations

import dataclasses
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import mangle_type  # noqa: E402
from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: E402

from plugins import attention, int8_linear as L, layernorm, quantize, varlen_attention  # noqa: E402

FOUND = re.compile(r"(wgmma\.mma_async[.\w]*|mma\.sync[.\w]*|cvt\.rn\.satfinite\.e4m3x2\.f32|cvt\.rn\.f16x2\.e4m3x2"
                   r"|cp\.async\.bulk\.tensor)")
FADD = re.compile(r"\badd(?:\.rn)?\.f32\b")
E4M3 = torch.float8_e4m3fn


def ptx_text(fn, args: dict, constants: dict, arch: int, warps: int = 4, stages: int = 2) -> str:
    """`fn`'s PTX for sm_<arch>: `args` are example arguments (their types make the signature), `constants` the
    constexprs."""
    signature = {name: "constexpr" if name in constants else mangle_type(args[name]) for name in fn.arg_names}
    source = ASTSource(fn=fn, signature=signature, constexprs=constants)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": warps, "num_stages": stages, "enable_fp_fusion": False})
    return compiled.asm["ptx"]


def ptx(fn, args: dict, constants: dict, arch: int, warps: int = 4, stages: int = 2) -> list[str]:
    """The distinct instructions of interest in `fn`'s PTX for sm_<arch> (ptx_text's arguments)."""
    return sorted(set(FOUND.findall(ptx_text(fn, args, constants, arch, warps, stages))))


def gemm_flags(cfg: L.GemmConfig, out_format: str, arch: int, **kw) -> dict:
    flags = L._flags(cfg, kw.get("residual", False), kw.get("gelu", True), out_format, False, torch.device("cpu"),
                     res_codes=kw.get("res_codes", False), recip=30.0, fp8=True)
    for launch_only in ("num_warps", "num_stages", "enable_fp_fusion", "launch_pdl"):
        flags.pop(launch_only)
    return {**flags, "PDL": arch >= 90}


def gemm_args(m=256, n=256, k=256, out_dtype=E4M3, res_dtype=torch.float16) -> dict:
    f = torch.empty(n)
    return dict(a_ptr=torch.empty(m, k, dtype=E4M3), w_ptr=torch.empty(n, k, dtype=E4M3), w_scale_ptr=f, bias_ptr=f,
                res_ptr=torch.empty(m, n, dtype=res_dtype), out_ptr=torch.empty(m, n, dtype=out_dtype), M=m, N=n,
                K=k, a_scale=1.0, out_recip=1.0, res_scale=1.0, stride_am=k, stride_wn=k, stride_rm=n, stride_om=n)


def gemms() -> dict[str, list[str]]:
    found = {}
    cfg = L.GemmConfig(64, 64, 128, num_warps=4, num_stages=3)
    for arch in (90, 89):
        found[f"gemm-ptr-sm{arch}"] = ptx(L.quantized_linear_kernel, gemm_args(),
                                          {**gemm_flags(cfg, "fp8_e4m3", arch), "EVEN_K": True, "PREFETCH": False},
                                          arch, cfg.num_warps, cfg.num_stages)
    tma = L.GemmConfig(64, 64, 64, loads="tma", tma_store=True)
    for name, res_dtype in (("gemm-tma-sm90", torch.float16), ("gemm-tma-sm90-res-e4m3", E4M3)):
        args = gemm_args(out_dtype=torch.float16, res_dtype=res_dtype)
        args.update(a_desc=TensorDescriptor.from_tensor(args["a_ptr"], [64, 64]),
                    w_desc=TensorDescriptor.from_tensor(args["w_ptr"], [64, 64]),
                    res_desc=TensorDescriptor.from_tensor(args["res_ptr"], [64, 64]),
                    out_desc=TensorDescriptor.from_tensor(args["out_ptr"], [64, 64]))
        found[name] = ptx(L._quantized_linear_tma_kernel, args,
                          {**gemm_flags(tma, "fp", 90, residual=True, gelu=False, res_codes=res_dtype == E4M3),
                           "PERSISTENT": False, "FLOAT_IN": False}, 90)
    # --fp8 -iln: the residual read as E4M3 codes (pointer loads), converted in hardware
    found["gemm-ptr-sm90-res-e4m3"] = ptx(L.quantized_linear_kernel, gemm_args(res_dtype=E4M3),
                                          {**gemm_flags(cfg, "fp8_e4m3", 90, residual=True, res_codes=True),
                                           "EVEN_K": True, "PREFETCH": False}, 90, cfg.num_warps, cfg.num_stages)
    # GemmConfig.fast_accum: without the float32 add of every BLOCK_K step's wgmma sum (add.f32 per accumulator
    # register and step), the same E4M3 wgmma
    for fast in (False, True):
        text = ptx_text(L.quantized_linear_kernel, gemm_args(),
                        {**gemm_flags(dataclasses.replace(cfg, fast_accum=fast), "fp", 90, gelu=False),
                         "EVEN_K": True, "PREFETCH": False}, 90, cfg.num_warps, cfg.num_stages)
        name = f"gemm-ptr-sm90-{'fast' if fast else 'precise'}"
        found[name] = sorted(set(FOUND.findall(text))) + [f"float adds: {len(FADD.findall(text))}"]
    split = L.GemmConfig(64, 64, 128, split_k=2)
    part = torch.empty(2, 256, 256)
    found["splitk-partial-sm90"] = ptx(
        L._partial_kernel, dict(gemm_args(), part_ptr=part, k_slice=128, stride_part=256 * 256),
        dict(EVEN_K=True, FP8=True, BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, GROUP_M=8, PDL=True, PREFETCH=False,
             FAST_ACC=False), 90)
    epilogue = {key: value for key, value in gemm_flags(split, "fp8_e4m3", 90).items()
                if key not in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "FAST_ACC")}
    found["splitk-epilogue-sm90"] = ptx(L._splitk_epilogue_kernel, dict(gemm_args(), part_ptr=part,
                                                                        stride_part=256 * 256),
                                        {**epilogue, "SPLIT_K": 2, "BLOCK_M": 16, "BLOCK_N": 128}, 90)
    return found


def others() -> dict[str, list[str]]:
    """The LayerNorm, the attention kernels and the quantize pass, each writing E4M3 codes, for sm_90."""
    x, w = torch.empty(64, 1024, dtype=torch.float16), torch.empty(1024, dtype=torch.float16)
    codes = torch.empty(64, 1024, dtype=E4M3)
    found = {"layernorm-sm90": ptx(layernorm._layernorm_kernel, dict(
        x_ptr=x, w_ptr=w, b_ptr=w, y_ptr=x, q_ptr=codes, R=64, H=1024, eps=1e-12, out_recip=1.0, out_scale=1.0,
        stride_x=1024, stride_y=1024, stride_q=1024), dict(
        QUANT=True, ROUND=False, PER_CHANNEL=False, ROWS=4, BLOCK_H=1024, PDL=True, STORE_Y=True, EVEN=True,
        FORMAT="fp8_e4m3"), 90)}
    found["layernorm-codes-only-sm90"] = ptx(layernorm._layernorm_kernel, dict(  # --fp8 -iln: the codes alone
        x_ptr=x, w_ptr=w, b_ptr=w, y_ptr=x, q_ptr=codes, R=64, H=1024, eps=1e-12, out_recip=1.0, out_scale=1.0,
        stride_x=1024, stride_y=1024, stride_q=1024), dict(
        QUANT=True, ROUND=False, PER_CHANNEL=False, ROWS=4, BLOCK_H=1024, PDL=True, STORE_Y=False, EVEN=True,
        FORMAT="fp8_e4m3"), 90)
    qkv, ctx = torch.empty(256, 3 * 1024, dtype=torch.float16), torch.empty(256, 1024, dtype=E4M3)
    common = dict(out_recip=1.0, HEADS=16, qk_scale=0.18, stride_qkv=3 * 1024, stride_out=1024)
    flags = dict(OUT_FORMAT="fp8_e4m3", RECIP_PER_CHANNEL=False, D=64, BLOCK_M=64, BLOCK_N=64, PDL=True)
    found["attention-sm90"] = ptx(attention.attention_kernel, dict(qkv_ptr=qkv, bias_ptr=qkv, out_ptr=ctx, S=128,
                                                                   **common),
                                  dict(flags, HAS_BIAS=False, EVEN=True, q_desc=None, kv_desc=None), 90)
    found["varlen-sm90"] = ptx(varlen_attention.varlen_attention_kernel,
                               dict(qkv_ptr=qkv, cu_ptr=torch.empty(3, dtype=torch.int32), out_ptr=ctx, **common),
                               dict(flags, q_desc=None, kv_desc=None), 90)
    found["varlen-tma-sm90"] = ptx(varlen_attention.varlen_attention_kernel, dict(  # tiles through TMA boxes
        qkv_ptr=qkv, cu_ptr=torch.empty(3, dtype=torch.int32), out_ptr=ctx, **common,
        q_desc=TensorDescriptor.from_tensor(qkv, [64, 64]), kv_desc=TensorDescriptor.from_tensor(qkv, [64, 64])),
        flags, 90)
    found["quantize-sm90"] = ptx(quantize._quantize_kernel, dict(
        x_ptr=x, q_ptr=codes, recip=1.0, R=64, C=1024, size1=1, size2=64, stride0=0, stride1=0, stride2=1024,
        stride_c=1), dict(ROWS=4, BLOCK_C=1024, PDL=True, FORMAT="fp8_e4m3"), 90)
    return found


if __name__ == "__main__":
    print(json.dumps({**gemms(), **others()}))
