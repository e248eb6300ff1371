"""Latency and throughput of an engine at one shape, timed the way the TensorRT BERT demo times it.

`compute`: CUDA events around graph replays only (inputs already on the device). `end_to_end`: host clock around
copying inputs from pinned host memory, the replay, and copying the logits back. On the CPU there is nothing to copy
and nothing to overlap: the engine call is timed once (host clock), and `bench` reports that one figure. Benchmarks
report; they never decide pass/fail.

`time_until_stable` is how `eval`, `sweep` and `sensitivity` time a build (eval.compare.time_profiles): rounds of
`iterations` calls after the warm-up, until the medians of two consecutive rounds agree within `tolerance` (5% on
the CPU, 2% on CUDA) or `max_rounds` / `max_seconds` are spent; the figure is the median of those last two rounds,
and it says whether it was stable and how far the two rounds were apart (the noise a comparison must allow for).
"""
from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from common.errors import WorkbenchError


@dataclass(frozen=True)
class Latency:
    batch: int
    seq_len: int
    iterations: int
    median_ms: float
    p95_ms: float
    p99_ms: float

    @property
    def sequences_per_s(self) -> float:
        return self.batch / (self.median_ms / 1e3)

    @classmethod
    def from_samples(cls, batch: int, seq_len: int, samples_ms: list[float]) -> "Latency":
        a = np.asarray(samples_ms)
        return cls(batch, seq_len, len(a), float(np.median(a)), float(np.percentile(a, 95)),
                   float(np.percentile(a, 99)))

    def row(self) -> str:
        return (f"{self.batch:>5} x {self.seq_len:<4}  median {self.median_ms:8.3f} ms  p95 {self.p95_ms:8.3f}  "
                f"p99 {self.p99_ms:8.3f}  {self.sequences_per_s:10,.0f} seq/s")


