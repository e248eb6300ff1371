"""cli.py build / bench / eval / infer with engine files on the CPU, and their one-line errors (exit 2)."""
from __future__ import annotations

import json

import pytest

from tests.test_calib_calibrate import make_tiny_model, write_squad
from tests.test_cli import assert_one_line_error, run_cli


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A tiny model, a SQuAD file, a max calibration cache and FP32 / INT8 engines built through the CLI."""
    root = tmp_path_factory.mktemp("engine_cli")
    model, squad = make_tiny_model(root / "tiny"), write_squad(root / "train.json")
    calib = root / "calib.json"
    settings = ["-s", "96", "--doc-stride", "32", "--max-query-length", "16"]
    proc = run_cli("calibrate", "--squad", squad, "--model", model, "--device", "cpu", "--method", "max",
                   "--calib-num", "6", "-o", calib, "--no-progress", *settings)
    assert proc.returncode == 0, proc.stderr
    engines = {}
    for name, flags in (("fp32", []), ("int8", ["--int8", "-iln", "--calib-cache", calib])):
        engines[name] = root / f"{name}.engine"
        proc = run_cli("build", "--model", model, "--device", "cpu", "-b", 4, "-s", 96, "-b", 1, *flags,
                       "-o", engines[name])
        assert proc.returncode == 0, proc.stderr
        assert "profiles 4x96, 1x96" in proc.stdout
    return dict(root=root, model=model, squad=squad, calib=calib, settings=settings, **engines)


def test_engines_evaluate_like_the_model(made, tmp_path):
    """The FP32 engine gives the model's predictions; the INT8 one runs and writes its own file."""
    metrics = tmp_path / "m.json"
    proc = run_cli("eval", "--squad", made["squad"], "--model", made["model"], made["fp32"], made["int8"],
                   "--device", "cpu", "--no-progress", "-o", tmp_path / "p.json", "--metrics-json", metrics,
                   *made["settings"])
    assert proc.returncode == 0, proc.stderr
    scores = json.loads(metrics.read_text())
    assert len(scores) == 3 and all(v["n"] == 12 for v in scores.values())
    model_pred = json.loads((tmp_path / "p.tiny.json").read_text())
    assert json.loads((tmp_path / "p.fp32.json").read_text()) == model_pred
    assert set(json.loads((tmp_path / "p.int8.json").read_text())) == set(model_pred)


def test_bench_reports_latency(made):
    proc = run_cli("bench", "-e", made["int8"], "--device", "cpu", "-s", 32, "--iterations", 3, "--warmup", 1)
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith(("compute", "end-to-end", "pipelined"))]
    # Batches 1 and 4 from the profiles; on the CPU the engine call is the only figure: nothing is copied to a device
    # and nothing overlaps, so no end-to-end figure below the compute one and no pipelined one (issue 23, item 2).
    assert [r.split()[:4] for r in rows] == [["compute", "1", "x", "32"], ["compute", "4", "x", "32"]]
    assert all("median" in r and "p99" in r and "seq/s" in r for r in rows)
    assert "nothing overlaps the compute, so the engine call is the only figure" in proc.stdout


def test_bench_times_padded_batches_when_asked(made):
    from eval.benchmark import random_inputs

    proc = run_cli("bench", "-e", made["int8"], "--device", "cpu", "-b", 1, "-s", 32, "--iterations", 2,
                   "--warmup", 0, "--padded", 0.25)
    assert proc.returncode == 0, proc.stderr
    assert "25% of each sequence padded" in proc.stdout.splitlines()[0]
    assert "no padding" in run_cli("bench", "-e", made["int8"], "--device", "cpu", "-b", 1, "-s", 32,
                                   "--iterations", 1, "--warmup", 0).stdout.splitlines()[0]
    mask = random_inputs(2, 32, 100, "cpu", padded=0.25)[2]
    assert mask[:, :24].all() and not mask[:, 24:].any()
    assert random_inputs(1, 8, 100, "cpu", padded=0.99)[2].tolist() == [[1] + [0] * 7]  # one real token left
    assert random_inputs(1, 8, 100, "cpu")[2].all()
    assert_one_line_error(run_cli("bench", "-e", made["int8"], "--device", "cpu", "--padded", 1.5), "--padded")


def test_infer_with_an_engine(made):
    proc = run_cli("infer", "-e", made["fp32"], "--device", "cpu", "-p", "paris is the capital of france", "-q", "what is the capital of france",
                   *made["settings"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("Answer:") == 1


def test_int8_build_without_scales(made, tmp_path):
    assert_one_line_error(run_cli("build", "--model", made["model"], "--device", "cpu", "--int8",
                                  "-o", tmp_path / "x.engine"), "--int8 needs activation scales", "cli.py calibrate")
    assert not (tmp_path / "x.engine").exists()


def test_truncated_engine(made, tmp_path):
    bad = tmp_path / "cut.engine"
    bad.write_bytes(made["int8"].read_bytes()[:5000])
    assert_one_line_error(run_cli("bench", "-e", bad, "--device", "cpu", "--iterations", 1),
                          "cut.engine", "not an engine file or truncated")


def test_tampered_engine(made, tmp_path):
    data = bytearray(made["int8"].read_bytes())
    data[-100] ^= 0x01
    bad = tmp_path / "flip.engine"
    bad.write_bytes(bytes(data))
    assert_one_line_error(run_cli("eval", "--squad", made["squad"], bad, "--device", "cpu", *made["settings"]),
                          "flip.engine", "checksum mismatch")


def test_shape_outside_the_profiles(made):
    assert_one_line_error(run_cli("bench", "-e", made["fp32"], "--device", "cpu", "-b", 8, "-s", 96,
                                  "--iterations", 1), "batch 8 x length 96 fits no profile", "4x96")


def test_evaluating_longer_windows_than_the_engine_serves(made):
    assert_one_line_error(run_cli("eval", "--squad", made["squad"], made["fp32"], "--device", "cpu", "-s", "128",
                                  "--doc-stride", "32", "--max-query-length", "16"), "up to 96 tokens")


def test_int8_flags_need_int8(made, tmp_path):
    assert_one_line_error(run_cli("build", "--model", made["model"], "--device", "cpu", "-iln",
                                  "-o", tmp_path / "x.engine"), "add --int8")


def test_calibration_of_another_model(made, tmp_path):
    other = make_tiny_model(tmp_path / "other", layers=1)
    assert_one_line_error(run_cli("build", "--model", other, "--device", "cpu", "--int8", "--calib-cache",
                                  made["calib"], "-o", tmp_path / "x.engine"), "made for another model")
