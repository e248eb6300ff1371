"""Answer extraction on hand-built windows and logits, and the prediction file formats."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from data.answers import AnswerSettings, Candidate, Prediction, extract_answers, write_predictions
from data.features import Features
from data.squad import Example

CONTEXT = "the cat sat on the mat"
#          0   4   8   12 15  19
SPANS = [(0, 3), (4, 7), (8, 11), (12, 14), (15, 18), (19, 22)]  # the cat sat on the mat
S = 12  # [CLS] q q [SEP] six context tokens [SEP] [PAD]
CTX0 = 4  # token index of the first context token


def window(spans=SPANS):
    offsets = np.full((S, 2), -1, dtype=np.int32)
    offsets[CTX0:CTX0 + len(spans)] = spans
    return offsets


def features(windows, example_index):
    n = len(windows)
    z = np.zeros((n, S), dtype=np.int32)
    return Features(z, z, z, np.asarray(example_index, dtype=np.int32), np.stack(windows),
                    np.zeros(n, np.int32), np.zeros(n, np.int32))


def logits(n=1, **peaks):
    """Low logits everywhere except {"s<row>_<token>": value, "e<row>_<token>": value}."""
    start, end = np.full((n, S), -10.0, np.float32), np.full((n, S), -10.0, np.float32)
    for key, value in peaks.items():
        row, tok = map(int, key[1:].split("_"))
        (start if key[0] == "s" else end)[row, tok] = value
    return start, end


EX = [Example("q", "what sat?", CONTEXT, ())]


def test_best_span_is_chosen():
    start, end = logits(s0_5=5, e0_6=5, s0_4=3, e0_9=2)  # "cat sat" beats "the cat sat on the mat"
    pred = extract_answers(EX, features([window()], [0]), start, end)["q"]
    assert pred.text == "cat sat" and pred.qid == "q"
    assert pred.nbest[0] == Candidate("cat sat", 5.0, 5.0, pred.nbest[0].probability)
    scores = [c.start_logit + c.end_logit for c in pred.nbest]
    assert scores == sorted(scores, reverse=True) and len(pred.nbest) == 20
    assert sum(c.probability for c in pred.nbest) == pytest.approx(1.0)
    assert pred.nbest[0].probability > pred.nbest[1].probability


def test_max_answer_length_is_respected():
    start, end = logits(s0_4=9, e0_9=9, e0_6=4)  # the whole context (6 tokens) scores best
    feats = features([window()], [0])
    assert extract_answers(EX, feats, start, end).popitem()[1].text == CONTEXT
    short = extract_answers(EX, feats, start, end, AnswerSettings(max_answer_length=3))["q"]
    assert short.text == "the cat sat"
    assert all(len(c.text.split()) <= 3 for c in short.nbest)


def test_span_touching_the_question_or_specials_is_refused():
    # question token 1 -> "cat" would score 40; [CLS] and the final [SEP] also score high, the context does not
    start, end = logits(s0_1=20, e0_5=20, s0_0=20, e0_0=20, e0_10=20, s0_4=-100, s0_5=-100, s0_6=1, e0_7=1)
    assert extract_answers(EX, features([window()], [0]), start, end)["q"].text == "sat on"


def test_backward_span_is_refused():
    start, end = logits(s0_8=9, e0_5=9, s0_6=1, e0_6=1)
    assert extract_answers(EX, features([window()], [0]), start, end)["q"].text == "sat"


def test_windows_of_one_example_are_pooled():
    # window 1 covers "on the mat" only; its best span outscores window 0's
    w1 = np.full((S, 2), -1, np.int32)
    w1[CTX0:CTX0 + 3] = SPANS[3:]
    start, end = logits(2, s0_5=2, e0_5=2, s1_6=4, e1_6=4)
    pred = extract_answers(EX, features([window(), w1], [0, 0]), start, end, AnswerSettings(n_best_size=5))["q"]
    assert pred.text == "mat" and pred.nbest[1].text == "cat"
    assert len(pred.nbest) == 5


def test_trimmed_logits_and_example_order():
    examples = [Example("a", "q", CONTEXT, ()), Example("b", "q", CONTEXT, ()), Example("c", "q", CONTEXT, ())]
    start, end = logits(2, s0_4=5, e0_4=5, s1_9=5, e1_9=5)
    preds = extract_answers(examples, features([window(), window()], [2, 0]), start[:, :10], end[:, :10])
    assert list(preds) == ["a", "c"]  # "b" has no features
    assert (preds["a"].text, preds["c"].text) == ("mat", "the")


def test_no_valid_span_gives_empty_answer():
    feats = features([np.full((S, 2), -1, np.int32)], [0])  # a window without context tokens
    pred = extract_answers(EX, feats, *logits(s0_4=5, e0_4=5))["q"]
    assert pred == Prediction("q", "", ())


@pytest.mark.parametrize("threshold, expected", [(0.0, ""), (3.0, "cat")])
def test_v2_null_threshold(threshold, expected):
    w1 = window()
    # null scores: window 0 -> 4 + 4 = 8, window 1 -> 3 + 3 = 6 (the minimum is used); best span "cat" = 5
    start, end = logits(2, s0_0=4, e0_0=4, s1_0=3, e1_0=3, s0_5=2.5, e0_5=2.5)
    settings = AnswerSettings(version_2_with_negative=True, null_score_diff_threshold=threshold)
    pred = extract_answers(EX, features([window(), w1], [0, 0]), start, end, settings)["q"]
    assert pred.text == expected
    null = [c for c in pred.nbest if c.text == ""]
    assert null == [Candidate("", 3.0, 3.0, null[0].probability)]
    assert pred.nbest[0].text == ""  # sorted by score: the null (6) beats "cat" (5)
    assert sum(c.probability for c in pred.nbest) == pytest.approx(1.0)


def test_v2_answer_wins_over_low_null_score():
    start, end = logits(s0_0=1, e0_0=1, s0_5=3, e0_5=3)
    pred = extract_answers(EX, features([window()], [0]), start, end, AnswerSettings(version_2_with_negative=True))
    assert pred["q"].text == "cat" and "" in [c.text for c in pred["q"].nbest]


def test_mismatched_logits_are_rejected():
    start, end = logits(2)
    with pytest.raises(ValueError, match="do not fit"):
        extract_answers(EX, features([window()], [0]), start, end)


def test_nan_logits_warn_and_rank_last(caplog):
    start, end = logits(s0_5=2, e0_5=2)
    start[0, 4] = np.nan
    with caplog.at_level(logging.WARNING):
        pred = extract_answers(EX, features([window()], [0]), start, end)["q"]
    assert pred.text == "cat" and "NaN" in caplog.text


def test_write_predictions(tmp_path):
    preds = {"a": Prediction("a", "cat", (Candidate("cat", 1.5, 2.0, 0.75), Candidate("the cat", 0.5, 2.0, 0.25))),
             "b": Prediction("b", "", ())}
    write_predictions(preds, tmp_path / "out" / "predictions.json", tmp_path / "out" / "nbest.json")
    assert json.loads((tmp_path / "out" / "predictions.json").read_text()) == {"a": "cat", "b": ""}
    assert json.loads((tmp_path / "out" / "nbest.json").read_text()) == {
        "a": [{"text": "cat", "probability": 0.75, "start_logit": 1.5, "end_logit": 2.0},
              {"text": "the cat", "probability": 0.25, "start_logit": 0.5, "end_logit": 2.0}],
        "b": []}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["nbest.json", "predictions.json"]
    write_predictions(preds, tmp_path / "single" / "only.json")
    assert [p.name for p in (tmp_path / "single").iterdir()] == ["only.json"]  # no n-best, no temp files
