"""What the GPU ran at while a benchmark timed it: power draw against its limit, SM clock against its maximum, and
whether the board was holding its clock down to stay under the power limit.

A long forward can hold a GPU at its power limit: BERT-large's FP16 GEMMs at 128 x 384 keep an H200 at ~690 W
with the SM clock at 1,515 of 1,980 MHz (BENCHMARKS.md, call V1), so their time is set by the board's power, and
two calls on two machines differ by a few percent. Benchmarks print this beside their figures, so that a reader
can tell a slower kernel from a board that ran slower. Sampled with `nvidia-smi`, which comes with the driver
wherever a GPU is, rather than NVML's Python bindings (nvidia-ml-py), which a GPU machine's Python need not carry
(the device machines run their image's packages, not requirements.txt); where it is missing or cannot read the GPU
there is simply no readout.
"""
from __future__ import annotations

import shutil
import statistics
import subprocess
import threading
from dataclasses import dataclass

import torch

FIELDS = ("power.draw", "power.limit", "clocks.sm", "clocks.max.sm", "clocks_event_reasons.sw_power_cap")


@dataclass(frozen=True)
class GpuSample:
    watts: float
    limit_watts: float
    sm_mhz: float
    max_sm_mhz: float
    power_capped: bool  # the driver is lowering the clock to keep under the power limit


def parse_sample(line: str) -> GpuSample | None:
    """One line of `nvidia-smi --query-gpu=FIELDS --format=csv,noheader,nounits`; None for anything else (a
    field the driver reports as [N/A], an error message)."""
    parts = [p.strip() for p in line.split(",")]
    if len(parts) != len(FIELDS):
        return None
    try:
        watts, limit, mhz, max_mhz = (float(p) for p in parts[:4])
    except ValueError:
        return None
    return GpuSample(watts, limit, mhz, max_mhz, parts[4].lower() == "active")


def gpu_id(device: torch.device) -> str:
    """How nvidia-smi names `device`: its UUID (indices can differ from CUDA's under CUDA_VISIBLE_DEVICES)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    uuid = str(getattr(torch.cuda.get_device_properties(index), "uuid", "") or "")
    if not uuid:
        return str(index)
    return uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"


class GpuMonitor:
    """Samples the GPU every `period_ms` while inside `with`; each sample is tagged with `phase` as it was when
    the sample arrived, so one monitor can cover several timed runs."""

    def __init__(self, device: torch.device | str, period_ms: int = 100, command: str = "nvidia-smi",
                 gpu: str | None = None):
        """`gpu`: nvidia-smi's name for the device (default: gpu_id(device)); nothing is sampled off CUDA."""
        self.device, self.period_ms, self.command, self.gpu = torch.device(device), period_ms, command, gpu
        self.phase: str | None = None
        self.samples: list[tuple[str | None, GpuSample]] = []
        self._proc: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None

    def __enter__(self) -> "GpuMonitor":
        exe = shutil.which(self.command) if self.device.type == "cuda" else None
        if exe is not None:
            try:
                self._proc = subprocess.Popen(
                    [exe, f"--id={self.gpu or gpu_id(self.device)}", "--query-gpu=" + ",".join(FIELDS),
                     "--format=csv,noheader,nounits", f"--loop-ms={self.period_ms}"],
                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            except OSError:
                return self
            self._reader = threading.Thread(target=self._read, daemon=True)
            self._reader.start()
        return self

    def _read(self) -> None:
        for line in self._proc.stdout:
            sample = parse_sample(line)
            if sample is not None:
                self.samples.append((self.phase, sample))

    def __exit__(self, *exc) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
            self._reader.join(timeout=5)
            self._proc = None

    def _of(self, phase: str | None) -> list[GpuSample]:
        return [s for p, s in self.samples if phase is None or p == phase]

    def brief(self, phase: str | None = None) -> str:
        """Median power and SM clock of `phase`'s samples, for a table cell ("-" without samples)."""
        got = self._of(phase)
        if not got:
            return "-"
        return (f"{statistics.median(s.watts for s in got):.0f} W, "
                f"{statistics.median(s.sm_mhz for s in got):,.0f} MHz")

    def summary(self, phase: str | None = None) -> str:
        """Medians over the samples of `phase` (all samples when None), in words."""
        got = self._of(phase)
        if not got:
            return ("no samples (no nvidia-smi, it could not read this GPU, or the timed run was shorter than its "
                    f"{self.period_ms} ms period)")
        med = lambda f: statistics.median(f(s) for s in got)  # noqa: E731
        capped = sum(s.power_capped for s in got)
        return (f"{med(lambda s: s.watts):.0f} W of {med(lambda s: s.limit_watts):.0f} W, SM clock "
                f"{med(lambda s: s.sm_mhz):,.0f} of {med(lambda s: s.max_sm_mhz):,.0f} MHz, held down by the power "
                f"limit in {capped} of {len(got)} samples")