def random_inputs(batch: int, seq_len: int, vocab_size: int, device, seed: int = 0, padded: float = 0.0):
    """Token ids drawn at random (latency does not depend on their values), two segments; the last `padded`
    fraction of each sequence is padding (mask 0), none by default."""
    if not 0.0 <= padded < 1.0:
        raise WorkbenchError(f"--padded must be in [0, 1), got {padded}")
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(min(1000, vocab_size // 2), vocab_size, (batch, seq_len), generator=g)  # skip specials
    types = torch.zeros_like(ids)
    types[:, seq_len // 4:] = 1
    mask = torch.ones_like(ids)
    if padded:
        mask[:, seq_len - min(max(1, round(seq_len * padded)), seq_len - 1):] = 0  # at least one real token
    return ids.to(device), types.to(device), mask.to(device)


def padding_stated(fn, inputs):
    """`fn` told whether the batch `inputs` has padding, read once here, outside any timing: an engine's
    GraphRunner replays a graph whose attention takes no mask for a batch without padding (engines/graphs.py), and
    cannot tell that from a mask on the GPU without waiting for it. Models and plain engines are returned as
    they are."""
    from engines.graphs import GraphRunner

    if isinstance(fn, GraphRunner):
        return functools.partial(fn, dense=bool(inputs[2].all()))
    return fn


def time_compute(fn, inputs, iterations: int, warmup: int, device: torch.device, gpu=None,
                 phase: str = "compute") -> list[float]:
    """Per-call times in ms of fn(*inputs). `gpu` (an eval.gpu_state.GpuMonitor): its samples taken during the
    timed calls, not the warm-up (which may capture graphs or compile), are tagged `phase`."""
    fn = padding_stated(fn, inputs)
    with torch.inference_mode():
        for _ in range(warmup):
            fn(*inputs)
        samples = []
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            if gpu is not None:
                gpu.phase = phase
            for _ in range(iterations):
                start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn(*inputs)
                stop.record()
                stop.synchronize()
                samples.append(start.elapsed_time(stop))
            if gpu is not None:
                gpu.phase = None
        else:
            for _ in range(iterations):
                t0 = time.perf_counter()
                fn(*inputs)
                samples.append((time.perf_counter() - t0) * 1e3)
    return samples


# Stable timing: device type -> (agreement of two consecutive rounds' medians, most rounds, most seconds).
STABLE_DEFAULTS = {"cpu": (0.05, 8, 60.0), "cuda": (0.02, 8, 60.0)}


@dataclass(frozen=True)
class StableTiming:
    samples_ms: list[float]   # the last two rounds: the figure's samples
    runs: int                 # timed calls in all rounds (warm-up not counted)
    rounds: int
    spread: float             # |median(last round) - median(round before)| / the smaller: the noise seen
    stable: bool              # spread <= tolerance


def time_until_stable(fn, inputs, iterations: int, warmup: int, device: torch.device, *,
                      tolerance: float | None = None, max_rounds: int | None = None,
                      max_seconds: float | None = None) -> StableTiming:
    """Rounds of `iterations` timed calls (the first after `warmup` untimed ones) until two consecutive rounds'
    medians agree within `tolerance` (a fraction), or `max_rounds` rounds or `max_seconds` are spent (then not
    stable). Defaults: STABLE_DEFAULTS for the device type. A first round slowed by a cold start, or a machine
    whose load changes while it is timed, shows as rounds that disagree instead of a wrong figure."""
    tol, most_rounds, most_seconds = STABLE_DEFAULTS["cuda" if device.type == "cuda" else "cpu"]
    tol = tol if tolerance is None else tolerance
    most_rounds = max(2, most_rounds if max_rounds is None else max_rounds)
    most_seconds = most_seconds if max_seconds is None else max_seconds
    rounds: list[list[float]] = []
    t0, spread = time.perf_counter(), math.inf
    while True:
        rounds.append(time_compute(fn, inputs, iterations, warmup if not rounds else 0, device))
        if len(rounds) >= 2:
            a, b = float(np.median(rounds[-2])), float(np.median(rounds[-1]))
            spread = abs(a - b) / max(min(a, b), 1e-9)
            if spread <= tol or len(rounds) >= most_rounds or time.perf_counter() - t0 > most_seconds:
                break
    return StableTiming(rounds[-2] + rounds[-1], sum(map(len, rounds)), len(rounds), spread, spread <= tol)


def time_end_to_end(fn, inputs, iterations: int, warmup: int, device: torch.device) -> list[float]:
    """Host inputs (pinned on CUDA) -> device -> fn -> logits back on the host, per call in ms."""
    pin = device.type == "cuda"
    host = [t.cpu().pin_memory() if pin else t.cpu() for t in inputs]
    fn = padding_stated(fn, host)
    samples = []
    with torch.inference_mode():
        for i in range(warmup + iterations):
            t0 = time.perf_counter()
            dev = [t.to(device, non_blocking=True) for t in host]
            start, end = fn(*dev)
            start.cpu(), end.cpu()  # synchronizes
            if i >= warmup:
                samples.append((time.perf_counter() - t0) * 1e3)
    return samples


def time_pipelined(runner, inputs, iterations: int, warmup: int, packed: bool = False) -> float:
    """Mean ms per batch when `iterations` host batches stream through runner.pipelined (copies overlapping
    compute on a side stream): the steady-state cost of a batch in a long evaluation, not one call's latency.
    `packed`: `inputs` are a packed batch's tensors (model.packing.PackedBatch.tensors)."""
    host = [t.cpu() for t in inputs]
    with torch.inference_mode():
        for _ in runner.pipelined((host for _ in range(warmup)), packed=packed):
            pass
        t0 = time.perf_counter()
        for _ in runner.pipelined((host for _ in range(iterations)), packed=packed):
            pass
        return (time.perf_counter() - t0) * 1e3 / iterations


# ------------------------------------------------------------------------------------------------ cli.py bench

EXAMPLES = """examples:
  python cli.py bench -e engines/int8.engine                  # every profile of the engine
  python cli.py bench -e engines/int8.engine -b 1 -s 128 --iterations 1000 --fuse
  python cli.py bench -e engines/int8.engine -b 64 -s 384 --padded 0.3   # 30% padding: the general graph
  python cli.py build --model DIR --int8 --fp16 -b 64 -s 384 --buckets 64 --calib-cache calib.json \\
      -o engines/buckets.engine          # profiles 64x64, 64x128, ..., 64x384: one graph per bucket
  python cli.py bench -e engines/buckets.engine --squad dev-v1.1.json --hf --single-stream 1000
      # samples/s over every dev window (bucketed, padded to 384, packed, HF eager FP16) and per-window latency
  python cli.py build --model DIR --int8 --fp16 -b 64 -s 384 --buckets 64 --varlen --calib-cache calib.json \\
      -o engines/packed.engine           # padding-free: bench, eval and infer run it packed
  python cli.py bench -e engines/packed.engine --squad dev-v1.1.json --profile
      # and where each path's time goes: its kernels, ms a pass and ns per computed token"""


def check_counts(iterations: int, warmup: int) -> None:
    if iterations < 1 or warmup < 0:
        raise WorkbenchError("--iterations must be at least 1 and --warmup at least 0")


def bench_shapes(profiles, batches=None, seq_lens=None) -> list:
    """The shapes `cli.py bench` times: every profile; or -b and -s paired in order as every verb pairs them (a
    single value goes with each value of the other, eval.sweep.pair_profiles); with only one of them, each value
    given at each of the profiles' values of the other."""
    from engines.engine_file import Profile
    from eval.sweep import pair_profiles

    if not batches and not seq_lens:
        return list(profiles)
    if batches and seq_lens:
        return [Profile(b, s) for b, s in pair_profiles(batches, seq_lens, (), 0)]
    return [Profile(b, s) for b in batches or sorted({p.batch for p in profiles})
            for s in seq_lens or sorted({p.seq_len for p in profiles})]


def bench_from_flags(flags) -> None:
    """`cli.py bench`: bench_engine_file with its flags (with --squad: eval.throughput's offline benchmark), each
    block printed as soon as it is timed."""
    if getattr(flags, "squad", None):
        from eval.throughput import bench_squad_from_flags

        for lines in bench_squad_from_flags(flags):
            print(lines, flush=True)
        return
    squad_only = [name for name, given in (("--hf", flags.hf), ("--single-stream", flags.single_stream),
                                           ("--profile", flags.profile)) if given]
    if squad_only:
        raise WorkbenchError(f"{', '.join(squad_only)}: only with --squad FILE (the offline benchmark over a SQuAD "
                             "file's windows)")
    for lines in bench_engine_file(flags.engine, device=flags.device, batches=flags.batch_size,
                                   seq_lens=flags.seq_length, iterations=flags.iterations, warmup=flags.warmup,
                                   padded=flags.padded, fuse=flags.fuse, backend=flags.backend):
        print(lines, flush=True)


def bench_engine_file(path, *, device: str | None = None, batches=None, seq_lens=None, iterations: int = 200,
                      warmup: int = 20, padded: float = 0.0, fuse: bool = False, backend: str | None = None):
    """`cli.py bench`: the engine file loaded (checked) on `device` and timed at its profiles (or the -b x -s
    shapes given); its report a line (or block) at a time, as `bench_lines`."""
    from engines.build import load_runnable
    from engines.graphs import GraphRunner
    from model.runner import pick_device

    from eval.runnables import file_backend

    check_counts(iterations, warmup)
    runner = file_backend(path, backend)
    if runner == "onnxruntime":
        yield from _bench_onnx_file(path, device, batches, seq_lens, iterations, warmup, padded)
        return
    if runner == "tensorrt":
        yield from _bench_plan_file(path, device, batches, seq_lens, iterations, warmup, padded)
        return
    dev = pick_device(device)
    engine, _ = load_runnable(path, dev)
    shapes = bench_shapes(engine.header.profiles, batches, seq_lens)
    yield from bench_lines(engine, GraphRunner(engine, str(path), fuse=fuse), dev, shapes, iterations, warmup, padded,
                           name=str(path))


def _bench_onnx_file(path, device, batches, seq_lens, iterations: int, warmup: int, padded: float):
    """An exported model (`cli.py export-onnx`) timed in ONNX Runtime at the -b x -s shapes (default 1x128):
    its session call, on the host clock (ONNX Runtime's run is synchronous)."""
    from engines.engine_file import Profile
    from interop.ort_runner import OrtForward

    forward = OrtForward(path, device=device)
    shapes = bench_shapes([Profile(1, 128)], batches, seq_lens)
    yield (f"{path}: onnxruntime {forward.metadata.get('policy', '?')} on {forward.provider}; median of "
           f"{iterations} after {warmup} warm-up; "
           f"{f'{padded:.0%} of each sequence padded' if padded else 'no padding'}")
    for shape in shapes:
        x = random_inputs(shape.batch, shape.seq_len, int(forward.config()["vocab_size"]), torch.device("cpu"),
                          padded=padded)
        samples = time_compute(forward, x, iterations, warmup, torch.device("cpu"))
        yield f"compute     {Latency.from_samples(shape.batch, shape.seq_len, samples).row()}"


def _bench_plan_file(path, device, batches, seq_lens, iterations: int, warmup: int, padded: float):
    """A TensorRT plan (`cli.py build --backend tensorrt`; only where TensorRT imports) timed at its profiles (or
    the -b x -s shapes): CUDA events around its execution, as for our engines' compute figure."""
    from engines.engine_file import Profile
    from interop.tensorrt_backend import TrtForward

    forward = TrtForward(path, device=device)
    shapes = bench_shapes([Profile(b, s) for b, s in forward.profiles], batches, seq_lens)
    yield (f"{path}: TensorRT plan on {forward.device}; median of {iterations} after {warmup} warm-up; "
           f"{f'{padded:.0%} of each sequence padded' if padded else 'no padding'}")
    vocab = 30522  # the plan holds no config: BERT uncased ids (timing does not depend on which)
    for shape in shapes:
        x = random_inputs(shape.batch, shape.seq_len, vocab, forward.device, padded=padded)
        samples = time_compute(forward, x, iterations, warmup, forward.device)
        yield f"compute     {Latency.from_samples(shape.batch, shape.seq_len, samples).row()}"


def bench_lines(engine, runner, device: torch.device, shapes, iterations: int, warmup: int, padded: float = 0.0,
                name: str = "engine"):
    """`cli.py bench`'s report, a line (or block) at a time as each shape is timed: the settings, then per shape
    compute latency (with the GPU's power and clock on CUDA), end to end, and pipelined throughput. On the CPU the
    engine call is the only figure: inputs and logits stay in host memory (end to end is the same call) and
    nothing runs beside the compute (a pipelined figure would time the same call again)."""
    from eval.gpu_state import GpuMonitor

    check_counts(iterations, warmup)
    packed = bool(getattr(runner, "runs_packed", False))
    padding = f"{padded:.0%} of each sequence padded" if padded else \
        "no padding (the graph whose attention takes no mask; --padded times the general one)"
    if packed:
        padding = ("packed (built --varlen): B windows of S tokens in one stream" if not padded else
                   f"packed (built --varlen): B windows of {1 - padded:.0%} of S tokens in one stream")
    gpu_name = engine.header.gpu_name
    yield (f"{name}: {engine.policy.describe()} on {device.type}{' (' + gpu_name + ')' if gpu_name else ''}; "
           f"median of {iterations} after {warmup} warm-up; {padding}"
           + ("\n(CPU: inputs and logits stay in host memory and nothing overlaps the compute, so the engine call "
              "is the only figure: no end-to-end or pipelined line)" if device.type != "cuda" else ""))
    with GpuMonitor(device) as gpu:  # sampling from the start; only the timed calls are read
        for shape in shapes:
            x = random_inputs(shape.batch, shape.seq_len, engine.cfg.vocab_size, device, padded=padded)
            fn = runner
            if packed:  # the same windows packed: their real tokens in one stream
                from model.packing import pack_padded

                batch = pack_padded(*x)
                x = tuple(t.to(device) for t in batch.tensors)
                fn = functools.partial(runner.packed, max_seqlen=batch.max_seqlen)
            compute = Latency.from_samples(shape.batch, shape.seq_len, time_compute(
                fn, x, iterations, warmup, device, gpu, phase=str(shape)))
            if device.type != "cuda":
                yield f"compute     {compute.row()}"
                continue
            e2e = Latency.from_samples(shape.batch, shape.seq_len,
                                       time_end_to_end(fn, x, iterations, warmup, device))
            piped = time_pipelined(runner, x, iterations, warmup, packed=packed)
            yield (f"compute     {compute.row()}\n"
                   + f"  GPU while timing compute: {gpu.summary(str(shape))}\n"
                   + f"end-to-end  {e2e.row()}\n"
                   f"pipelined   {shape.batch:>5} x {shape.seq_len:<4}  mean   {piped:8.3f} ms per batch with copies "
                   f"overlapping compute  {shape.batch / piped * 1e3:10,.0f} seq/s")
