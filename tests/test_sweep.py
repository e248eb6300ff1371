"""The sweep (eval/sweep.py, `cli.py sweep`): the grid as data, resume after an interruption, the files written,
the default run on the vendored assets, QAT rows, 2:4 sparsity and gzip SQuAD files. CPU only, no ../shared needed."""
from __future__ import annotations

import gzip
import json
import time

import pytest
import torch

from common.errors import WorkbenchError
from data.answers import AnswerSettings
from data.features import FeatureSettings
from eval.report import REPORT_FILES, load_report_json
from eval.sweep import (
    DEFAULT_CALIB_SQUAD,
    DEFAULT_EVAL_SQUAD,
    DEFAULT_MODEL,
    SMOOTH_ALPHA,
    GridRow,
    SweepConfig,
    default_grid,
    load_grid,
    pair_profiles,
    qat_rows,
    read_qat_folder,
    run_sweep,
    select_rows,
)
from tests.test_calib_calibrate import make_tiny_model, write_squad
from tests.test_cli import run_cli

SETTINGS = FeatureSettings(max_seq_length=96, doc_stride=32, max_query_length=16)


# ------------------------------------------------------------------------------------------------------ grid

def test_default_grid_is_the_standard_grid():
    from quant.policy import PrecisionPolicy

    grid = default_grid(half=True)
    assert grid[0] == GridRow("fp16", fp16=True, baseline=True)
    dense = [r for r in grid if r.int8 and not r.sparse]
    sparse = [r for r in grid if r.sparse]
    fp8 = [r for r in grid if r.fp8]
    assert len(grid) == 53 and len(dense) == 24 and len(sparse) == 24
    assert [r.name for r in fp8] == ["fp8-max", "fp8-mse", "fp8-max-iln", "fp8-mse-iln"]
    assert grid[25:29] == fp8 and [r.method for r in fp8] == ["max", "mse-fp8"] * 2  # after the dense INT8 rows
    assert [r.options_tag for r in fp8] == ["plain", "plain", "iln", "iln"]
    assert next(r for r in grid if r.name == "fp8-max-iln").policy(half=True) == PrecisionPolicy(fp8=True, fp16=True,
                                                                                                 iln=True)
    assert {r.method_tag for r in dense} == {"entropy", "entropy-sm", "p99.9", "p99.99", "mse", "max"}
    assert {r.options_tag for r in dense} == {"plain", "iln", "imh", "iln-imh"}
    names = [r.name for r in dense]
    assert names[:4] == ["int8-entropy", "int8-entropy-iln", "int8-entropy-imh", "int8-entropy-iln-imh"]
    assert "int8-p99.9-iln" in names and "int8-p99.99" in names and "int8-max-iln-imh" in names
    p999 = next(r for r in dense if r.name == "int8-p99.9")
    assert p999.method == "percentile" and p999.percentile == 99.9 and p999.smooth is None
    from quant.smoothing import DEFAULT_ALPHA
    assert SMOOTH_ALPHA == DEFAULT_ALPHA
    smoothed = next(r for r in dense if r.name == "int8-entropy-sm-iln")
    assert smoothed.method == "entropy" and smoothed.smooth == SMOOTH_ALPHA and smoothed.iln
    assert smoothed.calibration_spec(10, 0, SETTINGS).smooth == SMOOTH_ALPHA
    with pytest.raises(WorkbenchError, match="smooth applies to INT8 and FP8 rows only"):
        GridRow("x", smooth=0.5)
    with pytest.raises(WorkbenchError, match=r"\[0, 1\]"):
        GridRow("x", int8=True, method="entropy", smooth=2.0)
    assert all(r.fp16 for r in grid)
    cpu = default_grid(half=False)
    assert cpu[0].name == "fp32" and not any(r.policy(True).fp16 for r in cpu)  # explicit fp16=False wins
    policy = next(r for r in grid if r.name == "int8-mse-iln-imh").policy(half=True)
    assert (policy.int8, policy.fp16, policy.iln, policy.imh) == (True, True, True, True)


