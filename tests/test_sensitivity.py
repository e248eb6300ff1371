"""The sensitivity analysis (eval/sensitivity.py, `cli.py sensitivity`): the variant policies, the greedy suggestion
and its refinement, the files written, and the verb end to end on a tiny model and on the vendored MiniLM (CPU)."""
from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from calib.calibrate import CalibrationSpec, calibrate, load_calibration_model
from quant.policy import GEMMS, PrecisionPolicy
from common.errors import WorkbenchError
from data.answers import AnswerSettings
from data.features import FeatureSettings
from data.squad import parse_question_limit as parse_limit
from data.squad import load_squad
from eval.sensitivity import (
    FILES,
    Measurement,
    SensitivityConfig,
    SensitivityResult,
    Suggestion,
    Variant,
    _suggest,
    all_gemms,
    compact_keep_list,
    greedy_keep,
    load_result,
    parse_layers,
    parse_options,
    plan_variants,
    render_markdown,
    render_text,
    run_sensitivity,
    write_report,
)
from eval.sweep import DEFAULT_CALIB_SQUAD, DEFAULT_MODEL
from tests.test_calib_calibrate import make_tiny_model, write_squad
from tests.test_sweep import assert_one_line_error_in_process

SETTINGS = FeatureSettings(max_seq_length=96, doc_stride=32, max_query_length=16)
PNG = b"\x89PNG\r\n\x1a\n"


def quantized(policy: PrecisionPolicy, layers: int) -> set[str]:
    return {f"layer{i}.{k}" for i in range(layers) for k in GEMMS if policy.quantizes_gemm(i, k)}


# ------------------------------------------------------------------------------------------------ variants

def test_each_only_variant_quantizes_exactly_its_gemm():
    layers = 3
    variants = plan_variants(layers, floor=True, leave_one_out=True)
    by_method: dict[str, list[Variant]] = {}
    for v in variants:
        by_method.setdefault(v.method, []).append(v)
    assert [v.name for v in variants[:3]] == ["baseline", "all-int8", "options-only"]
    assert len(by_method["only"]) == len(by_method["leave-one-out"]) == layers * 4
    assert len(by_method["group"]) == layers + 4
    for half, iln, imh in ((False, False, False), (True, True, False), (True, False, True)):
        policy = lambda v: v.policy(layers, half, iln, imh)  # noqa: E731
        base = policy(by_method["baseline"][0])
        assert not base.int8 and base.fp16 == half and base.quantized_sites(layers) == ()
        assert quantized(policy(by_method["all-int8"][0]), layers) == set(all_gemms(layers))
        floor = policy(by_method["options-only"][0])
        assert quantized(floor, layers) == set() and (floor.iln, floor.imh) == (iln, imh)
        for v in by_method["only"]:
            p = policy(v)
            assert p.int8 and p.fp16 == half and (p.iln, p.imh) == (iln, imh)
            assert quantized(p, layers) == {v.target}, v.name
            if not (iln or imh):  # plain --int8: exactly the GEMM's input site is quantized
                layer, kind = int(v.target[5]), v.target.split(".")[1]
                assert p.quantized_sites(layers) == (p.gemm_input_site(layer, kind),)
        for v in by_method["leave-one-out"]:
            assert quantized(policy(v), layers) == set(all_gemms(layers)) - {v.target}
        groups = {v.target: quantized(policy(v), layers) for v in by_method["group"]}
        assert groups["layer1"] == {"layer1.qkv", "layer1.attn_out", "layer1.fc1", "layer1.fc2"}
        assert groups["fc2"] == {"layer0.fc2", "layer1.fc2", "layer2.fc2"}


def test_variants_of_some_layers():
    variants = plan_variants(6, [0, 5], groups=True)
    only = [v.target for v in variants if v.method == "only"]
    assert only == [f"layer{i}.{k}" for i in (0, 5) for k in GEMMS]
    groups = {v.target: set(v.int8_gemms) for v in variants if v.method == "group"}
    assert groups["fc1"] == {"layer0.fc1", "layer5.fc1"} and set(groups) == {"layer0", "layer5", *GEMMS}
    one = plan_variants(6, [2])  # one layer: kind groups would repeat its cells
    assert {v.target for v in one if v.method == "group"} == {"layer2"}
    assert [v.method for v in plan_variants(2, groups=False)].count("group") == 0


