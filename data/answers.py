"""Turn start/end logits into answer strings, as Hugging Face's postprocess_qa_predictions does.

The reference accuracy was scored this way: per window the n-best start and end tokens are paired, spans that
leave the context, run backwards or exceed max_answer_length are dropped, and an example's windows are pooled.
Pairing is vectorised over all windows at once so a full dev set takes seconds.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from common.errors import WorkbenchError
from common.files import atomic_write_json
from data.features import Features
from data.squad import Example

log = logging.getLogger(__name__)

_NAN_LOGIT = np.float32(-1e30)  # NaN logits (a broken engine) rank last instead of poisoning the sort


@dataclass(frozen=True)
class AnswerSettings:
    n_best_size: int = 20
    max_answer_length: int = 30
    version_2_with_negative: bool = False
    null_score_diff_threshold: float = 0.0

    def __post_init__(self) -> None:
        if self.n_best_size < 1 or self.max_answer_length < 1:
            raise WorkbenchError(f"n_best_size and max_answer_length must be at least 1, got {self.n_best_size} "
                                 f"and {self.max_answer_length}")


@dataclass(frozen=True)
class Candidate:
    text: str
    start_logit: float
    end_logit: float
    probability: float


@dataclass(frozen=True)
class Prediction:
    qid: str
    text: str                    # the answer, "" for no answer
    nbest: tuple[Candidate, ...]  # best first; probabilities = softmax of start+end over these


def extract_answers(examples: Sequence[Example], features: Features, start_logits: np.ndarray,
                    end_logits: np.ndarray, settings: AnswerSettings = AnswerSettings()) -> dict[str, Prediction]:
    """One prediction per example that has features, in example order.

    Logits are [N, S'] with S' <= max_seq_length: callers may have dropped trailing padding columns.
    """
    start, end = _checked_logits(features, start_logits, end_logits, len(examples))
    feat, s_tok, e_tok, score = _valid_spans(features.offsets[:, :start.shape[1]], start, end, settings)
    owner = features.example_index[feat]
    # Stable sort: equal scores keep Hugging Face's order (window, then start rank, then end rank).
    order = np.lexsort((-score, owner))
    feat, s_tok, e_tok, score, owner = feat[order], s_tok[order], e_tok[order], score[order], owner[order]
    bounds = np.searchsorted(owner, np.arange(len(examples) + 1))
    null = start[:, 0] + end[:, 0]

    predictions: dict[str, Prediction] = {}
    has_features = np.zeros(len(examples), dtype=bool)
    has_features[features.example_index] = True
    windows = _windows_by_example(features.example_index, len(examples))
    for ex_i in np.flatnonzero(has_features):
        ex = examples[ex_i]
        cands = []
        for k in range(bounds[ex_i], min(bounds[ex_i + 1], bounds[ex_i] + settings.n_best_size)):
            off = features.offsets[feat[k]]
            text = ex.context[off[s_tok[k], 0]:off[e_tok[k], 1]]
            cands.append((text, float(start[feat[k], s_tok[k]]), float(end[feat[k], e_tok[k]]), float(score[k])))
        best = cands[0] if cands else None
        if settings.version_2_with_negative:
            w = windows[ex_i][np.argmin(null[windows[ex_i]])]  # the window most sure there is no answer
            null_cand = ("", float(start[w, 0]), float(end[w, 0]), float(null[w]))
            cands = sorted(cands + [null_cand], key=lambda c: -c[3])  # stable: null after equal spans
            if best is not None and null_cand[3] > best[3] + settings.null_score_diff_threshold:
                best = None
        predictions[ex.qid] = Prediction(ex.qid, best[0] if best else "", _with_probabilities(cands))
    return predictions


def write_predictions(predictions: dict[str, Prediction], path: str | Path,
                      nbest_path: str | Path | None = None) -> None:
    """The official {qid: answer} file, and optionally the n-best lists; each written atomically."""
    atomic_write_json(path, {qid: p.text for qid, p in predictions.items()})
    if nbest_path is not None:
        atomic_write_json(nbest_path, {
            qid: [{"text": c.text, "probability": c.probability, "start_logit": c.start_logit,
                   "end_logit": c.end_logit} for c in p.nbest]
            for qid, p in predictions.items()})


def _checked_logits(features: Features, start_logits, end_logits, n_examples: int) -> tuple[np.ndarray, np.ndarray]:
    start = np.asarray(start_logits, dtype=np.float32)
    end = np.asarray(end_logits, dtype=np.float32)
    n, seq = features.offsets.shape[:2]
    if start.shape != end.shape or start.ndim != 2 or start.shape[0] != n or not 1 <= start.shape[1] <= seq:
        raise ValueError(f"logits of shape {start.shape} / {end.shape} do not fit {n} features of {seq} tokens")
    if len(features) and features.example_index.max() >= n_examples:
        raise ValueError(f"features refer to example {features.example_index.max()} but only {n_examples} given")
    bad = int(np.isnan(start).sum() + np.isnan(end).sum())
    if bad:
        log.warning("%d NaN logits (the model output is broken); treating them as the lowest score", bad)
        start, end = np.where(np.isnan(start), _NAN_LOGIT, start), np.where(np.isnan(end), _NAN_LOGIT, end)
    return start, end


def _valid_spans(offsets: np.ndarray, start: np.ndarray, end: np.ndarray, s: AnswerSettings):
    """All admissible (window, start token, end token, score) among each window's n-best starts and ends."""
    k = min(s.n_best_size, start.shape[1])
    top_s = np.argsort(start, axis=1)[:, ::-1][:, :k]         # [N, k], as Hugging Face's argsort()[-1:-k-1:-1]
    top_e = np.argsort(end, axis=1)[:, ::-1][:, :k]
    rows = np.arange(len(start))[:, None]
    in_context = offsets[..., 0] >= 0                         # [N, S']
    st, en = top_s[:, :, None], top_e[:, None, :]             # broadcast to [N, k, k]
    ok = (in_context[rows, top_s][:, :, None] & in_context[rows, top_e][:, None, :]
          & (en >= st) & (en - st + 1 <= s.max_answer_length))
    feat, i, j = np.nonzero(ok)
    s_tok, e_tok = top_s[feat, i], top_e[feat, j]
    return feat, s_tok, e_tok, start[feat, s_tok] + end[feat, e_tok]


def _windows_by_example(example_index: np.ndarray, n_examples: int) -> list[np.ndarray]:
    order = np.argsort(example_index, kind="stable")
    return np.split(order, np.searchsorted(example_index[order], np.arange(1, n_examples)))


def _with_probabilities(cands: list[tuple]) -> tuple[Candidate, ...]:
    if not cands:
        return ()
    scores = np.array([c[3] for c in cands], dtype=np.float64)
    probs = np.exp(scores - scores.max())
    probs /= probs.sum()
    return tuple(Candidate(text, s, e, float(p)) for (text, s, e, _), p in zip(cands, probs))