def test_select_rows_keeps_the_baseline():
    grid = default_grid(half=True)
    rows = select_rows(grid, ["max", "percentile"], ["plain", "iln"])
    assert [r.name for r in rows if not r.sparse] == ["fp16", "int8-p99.9", "int8-p99.9-iln", "int8-p99.99",
                                                      "int8-p99.99-iln", "int8-max", "int8-max-iln", "fp8-max",
                                                      "fp8-max-iln"]
    assert [r.name for r in select_rows(grid, ["entropy"], ["imh"]) if not r.sparse] == ["fp16", "int8-entropy-imh"]
    # FP8 rows: selected by their method (mse: either grid's; mse-fp8: FP8's alone) and options (plain or iln).
    assert [r.name for r in select_rows(grid, ["max"], ["plain"]) if not r.sparse] == ["fp16", "int8-max", "fp8-max"]
    assert [r.name for r in select_rows(grid, ["mse"], ["plain"]) if not r.sparse] == ["fp16", "int8-mse", "fp8-mse"]
    assert [r.name for r in select_rows(grid, ["mse-fp8"])] == ["fp16", "fp8-mse", "fp8-mse-iln"]
    assert "fp8-max" not in [r.name for r in select_rows(grid, ["max"], ["iln"])]
    assert [r.name for r in select_rows(grid, ["max"], ["iln"]) if r.fp8] == ["fp8-max-iln"]


@pytest.mark.parametrize("row, words", [
    (dict(name="a", int8=True), "needs a calibration method"),
    (dict(name="a", method="max"), "INT8 and FP8 rows only"),
    (dict(name="a", iln=True), "iln applies to INT8 and FP8 rows only"),
    (dict(name="a", int8=True, method="minmax"), "unknown calibration method"),
    (dict(name="a", int8=True, method="max", percentile=99.0), "method percentile only"),
    (dict(name="a", int8=True, method="percentile", percentile=120), "percentile must be in"),
    (dict(name="a b"), "it names files"),
    (dict(name="a", int8=True, method="max", baseline=True), "baseline is a build without INT8 or FP8"),
    (dict(name="a", qat="out/qat"), "grid row 'a': qat applies to INT8 rows only"),
    (dict(name="a", int8=True, method="max", qat="out/qat"), "grid row 'a': give a calibration method or a QAT"),
    (dict(name="a", int8=True, qat="out/qat", percentile=99.9), "grid row 'a': percentile applies to calibrated"),
    (dict(name="a", int8=True, qat="out/qat", smooth=0.5), "grid row 'a': smooth applies to calibrated rows"),
    (dict(name="a", int8=True, qat=""), "grid row 'a': qat must name"),
])
def test_grid_row_checks(row, words):
    with pytest.raises(WorkbenchError, match=words):
        GridRow(**row)


def test_percentile_defaults_to_99_99():
    assert GridRow("p", int8=True, method="percentile").percentile == 99.99


def test_grid_file(tmp_path):
    path = tmp_path / "grid.json"
    path.write_text(json.dumps([{"name": "fp16", "fp16": True},
                                {"name": "int8-p99.5-iln", "int8": True, "method": "percentile", "percentile": 99.5,
                                 "iln": True}]))
    grid = load_grid(path)
    assert grid[1] == GridRow("int8-p99.5-iln", int8=True, method="percentile", percentile=99.5, iln=True)
    assert grid[1].method_tag == "p99.5" and select_rows(grid, ["percentile"]) == grid
    path.write_text(json.dumps({"rows": [{"name": "fp16", "fp16": True}]}))
    assert load_grid(path) == [GridRow("fp16", fp16=True)]
    path.write_text(json.dumps([{"name": "fp16", "fp16": True}, {"name": "int8-max", "int8": True, "method": "max"},
                                {"name": "int8-qat-iln", "int8": True, "iln": True, "qat": "out/qat-iln"}]))
    grid = load_grid(path)
    assert grid[2] == GridRow("int8-qat-iln", int8=True, iln=True, qat="out/qat-iln") and grid[2].method_tag == "qat"
    assert grid[2].calibration_spec(10, 0, SETTINGS) is None
    assert [r.name for r in select_rows(grid, ["qat"])] == ["fp16", "int8-qat-iln"]
    assert [r.name for r in select_rows(grid, ["max"])] == ["fp16", "int8-max"]