def test_argument_parsing():
    assert parse_layers(None, 6) == parse_layers("all", 6) == (0, 1, 2, 3, 4, 5)
    assert parse_layers("5,0-2", 6) == (0, 1, 2, 5)
    for bad, words in (("6", "layer 6 does not exist"), ("a", "give layer numbers"), ("3-1", "runs backwards")):
        with pytest.raises(WorkbenchError, match=words):
            parse_layers(bad, 6)
    assert parse_options(None) == (False, False)
    assert parse_options(["iln"]) == (True, False) and parse_options(["-iln -imh"]) == (True, True)
    assert parse_options(["plain"]) == (False, False) and parse_options(["iln-imh"]) == (True, True)
    with pytest.raises(WorkbenchError, match="--options 'x'"):
        parse_options(["x"])
    assert parse_limit(None) is None and parse_limit("all") is None and parse_limit("7") == 7
    with pytest.raises(WorkbenchError, match="--limit '0'"):
        parse_limit("0")
    with pytest.raises(WorkbenchError, match="--eval-limit 'x'"):
        parse_limit("x", "--eval-limit")
    assert compact_keep_list(["layer1.fc2", "layer0.fc2", "layer1.qkv"], 2) == ("fc2", "layer1.qkv")
    assert compact_keep_list(["layer1.fc2", "layer0.qkv"], 2) == ("layer0.qkv", "layer1.fc2")


# ------------------------------------------------------------------------------------------------ suggestion

DROPS = {  # a hand-made 2-layer drop matrix (F1 points when only that GEMM is INT8)
    "layer0.qkv": 0.1, "layer0.attn_out": -0.3, "layer0.fc1": 0.2, "layer0.fc2": 2.0,
    "layer1.qkv": 0.0, "layer1.attn_out": 0.4, "layer1.fc1": 1.0, "layer1.fc2": 0.5,
}


def test_greedy_keeps_the_costliest_until_the_estimate_fits():
    plan = greedy_keep(DROPS, 1.0)  # positive drops sum to 4.2: keep 2.0 (2.2 left), 1.0 (1.2), 0.5 (0.7 <= 1)
    assert plan.keep == ("layer0.fc2", "layer1.fc1", "layer1.fc2") and plan.fits
    assert plan.estimated_drop == pytest.approx(0.4 + 0.2 + 0.1)
    assert plan.order[:4] == ("layer0.fc2", "layer1.fc1", "layer1.fc2", "layer1.attn_out")
    assert plan.costs["layer0.attn_out"] == 0.0  # a gain is not a credit
    assert greedy_keep(DROPS, 1.2).keep == ("layer0.fc2", "layer1.fc1")  # the boundary fits
    assert greedy_keep(DROPS, 10).keep == () and greedy_keep(DROPS, 10).estimated_drop == pytest.approx(4.2)
    everything = greedy_keep(DROPS, 0.0)  # every GEMM that costs anything, never a free one
    assert set(everything.keep) == {g for g, d in DROPS.items() if d > 0} and everything.fits
    assert everything.estimated_drop == 0.0
    # With -iln/-imh the floor (their own cost) is in every single-GEMM drop: costs are measured above it.
    floored = greedy_keep({g: d + 0.3 for g, d in DROPS.items()}, 1.0, floor=0.3)
    assert floored.keep == ("layer0.fc2", "layer1.fc1", "layer1.fc2") and floored.fits
    assert floored.estimated_drop == pytest.approx(0.3 + 0.7)
    too_costly = greedy_keep(DROPS, 0.5, floor=0.8)  # the floor alone misses: nothing can fit
    assert not too_costly.fits and too_costly.estimated_drop == pytest.approx(0.8)


def interacting(q: set[str]) -> float:
    """The cost of each INT8 GEMM, +1 more when layer1.fc2 and layer1.fc1 are both INT8 (an interaction the sum of
    single drops cannot see)."""
    return sum(max(0.0, DROPS[g]) for g in q) + (1.0 if {"layer1.fc2", "layer1.fc1"} <= q else 0.0)


