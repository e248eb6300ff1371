"""Kernel choice at build time, and the timing cache that makes the choice free the second time.

Each encoder GEMM (qkv, attn_out, fc1, fc2) has more than one implementation on CUDA: the library GEMM (cuBLASLt
through torch ops, epilogue in separate ops) and our Triton kernel with a fused epilogue under several tile
configurations. Which is fastest depends on the GPU and on M = batch x sequence length, so `build` times every
candidate at every profile's M and records the winner in the engine header, as TensorRT's builder does with its
tactics. Timings are kept in a timing cache file keyed by GPU, library versions and problem, so a later build of
the same shapes on the same machine does no timing at all (TensorRT's --timing-cache, same idea).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from common.errors import WorkbenchError
from common.files import atomic_write_json, read_bytes, sha256_bytes

log = logging.getLogger(__name__)

LIBRARY = "library"
TIMING_CACHE_FORMAT = "bert-int8-workbench/timing-cache"
TIMING_METHOD = "graph-replay"  # part of every key: timings taken another way (eager launches) are not reused


@dataclass(frozen=True)
class GemmProblem:
    """One GEMM as the runtime launches it: what a timing depends on besides the GPU and the implementation."""

    gemm: str        # qkv, attn_out, fc1, fc2 (their epilogues differ)
    m: int
    n: int
    k: int
    dtype: str       # input dtype: int8, float16, float32
    epilogue: str    # e.g. "bias", "bias+residual", "bias+gelu->int8"

    def key(self, impl: str, machine: str) -> str:
        return f"{machine}|{self.dtype}|{self.gemm}:{self.epilogue}|m{self.m}n{self.n}k{self.k}|{impl}"


def machine_key() -> str:
    """GPU, compute capability, the versions whose kernels we time (the CUTLASS library's source where it is
    built: a rebuilt library times anew), how we time, and whether kernels launch with programmatic dependent
    launch (plugins.common.pdl): a timing holds only for all of them."""
    import triton

    from plugins import cutlass_int8
    from plugins.common import pdl

    major, minor = torch.cuda.get_device_capability()
    launch = " pdl" if pdl(torch.device("cuda", torch.cuda.current_device())) else ""
    cutlass = f" cutlass {cutlass_int8.source_hash()}" if cutlass_int8.available() else ""
    return (f"{torch.cuda.get_device_name()} sm{major}{minor} torch {torch.__version__} "
            f"triton {triton.__version__}{cutlass} {TIMING_METHOD}{launch}")


def kernel_key(gemm: str, m: int) -> str:
    """The engine header's key for the implementation of one GEMM kind at one row count."""
    return f"gemm.{gemm}.m{m}"


# A GEMM row count at most this factor below a timed one runs that one's kernels (timed_rows).
BORROW_RATIO = 1.25


def timed_rows(rows: Iterable[int], always_below: int) -> dict[int, int]:
    """Each GEMM row count of an engine's profiles -> the row count whose timing chooses its kernels.

    A fine `--buckets` ladder (every 16 tokens: 24 profiles to 384) has neighbours whose best tiles barely differ,
    and timing each would multiply the build's time; so, as TensorRT times a profile's tactics at one shape and runs
    them over the profile's range, from the largest count down, a count within BORROW_RATIO below the last timed one
    runs its kernels, and the first count below that is timed. Counts up to `always_below` rows are always timed:
    there the candidates differ (small-M tiles) and latency is most sensitive to the tile."""
    owner: dict[int, int] = {}
    last = None
    for m in sorted(set(rows), reverse=True):
        if m > always_below and last is not None and m * BORROW_RATIO >= last:
            owner[m] = last
        else:
            owner[m] = last = m
    return owner


def attention_key(batch: int, seq_len: int, padded: bool = True) -> str:
    """The engine header's key for the attention implementation at one profile shape, in the graph for batches
    with padding (the key bias) or in the one for batches without (no mask: engines/graphs.py)."""
    return f"attention.b{batch}s{seq_len}" + ("" if padded else ".dense")


