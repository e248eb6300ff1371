"""What our kernels compile to, without a GPU: memory instructions, barriers and arithmetic in their PTX.

    python3 -m benchmarks.kernel_ptx_stats [--tiles 128x128x128-w4-s3 64x64x128-w4-s4] [--attention 128x64-w8-s3]
                                           [--arch 90] [--sass] [--fp8]

Triton compiles for a target GPU on any machine (ptxas ships with it), so the code a kernel variant becomes can be
compared where no GPU is lent: per tile, the pointer kernel (plugins.int8_linear.quantized_linear_kernel) with a
residual in FP16, as INT8 codes with one scale, and as codes with one scale per channel (-iln's residual stream,
smoothed sites). Counts are of static instructions in the PTX (a loop body counts once), not of executed ones:
a way to see an extra trip through shared memory (st.shared + bar.sync), not a timing. With --attention, the
FP16 attention kernel and the -imh INT8 one (plugins.attention) at BERT's head size, no mask, codes out, and
their float32 arithmetic and exp2 counts beside the memory ones. With --sass, each GEMM's machine code too
(ptxas's cubin through nvdisasm, both shipped with Triton), with FC1's epilogue (GELU, INT8 codes out) beside
the residual variants: how many instructions go to the quarter-rate conversion and special-function pipe
(I2F, F2I, F2F, MUFU), which a GEMM epilogue can be bound by. With --fp8, FC1's kernel on E4M3 codes beside the
INT8 one: registers and spills (ptxas -v) and float adds, with each K step's sum added into float32 and with
fast accumulation (GemmConfig.fast_accum).
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from plugins.attention import attention_int8_kernel, attention_kernel
from plugins.int8_linear import quantized_linear_kernel

RESIDUALS = {"fp16": (False, False), "int8": (True, False), "int8-channel": (True, True)}
# fc1: GELU, INT8 codes out with a scale GELU's floor cannot push below -127 (no clamp there), no residual
EPILOGUES = tuple(f"residual {r}" for r in RESIDUALS) + ("fc1",)
SASS_OP = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", re.M)
SASS_COUNTED = ("I2F", "I2FP", "F2I", "F2F", "F2FP", "MUFU", "BAR", "STS", "FMUL", "FFMA", "FADD", "FMNMX", "HADD2",
                "PRMT")
COUNTED = re.compile(r"(ld|st)\.(global|shared)[.a-z0-9]*|ldmatrix[.a-z0-9]*|bar\.sync")
ARITHMETIC = re.compile(r"\b(ex2\.approx[.a-z0-9]*|(add|sub|mul|fma\.rn|max|min)\.f32)\b")


def gemm_compiled(block_m: int, block_n: int, block_k: int, warps: int, stages: int, epilogue: str, arch: int,
                  fp8: bool = False, fast_accum: bool = False):
    """The pointer-epilogue GEMM compiled for sm_<arch>, with one of EPILOGUES; `fp8`: E4M3 operands (and FC1's
    codes E4M3), summed as GemmConfig.fast_accum says."""
    fc1 = epilogue == "fc1"
    codes, per_channel = (False, False) if fc1 else RESIDUALS[epilogue.removeprefix("residual ")]
    operand, fc1_out = ("*fp8e4nv", "fp8_e4m3") if fp8 else ("*i8", "int8")
    signature = {"a_ptr": operand, "w_ptr": operand, "w_scale_ptr": "*fp32", "bias_ptr": "*fp32",
                 "res_ptr": "*i8" if codes else "*fp16", "out_ptr": operand if fc1 else "*fp16", "M": "i32",
                 "N": "i32", "K": "i32", "a_scale": "fp32", "out_recip": "fp32",
                 "res_scale": "*fp32" if per_channel else "fp32",
                 "stride_am": "i32", "stride_wn": "i32", "stride_rm": "i32", "stride_om": "i32"}
    constants = dict(HAS_RESIDUAL=not fc1, GELU=fc1, OUT_FORMAT=fc1_out if fc1 else "fp", RECIP_PER_CHANNEL=False,
                     RES_CODES=codes, CLAMP_LOW=not fc1, FP8=fp8,
                     RES_PER_CHANNEL=per_channel, EVEN_K=True, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                     GROUP_M=8, PDL=arch >= 90, PREFETCH=False, FAST_ACC=fast_accum)
    signature.update({name: "constexpr" for name in constants})
    # what the JIT infers for BERT's shapes: pointers, sizes and strides all multiples of 16
    aligned = [i for i, name in enumerate(signature) if name.endswith(("_ptr", "stride_am", "stride_wn", "stride_rm",
                                                                        "stride_om")) or name in ("M", "N", "K")]
    source = ASTSource(fn=quantized_linear_kernel, signature=signature, constexprs=constants,
                       attrs={(i,): [["tt.divisibility", 16]] for i in aligned})
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),  # as plugins.int8_linear launches it
                          options={"num_warps": warps, "num_stages": stages, "enable_fp_fusion": False})


def sass_counts(cubin: bytes) -> collections.Counter:
    """Opcodes (without modifiers) of the SASS in `cubin`, counted, for those in SASS_COUNTED."""
    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True, check=True).stdout
    return collections.Counter(op for op in SASS_OP.findall(sass) if op in SASS_COUNTED)


def registers(ptx: str, arch: int) -> str:
    """ptxas's register and spill report for a kernel's PTX (the ptxas Triton compiles with)."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        info = subprocess.run([get_ptxas(arch).path, f"-arch=sm_{arch}a", "-v", f.name, "-o", os.devnull],
                              capture_output=True, text=True, check=True).stderr
    regs, spills = re.search(r"Used (\d+) registers", info), re.search(r"(\d+) bytes spill stores", info)
    return f"{regs.group(1)} registers, {spills.group(1)} bytes spill stores"


