"""Issue 20's GEMM question on the GPU: is CUTLASS 3's Hopper INT8 GEMM (the "cutlass" family, plugins/cutlass_int8)
faster than our Triton INT8 GEMM at BERT-large's shapes? A measuring script: both families run the engine's epilogue
of each GEMM (QKV: FP16 out; attention-out and FC2: + the -iln residual's INT8 codes, FP16 out; FC1: GELU, INT8
codes out) on the same operands in one run, each checked against plugins.int8_linear.int8_linear_reference with the
build's rule (engines.tuning.agrees), timed by triton.testing.do_bench (median, L2 flushed).

    python -m plugins.cutlass_int8 build --out lib.so      # once, where nvcc is (minutes)
    python -m benchmarks.cutlass_int8_probe --lib lib.so --out probe.md

Triton runs the TMA candidates of plugins.int8_linear that BERT-large builds chose at 49,152 rows (`--triton`
names them; `--triton all` takes every TMA candidate); the table gives each side's best, and the ratio.
"""
from __future__ import annotations

import argparse
import os

import torch
from triton.testing import do_bench

from common.files import atomic_write_text
from engines.backends import triton_impl
from engines.tuning import agrees
from plugins import cutlass_int8
from plugins.int8_linear import CANDIDATE_CONFIGS, int8_linear, int8_linear_reference

# (N, K, epilogue): 0 plain, 1 + residual codes, 2 GELU and codes out
SHAPES = {"qkv": (3072, 1024, 0), "attn_out": (1024, 1024, 1), "fc1": (4096, 1024, 2), "fc2": (1024, 4096, 1)}
RECIP = 127 / 4.0  # FC1's output codes: GELU outputs up to 4


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lib", help=f"the CUTLASS library (default: ${cutlass_int8.LIBRARY_ENV} or the cache's)")
    ap.add_argument("--rows", type=int, nargs="+", default=[49152])
    ap.add_argument("--triton", nargs="+", default=["triton:128x128x128-g8-w4-s3+tma",
                                                     "triton:256x128x128-g8-w8-s3+tma-persistent",
                                                     "triton:128x256x128-g8-w8-s3+tma-persistent"])
    ap.add_argument("--out", default="probe.md")
    args = ap.parse_args(argv)
    if args.lib:
        os.environ[cutlass_int8.LIBRARY_ENV] = args.lib
    if not cutlass_int8.available():
        raise SystemExit(f"the CUTLASS family cannot run here: {cutlass_int8.unavailable_reason()}")
    dev = torch.device("cuda")
    lines = [f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}", "",
             "| M | GEMM | Triton best (config) | µs | TOP/s | CUTLASS best (config) | µs | TOP/s | "
             "Triton / CUTLASS |", "| ---: | --- | --- | ---: | ---: | --- | ---: | ---: | ---: |"]
    detail = []
    g = torch.Generator(device=dev).manual_seed(0)
    for m in args.rows:
        for gemm, (n, k, epilogue) in SHAPES.items():
            a = torch.randint(-127, 128, (m, k), dtype=torch.int8, device=dev, generator=g)
            w = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=dev, generator=g)
            a_scale = 0.02
            w_scale = torch.rand(n, device=dev, generator=g) * 2e-4 * (1024 / k) ** 0.5 + 1e-4  # y of order 1
            bias = torch.randn(n, device=dev, generator=g)
            res = torch.randint(-127, 128, (m, n), dtype=torch.int8, device=dev, generator=g)
            res_scale = (torch.rand(n, device=dev, generator=g) * 0.02).contiguous()
            flags = [{}, dict(residual=res, residual_scale=res_scale), dict(gelu=True, out_recip=RECIP)][epilogue]
            want = int8_linear_reference(a, w, a_scale, w_scale, bias, **flags)
            ops = 2 * m * n * k

            def error(got):  # (the build's agreement rule, the largest step of codes or FP16's relative error)
                if got.dtype == torch.int8:
                    return agrees(got, want), (got.int() - want.int()).abs().max().item()
                return agrees(got, want), ((got.float() - want.float()).norm() / want.float().norm()).item()

            def timed(side, name, run, times):
                try:
                    got = run()
                    torch.cuda.synchronize()
                except Exception as e:  # a tile that does not compile or launch here
                    detail.append(f"- {gemm} M={m} {side} {name}: {type(e).__name__}: {str(e)[:200]}")
                    return
                times[name] = (do_bench(run, warmup=25, rep=200, return_mode="median"), error(got))
            triton_times, cutlass_times = {}, {}
            for cfg in CANDIDATE_CONFIGS:
                if cfg.tma and not cfg.small_m and (args.triton == ["all"] or triton_impl(cfg) in args.triton):
                    timed("triton", triton_impl(cfg), lambda cfg=cfg: int8_linear(a, w, a_scale, w_scale, bias,
                                                                                  config=cfg, **flags), triton_times)
            for name in cutlass_int8.CONFIGS:
                timed("cutlass", name, lambda name=name: cutlass_int8.cutlass_int8_linear(name, a, w, a_scale, w_scale,
                                                                                          bias, **flags), cutlass_times)
            for side, times in (("triton", triton_times), ("cutlass", cutlass_times)):
                for name, (ms, (ok, err)) in sorted(times.items(), key=lambda kv: kv[1][0]):
                    detail.append(f"- {gemm} M={m} {side} {name}: {ms * 1e3:.1f} µs, {ops / ms / 1e9:.0f} TOP/s, "
                                  f"{'agrees' if ok else 'DISAGREES'} with the reference ({err:.3g}: codes' "
                                  "largest step, or FP16's relative error)")
                    if not ok:  # a wrong kernel is no candidate, however fast
                        del times[name]
            if triton_times and cutlass_times:
                (tn, (tms, _)), (cn, (cms, _)) = (min(t.items(), key=lambda kv: kv[1][0])
                                                  for t in (triton_times, cutlass_times))
                lines.append(f"| {m} | {gemm} | {tn} | {tms * 1e3:.1f} | {ops / tms / 1e9:.0f} | {cn} | "
                             f"{cms * 1e3:.1f} | {ops / cms / 1e9:.0f} | {tms / cms:.2f}x |")
            print("\n".join(lines[-1:] + detail[-12:]), flush=True)
            atomic_write_text(args.out, "\n".join(lines + ["", "Every candidate:", ""] + detail) + "\n")


if __name__ == "__main__":
    main()
