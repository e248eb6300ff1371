"""`cli.py eval` with several builds: the comparison table, the baseline choice, --report-dir, and their errors."""
from __future__ import annotations

import json

import pytest
import torch

from eval.report import REPORT_FILES, load_report_json
from tests.test_calib_calibrate import make_tiny_model, write_squad
from tests.test_cli import run_cli
from tests.test_sweep import assert_one_line_error_in_process

SETTINGS = ["-s", "96", "--doc-stride", "32", "--max-query-length", "16"]


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """A tiny model, a SQuAD file, and FP32 / FP16 / INT8 (-iln) engine files, its calibration cache kept where
    `cli.py sweep` keeps them (so the table can name the method)."""
    from calib.cache import default_cache_path, save_cache
    from calib.calibrate import CalibrationSpec, calibrate, load_calibration_model
    from quant.policy import PrecisionPolicy
    from data.features import FeatureSettings
    from data.squad import load_squad
    from engines.build import build_engine
    from engines.engine_file import Profile, save_engine

    root = tmp_path_factory.mktemp("eval_compare")
    cache_dir = root / "cache"
    model, squad = make_tiny_model(root / "tiny"), write_squad(root / "dev.json")
    loaded, wordpiece = load_calibration_model(model)
    spec = CalibrationSpec("max", 6, features=FeatureSettings(96, 32, 16))
    mp = pytest.MonkeyPatch()
    mp.setenv("WORKBENCH_CACHE_DIR", str(cache_dir))
    try:
        cache = calibrate(load_squad(write_squad(root / "train.json", seed=3, prefix="t")), loaded, wordpiece, spec,
                          device=torch.device("cpu"), batch_size=4, progress=False).cache
        save_cache(cache, default_cache_path(cache.key()))
    finally:
        mp.undo()
    engines = {}
    for name, policy in (("fp32", PrecisionPolicy()), ("half", PrecisionPolicy(fp16=True)),
                         ("int8", PrecisionPolicy(int8=True, iln=True))):
        header, tensors = build_engine(loaded, policy, [Profile(4, 96), Profile(1, 96)], cache,
                                       torch.device("cpu"), wordpiece)
        engines[name] = root / f"{name}.engine"
        save_engine(engines[name], header, tensors)
    return dict(model=model, squad=squad, cache_dir=cache_dir, **engines)


def run_eval(builds, *args):
    return run_cli("eval", "--squad", builds["squad"], "--device", "cpu", "--no-progress", "--bench-iterations", 2,
                   "--bench-warmup", 0, *SETTINGS, *args)


