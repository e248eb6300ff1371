"""`sweep` and `sensitivity` with --workers/--ray (eval/distributed.py) on a local Ray with two CPU workers: the same
accuracy as one process, rows stored as they finish, a killed worker and a failing row retried once then reported,
a rerun that computes only what is missing, workers that outlive their tasks (a dead one replaced) and show warnings
as the CLI does, SIGTERM handled as Ctrl-C, and no Ray import without the flags. Skipped where Ray is missing."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from data.answers import AnswerSettings
from eval.sweep import GridRow, SweepConfig, final_lines, run_sweep
from tests.conftest import ROOT
from tests.ray_task import report_pid, warning_handlers
from tests.test_calib_calibrate import make_tiny_model, write_squad
from tests.test_sweep import SETTINGS, assert_one_line_error_in_process

ray = pytest.importorskip("ray", reason="--workers/--ray need Ray (requirements.txt)")

from eval.distributed import FAIL_ENV, Task, Workers, connect, mixed_models, run_tasks  # noqa: E402  (after the skip)

GRID = [GridRow("fp32", fp16=False), GridRow("int8-max", int8=True, method="max"),
        GridRow("int8-max-iln", int8=True, method="max", iln=True)]
NAMES = tuple(r.name for r in GRID)


@pytest.fixture(scope="module")
def cluster():
    """One local Ray for the module, two CPUs (and this host's GPUs), no dashboard, as `--workers 2` starts it."""
    connect(Workers(2), num_cpus=2, num_gpus=torch.cuda.device_count())
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray")
    return dict(root=root, model=make_tiny_model(root / "tiny"),
                train=write_squad(root / "train.json", seed=1, prefix="t"),
                dev=write_squad(root / "dev.json", seed=2, prefix="d"))


def config(tiny, report_dir, lines, workers: int | None = 2, **over) -> SweepConfig:
    cfg = dict(model=tiny["model"], calib_squad=tiny["train"], eval_squad=tiny["dev"], report_dir=report_dir,
               grid=GRID, profiles=[(4, 96)], device=torch.device("cpu"), half=False, calib_num=6, eval_limit=None,
               feature_settings=SETTINGS, answer_settings=AnswerSettings(), bench_iterations=1, bench_warmup=0,
               progress=False, say=lines.append, timing_tolerance=1e9,
               distributed=Workers(workers) if workers else None)
    cfg.update(over)
    return SweepConfig(**cfg)


def accuracy(result) -> list[tuple]:
    return [(r.name, r.options, r.calibration, r.exact_match, r.f1, r.n_questions, r.is_baseline)
            for r in result.results]


def test_workers_give_the_single_process_table_and_resume(tiny, tmp_path, cluster):
    lines: list[str] = []
    spread = run_sweep(config(tiny, tmp_path / "ray", lines))
    alone = run_sweep(config(tiny, tmp_path / "one", [], workers=None))
    assert accuracy(spread) == accuracy(alone) and len(accuracy(spread)) == 3
    assert spread.computed == NAMES and spread.reused == () and spread.failed == {}
    text = "\n".join(lines)
    assert "on 2 Ray worker(s) (cpu)" in text and "1 calibration(s) first, one task each" in text
    assert "timed again here, one row at a time" in text and "  int8-max: timed here: " in text
    assert any(line.startswith("  workers: ") and " done, " in line for line in lines)
    # Each row stored atomically by the driver, with the worker that timed it (here the driver: CPU rows are timed
    # alone, after the workers evaluated them side by side), stable once timed alone.
    stored = json.loads((tmp_path / "ray" / "rows" / "int8-max.json").read_text())
    assert stored["timed_on"]["worker"].split()[1] == "driver" and stored["timed_on"]["model"]
    assert all(lat.stable for r in spread.results for lat in r.latency)
    assert spread.report.provenance["workers"] == "2 Ray worker(s) on this host"
    assert not list((tmp_path / "ray").rglob("*.tmp")) and not list((tmp_path / "ray" / ".workers").iterdir())

    lines.clear()
    again = run_sweep(config(tiny, tmp_path / "ray", lines))
    assert again.reused == NAMES and again.computed == () and accuracy(again) == accuracy(spread)
    assert "[3/3] row int8-max-iln: finished earlier, reusing its result" in "\n".join(lines)
    assert not any("Ray worker" in line and "calibration" in line for line in lines)


def test_a_killed_worker_and_a_failing_row_are_retried_then_reported(tiny, tmp_path, cluster, monkeypatch):
    """int8-max raises once (an exception: retried, then fine); int8-max-iln's worker dies twice mid-row (os._exit
    after its work, before it returns): the row is reported as failed, the others stored; a rerun computes only
    int8-max-iln."""
    monkeypatch.setenv(FAIL_ENV, "int8-max:raise:1,int8-max-iln:exit:2")
    lines: list[str] = []
    first = run_sweep(config(tiny, tmp_path / "r", lines))
    text = "\n".join(lines)
    assert "row int8-max failed on " in text and "(RuntimeError: failure asked for by" in text
    assert "row int8-max-iln FAILED again on " in text
    assert first.computed == ("fp32", "int8-max") and list(first.failed) == ["int8-max-iln"]
    assert [r.name for r in first.report.rows] == ["fp32", "int8-max"]
    assert sorted(p.name for p in (tmp_path / "r" / "rows").iterdir()) == ["fp32.json", "int8-max.json"]
    assert "int8-max-iln (" in first.report.provenance["failed rows"]
    assert "failed rows: int8-max-iln" in (tmp_path / "r" / "report.md").read_text()
    assert "FAILED: int8-max-iln: " in final_lines(first, tmp_path / "r")
    assert any(" failed" in line for line in lines if line.startswith("  workers: "))

    monkeypatch.delenv(FAIL_ENV)
    lines.clear()
    again = run_sweep(config(tiny, tmp_path / "r", lines))
    assert again.reused == ("fp32", "int8-max") and again.computed == ("int8-max-iln",) and again.failed == {}
    assert [r.name for r in again.report.rows] == list(NAMES)


def test_sensitivity_on_workers_matches_and_resumes(tiny, tmp_path, cluster):
    from calib.calibrate import CalibrationSpec, calibrate, load_calibration_model
    from data.squad import load_squad
    from eval.sensitivity import SensitivityConfig, run_sensitivity

    loaded, wordpiece = load_calibration_model(tiny["model"])
    calib = tmp_path / "calib.json"
    calibrate(load_squad(tiny["train"]), loaded, wordpiece, CalibrationSpec("max", 6, features=SETTINGS),
              device=torch.device("cpu"), batch_size=16, output=calib, feature_cache=False, progress=False)
    lines: list[str] = []

    def run(**over):
        cfg = dict(model=tiny["model"], calib_cache=calib, squad=tiny["dev"], device=torch.device("cpu"), half=False,
                   limit=6, feature_settings=SETTINGS, answer_settings=AnswerSettings(), progress=False,
                   layers="1", groups=False, trim=1, say=lines.append, report_dir=tmp_path / "s",
                   distributed=Workers(2))
        return run_sensitivity(SensitivityConfig(**{**cfg, **over}))

    spread = run()
    alone = run(report_dir=None, distributed=None)
    numbers = lambda r: [(m.name, m.exact_match, m.f1, m.same_as) for m in r.variants]  # noqa: E731
    assert numbers(spread) == numbers(alone) and spread.suggestion.keep == alone.suggestion.keep
    assert "6 builds on 2 Ray worker(s)" in "\n".join(lines)
    assert (tmp_path / "s" / "variants" / "only_layer1.fc2.json").exists()

    lines.clear()
    again = run()
    assert numbers(again) == numbers(spread)
    assert "  only:layer1.fc2: EM" in "\n".join(lines) and "finished earlier, reused" in "\n".join(lines)
    assert not any("Ray worker" in line for line in lines)


def test_workers_are_long_lived_and_a_dead_one_is_replaced(cluster, monkeypatch):
    """Tasks run on `limit` worker processes that outlive them (a GPU row does not start a process); t2's worker
    dies mid-task, a new worker takes its place and t2 is retried there or on the other."""
    monkeypatch.setenv(FAIL_ENV, "t2:exit:1")
    pids: dict[str, int] = {}
    lines: list[str] = []
    tasks = [Task(f"t{i}", report_pid, (f"t{i}",), after=f"t{i - 1}" if i in (2, 3) else None) for i in range(8)]
    failed = run_tasks(tasks, torch.device("cpu"), 2, lambda name, pid: pids.setdefault(name, pid) and name,
                       lines.append, what="task")
    assert failed == {} and sorted(pids) == [f"t{i}" for i in range(8)]
    assert any(line.startswith("task t2 failed on ") and "trying it once more" in line for line in lines)
    before, after = {pids["t0"], pids["t1"]}, {pids[f"t{i}"] for i in range(2, 8)}
    assert len(before) <= 2 and len(after) <= 2 and len(before | after) <= 3


def test_workers_show_warnings_as_the_cli_does(cluster):
    """A worker's warnings (say, a kernel library not built) read `warning: ...` as in one process, and in a log
    file without Ray's colour codes around its pid prefix."""
    seen: dict[str, list[str]] = {}
    failed = run_tasks([Task("w", warning_handlers, ("w",))], torch.device("cpu"), 1,
                       lambda name, handlers: seen.setdefault(name, handlers) and name, lambda line: None)
    assert failed == {} and "_StderrWarnings" in seen["w"]
    if not sys.stdout.isatty():  # pytest's capture: as a log file is
        assert os.environ.get("RAY_COLOR_PREFIX") == "0"


@pytest.mark.cuda
def test_gpu_rows_hold_a_gpu_and_record_it(tiny, tmp_path, cluster):
    """On CUDA each row runs on a worker holding one GPU, timed there; its row file names the GPU (index, uuid,
    model)."""
    cuda = dict(device=torch.device("cuda"), half=True, grid=[GridRow("fp16", fp16=True), GRID[1]])
    lines: list[str] = []
    spread = run_sweep(config(tiny, tmp_path / "ray", lines, workers=1, **cuda))
    alone = run_sweep(config(tiny, tmp_path / "one", [], workers=None, **cuda))
    assert accuracy(spread) == accuracy(alone) and spread.computed == ("fp16", "int8-max")
    stored = json.loads((tmp_path / "ray" / "rows" / "int8-max.json").read_text())
    assert isinstance(stored["timed_on"]["gpu_index"], int) and stored["timed_on"]["gpu_uuid"]
    assert stored["timed_on"]["model"] == torch.cuda.get_device_name(0)
    assert stored["timing_key"]["machine"]["gpu"] == torch.cuda.get_device_name(0)
    assert "not run" in spread.report.provenance["timing check"]
    assert torch.cuda.get_device_name(0) in spread.report.provenance["device"]
    assert all(lat.stable is not False for r in spread.results for lat in r.latency)


def test_rows_timed_on_different_models_are_named():
    assert mixed_models({"fp16": "NVIDIA H100", "int8": "NVIDIA H100"}) is None
    warning = mixed_models({"fp16": "NVIDIA H100", "int8": "NVIDIA A100", "int8-iln": "NVIDIA H100"})
    assert "not comparable" in warning and "NVIDIA H100: fp16, int8-iln; NVIDIA A100: int8" in warning


def test_flags_only_on_sweep_and_sensitivity(capsys):
    import cli

    parser = cli.build_parser()
    assert parser.parse_args(["sweep", "--workers", "2", "--ray", "auto"]).workers == 2
    assert parser.parse_args(["sensitivity", "--calib-cache", "c.json", "--ray", "auto"]).ray == "auto"
    with pytest.raises(SystemExit):
        parser.parse_args(["build", "--model", "m", "-o", "x.engine", "--workers", "2"])
    capsys.readouterr()
    assert_one_line_error_in_process(capsys, "sweep", "--device", "cpu", "--workers", "0",
                                     words="--workers must be at least 1, got 0")


def test_no_ray_import_without_the_flags(tiny, tmp_path):
    """A plain sweep (one row) in a fresh interpreter never imports Ray."""
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps([{"name": "fp32", "fp16": False}]))
    args = ["sweep", "--device", "cpu", "--model", str(tiny["model"]), "--calib-squad", str(tiny["train"]),
            "--eval-squad", str(tiny["dev"]), "--grid", str(grid), "--report-dir", str(tmp_path / "r"), "-b", "4",
            "-s", "96", "--max-seq-length", "96", "--doc-stride", "32", "--max-query-length", "16",
            "--bench-iterations", "1", "--bench-warmup", "0", "--no-progress"]
    code = f"import sys, cli; rc = cli.main({args!r}); print('ray imported:', 'ray' in sys.modules); sys.exit(rc)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "ray imported: False" in proc.stdout and "build to ship: fp32" in proc.stdout


def test_sigterm_ends_a_distributed_sweep_as_ctrl_c_does(tiny, tmp_path):
    """SIGTERM to the driver while a task runs: one line and the resume hint, exit 130, no native stack trace."""
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps([{"name": "fp32", "fp16": False}] + [
        {"name": f"int8-{m}", "int8": True, "method": m} for m in ("max", "mse", "entropy")]))
    report = tmp_path / "r"
    args = [sys.executable, "cli.py", "sweep", "--device", "cpu", "--workers", "2", "--model", str(tiny["model"]),
            "--calib-squad", str(tiny["train"]), "--eval-squad", str(tiny["dev"]), "--grid", str(grid),
            "--report-dir", str(report), "-b", "4", "-s", "96", "--max-seq-length", "96", "--doc-stride", "32",
            "--max-query-length", "16", "--calib-num", "6", "--bench-iterations", "1", "--bench-warmup", "0",
            "--no-progress"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not list((report / ".workers").glob("*.json")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the sweep ended before a task was seen running"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "interrupted" and "rerun the same command to resume" in out + err
    assert "SIGTERM received" not in out + err and "Traceback" not in err
