"""SQuAD prediction and evaluation for any forward (a model or an engine): one path for all.

`predict`/`evaluate` featurize and run; `predict_features` takes features made earlier (eval.measure featurizes a
question set once and reuses it for every build) and `score` scores predictions. `infer_from_flags` is `cli.py infer`
(with `answer_lines`, `answer_session`, `read_passage`, `read_questions` and `prompt`; EXAMPLES for its --help).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import torch

from common.errors import WorkbenchError
from data.answers import AnswerSettings, Prediction, extract_answers
from data.features import FeatureSettings, Features, featurize
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
    features_reused: bool = False   # the features were made earlier (for another build): featurize_s is 0

    def lines(self) -> list[str]:
        q = self.num_questions
        featurized = (f"featurize: {q} questions -> {self.num_features} features, made earlier and reused"
                      if self.features_reused else
                      f"featurize: {q} questions -> {self.num_features} features in {self.featurize_s:.2f} s "
                      f"({q / max(self.featurize_s, 1e-9):,.0f} questions/s)")
        return [featurized,
                f"model:     {self.num_features} features in {self.model_s:.2f} s "
                f"({q / max(self.model_s, 1e-9):,.0f} questions/s)",
                f"answers:   {self.answers_s:.2f} s"]


def predict_features(examples: Sequence[Example], features: Features, forward: Forward, device: torch.device, *,
                     answer_settings: AnswerSettings = AnswerSettings(), batch_size: int = 32,
                     progress: bool = True) -> tuple[dict[str, Prediction], float, float]:
    """Predictions from features made earlier, with the seconds spent in the forward and in answer extraction."""
    t0 = time.perf_counter()
    start, end = run_logits(forward, features, device, batch_size=batch_size, progress=progress)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t1 = time.perf_counter()
    predictions = extract_answers(examples, features, start, end, answer_settings)
    return predictions, t1 - t0, time.perf_counter() - t1


def predict(examples: Sequence[Example], forward: Forward, wordpiece: WordPiece, device: torch.device, *,
            feature_settings: FeatureSettings = FeatureSettings(), answer_settings: AnswerSettings = AnswerSettings(),
            batch_size: int = 32, cache: bool = True, progress: bool = True) -> tuple[dict[str, Prediction], Timings]:
    t0 = time.perf_counter()
    features = featurize(examples, wordpiece, feature_settings, cache=cache, progress=progress)
    featurize_s = time.perf_counter() - t0
    predictions, model_s, answers_s = predict_features(examples, features, forward, device,
                                                       answer_settings=answer_settings, batch_size=batch_size,
                                                       progress=progress)
    return predictions, Timings(featurize_s, model_s, answers_s, len(examples), len(features))


def score(examples: Sequence[Example], version: str, predictions: dict[str, Prediction]) -> SquadScore:
    """The official metrics of predictions (their best answers' text)."""
    return score_squad(examples, {q: p.text for q, p in predictions.items()}, version=version)


def evaluate(examples: Sequence[Example], version: str, forward: Forward, wordpiece: WordPiece,
             device: torch.device, **kwargs) -> tuple[SquadScore, dict[str, Prediction], Timings]:
    predictions, timings = predict(examples, forward, wordpiece, device, **kwargs)
    return score(examples, version, predictions), predictions, timings


# ------------------------------------------------------------------------------------------------ cli.py infer

EXAMPLES = """examples:
  python cli.py infer --model ../shared/models/minilm-l6-h384-squad11 \\
      -p "TensorRT is a high performance deep learning inference platform ..." -q "What is TensorRT?"
  python cli.py infer --model DIR -pf passage.txt -qf questions.txt --encoding latin-1   # files not in UTF-8
  python cli.py infer --model DIR            # interactive: a passage (lines until an empty one), then questions
  python cli.py infer -e engines/int8.engine -sq dev.json    # the TensorRT demo's -sq: every question of a SQuAD
      # file answered and scored, predictions.json written (as `cli.py eval --squad dev.json ENGINE`)"""


def answer_lines(context: str, questions: Sequence[str], forward: Forward, wordpiece: WordPiece,
                 device: torch.device, *, feature_settings: FeatureSettings, answer_settings: AnswerSettings,
                 batch_size: int) -> list[str]:
    """Each question about `context` answered: "Question: ..." and "Answer:   '...'  (probability, score)"."""
    from data.squad import examples_from_pairs

    examples = examples_from_pairs(context, questions)
    preds, _ = predict(examples, forward, wordpiece, device, feature_settings=feature_settings,
                       answer_settings=answer_settings, batch_size=batch_size, cache=False, progress=False)
    out = []
    for ex in examples:
        p = preds[ex.qid]
        best = p.nbest[0] if p.nbest else None
        detail = (f"probability {best.probability:.3f}, score {best.start_logit + best.end_logit:.2f}"
                  if best else "no answer found")
        out.append(f"Question: {ex.question}\nAnswer:   {p.text!r}  ({detail})")
    return out


def infer_from_flags(flags) -> None:
    """`cli.py infer`: its parsed flags (argparse.Namespace: passage, passage_file, question, question_file, model or
    engine, device, precision, trust_pickle, batch_size, fuse, and the feature and answer flags) run: each question
    answered on stdout."""
    from eval.measure import settings_from_flags
    from eval.runnables import load_builds

    passage = read_passage(flags.passage, flags.passage_file, flags.encoding)
    questions = read_questions(flags.question, flags.question_file, flags.encoding)
    fs, answer_settings = settings_from_flags(flags)
    if flags.engine and flags.model:
        raise WorkbenchError("give --model or -e/--engine, not both")
    if flags.squad and (passage is not None or questions):
        raise WorkbenchError("-sq/--squad-json answers the questions of a SQuAD file: drop -p/-pf/-q/-qf")
    if flags.squad:
        from eval.compare import check_outputs

        check_outputs(None, None, None)  # predictions.json, before anything slow
    b = load_builds(model=flags.model, engines=[flags.engine] if flags.engine else [], device=flags.device,
                    precision=flags.precision, trust_pickle=flags.trust_pickle, batch_size=flags.batch_size,
                    max_seq_length=fs.max_seq_length, fuse=flags.fuse, vocab_file=flags.vocab_file,
                    backend=flags.backend)[0]
    if flags.squad:
        from dataclasses import replace

        from data.squad import load_squad
        from eval.compare import evaluate_builds
        from eval.measure import Questions

        squad = load_squad(flags.squad)
        answer_settings = replace(answer_settings, version_2_with_negative=squad.version.startswith("2"))
        evaluate_builds([b], Questions(squad.examples, squad.version, fs, answer_settings, cache=not flags.no_cache,
                                       progress=not flags.no_progress), None, squad_path=flags.squad)
        return

    def answer(context: str, qs: list[str]) -> None:
        print("\n".join(answer_lines(context, qs, b.forward, b.wordpiece, b.device, feature_settings=fs,
                                     answer_settings=answer_settings, batch_size=b.batch)))

    answer_session(answer, passage, questions, b.label)


def answer_session(answer, passage: str | None, questions: Sequence[str], label: str) -> None:
    """`cli.py infer`: answer(passage, questions) at once when both are given; else ask for what is missing (the
    passage, which may span lines and ends at an empty line, then questions one at a time until an empty line or
    the end of input)."""
    import sys

    if passage is not None and questions:
        answer(passage, list(questions))
        return
    print(f"model: {label}. " + ("Type the passage: it may span several lines; an empty line ends it. Then "
                                 if passage is None else "")
          + "one question per line; an empty question or Ctrl-D quits.", file=sys.stderr)
    if passage is None and not (passage := read_passage_lines()):
        raise WorkbenchError("no passage given (use -p, -pf, or type one at the prompt)")
    for q in questions:
        answer(passage, [q])
    while not questions and (q := prompt("Question: ")):
        answer(passage, [q])


def prompt(text: str) -> str:
    """One line typed at the terminal, stripped; "" at the end of input."""
    try:
        return input(text).strip()
    except EOFError:
        return ""


def read_passage_lines() -> str:
    """A passage typed at the prompt: lines until an empty one (or the end of input), joined with spaces."""
    lines: list[str] = []
    while line := prompt("Passage: " if not lines else "         "):
        lines.append(line)
    return " ".join(lines)


def read_text(path: str, what: str, encoding: str = "utf-8") -> str:
    """A text file decoded strictly: bytes that are not `encoding` text end in one line, never as U+FFFD."""
    from common.files import read_bytes

    data = read_bytes(path, what)
    try:
        return data.decode(encoding)
    except LookupError:
        raise WorkbenchError(f"--encoding {encoding}: not an encoding Python knows") from None
    except UnicodeDecodeError as e:
        raise WorkbenchError(f"{path}: {what} is not {encoding} text (byte {e.start}: 0x{data[e.start]:02x}); "
                             "convert it to UTF-8, or name its encoding with --encoding (e.g. latin-1)") from None


def read_passage(texts: Sequence[str] | None, path: str | None, encoding: str = "utf-8") -> str | None:
    """-p words and the -pf file's text, joined with spaces; None when neither is given."""
    parts = list(texts or [])
    if path:
        parts.append(read_text(path, "passage file", encoding))
    return " ".join(p.strip() for p in parts) if parts else None


def read_questions(texts: Sequence[str] | None, path: str | None, encoding: str = "utf-8") -> list[str]:
    """-q questions, then the -qf file's non-empty lines; an empty -q question is an error."""
    qs = list(texts or [])
    if path:
        text = read_text(path, "question file", encoding)
        qs += [line.strip() for line in text.splitlines() if line.strip()]
    for i, q in enumerate(qs, 1):
        if not q.strip():
            raise WorkbenchError(f"question {i} is empty")
    return qs