@pytest.fixture
def shared_cache(builds, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE_DIR", str(builds["cache_dir"]))


def test_several_builds_give_one_table_and_the_report_files(builds, tmp_path, shared_cache):
    report_dir = tmp_path / "report"
    proc = run_eval(builds, "--model", builds["model"], builds["fp32"], builds["int8"], "--report-dir", report_dir,
                    "--max-f1-drop", "100")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    header = next(line for line in lines if "build" in line and "options" in line)
    for column in ("calibration", "EM", "F1", "ΔEM", "ΔF1", "4×96 median/p99 ms", "4×96 seq/s", "4×96 speed-up",
                   "engine MiB", "build s"):
        assert column in header
    assert "1×96" not in header  # the CPU times the selection profile only (issue 23, item 13)
    rows = {line.split()[1 if line.startswith("*") else 0]: line for line in lines[lines.index(header) + 1:]
            if line.strip() and not line.startswith(("1", "timing", "rule", "chosen"))}
    assert set(rows) == {"tiny-fp32", "fp32", "int8"}
    assert "model fp32" in rows["tiny-fp32"] and "max (6 q)" in rows["int8"] and "--int8 -iln" in rows["int8"]
    assert "12 questions; ΔEM/ΔF1 and speed-up vs tiny-fp32" in proc.stdout
    assert "rule: fastest median latency at 4×96" in proc.stdout
    assert "timing: " in proc.stdout and "timed runs per build and profile" in proc.stdout
    chosen = [line for line in lines if line.startswith("*")]
    assert len(chosen) == 1 and proc.stdout.strip().splitlines()[-1].startswith("chosen: ")

    for name in REPORT_FILES:
        assert (report_dir / name).stat().st_size > 0
    report = load_report_json(report_dir / "report.json")
    assert [r.name for r in report.rows] == ["tiny-fp32", "fp32", "int8"] and report.baseline.name == "tiny-fp32"
    model_row, fp32_row, int8_row = report.rows
    assert model_row.engine_bytes is None and fp32_row.engine_bytes == builds["fp32"].stat().st_size
    assert all(r.profiles == ((4, 96),) for r in report.rows)
    assert all(lat.runs >= 4 and lat.stable is not None for r in report.rows for lat in r.latency)
    for key in ("device", "model", "data", "date", "commit", "timing"):  # where and how it was measured
        assert report.provenance[key], key
    assert report.provenance["device"].startswith("cpu: ") and "median of the last two rounds" in \
        report.provenance["timing"]
    md = (report_dir / "report.md").read_text()
    assert "## Measured" in md and "- commit: " in md and "- timed runs: " in md
    # The FP32 engine computes the model's function: same predictions, same scores.
    assert fp32_row.f1 == pytest.approx(model_row.f1) and fp32_row.exact_match == pytest.approx(model_row.exact_match)
    model_pred = json.loads((report_dir / "predictions" / "tiny-fp32.json").read_text())
    assert json.loads((report_dir / "predictions" / "fp32.json").read_text()) == model_pred
    assert (report_dir / "predictions" / "int8.nbest.json").exists()
    assert int8_row.predictions_file == "predictions/int8.json"
    assert not (tmp_path / "predictions.json").exists() and not list(tmp_path.glob("predictions.*.json"))


def test_engines_only_with_the_fp16_baseline_and_a_selection_profile(builds, tmp_path, shared_cache):
    proc = run_eval(builds, builds["half"], builds["int8"], "--profile", "1x96", "-o", tmp_path / "p.json")
    assert proc.returncode == 0, proc.stderr
    assert "vs half" in proc.stdout and "rule: fastest median latency at 1×96 (given)" in proc.stdout
    assert (tmp_path / "p.half.json").exists() and (tmp_path / "p.int8.json").exists()  # -o keeps its meaning


def test_baseline_engine_by_path(builds, tmp_path):
    proc = run_eval(builds, builds["fp32"], builds["int8"], "--baseline", builds["int8"], "-o", tmp_path / "p.json")
    assert proc.returncode == 0, proc.stderr
    assert "vs int8" in proc.stdout
    assert "max (6 q)" in proc.stdout  # the engine header describes its calibration


def test_engines_without_a_calibration_description_name_their_cache_by_key(tmp_path, monkeypatch):
    """Engines built before headers described their calibration: the cache of that key, else the key."""
    from eval.compare import calibration_of_engine

    monkeypatch.setenv("WORKBENCH_CACHE_DIR", str(tmp_path))
    assert calibration_of_engine(None, "") == "-"
    assert calibration_of_engine("ab" * 32, "") == f"cache {'ab' * 6}"
    assert calibration_of_engine("ab" * 32, "entropy (100 q)") == "entropy (100 q)"


def test_single_model_output_is_unchanged_without_report_flags(builds, tmp_path):
    proc = run_eval(builds, "--model", builds["model"], "-o", tmp_path / "p.json")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("EM ") and len(proc.stdout.splitlines()) == 1


def test_single_model_report(builds, tmp_path):
    proc = run_eval(builds, "--model", builds["model"], "--report-dir", tmp_path / "r")
    assert proc.returncode == 0, proc.stderr
    assert "the baseline; no other build to compare" in proc.stdout and "1×96 median/p99 ms" in proc.stdout
    assert (tmp_path / "r" / "report.json").exists()


@pytest.mark.parametrize("extra, words", [
    (["fp32", "int8"], "no FP16 baseline"),
    (["fp32", "int8", "--baseline", "model"], "--baseline model needs --model DIR"),
    (["fp32", "int8", "--baseline", "other.engine"], "--baseline other.engine: not one of the engine files"),
    (["half", "int8", "--profile", "2x96"], "--profile 2x96: not a profile of half, int8"),
    (["half", "int8", "--profile", "big"], "profile 'big'"),
    (["half", "int8", "--max-f1-drop", "-1"], "--max-f1-drop"),
    (["half", "half"], "several FP16 engines without INT8 or FP8 (half, half-2)"),
    (["model", "int8", "--baseline", "fp16", "--precision", "bf16"], "--baseline fp16 evaluates --model in FP16"),
    (["model", "fp32", "--bench-iterations", "0"], "--bench-iterations must be at least 1"),
])
def test_comparison_errors_are_one_line(builds, capsys, extra, words):
    args = [str(builds[a]) if a in ("fp32", "half", "int8") else a for a in extra]
    if args[0] == "model":
        args = ["--model", str(builds["model"]), *args[1:]]
    assert_one_line_error_in_process(capsys, "eval", "--squad", builds["squad"], "--device", "cpu", "--no-progress",
                                     "--bench-iterations", 2, "--bench-warmup", 0, *SETTINGS, *args, words=words)
