"""Measuring builds for the comparison report: latency at each profile, and one `BuildResult` per build.

Shared by `cli.py eval` (several builds given on the command line) and `cli.py sweep` (the grid), so a row means
the same in both: EM/F1 on the same questions, median/p99 compute latency (eval.benchmark.time_compute on random
tokens of the profile's full shape) and throughput at each profile, engine size and build time from the engine
file.
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Sequence

from common.errors import WorkbenchError
from eval.report import ProfileLatency, profile_label

if TYPE_CHECKING:
    import torch

    from calib.cache import CalibrationCache

# Timed runs per profile: a few on the CPU (CI, laptops: each forward takes a fraction of a second), enough on CUDA
# for a stable median and a meaningful p99.
BENCH_DEFAULTS = {"cpu": (5, 1), "cuda": (100, 10)}  # device type -> (iterations, warm-up)
_NAME_OK = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


def bench_defaults(device: torch.device, iterations: int | None, warmup: int | None) -> tuple[int, int]:
    """(iterations, warm-up) for timing: the device's defaults where not given; checked."""
    default_iterations, default_warmup = BENCH_DEFAULTS["cuda" if device.type == "cuda" else "cpu"]
    iterations = default_iterations if iterations is None else iterations
    warmup = default_warmup if warmup is None else warmup
    if iterations < 1 or warmup < 0:
        raise WorkbenchError(f"--bench-iterations must be at least 1 and --bench-warmup at least 0 "
                             f"(got {iterations} and {warmup})")
    return iterations, warmup


def time_profiles(forward, profiles: Sequence[tuple[int, int]], vocab_size: int, device: torch.device,
                  iterations: int, warmup: int) -> tuple[ProfileLatency, ...]:
    """Compute latency of `forward` at each (batch, seq_len), on random tokens of exactly that shape."""
    from eval.benchmark import Latency, random_inputs, time_compute

    out = []
    for batch, seq_len in profiles:
        inputs = random_inputs(batch, seq_len, vocab_size, device)
        samples = time_compute(forward, inputs, iterations, warmup, device)
        out.append(ProfileLatency.from_latency(Latency.from_samples(batch, seq_len, samples)))
    return tuple(out)


def latency_line(latency: Sequence[ProfileLatency]) -> str:
    return ", ".join(f"{profile_label(lat.profile)} {lat.median_ms:.3f} ms (p99 {lat.p99_ms:.3f})" for lat in latency)


def describe_calibration(cache: CalibrationCache | None) -> str:
    """The report's calibration column: "entropy (100 q)", "percentile 99.9 (100 q)", or "-" without INT8."""
    return "-" if cache is None else cache.describe()


def calibration_of_engine(calib_digest: str | None, described: str = "") -> str:
    """The calibration column for an engine file: what its header says (engines built since the header holds a
    description), else the cache of that key in the workbench cache directory (where `cli.py sweep` keeps them);
    a cache kept elsewhere shows as its key."""
    from calib.cache import CacheError, default_cache_path, load_cache

    if calib_digest is None:
        return "-"
    if described:
        return described
    path = default_cache_path(calib_digest)
    if path.exists():
        try:
            cache = load_cache(path)
            if cache.key() == calib_digest:
                return describe_calibration(cache)
        except CacheError:
            pass
    return f"cache {calib_digest[:12]}"


def check_name(name: str, what: str = "build name") -> str:
    """Names become file names (predictions/NAME.json, engines/NAME.engine): letters, digits, . _ + - only."""
    if not isinstance(name, str) or not _NAME_OK.fullmatch(name):
        raise WorkbenchError(f"{what} {name!r}: use letters, digits, '.', '_', '+' and '-' (it names files), "
                             "starting with a letter or digit")
    return name


def unique_names(names: Sequence[str]) -> list[str]:
    """Row names from labels (engine file stems, model folder names): characters other than letters, digits and
    . _ + - become _, and a repeated name gets -2, -3, ..."""
    out: list[str] = []
    for name in names:
        base = re.sub(r"[^A-Za-z0-9._+-]", "_", name).lstrip("._+-") or "build"
        candidate, n = base, 1
        while candidate in out:
            n += 1
            candidate = f"{base}-{n}"
        out.append(candidate)
    return out


__all__ = ["BENCH_DEFAULTS", "bench_defaults", "calibration_of_engine", "check_name", "describe_calibration",
           "latency_line", "time_profiles", "unique_names"]