def overstated(q: set[str]) -> float:
    """A quarter of the summed costs: the sum of single drops overstates the real drop (as all-INT8 measures)."""
    return 0.25 * sum(max(0.0, DROPS[g]) for g in q)


def overstated_with_interaction(q: set[str]) -> float:
    return 0.5 * sum(max(0.0, DROPS[g]) for g in q) + (1.0 if {"layer1.fc2", "layer1.fc1"} <= q else 0.0)


class FakeEvaluator:
    """F1 = 90 - drop(the INT8 GEMMs): a deterministic function of the keep list."""

    batch = 8

    def __init__(self, drop=interacting):
        self.drop = drop
        self.measured: list[tuple[str, ...]] = []

    def measure(self, v: Variant) -> Measurement:
        q = set(v.int8_gemms)
        self.measured.append(tuple(sorted(set(all_gemms(2)) - q)))
        f1 = 90 - self.drop(q)
        return Measurement(v.name, v.method, v.target, "--int8", len(q), f1, f1, 100, 0.0, 0.0)


def suggestion_for(budget: float, refine: int = 2, all_int8_f1: float | None = None, trim: int = 4,
                   drop=interacting):
    cfg = SensitivityConfig(model="m", calib_cache="c.json", squad="d.json", device=torch.device("cpu"), half=False,
                            limit=None, feature_settings=SETTINGS, answer_settings=AnswerSettings(),
                            max_f1_drop=budget, refine=refine, trim=trim, say=lambda line: None)
    ev = FakeEvaluator(drop)
    base = Measurement("baseline", "baseline", None, "fp32", 0, 90.0, 90.0, 100, 0.0, 0.0)
    f1 = 90 - drop(set(all_gemms(2))) if all_int8_f1 is None else all_int8_f1
    all_int8 = Measurement("all-int8", "all-int8", None, "--int8", 8, f1, f1, 100, 0.0, 0.0)
    sug, builds = _suggest(cfg, ev, 2, (0, 1), base, all_int8, None, DROPS)
    return sug, builds, ev


def steps(sug) -> list[tuple[str, str | None, int, float, bool]]:
    return [(a.step, a.gemm, len(a.keep), round(a.measured_drop, 6), a.fits) for a in sug.tried]


def test_suggestion_is_built_and_measured():
    sug, builds, ev = suggestion_for(1.0, trim=0)  # --trim 0: the greedy list as measured, nothing more
    assert sug.keep == greedy_keep(DROPS, 1.0).keep == ("layer0.fc2", "layer1.fc1", "layer1.fc2")
    assert [m.name for m in builds] == ["suggested"] and ev.measured == [tuple(sorted(sug.keep))]
    assert sug.fits and sug.measured_drop == pytest.approx(0.7) and sug.estimated_drop == pytest.approx(0.7)
    assert steps(sug) == [("greedy", None, 3, 0.7, True)] and sug.note == ""
    assert "--keep-fp16 fc2,layer1.fc1" in sug.command  # fc2 of both layers written once


def test_trim_returns_kept_gemms_to_int8_while_the_measurement_fits():
    # The real drop is a quarter of the sum (all-INT8 1.05 misses the budget 1.0): the greedy keeps 3 GEMMs
    # (measured 0.175); trims, cheapest first: layer1.fc2 (0.3 fits), layer1.fc1 (0.55 fits); returning layer0.fc2
    # too would be all-INT8, measured already to miss: no build.
    sug, builds, ev = suggestion_for(1.0, drop=overstated)
    assert steps(sug) == [("greedy", None, 3, 0.175, True), ("trim", "layer1.fc2", 2, 0.3, True),
                          ("trim", "layer1.fc1", 1, 0.55, True)]
    assert [m.name for m in builds] == ["suggested", "trim:layer1.fc2", "trim:layer1.fc1"]
    assert builds[1].method == "trim" and len(ev.measured) == 3
    assert sug.keep == ("layer0.fc2",) and sug.fits and sug.measured.name == "trim:layer1.fc1"
    assert sug.measured_drop == pytest.approx(0.55) and sug.estimated_drop == pytest.approx(2.2)
    assert sug.command.endswith("--keep-fp16 layer0.fc2 --device cpu -b 8 -s 96 -o engines/suggested.engine")
    assert "measured trims returned layer1.fc2, layer1.fc1 to INT8 (of 3 kept before trimming)" in sug.note
    # The trim budget counts builds: with one, layer1.fc2 goes back and the rest is said to be untried.
    sug, builds, _ = suggestion_for(1.0, drop=overstated, trim=1)
    assert sug.keep == ("layer0.fc2", "layer1.fc1") and len(builds) == 2
    assert "--trim 1 spent: layer1.fc1, layer0.fc2 not tried back in INT8" in sug.note