@pytest.mark.parametrize("rows, words", [
    ([{"name": "fp16", "colour": "red"}], "unknown field 'colour'"),
    ([{"name": "fp16", "int8": "yes"}], "field 'int8' has the wrong type"),
    ([{"int8": False}], "missing field 'name'"),
    ([{"name": "fp16"}, {"name": "fp16"}], "used twice"),
    ([{"name": "a", "int8": True, "method": "max"}], "no baseline"),
    ([{"name": "fp16"}, {"name": "fp32", "fp16": False}], "mark the baseline"),
    ([], "non-empty JSON list"),
    ([{"name": "fp16"}, {"name": "q", "int8": True, "qat": 3}], r"rows\[1\]: field 'qat' has the wrong type"),
    ([{"name": "fp16"}, {"name": "q", "qat": "d"}], "grid.json: grid row 'q': qat applies to INT8 rows only"),
])
def test_bad_grid_files(tmp_path, rows, words):
    path = tmp_path / "grid.json"
    path.write_text(json.dumps(rows))
    with pytest.raises(WorkbenchError, match=words):
        load_grid(path)


def test_profiles_pair_up():
    assert pair_profiles(None, None, ((1, 128), (64, 384)), 384) == [(1, 128), (64, 384)]
    assert pair_profiles([1, 64], [128, 384], (), 384) == [(1, 128), (64, 384)]
    assert pair_profiles([1, 8], None, (), 256) == [(1, 256), (8, 256)]
    assert pair_profiles([4], [128, 384], (), 384) == [(4, 128), (4, 384)]
    with pytest.raises(WorkbenchError, match="in pairs"):
        pair_profiles([1, 2], [1, 2, 3], (), 384)
    with pytest.raises(WorkbenchError, match="given twice"):
        pair_profiles([1, 1], [128, 128], (), 384)


# -------------------------------------------------------------------------------------- sparsity and gzip

def test_2to4_sparsity_check():
    from calib.sparsity import gemm_sparsity, is_2to4_sparse
    from model.bert import BertQA
    from model.config import BertConfig

    w = torch.randn(8, 16)
    assert not is_2to4_sparse(w)
    pruned = w.clone().view(8, 4, 4)
    pruned[..., torch.tensor([0, 2])] = 0  # two zeros in every group of four
    assert is_2to4_sparse(pruned.view(8, 16))
    three = pruned.clone()
    three[0, 0, 0] = 1.0  # one group with three non-zeros
    assert not is_2to4_sparse(three.view(8, 16))
    assert not is_2to4_sparse(torch.zeros(8, 6))  # the input dimension must split into groups of four

    cfg = BertConfig(vocab_size=40, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32)
    model = BertQA(cfg).init_random(0)
    check = gemm_sparsity(model, 2)
    assert not check.all_sparse and check.summary() == "0 of 8 GEMM weights are 2:4 sparse"
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("qkv.weight", "attn_out.weight", "fc1.weight", "fc2.weight")):
                p.view(p.shape[0], -1, 4)[..., :2] = 0
    assert gemm_sparsity(model, 2).all_sparse


def test_gzip_squad_is_the_same_data(tmp_path):
    from data.squad import load_squad

    plain = write_squad(tmp_path / "s.json")
    packed = tmp_path / "s.json.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    a, b = load_squad(plain), load_squad(packed)
    assert a.examples == b.examples and a.digest == b.digest and a.version == b.version
    damaged = tmp_path / "bad.json.gz"
    damaged.write_bytes(packed.read_bytes()[:40])
    with pytest.raises(WorkbenchError, match="bad.json.gz: damaged gzip file"):
        load_squad(damaged)


def test_assets_are_vendored():
    """The default run needs no ../shared: the model and both SQuAD files ship in assets/."""
    from data.squad import load_squad

    assert (DEFAULT_MODEL / "model.safetensors").stat().st_size > 40e6
    dev = load_squad(DEFAULT_EVAL_SQUAD, limit=3)
    assert dev.digest == "95aa6a52d5d6a735563366753ca50492a658031da74f301ac5238b03966972c9"  # official dev v1.1
    calib = load_squad(DEFAULT_CALIB_SQUAD)
    assert len(calib.examples) == 2596 and not {e.qid for e in calib.examples} & {e.qid for e in dev.examples}


# ------------------------------------------------------------------------------------- run_sweep (tiny model)

@pytest.fixture
def tiny_inputs(tmp_path):
    model = make_tiny_model(tmp_path / "tiny")
    train = write_squad(tmp_path / "train.json", seed=1, prefix="t")
    dev = write_squad(tmp_path / "dev.json", seed=2, prefix="d")
    return model, train, dev


