"""Issue 23, "tried as a new user would": one CPU test (or more) per item, on tiny random models (no ../shared).

Item numbers are the issue's. Where an existing test module already holds an item's test it is named here:
item 2 test_engine_cli.test_bench_reports_latency; item 6 (on the real MiniLM)
test_cli.test_infer_files_and_interactive;
item 13's calibrate messages and --percentile test_calib_cli; MiB test_eval_report; the CPU timing only the
selection profile and the report's provenance test_eval_compare.test_several_builds_give_one_table_and_the_report_files.
"""
from __future__ import annotations

import io
import json
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import cli
from data.answers import AnswerSettings
from eval.report import BuildResult, ProfileLatency, build_report, load_report_json
from eval.sweep import GridRow, SweepConfig, run_sweep
from tests.conftest import ROOT
from tests.test_calib_calibrate import make_tiny_model, write_squad
from tests.test_sweep import SETTINGS, assert_one_line_error_in_process

FEATURES = ["-s", "96", "--doc-stride", "32", "--max-query-length", "16"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("new_user")
    return dict(root=root, model=make_tiny_model(root / "tiny"), other=make_tiny_model(root / "other", layers=1),
                train=write_squad(root / "train.json", seed=1, prefix="t"), dev=write_squad(root / "dev.json", seed=2))


def run_main(capsys, *args, stdin: str | None = None, monkeypatch=None) -> tuple[int, str, str]:
    if stdin is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    capsys.readouterr()
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------ item 1: the build to ship is not noise

def test_timing_waits_for_two_rounds_that_agree():
    """A cold start (the first calls 10x slow) does not become the figure: rounds go on until two agree."""
    from eval.benchmark import time_until_stable

    calls = []

    def forward(*_):
        calls.append(1)
        time.sleep(0.03 if len(calls) <= 4 else 0.003)

    t = time_until_stable(forward, (), 3, 0, torch.device("cpu"), tolerance=0.5)
    assert t.stable and t.rounds >= 3 and t.runs == 3 * t.rounds
    assert sorted(t.samples_ms)[len(t.samples_ms) // 2] < 15  # the fast calls, not the cold start
    never = time_until_stable(lambda *_: time.sleep(0.001 * (1 + len(calls) % 7) ** 2) or calls.append(1), (), 2, 0,
                              torch.device("cpu"), tolerance=1e-9, max_rounds=3)
    assert not never.stable and never.rounds == 3 and never.spread > 0  # said, not hidden


def lat(ms: float, spread: float | None = None, stable: bool | None = None) -> ProfileLatency:
    return ProfileLatency(1, 384, ms, ms * 1.1, 1000 / ms, runs=10, spread=spread, stable=stable)


def result(name: str, f1: float, ms: float, **kw) -> BuildResult:
    return BuildResult(name, "x", "-", name == "fp32", f1 - 10, f1, 30, (lat(ms, **kw),))


def test_builds_within_timing_noise_are_a_tie_won_on_f1():
    rows = [result("fp32", 80.0, 70.0), result("int8-a", 79.5, 69.0), result("int8-b", 79.0, 50.0)]
    assert build_report(rows).chosen.name == "int8-b"  # 29% faster: beyond any noise
    close = [result("fp32", 80.0, 70.0), result("int8-a", 79.5, 69.0)]  # 1.4% apart: a tie, F1 decides
    report = build_report(close)
    assert report.chosen.name == "fp32" and "a tie, won on F1" in report.verdict() and "timing noise" in report.rule
    noisy = [result("fp32", 80.0, 696.0, spread=9.0, stable=False), result("int8-a", 79.5, 32.6)]
    report = build_report(noisy)  # the first default sweep's "21.36x": a figure that is not stable decides nothing
    assert report.chosen.name == "fp32" and "int8-a faster by less than the timing noise (or not stable)" in \
        report.verdict()


def tiny_sweep(tiny, report_dir, lines, **over) -> SweepConfig:
    grid = [GridRow("fp32", fp16=False), GridRow("int8-max", int8=True, method="max")]
    cfg = dict(model=tiny["model"], calib_squad=tiny["train"], eval_squad=tiny["dev"], report_dir=report_dir,
               grid=grid, profiles=[(4, 96)], device=torch.device("cpu"), half=False, calib_num=6, eval_limit=None,
               feature_settings=SETTINGS, answer_settings=AnswerSettings(), bench_iterations=2, bench_warmup=0,
               progress=False, say=lines.append, timing_tolerance=1e9)  # real timings, never "not stable"
    cfg.update(over)
    return SweepConfig(**cfg)


def test_sweep_records_provenance_and_retimes_rows_of_another_machine(tiny, tmp_path):
    report_dir, lines = tmp_path / "r", []
    run_sweep(tiny_sweep(tiny, report_dir, lines))
    report = json.loads((report_dir / "report.json").read_text())
    meta = report["provenance"]
    for key in ("device", "model", "data", "calibration_data", "date", "commit", "timing", "timing check"):
        assert meta[key], key
    assert meta["device"].startswith("cpu: ") and "sha256" in meta["model"] and "12 questions" in meta["data"]
    assert all(lat["runs"] >= 4 and lat["stable"] for r in report["rows"] for lat in r["latency"])
    md = (report_dir / "report.md").read_text()
    assert "## Measured" in md and "- commit: " in md and "- date: " in md and "timed runs per build" in md

    # A row timed on another machine keeps its accuracy and is timed again here; one stored as not stable too.
    stored = report_dir / "rows" / "int8-max.json"
    obj = json.loads(stored.read_text())
    obj["timing_key"]["machine"]["cpu"] = "another CPU"
    stored.write_text(json.dumps(obj))
    base = report_dir / "rows" / "fp32.json"
    obj = json.loads(base.read_text())
    obj["result"]["latency"][0].update(stable=False, spread=0.5)
    base.write_text(json.dumps(obj))
    predictions = (report_dir / "predictions" / "int8-max.json").stat().st_mtime_ns
    lines.clear()
    res = run_sweep(tiny_sweep(tiny, report_dir, lines))
    text = "\n".join(lines)
    assert "row fp32: finished earlier, its accuracy reused" in text
    assert "its timing was not stable (4×96 ±50%)" in text
    assert "row int8-max: finished earlier, its accuracy reused" in text
    assert "it was timed on another machine (cpu differ): timing it again" in text
    assert res.computed == () and (report_dir / "predictions" / "int8-max.json").stat().st_mtime_ns == predictions
    assert json.loads(stored.read_text())["timing_key"]["machine"]["cpu"] != "another CPU"
    assert all(lat.stable for r in res.results for lat in r.latency)


def fake_timing(monkeypatch, figures):
    """Every timing (evaluation rows, re-timing, the final check) returns the next of `figures` (ms)."""
    import eval.measure
    import eval.sweep

    figures = iter(figures)

    def fake(forward, profiles, vocab_size, device, iterations, warmup, tolerance=None):
        ms = next(figures)
        return tuple(ProfileLatency(b, s, ms, ms, b / ms * 1e3, runs=4, spread=0.0, stable=True) for b, s in profiles)

    monkeypatch.setattr(eval.measure, "time_profiles", fake)
    monkeypatch.setattr(eval.sweep, "time_profiles", fake)


def test_a_load_change_during_the_sweep_is_timed_again(tiny, tmp_path, monkeypatch):
    """The baseline timed again at the end moved 10x (the first default sweep's rows 1-12): every row of the run is
    timed again, and the baseline then holds steady."""
    lines: list[str] = []
    fake_timing(monkeypatch, [10.0, 5.0, 100.0, 100.0, 50.0, 100.0])  # fp32, int8, check; fp32, int8 again; check
    res = run_sweep(tiny_sweep(tiny, tmp_path / "r", lines, timing_tolerance=None))
    assert any("the machine's load changed during the sweep; timing the 2 rows of this run again" in x for x in lines)
    assert lines[-2].startswith("timing check: ") and lines[-2].endswith("(±0%): steady")
    assert [r.latency[0].median_ms for r in res.results] == [100.0, 50.0] and res.report.chosen.name == "int8-max"
    assert "timing check" in load_report_json(tmp_path / "r" / "report.json").provenance


def test_a_load_that_keeps_changing_marks_the_rows_and_a_rerun_retimes_them(tiny, tmp_path, monkeypatch):
    lines: list[str] = []
    fake_timing(monkeypatch, [10.0, 5.0, 100.0, 200.0, 100.0, 400.0])  # a machine getting ever busier
    res = run_sweep(tiny_sweep(tiny, tmp_path / "r", lines, timing_tolerance=None))
    assert "they are marked not stable, so they tie with every build" in lines[-2]
    assert all(lat.stable is False for r in res.results for lat in r.latency)
    assert "timings not stable: a tie with every build, decided by F1, then latency" in res.report.verdict()
    fake_timing(monkeypatch, [10.0, 5.0, 10.0])  # a quiet machine: the rerun times both rows again
    lines.clear()
    res = run_sweep(tiny_sweep(tiny, tmp_path / "r", lines, timing_tolerance=None))
    assert sum("its timing was not stable" in line for line in lines) == 2 and res.computed == ()
    assert all(lat.stable for r in res.results for lat in r.latency) and res.report.chosen.name == "int8-max"


def test_ctrl_c_under_force_suggests_the_rerun_without_it(tiny, tmp_path):
    lines: list[str] = []

    def interrupt(name):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sweep(tiny_sweep(tiny, tmp_path / "r", lines, force=True, on_row_done=interrupt))
    assert "rerun the same command without --force to resume" in lines[-1]


# ------------------------------------------------------------------ item 3: an engine of another model

def test_an_engine_of_another_model_is_named(tiny, tmp_path, capsys):
    engine = tmp_path / "other.engine"
    code, _, err = run_main(capsys, "build", "--model", tiny["other"], "--device", "cpu", "-b", 4, "-s", 96,
                            "-o", engine)
    assert code == 0, err
    code, out, err = run_main(capsys, "eval", "--squad", tiny["dev"], "--model", tiny["model"], engine, "--device",
                              "cpu", "--no-progress", "--bench-iterations", 1, "--bench-warmup", 0, "-o",
                              tmp_path / "p.json", *FEATURES)
    assert code == 0, err
    [line] = [x for x in err.splitlines() if "built from another model" in x]
    assert line.startswith("warning: other was built from another model") and str(tiny["other"]) in line
    assert "than the baseline tiny-fp32" in line and "compare two models" in line


# ------------------------------------------------------------------ items 5 and 6: infer's passage

def test_a_latin1_passage_is_refused_unless_its_encoding_is_named(tiny, tmp_path, capsys):
    passage = tmp_path / "p.txt"
    passage.write_bytes("paris is the capital of france, café.".encode("latin-1"))
    code, out, err = run_main(capsys, "infer", "--model", tiny["model"], "--device", "cpu", "-pf", passage, "-q",
                              "what is the capital of france?")
    assert code == 2 and out == "" and "Traceback" not in err
    [line] = [x for x in err.splitlines() if x.startswith("error: ")]
    assert "p.txt: passage file is not utf-8 text (byte 35: 0xe9)" in line and "--encoding" in line
    code, out, err = run_main(capsys, "infer", "--model", tiny["model"], "--device", "cpu", "-pf", passage, "-q",
                              "what is the capital of france?", "--encoding", "latin-1")
    assert code == 0 and "\ufffd" not in out and out.count("Answer:") == 1, err


def test_an_interactive_passage_spans_lines(tiny, capsys, monkeypatch):
    code, out, err = run_main(capsys, "infer", "--model", tiny["model"], "--device", "cpu",
                              stdin="paris is the capital\nof france.\n\nwhat is the capital?\nwho was king?\n\n",
                              monkeypatch=monkeypatch)
    assert code == 0, err
    assert "Type the passage: it may span several lines; an empty line ends it" in err
    assert out.count("Answer:") == 2 and "Question: what is the capital?" in out and "Question: of france." not in out


# ------------------------------------------------------------------ item 7: SQuAD v2.0 with a v1.1 model

def test_v2_file_scored_by_a_model_that_never_says_no_answer(tiny, tmp_path, capsys):
    doc = json.loads(Path(tiny["dev"]).read_text())
    doc["version"] = "v2.0"
    qas = doc["data"][0]["paragraphs"][0]["qas"]
    qas[0].update(answers=[], is_impossible=True)
    v2 = tmp_path / "dev-v2.json"
    v2.write_text(json.dumps(doc))
    code, out, err = run_main(capsys, "eval", "--squad", v2, "--model", tiny["model"], "--device", "cpu",
                              "--no-progress", "--null-score-diff-threshold", "1e9", "-o", tmp_path / "p.json",
                              *FEATURES)
    assert code == 0, err
    assert "NoAns EM 0.00 F1 0.00 (1)" in out
    [line] = [x for x in err.splitlines() if "never predicts" in x]
    assert line.startswith("warning: the model answered all 1 unanswerable questions") and "SQuAD v1.1" in line


# ------------------------------------------------------------------ item 8: unwritable outputs fail first

@pytest.mark.parametrize("flag, words", [("-o", "folder of the -o predictions file"),
                                         ("--metrics-json", "folder of the --metrics-json file"),
                                         ("--report-dir", "--report-dir folder")])
def test_unwritable_outputs_are_refused_before_the_work(tiny, tmp_path, capsys, flag, words):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    target = blocker / ("r" if flag == "--report-dir" else "out.json")
    t0 = time.perf_counter()
    assert_one_line_error_in_process(capsys, "eval", "--squad", tiny["dev"], "--model", tiny["model"], "--device",
                                     "cpu", "--no-progress", flag, target, *FEATURES, words=words)
    assert time.perf_counter() - t0 < 5  # nothing was evaluated


# ------------------------------------------------------------------ item 9: memory

def test_a_build_that_cannot_fit_in_memory_is_refused(tiny, tmp_path, capsys):
    from eval.runnables import forward_bytes, memory_available
    from model.config import BertConfig
    from quant.policy import PrecisionPolicy

    cfg = BertConfig(hidden_size=384, num_layers=6, num_heads=12, intermediate_size=1536)  # the MiniLM
    need = forward_bytes(cfg, PrecisionPolicy(), 100_000, 384, 22_000_000)
    assert need > 700 * 2**30  # the attention scores alone: 100,000 x 12 x 384 x 384 floats
    assert forward_bytes(cfg, PrecisionPolicy(fp16=True), 64, 384, 0) < 1 * 2**30
    assert memory_available(torch.device("cpu"))[0] > 0
    assert_one_line_error_in_process(capsys, "build", "--model", tiny["model"], "--device", "cpu", "-b", 100000, "-s",
                                     384, "-o", tmp_path / "big.engine", words="profile 100000x384: one forward needs")
    assert not (tmp_path / "big.engine").exists()


@pytest.mark.parametrize("error", [torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 708.00 GiB"),
                                   RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 7"),
                                   MemoryError()])
def test_out_of_memory_at_run_time_is_one_line(monkeypatch, capsys, error):
    import eval.benchmark

    def runs_out(*a, **k):
        raise error
        yield

    monkeypatch.setattr(eval.benchmark, "bench_engine_file", runs_out)
    assert_one_line_error_in_process(capsys, "bench", "-e", "x.engine", words="error: out of memory"[7:])
    monkeypatch.setattr(eval.benchmark, "bench_engine_file", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("bug")))
    with pytest.raises(RuntimeError, match="bug"):  # other errors are not dressed up as memory
        cli.main(["bench", "-e", "x.engine"])


# ------------------------------------------------------------------ item 10: the TensorRT demo's vocabulary

def test_the_tensorrt_demo_spellings_parse_and_show_in_help():
    parse = cli.build_parser().parse_args
    b = parse(["build", "-c", "DIR", "-v", "v.txt", "-tcf", "t.json", "-o", "x.engine"])
    assert (b.model, b.vocab_file, b.timing_cache) == ("DIR", "v.txt", "t.json")
    assert parse(["build", "--config-dir", "D", "--timing-cache-file", "t", "-o", "x"]).model == "D"
    assert parse(["eval", "-sq", "dev.json", "x.engine"]).squad == "dev.json"
    assert parse(["eval", "--squad-json", "dev.json", "x.engine"]).squad == "dev.json"
    assert parse(["infer", "-sq", "dev.json", "-e", "x.engine"]).squad == "dev.json"
    assert parse(["calibrate", "--squad-json", "t.json", "-c", "D", "-o", "c.json"]).squad == "t.json"
    helps = {v: cli.build_parser()._subparsers._group_actions[0].choices[v].format_help()
             for v in ("build", "eval", "infer")}
    assert "-tcf" in helps["build"] and "--config-dir" in helps["build"] and "--vocab-file" in helps["build"]
    assert "-sq" in helps["eval"] and "--squad-json" in helps["infer"] and "-c DIR" in helps["infer"]


def test_a_short_window_gets_a_stride_that_fits(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    vocab = tmp_path / "vocab.txt"
    vocab.write_bytes((Path(tiny["model"]) / "vocab.txt").read_bytes())
    code, out, err = run_main(capsys, "infer", "-c", tiny["model"], "-v", vocab, "--device", "cpu", "-s", 128, "-p",
                              "paris is the capital of france", "-q", "what is the capital?")
    assert code == 0, err
    [line] = [x for x in err.splitlines() if "doc-stride" in x]
    assert line == ("warning: --doc-stride 128 (the default) does not fit the 61 context tokens of a 128-token window "
                    "(after up to 64 question tokens): using --doc-stride 30")
    code, out, err = run_main(capsys, "infer", "--model", tiny["model"], "--device", "cpu", "-sq", tiny["dev"],
                              *FEATURES)
    assert code == 0 and out.startswith("EM ") and (tmp_path / "predictions.json").exists(), err


VOCAB_VERBS = {"sweep": [], "sensitivity": ["--calib-cache", "c.json"], "qat": ["-sq", "t.json", "--calib-cache",
                                                                            "c.json", "-o", "out"],
               "finetune": ["-sq", "t.json", "-o", "out"], "prune": ["-sq", "t.json", "-o", "out"]}


def test_the_training_and_analysis_verbs_take_the_demo_vocab_too():
    """-v/--vocab-file in every verb that reads a model folder's tokenizer, not only calibrate/eval/infer/build."""
    parse = cli.build_parser().parse_args
    for verb, rest in VOCAB_VERBS.items():
        assert parse([verb, "-c", "DIR", "-v", "v.txt", *rest]).vocab_file == "v.txt", verb
        assert parse([verb, "--model", "DIR", *rest]).vocab_file is None
        assert "-v FILE, --vocab-file FILE" in cli.build_parser()._subparsers._group_actions[0].choices[verb] \
            .format_help(), verb


@pytest.fixture(scope="module")
def wrong_vocab(tiny):
    """The tiny model's vocabulary with two tokens more than its vocab_size, and a calibration cache for it."""
    vocab = tiny["root"] / "too-big.txt"
    tokens = (Path(tiny["model"]) / "vocab.txt").read_text().splitlines()
    vocab.write_text("\n".join([*tokens, "extra1", "extra2"]) + "\n")
    calib = tiny["root"] / "vocab-calib.json"
    assert cli.main(["calibrate", "-sq", str(tiny["train"]), "-c", str(tiny["model"]), "--calib-num", "4",
                     "--method", "max", "--device", "cpu", "-o", str(calib), "--no-progress", *FEATURES]) == 0
    return vocab, calib, len(tokens)


@pytest.mark.parametrize("verb", list(VOCAB_VERBS))
def test_a_vocab_of_another_size_is_one_line_before_any_work(tiny, wrong_vocab, tmp_path, capsys, monkeypatch, verb):
    vocab, calib, size = wrong_vocab
    monkeypatch.chdir(tmp_path)
    rest = {"sweep": ["--calib-squad", tiny["train"], "--eval-squad", tiny["dev"], "--report-dir", "r",
                      "--methods", "max"],
            "sensitivity": ["--calib-cache", calib, "-sq", tiny["dev"]],
            "qat": ["-sq", tiny["train"], "--calib-cache", calib, "-o", "out"],
            "finetune": ["-sq", tiny["train"], "-o", "out"], "prune": ["-sq", tiny["train"], "-o", "out"]}[verb]
    assert_one_line_error_in_process(capsys, verb, "-c", tiny["model"], "-v", vocab, "--device", "cpu",
                                     "--no-progress", *rest, *FEATURES[2:],
                                     words=f"too-big.txt has {size + 2} tokens but the model's config.json says "
                                           f"vocab_size {size}: the vocabulary does not belong to this model")
    assert not (tmp_path / "out" / "model.safetensors").exists() and not (tmp_path / "r" / "rows").exists()


# ------------------------------------------------------------------ item 11: -b/-s pair up in every verb

def test_build_and_bench_pair_batch_and_length_in_order(tiny, tmp_path, capsys):
    from engines.engine_file import Profile
    from eval.benchmark import bench_shapes

    engine = tmp_path / "two.engine"
    code, out, err = run_main(capsys, "build", "--model", tiny["model"], "--device", "cpu", "-b", 1, "-s", 32, "-b", 4,
                              "-s", 96, "-o", engine)
    assert code == 0, err
    assert "profiles 1x32, 4x96" in out  # two profiles, not every combination
    from engines.engine_file import read_header

    header = read_header(engine)
    assert f"engine built in {header.build_seconds:.2f} s (the build time reports show)" in out  # item 13
    profiles = [Profile(1, 32), Profile(4, 96)]
    assert bench_shapes(profiles, [1, 4], [32, 96]) == profiles
    assert bench_shapes(profiles, [2], [32, 96]) == [Profile(2, 32), Profile(2, 96)]
    assert bench_shapes(profiles, None, [16]) == [Profile(1, 16), Profile(4, 16)]


# ------------------------------------------------------------------ item 13: the rest

def test_sensitivity_speaks_delta_f1_and_ranks_only_real_costs():
    from eval.sensitivity import Measurement, SensitivityResult, Suggestion, render_markdown, render_text

    base = Measurement("baseline", "baseline", None, "--fp16", 0, 80.0, 90.0, 100, 0.0, 0.0)
    only = {"layer0.qkv": 0.5, "layer0.attn_out": 0.0, "layer0.fc1": -0.2, "layer0.fc2": 0.001}
    sug = Suggestion(1.0, ("layer0.qkv",), 0.0, replace(base, name="suggested", f1=89.9), 0.1, True)
    settings = dict(model="m", calib_cache="c.json", calibration="max", squad="d.json", device="cuda",
                    precision="fp16", iln=False, imh=False)
    r = SensitivityResult(settings, (0,), 1, base, replace(base, name="all-int8", f1=89.3), None, only, {}, None,
                          sug, (base,))
    text, md = render_text(r), render_markdown(r, None, None)
    assert "ΔF1 (points, negative = worse) when only that GEMM is INT8" in text
    table_row = next(line for line in text.splitlines() if line.startswith("layer0 "))
    assert table_row.split()[1:] == ["-0.50", "0.00", "+0.20", "0.00"]
    ranked = text[text.index("most sensitive GEMMs"):text.index("mixed-precision")]
    assert "layer0.qkv" in ranked and "-0.50" in ranked
    assert "attn_out" not in ranked and "fc1" not in ranked and "fc2" not in ranked  # 0.00 and gains: not ranked
    assert "keep layer0.qkv out of INT8 (1 GEMM), in FP16 (--keep-fp16)" in text and "estimated ΔF1" in text
    assert "| 1 | layer0.qkv | -0.50 |" in md and "| 2 |" not in md and "+0.50" not in md


def test_help_examples_keep_their_line_continuations_and_the_top_level_has_some():
    texts = {"": cli.build_parser().format_help()}
    texts.update({v: p.format_help() for v, p in cli.build_parser()._subparsers._group_actions[0].choices.items()})
    assert "examples" in texts[""] and "python cli.py sweep" in texts[""] and "-tcf" in texts[""]
    for verb, text in texts.items():
        lines = text[text.index("\nexamples"):].splitlines()
        assert any(line.lstrip().startswith("python cli.py") for line in lines), verb
        for line, following in zip(lines, lines[1:]):
            continued = following.startswith("      ") and not following.lstrip().startswith("#")
            if line.lstrip().startswith("python cli.py") and continued:
                assert line.endswith("\\"), (verb, line)


def test_fp16_on_the_cpu_warns(tiny, tmp_path, capsys):
    code, out, err = run_main(capsys, "eval", "--squad", tiny["dev"], "--model", tiny["model"], "--device", "cpu",
                              "--precision", "fp16", "--limit", 2, "--no-progress", "-o", tmp_path / "p.json",
                              *FEATURES)
    assert code == 0, err
    assert "warning: FP16 on the CPU is emulated and several times slower than FP32" in err


def test_predictions_in_the_working_directory_are_ignored_by_git():
    for name in ("predictions.json", "predictions.tiny.json", "predictions.nbest.json", "metrics.json"):
        proc = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", name])
        assert proc.returncode == 0, name
