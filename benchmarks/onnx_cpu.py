"""CPU latency of the ONNX export under ONNX Runtime against our CPU reference engine, one run, one markdown table.

    python -m benchmarks.onnx_cpu [--models ../shared/models/minilm-l6-h384-squad11 bert-base] [--shapes 1x128 1x384]
                                  [--iterations 20] [--warmup 3] [--block 5] [--threads N] [--out FILE.md]

For each model (a folder, or a random-weight preset) and shape: ONNX Runtime (CPU provider, ORT_ENABLE_ALL) on the
INT8 export (--int8: Q/DQ at the GEMM inputs, per-channel INT8 weights) and on the FP32 export, and our CPU engine
(engines.build.build_engine on the CPU behind eval.runnables' GraphRunner, which runs the reference ops there) with
the same two policies; the median ms of `--iterations` calls per variant and the ratios. The variants are timed in
turn, `--block` calls each per round (eval.benchmark.time_compute), after waiting for the machine's load average to
drop: a shared machine's background load then weighs on all of them alike. ONNX Runtime and PyTorch get the same
number of intra-op threads. The INT8 scales are a max calibration on random tokens (latency does not depend on
their values). Each variant's start logits on fresh random tokens are compared with the FP32 model and with its
own reference (FP32: the model; INT8: the fake-quant reference), so a fast wrong result shows up; ONNX Runtime's
INT8 sits a few percent from the fake-quant reference there, as the same INT8 function computed with other float
rounding: codes near .5 flip and the flips compound over the layers (on 60 real dev questions: 58 answers the same
as our INT8 engine's, all 60 with the export's symmetric_clamp; tests/test_interop_ort.py).
"""
from __future__ import annotations

import argparse
import platform
import tempfile
import time
from calib.calibrate import observed_amax
from datetime import datetime, timezone
from pathlib import Path

import torch

from calib.cache import CalibrationCache, TensorRange
from calib.spec import spec_from_cache
from engines.build import build_engine
from engines.engine_file import Profile
from engines.runtime import Engine
from eval.benchmark import Latency, random_inputs, time_compute
from eval.runnables import engine_build
from interop.onnx_export import export_onnx
from interop.ort_runner import OrtForward
from model.checkpoint import load_model
from quant.fakequant import fake_quant_model
from quant.policy import PrecisionPolicy, calibration_sites

CPU = torch.device("cpu")
POLICIES = {"int8": PrecisionPolicy(int8=True), "fp32": PrecisionPolicy()}


def max_ranges(loaded) -> CalibrationCache:
    amax = observed_amax(loaded.model, [random_inputs(4, 128, loaded.config.vocab_size, CPU, seed=1)])
    assert set(amax) == set(calibration_sites(loaded.config.num_layers))
    return CalibrationCache({k: TensorRange(v) for k, v in amax.items()}, "max", {}, 4, loaded.digest, "random", "-")


def interleaved(forwards: dict, inputs, args) -> dict[str, list[float]]:
    """Per-call ms of each forward, timed in rounds of `args.block` calls per forward (eval.benchmark.time_compute,
    the first call of each block untimed), so a background load that comes and goes weighs on every variant alike."""
    samples: dict[str, list[float]] = {label: [] for label in forwards}
    for label, fn in forwards.items():
        time_compute(fn, inputs, 0, args.warmup, CPU)
    while min(map(len, samples.values())) < args.iterations:
        for label, fn in forwards.items():
            samples[label] += time_compute(fn, inputs, args.block, 1, CPU)
    return samples


def load_average() -> float:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return float("nan")


