"""What FC1's GELU costs inside the INT8 GEMM epilogue, and what cheaper GELUs would save. A measuring script for
the device machine, not a test.

    python3 -m benchmarks.device_gelu_explore [--out gelu.md]

FC1 at 128 x 384 (GELU, INT8 codes out) runs at ~570 TOP/s where the QKV GEMM with the same K runs at ~970: the
epilogue is not overlapped with the tensor-core work, and exact-erf GELU costs tens of instructions per element.
Each variant of the epilogue's `epilogue_gelu` (plugins/int8_linear.py) runs in its own process (Triton caches compiled
kernels by source, so a patched helper compiles afresh): the module's own (the tanh form on the hardware tanh
instruction), the tanh form as y * sigmoid(2u) (one exp and one division), BERT's erf GELU through the device
library's erf and through Abramowitz & Stegun 7.1.26 (|error| <= 1.5e-7), and no GELU at all (the floor). Codes
are compared with int8_linear_reference (the tanh form; the erf rows differ from it by design).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

import torch
import triton
import triton.language as tl

from plugins.int8_linear import GemmConfig, gelu_tanh_exp

VARIANTS = ("tanh-hw (module)", "tanh-exp", "erf-libdevice", "erf-as7126", "none")
SHAPES = ("large-big-fc1", "base-big-fc1", "large-small-fc1")
CONFIGS = (
    GemmConfig(256, 128, 128, 8, 8, 3, "tma-persistent"),
    GemmConfig(128, 256, 128, 8, 8, 3, "tma-persistent"),
    GemmConfig(128, 128, 128, 8, 8, 4, "tma-persistent"),
    GemmConfig(256, 128, 64, 8, 8, 4, "tma-persistent"),
    GemmConfig(128, 128, 128, 8, 8, 3, "tma-persistent"),
    GemmConfig(64, 128, 128, 8, 4, 4),
    GemmConfig(128, 64, 128, 8, 4, 4),
    GemmConfig(128, 128, 128, 8, 4, 3, "tma"),
    GemmConfig(128, 128, 64, 8, 4, 4, "tma"),
    GemmConfig(128, 256, 64, 8, 8, 3, "tma"),
    GemmConfig(32, 64, 128, 8, 4, 4),
    GemmConfig(64, 64, 128, 8, 4, 4),
)


@triton.jit
def _gelu_as7126(y):
    x = y * 0.7071067811865476
    a = tl.abs(x)
    t = tl.fdiv(1.0, 1.0 + 0.3275911 * a)
    p = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    e = 1.0 - p * tl.exp(-a * a)
    return 0.5 * y * (1.0 + tl.where(x < 0, -e, e))


@triton.jit
def _gelu_erf_libdevice(y):
    return 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))


@triton.jit
def _gelu_none(y):
    return y


def _patch(variant: str) -> None:
    import plugins.int8_linear as m
    if variant != VARIANTS[0]:
        m.epilogue_gelu = {"erf-libdevice": _gelu_erf_libdevice, "erf-as7126": _gelu_as7126,
                           "tanh-exp": gelu_tanh_exp, "none": _gelu_none}[variant]


def run_variant(variant: str, compile_only: bool) -> list[str]:
    """Rows `| variant | shape | config | us | TOP/s | codes != reference |` for one GELU variant."""
    _patch(variant)
    from engines.backends import triton_impl
    from engines.tuning import time_ms
    from benchmarks.device_gemm_explore import all_shapes, problem
    from plugins.int8_linear import int8_linear, int8_linear_reference

    rows = []
    for shape in [s for s in all_shapes() if s.name in SHAPES]:
        args, kw = problem(shape, torch.device("cuda"))
        ref = int8_linear_reference(*args, **kw)
        for c in CONFIGS:
            try:
                out = int8_linear(*args, **kw, config=c)
                if compile_only:
                    continue
                diff = (out.int() - ref.int()).abs()
                us = time_ms(lambda: int8_linear(*args, **kw, config=c), rep=50) * 1e3
            except Exception as e:  # noqa: BLE001 (reported)
                rows.append(f"| {variant} | {shape.name} | {triton_impl(c)} | failed: {type(e).__name__} | | |")
                continue
            ops = 2 * shape.m * shape.n * shape.k
            rows.append(f"| {variant} | {shape.name} | {triton_impl(c)} | {us:.1f} | {ops / us / 1e6:.0f} | "
                        f"{float((diff > 0).float().mean()):.2%} (max {int(diff.max())}) |")
        del args, kw, ref
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "gelu.md"))
    ap.add_argument("--variant", help=argparse.SUPPRESS)  # a worker process: one variant
    ap.add_argument("--compile-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.variant:
        print("\n".join(run_variant(args.variant, args.compile_only)), flush=True)
        return
    me = [sys.executable, "-m", "benchmarks.device_gelu_explore"]
    # compile every variant in parallel processes, then time one process at a time on a quiet GPU
    for p in [subprocess.Popen(me + ["--variant", v, "--compile-only"]) for v in VARIANTS]:
        p.wait()
    lines = [f"# FC1 epilogue GELU variants: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
             f"triton {triton.__version__}", "",
             "| GELU | shape | config | us | TOP/s | codes != reference (tanh form) |", "| --- | --- | --- | --- | --- | --- |"]
    for v in VARIANTS:
        done = subprocess.run(me + ["--variant", v], capture_output=True, text=True)
        lines += [r for r in done.stdout.splitlines() if r.startswith("|")]
        if done.returncode:
            lines.append(f"| {v} | process failed: {done.stderr.strip().splitlines()[-1:]} | | | | |")
        print("\n".join(lines[-len(SHAPES) * len(CONFIGS):]), flush=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
