"""FP8 in the workbench's comparisons (issue 21, CPU side): the FP8-grid MSE calibrator ("mse-fp8") and its caches,
the grid-mismatch warnings, FP8 rows in the sweep (grid, grid files, selection, row keys, a tiny CPU sweep, the
skip on GPUs without FP8), `cli.py sensitivity --fp8`, and the eval comparison's FP16 baseline beside FP8 engines."""
from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import cli
from calib.cache import load_cache, save_cache
from calib.calibrate import CalibrationSpec, calibrate, load_calibration_model
from calib.calibrators import HistogramCollector, make_calibrator, mse_amax
from calib.spec import grid_warning
from common.errors import WorkbenchError
from data.answers import AnswerSettings
from data.squad import load_squad
from eval.report import load_report_json
from eval.sweep import GridRow, default_grid, load_grid, row_key, run_sweep
from quant.formats import FP8_E4M3, INT8
from quant.policy import PrecisionPolicy
from quant.quantizer import fake_quantize, scale_from_amax
from tests.test_calib_calibrate import make_tiny_model, write_squad
from tests.test_sweep import SETTINGS, assert_one_line_error_in_process, tiny_config


def quantization_mse(x: torch.Tensor, amax: float, fmt) -> float:
    """The error a calibrator is judged by: every sample fake-quantized with scale amax / qmax of `fmt`."""
    return float(((fake_quantize(x, scale_from_amax(amax, fmt), fmt) - x) ** 2).mean())


