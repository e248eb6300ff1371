"""The eval comparison report: selection rule, Δ/speed-up arithmetic, Pareto front, and the files it writes."""
from __future__ import annotations

import csv
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from common.errors import WorkbenchError
from eval.report import (
    REPORT_FILES,
    BuildResult,
    ProfileLatency,
    build_report,
    choose,
    common_profiles,
    default_profile,
    load_report_json,
    pareto_front,
    parse_profile,
    render_markdown,
    render_text,
    report_to_json,
    speedup,
    write_csv,
    write_json,
    write_report_dir,
)

ROOT = Path(__file__).resolve().parent.parent


def lat(b: int, s: int, median: float, p99: float | None = None) -> ProfileLatency:
    return ProfileLatency(b, s, median, p99 if p99 is not None else median * 1.1, b / (median / 1e3))


def row(name: str, f1: float, ms: dict[tuple[int, int], float], *, em: float | None = None, base: bool = False,
        n: int = 1000, **over) -> BuildResult:
    return BuildResult(name=name, options="fp16" if base else "int8 fp16",
                       calibration="-" if base else "entropy (100 q)",
                       is_baseline=base, exact_match=em if em is not None else f1 - 9.0, f1=f1, n_questions=n,
                       latency=tuple(lat(b, s, m) for (b, s), m in ms.items()), **over)


def fleet() -> list[BuildResult]:
    return [
        row("fp16", 82.88, {(1, 128): 1.0, (64, 384): 20.0}, em=73.77, base=True, engine_bytes=90_000_000,
            build_s=12.5, predictions_file="pred_fp16.json"),
        row("int8", 82.10, {(1, 128): 0.8, (64, 384): 16.0}, em=73.10, engine_bytes=50_000_000, build_s=30.0),
        row("int8-iln", 81.88, {(1, 128): 0.9, (64, 384): 12.5}, em=72.50),   # exactly at the -1.0 budget
        row("int8-iln-imh", 79.90, {(1, 128): 0.5, (64, 384): 10.0}, em=70.00),  # fastest, too inaccurate
    ]


# ------------------------------------------------------------------------------------------------ selection

def test_fastest_within_budget_is_chosen_and_boundary_qualifies():
    rows = fleet()
    assert choose(rows, 1.0).name == "int8-iln"          # ΔF1 = -1.00 exactly: inside
    assert choose(rows, 0.99).name == "int8"             # int8-iln now outside
    assert choose(rows, 5.0).name == "int8-iln-imh"      # everything inside: the fastest


def test_boundary_survives_float_rounding():
    # 82.57 - 82.87 = -0.30000000000001137 in binary floating point; a drop of exactly 0.3 must still qualify.
    rows = [row("fp16", 82.87, {(1, 128): 2.0}, base=True), row("q", 82.57, {(1, 128): 1.0}),
            row("r", 82.5699, {(1, 128): 0.5})]
    assert choose(rows, 0.3).name == "q"
    assert choose(rows, 0.3001).name == "r"


def test_ties_go_to_higher_f1_then_name():
    rows = [row("fp16", 80.0, {(8, 128): 4.0}, base=True), row("b", 79.5, {(8, 128): 2.0}),
            row("a", 79.5, {(8, 128): 2.0}), row("c", 79.2, {(8, 128): 2.0})]
    assert choose(rows, 1.0).name == "a"  # same latency, same F1 as b: name
    rows.append(row("d", 79.8, {(8, 128): 2.0}))
    assert choose(rows, 1.0).name == "d"  # same latency, higher F1


def test_only_baseline_qualifies():
    rows = [row("fp16", 82.0, {(1, 128): 1.0}, base=True), row("int8-max", 78.0, {(1, 128): 0.5}),
            row("int8-pct", 79.5, {(1, 128): 0.6})]
    report = build_report(rows, 1.0)
    assert report.chosen.name == "fp16"
    assert choose(rows, 1.0).name == "fp16"
    verdict = report.verdict()
    assert verdict.startswith("chosen: fp16 — fastest within ΔF1 ≥ -1 at 1×128")
    assert "no INT8 or FP8 build is within the budget" in verdict and "int8-pct at ΔF1 -2.50" in verdict
    assert render_text(report).rstrip().endswith(verdict)


def test_baseline_chosen_when_it_is_fastest():
    rows = [row("fp16", 82.0, {(1, 128): 1.0}, base=True), row("int8", 81.5, {(1, 128): 1.2})]
    report = build_report(rows, 1.0)
    assert report.chosen.name == "fp16"
    assert "1 other build(s) within budget, none faster" in report.verdict()


def test_baseline_alone():
    rows = [row("fp16", 82.0, {(1, 128): 1.0}, base=True)]
    assert choose(rows, 0.0).name == "fp16"
    assert choose([], 1.0) is None


