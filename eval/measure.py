"""One path from a build to its numbers: evaluate it on a question set (EM/F1, eval.qa) and time it at each profile
(eval.compare.time_profiles). `cli.py eval` (builds given on the command line), `cli.py sweep` (the grid) and
`cli.py sensitivity` (engines built in memory, accuracy only) all measure here, so a row means the same in each.

    questions = Questions(examples, version, feature_settings, answer_settings, wordpiece=wordpiece)
    measured = measure(build, questions, [(1, 128), (64, 384)], iterations=100, warmup=10)
    measured.result            # eval.report.BuildResult: EM, F1, latency per profile, engine size, build time

A `Build` is something runnable with what the report says about it; eval.runnables makes them (a model at a
precision, an engine file, an engine built in memory). `Questions` featurizes once per tokenizer and reuses the
features for every build measured on it. With no profiles, measure evaluates only (what sensitivity needs).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from eval.compare import time_profiles
from eval.report import BuildResult

if TYPE_CHECKING:
    import torch

    from data.answers import AnswerSettings, Prediction
    from data.features import FeatureSettings, Features
    from data.squad import Example
    from data.tokenizer import WordPiece
    from eval.qa import Timings
    from eval.squad_metrics import SquadScore


@dataclass
class Build:
    """Something runnable (a model, or an engine behind its GraphRunner), and its row's descriptive columns."""

    name: str                          # the row name (report, predictions/NAME.json)
    forward: Any                       # model.runner.Forward: the model, or a GraphRunner over an engine
    device: torch.device
    batch: int                         # features per forward when evaluating
    vocab_size: int                    # random tokens for timing are drawn below it
    wordpiece: WordPiece | None = None  # its tokenizer (an engine file's own); None: the questions' tokenizer
    label: str = ""                    # for messages: "int8.engine [cpu, --int8 -iln]"
    kind: str = "model"                # "model" or "engine"
    options: str = ""                  # the report's options column: "model fp32", "--int8 --fp16 -iln"
    calibration: str = "-"             # the report's calibration column
    engine_bytes: int | None = None    # the engine file's size
    build_s: float | None = None       # seconds the engine took to build
    precision: str | None = None       # a model's: fp32, fp16, bf16
    engine: Any = None                 # engines.runtime.Engine: policy, header.profiles, cfg
    path: str | None = None            # the model folder or engine file
    model_digest: str | None = None    # the weights it runs (a model's file digest, an engine header's)


@dataclass
class Questions:
    """The examples to evaluate on and how they are featurized and answered; features are made once per tokenizer
    (on first use, or by `featurized`) and reused by every build measured on this set."""

    examples: Sequence[Example]
    version: str                        # SQuAD version: "1.1", "2.0"
    feature_settings: FeatureSettings
    answer_settings: AnswerSettings
    wordpiece: WordPiece | None = None  # the tokenizer of builds that have none of their own
    cache: bool = True                  # read and write the featurized-data cache on disk
    progress: bool = True
    _features: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def featurized(self, wordpiece: WordPiece | None = None) -> tuple[Features, float | None]:
        """The features for `wordpiece` (default: this set's), and the seconds spent making them now (None: made
        earlier, reused)."""
        from common.errors import WorkbenchError
        from data.features import featurize

        wordpiece = wordpiece or self.wordpiece
        if wordpiece is None:
            raise WorkbenchError("no tokenizer to featurize the questions with")
        if wordpiece.digest in self._features:
            return self._features[wordpiece.digest], None
        t0 = time.perf_counter()
        features = featurize(self.examples, wordpiece, self.feature_settings, cache=self.cache,
                             progress=self.progress)
        self._features[wordpiece.digest] = features
        return features, time.perf_counter() - t0


@dataclass(frozen=True)
class Measured:
    result: BuildResult
    score: SquadScore                  # the official metrics (with the SQuAD v2.0 breakdown)
    predictions: dict[str, Prediction]
    timings: Timings                   # featurize, model, answers
    eval_s: float                      # evaluation: featurizing (when done now), forward, answers, scoring
    time_s: float                      # timing every profile