def tiny_config(tiny_inputs, report_dir, lines, **over) -> SweepConfig:
    model, train, dev = tiny_inputs
    grid = [GridRow("fp32", fp16=False), GridRow("int8-max", int8=True, method="max"),
            GridRow("int8-max-iln", int8=True, method="max", iln=True),
            GridRow("int8-max-sparse", int8=True, method="max", sparse=True)]
    cfg = dict(model=model, calib_squad=train, eval_squad=dev, report_dir=report_dir, grid=grid,
               profiles=[(1, 32), (4, 96)], device=torch.device("cpu"), half=False, calib_num=6, eval_limit=None,
               feature_settings=SETTINGS, answer_settings=AnswerSettings(), bench_iterations=2, bench_warmup=0,
               progress=False, say=lines.append, timing_tolerance=1e9)  # real timings, never "not stable": the
    cfg.update(over)                                                      # re-timing is tests/test_new_user.py's
    return SweepConfig(**cfg)


def test_sweep_writes_the_report_and_resumes_after_an_interruption(tiny_inputs, tmp_path):
    report_dir = tmp_path / "report"
    lines: list[str] = []

    def interrupt(name: str) -> None:
        if name == "int8-max":
            raise KeyboardInterrupt  # as if Ctrl-C came right after the second row was stored

    with pytest.raises(KeyboardInterrupt):
        run_sweep(tiny_config(tiny_inputs, report_dir, lines, on_row_done=interrupt))
    assert sorted(p.name for p in (report_dir / "rows").iterdir()) == ["fp32.json", "int8-max.json"]
    assert any("1 sparse row skipped: the model's GEMM weights are not 2:4 sparse (0 of 8" in line for line in lines)
    stored = (report_dir / "rows" / "fp32.json").read_text()

    lines.clear()
    result = run_sweep(tiny_config(tiny_inputs, report_dir, lines))
    assert result.reused == ("fp32", "int8-max") and result.computed == ("int8-max-iln",)
    assert result.skipped == ("int8-max-sparse",)
    assert "[1/3] row fp32: finished earlier, reusing its result" in "\n".join(lines)
    assert "[2/3] row int8-max: finished earlier, reusing its result" in "\n".join(lines)
    assert any(line.startswith("[3/3] int8-max-iln: EM ") for line in lines)
    assert (report_dir / "rows" / "fp32.json").read_text() == stored  # reused rows are not rewritten

    # The files: report, engines, predictions, rows.
    for name in REPORT_FILES:
        assert (report_dir / name).stat().st_size > 0
    assert (report_dir / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (report_dir / "engines").iterdir()) == [
        "fp32.engine", "int8-max-iln.engine", "int8-max.engine"]
    for name in ("fp32", "int8-max", "int8-max-iln"):
        predictions = json.loads((report_dir / "predictions" / f"{name}.json").read_text())
        assert len(predictions) == 12 and (report_dir / "predictions" / f"{name}.nbest.json").exists()
    report = load_report_json(report_dir / "report.json")
    assert [r.name for r in report.rows] == ["fp32", "int8-max", "int8-max-iln"]
    assert report.baseline.name == "fp32" and report.profile == (4, 96)
    assert all(r.profiles == ((1, 32), (4, 96)) and r.n_questions == 12 for r in report.rows)
    int8 = report.rows[1]
    assert int8.options == "--int8" and int8.calibration == "max (6 q)"
    assert int8.engine_bytes == (report_dir / "engines" / "int8-max.engine").stat().st_size
    assert int8.predictions_file == "predictions/int8-max.json"
    assert result.report.chosen.name == report.chosen.name
    md = (report_dir / "report.md").read_text()
    assert "int8-max-iln" in md and "![F1 against latency" in md
    assert not list(report_dir.rglob("*.tmp"))  # every write was atomic


