"""FP16 GEMMs accumulating in FP16 (cuBLAS's CUBLAS_COMPUTE_16F, torch.backends.cuda.matmul.allow_fp16_accumulation)
against FP32 accumulation: the time and power of BERT-large's 96 encoder GEMMs replayed as one CUDA graph, and
the error each adds. A measuring script for the device machine, not a test.

    python -m benchmarks.device_fp16_accumulate --out fp16acc.md

Why: a 128 x 384 FP16 forward is back-to-back GEMMs that run at the board's power limit (the SM clock drops;
they take 1.2x their isolated time inside the forward), so a GEMM that moves fewer accumulator bits per
multiply-add may run faster there even at the same peak rate. Random weights (std 0.02, BERT's initialisation),
activations N(0, 1) like LayerNorm outputs; timings are medians of CUDA-event-timed graph replays, the two modes
alternating in blocks; power and SM clock sampled by nvidia-smi every 100 ms during each mode's blocks.
"""
from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from eval.gpu_state import GpuMonitor

MATMUL = torch.backends.cuda.matmul


@dataclass
class Layer:
    wqkv: torch.Tensor
    bqkv: torch.Tensor
    wo: torch.Tensor
    bo: torch.Tensor
    w1: torch.Tensor
    b1: torch.Tensor
    w2: torch.Tensor
    b2: torch.Tensor


def make_layers(n: int, hidden: int, inter: int, gen: torch.Generator) -> list[Layer]:
    def w(rows, cols):
        return (torch.randn(rows, cols, device="cuda", generator=gen) * 0.02).half()

    def b(rows):
        return (torch.randn(rows, device="cuda", generator=gen) * 0.02).half()

    return [Layer(w(3 * hidden, hidden), b(3 * hidden), w(hidden, hidden), b(hidden), w(inter, hidden), b(inter),
                  w(hidden, inter), b(hidden)) for _ in range(n)]


def gemms(layers: list[Layer], x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
    """The encoder's GEMMs as the FP16 engine calls them (attention and LayerNorm left out)."""
    y = x
    for L in layers:
        F.linear(x, L.wqkv, L.bqkv)
        F.linear(ctx, L.wo, L.bo)
        h = torch._addmm_activation(L.b1, x, L.w1.t(), use_gelu=True)
        y = F.linear(h, L.w2, L.b2)
    return y


def capture(fn, fp16_acc: bool) -> torch.cuda.CUDAGraph:
    MATMUL.allow_fp16_accumulation = fp16_acc
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        return g
    finally:
        MATMUL.allow_fp16_accumulation = False


def time_modes(graphs: dict[str, torch.cuda.CUDAGraph], power: GpuMonitor, rounds: int, block: int,
               tag: str) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {m: [] for m in graphs}
    for g in graphs.values():
        g.replay()
    torch.cuda.synchronize()
    for _ in range(rounds):
        for mode, g in graphs.items():
            power.phase = f"{tag} {mode}"
            for _ in range(block):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                g.replay()
                end.record()
                end.synchronize()
                times[mode].append(start.elapsed_time(end))
            power.phase = None
    return times


def errors(layer: Layer, m: int, gen: torch.Generator) -> list[str]:
    """Relative error (Frobenius) of each GEMM against an FP64 reference, FP32 against FP16 accumulation."""
    x = torch.randn(m, layer.wqkv.shape[1], device="cuda", generator=gen).half()
    h = F.gelu(F.linear(x.double(), layer.w1.double(), layer.b1.double()), approximate="tanh").half()
    rows = []
    cases = (("qkv", x, layer.wqkv, layer.bqkv, False), ("attn_out", x, layer.wo, layer.bo, False),
             ("fc1 + gelu", x, layer.w1, layer.b1, True), ("fc2", h, layer.w2, layer.b2, False))
    for name, a, w, bias, gelu in cases:
        ref = F.linear(a.double(), w.double(), bias.double())
        ref = F.gelu(ref, approximate="tanh") if gelu else ref
        got = {}
        for acc in (False, True):
            MATMUL.allow_fp16_accumulation = acc
            y = torch._addmm_activation(bias, a, w.t(), use_gelu=True) if gelu else F.linear(a, w, bias)
            got[acc] = float((y.double() - ref).norm() / ref.norm())
        MATMUL.allow_fp16_accumulation = False
        rows.append(f"| {name} | {a.shape[1]} | {got[False]:.2e} | {got[True]:.2e} | {got[True] / got[False]:.1f}x |")
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=4096)
    ap.add_argument("--rows", type=int, nargs="+", default=[49152, 128], help="M: batch x sequence length")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--block", type=int, default=10, help="replays of one mode before switching")
    ap.add_argument("--out", default="fp16acc.md")
    args = ap.parse_args(argv)
    gen = torch.Generator(device="cuda").manual_seed(0)
    layers = make_layers(args.layers, args.hidden, args.intermediate, gen)
    lines = [f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}; {args.layers} layers of "
             f"H={args.hidden}, I={args.intermediate}; random weights", "",
             "| M | FP32 acc. ms | FP16 acc. ms | ratio | power / clock, FP32 acc. | power / clock, FP16 acc. |",
             "| --- | --- | --- | --- | --- | --- |"]
    with GpuMonitor("cuda") as power:
        for m in args.rows:
            x = torch.randn(m, args.hidden, device="cuda", generator=gen).half()
            ctx = torch.randn(m, args.hidden, device="cuda", generator=gen).half()
            graphs = {"fp32": capture(lambda: gemms(layers, x, ctx), False),
                      "fp16": capture(lambda: gemms(layers, x, ctx), True)}
            t = time_modes(graphs, power, args.rounds, args.block, str(m))
            a, b = statistics.median(t["fp32"]), statistics.median(t["fp16"])
            lines.append(f"| {m} | {a:.3f} | {b:.3f} | {a / b:.3f}x | {power.summary(f'{m} fp32')} | "
                         f"{power.summary(f'{m} fp16')} |")
            print(lines[-1], flush=True)
            del graphs
            torch.cuda.empty_cache()
            time.sleep(0.5)
    lines += ["", "Relative error against FP64 (M = 4096, layer 0's weights):", "",
              "| GEMM | K | FP32 acc. | FP16 acc. | ratio |", "| --- | --- | --- | --- | --- |"]
    lines += errors(layers[0], 4096, gen)
    print("\n".join(lines[-6:]))
    from common.files import atomic_write_text
    atomic_write_text(args.out, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
