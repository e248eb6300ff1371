"""eval.measure: one build -> evaluate -> time path, on a tiny random-weight model on the CPU.

Its numbers are those of eval.qa.evaluate (the path `cli.py eval` took before), the features are made once per
tokenizer and reused, each profile gets one timing row, and an engine built in memory measures like its model."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from data.answers import AnswerSettings
from data.features import FeatureSettings
from data.squad import load_squad
from eval.measure import Build, Questions, measure
from eval.qa import evaluate
from eval.runnables import engine_build, model_build
from tests.test_calib_calibrate import make_tiny_model, write_squad

SETTINGS = FeatureSettings(max_seq_length=96, doc_stride=32, max_query_length=16)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("measure")
    return dict(model=make_tiny_model(root / "tiny"), squad=load_squad(write_squad(root / "dev.json", seed=4)))


def questions_of(squad, wordpiece=None) -> Questions:
    return Questions(squad.examples, squad.version, SETTINGS, AnswerSettings(), wordpiece=wordpiece, cache=False,
                     progress=False)


def test_measure_scores_like_evaluate_and_times_each_profile(tiny, tmp_path):
    build = model_build(str(tiny["model"]), device="cpu", max_seq_length=96, batch_size=4)
    squad = tiny["squad"]
    score, predictions, _ = evaluate(squad.examples, squad.version, build.forward, build.wordpiece, CPU,
                                     feature_settings=SETTINGS, answer_settings=AnswerSettings(), batch_size=4,
                                     cache=False, progress=False)
    questions = questions_of(squad)
    m = measure(build, questions, [(1, 32), (2, 96)], iterations=2, warmup=0, is_baseline=True, report_dir=tmp_path)

    r = m.result
    assert r.f1 == pytest.approx(score.f1) and r.exact_match == pytest.approx(score.exact_match)
    assert r.n_questions == score.n == len(squad.examples) == 12
    assert {q: p.text for q, p in m.predictions.items()} == {q: p.text for q, p in predictions.items()}
    assert r.profiles == ((1, 32), (2, 96)) and all(lat.median_ms > 0 for lat in r.latency)
    assert r.is_baseline and r.name == "tiny-fp32" and r.options == "model fp32" and r.engine_bytes is None
    assert r.predictions_file == "predictions/tiny-fp32.json"
    written = json.loads((tmp_path / "predictions" / "tiny-fp32.json").read_text())
    assert written == {q: p.text for q, p in predictions.items()}
    assert not m.timings.features_reused and m.timings.num_features >= 12

    # The same questions again: the features are reused, not made again; no profiles: accuracy only.
    again = measure(replace(build, name="again"), questions)
    assert again.timings.features_reused and again.result.latency == () and again.result.predictions_file is None
    assert again.result.f1 == pytest.approx(score.f1)
    assert questions.featurized(build.wordpiece)[1] is None  # made once: None seconds spent now


def test_an_engine_built_in_memory_measures_like_its_model(tiny):
    """An FP32 engine computes the model's function: the same answers through the same measure."""
    from calib.calibrate import load_calibration_model
    from engines.build import build_engine
    from engines.engine_file import Profile
    from engines.runtime import Engine
    from quant.policy import PrecisionPolicy

    loaded, wordpiece = load_calibration_model(tiny["model"])
    header, tensors = build_engine(loaded, PrecisionPolicy(), [Profile(4, 96)], None, CPU, None)
    engine = engine_build(Engine(header, tensors, CPU).eval(), "fp32-engine", batch=4, build_s=1.5)
    model = model_build(str(tiny["model"]), device="cpu", max_seq_length=96, batch_size=4)
    assert engine.wordpiece is None and engine.kind == "engine" and engine.options == "fp32"

    questions = questions_of(tiny["squad"], wordpiece)  # the engine has no tokenizer: the questions' is used
    from_engine = measure(engine, questions, [(4, 96)], iterations=1, warmup=0)
    from_model = measure(model, questions)
    assert from_model.timings.features_reused  # same tokenizer, made once
    assert from_engine.result.f1 == pytest.approx(from_model.result.f1)
    assert from_engine.result.build_s == 1.5 and [lat.profile for lat in from_engine.result.latency] == [(4, 96)]


def test_a_build_without_a_tokenizer_needs_the_questions_one(tiny):
    plain = Build("x", lambda *a: None, CPU, 4, 100)
    with pytest.raises(Exception, match="no tokenizer"):
        measure(plain, questions_of(tiny["squad"]))