def test_changed_inputs_are_recomputed_and_engines_reused(tiny_inputs, tmp_path):
    report_dir = tmp_path / "report"
    lines: list[str] = []
    run_sweep(tiny_config(tiny_inputs, report_dir, lines))
    engine = report_dir / "engines" / "int8-max.engine"
    built = engine.stat().st_mtime_ns

    lines.clear()  # fewer questions: every row's evaluation changes, the engines do not
    result = run_sweep(tiny_config(tiny_inputs, report_dir, lines, eval_limit=5))
    assert result.reused == () and len(result.computed) == 3
    text = "\n".join(lines)
    assert "[1/3] row fp32: its inputs changed since it was stored (eval_data): recomputing" in text
    assert f"engine {engine} reused" in text and engine.stat().st_mtime_ns == built
    assert all(r.n_questions == 5 for r in result.results)

    lines.clear()  # another calibration (more questions): INT8 rows and their engines are redone, FP32 is kept
    time.sleep(0.01)
    result = run_sweep(tiny_config(tiny_inputs, report_dir, lines, eval_limit=5, calib_num=8))
    assert result.reused == ("fp32",) and result.computed == ("int8-max", "int8-max-iln")
    text = "\n".join(lines)
    assert "row int8-max: its inputs changed since it was stored (calibration_key): recomputing" in text
    assert "engine rebuilt (built from other inputs (calibration))" in text
    assert engine.stat().st_mtime_ns != built

    (report_dir / "rows" / "int8-max.json").write_text("{ damaged")
    lines.clear()
    result = run_sweep(tiny_config(tiny_inputs, report_dir, lines, eval_limit=5, calib_num=8))
    assert result.computed == ("int8-max",)
    assert "row int8-max: its stored result is unreadable" in "\n".join(lines)


def test_sweep_refuses_profiles_that_cannot_evaluate(tiny_inputs, tmp_path):
    with pytest.raises(WorkbenchError, match="no profile serves the evaluation's --max-seq-length 96"):
        run_sweep(tiny_config(tiny_inputs, tmp_path / "r", [], profiles=[(8, 64)]))
    with pytest.raises(WorkbenchError, match="--profile 2x96 is not one of the sweep's profiles"):
        run_sweep(tiny_config(tiny_inputs, tmp_path / "r", [], selection_profile=(2, 96)))


# ------------------------------------------------------------------------------------------ QAT rows (tiny)

def make_qat_folder(source, out, *, iln=False, imh=False, amax=4.0):
    """A `cli.py qat`-style folder of `source`: its weights nudged (as after training) and fixed scales for the
    sites the flags quantize."""
    from model.checkpoint import load_model
    from qat.folder import QatScales, policy_flags, save_model_folder, save_qat_scales
    from quant.policy import PrecisionPolicy
    from quant.spec import ScaleSource

    loaded = load_model(source)
    with torch.no_grad():
        for p in loaded.model.parameters():
            p.mul_(1.01)
    save_model_folder(out, loaded.model, source)
    policy = PrecisionPolicy(int8=True, iln=iln, imh=imh)
    n = loaded.config.num_layers
    spec = policy.spec(n, dict.fromkeys(policy.quantized_sites(n), amax), ScaleSource("qat"))
    save_qat_scales(out, QatScales(spec, policy_flags(policy), {}), {"steps": 0})
    return out


def test_qat_rows_take_the_trained_flags_and_unique_names(tiny_inputs, tmp_path):
    model = tiny_inputs[0]
    a = make_qat_folder(model, tmp_path / "a" / "qat", iln=True, imh=True)
    b = make_qat_folder(model, tmp_path / "b", iln=True, imh=True)
    plain = make_qat_folder(model, tmp_path / "p")
    grid = [GridRow("fp32", fp16=False), GridRow("int8-qat", int8=True, method="max")]
    rows = qat_rows([a, b, plain], grid)
    assert [r.name for r in rows] == ["int8-qat-iln-imh-qat", "int8-qat-iln-imh-b", "int8-qat-p"]
    assert all(r.int8 and r.iln and r.imh and r.method is None and r.method_tag == "qat" for r in rows[:2])
    assert rows[0].qat == str(a) and not (rows[2].iln or rows[2].imh) and rows[2].options_tag == "plain"
    assert [r.name for r in qat_rows([plain])] == ["int8-qat"]
    keys = {read_qat_folder(f).key() for f in (a, a, b, plain)}  # stable; apart for other scales or flags
    assert len(keys) == 2 and all(len(k) == 64 for k in keys)
    with pytest.raises(WorkbenchError, match="--qat names this folder twice"):
        qat_rows([a, a])