def test_a_trim_that_misses_is_reverted():
    # Half the sum, +1 when layer1.fc1 and layer1.fc2 are both INT8: layer1.fc2 goes back (0.6); layer1.fc1 then
    # misses (2.1) and is restored; so does layer0.fc2 (1.6). The suggestion is the smallest list measured within.
    sug, builds, _ = suggestion_for(1.0, drop=overstated_with_interaction)
    assert steps(sug) == [("greedy", None, 3, 0.35, True), ("trim", "layer1.fc2", 2, 0.6, True),
                          ("trim", "layer1.fc1", 1, 2.1, False), ("trim", "layer0.fc2", 1, 1.6, False)]
    assert sug.keep == ("layer0.fc2", "layer1.fc1") and sug.fits and sug.measured_drop == pytest.approx(0.6)
    assert sug.measured.name == "trim:layer1.fc2" and len(builds) == 4
    assert "--keep-fp16 layer0.fc2,layer1.fc1 " in sug.command
    # On the interacting fake every trim misses: the greedy list stays, each try reverted.
    sug, builds, _ = suggestion_for(1.0)
    assert sug.keep == ("layer0.fc2", "layer1.fc1", "layer1.fc2") and sug.measured.name == "suggested"
    assert [(a.gemm, a.fits) for a in sug.tried[1:]] == [("layer1.fc2", False), ("layer1.fc1", False),
                                                         ("layer0.fc2", False)]
    assert "--keep-fp16 fc2,layer1.fc1" in sug.command and "trims" not in sug.note


def test_suggestion_measures_and_refines_when_the_estimate_is_optimistic():
    # Budget 2.5: the estimate keeps layer0.fc2 only (4.2 - 2.0 = 2.2 <= 2.5), but layer1.fc1 and layer1.fc2
    # together cost 1 more than their sum: measured 3.2 misses, so refinement keeps layer1.fc1 too (measured 1.2).
    # Trimming then skips layer1.fc1 (that list was measured to miss) and reverts layer0.fc2 (3.2).
    sug, builds, ev = suggestion_for(2.5)
    assert [m.name for m in builds] == ["suggested", "suggested+1", "trim:layer0.fc2"]
    assert steps(sug) == [("greedy", None, 1, 3.2, False), ("refine", "layer1.fc1", 2, 1.2, True),
                          ("trim", "layer0.fc2", 1, 3.2, False)]
    assert sug.tried[1].keep == ("layer0.fc2", "layer1.fc1")
    assert sug.keep == ("layer0.fc2", "layer1.fc1") and sug.fits
    assert sug.measured_drop == pytest.approx(1.2) and sug.measured.name == "suggested+1"
    assert sug.estimated_drop == pytest.approx(1.2)  # the estimate of what is finally kept
    assert "--keep-fp16 layer0.fc2,layer1.fc1" in sug.command and "--int8" in sug.command
    assert "--fp16" not in sug.command  # a CPU/FP32 analysis reproduces an FP32 build
    # Without refinement the miss is reported as measured, never hidden behind the estimate; nothing is trimmed.
    sug, builds, _ = suggestion_for(2.5, refine=0)
    assert len(builds) == 1 and not sug.fits and sug.measured_drop == pytest.approx(3.2)
    assert "misses the budget" in sug.note and "--refine 0" in sug.note and len(sug.tried) == 1