def wait_until_quiet(limit: float, seconds: float) -> None:
    """Wait (up to `seconds`) for the 1-minute load average to fall below `limit`: other work on the machine."""
    deadline = time.monotonic() + seconds
    while load_average() >= limit and time.monotonic() < deadline:
        time.sleep(5)
    if load_average() >= limit:
        print(f"warning: load average {load_average():.2f} (other processes): latencies are noisy", flush=True)


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def bench_model(spec: str, shapes, args, folder: Path) -> tuple[list[str], list[str]]:
    loaded = load_model(spec)
    loaded.model.eval()
    name = Path(spec).name if Path(spec).is_dir() else spec
    calib = max_ranges(loaded)
    longest = max(s for _, s in shapes)
    forwards, references = {}, {}
    for kind, policy in POLICIES.items():
        spec_, smooth = spec_from_cache(calib, policy, loaded.config, loaded.digest) if policy.int8 else (None, {})
        path = export_onnx(loaded, policy, spec_, smooth, folder / f"{name}-{kind}.onnx", tokenizer=False)
        forwards[f"onnxruntime {kind}"] = OrtForward(path, device="cpu", threads=args.threads)
        header, tensors = build_engine(loaded, policy, [Profile(max(b for b, _ in shapes), longest)], calib, CPU,
                                       None)
        forwards[f"ours {kind}"] = engine_build(Engine(header, tensors, CPU).eval(), f"{name}-{kind}",
                                                batch=1).forward
        references[kind] = fake_quant_model(loaded.model, policy, spec_, smooth) if policy.int8 else loaded.model
    checks = []
    x = random_inputs(1, 64, loaded.config.vocab_size, CPU, seed=7)
    with torch.inference_mode():
        fp32 = loaded.model(*x)[0]
        for label, fn in forwards.items():
            out = fn(*x)[0]
            checks.append(f"{name} {label}: rel. error of the start logits (1x64 random tokens) against the FP32 "
                          f"model {rel_error(out, fp32):.1e}, against its reference "
                          f"{rel_error(out, references[label.split()[-1]](*x)[0]):.1e}")
    rows = []
    for b, s in shapes:
        inputs = random_inputs(b, s, loaded.config.vocab_size, CPU)
        wait_until_quiet(args.quiet_load, args.wait)
        ms = {label: Latency.from_samples(b, s, samples).median_ms
              for label, samples in interleaved(forwards, inputs, args).items()}
        rows.append(f"| {name} | {b}x{s} | {ms['onnxruntime int8']:.2f} | {ms['onnxruntime fp32']:.2f} | "
                    f"{ms['ours int8']:.2f} | {ms['ours fp32']:.2f} | "
                    f"{ms['onnxruntime fp32'] / ms['onnxruntime int8']:.2f}x | "
                    f"{ms['ours fp32'] / ms['ours int8']:.2f}x | {ms['ours int8'] / ms['onnxruntime int8']:.2f}x | "
                    f"{ms['ours fp32'] / ms['onnxruntime fp32']:.2f}x |")
        print(rows[-1], flush=True)
    return rows, checks


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["../shared/models/minilm-l6-h384-squad11", "bert-base"])
    p.add_argument("--shapes", nargs="+", default=["1x128", "1x384"])
    p.add_argument("--iterations", type=int, default=20, help="timed calls per variant and shape (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per variant first (default 3)")
    p.add_argument("--block", type=int, default=5, help="calls per variant per round (default 5)")
    p.add_argument("--quiet-load", type=float, default=0.7, help="wait for a 1-minute load average below this "
                   "before timing each shape (default 0.7)")
    p.add_argument("--wait", type=float, default=300, help="seconds to wait for it at most (default 300)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="intra-op threads for ONNX Runtime and PyTorch alike (default: PyTorch's)")
    p.add_argument("--out", help="also write the table (markdown) here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes]
    import onnxruntime

    header = [f"CPU: {cpu_name()}, {args.threads} threads; torch {torch.__version__}, onnxruntime "
              f"{onnxruntime.__version__}; median of {args.iterations} calls after {args.warmup}, the variants "
              f"interleaved in blocks of {args.block}; {datetime.now(timezone.utc):%Y-%m-%d}", "",
              "| model | shape | ORT INT8 ms | ORT FP32 ms | ours INT8 ms | ours FP32 ms | ORT FP32/INT8 | "
              "ours FP32/INT8 | ours/ORT INT8 | ours/ORT FP32 |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    print("\n".join(header), flush=True)
    rows, checks = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.models:
            r, c = bench_model(spec, shapes, args, Path(tmp))
            rows += r
            checks += c
    print("", *checks, sep="\n")
    if args.out:
        Path(args.out).write_text("\n".join(header + rows + [""] + checks) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
