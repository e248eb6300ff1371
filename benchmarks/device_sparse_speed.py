"""Issue 19's speed table: random-weight BERT pruned 2:4 (by magnitude, `build --prune-2to4`'s), each engine built
dense and --sparse in one run, INT8 `-iln` and FP16, at 1x128 and 128x384: the engine's latency, and per GEMM what
the --sparse build chose and why (its header's notes: the 2:4 kernel's time against the dense one where dense won).

    python -m benchmarks.device_sparse_speed --presets bert-large --shapes 1x128 128x384 --out sparse-speed.md

INT8 scales from a max calibration on random tokens (benchmarks.bench_engines.max_ranges); latency is the median
of CUDA-event-timed graph replays without padding (eval.benchmark.time_compute). Needs CUDA.
"""
from __future__ import annotations

import argparse
import statistics

import torch

from benchmarks.bench_engines import max_ranges
from common.files import atomic_write_text
from engines.build import build_engine, kernel_choices
from engines.engine_file import Profile
from engines.graphs import GraphRunner
from engines.runtime import Engine
from engines.tuning import TimingCache
from eval.benchmark import random_inputs, time_compute
from model.checkpoint import load_model
from quant.policy import PrecisionPolicy

VARIANTS = {"int8 -iln": dict(int8=True, fp16=True, iln=True), "fp16": dict(fp16=True)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", nargs="+", default=["bert-large"])
    ap.add_argument("--shapes", nargs="+", default=["1x128", "128x384"])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--out", default="sparse-speed.md")
    args = ap.parse_args(argv)
    device, timing = torch.device("cuda"), TimingCache("/tmp/timing.json")
    shapes = [Profile(*map(int, s.split("x"))) for s in args.shapes]
    lines = [f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}", "",
             "| model | variant | shape | dense ms | --sparse ms | dense / sparse |",
             "| --- | --- | --- | ---: | ---: | ---: |"]
    notes: list[str] = []

    def write() -> None:
        atomic_write_text(args.out, "\n".join(lines + [""] + notes) + "\n")

    for preset in args.presets:
        loaded = load_model(preset)
        calib = max_ranges(loaded, device)
        for name in args.variants:
            times = {}
            for sparse in (False, True):
                policy = PrecisionPolicy(**VARIANTS[name], sparse=sparse)
                header, tensors = build_engine(loaded, policy, shapes, calib if policy.quantized else None, device,
                                               None, timing, prune=sparse)
                runner = GraphRunner(Engine(header, tensors, device).eval(), f"{preset} {name}")
                for shape in shapes:
                    x = random_inputs(shape.batch, shape.seq_len, loaded.config.vocab_size, device)
                    times[sparse, shape] = statistics.median(
                        time_compute(runner, x, 100, 10, device))
                if sparse:
                    notes += [f"{preset} {name} --sparse: {line}" for line in kernel_choices(header)]
                    notes += [f"  {k}: {v}" for k, v in header.kernels.items() if k.startswith("sparse.")]
                del runner, tensors
                torch.cuda.empty_cache()
            for shape in shapes:
                dense, sparse_ms = times[False, shape], times[True, shape]
                lines.append(f"| {preset} | {name} | {shape} | {dense:.3f} | {sparse_ms:.3f} | "
                             f"{dense / sparse_ms:.2f}x |")
            print("\n".join(lines[-len(shapes):]), flush=True)
            write()


if __name__ == "__main__":
    main()