class TimingCache:
    """Milliseconds per (machine, problem, implementation), in a JSON file with a checksum.

    A missing file starts empty; a damaged or hand-edited one is reported in one line and started afresh (the
    timings are only ever re-measured, never trusted blindly)."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path is not None else None
        self.times: dict[str, float] = {}
        self.reused = self.timed = 0
        if self.path is not None and self.path.exists():
            self.times = self._read(self.path)

    @staticmethod
    def _read(path: Path) -> dict[str, float]:
        data = read_bytes(path, "timing cache")
        try:
            d = json.loads(data)
            body = json.dumps(d["times"], sort_keys=True).encode()
            ok = d.get("format") == TIMING_CACHE_FORMAT and d.get("checksum") == sha256_bytes(body)
            times = {str(k): float(v) for k, v in d["times"].items()}
        except (ValueError, KeyError, TypeError, AttributeError):
            ok, times = False, {}
        if not ok:
            log.warning("%s: timing cache is damaged or was modified; timing again and rewriting it", path)
            return {}
        return times

    def get(self, key: str, measure: Callable[[], float]) -> float:
        if key in self.times:
            self.reused += 1
        else:
            self.times[key] = measure()
            self.timed += 1
        return self.times[key]

    def save(self) -> None:
        """Write the timings, merged with what the file holds now: builds running at the same time (`cli.py sweep
        --workers`, one per GPU) each add theirs instead of the last writer dropping the others'. The merge is
        under a lock file, and this cache takes the merged timings too (later builds reuse the others' work)."""
        if self.path is None or not self.timed:
            return
        with _locked(self.path.with_name(self.path.name + ".lock")):
            if self.path.exists():
                self.times = {**self._read(self.path), **self.times}
            body = json.dumps(self.times, sort_keys=True).encode()
            atomic_write_json(self.path, {"format": TIMING_CACHE_FORMAT, "checksum": sha256_bytes(body),
                                          "times": json.loads(body)})

    def summary(self) -> str:
        if not self.timed:
            return f"timing cache: all {self.reused} timings reused, nothing timed"
        return f"timing cache: {self.timed} timed, {self.reused} reused"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` (created when missing) for the block; no lock where fcntl is missing."""
    try:
        import fcntl
    except ImportError:  # not POSIX: concurrent saves may drop each other's timings (they are timed again)
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def time_ms(fn: Callable[[], object], calls: int = 1, rep: int = 50) -> float:
    """Milliseconds per GEMM: `fn` (running `calls` GEMMs) captured in a CUDA graph, the median replay time of
    triton.testing.do_bench (L2 flushed before each replay) over `calls`. The engine replays graphs, so the host's
    launch costs (Python, Triton's launcher) are not in its time and must not be in the choice: timing eager
    launches measured those instead at small M (the fastest M=128 candidates read 12-49 us on an H200, where graph
    replays give 5-11). An implementation that fails to compile, run or capture for this problem is not a
    candidate (infinite time), and says why in the debug log."""
    from triton.testing import do_bench

    try:
        fn()  # compiles, and warms the allocator
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        ms = float(do_bench(graph.replay, warmup=max(1, rep // 5), rep=rep, return_mode="median")) / calls
        del graph
        return ms
    except Exception as e:  # noqa: BLE001 -- a candidate that cannot run is simply not chosen
        log.debug("candidate failed: %s", e)
        torch.cuda.synchronize()
        return float("inf")


def fp8_steps(codes: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn codes as signed integers one apart per representable step (the magnitude bits are ordered
    like the values, +0 and -0 both 0), so codes compare by how many FP8 steps apart they are."""
    bits = codes.view(torch.uint8).int()
    magnitude = bits & 0x7F
    return torch.where(bits >= 0x80, -magnitude, magnitude)


# FP8 codes whose values differ by less than this share of the tensor's largest magnitude agree whatever their
# steps: E4M3's grid near zero is finer than any float computation in another order holds a value that cancels
# (a context value of 0.05 code units, 1e-4 of the range, moved by 3 steps in a CPU run of the attention kernel,
# whose float32 context is within 1e-4 of the reference's); the same share the FP rule allows of a tensor's norm.
FP8_NEAR_ZERO = 1e-3

# The share of FP8 codes that may sit one step from the reference's (INT8: 1e-3). Hopper's FP8 tensor cores sum
# within a K step at reduced precision (DeepSeek-V3's report, section 3.3.2) before our kernel promotes each step to
# float32, and cuBLASLt's FP8 GEMM sums in its own order: outputs within about 1e-4 of the reference, which moves a
# code at one of E4M3's coarse rounding boundaries. On an H100, BERT-large's FC1 (M 4096, K 1024) on wgmma tiles put
# 0.5-0.7% of its E4M3 codes one step off (tests/test_plugins_fp8.py, 2026-12-06), while every FP output stayed
# within 1e-3. A wrong tile moves codes by more than a step or in far more places.
FP8_CODES_OFF = 0.02


def agrees(out: torch.Tensor, ref: torch.Tensor, codes_off: float = 1e-3, max_step: int = 1) -> bool:
    """Whether a candidate computed the library's function: FP outputs within 1e-3 relative error; INT8 codes
    within `max_step` and differing in under `codes_off` of places (GELU's hardware tanh, rounding at .5
    boundaries), as the plugin tests allow; FP8 codes the same, in FP8 steps (one step is 1/8 or 1/16 of a
    value, so a relative error over the tensor would fail a candidate that only summed in another order), where
    codes closer in value than FP8_NEAR_ZERO of the tensor's largest magnitude count as within the steps, in under
    FP8_CODES_OFF of places (the FP8 tensor cores' own summation)."""
    if out.shape != ref.shape or out.dtype != ref.dtype:
        return False
    if ref.dtype == torch.float8_e4m3fn:
        diff = (fp8_steps(out) - fp8_steps(ref)).abs()
        near = (out.float() - ref.float()).abs() <= FP8_NEAR_ZERO * ref.float().abs().max()  # NaN: not near
        off = float((diff > 0).float().mean())
        return bool(((diff <= max_step) | near).all()) and off < max(codes_off, FP8_CODES_OFF)
    if ref.dtype == torch.int8:
        diff = (out.int() - ref.int()).abs()
        return int(diff.max()) <= max_step and float((diff > 0).float().mean()) < codes_off
    out, ref = out.float(), ref.float()
    return bool(torch.isfinite(out).all()) and float((out - ref).norm() / ref.norm().clamp_min(1e-30)) < 1e-3


def attention_agrees(out: torch.Tensor, ref: torch.Tensor) -> bool:
    """agrees, for attention against SDPA: the fused kernel quantizes its float32 context where SDPA's path
    quantizes the FP16-rounded one, so codes 1 apart are rarer than 1 in 50, not 1 in 1,000."""
    return agrees(out, ref, codes_off=0.02)


def checked_time(fn: Callable[[], torch.Tensor], ref: torch.Tensor, calls: int = 1,
                 agree: Callable[[torch.Tensor, torch.Tensor], bool] = agrees,
                 name: str = "a kernel candidate") -> float:
    """A candidate's time if it computes the same function as the reference, else infinite: a fast wrong kernel
    (a compiler or tile-shape bug on some GPU) is never chosen, and the timing cache remembers that."""
    try:
        ok = agree(fn(), ref)
    except Exception as e:  # noqa: BLE001 -- a candidate that cannot run is simply not chosen
        first = (str(e).strip().splitlines() or [""])[0][:160]
        log.warning("%s failed to compile or run here and was left out (%s: %s)", name, type(e).__name__, first)
        return float("inf")
    if not ok:
        log.warning("%s disagreed with the library's output and was left out", name)
        return float("inf")
    return time_ms(fn, calls)


def choose(problem: GemmProblem, candidates: dict[str, Callable[[], object]], cache: TimingCache,
           machine: str, calls: int = 1,
           agree: Callable[[torch.Tensor, torch.Tensor], bool] = agrees) -> tuple[str, dict[str, float]]:
    """The fastest candidate for `problem` (each call running `calls` such GEMMs) and every candidate's time
    per GEMM; the library's output is the reference every other candidate must reproduce (`agree`) before it
    is timed."""
    reference: list[torch.Tensor] = []

    def measure(impl: str, fn: Callable[[], object]) -> float:
        if impl == LIBRARY:
            return time_ms(fn, calls)
        if not reference:
            reference.append(candidates[LIBRARY]())
        return checked_time(fn, reference[0], calls, agree, f"{impl} ({problem.gemm}, m={problem.m})")

    times = {impl: cache.get(problem.key(impl, machine), lambda impl=impl, fn=fn: measure(impl, fn))
             for impl, fn in candidates.items()}
    best = min(times, key=lambda impl: (times[impl], impl != LIBRARY))
    if times[best] == float("inf"):
        raise WorkbenchError(f"no implementation of {problem.gemm} (m={problem.m}) runs on this GPU")
    return best, times