def heavy_tailed(seed: int = 5, n: int = 100_000) -> torch.Tensor:
    """Gaussian values with a log-normal spread of scales: a wide dynamic range and a heavy tail."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g) * torch.exp(1.5 * torch.randn(n, generator=g))


def amax_of(method: str, x: torch.Tensor) -> float:
    calibrator = make_calibrator(method)
    for chunk in x.split(25_000):
        calibrator.collect(chunk)
    return calibrator.compute_amax()


# ------------------------------------------------------------------------------------------------ the calibrator

def test_mse_fp8_amax_minimizes_fp8_error_where_int8_mse_and_max_do_not():
    x = heavy_tailed()
    amax = {m: amax_of(m, x) for m in ("max", "mse", "mse-fp8")}
    fp8 = {m: quantization_mse(x, a, FP8_E4M3) for m, a in amax.items()}
    assert amax["mse"] < amax["mse-fp8"] < amax["max"]  # FP8's relative steps: clipping buys less than on INT8's
    assert fp8["mse-fp8"] < 0.9 * fp8["max"] and fp8["mse-fp8"] < 0.6 * fp8["mse"]
    # Each grid's calibrator wins on its own grid.
    assert quantization_mse(x, amax["mse"], INT8) < quantization_mse(x, amax["mse-fp8"], INT8)


def test_fp8_search_is_the_engines_quantizer_on_every_candidate():
    """The blocked search equals a plain loop of quant.quantizer.fake_quantize over the candidate edges."""
    c = HistogramCollector(num_bins=256)
    c.collect(heavy_tailed(seed=1, n=20_000))
    h = c.histogram()
    centers = torch.from_numpy((h.edges[:-1] + h.edges[1:]) / 2).float()
    cands = np.arange(128, 257)
    errs = [float((((fake_quantize(centers, scale_from_amax(h.edges[i], FP8_E4M3), FP8_E4M3).double()
                     - torch.from_numpy((h.edges[:-1] + h.edges[1:]) / 2)) ** 2) * torch.from_numpy(h.counts)).sum())
            for i in cands]
    want = float(h.edges[cands[int(np.argmin(errs))]])
    assert mse_amax(h, block=7, fmt=FP8_E4M3) == want
    assert mse_amax(h) == mse_amax(h, fmt=INT8) != want  # INT8's search is unchanged, and chooses otherwise


# ------------------------------------------------------------------------------------------------ caches and CLI

@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    return {"model": make_tiny_model(root / "tiny"), "train": write_squad(root / "train.json", seed=1, prefix="t"),
            "dev": write_squad(root / "dev.json", seed=2, prefix="d"), "root": root}


def calibrate_cli(files, out, *extra) -> int:
    return cli.main([str(a) for a in ("calibrate", "--squad", files["train"], "--model", files["model"], "--device",
                                      "cpu", "--no-progress", "-s", "96", "--doc-stride", "32", "--max-query-length",
                                      "16", "--calib-num", "6", "-o", out, *extra)])


def test_calibrate_method_mse_fp8_from_the_cli(tiny_files, tmp_path, capsys):
    fp8_out, int8_out = tmp_path / "fp8.json", tmp_path / "int8.json"
    assert calibrate_cli(tiny_files, fp8_out, "--method", "mse-fp8") == 0
    assert calibrate_cli(tiny_files, int8_out, "--method", "mse") == 0
    out, err = capsys.readouterr()
    assert out.startswith("mse-fp8: 6 questions, 17 sites") and "wrote calibration cache" in err
    fp8, int8 = load_cache(fp8_out), load_cache(int8_out)
    assert fp8.method == "mse-fp8" and fp8.describe() == "mse-fp8 (6 q)" and fp8.key() != int8.key()
    assert fp8.settings == int8.settings  # the method, not a setting, names the grid: older caches read as before
    assert all(fp8.ranges[s] == int8.ranges[s] for s in fp8.ranges if s.endswith(".probs"))  # probs: always max
    assert any(fp8.ranges[s].amax > int8.ranges[s].amax for s in fp8.ranges)
    save_cache(fp8, tmp_path / "copy.json")
    assert load_cache(tmp_path / "copy.json") == fp8  # round trip
    assert calibrate_cli(tiny_files, fp8_out, "--method", "mse-fp8") == 0  # reused
    assert "reused calibration cache" in capsys.readouterr().err


def test_trt_cache_of_an_fp8_calibration_is_refused_before_the_work(tiny_files, tmp_path, capsys):
    assert calibrate_cli(tiny_files, tmp_path / "c.json", "--method", "mse-fp8", "--trt-cache", tmp_path / "t") == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "INT8 scales" in errors[0] and "mse-fp8" in errors[0]
    assert not (tmp_path / "c.json").exists()


@pytest.mark.parametrize("method, policy, warns", [
    ("mse", PrecisionPolicy(fp8=True), "mse, which picks ranges for INT8's uniform grid: for --fp8 prefer a max, "
                                       "percentile or mse-fp8 cache"),
    ("entropy", PrecisionPolicy(fp8=True), "for --fp8 prefer"),
    ("mse-fp8", PrecisionPolicy(int8=True), "mse-fp8, which picks ranges for FP8 E4M3's grid: for --int8 prefer"),
    ("mse-fp8", PrecisionPolicy(fp8=True), None),
    ("max", PrecisionPolicy(fp8=True), None),
    ("mse", PrecisionPolicy(int8=True), None),
    ("mse-fp8", PrecisionPolicy(), None),
])
def test_a_cache_made_for_the_other_grid_warns_once(caplog, method, policy, warns):
    with caplog.at_level(logging.WARNING, logger="calib.spec"):
        grid_warning(method, policy, "c.json")
    got = [r.getMessage() for r in caplog.records]
    assert got == ([] if warns is None else [got[0]]) and (warns is None or warns in got[0])


# ------------------------------------------------------------------------------------------------ sweep grid

def test_fp8_rows_build_with_fp8_and_key_apart_from_int8():
    fp8, int8 = GridRow("fp8-max", fp8=True, method="max"), GridRow("int8-max", int8=True, method="max")
    p = fp8.policy(half=True)
    assert (p.fp8, p.int8, p.fp16) == (True, False, True) and p.format is FP8_E4M3 and fp8.quantized
    assert fp8.method_tag == "max" and fp8.options_tag == "plain"
    assert fp8.calibration_spec(10, 0, SETTINGS) == int8.calibration_spec(10, 0, SETTINGS)  # one cache serves both
    keys = [row_key(model_digest="m", calibration_key="k", policy=r.policy(True), profiles=[(1, 96)],
                    eval_digest="e", eval_limit=None, n_questions=3, feature_settings=SETTINGS,
                    answer_settings=AnswerSettings(), device={"type": "cpu"}) for r in (fp8, int8)]
    assert keys[0] != keys[1] and keys[0]["policy"]["fp8"] and not keys[1]["policy"]["fp8"]
    assert all(r.fp16 is False for r in default_grid(half=False) if r.fp8)


@pytest.mark.parametrize("row, words", [
    (dict(int8=True, fp8=True, method="max"), "grid row 'a': give int8 or fp8, not both"),
    (dict(fp8=True, method="max", imh=True), "grid row 'a': imh is INT8-only"),
    (dict(fp8=True, qat="out/qat"), "grid row 'a': qat is INT8-only"),
    (dict(fp8=True), "grid row 'a': an FP8 row needs a calibration method"),
    (dict(fp8=True, method="max", baseline=True), "the baseline is a build without INT8 or FP8"),
    (dict(fp8=True, method="kl"), "unknown calibration method 'kl'"),
])
def test_bad_fp8_rows_are_one_line(row, words):
    with pytest.raises(WorkbenchError, match=words) as e:
        GridRow("a", **row)
    assert "\n" not in str(e.value)


def test_grid_file_fp8_rows(tmp_path):
    path = tmp_path / "grid.json"
    path.write_text(json.dumps([{"name": "fp16", "fp16": True}, {"name": "fp8-mse", "fp8": True, "method": "mse-fp8"},
                                {"name": "fp8-p99.9", "fp8": True, "method": "percentile", "percentile": 99.9,
                                 "keep_fp16": ["layer0.fc2"]}]))
    grid = load_grid(path)
    assert grid[1] == GridRow("fp8-mse", fp8=True, method="mse-fp8") and grid[1].method_tag == "mse-fp8"
    assert grid[2].policy(half=False).fp16_gemms == ("layer0.fc2",) and grid[2].method_tag == "p99.9"
    assert grid[0].baseline is False and not grid[0].quantized  # the one row without INT8 or FP8 is the baseline
    for rows, words in (([{"name": "fp16"}, {"name": "x", "fp8": "yes", "method": "max"}], "field 'fp8' has the "
                                                                                          "wrong type"),
                        ([{"name": "fp8-max", "fp8": True, "method": "max"}], "add a row without INT8 or FP8")):
        path.write_text(json.dumps(rows))
        with pytest.raises(WorkbenchError, match=words):
            load_grid(path)


def test_cli_grid_file_with_an_invalid_fp8_row_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "grid.json").write_text(json.dumps([{"name": "fp16"}, {"name": "x", "fp8": True, "method": "max",
                                                                       "imh": True}]))
    assert_one_line_error_in_process(capsys, "sweep", "--device", "cpu", "--grid", "grid.json", "--report-dir",
                                     tmp_path / "r", words="grid.json: grid row 'x': imh is INT8-only")


@pytest.mark.parametrize("gpu, skipped", [(("Tesla V100-SXM2-16GB", "7.0"), True), (("NVIDIA A100", "8.0"), True),
                                          (("NVIDIA L4", "8.9"), False), (("NVIDIA H100", "9.0"), False)])
def test_fp8_rows_are_skipped_on_gpus_without_fp8(monkeypatch, gpu, skipped):
    from eval.sweep import _skip_fp8

    monkeypatch.setattr("engines.build.this_gpu", lambda device=None: gpu)
    rows, lines = default_grid(half=True), []
    cuda = SimpleNamespace(device=torch.device("cuda"), say=lines.append)
    assert _skip_fp8(cuda, rows) == (["fp8-max", "fp8-mse", "fp8-max-iln", "fp8-mse-iln"] if skipped else [])
    if skipped:
        assert lines == [f"4 FP8 rows skipped: FP8 GEMMs need FP8 tensor cores (compute capability 8.9 or later: "
                         f"Ada, Hopper); {gpu[0]} is {gpu[1]}"]
    assert _skip_fp8(SimpleNamespace(device=torch.device("cpu"), say=lines.append), rows) == []  # the reference


# ------------------------------------------------------------------------------------------------ a tiny sweep

def test_tiny_cpu_sweep_with_fp8_rows(tiny_files, tmp_path):
    """FP8 rows on the CPU reference path: built --fp8 from the same max calibration as INT8 (calibrated once)
    and from an mse-fp8 one, stored under keys of their own, in the report as --fp8 builds."""
    lines: list[str] = []
    grid = [GridRow("fp32", fp16=False), GridRow("int8-max", int8=True, method="max"),
            GridRow("fp8-max", fp8=True, method="max"), GridRow("fp8-mse", fp8=True, method="mse-fp8")]
    inputs = (tiny_files["model"], tiny_files["train"], tiny_files["dev"])
    result = run_sweep(tiny_config(inputs, tmp_path / "report", lines, grid=grid, profiles=[(4, 96)]))
    assert result.computed == ("fp32", "int8-max", "fp8-max", "fp8-mse") and result.skipped == ()
    assert sum(line.startswith("  calibration max (6 q)") for line in lines) == 1
    assert sum(line.startswith("  calibration mse-fp8 (6 q)") for line in lines) == 1
    report = load_report_json(tmp_path / "report" / "report.json")
    rows = {r.name: r for r in report.rows}
    assert rows["fp8-max"].options == "--fp8" and rows["fp8-max"].calibration == "max (6 q)"
    assert rows["fp8-mse"].options == "--fp8" and rows["fp8-mse"].calibration == "mse-fp8 (6 q)"
    assert rows["int8-max"].options == "--int8"
    for name in ("int8-max", "fp8-max", "fp8-mse"):  # within one question's F1 (of 12) of FP32
        assert abs(rows[name].f1 - rows["fp32"].f1) <= 100 / 12 + 1e-9
    stored = {n: json.loads((tmp_path / "report" / "rows" / f"{n}.json").read_text())["key"]
              for n in ("int8-max", "fp8-max")}
    assert stored["int8-max"]["calibration_key"] == stored["fp8-max"]["calibration_key"]
    assert stored["int8-max"]["policy"] != stored["fp8-max"]["policy"]
    csv = (tmp_path / "report" / "report.csv").read_text()
    assert "fp8-mse,--fp8,mse-fp8 (6 q)," in csv
    again = run_sweep(tiny_config(inputs, tmp_path / "report", lines, grid=grid, profiles=[(4, 96)]))
    assert again.reused == result.computed  # FP8 rows resume like any other


# ------------------------------------------------------------------------------------------------ sensitivity

@pytest.fixture(scope="module")
def max_cache(tiny_files):
    loaded, wordpiece = load_calibration_model(tiny_files["model"])
    out = tiny_files["root"] / "calib-max.json"
    calibrate(load_squad(tiny_files["train"]), loaded, wordpiece, CalibrationSpec("max", 6, features=SETTINGS),
              device=torch.device("cpu"), batch_size=16, output=out, feature_cache=False, progress=False)
    return out


def test_sensitivity_fp8_quantizes_one_gemm_at_a_time_in_fp8(tiny_files, max_cache, tmp_path, capsys):
    from eval.sensitivity import FILES, load_result

    report = tmp_path / "r"
    capsys.readouterr()
    code = cli.main([str(a) for a in ("sensitivity", "--fp8", "--model", tiny_files["model"], "--calib-cache",
                                      max_cache, "--squad", tiny_files["dev"], "--device", "cpu", "--limit", "4",
                                      "--layers", "0", "--no-groups", "--max-f1-drop", "0", "--trim", "0",
                                      "--refine", "0", "-s", "96", "--doc-stride", "32", "--max-query-length", "16",
                                      "--no-progress", "--report-dir", report)])
    out, err = capsys.readouterr()
    assert code == 0, err
    result = load_result(report / FILES["json"])
    by_name = {m.name: m for m in result.variants}
    assert result.settings["fp8"] and result.all_int8.name == "all-fp8" and result.all_int8.options == "--fp8"
    assert by_name["only:layer0.fc1"].options == "--fp8 (1 of 8 GEMMs FP8)"
    assert "ΔF1 (points, negative = worse) when only that GEMM is FP8" in out and "INT8" not in out
    assert "on the CPU: the first" not in out and "all FP8 (--fp8)" in out
    assert "INT8" not in (report / FILES["markdown"]).read_text()
    assert result.suggestion.command is None or " --fp8 " in result.suggestion.command


def test_sensitivity_fp8_from_an_int8_grid_cache_warns_once(tiny_files, max_cache, tmp_path, caplog):
    """The grid warning comes once, before the builds, not once per variant."""
    from dataclasses import replace

    from eval.sensitivity import run_sensitivity
    from tests.test_sensitivity import tiny_config as sensitivity_config

    mse = tmp_path / "mse.json"
    save_cache(replace(load_cache(max_cache), method="mse"), mse)
    tiny = {"model": tiny_files["model"], "calib": mse, "dev": tiny_files["dev"]}
    with caplog.at_level(logging.WARNING, logger="calib.spec"):
        result = run_sensitivity(sensitivity_config(tiny, fp8=True, layers="0", groups=False, limit=2, trim=0,
                                                    refine=0))
    assert len(result.variants) >= 6
    assert [r.getMessage() for r in caplog.records].count(
        "the calibration cache was calibrated with mse, which picks ranges for INT8's uniform grid: for --fp8 prefer "
        "a max, percentile or mse-fp8 cache") == 1 and len(caplog.records) == 1


def test_sensitivity_fp8_refuses_int8_options(tiny_files, max_cache, tmp_path, capsys):
    assert_one_line_error_in_process(capsys, "sensitivity", "--fp8", "-iln", "--model", tiny_files["model"],
                                     "--calib-cache", max_cache, "--device", "cpu", "--report-dir", tmp_path / "r",
                                     words="sensitivity --fp8 analyses plain FP8 builds")


# ------------------------------------------------------------------------------------------------ eval comparison

def test_an_fp8_engine_with_fp16_is_not_the_fp16_baseline():
    from eval.compare import ComparisonPlan

    def engine(**flags):
        return SimpleNamespace(kind="engine", engine=SimpleNamespace(policy=PrecisionPolicy(fp16=True, **flags)))

    plan = ComparisonPlan()
    plan.names = ["fp8", "fp16", "int8"]
    assert plan._baseline([engine(fp8=True), engine(), engine(int8=True)]) == 1
    with pytest.raises(WorkbenchError, match="no FP16 baseline"):
        plan._baseline([engine(fp8=True), engine(int8=True)])