def test_sweep_with_a_qat_folder(tiny_inputs, tmp_path):
    """A QAT row builds from its folder (weights and learned scales, no calibration), is reported as QAT, stored
    under a key of its own weights and scales, reused by a rerun and recomputed when the scales change."""
    from engines.engine_file import read_header
    from eval.compare import calibration_of_engine
    from model.checkpoint import load_model
    from qat.folder import QUANT_SPEC_NAME, read_qat_scales

    qat = make_qat_folder(tiny_inputs[0], tmp_path / "qat-iln", iln=True)  # -imh needs heads of 16+: not tiny
    report_dir, lines = tmp_path / "report", []
    base = [GridRow("fp32", fp16=False)]

    def sweep():
        lines.clear()
        return run_sweep(tiny_config(tiny_inputs, report_dir, lines, grid=base + qat_rows([qat], base),
                                     profiles=[(4, 96)], eval_limit=4))

    result = sweep()
    assert result.computed == ("fp32", "int8-qat-iln")
    assert not any(line.startswith("  calibration ") for line in lines)  # nothing calibrated
    engine = report_dir / "engines" / "int8-qat-iln.engine"
    header, scales, digest = read_header(engine), read_qat_scales(qat), load_model(qat).digest
    assert header.policy["int8"] and header.policy["iln"] and not header.policy["imh"]
    assert header.model_digest == digest != load_model(tiny_inputs[0]).digest
    assert header.calib_digest == scales.key() and header.calibration == "QAT (learned)"
    assert calibration_of_engine(header.calib_digest, header.calibration) == "QAT (learned)"  # `cli.py eval`'s
    assert "QAT row int8-qat-iln: the weights and learned scales of" in lines[0]
    row = result.report.rows[1]
    assert row.name == "int8-qat-iln" and row.calibration == "QAT (learned)" and row.options == "--int8 -iln"
    assert load_report_json(report_dir / "report.json").rows[1].calibration == "QAT (learned)"
    stored = json.loads((report_dir / "rows" / "int8-qat-iln.json").read_text())["key"]
    assert stored["model_digest"] == digest and stored["calibration_key"] == scales.key()

    assert sweep().reused == ("fp32", "int8-qat-iln")

    spec = json.loads((qat / QUANT_SPEC_NAME).read_text())  # other learned scales: the row and engine are redone
    for site in spec["spec"]["sites"].values():
        site["amax"] = 3.0
    (qat / QUANT_SPEC_NAME).write_text(json.dumps(spec))
    result = sweep()
    assert result.reused == ("fp32",) and result.computed == ("int8-qat-iln",)
    text = "\n".join(lines)
    assert "row int8-qat-iln: its inputs changed since it was stored (calibration_key): recomputing" in text
    assert "engine rebuilt (built from other inputs (calibration))" in text
    assert read_header(engine).calib_digest == read_qat_scales(qat).key() != scales.key()


def test_qat_row_flags_must_fit_the_folder(tiny_inputs, tmp_path):
    plain = make_qat_folder(tiny_inputs[0], tmp_path / "plain")
    grid = [GridRow("fp32", fp16=False), GridRow("q", int8=True, iln=True, qat=str(plain))]
    with pytest.raises(WorkbenchError, match=r"grid row 'q': the QAT scales of .*plain were trained for --int8 and "
                                             r"have no range for layer1.ffn_ln_out"):
        run_sweep(tiny_config(tiny_inputs, tmp_path / "r", [], grid=grid))


def test_sweep_qat_bad_folders_are_one_line(tiny_inputs, tmp_path, monkeypatch, capsys):
    model, train, dev = tiny_inputs
    other = make_tiny_model(tmp_path / "one-layer", layers=1)
    make_qat_folder(other, tmp_path / "qat-other")
    words = make_qat_folder(model, tmp_path / "qat-words")
    vocab = (words / "vocab.txt").read_text().replace("\n?\n", "\n!\n")  # same size, another tokenizer
    (words / "vocab.txt").write_text(vocab)
    monkeypatch.chdir(tmp_path)
    args = ["sweep", "--device", "cpu", "--model", model, "--calib-squad", train, "--eval-squad", dev,
            "--report-dir", tmp_path / "r", "--methods", "max", "--no-progress", "--qat"]
    for folder, said in ((model, f"{model}: no quant_spec.json: a plain model folder"),
                         (tmp_path / "nowhere", "nowhere: QAT folder not found"),
                         (tmp_path / "qat-other", "qat-other: not a QAT folder of the sweep's model"),
                         (words, "qat-words: its tokenizer differs from that of the sweep's model")):
        assert_one_line_error_in_process(capsys, *args, folder, words=said)


