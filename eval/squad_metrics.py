"""Official SQuAD scoring (v1.1 and v2.0 rules), reimplemented.

The rules follow the official evaluation scripts:

* normalization: lower case, drop every character of ``string.punctuation`` (ASCII only: unicode dashes and
  curly quotes are kept), drop the whole words ``a``/``an``/``the``, collapse whitespace;
* exact match: the normalized strings are equal;
* F1: bag-of-tokens F1 over the whitespace tokens of the normalized strings;
* a question's score is the maximum over its ground truths, and the dataset score is the mean over all questions,
  in percent. A question with no prediction scores 0 (the v1.1 script's behaviour; used for v2.0 too).

v1.1 vs v2.0 differences:

* v1.1 F1 is 0 whenever no token is shared, so an empty prediction scores F1 0 even against an empty truth;
* v2.0 drops gold answers whose normalized text is empty, uses ``[""]`` as the gold of an unanswerable question,
  and gives F1 = 1 when both token lists are empty (0 when only one is). It also reports HasAns/NoAns breakdowns.

``examples`` are duck-typed: anything with ``.qid``, ``.answers`` (objects with ``.text``) and ``.is_impossible``.
"""
from __future__ import annotations

import re
import string
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from common.errors import WorkbenchError

VERSIONS = ("1.1", "2.0")

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(?:a|an|the)\b")


def normalize_answer(s: str) -> str:
    """The official SQuAD normalization: lower, strip ASCII punctuation, remove articles, collapse whitespace."""
    text = s.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _check_version(version: str) -> None:
    if version not in VERSIONS:
        raise WorkbenchError(f"unknown SQuAD version {version!r}: expected one of {', '.join(VERSIONS)}")


def exact_match(prediction: str, truth: str) -> float:
    """1.0 when the normalized prediction equals the normalized truth, else 0.0 (same under v1.1 and v2.0)."""
    return 1.0 if normalize_answer(prediction) == normalize_answer(truth) else 0.0


def f1(prediction: str, truth: str, version: str = "1.1") -> float:
    """Token-level F1 between one prediction and one ground truth, under the given version's edge-case rule."""
    _check_version(version)
    pred_tokens = normalize_answer(prediction).split()
    truth_tokens = normalize_answer(truth).split()
    if version == "2.0" and (not pred_tokens or not truth_tokens):
        return 1.0 if pred_tokens == truth_tokens else 0.0
    shared = sum((Counter(pred_tokens) & Counter(truth_tokens)).values())
    if shared == 0:
        return 0.0
    precision = shared / len(pred_tokens)
    recall = shared / len(truth_tokens)
    return 2 * precision * recall / (precision + recall)


@dataclass(frozen=True)
class SquadScore:
    exact_match: float  # percent, 0..100
    f1: float  # percent
    n: int  # questions scored
    # v2.0 only; None under v1.1 and for an empty group.
    has_ans_exact: float | None = None
    has_ans_f1: float | None = None
    has_ans_n: int | None = None
    no_ans_exact: float | None = None
    no_ans_f1: float | None = None
    no_ans_n: int | None = None

    def to_json(self) -> dict:
        out: dict[str, Any] = {"exact_match": self.exact_match, "f1": self.f1, "n": self.n}
        for name in ("has_ans_exact", "has_ans_f1", "has_ans_n", "no_ans_exact", "no_ans_f1", "no_ans_n"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out


def _gold_answers(example: Any, version: str) -> list[str]:
    texts = [a.text for a in example.answers]
    if version == "1.1":
        return texts
    if example.is_impossible:
        return [""]
    kept = [t for t in texts if normalize_answer(t)]
    return kept or [""]


def _mean_percent(values: Iterable[float]) -> tuple[float, int]:
    values = list(values)
    return 100.0 * sum(values) / len(values), len(values)


def score_squad(examples: Sequence[Any], predictions: Mapping[str, str], version: str = "1.1") -> SquadScore:
    """Score predictions (question id -> answer text) against examples with the official SQuAD rules.

    Every example counts; one missing from ``predictions`` scores 0. Predictions for unknown ids are ignored.
    """
    _check_version(version)
    examples = list(examples)
    if not examples:
        raise WorkbenchError("no SQuAD questions to score: the example list is empty")
    if version == "1.1" and any(not ex.answers for ex in examples):
        bad = next(ex.qid for ex in examples if not ex.answers)
        raise WorkbenchError(f"question {bad!r} has no ground-truth answers: SQuAD v1.1 scoring needs at least one "
                             f"(score unanswerable questions with version='2.0')")

    em_scores: list[float] = []
    f1_scores: list[float] = []
    for ex in examples:
        if ex.qid not in predictions:
            em_scores.append(0.0)
            f1_scores.append(0.0)
            continue
        prediction = predictions[ex.qid]
        if not isinstance(prediction, str):
            raise WorkbenchError(f"prediction for question {ex.qid!r} is {type(prediction).__name__}, not a string")
        golds = _gold_answers(ex, version)
        em_scores.append(max(exact_match(prediction, g) for g in golds))
        f1_scores.append(max(f1(prediction, g, version) for g in golds))

    em, n = _mean_percent(em_scores)
    f1_total, _ = _mean_percent(f1_scores)
    if version == "1.1":
        return SquadScore(exact_match=em, f1=f1_total, n=n)

    groups: dict[bool, list[int]] = {True: [], False: []}
    for i, ex in enumerate(examples):
        groups[not ex.is_impossible].append(i)
    breakdown: dict[str, Any] = {}
    for prefix, has_ans in (("has_ans", True), ("no_ans", False)):
        idx = groups[has_ans]
        if idx:
            breakdown[f"{prefix}_exact"], breakdown[f"{prefix}_n"] = _mean_percent(em_scores[i] for i in idx)
            breakdown[f"{prefix}_f1"], _ = _mean_percent(f1_scores[i] for i in idx)
    return SquadScore(exact_match=em, f1=f1_total, n=n, **breakdown)