def attention_ptx(config: str, int8: bool, arch: int, d: int = 64) -> str:
    """PTX of the FP16 or INT8 attention kernel at configuration BMxBN-wW-sS: no mask, whole blocks, codes out."""
    dims, w, s = config.split("-")
    bm, bn = map(int, dims.split("x"))
    signature = {"qkv_ptr": "*i8" if int8 else "*fp16", "bias_ptr": "*fp16", "out_ptr": "*i8", "out_recip": "fp32",
                 "S": "i32", "HEADS": "i32", "qk_scale": "fp32"}
    if int8:
        signature.update(p_recip="fp32", pv_scale="fp32")
    signature.update(stride_qkv="i32", stride_out="i32")
    constants = dict(HAS_BIAS=False, OUT_FORMAT="int8", RECIP_PER_CHANNEL=False, D=d, BLOCK_M=bm, BLOCK_N=bn, EVEN=True,
                     PDL=arch >= 90)
    if not int8:
        constants.update(q_desc=None, kv_desc=None)  # pointer loads
    signature.update({name: "constexpr" for name in constants})
    names = list(signature)
    aligned = [names.index(n) for n in ("qkv_ptr", "bias_ptr", "out_ptr", "S", "stride_qkv", "stride_out")]
    source = ASTSource(fn=attention_int8_kernel if int8 else attention_kernel, signature=signature,
                       constexprs=constants, attrs={(i,): [["tt.divisibility", 16]] for i in aligned})
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": int(w[1:]), "num_stages": int(s[1:])}).asm["ptx"]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiles", nargs="*", default=["128x128x128-w4-s3", "64x64x128-w4-s4", "32x64x128-w4-s4"],
                    help="BMxBNxBK-wWARPS-sSTAGES")
    ap.add_argument("--attention", nargs="*", default=[], metavar="BMxBN-wW-sS",
                    help="also the attention kernels at these configurations")
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: Hopper)")
    ap.add_argument("--sass", action="store_true", help="also count the GEMMs' SASS instructions (nvdisasm)")
    ap.add_argument("--fp8", action="store_true", help="also FC1 on E4M3 codes, each K step's sum added into float32 "
                    "against fast accumulation (GemmConfig.fast_accum): float adds, registers and spills (ptxas)")
    args = ap.parse_args(argv)
    print(f"triton {triton.__version__}, sm_{args.arch}: static instruction counts in the PTX")
    for config in args.attention:
        for int8 in (False, True):
            ptx = attention_ptx(config, int8, args.arch)
            counts = collections.Counter(m.group(0) for m in COUNTED.finditer(ptx))
            counts.update(m.group(1) for m in ARITHMETIC.finditer(ptx))
            print(f"attention {config} {'INT8 (-imh)' if int8 else 'FP16'}: "
                  + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    for tile in args.tiles:
        dims, w, s = tile.split("-")
        bm, bn, bk = map(int, dims.split("x"))
        for epilogue in EPILOGUES:
            compiled = gemm_compiled(bm, bn, bk, int(w[1:]), int(s[1:]), epilogue, args.arch)
            counts = collections.Counter(m.group(0) for m in COUNTED.finditer(compiled.asm["ptx"]))
            print(f"{tile} {epilogue}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
            if args.sass:
                counts = sass_counts(compiled.asm["cubin"])
                print(f"{tile} {epilogue} SASS: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
        if not args.fp8:
            continue
        ptx = gemm_compiled(bm, bn, bk, int(w[1:]), int(s[1:]), "fc1", args.arch).asm["ptx"]
        print(f"{tile} fc1 INT8 (int32 sums): " + registers(ptx, args.arch))
        for fast in (False, True):
            ptx = gemm_compiled(bm, bn, bk, int(w[1:]), int(s[1:]), "fc1", args.arch, fp8=True,
                                fast_accum=fast).asm["ptx"]
            adds = len(re.findall(r"\badd(?:\.rn)?\.f32\b", ptx))
            print(f"{tile} fc1 FP8 {'fast accumulation' if fast else 'float32 add per K step'}: add.f32 {adds}, "
                  + registers(ptx, args.arch))


if __name__ == "__main__":
    main()