# ------------------------------------------------------------------------------ the default run (assets/)

def test_default_run_on_a_few_questions(tmp_path):
    """`cli.py sweep` on the vendored MiniLM and SQuAD files, cut to three rows (max: INT8 and FP8) and 8 questions;
    then resumed."""
    report_dir = tmp_path / "report"
    args = ["sweep", "--device", "cpu", "--methods", "max", "--options", "plain", "--eval-limit", 8,
            "--calib-num", 4, "--bench-iterations", 2, "--bench-warmup", 0, "--report-dir", report_dir,
            "--no-progress"]
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "on the CPU: a quick sweep with profile 1x384" in out and "FP32 for what is not INT8" in out
    assert "20 sparse rows" not in proc.stderr and "4 sparse rows" not in proc.stderr
    assert "1 sparse row skipped: the model's GEMM weights are not 2:4 sparse (0 of 24" in proc.stderr
    assert "evaluating on 8 questions" in proc.stderr
    table = out[out.index("build"):]
    assert "fp32" in table and "int8-max" in table and "max (4 q)" in table and "1×384 median/p99 ms" in table
    assert "fp8-max" in table and "--fp8" in table  # the CPU runs FP8 rows on the reference path
    assert "8 questions; ΔEM/ΔF1 and speed-up vs fp32" in out and "chosen: " in out
    last = out.strip().splitlines()[-1]
    assert last.startswith("build to ship: ") and str(report_dir / "engines") in last
    for name in REPORT_FILES:
        assert (report_dir / name).exists()
    report = load_report_json(report_dir / "report.json")
    assert [r.name for r in report.rows] == ["fp32", "int8-max", "fp8-max"]
    assert report.baseline.f1 > 50  # the real MiniLM answers the first dev questions
    assert report.rows[2].options == "--fp8" and report.rows[2].calibration == "max (4 q)"

    again = run_cli(*args)
    assert again.returncode == 0, again.stderr
    # Evaluations are reused; a row whose timing was not stable on this (shared, busy) machine is timed again.
    assert "[1/3] row fp32: finished earlier" in again.stderr
    assert "[2/3] row int8-max: finished earlier" in again.stderr
    assert "[3/3] row fp8-max: finished earlier" in again.stderr
    assert "0 rows measured, 3 reused" in again.stderr
    assert again.stdout.strip().splitlines()[-1].startswith("build to ship: ")


@pytest.mark.parametrize("extra, words", [
    (["--eval-limit", "none"], "--eval-limit 'none'"),
    (["--grid", "missing.json"], "missing.json: grid file not found"),
    (["-b", "1", "-b", "2", "-s", "64", "-s", "96", "-s", "128"], "give them in pairs"),
    (["--profile", "7"], "profile '7'"),
    (["--model", "nowhere"], "nowhere: model folder not found"),
    (["--calib-num", "0"], "--calib-num must be at least 1"),
    (["--bench-iterations", "0"], "--bench-iterations must be at least 1"),
])
def test_sweep_bad_input_is_one_line(tmp_path, monkeypatch, capsys, extra, words):
    monkeypatch.chdir(tmp_path)
    assert_one_line_error_in_process(capsys, "sweep", "--device", "cpu", "--report-dir", tmp_path / "r", *extra,
                                     words=words)


def assert_one_line_error_in_process(capsys, *args, words: str) -> None:
    """cli.main in this process (no interpreter start): exit status 2 and one `error:` line naming the problem."""
    import cli

    capsys.readouterr()
    assert cli.main([str(a) for a in args]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert words in errors[0], errors[0]


def test_sweep_help():
    proc = run_cli("sweep", "--help")
    assert proc.returncode == 0 and "examples:" in proc.stdout and "--max-f1-drop" in proc.stdout
    assert "--qat DIR" in proc.stdout and "--qat out/qat-iln-imh" in proc.stdout


def test_interrupted_cli_says_how_to_resume(tmp_path):
    """Ctrl-C (SIGINT) during a sweep: exit 130, no traceback, a hint to rerun."""
    import signal
    import subprocess
    import sys

    from tests.conftest import ROOT

    proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "sweep", "--device", "cpu", "--methods", "max",
                             "--options", "plain", "--eval-limit", "8", "--calib-num", "4", "--report-dir",
                             str(tmp_path / "r"), "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not (tmp_path / "r").exists() and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the sweep finished before the interrupt arrived")
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "rerun the same command to resume" in err


