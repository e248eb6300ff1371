"""SQuAD prediction and evaluation for any forward (reference model now, engines later): one path for all."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import torch

from data.answers import AnswerSettings, Prediction, extract_answers
from data.features import FeatureSettings, featurize
from data.squad import Example
from data.tokenizer import WordPiece
from eval.squad_metrics import SquadScore, score_squad
from model.runner import Forward, run_logits


@dataclass(frozen=True)
class Timings:
    featurize_s: float
    model_s: float
    answers_s: float
    num_questions: int
    num_features: int

    def lines(self) -> list[str]:
        q = self.num_questions
        return [f"featurize: {q} questions -> {self.num_features} features in {self.featurize_s:.2f} s "
                f"({q / max(self.featurize_s, 1e-9):,.0f} questions/s)",
                f"model:     {self.num_features} features in {self.model_s:.2f} s "
                f"({q / max(self.model_s, 1e-9):,.0f} questions/s)",
                f"answers:   {self.answers_s:.2f} s"]


def predict(examples: Sequence[Example], forward: Forward, wordpiece: WordPiece, device: torch.device, *,
            feature_settings: FeatureSettings = FeatureSettings(), answer_settings: AnswerSettings = AnswerSettings(),
            batch_size: int = 32, cache: bool = True, progress: bool = True) -> tuple[dict[str, Prediction], Timings]:
    t0 = time.perf_counter()
    features = featurize(examples, wordpiece, feature_settings, cache=cache, progress=progress)
    t1 = time.perf_counter()
    start, end = run_logits(forward, features, device, batch_size=batch_size, progress=progress)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t2 = time.perf_counter()
    predictions = extract_answers(examples, features, start, end, answer_settings)
    t3 = time.perf_counter()
    return predictions, Timings(t1 - t0, t2 - t1, t3 - t2, len(examples), len(features))


def evaluate(examples: Sequence[Example], version: str, forward: Forward, wordpiece: WordPiece,
             device: torch.device, **kwargs) -> tuple[SquadScore, dict[str, Prediction], Timings]:
    predictions, timings = predict(examples, forward, wordpiece, device, **kwargs)
    score = score_squad(examples, {q: p.text for q, p in predictions.items()}, version=version)
    return score, predictions, timings