@pytest.mark.parametrize("rows, message", [
    ([row("a", 80.0, {(1, 128): 1.0}), row("b", 80.0, {(1, 128): 1.0})], "no baseline row"),
    ([row("a", 80.0, {(1, 128): 1.0}, base=True), row("b", 80.0, {(1, 128): 1.0}, base=True)],
     "more than one baseline row (a, b)"),
    ([row("a", 80.0, {(1, 128): 1.0}, base=True), row("a", 79.0, {(1, 128): 1.0})],
     "build name 'a' is used by more than one row"),
    ([row("a", 80.0, {(1, 128): 1.0}, base=True), row("b", 79.0, {(8, 128): 1.0})],
     "the builds share no timed profile (a: 1×128; b: 8×128)"),
    ([row("a", 80.0, {(1, 128): 1.0}, base=True), row("b", 79.0, {})], "b: none"),
    ([row("a", 80.0, {(1, 128): 1.0}, base=True), row("b", 79.0, {(1, 128): 1.0}, n=999)],
     "different question counts (999, 1000)"),
])
def test_invalid_row_sets_raise_one_clear_error(rows, message):
    with pytest.raises(WorkbenchError) as e:
        choose(rows, 1.0)
    assert message in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(WorkbenchError):
        build_report(rows, 1.0)


def test_budget_must_be_non_negative():
    with pytest.raises(WorkbenchError, match="max-f1-drop"):
        choose(fleet(), -0.5)
    with pytest.raises(WorkbenchError, match="max-f1-drop"):
        build_report(fleet(), float("nan"))


def test_default_profile_is_largest_common_product():
    rows = fleet()
    assert default_profile(rows) == (64, 384)
    # 128x384 exists only for one row, so it cannot be the default.
    rows[1] = dataclasses.replace(rows[1], latency=rows[1].latency + (lat(128, 384, 30.0),))
    assert common_profiles(rows) == ((1, 128), (64, 384))
    assert default_profile(rows) == (64, 384)
    # Equal products: the larger batch.
    same = [row("fp16", 80.0, {(2, 256): 1.0, (4, 128): 1.0, (1, 128): 0.1}, base=True),
            row("q", 80.0, {(2, 256): 1.0, (4, 128): 1.0})]
    assert default_profile(same) == (4, 128)


def test_explicit_profile_changes_the_choice_and_must_be_timed_everywhere():
    rows = fleet()
    assert choose(rows, 1.0, profile=(1, 128)).name == "int8"  # 0.8 ms beats int8-iln's 0.9 ms at batch 1
    report = build_report(rows, 1.0, profile=(1, 128))
    assert report.profile == (1, 128) and report.profile_requested == (1, 128)
    assert "(given)" in report.rule
    with pytest.raises(WorkbenchError, match=r"profile 128×384 was not timed for fp16, int8"):
        choose(rows, 1.0, profile=(128, 384))


def test_parse_profile():
    assert parse_profile("64x384") == (64, 384)
    assert parse_profile(" 1×128 ") == (1, 128)
    for bad in ("64", "0x128", "ax3", "64x384x2"):
        with pytest.raises(WorkbenchError, match="BATCHxSEQ_LEN"):
            parse_profile(bad)


def test_row_validation():
    with pytest.raises(WorkbenchError, match="median_ms must be > 0"):
        ProfileLatency(1, 128, 0.0, 1.0, 1.0)
    with pytest.raises(WorkbenchError, match="profile 1×128 timed twice"):
        BuildResult("x", "fp16", "-", True, 70.0, 80.0, 10, (lat(1, 128, 1.0), lat(1, 128, 2.0)))
    with pytest.raises(WorkbenchError, match="f1 must be a finite number"):
        row("x", float("nan"), {(1, 128): 1.0}, em=70.0)


def test_profile_latency_from_benchmark_latency():
    class Latency:  # the shape of eval.benchmark.Latency, without importing torch
        batch, seq_len, median_ms, p99_ms, sequences_per_s = 8, 128, 2.0, 2.5, 4000.0

    assert ProfileLatency.from_latency(Latency()) == ProfileLatency(8, 128, 2.0, 2.5, 4000.0)


# ------------------------------------------------------------------------------------------------ arithmetic

def test_deltas_and_speedups():
    report = build_report(fleet(), 1.0)
    c = report.comparison("int8")
    assert c.delta_em == pytest.approx(73.10 - 73.77)
    assert c.delta_f1 == pytest.approx(82.10 - 82.88)
    assert c.within_budget
    assert c.speedup_at((64, 384)) == pytest.approx(20.0 / 16.0)
    assert c.speedup_at((1, 128)) == pytest.approx(1.0 / 0.8)
    assert c.speedup_at((128, 384)) is None
    base = report.comparison("fp16")
    assert (base.delta_em, base.delta_f1, base.speedup_at((64, 384))) == (0.0, 0.0, 1.0)
    assert not report.comparison("int8-iln-imh").within_budget
    assert report.comparison("int8-iln").within_budget


