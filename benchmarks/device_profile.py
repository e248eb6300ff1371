"""Where the engine's time goes on the GPU: ceilings, per-op timings at BERT's GEMM and attention shapes, and a
kernel profile of whole engines. A measuring script for the device machine, not a test.

    python -m benchmarks.device_profile --out profile.md

Random weights and inputs (latency does not depend on values); every figure is the median of repeated runs timed
with CUDA events (triton.testing.do_bench).
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

from quant.policy import PrecisionPolicy
from engines.build import build_engine
from engines.engine_file import Profile
from engines.graphs import GraphRunner
from engines.runtime import Engine
from benchmarks.bench_engines import max_ranges
from engines.tuning import TimingCache
from eval.benchmark import padding_stated, random_inputs
from model.checkpoint import load_model


TIMING = TimingCache("/tmp/timing.json")  # shared by the engines this script builds


def ms(fn) -> float:
    return do_bench(fn, warmup=25, rep=200, return_mode="median")


def ceilings(lines: list[str]) -> None:
    n = 8192
    a, b = torch.randn(n, n, device="cuda", dtype=torch.float16), torch.randn(n, n, device="cuda", dtype=torch.float16)
    t = ms(lambda: a @ b)
    lines.append(f"- fp16 {n}^3 matmul: {2 * n**3 / t / 1e9:.0f} TFLOP/s ({t:.2f} ms)")
    ai = torch.randint(-127, 128, (n, n), device="cuda", dtype=torch.int8)
    bi = torch.randint(-127, 128, (n, n), device="cuda", dtype=torch.int8).t()
    t = ms(lambda: torch._int_mm(ai, bi))
    lines.append(f"- int8 {n}^3 torch._int_mm: {2 * n**3 / t / 1e9:.0f} TOP/s ({t:.2f} ms)")
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    t = ms(lambda: y.copy_(x))
    lines.append(f"- device copy 1 GiB: {2 * x.numel() / t / 1e6:.0f} GB/s (read + write)")


def gemms(lines: list[str], hidden: int, inter: int) -> None:
    lines += ["", "| M | N | K | fp16 linear ms | TFLOP/s | int8 _int_mm ms | TOP/s | _int_mm + dequant ms |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for m in (128, 49152):
        for n, k in ((3 * hidden, hidden), (hidden, hidden), (inter, hidden), (hidden, inter)):
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            w = torch.randn(n, k, device="cuda", dtype=torch.float16)
            bias = torch.randn(n, device="cuda", dtype=torch.float16)
            t16 = ms(lambda: F.linear(x, w, bias))
            xq = torch.randint(-127, 128, (max(m, 32), k), device="cuda", dtype=torch.int8)
            wq = torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8)
            sc, b32 = torch.rand(n, device="cuda"), bias.float()
            t8 = ms(lambda: torch._int_mm(xq, wq.t()))
            t8d = ms(lambda: (torch._int_mm(xq, wq.t()).float() * sc + b32).half())
            fl = 2 * m * n * k
            lines.append(f"| {m} | {n} | {k} | {t16:.3f} | {fl / t16 / 1e9:.0f} | {t8:.3f} | {fl / t8 / 1e9:.0f} | "
                         f"{t8d:.3f} |")


def attention(lines: list[str], batch: int, heads: int, seq: int, dim: int) -> None:
    q, k, v = (torch.randn(batch, heads, seq, dim, device="cuda", dtype=torch.float16) for _ in range(3))
    mask = torch.ones(batch, seq, device="cuda")
    mask[:, seq * 3 // 4:] = 0
    bias = ((1 - mask[:, None, None, :]) * torch.finfo(torch.float16).min).half()
    boolean = mask[:, None, None, :].bool()
    fl = 4 * batch * heads * seq * seq * dim
    lines += ["", f"attention b={batch} heads={heads} s={seq} d={dim}", "",
              "| backend | mask | ms | TFLOP/s |", "| --- | --- | --- | --- |"]
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):
        for name, m in (("none", None), ("float bias", bias), ("bool", boolean)):
            try:
                with sdpa_kernel(backend):
                    t = ms(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=m))
                lines.append(f"| {backend.name} | {name} | {t:.3f} | {fl / t / 1e9:.0f} |")
            except RuntimeError as e:
                lines.append(f"| {backend.name} | {name} | n/a: {str(e).splitlines()[0][:60]} | |")


def engine_profile(lines: list[str], preset: str, policy: PrecisionPolicy, label: str, shape: Profile,
                   fuse: bool) -> None:
    loaded = load_model(preset)
    calib = max_ranges(loaded, torch.device("cuda")) if policy.quantized else None
    header, tensors = build_engine(loaded, policy, [shape], calib, torch.device("cuda"), None, TIMING)
    runner = GraphRunner(Engine(header, tensors, torch.device("cuda")).eval(), fuse=fuse)
    chosen = ", ".join(f"{k.split('.')[1]}: {v}" for k, v in header.kernels.items() if k.startswith("gemm."))
    x = random_inputs(shape.batch, shape.seq_len, loaded.config.vocab_size, torch.device("cuda"))
    runner = padding_stated(runner, x)  # random inputs have no padding: the graph without an attention mask
    runner(*x)
    total = ms(lambda: runner(*x))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            runner(*x)
        torch.cuda.synchronize()
    lines += ["", f"### {preset} {label}{' fused' if fuse else ''} {shape}: {total:.3f} ms per forward (graph)", "",
              f"GEMMs: {chosen or 'library'}", "",
              "| kernel | calls per forward | ms per forward | share |", "| --- | --- | --- | --- |"]
    events = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)
    whole = sum(e.device_time_total for e in events)
    for e in events[:16]:
        lines.append(f"| {e.key[:90]} | {e.count / 5:.0f} | {e.device_time_total / 5 / 1e3:.3f} | "
                     f"{e.device_time_total / whole:.0%} |")
    lines.append(f"| all kernels | | {whole / 5 / 1e3:.3f} | (graph replay: {total:.3f} ms) |")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="profile.md")
    ap.add_argument("--parts", nargs="+", default=["ceilings", "gemms", "attention", "engines"])
    ap.add_argument("--variants", nargs="+", default=["fp16 fused", "int8"],
                    help="fp16|int8|int8 -iln|int8 -imh|int8 -iln -imh [fused]")
    ap.add_argument("--preset", default="bert-large", help="a preset or a model folder")
    ap.add_argument("--shapes", nargs="+", default=["128x384", "1x128"])
    args = ap.parse_args(argv)
    lines = [f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}", ""]
    steps = []
    if "ceilings" in args.parts:
        steps.append(lambda: ceilings(lines))
    if "gemms" in args.parts:
        steps.append(lambda: gemms(lines, 1024, 4096))
    if "attention" in args.parts:
        steps += [lambda: attention(lines, 128, 16, 384, 64), lambda: attention(lines, 1, 16, 128, 64)]
    if "engines" in args.parts:
        for variant in args.variants:
            base = variant.removesuffix(" fused")
            policy = PrecisionPolicy(fp16=True, int8=base.startswith("int8"), iln="-iln" in base,
                                     imh="-imh" in base)
            for shape in args.shapes:
                steps.append(lambda p=policy, l=base, s=Profile(*map(int, shape.split("x"))), f=variant.endswith(
                    " fused"): engine_profile(lines, args.preset, p, l, s, f))
    from common.files import atomic_write_text
    printed = 0
    for step in steps:
        step()
        print("\n".join(lines[printed:]), flush=True)
        printed = len(lines)
        atomic_write_text(args.out, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