def measure(build: Build, questions: Questions, profiles: Sequence[tuple[int, int]] = (), *,
            iterations: int = 1, warmup: int = 0, is_baseline: bool = False, report_dir: str | Path | None = None,
            progress: bool | None = None, tolerance: float | None = None) -> Measured:
    """Evaluate `build` on `questions` and time it at each (batch, seq_len) of `profiles` (none: accuracy only).

    `report_dir`: its predictions go to REPORT_DIR/predictions/NAME.json (and NAME.nbest.json), named in the row.
    `progress`: the forward's progress bar (default: the questions'). Each profile is timed in rounds of
    `iterations` runs until two agree within `tolerance` (eval.benchmark.time_until_stable; None: the device's).
    """
    from data.answers import write_predictions
    from eval.qa import Timings, predict_features, score

    t0 = time.perf_counter()
    features, featurize_s = questions.featurized(build.wordpiece)
    predictions, model_s, answers_s = predict_features(
        questions.examples, features, build.forward, build.device, answer_settings=questions.answer_settings,
        batch_size=build.batch, progress=questions.progress if progress is None else progress)
    squad_score = score(questions.examples, questions.version, predictions)
    t1 = time.perf_counter()
    predictions_file = None
    if report_dir is not None:
        folder = Path(report_dir) / "predictions"
        write_predictions(predictions, folder / f"{build.name}.json", folder / f"{build.name}.nbest.json")
        predictions_file = f"predictions/{build.name}.json"
    t2 = time.perf_counter()
    latency = time_profiles(build.forward, profiles, build.vocab_size, build.device, iterations, warmup,
                            tolerance) if profiles else ()
    t3 = time.perf_counter()
    result = BuildResult(name=build.name, options=build.options, calibration=build.calibration,
                         is_baseline=is_baseline, exact_match=squad_score.exact_match, f1=squad_score.f1,
                         n_questions=squad_score.n, latency=latency, engine_bytes=build.engine_bytes,
                         build_s=build.build_s, predictions_file=predictions_file)
    timings = Timings(featurize_s or 0.0, model_s, answers_s, len(questions.examples), len(features),
                      features_reused=featurize_s is None)
    return Measured(result, squad_score, predictions, timings, t1 - t0, t3 - t2)


def settings_from_flags(flags, version_2: bool = False) -> tuple[FeatureSettings, AnswerSettings]:
    """The featurization and answer flags every verb that answers questions takes (max_seq_length, doc_stride,
    max_query_length, legacy_windows, n_best_size, max_answer_length, null_score_diff_threshold)."""
    from data.answers import AnswerSettings
    from data.features import FeatureSettings

    return (FeatureSettings(flags.max_seq_length, flags.doc_stride, flags.max_query_length, flags.legacy_windows),
            AnswerSettings(flags.n_best_size, flags.max_answer_length, version_2, flags.null_score_diff_threshold))


def device_text(device: torch.device, machine: dict | None = None) -> str:
    """The machine a figure was measured on, in words: "cpu: Intel(R) Xeon(R) ... (16 cores, 16 torch threads),
    torch 2.5.1" or "cuda: NVIDIA H100 80GB HBM3 (compute capability 9.0), torch 2.5.1, CUDA 12.4". `machine`:
    another process's `machine_key` (a Ray worker's), instead of this one's."""
    m = machine or machine_key(device)
    if device.type == "cuda":
        return f"cuda: {m['gpu']} (compute capability {m['compute_capability']}), torch {m['torch']}, CUDA {m['cuda']}"
    return f"cpu: {m['cpu']} ({m['cores']} cores, {m['threads']} torch threads), torch {m['torch']}"


def machine_key(device: torch.device) -> dict:
    """What latency depends on besides the build: the processor (GPU name and compute capability, or the CPU
    model, its cores and torch's threads) and the library versions. Rows timed under another key are re-timed."""
    import os
    import platform

    import torch

    key = {"type": device.type, "torch": torch.__version__}
    if device.type == "cuda":
        from engines.engine_file import this_gpu

        gpu = this_gpu(device)
        return {**key, "gpu": gpu[0] if gpu else None, "compute_capability": gpu[1] if gpu else None,
                "cuda": torch.version.cuda}
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name")) or cpu
    except (OSError, StopIteration):
        pass
    return {**key, "cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads()}


def workbench_commit() -> str:
    """The workbench's git commit (with "+ uncommitted changes" when the tracked files differ from it)."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return "unknown (not a git checkout)"
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (git not available)"
    return head.stdout.strip() + (" + uncommitted changes" if dirty else "")


def provenance(device: torch.device, **what: str | None) -> dict:
    """What a report's figures were measured on and when: device, `what` (model, data, ...: None left out), date
    (UTC) and the workbench commit; the caller adds how they were timed."""
    from datetime import datetime, timezone

    return {"device": device_text(device), **{k: v for k, v in what.items() if v is not None},
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "commit": workbench_commit()}


def release(device: torch.device) -> None:
    """Hand cached GPU memory back after a build is dropped (the next build gets all of it)."""
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()


__all__ = ["Build", "Measured", "Questions", "device_text", "machine_key", "measure", "provenance", "release",
           "settings_from_flags", "workbench_commit"]