def test_speedup_is_none_where_the_baseline_was_not_timed():
    rows = fleet()
    extra = dataclasses.replace(rows[1], latency=rows[1].latency + (lat(128, 384, 30.0),))
    assert speedup(extra, rows[0], (128, 384)) is None
    assert speedup(extra, rows[0], (1, 128)) == pytest.approx(1.25)


# ----------------------------------------------------------------------------------------------- Pareto front

def test_pareto_front_hand_made():
    rows = [
        row("base", 82.0, {(1, 128): 10.0}, base=True),
        row("fast", 78.0, {(1, 128): 2.0}),
        row("mid", 80.0, {(1, 128): 5.0}),
        row("worse-mid", 79.0, {(1, 128): 6.0}),      # slower and less accurate than mid
        row("tie-latency", 79.5, {(1, 128): 5.0}),    # as fast as mid, lower F1
        row("tie-f1", 80.0, {(1, 128): 7.0}),         # as accurate as mid, slower
        row("slow-best", 82.5, {(1, 128): 12.0}),     # slower than base but more accurate: on the front
        row("untimed", 99.0, {(8, 128): 1.0}),        # not timed at 1x128: ignored
    ]
    assert [r.name for r in pareto_front(rows, (1, 128))] == ["fast", "mid", "base", "slow-best"]
    twin = row("mid-twin", 80.0, {(1, 128): 5.0})
    assert [r.name for r in pareto_front(rows + [twin], (1, 128))] == ["fast", "mid", "mid-twin", "base",
                                                                       "slow-best"]
    assert [r.name for r in pareto_front(rows, (8, 128))] == ["untimed"]


def test_report_front_uses_selection_profile():
    report = build_report(fleet(), 1.0)
    assert [r.name for r in report.front] == ["int8-iln-imh", "int8-iln", "int8", "fp16"]


# ------------------------------------------------------------------------------------------------- rendering

def test_render_text_columns_and_marker():
    report = build_report(fleet(), 1.0)
    text = render_text(report)
    lines = text.splitlines()
    header, body = lines[0], lines[1:5]
    for col in ("build", "options", "calibration", "EM", "F1", "ΔEM", "ΔF1", "64×384 median/p99 ms",
                "64×384 seq/s", "64×384 speed-up", "1×128 speed-up", "engine MiB", "build s"):
        assert col in header
    # Right-aligned numeric columns end where their header ends.
    f1_end = header.index(" F1 ") + 3
    assert [line[f1_end - 5:f1_end] for line in body] == ["82.88", "82.10", "81.88", "79.90"]
    speed_end = header.index("64×384 speed-up") + len("64×384 speed-up")
    assert [line[:speed_end].split()[-1] for line in body] == ["1.00x", "1.25x", "1.60x", "2.00x"]
    chosen = [line for line in body if line.startswith("*")]
    assert len(chosen) == 1 and chosen[0].split()[1] == "int8-iln"
    assert "-1.00" in chosen[0] and "-1.27" in chosen[0]   # ΔF1, ΔEM
    assert "85.8" in body[0] and "12.5" in body[0]         # engine MiB (90,000,000 bytes), build s
    assert body[2].rstrip().endswith("-        -")          # unknown size and build time
    assert lines[-1] == "chosen: int8-iln — fastest within ΔF1 ≥ -1 at 64×384 (1.60x the baseline fp16)"
    assert "1,000 questions" in text


def test_markdown_table_parses_back():
    report = build_report(fleet(), 1.0)
    md = render_markdown(report, image="pareto.png")
    table = [line for line in md.splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in table]
    header, sep, body = cells[0], cells[1], cells[2:]
    assert len(body) == 4 and all(len(r) == len(header) for r in cells)
    assert sep[header.index("F1")] == "---:" and sep[header.index("build")] == "---"
    by_name = {r[header.index("build")]: r for r in body}
    assert by_name["int8-iln"][0] == "*" and by_name["fp16"][0] == ""
    assert by_name["int8"][header.index("ΔF1")] == "-0.78"
    assert by_name["int8-iln-imh"][header.index("64×384 speed-up")] == "2.00x"
    assert by_name["fp16"][header.index("64×384 median/p99 ms")] == "20.000/22.000"
    assert "**chosen: int8-iln" in md and "![F1 against latency at 64×384](pareto.png)" in md


