"""Engine latency on random-weight BERT-base/large, against HF transformers eager FP16 and torch.compile, one run.

    python -m benchmarks.bench_engines --presets bert-base bert-large --shapes 1x128 128x384 --out engines.md
    python -m benchmarks.bench_engines --presets bert-large --shapes 1x128 128x384 --fuse off --baselines \
        --variants fp16 "int8 -iln" fp8 "fp8 unfused" --out fp8.md        # issue 21's FP8 speed comparison

Random weights are honest for latency (it does not depend on weight values); the INT8 scales come from a max
calibration of the same random model on random tokens (FP8: the same ranges, scales amax / 448). Each variant is
also checked against its reference on fresh inputs (relative error of the start logits), so a fast wrong engine
shows up in the table. "fp8 unfused" is the FP8 build as it ran before our FP8 kernels: cuBLASLt's GEMM with the
epilogue in torch ops, the LayerNorms' and the context's E4M3 codes in passes of their own. FP8 variants need
compute capability 8.9 and are skipped (with the reason) below it. Needs CUDA.
"""
from __future__ import annotations

import argparse
import time

import torch

from calib.cache import CalibrationCache, TensorRange
from quant.policy import PrecisionPolicy, calibration_sites
from engines.backends import CUBLASLT, LIBRARY
from engines.build import build_engine, fp8_unsupported, kernel_choices
from engines.engine_file import Profile
from engines.graphs import GraphRunner
from engines.runtime import Engine
from engines.tuning import TimingCache
from eval.benchmark import Latency, padding_stated, random_inputs, time_compute
from eval.gpu_state import GpuMonitor
from model.checkpoint import load_model

VARIANTS = {
    "fp16": PrecisionPolicy(fp16=True),
    "int8": PrecisionPolicy(int8=True, fp16=True),
    "int8 -iln": PrecisionPolicy(int8=True, fp16=True, iln=True),
    "int8 -iln -imh": PrecisionPolicy(int8=True, fp16=True, iln=True, imh=True),
    "int8 -g": PrecisionPolicy(int8=True, fp16=True, fc2_library_gemm=True),
    "int8 library": PrecisionPolicy(int8=True, fp16=True),  # reference ops only (cuBLASLt int8, torch epilogue)
    "fp8": PrecisionPolicy(fp8=True, fp16=True),
    "fp8 -iln": PrecisionPolicy(fp8=True, fp16=True, iln=True),  # the residual stream as E4M3 codes
    "fp8 unfused": PrecisionPolicy(fp8=True, fp16=True),  # cuBLASLt FP8 and the reference ops (module docstring)
}


def unfused_fp8(engine: Engine) -> None:
    """The FP8 engine as it ran before our FP8 kernels: every GEMM on cuBLASLt (epilogue in torch ops), attention
    on SDPA, no E4M3 codes from our kernels (the LayerNorms' and the context's from the reference ops)."""
    engine.kernels = {k: CUBLASLT if k.startswith("gemm.") else LIBRARY if k.startswith("attention.") else v
                      for k, v in engine.kernels.items()}
    engine.fp8_kernels = False


def variant_engine(loaded, name: str, shapes: list[Profile], calib, timing: TimingCache, preset: str) -> Engine:
    """Variant `name` built for CUDA at `shapes` (its kernels timed, or forced: "library", "fp8 unfused"); what
    runs each op is printed."""
    t0 = time.perf_counter()
    device = torch.device("cuda")
    header, tensors = build_engine(loaded, VARIANTS[name.removesuffix(" fused")], shapes, calib, device, None, timing)
    build_s = time.perf_counter() - t0
    engine = Engine(header, tensors, device).eval()
    if name.removesuffix(" fused").endswith("library"):
        engine.use_triton = False
    chosen = kernel_choices(header) if engine.use_triton else ["library kernels (forced)"]
    if name.removesuffix(" fused") == "fp8 unfused":
        unfused_fp8(engine)
        chosen = ["cuBLASLt FP8 GEMMs, SDPA, the E4M3 codes in torch ops (forced)"]
    print(f"{preset} {name}: built in {build_s:.0f} s; chosen:", *(chosen or ["sdpa, library GEMMs"]), sep="\n  ",
          flush=True)
    return engine


