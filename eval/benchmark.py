"""Latency and throughput of an engine at one shape, timed the way the TensorRT BERT demo times it.

`compute`: CUDA events around graph replays only (inputs already on the device). `end_to_end`: host clock around
copying inputs from pinned host memory, the replay, and copying the logits back. On the CPU both are host-clock
timings of the engine call. Benchmarks report; they never decide pass/fail.
"""
from __future__ import annotations

import functools
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


def time_pipelined(runner, inputs, iterations: int, warmup: int) -> float:
    """Mean ms per batch when `iterations` host batches stream through runner.pipelined (copies overlapping
    compute on a side stream): the steady-state cost of a batch in a long evaluation, not one call's latency."""
    host = [t.cpu() for t in inputs]
    with torch.inference_mode():
        for _ in runner.pipelined(host for _ in range(warmup)):
            pass
        t0 = time.perf_counter()
        for _ in runner.pipelined(host for _ in range(iterations)):
            pass
        return (time.perf_counter() - t0) * 1e3 / iterations


# ------------------------------------------------------------------------------------------------ cli.py bench

EXAMPLES = """examples:
  python cli.py bench -e engines/int8.engine                  # every profile of the engine
  python cli.py bench -e engines/int8.engine -b 1 -s 128 --iterations 1000 --fuse
  python cli.py bench -e engines/int8.engine -b 64 -s 384 --padded 0.3   # 30% padding: the general graph"""


def check_counts(iterations: int, warmup: int) -> None:
    if iterations < 1 or warmup < 0:
        raise WorkbenchError("--iterations must be at least 1 and --warmup at least 0")


def bench_shapes(profiles, batches=None, seq_lens=None) -> list:
    """The shapes `cli.py bench` times: every profile, or each -b x -s given (what is not given: the profiles')."""
    from engines.engine_file import Profile

    if not batches and not seq_lens:
        return list(profiles)
    return [Profile(b, s) for b in batches or sorted({p.batch for p in profiles})
            for s in seq_lens or sorted({p.seq_len for p in profiles})]


def bench_engine_file(path, *, device: str | None = None, batches=None, seq_lens=None, iterations: int = 200,
                      warmup: int = 20, padded: float = 0.0, fuse: bool = False):
    """`cli.py bench`: the engine file loaded (checked) on `device` and timed at its profiles (or the -b x -s
    shapes given); its report a line (or block) at a time, as `bench_lines`."""
    from engines.build import load_runnable
    from engines.graphs import GraphRunner
    from model.runner import pick_device

    check_counts(iterations, warmup)
    dev = pick_device(device)
    engine, _ = load_runnable(path, dev)
    shapes = bench_shapes(engine.header.profiles, batches, seq_lens)
    yield from bench_lines(engine, GraphRunner(engine, str(path), fuse=fuse), dev, shapes, iterations, warmup, padded,
                           name=str(path))


def bench_lines(engine, runner, device: torch.device, shapes, iterations: int, warmup: int, padded: float = 0.0,
                name: str = "engine"):
    """`cli.py bench`'s report, a line (or block) at a time as each shape is timed: the settings, then per shape
    compute latency (with the GPU's power and clock on CUDA), end to end, and pipelined throughput."""
    from eval.gpu_state import GpuMonitor

    check_counts(iterations, warmup)
    padding = f"{padded:.0%} of each sequence padded" if padded else \
        "no padding (the graph whose attention takes no mask; --padded times the general one)"
    gpu_name = engine.header.gpu_name
    yield (f"{name}: {engine.policy.describe()} on {device.type}{' (' + gpu_name + ')' if gpu_name else ''}; "
           f"median of {iterations} after {warmup} warm-up; {padding}")
    with GpuMonitor(device) as gpu:  # sampling from the start; only the timed calls are read
        for shape in shapes:
            x = random_inputs(shape.batch, shape.seq_len, engine.cfg.vocab_size, device, padded=padded)
            compute = Latency.from_samples(shape.batch, shape.seq_len, time_compute(
                runner, x, iterations, warmup, device, gpu, phase=str(shape)))
            e2e = Latency.from_samples(shape.batch, shape.seq_len,
                                       time_end_to_end(runner, x, iterations, warmup, device))
            piped = time_pipelined(runner, x, iterations, warmup)
            yield (f"compute     {compute.row()}\n"
                   + (f"  GPU while timing compute: {gpu.summary(str(shape))}\n" if device.type == "cuda" else "")
                   + f"end-to-end  {e2e.row()}\n"
                   f"pipelined   {shape.batch:>5} x {shape.seq_len:<4}  mean   {piped:8.3f} ms per batch with copies "
                   f"overlapping compute  {shape.batch / piped * 1e3:10,.0f} seq/s")
