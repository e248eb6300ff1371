"""eval.gpu_state: nvidia-smi's samples read and summarized; no sampler, no readout and no error."""
from __future__ import annotations

import sys
import time

from eval.gpu_state import GpuMonitor, GpuSample, parse_sample

LINES = ["690.12, 700.00, 1515, 1980, Active", "[N/A], 700.00, 1980, 1980, Not Active",
         "Failed to initialize NVML: Driver/library version mismatch", "372.40, 700.00, 1980, 1980, Not Active",
         "688.00, 700.00, 1500, 1980, Active"]


def fake_smi(tmp_path, lines=LINES):
    """An nvidia-smi stand-in: records its arguments, prints `lines`, then waits to be stopped like the real
    one's --loop-ms."""
    script = tmp_path / "fake-smi"
    script.write_text(f"#!{sys.executable}\nimport sys, time\n"
                      f"open({str(tmp_path / 'argv')!r}, 'w').write(' '.join(sys.argv[1:]))\n"
                      f"print({chr(10).join(lines)!r}, flush=True)\ntime.sleep(60)\n")
    script.chmod(0o755)
    return str(script)


def wait_for(monitor, n, timeout=20.0):
    t0 = time.monotonic()
    while len(monitor.samples) < n and time.monotonic() - t0 < timeout:
        time.sleep(0.05)


def test_parse_sample():
    assert parse_sample(LINES[0]) == GpuSample(690.12, 700.0, 1515.0, 1980.0, True)
    assert parse_sample(LINES[3]).power_capped is False
    assert parse_sample(LINES[1]) is None and parse_sample(LINES[2]) is None and parse_sample("") is None


def test_monitor_summarizes_the_samples_of_a_phase(tmp_path):
    monitor = GpuMonitor("cuda", command=fake_smi(tmp_path), gpu="GPU-1234")
    monitor.phase = "large 128x384"
    started = time.monotonic()
    with monitor:
        wait_for(monitor, 3)
    assert time.monotonic() - started < 15  # stopping the sampler does not wait out its loop
    assert len(monitor.samples) == 3  # the [N/A] and error lines are skipped
    argv = (tmp_path / "argv").read_text().split()
    assert "--id=GPU-1234" in argv and "--loop-ms=100" in argv
    assert monitor.summary("large 128x384") == ("688 W of 700 W, SM clock 1,515 of 1,980 MHz, held down by the "
                                                "power limit in 2 of 3 samples")
    assert monitor.brief("large 128x384") == "688 W, 1,515 MHz"
    assert monitor.brief("other") == "-" and monitor.summary("other").startswith("no samples")
    assert monitor.summary() == monitor.summary("large 128x384")


def test_no_sampler_no_readout(tmp_path):
    with GpuMonitor("cuda", command=str(tmp_path / "missing-smi"), gpu="0") as monitor:
        pass
    assert monitor.samples == [] and monitor.brief() == "-" and "no samples" in monitor.summary()
    with GpuMonitor("cpu", command=fake_smi(tmp_path)) as monitor:  # nothing to sample off CUDA
        time.sleep(0.3)
    assert monitor.samples == [] and not (tmp_path / "argv").exists()