def test_an_empty_greedy_list_reuses_the_all_int8_measurement():
    # The estimate fits with nothing kept (budget 4.5 > 4.2) but all-INT8 was measured at 5.2: no build repeats it.
    sug, builds, ev = suggestion_for(4.5, trim=0)
    assert steps(sug)[0] == ("greedy", None, 0, 5.2, False)
    assert [m.name for m in builds] == ["suggested+1"] and ev.measured == [("layer0.fc2",)]
    assert sug.keep == ("layer0.fc2",) and sug.fits


def test_suggestion_json_round_trip_and_older_files():
    sug, _, _ = suggestion_for(1.0, drop=overstated_with_interaction)
    assert Suggestion.from_json(json.loads(json.dumps(sug.to_json()))) == sug
    old = {k: v for k, v in sug.to_json().items()}  # format 1 before trims: tried held keep and drop only
    old["tried"] = [{"keep": ["layer0.fc2"], "measured_drop": 3.2}, {"keep": ["layer0.fc2", "layer1.fc1"],
                                                                     "measured_drop": 0.6}]
    back = Suggestion.from_json(old)
    assert [(a.step, a.gemm, a.fits) for a in back.tried] == [("greedy", None, False), ("refine", "layer1.fc1", True)]


def fake_result(sug) -> SensitivityResult:
    base = Measurement("baseline", "baseline", None, "fp32", 0, 90.0, 90.0, 100, 0.0, 0.0)
    settings = dict(model="m", calib_cache="c.json", calibration="max", squad="d.json", device="cpu",
                    precision="fp32", iln=False, imh=False)
    return SensitivityResult(settings, (0, 1), 2, base, replace(base, name="all-int8", f1=87.9), None, DROPS, {},
                             None, sug, (base,))


def test_the_report_tells_every_attempt():
    sug, _, _ = suggestion_for(1.0, drop=overstated_with_interaction)
    r = fake_result(sug)
    text, md = render_text(r), render_markdown(r, None, None)
    for out in (text, md):
        assert "keep layer0.fc2, layer1.fc1 out of INT8 (2 GEMMs), in FP32, this build's precision" in out
        assert "tried, in order (one build and evaluation each):" in out
        assert "trim   layer1.fc2 back to INT8" in out and "2 kept   ΔF1 -0.60   within: accepted" in out
        assert "trim   layer1.fc1 back to INT8" in out and "ΔF1 -2.10   misses: reverted" in out
        assert "note: measured trims returned layer1.fc2 to INT8" in out
        assert "reproduce: " in out and "--keep-fp16 layer0.fc2,layer1.fc1" in out
    sug, _, _ = suggestion_for(2.5)
    assert "refine keep layer1.fc1 too" in render_text(fake_result(sug))
    sug, _, _ = suggestion_for(1.0, trim=0)  # one attempt: no list
    assert "tried" not in render_text(fake_result(sug))


def test_nothing_is_kept_when_all_int8_fits():
    sug, builds, ev = suggestion_for(1.0, all_int8_f1=89.5)
    assert sug.keep == () and sug.fits and builds == [] and ev.measured == []
    assert sug.measured.name == "all-int8" and "already within the budget" in sug.note


# ------------------------------------------------------------------------------------------------ tiny model run

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("sensitivity")
    model = make_tiny_model(root / "tiny")
    train = load_squad(write_squad(root / "train.json", seed=1, prefix="t"))
    dev = write_squad(root / "dev.json", seed=2, prefix="d")
    loaded, wordpiece = load_calibration_model(model)
    calib = root / "calib.json"
    calibrate(train, loaded, wordpiece, CalibrationSpec("max", 6, features=SETTINGS), device=torch.device("cpu"),
              batch_size=16, output=calib, feature_cache=False, progress=False)
    return dict(model=model, dev=dev, calib=calib, root=root)


def tiny_config(tiny, **over) -> SensitivityConfig:
    cfg = dict(model=tiny["model"], calib_cache=tiny["calib"], squad=tiny["dev"], device=torch.device("cpu"),
               half=False, limit=None, feature_settings=SETTINGS, answer_settings=AnswerSettings(), progress=False,
               feature_cache=False, say=lambda line: None)
    cfg.update(over)
    return SensitivityConfig(**cfg)