# ------------------------------------------------------------------------------ -v/--vocab-file (tiny)

def test_sweep_with_a_vocab_file_keys_rows_and_engines_by_it(tiny_inputs, tmp_path):
    """-v replaces the model folder's tokenizer: the rows without a calibration key (the baseline, QAT rows) are
    recomputed and their engines rebuilt to embed it; a QAT folder must hold that vocabulary (as `cli.py qat -v`
    writes it: vocab.txt, whatever the -v file's name)."""
    from data.tokenizer import load_wordpiece
    from engines.build import load_runnable

    model = tiny_inputs[0]
    lines = (model / "vocab.txt").read_text().splitlines()
    i, j = lines.index("paris"), lines.index("france")
    lines[i], lines[j] = lines[j], lines[i]  # same size, other ids
    vocab = tmp_path / "demo-vocab.txt"
    vocab.write_text("\n".join(lines) + "\n")
    qat = make_qat_folder(model, tmp_path / "qat")
    report_dir, said = tmp_path / "report", []
    base = [GridRow("fp32", fp16=False)]

    def sweep(vocab_file=None, grid=base):
        said.clear()
        return run_sweep(tiny_config(tiny_inputs, report_dir, said, grid=grid, profiles=[(4, 96)], eval_limit=4,
                                     vocab_file=vocab_file))

    assert sweep().computed == ("fp32",)
    with pytest.raises(WorkbenchError, match=r"qat: its tokenizer differs from the sweep's -v .*demo-vocab.txt"):
        sweep(str(vocab), base + qat_rows([qat], base))
    (qat / "vocab.txt").write_bytes(vocab.read_bytes())  # trained with -v
    result = sweep(str(vocab), base + qat_rows([qat], base))
    assert result.computed == ("fp32", "int8-qat")
    text = "\n".join(said)
    assert "row fp32: its inputs changed since it was stored (tokenizer): recomputing" in text
    assert "engine rebuilt (built from other inputs (tokenizer))" in text
    wanted = load_wordpiece(model, vocab_file=vocab)
    for name in ("fp32", "int8-qat"):
        embedded = load_runnable(report_dir / "engines" / f"{name}.engine", torch.device("cpu"))[1]
        assert embedded.tokenizer.to_str() == wanted.tokenizer.to_str()
    stored = json.loads((report_dir / "rows" / "fp32.json").read_text())["key"]
    assert stored["tokenizer"] == wanted.digest != load_wordpiece(model).digest
    assert sweep(str(vocab), base + qat_rows([qat], base)).reused == ("fp32", "int8-qat")
    with pytest.raises(WorkbenchError, match="qat: its tokenizer differs from that of the sweep's model"):
        sweep(None, base + qat_rows([qat], base))  # without -v the folder's vocab.txt is not the model's


def test_sparse_rows_build_on_a_2to4_model(tiny_inputs, tmp_path):
    """On a 2:4-pruned model the --sparse rows are built (the engine times 2:4 kernels against dense ones where it
    can: on the CPU it runs the dense reference on the pruned weights), not skipped."""
    from engines.engine_file import read_header
    from model.checkpoint import load_model
    from qat.folder import save_model_folder

    model, train, dev = tiny_inputs
    loaded = load_model(model)
    with torch.no_grad():
        for name, p in loaded.model.named_parameters():
            if name.startswith("layers.") and name.endswith("weight") and p.dim() == 2:
                groups = p.view(p.shape[0], -1, 4)
                groups.scatter_(-1, groups.abs().argsort(dim=-1)[..., :2], 0.0)
    pruned = save_model_folder(tmp_path / "pruned", loaded.model, model)
    lines: list[str] = []
    result = run_sweep(tiny_config((pruned, train, dev), tmp_path / "report", lines))
    assert result.skipped == () and "int8-max-sparse" in result.computed
    assert any("1 --sparse row: the model's GEMM weights are 2:4" in line for line in lines)
    engines = tmp_path / "report" / "engines"
    assert read_header(engines / "int8-max-sparse.engine").policy["sparse"]
    assert not read_header(engines / "int8-max.engine").policy["sparse"]