def max_ranges(loaded, device) -> CalibrationCache:
    amax: dict[str, float] = {}

    def tap(name, x):
        amax[name] = max(amax.get(name, 0.0), float(x.abs().max()))
        return x

    model = loaded.model.to(device)
    model.tap = tap
    with torch.inference_mode():
        model(*random_inputs(8, 128, loaded.config.vocab_size, device, seed=1))
    model.tap = lambda name, x: x
    loaded.model = model.cpu()
    assert set(amax) == set(calibration_sites(loaded.config.num_layers))
    return CalibrationCache({k: TensorRange(v) for k, v in amax.items()}, "max", {}, 8, loaded.digest, "random", "-")


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def bench(args, gpu: GpuMonitor) -> list[str]:
    """The table's lines: every preset, baseline and variant at every shape, timed while `gpu` samples."""
    device = torch.device("cuda")
    timing = TimingCache(args.timing_cache)
    shapes = [Profile(*map(int, s.split("x"))) for s in args.shapes]
    rows = [f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}; random-weight timings; "
            f"median of {args.iterations} (CUDA events, compute only, inputs on the device); power and SM clock: "
            f"medians of nvidia-smi samples during the timed runs", "",
            "| model | variant | shape | median ms | p95 ms | p99 ms | seq/s | vs HF eager | power, SM clock "
            "| start logits vs FP16 reference (rel.) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]

    def timed(name, shape, fn, x):
        return time_compute(fn, x, args.iterations, args.warmup, device, gpu, phase=f"{name} {shape}")

    def record(preset, name, shape, samples, base, err):
        lat = Latency.from_samples(shape.batch, shape.seq_len, samples)
        speedup = f"{base[shape] / lat.median_ms:.2f}x" if shape in base else "-"
        rows.append(f"| {preset} | {name} | {shape} | {lat.median_ms:.3f} | {lat.p95_ms:.3f} | {lat.p99_ms:.3f} | "
                    f"{lat.sequences_per_s:,.0f} | {speedup} | {gpu.brief(f'{name} {shape}')} | {err} |")
        print(rows[-1], flush=True)
        return lat

    for preset in args.presets:
        loaded = load_model(preset)
        vocab = loaded.config.vocab_size
        base: dict[Profile, float] = {}
        if args.baselines:
            from transformers import BertConfig as HFConfig, BertForQuestionAnswering

            c = loaded.config
            hf_config = HFConfig(vocab_size=vocab, hidden_size=c.hidden_size, num_hidden_layers=c.num_layers,
                                 num_attention_heads=c.num_heads, intermediate_size=c.intermediate_size,
                                 attn_implementation="sdpa")
            hf = BertForQuestionAnswering(hf_config).half().to(device).eval()
            assert hf.config._attn_implementation == "sdpa"
            call = lambda m: (lambda i, t, a: m(input_ids=i, token_type_ids=t, attention_mask=a))  # noqa: E731
            for shape in shapes:
                x = random_inputs(shape.batch, shape.seq_len, vocab, device)
                if "hf-eager" in args.baselines:
                    base[shape] = record(preset, "HF eager fp16 (sdpa)", shape,
                                         timed("HF eager fp16 (sdpa)", shape, call(hf), x), {}, "-").median_ms
                if "hf-compile" in args.baselines:
                    t0 = time.perf_counter()
                    compiled = torch.compile(hf, mode="reduce-overhead", dynamic=False)
                    time_compute(call(compiled), x, 3, 0, device)
                    name = f"HF torch.compile reduce-overhead (compile {time.perf_counter() - t0:.0f} s)"
                    record(preset, name, shape, timed(name, shape, call(compiled), x), base, "-")
            del hf
            torch.cuda.empty_cache()
        calib = max_ranges(loaded, device)
        reference = loaded.model.half().to(device).eval()
        for name in args.variants:
            policy = VARIANTS[name.removesuffix(" fused")]
            if policy.fp8 and fp8_unsupported(device):
                print(f"{preset} {name}: skipped, this GPU lacks {fp8_unsupported(device)}", flush=True)
                continue
            engine = variant_engine(loaded, name, shapes, calib if policy.quantized else None, timing, preset)
            fuses = [False, True] if args.fuse == "both" else [args.fuse == "on" or name.endswith(" fused")]
            for fuse in fuses:
                runner = GraphRunner(engine, fuse=fuse)
                for shape in shapes:
                    x = random_inputs(shape.batch, shape.seq_len, vocab, device, seed=2)
                    t0 = time.perf_counter()
                    with torch.inference_mode():
                        got = padding_stated(runner, x)(*x)[0].clone()  # the graph that is timed
                        want = reference(*x)[0]
                    setup = time.perf_counter() - t0
                    label = f"{name.removesuffix(' fused')}{' fused' if fuse else ''} (graph; setup {setup:.0f} s)"
                    record(preset, label, shape, timed(label, shape, runner, x), base, f"{rel_error(got, want):.1e}")
            del engine, runner
            torch.cuda.empty_cache()
        del reference
        loaded.model = None
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", nargs="+", default=["bert-base", "bert-large"])
    ap.add_argument("--shapes", nargs="+", default=["1x128", "128x384"])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS),
                    help="names from VARIANTS; a ' fused' suffix compiles that variant (TorchInductor) before capture")
    ap.add_argument("--fuse", choices=("off", "on", "both"), default="both")
    ap.add_argument("--iterations", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--baselines", nargs="*", default=["hf-eager", "hf-compile"])
    ap.add_argument("--out", default="bench_engines.md")
    ap.add_argument("--timing-cache", default=None, help="engines.tuning timing cache file (default: none kept)")
    args = ap.parse_args(argv)
    with GpuMonitor("cuda") as gpu:
        rows = bench(args, gpu)
    from common.files import atomic_write_text
    atomic_write_text(args.out, "\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