def test_run_writes_table_heatmaps_and_json(tiny, tmp_path):
    result = run_sensitivity(tiny_config(tiny, leave_one_out=True, max_f1_drop=0.0))
    assert result.layers == (0, 1) and result.num_layers == 2
    assert set(result.only) == set(all_gemms(2)) and set(result.leave_one_out) == set(all_gemms(2))
    assert set(result.groups) == {"layer0", "layer1", *GEMMS}
    assert result.baseline.n_questions == 12 and all(m.n_questions == 12 for m in result.variants)
    by_name = {m.name: m for m in result.variants}
    assert by_name["baseline"].options == "fp32" and by_name["all-int8"].options == "--int8"
    assert by_name["only:layer1.fc1"].options == "--int8 (1 of 8 GEMMs INT8)"
    for g, drop in result.only.items():
        assert drop == pytest.approx(result.baseline.f1 - by_name[f"only:{g}"].f1)
    for g, rec in result.leave_one_out.items():
        assert rec == pytest.approx(by_name[f"all-but:{g}"].f1 - result.all_int8.f1)
    assert len(result.matrix()) == 2 and all(len(row) == 4 for row in result.matrix())
    # The suggestion (budget 0) is measured, not just estimated; or all-INT8 already fits.
    sug = result.suggestion
    assert sug.measured is not None and sug.measured_drop == pytest.approx(result.baseline.f1 - sug.measured.f1)
    assert sug.keep == () or sug.command and "--keep-fp16" in sug.command

    text = render_text(result)
    assert "layer0" in text and "layer1" in text and all(k in text for k in GEMMS)
    assert "most sensitive GEMMs" in text and "mixed-precision suggestion (--max-f1-drop 0)" in text
    assert "F1 recovered" in text and "one question moves F1 by up to 8.33" in text

    files = write_report(result, tmp_path / "report")
    assert set(files) == set(FILES)
    for key in ("heatmap", "leave_one_out"):
        assert files[key].read_bytes()[:8] == PNG
    assert load_result(files["json"]) == result  # JSON round trip
    raw = json.loads(files["json"].read_text())
    assert raw["kinds"] == list(GEMMS) and len(raw["matrix_f1_drop"]) == 2
    assert raw["matrix_f1_drop"][1][2] == pytest.approx(result.only["layer1.fc1"])
    md = files["markdown"].read_text()
    assert "| layer1 |" in md and "![ΔF1 per GEMM](sensitivity.png)" in md and "## Every build" in md
    assert not list((tmp_path / "report").glob(".*tmp"))

    # Without --leave-one-out there is no second heat-map; with fewer layers, fewer rows.
    result = run_sensitivity(tiny_config(tiny, layers="1", groups=False, limit=5))
    assert result.layers == (1,) and result.leave_one_out is None and result.groups == {}
    assert result.baseline.n_questions == 5 and len(result.variants) >= 6
    files = write_report(result, tmp_path / "r2")
    assert "leave_one_out" not in files and not (tmp_path / "r2" / FILES["leave_one_out"]).exists()
    assert len(load_result(files["json"]).matrix()) == 1


def test_variants_are_stored_and_a_rerun_reuses_them(tiny, tmp_path):
    """With a report folder each variant measured is stored (REPORT_DIR/variants/) under a key of its inputs: a rerun
    builds nothing it has, and other inputs (fewer questions) measure again."""
    lines: list[str] = []

    def run(**over):
        lines.clear()
        return run_sensitivity(tiny_config(tiny, **{**dict(layers="1", groups=False, limit=4, trim=0,
                                                           report_dir=tmp_path, say=lines.append), **over}))

    first = run()
    stored = sorted(p.name for p in (tmp_path / "variants").iterdir())
    assert "baseline.json" in stored and "only_layer1.fc2.json" in stored and len(stored) >= 6
    assert not any("finished earlier" in line for line in lines)
    again = run()
    assert [(m.name, m.f1, m.same_as) for m in again.variants] == [(m.name, m.f1, m.same_as) for m in first.variants]
    assert sum("finished earlier, reused" in line for line in lines) == 6
    run(limit=3)
    assert not any("finished earlier" in line for line in lines)
    run(limit=3, force=True)  # --force: the same inputs, measured again
    assert not any("finished earlier" in line for line in lines)