def test_csv_parses_back(tmp_path):
    report = build_report(fleet(), 1.0)
    path = tmp_path / "r.csv"
    write_csv(report, path)
    with open(path, newline="", encoding="utf-8") as f:
        got = list(csv.DictReader(f))
    assert [r["name"] for r in got] == ["fp16", "int8", "int8-iln", "int8-iln-imh"]
    by = {r["name"]: r for r in got}
    assert by["int8-iln"]["chosen"] == "True" and by["int8"]["chosen"] == "False"
    assert by["int8-iln-imh"]["within_budget"] == "False"
    assert float(by["int8"]["delta_f1"]) == pytest.approx(-0.78)
    assert float(by["int8"]["64x384_speedup"]) == pytest.approx(1.25)
    assert float(by["int8"]["1x128_median_ms"]) == 0.8
    assert float(by["fp16"]["64x384_p99_ms"]) == pytest.approx(22.0)
    assert by["fp16"]["engine_bytes"] == "90000000" and by["int8-iln"]["engine_bytes"] == ""
    assert by["fp16"]["predictions_file"] == "pred_fp16.json"


def test_json_round_trip(tmp_path):
    rows = fleet()
    rows[1] = dataclasses.replace(rows[1], latency=rows[1].latency + (lat(128, 384, 30.0),))
    report = build_report(rows, 0.8)
    path = tmp_path / "r.json"
    write_json(report, path)
    obj = json.loads(path.read_text(encoding="utf-8"))
    assert obj["chosen"] == "int8" and obj["rule"]["max_f1_drop"] == 0.8
    assert obj["rule"]["profile"] == [64, 384] and obj["rule"]["profile_requested"] is None
    assert [c["within_budget"] for c in obj["comparisons"]] == [True, True, False, False]
    back = load_report_json(path)
    assert back == report
    assert back.rows == tuple(rows)
    assert all(BuildResult.from_json(r.to_json()) == r for r in rows)
    assert report_to_json(back) == obj


def test_json_keeps_a_requested_profile_and_reloads_from_rows(tmp_path):
    report = build_report(fleet(), 1.0, profile=(1, 128))
    path = tmp_path / "r.json"
    write_json(report, path)
    back = load_report_json(path)
    assert back.profile_requested == (1, 128) and back.chosen.name == "int8"
    # A resumed sweep adds a row and recomputes the tables from the stored ones.
    more = build_report(back.rows + (row("int8-pct", 82.5, {(1, 128): 0.6, (64, 384): 15.0}),), 1.0, (1, 128))
    assert more.chosen.name == "int8-pct"


@pytest.mark.parametrize("edit, message", [
    (lambda o: o.pop("rows"), "missing field 'rows'"),
    (lambda o: o.update(format_version=99), "format version 99 is not supported"),
    (lambda o: o.update(format="something else"), "not an eval report"),
    (lambda o: o["rows"][1].update(f1="high"), "field 'f1' has the wrong type"),
    (lambda o: o["rows"][1].update(n_questions=True), "field 'n_questions' has the wrong type"),
    (lambda o: o["rows"][1]["latency"][0].pop("median_ms"), "latency[0]: missing field 'median_ms'"),
    (lambda o: o["rows"][0].update(is_baseline=False), "no baseline row"),
])
def test_damaged_json_is_refused_in_one_line(tmp_path, edit, message):
    path = tmp_path / "r.json"
    obj = report_to_json(build_report(fleet(), 1.0))
    edit(obj)
    path.write_text(json.dumps(obj), encoding="utf-8")
    with pytest.raises(WorkbenchError) as e:
        load_report_json(path)
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value) and "\n" not in str(e.value)


def test_malformed_json_names_the_file(tmp_path):
    path = tmp_path / "r.json"
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(WorkbenchError, match="malformed eval report"):
        load_report_json(path)
    with pytest.raises(WorkbenchError, match="eval report not found"):
        load_report_json(tmp_path / "missing.json")


def test_write_report_dir_writes_four_files_and_no_temporaries(tmp_path):
    report = build_report(fleet(), 1.0)
    out = tmp_path / "report"
    paths = write_report_dir(report, out)
    assert sorted(p.name for p in out.iterdir()) == sorted(REPORT_FILES)
    assert set(paths) == set(REPORT_FILES) and all(p.parent == out for p in paths.values())
    assert paths["pareto.png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert paths["pareto.png"].stat().st_size > 10_000
    assert load_report_json(paths["report.json"]) == report
    assert "![F1 against latency at 64×384](pareto.png)" in paths["report.md"].read_text(encoding="utf-8")
    write_report_dir(report, out)  # overwriting leaves nothing behind either
    assert sorted(p.name for p in out.iterdir()) == sorted(REPORT_FILES)


def test_importing_report_does_not_import_matplotlib():
    code = "import sys, eval.report; print('matplotlib' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