def test_iln_measures_the_floor(tiny):
    result = run_sensitivity(tiny_config(tiny, iln=True, groups=False, limit=4, max_f1_drop=100.0))
    assert result.floor is not None and result.floor.options == "--int8 -iln (0 of 8 GEMMs INT8)"
    assert result.all_int8.options == "--int8 -iln"
    assert result.suggestion.keep == () and result.suggestion.fits


def test_bad_input(tiny, tmp_path):
    with pytest.raises(WorkbenchError, match="calibration cache not found"):
        run_sensitivity(tiny_config(tiny, calib_cache=tmp_path / "none.json"))
    with pytest.raises(WorkbenchError, match="--max-f1-drop"):
        run_sensitivity(tiny_config(tiny, max_f1_drop=math.nan))
    (tmp_path / "file").write_text("x")
    with pytest.raises(WorkbenchError, match="--report-dir is a file"):
        write_report(run_sensitivity(tiny_config(tiny, layers="0", groups=False, limit=2)), tmp_path / "file")


@pytest.mark.parametrize("extra, words", [
    (["--calib-cache", "missing.json"], "missing.json: calibration cache not found"),
    (["--layers", "9"], "layer 9 does not exist"),
    (["--limit", "0"], "--limit '0'"),
    (["--options", "fast"], "--options 'fast'"),
    (["--model", "nowhere"], "nowhere: model folder not found"),
])
def test_cli_bad_input_is_one_line(tiny, tmp_path, monkeypatch, capsys, extra, words):
    monkeypatch.chdir(tmp_path)
    args = ["sensitivity", "--model", tiny["model"], "--calib-cache", tiny["calib"], "--squad", tiny["dev"],
            "--device", "cpu", "-s", "96", "--doc-stride", "32", "--max-query-length", "16", "--no-progress",
            "--report-dir", tmp_path / "r", *extra]
    assert_one_line_error_in_process(capsys, *args, words=words)


def test_cli_refuses_a_cache_of_another_model(tiny, tmp_path, capsys):
    assert_one_line_error_in_process(capsys, "sensitivity", "--calib-cache", tiny["calib"], "--device", "cpu",
                                     "--limit", "2", "--no-progress", "--report-dir", tmp_path / "r",
                                     words="the calibration cache was made for another model")


# ------------------------------------------------------------------------------------------------ the CLI on MiniLM

def test_cli_on_the_vendored_minilm(tmp_path, capsys):
    """`cli.py sensitivity` on assets/ (MiniLM, dev set), 3 questions, two of its six layers, leave-one-out too."""
    import cli

    loaded, wordpiece = load_calibration_model(DEFAULT_MODEL)
    calib = tmp_path / "calib.json"
    calibrate(load_squad(DEFAULT_CALIB_SQUAD), loaded, wordpiece, CalibrationSpec("max", 2), device=torch.device("cpu"),
              batch_size=16, output=calib, progress=False)
    report = tmp_path / "report"
    capsys.readouterr()
    code = cli.main(["sensitivity", "--calib-cache", str(calib), "--device", "cpu", "--limit", "3", "--layers", "0,5",
                     "--leave-one-out", "--max-f1-drop", "0.5", "--report-dir", str(report), "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "on the CPU: the first" not in out  # --limit given
    assert "on the CPU: FP32 for what is not INT8" in out
    assert "on 3 questions of dev-v1.1.json.gz" in out and "layer5" in out and "layers 0,5" in out
    assert "mixed-precision suggestion (--max-f1-drop 0.5)" in out
    assert "sensitivity: " in err and "only:layer5.fc2: EM" in err and "all-but:layer0.qkv: EM" in err
    for name in FILES.values():
        assert (report / name).exists()
    assert (report / FILES["heatmap"]).read_bytes()[:8] == PNG
    result = load_result(report / FILES["json"])
    assert result.layers == (0, 5) and result.num_layers == 6 and result.baseline.n_questions == 3
    assert result.settings["limit"] == 3 and result.settings["precision"] == "fp32"


def test_cli_help_and_default_limit_notice(tiny, tmp_path, capsys):
    import cli

    with pytest.raises(SystemExit):
        cli.main(["sensitivity", "--help"])
    out = capsys.readouterr().out
    assert "examples:" in out and "--keep-fp16" in out and "--leave-one-out" in out and "50 questions" in out
    code = cli.main(["sensitivity", "--model", str(tiny["model"]), "--calib-cache", str(tiny["calib"]), "--squad",
                     str(tiny["dev"]), "--device", "cpu", "-s", "96", "--doc-stride", "32", "--max-query-length", "16",
                     "--layers", "0", "--no-groups", "--no-progress", "--report-dir", str(tmp_path / "r")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "on the CPU: the first 50 questions (--limit; CUDA's default is all of them)" in out
    assert "on 12 questions" in out  # the file has 12: all of them


def test_cli_with_a_vocab_file_tokenizes_with_it(tiny, tmp_path, capsys):
    """-v: the questions are tokenized with that vocab.txt (recorded in the JSON), and the reproducing build
    command carries it."""
    import cli
    from data.tokenizer import load_wordpiece
    from eval.sensitivity import _build_command

    lines = (tiny["model"] / "vocab.txt").read_text().splitlines()
    i, j = lines.index("paris"), lines.index("france")
    lines[i], lines[j] = lines[j], lines[i]  # same size, other ids
    vocab = tmp_path / "demo-vocab.txt"
    vocab.write_text("\n".join(lines) + "\n")
    report = tmp_path / "r"
    capsys.readouterr()
    code = cli.main(["sensitivity", "-c", str(tiny["model"]), "-v", str(vocab), "--calib-cache", str(tiny["calib"]),
                     "--squad", str(tiny["dev"]), "--device", "cpu", "--limit", "2", "--layers", "0", "--no-groups",
                     "--max-f1-drop", "0", "--trim", "0", "--refine", "0", "-s", "96", "--doc-stride", "32",
                     "--max-query-length", "16", "--no-progress", "--report-dir", str(report)])
    assert code == 0, capsys.readouterr().err
    result = load_result(report / FILES["json"])
    assert result.settings["vocab_file"] == str(vocab)
    assert result.settings["tokenizer_digest"] == load_wordpiece(tiny["model"], vocab_file=vocab).digest
    command = _build_command(tiny_config(tiny, vocab_file=str(vocab)), ["layer0.fc2"], 2, 8)
    assert command.startswith(f"python cli.py build --model {tiny['model']} -v {vocab} --int8 ")


def test_a_2to4_model_is_analysed_as_such_and_its_suggestion_builds_sparse(tiny, tmp_path):
    """On a model pruned 2:4 (`cli.py prune`) the analysis says so, records it, and the suggested build command
    carries --sparse; on a dense model none of that."""
    from model.checkpoint import load_model
    from qat.folder import save_model_folder
    from qat.prune import prune_2to4

    from eval.sensitivity import _build_command

    loaded = load_model(tiny["model"])
    prune_2to4(loaded.model, "magnitude")
    pruned = save_model_folder(tmp_path / "pruned", loaded.model, loaded.model_dir)
    model, wordpiece = load_calibration_model(pruned)
    calibrate(load_squad(tiny["root"] / "train.json"), model, wordpiece, CalibrationSpec("max", 6, features=SETTINGS),
              device=torch.device("cpu"), batch_size=16, output=tmp_path / "c.json", feature_cache=False,
              progress=False)
    said = []
    result = run_sensitivity(tiny_config(tiny, model=pruned, calib_cache=tmp_path / "c.json", layers="0",
                                         groups=False, trim=0, refine=0, say=said.append))
    assert result.settings["sparse"] is True and "2:4 GEMM weights" in said[0]
    dense = tiny_config(tiny)
    assert " --sparse" in _build_command(replace(dense, sparse=True), ["layer0.fc2"], 2, 8)
    assert " --sparse" not in _build_command(dense, ["layer0.fc2"], 2, 8)
    assert run_sensitivity(tiny_config(tiny, layers="0", groups=False, trim=0, refine=0)).settings["sparse"] is False
