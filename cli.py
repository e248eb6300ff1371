#!/usr/bin/env python3
"""BERT INT8 workbench: calibrate, build, evaluate and compare INT8 builds of a SQuAD question-answering BERT.

Each verb is a small function over the packages: data/ (SQuAD, tokenization, features, answers), model/ (the
reference BERT), calib/, engines/, eval/. Problems with the user's input raise WorkbenchError, which ends here as
one line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import NamedTuple

from common.errors import WorkbenchError

EXAMPLES = {
    "build": """examples:
  python cli.py build --model DIR --fp16 -b 1 -s 128 -b 64 -s 384 -o engines/fp16.engine
  python cli.py build --model DIR --int8 --fp16 -iln -b 64 -s 384 --calib-cache calib.json -o engines/int8.engine
  python cli.py build --model bert-large --fp16 -b 1 -s 128 -o engines/large.engine    # random weights: timing""",
    "bench": """examples:
  python cli.py bench -e engines/int8.engine                  # every profile of the engine
  python cli.py bench -e engines/int8.engine -b 1 -s 128 --iterations 1000 --fuse
  python cli.py bench -e engines/int8.engine -b 64 -s 384 --padded 0.3   # 30% padding: the general graph""",
    "infer": """examples:
  python cli.py infer --model ../shared/models/minilm-l6-h384-squad11 \\
      -p "TensorRT is a high performance deep learning inference platform ..." -q "What is TensorRT?"
  python cli.py infer --model DIR -pf passage.txt -qf questions.txt
  python cli.py infer --model DIR            # interactive: asks for a passage, then questions""",
    "eval": """examples:
  python cli.py eval --squad ../shared/data/squad/dev-v1.1.json --model ../shared/models/minilm-l6-h384-squad11 \\
      --precision fp16 -o predictions.json --metrics-json metrics.json
  python cli.py eval --squad dev.json --model DIR --limit 50 --device cpu
  python cli.py eval --squad dev.json --model DIR engines/int8.engine engines/int8-iln.engine \
      --max-f1-drop 1.0 --report-dir report/          # the FP16 model is the baseline: table, files, plot
  python cli.py eval --squad dev.json engines/fp16.engine engines/int8.engine --profile 64x384""",
    "sweep": """examples:
  python cli.py sweep                     # the default: assets/ model and SQuAD files, CUDA if present
  python cli.py sweep --model DIR --calib-squad train.json --eval-squad dev.json -b 1 -s 128 -b 64 -s 384 \
      --report-dir report/
  python cli.py sweep --methods entropy max --options plain iln --eval-limit 500
  python cli.py sweep --grid grid.json    # rows: [{"name": "fp16", "fp16": true},
                                          #        {"name": "int8-mse-iln", "int8": true, "method": "mse", "iln": true}]""",
    "sensitivity": """examples:
  python cli.py calibrate --squad assets/squad/train-v1.1-calib-first-paragraphs.json.gz \
      --model assets/minilm-l6-h384-squad11 -o calib.json
  python cli.py sensitivity --calib-cache calib.json          # assets/ model and dev set; CUDA if present
  python cli.py sensitivity --model DIR --calib-cache calib.json --squad dev.json --max-f1-drop 0.5 \
      --report-dir sens/                                      # the table, sensitivity.png, sensitivity.json
  python cli.py sensitivity --calib-cache calib.json -iln --leave-one-out   # also all-but-one builds
  python cli.py sensitivity --calib-cache calib.json --device cpu --limit 20 --layers 0,5""",
    "calibrate": """examples:
  python cli.py calibrate --squad ../shared/data/squad/train-v1.1-explorer-reconstruction.json \\
      --model ../shared/models/minilm-l6-h384-squad11 --calib-num 100 --method entropy \\
      -o minilm.calib.json --trt-cache minilm.trtcache --eval-squad ../shared/data/squad/dev-v1.1.json
  python cli.py calibrate --squad train.json --model DIR --method percentile --percentile 99.99 -o calib.json
  python cli.py calibrate --squad train.json --model DIR -o calib.json --force   # recompute even if reusable""",
}


# ---------------------------------------------------------------- shared options

FUSE_HELP = ("CUDA: compile the engine's elementwise work into fused kernels (TorchInductor) before capturing "
             "its CUDA graphs; slower start, faster steady state")

def _add_model_args(p: argparse.ArgumentParser, precision: bool = True, required: bool = True) -> None:
    p.add_argument("--model", "-m", required=required, metavar="DIR",
                   help="Hugging Face-layout BERT QA folder (config.json, model.safetensors, vocab.txt/tokenizer.json)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow a pytorch_model.bin checkpoint (still loaded with weights_only=True)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when a GPU is present, else cpu")
    if precision:
        p.add_argument("--precision", choices=("fp32", "fp16", "bf16"), help="default: fp16 on cuda, fp32 on cpu")
    p.add_argument("--batch-size", type=int, default=None, help="features per forward (default: 64 cuda, 16 cpu)")


def _add_feature_args(p: argparse.ArgumentParser, short_s: bool = True) -> None:
    g = p.add_argument_group("featurization and answers")
    g.add_argument(*(("-s",) if short_s else ()), "--max-seq-length", type=int, default=384,
                   help="tokens per window (default 384)")
    g.add_argument("--doc-stride", type=int, default=128,
                   help="tokens shared by consecutive windows of a long passage (Hugging Face meaning; default 128)")
    g.add_argument("--max-query-length", type=int, default=64, help="question tokens kept (default 64)")
    g.add_argument("--legacy-windows", action="store_true",
                   help="reproduce tokenizers 0.23.2's windows, which drop context tokens past --max-seq-length "
                        "(the shared MiniLM's reference scores were measured on them)")
    g.add_argument("--n-best-size", type=int, default=20, help="candidate spans kept per question (default 20)")
    g.add_argument("--max-answer-length", type=int, default=30, help="longest answer in tokens (default 30)")
    g.add_argument("--null-score-diff-threshold", type=float, default=0.0,
                   help="SQuAD v2.0: predict no answer when null score > best span score + this (default 0)")
    g.add_argument("--no-cache", action="store_true", help="do not read or write the featurized-data cache")
    g.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _add_bench_args(p) -> None:
    """How `eval` and `sweep` time each build at its profiles."""
    p.add_argument("--bench-iterations", type=int, metavar="N",
                   help="timed runs per profile (default 100 on CUDA, 5 on the CPU)")
    p.add_argument("--bench-warmup", type=int, metavar="N", help="untimed runs first (default 10 on CUDA, 1 on the CPU)")


def _settings(args, version_2: bool = False):
    from data.answers import AnswerSettings
    from data.features import FeatureSettings

    return (FeatureSettings(args.max_seq_length, args.doc_stride, args.max_query_length, args.legacy_windows),
            AnswerSettings(args.n_best_size, args.max_answer_length, version_2, args.null_score_diff_threshold))


class Runnable(NamedTuple):
    """Something to evaluate: the model (`--model`) or an engine file, with what the comparison table needs."""

    forward: object
    wordpiece: object
    device: object
    label: str
    batch: int
    kind: str = "model"             # "model" or "engine"
    name: str = ""                  # the comparison table's: MODEL_FOLDER-PRECISION or the engine file's stem
    vocab_size: int = 0
    precision: str | None = None    # the model's: fp32, fp16, bf16
    engine: object = None           # engines.runtime.Engine (header, policy, profiles)
    path: str | None = None


def _runnables(args, feature_settings, engines=()) -> list[Runnable]:
    """--model (if given), then each engine file."""
    from model.runner import pick_device

    if not args.model and not engines:
        raise WorkbenchError("give a model (--model DIR) or engine files to run")
    out = [_load_runnable(args, feature_settings)] if args.model else []
    device = pick_device(args.device)
    for path in engines:
        out.append(_load_engine(path, args, feature_settings, device))
    return out


def _load_engine(path, args, feature_settings, device):
    from engines.build import load_runnable
    from engines.graphs import GraphRunner

    engine, wordpiece = load_runnable(path, device)
    if wordpiece is None:
        raise WorkbenchError(f"{path}: built from a random-weight preset, it has no tokenizer: use it with bench")
    longest = max(p.seq_len for p in engine.header.profiles)
    if feature_settings.max_seq_length > longest:
        raise WorkbenchError(f"{path}: its profiles serve sequences up to {longest} tokens; pass -s {longest} "
                             f"or rebuild it with -s {feature_settings.max_seq_length}")
    batch = max(p.batch for p in engine.header.profiles if p.seq_len >= feature_settings.max_seq_length)
    label = f"{Path(path).name} [{device.type}, {engine.policy.describe()}]"
    return Runnable(GraphRunner(engine, str(path), fuse=args.fuse), wordpiece, device, label, batch, kind="engine",
                    name=Path(path).name.removesuffix(".engine"), vocab_size=engine.cfg.vocab_size, engine=engine,
                    path=str(path))


def _load_runnable(args, feature_settings):
    """Model + tokenizer on the chosen device and precision."""
    import torch

    from data.tokenizer import load_wordpiece
    from model.checkpoint import load_model
    from model.runner import pick_device, pick_precision

    device = pick_device(args.device)
    dtype = pick_precision(args.precision, device)
    loaded = load_model(args.model, trust_pickle=args.trust_pickle)
    if loaded.model_dir is None:
        raise WorkbenchError(f"{args.model} is a random-weight timing preset with no vocabulary: "
                             "give a fine-tuned model folder to answer questions")
    if feature_settings.max_seq_length > loaded.config.max_position_embeddings:
        raise WorkbenchError(f"--max-seq-length {feature_settings.max_seq_length} exceeds the model's "
                             f"max_position_embeddings {loaded.config.max_position_embeddings}")
    wordpiece = load_wordpiece(loaded.model_dir, vocab_size=loaded.config.vocab_size)
    model = loaded.model.to(device=device, dtype=dtype).eval()
    batch = args.batch_size or (64 if device.type == "cuda" else 16)
    label = f"{Path(loaded.source).name} [{device.type}, {str(dtype).removeprefix('torch.')}]"
    precision = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    return Runnable(model, wordpiece, device, label, batch, kind="model", name=f"{Path(loaded.source).name}-{precision}",
                    vocab_size=loaded.config.vocab_size, precision=precision, path=str(loaded.source))


# ---------------------------------------------------------------- verbs

def cmd_infer(args) -> int:
    from data.squad import examples_from_pairs
    from eval.qa import predict

    passage = _passage(args)
    questions = _questions(args)
    feature_settings, answer_settings = _settings(args)
    if args.engine and args.model:
        raise WorkbenchError("give --model or -e/--engine, not both")
    model, wordpiece, device, label, batch = _runnables(args, feature_settings,
                                                        [args.engine] if args.engine else [])[0][:5]

    def answer(context: str, qs: list[str]) -> None:
        examples = examples_from_pairs(context, qs)
        preds, _ = predict(examples, model, wordpiece, device, feature_settings=feature_settings,
                           answer_settings=answer_settings, batch_size=batch, cache=False, progress=False)
        for ex in examples:
            p = preds[ex.qid]
            best = p.nbest[0] if p.nbest else None
            detail = (f"probability {best.probability:.3f}, score {best.start_logit + best.end_logit:.2f}"
                      if best else "no answer found")
            print(f"Question: {ex.question}\nAnswer:   {p.text!r}  ({detail})")

    if passage is not None and questions:
        answer(passage, questions)
        return 0
    # Interactive: ask for what was not given, then answer questions until an empty line or end of input.
    print(f"model: {label}. Empty question or Ctrl-D to quit.", file=sys.stderr)
    if passage is None:
        passage = _prompt("Passage: ")
        if not passage:
            raise WorkbenchError("no passage given (use -p, -pf, or type one at the prompt)")
    for q in questions:
        answer(passage, [q])
    if questions:
        return 0
    while q := _prompt("Question: "):
        answer(passage, [q])
    return 0


def _prompt(text: str) -> str:
    try:
        return input(text).strip()
    except EOFError:
        return ""


def _passage(args) -> str | None:
    parts = list(args.passage or [])
    if args.passage_file:
        from common.files import read_bytes
        parts.append(read_bytes(args.passage_file, "passage file").decode("utf-8", errors="replace"))
    return " ".join(p.strip() for p in parts) if parts else None


def _questions(args) -> list[str]:
    qs = list(args.question or [])
    if args.question_file:
        from common.files import read_bytes
        text = read_bytes(args.question_file, "question file").decode("utf-8", errors="replace")
        qs += [line.strip() for line in text.splitlines() if line.strip()]
    for i, q in enumerate(qs, 1):
        if not q.strip():
            raise WorkbenchError(f"question {i} is empty")
    return qs


def cmd_eval(args) -> int:
    from common.files import atomic_write_json
    from data.answers import write_predictions
    from data.squad import load_squad
    from eval.qa import evaluate

    if args.limit is not None and args.limit < 1:
        raise WorkbenchError(f"--limit must be at least 1, got {args.limit}")
    n_builds = (1 if args.model else 0) + len(args.engines)
    compare = n_builds > 1 or any(v is not None for v in (args.report_dir, args.baseline, args.max_f1_drop,
                                                           args.profile))
    plan = _ComparisonPlan(args) if compare else None  # checks the flags before anything slow runs
    squad = load_squad(args.squad, limit=args.limit)
    feature_settings, answer_settings = _settings(args, version_2=squad.version.startswith("2"))
    runnables = _runnables(args, feature_settings, args.engines)
    if compare:
        plan.resolve(runnables, feature_settings)
    results = {}
    for i, r in enumerate(runnables):
        forward, wordpiece, device, label, batch = r[:5]
        print(f"evaluating {label} on {len(squad.examples)} questions of {args.squad} (SQuAD v{squad.version})",
              file=sys.stderr)
        score, predictions, timings = evaluate(
            squad.examples, squad.version, forward, wordpiece, device, feature_settings=feature_settings,
            answer_settings=answer_settings, batch_size=batch, cache=not args.no_cache,
            progress=not args.no_progress)
        for line in timings.lines():
            print(line, file=sys.stderr)
        if args.output is not None or not args.report_dir:  # -o: one predictions file (per build when several)
            out = Path(args.output or "predictions.json")
            if len(runnables) > 1:  # one predictions file per model/engine, named after it
                out = out.with_name(f"{out.stem}.{label.split(' ')[0].removesuffix('.engine')}{out.suffix}")
            nbest = out.with_name(out.stem + ".nbest" + out.suffix)
            write_predictions(predictions, out, nbest)
            print(f"wrote {out} and {nbest}", file=sys.stderr)
        line = f"EM {score.exact_match:.2f}  F1 {score.f1:.2f}  ({score.n} questions)"
        if score.has_ans_n is not None or score.no_ans_n is not None:
            line += _v2_breakdown(score)
        print(line if len(runnables) == 1 else f"{label}: {line}")
        results[label] = score.to_json()
        if compare:
            plan.add(i, r, score, predictions)
    if args.metrics_json:
        atomic_write_json(args.metrics_json, next(iter(results.values())) if len(results) == 1 else results)
    if compare:
        plan.finish()
    return 0


class _ComparisonPlan:
    """`eval` with several builds (or --report-dir/--baseline/--max-f1-drop/--profile): time each build at its
    profiles, then one comparison table against the baseline (eval.report), optionally written to --report-dir."""

    def __init__(self, args):
        import math

        from eval.report import DEFAULT_MAX_F1_DROP, parse_profile

        self.args = args
        self.max_f1_drop = DEFAULT_MAX_F1_DROP if args.max_f1_drop is None else args.max_f1_drop
        if not (math.isfinite(self.max_f1_drop) and self.max_f1_drop >= 0):
            raise WorkbenchError(f"--max-f1-drop {args.max_f1_drop!r}: must be a finite number of F1 points >= 0")
        self.profile = parse_profile(args.profile) if args.profile else None
        if args.report_dir and Path(args.report_dir).exists() and not Path(args.report_dir).is_dir():
            raise WorkbenchError(f"{args.report_dir}: --report-dir is a file, expected a directory")
        self.choice = args.baseline or ("model" if args.model else "fp16")
        if self.choice == "model" and not args.model:
            raise WorkbenchError("--baseline model needs --model DIR")
        if self.choice == "fp16" and args.model:  # the FP16 baseline is the model run in FP16
            if args.precision not in (None, "fp16"):
                raise WorkbenchError(f"--baseline fp16 evaluates --model in FP16: drop --precision {args.precision}, "
                                     "or use --baseline model to compare against the model at its --precision")
            args.precision = "fp16"
        self.rows = []

    def resolve(self, runnables, feature_settings) -> None:
        """Row names, the baseline, the profiles each build is timed at, and the timing settings."""
        from eval.compare import bench_defaults, unique_names

        args = self.args
        self.runnables = runnables
        self.names = unique_names([r.name for r in runnables])
        engines = [i for i, r in enumerate(runnables) if r.kind == "engine"]
        if self.choice in ("fp16", "model") and args.model:
            self.baseline = 0
        elif self.choice == "fp16":
            fp16 = [i for i in engines if runnables[i].engine.policy.fp16 and not runnables[i].engine.policy.int8]
            if not fp16:
                raise WorkbenchError("no FP16 baseline: give --model DIR (evaluated in FP16 as the baseline), an engine "
                                     "built with --fp16 and without --int8, or --baseline ENGINE")
            if len(fp16) > 1:
                raise WorkbenchError(f"several FP16 engines without INT8 ({', '.join(self.names[i] for i in fp16)}): "
                                     "pick the baseline with --baseline ENGINE")
            self.baseline = fp16[0]
        else:
            wanted = Path(self.choice)
            match = [i for i in engines if Path(runnables[i].path).resolve() == wanted.resolve()
                     or self.names[i] == self.choice]
            if not match:
                raise WorkbenchError(f"--baseline {self.choice}: not one of the engine files given (or fp16, model)")
            self.baseline = match[0]
        engine_profiles = sorted({(p.batch, p.seq_len) for i in engines for p in runnables[i].engine.header.profiles})
        model_profiles = engine_profiles or [self.profile or (1, feature_settings.max_seq_length)]
        self.profiles = [model_profiles if r.kind == "model" else
                         sorted((p.batch, p.seq_len) for p in r.engine.header.profiles) for r in runnables]
        if self.profile is not None:
            missing = [self.names[i] for i, ps in enumerate(self.profiles) if self.profile not in ps]
            if missing:
                raise WorkbenchError(f"--profile {self.profile[0]}x{self.profile[1]}: not a profile of "
                                     f"{', '.join(missing)}")
        self.iterations, self.warmup = bench_defaults(runnables[0].device, args.bench_iterations, args.bench_warmup)

    def add(self, i: int, r: Runnable, score, predictions) -> None:
        """Time build `i` and keep its row (its predictions go to --report-dir/predictions/NAME.json)."""
        from data.answers import write_predictions
        from eval.compare import calibration_of_engine, latency_line, time_profiles
        from eval.report import BuildResult

        name, pred_file = self.names[i], None
        if self.args.report_dir:
            folder = Path(self.args.report_dir) / "predictions"
            write_predictions(predictions, folder / f"{name}.json", folder / f"{name}.nbest.json")
            pred_file = f"predictions/{name}.json"
        latency = time_profiles(r.forward, self.profiles[i], r.vocab_size, r.device, self.iterations, self.warmup)
        print(f"{name}: {latency_line(latency)} (median of {self.iterations} after {self.warmup} warm-up)",
              file=sys.stderr)
        if r.kind == "engine":
            header = r.engine.header
            options = r.engine.policy.describe()
            calibration = calibration_of_engine(header.calib_digest, header.calibration)
            size, build_s = Path(r.path).stat().st_size, header.build_seconds
        else:
            options, calibration, size, build_s = f"model {r.precision}", "-", None, None
        self.rows.append(BuildResult(name=name, options=options, calibration=calibration, is_baseline=i == self.baseline,
                                     exact_match=score.exact_match, f1=score.f1, n_questions=score.n, latency=latency,
                                     engine_bytes=size, build_s=build_s, predictions_file=pred_file))

    def finish(self) -> None:
        from eval.report import build_report, render_text, write_report_dir

        report = build_report(self.rows, self.max_f1_drop, self.profile)
        print()
        print(render_text(report), end="")
        if self.args.report_dir:
            files = write_report_dir(report, self.args.report_dir)
            print(f"wrote {', '.join(str(p) for p in files.values())} and the predictions in "
                  f"{Path(self.args.report_dir) / 'predictions'}", file=sys.stderr)


def cmd_sweep(args) -> int:
    from data.squad import parse_question_limit
    from eval.compare import bench_defaults
    from eval.report import parse_profile
    from eval.sweep import (DEVICE_DEFAULTS, SweepConfig, default_grid, final_lines, load_grid, pair_profiles,
                            run_sweep, select_rows)
    from model.runner import pick_device

    _warnings_to_stderr("calib", "data", "engines")
    device = pick_device(args.device)
    defaults = DEVICE_DEFAULTS[device.type]
    feature_settings, answer_settings = _settings(args)
    half = defaults.half if args.precision is None else args.precision == "fp16"
    eval_limit = (defaults.eval_limit if args.eval_limit is None
                  else parse_question_limit(args.eval_limit, "--eval-limit"))
    calib_num = defaults.calib_num if args.calib_num is None else args.calib_num
    profiles = pair_profiles(args.batch_size, args.seq_length, defaults.profiles, feature_settings.max_seq_length)
    iterations, warmup = bench_defaults(device, args.bench_iterations, args.bench_warmup)
    grid = default_grid(half) if args.grid == "default" else load_grid(args.grid)
    grid = select_rows(grid, args.methods, args.options)
    if device.type == "cpu":
        said = [f"{'the first ' + str(eval_limit) if eval_limit else 'all'} evaluation questions (--eval-limit; "
                "CUDA's default is all of them)" if args.eval_limit is None else None,
                f"{calib_num} calibration questions (--calib-num; 100 on CUDA)" if args.calib_num is None else None,
                f"profile {', '.join(f'{b}x{s}' for b, s in profiles)} (-b/-s; 1x128 and 64x384 on CUDA)"
                if not (args.batch_size or args.seq_length) else None,
                f"{iterations} timed runs per profile (--bench-iterations; 100 on CUDA)"
                if args.bench_iterations is None else None,
                "FP32 for what is not INT8 (--precision; FP16 on CUDA, emulated and slow on the CPU)"
                if args.precision is None else None]
        said = [s for s in said if s]
        if said:
            print(f"on the CPU{'' if args.device else ' (no CUDA GPU)'}: a quick sweep with {'; '.join(said)}. "
                  "Accuracy on so few questions and CPU latency are not what a GPU run reports.", flush=True)
    cfg = SweepConfig(
        model=args.model, calib_squad=args.calib_squad, eval_squad=args.eval_squad, report_dir=args.report_dir,
        grid=grid, profiles=profiles, device=device, half=half, calib_num=calib_num, eval_limit=eval_limit,
        feature_settings=feature_settings, answer_settings=answer_settings, bench_iterations=iterations,
        bench_warmup=warmup, seed=args.seed, max_f1_drop=args.max_f1_drop,
        selection_profile=parse_profile(args.profile) if args.profile else None, force=args.force,
        feature_cache=not args.no_cache, progress=not args.no_progress, trust_pickle=args.trust_pickle)
    try:
        result = run_sweep(cfg)
    except KeyboardInterrupt:
        print(f"finished rows are stored in {Path(args.report_dir) / 'rows'}: rerun the same command to resume",
              file=sys.stderr)
        raise
    print(final_lines(result, args.report_dir), end="")
    return 0


def cmd_sensitivity(args) -> int:
    from data.squad import parse_question_limit
    from eval.sensitivity import (CPU_LIMIT, SensitivityConfig, parse_options, render_text,
                                  run_sensitivity, write_report)
    from model.runner import pick_device

    _warnings_to_stderr("calib", "data", "engines")
    device = pick_device(args.device)
    feature_settings, answer_settings = _settings(args)
    iln, imh = parse_options(args.options)
    limit = ((CPU_LIMIT if device.type == "cpu" else None) if args.limit is None
             else parse_question_limit(args.limit))
    half = device.type == "cuda" if args.precision is None else args.precision == "fp16"
    if device.type == "cpu" and (args.limit is None or args.precision is None):
        said = [f"the first {limit} questions (--limit; CUDA's default is all of them)" if args.limit is None else None,
                "FP32 for what is not INT8 (--precision; FP16 on CUDA)" if args.precision is None else None]
        coarse = (" F1 differences on so few questions are coarse: read the ranking, not the decimals."
                  if limit is not None and limit <= 500 else "")
        print(f"on the CPU{'' if args.device else ' (no CUDA GPU)'}: {'; '.join(s for s in said if s)}.{coarse}",
              flush=True)
    cfg = SensitivityConfig(
        model=args.model, calib_cache=args.calib_cache, squad=args.squad, device=device, half=half, limit=limit,
        feature_settings=feature_settings, answer_settings=answer_settings, iln=args.iln or iln,
        imh=args.imh or imh, layers=args.layers, groups=not args.no_groups, leave_one_out=args.leave_one_out,
        max_f1_drop=args.max_f1_drop, refine=args.refine, trim=args.trim, batch_size=args.batch_size,
        feature_cache=not args.no_cache, progress=not args.no_progress, trust_pickle=args.trust_pickle)
    if Path(args.report_dir).exists() and not Path(args.report_dir).is_dir():
        raise WorkbenchError(f"{args.report_dir}: --report-dir is a file, expected a directory")
    result = run_sensitivity(cfg)
    files = write_report(result, args.report_dir)
    print()
    print(render_text(result), end="")
    print(f"wrote {', '.join(str(p) for p in files.values())}", file=sys.stderr)
    return 0


def cmd_build(args) -> int:
    import itertools
    import time

    from calib.cache import load_cache
    from quant.policy import PrecisionPolicy, parse_gemm_list
    from common.files import cache_root
    from data.tokenizer import load_wordpiece
    from engines.build import build_engine, kernel_choices
    from engines.engine_file import Profile, save_engine
    from engines.tuning import TimingCache
    from model.checkpoint import load_model
    from model.runner import pick_device

    t0 = time.perf_counter()
    device = pick_device(args.device)
    policy = PrecisionPolicy(int8=args.int8, fp16=args.fp16, iln=args.iln, imh=args.imh, strict=args.strict,
                             fc2_library_gemm=args.g, fp16_gemms=parse_gemm_list(args.keep_fp16))
    profiles = [Profile(b, s) for b, s in itertools.product(args.batch_size or [1], args.seq_length or [128])]
    calib = load_cache(args.calib_cache) if args.calib_cache else None
    if calib is not None and not args.int8:
        print("warning: --calib-cache is not used without --int8", file=sys.stderr)
    loaded = load_model(args.model, trust_pickle=args.trust_pickle)
    wordpiece = load_wordpiece(loaded.model_dir, vocab_size=loaded.config.vocab_size) if loaded.model_dir else None
    timing = TimingCache(args.timing_cache or cache_root() / "timing.json") if device.type == "cuda" else None
    header, tensors = build_engine(loaded, policy, profiles, calib, device, wordpiece, timing)
    if timing is not None and policy.int8:
        print(f"{timing.summary()} ({timing.path})", file=sys.stderr)
        for line in kernel_choices(header):
            print(f"kernels {line}", file=sys.stderr)
    save_engine(args.output, header, tensors)
    size = Path(args.output).stat().st_size / 2**20
    print(f"built {args.output}: {policy.describe()}, profiles {', '.join(map(str, profiles))}, {device.type}"
          f"{' (' + header.gpu_name + ')' if header.gpu_name else ''}, {size:.1f} MiB in "
          f"{time.perf_counter() - t0:.1f} s")
    return 0


def cmd_bench(args) -> int:
    from engines.build import load_runnable
    from engines.engine_file import Profile
    from engines.graphs import GraphRunner
    from eval.benchmark import Latency, random_inputs, time_compute, time_end_to_end, time_pipelined
    from eval.gpu_state import GpuMonitor
    from model.runner import pick_device

    if args.iterations < 1 or args.warmup < 0:
        raise WorkbenchError("--iterations must be at least 1 and --warmup at least 0")
    device = pick_device(args.device)
    engine, _ = load_runnable(args.engine, device)
    runner = GraphRunner(engine, args.engine, fuse=args.fuse)
    profiles = engine.header.profiles
    if args.batch_size or args.seq_length:  # what is not given comes from the profiles
        shapes = [Profile(b, s) for b in args.batch_size or sorted({p.batch for p in profiles})
                  for s in args.seq_length or sorted({p.seq_len for p in profiles})]
    else:
        shapes = list(profiles)
    padding = f"{args.padded:.0%} of each sequence padded" if args.padded else \
        "no padding (the graph whose attention takes no mask; --padded times the general one)"
    print(f"{args.engine}: {engine.policy.describe()} on {device.type}"
          f"{' (' + engine.header.gpu_name + ')' if engine.header.gpu_name else ''}; "
          f"median of {args.iterations} after {args.warmup} warm-up; {padding}")
    with GpuMonitor(device) as gpu:  # sampling from the start; only the timed calls are read
        for shape in shapes:
            x = random_inputs(shape.batch, shape.seq_len, engine.cfg.vocab_size, device, padded=args.padded)
            compute = Latency.from_samples(shape.batch, shape.seq_len, time_compute(
                runner, x, args.iterations, args.warmup, device, gpu, phase=str(shape)))
            e2e = Latency.from_samples(shape.batch, shape.seq_len,
                                       time_end_to_end(runner, x, args.iterations, args.warmup, device))
            piped = time_pipelined(runner, x, args.iterations, args.warmup)
            print(f"compute     {compute.row()}\n"
                  + (f"  GPU while timing compute: {gpu.summary(str(shape))}\n" if device.type == "cuda" else "")
                  + f"end-to-end  {e2e.row()}\n"
                  f"pipelined   {shape.batch:>5} x {shape.seq_len:<4}  mean   {piped:8.3f} ms per batch with copies "
                  f"overlapping compute  {shape.batch / piped * 1e3:10,.0f} seq/s")
    return 0


def cmd_calibrate(args) -> int:
    from calib.calibrate import CalibrationSpec, calibrate, load_calibration_model, summary_lines
    from calib.trt_cache import write_trt_cache
    from data.features import FeatureSettings
    from data.squad import load_squad
    from model.runner import pick_device

    _warnings_to_stderr("calib", "data")
    if args.calib_num < 1:
        raise WorkbenchError(f"--calib-num must be at least 1, got {args.calib_num}")
    if args.batch_size is not None and args.batch_size < 1:
        raise WorkbenchError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.seed < 0:
        raise WorkbenchError(f"--seed must be >= 0, got {args.seed}")
    if args.trt_cache and Path(args.trt_cache).is_dir():
        raise WorkbenchError(f"{args.trt_cache}: is a directory, expected a TensorRT calibration cache file name")
    spec = CalibrationSpec(args.method, args.calib_num, args.seed, args.percentile,
                           features=FeatureSettings(args.max_seq_length, args.doc_stride, args.max_query_length),
                           smooth=args.smooth)
    if args.trt_cache and args.smooth is not None:
        raise WorkbenchError("--trt-cache: TensorRT's calibration cache holds one scale per tensor and cannot express "
                             "--smooth (per-channel input scales folded into the weights); calibrate without "
                             "--smooth for TensorRT")
    device = pick_device(args.device)
    squad = load_squad(args.squad)
    eval_squad = load_squad(args.eval_squad) if args.eval_squad else None
    loaded, wordpiece = load_calibration_model(args.model, trust_pickle=args.trust_pickle)
    run = calibrate(squad, loaded, wordpiece, spec, device=device,
                    batch_size=args.batch_size or (64 if device.type == "cuda" else 16), output=args.output,
                    force=args.force, eval_squad=eval_squad, progress=not args.no_progress)
    if run.reused:
        print(f"reused calibration cache {args.output} ({run.cache.method}, {run.cache.num_samples} questions)",
              file=sys.stderr)
    if args.trt_cache:
        write_trt_cache(args.trt_cache, run.cache.ranges, run.cache.method)
        print(f"wrote TensorRT calibration cache {args.trt_cache}", file=sys.stderr)
    print("\n".join(summary_lines(run)))
    return 0


class _StderrWarnings(logging.Handler):
    """Library warnings (damaged caches, questions beyond the data, overlaps) as one `warning: ...` line."""

    def emit(self, record: logging.LogRecord) -> None:
        print(f"warning: {record.getMessage()}", file=sys.stderr)


def _warnings_to_stderr(*loggers: str) -> None:
    for name in loggers:
        logger = logging.getLogger(name)
        if not any(isinstance(h, _StderrWarnings) for h in logger.handlers):
            logger.addHandler(_StderrWarnings(logging.WARNING))


def _v2_breakdown(score) -> str:
    parts = []
    if score.has_ans_n:
        parts.append(f"HasAns EM {score.has_ans_exact:.2f} F1 {score.has_ans_f1:.2f} ({score.has_ans_n})")
    if score.no_ans_n:
        parts.append(f"NoAns EM {score.no_ans_exact:.2f} F1 {score.no_ans_f1:.2f} ({score.no_ans_n})")
    return "  |  " + "  |  ".join(parts)


# ---------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cli.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    def verb(name: str, help_: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_, description=help_, epilog=EXAMPLES.get(name),
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    p = verb("infer", "answer questions about a passage")
    _add_model_args(p, required=False)
    p.add_argument("-e", "--engine", metavar="ENGINE", help="run an engine file instead of --model")
    p.add_argument("--fuse", action="store_true", help=FUSE_HELP)
    p.add_argument("-p", "--passage", nargs="+", help="passage text (several are joined with spaces)")
    p.add_argument("-pf", "--passage-file", metavar="FILE", help="read the passage from a text file")
    p.add_argument("-q", "--question", nargs="+", help="one or more questions about the passage")
    p.add_argument("-qf", "--question-file", metavar="FILE", help="questions, one per line")
    _add_feature_args(p)
    p.set_defaults(func=cmd_infer)

    p = verb("eval", "evaluate a model and/or engines on a SQuAD file: official EM/F1 and predictions")
    p.add_argument("--squad", required=True, metavar="FILE", help="SQuAD v1.1 or v2.0 JSON (e.g. dev-v1.1.json)")
    p.add_argument("engines", nargs="*", metavar="ENGINE", help="engine files (from `cli.py build`) to evaluate")
    _add_model_args(p, required=False)
    p.add_argument("--fuse", action="store_true", help=FUSE_HELP)
    p.add_argument("--limit", type=int, metavar="N", help="evaluate only the first N questions")
    p.add_argument("-o", "--output", metavar="FILE",
                   help="official-format predictions {id: answer} (default predictions.json, or none with "
                        "--report-dir; the n-best list goes beside it as *.nbest.json; with several builds one file "
                        "each, named FILE.BUILD.json)")
    p.add_argument("--metrics-json", metavar="FILE", help='write {"exact_match": .., "f1": .., "n": ..}')
    g = p.add_argument_group(
        "comparing builds",
        "With several builds (or any of these flags) eval also times each build at each of its engine profiles "
        "(the model at the profiles the engines have) and prints one table: options, calibration, EM, F1, ΔEM/ΔF1 "
        "against the baseline, median/p99 latency, throughput and speed-up per profile, engine size, build time; "
        "the chosen build is the fastest at the selection profile whose F1 is within --max-f1-drop of the baseline.")
    g.add_argument("--baseline", metavar="fp16|model|ENGINE",
                   help="what the others are compared with. fp16: --model evaluated in FP16 (--precision must be "
                        "fp16 or unset), or without --model the one engine built with --fp16 and without --int8; "
                        "model: --model at its --precision; ENGINE: one of the engine files given. Default: model "
                        "when --model is given (FP16 on CUDA), else fp16")
    g.add_argument("--max-f1-drop", type=float, metavar="X",
                   help="F1 points a build may lose against the baseline and still be chosen (default 1.0)")
    g.add_argument("--profile", metavar="BxS",
                   help="selection profile, e.g. 64x384 (default: the largest batch x length every build has)")
    g.add_argument("--report-dir", metavar="DIR",
                   help="write report.md, report.csv, report.json, pareto.png (F1 against latency, the front and "
                        "the chosen build marked) and predictions/BUILD.json there")
    _add_bench_args(g)
    _add_feature_args(p)
    p.set_defaults(func=cmd_eval)

    p = verb("sweep", "the workbench's answer: build the grid of INT8 builds and the FP16 baseline, evaluate and time "
                      "each, and pick the fastest build within the F1 budget")
    p.description += (
        ". The default grid: FP16; INT8 x {entropy, entropy --smooth 0.8, percentile 99.9, percentile 99.99, mse, "
        "max} x {plain, -iln, "
        "-imh, -iln -imh}; x --sparse when the model's GEMM weights are 2:4 sparse (sparse engines are not "
        "available yet: those rows are skipped, with the reason). Calibration caches, kernel timings and featurized "
        "questions are reused from the workbench cache. Resumable: each finished row is stored in "
        "REPORT_DIR/rows/ with a key of all its inputs, and a rerun skips the rows whose inputs did not change. "
        "Without arguments it runs on the model and SQuAD files in assets/, on CUDA when present; on the CPU it "
        "evaluates 30 questions, calibrates on 20, times one 1x384 profile 5 times and runs the non-INT8 work in "
        "FP32 (it says so).")
    from eval.sweep import (DEFAULT_CALIB_SQUAD, DEFAULT_EVAL_SQUAD, DEFAULT_MODEL, DEFAULT_REPORT_DIR, METHODS,
                            OPTION_SETS)

    def here(path: Path) -> str:
        try:
            return str(path.relative_to(Path.cwd()))
        except ValueError:
            return str(path)

    p.add_argument("--model", "-m", default=str(DEFAULT_MODEL), metavar="DIR",
                   help=f"Hugging Face-layout BERT QA folder (default {here(DEFAULT_MODEL)})")
    p.add_argument("--trust-pickle", action="store_true", help="allow a pytorch_model.bin checkpoint")
    p.add_argument("--calib-squad", default=str(DEFAULT_CALIB_SQUAD), metavar="FILE",
                   help=f"SQuAD file to calibrate on (default {here(DEFAULT_CALIB_SQUAD)}: a subset of train)")
    p.add_argument("--eval-squad", default=str(DEFAULT_EVAL_SQUAD), metavar="FILE",
                   help=f"SQuAD file to evaluate on (default {here(DEFAULT_EVAL_SQUAD)}: the official v1.1 dev set)")
    p.add_argument("--grid", default="default", metavar="default|FILE",
                   help="the builds: the default grid, or a JSON file listing rows (see eval/sweep.py load_grid)")
    p.add_argument("--methods", nargs="+", choices=[*METHODS, "percentile"], metavar="METHOD",
                   help=f"only INT8 rows calibrated by these ({', '.join(METHODS)}; percentile = both)")
    p.add_argument("--options", nargs="+", choices=list(OPTION_SETS), metavar="OPTIONS",
                   help=f"only INT8 rows with these option sets ({', '.join(OPTION_SETS)})")
    p.add_argument("-b", "--batch-size", type=int, action="append", metavar="B",
                   help="profile batch size; -b and -s pair up in order (-b 1 -s 128 -b 64 -s 384: profiles 1x128 "
                        "and 64x384), a single value goes with all of the other (default: 1x128 and 64x384 on CUDA, "
                        "1x384 on the CPU)")
    p.add_argument("-s", "--seq-length", type=int, action="append", metavar="S",
                   help="profile sequence length (default --max-seq-length when only -b is given)")
    p.add_argument("--precision", choices=("fp16", "fp32"),
                   help="what is not INT8 runs in (the baseline too; default fp16 on CUDA, fp32 on the CPU)")
    p.add_argument("--calib-num", type=int, metavar="N",
                   help="calibration questions (default 100 on CUDA, 20 on the CPU)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration question draw (default 0)")
    p.add_argument("--eval-limit", metavar="N|all",
                   help="evaluate on the first N questions (default all on CUDA, 30 on the CPU)")
    p.add_argument("--max-f1-drop", type=float, default=1.0, metavar="X",
                   help="F1 points a build may lose against the baseline and still be chosen (default 1.0)")
    p.add_argument("--profile", metavar="BxS",
                   help="selection profile, e.g. 64x384 (default: the largest batch x length)")
    p.add_argument("--report-dir", default=DEFAULT_REPORT_DIR, metavar="DIR",
                   help=f"where rows/, engines/, predictions/ and the report go (default {DEFAULT_REPORT_DIR})")
    _add_bench_args(p)
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when a GPU is present, else cpu")
    p.add_argument("--force", action="store_true",
                   help="recompute every row and rebuild every engine (calibration caches are still reused)")
    _add_feature_args(p, short_s=False)
    p.set_defaults(func=cmd_sweep)

    p = verb("sensitivity", "which INT8 GEMMs cost the most F1: quantize one GEMM at a time, show a layer x kind table "
                            "and heat-map, and suggest (then build and measure) a mixed-precision build")
    p.description += (
        ". Every variant is an engine built in memory from --model and --calib-cache and evaluated on the same "
        "questions (featurized once): the baseline without INT8 at the same precision; all INT8; for each GEMM "
        "(layerN.qkv, attn_out, fc1, fc2) a build where only it is INT8 (the others kept out, as --keep-fp16 does), "
        "whose F1 drop against the baseline is its sensitivity; each whole layer and each GEMM kind as one group "
        "(--no-groups skips them); with --leave-one-out also all-INT8-but-one builds (F1 recovered); with -iln/-imh "
        "those points stay INT8 in every variant and their own cost is measured too. The suggestion keeps the GEMMs "
        "with the largest single-GEMM drops out of INT8 until the estimated drop (the sum of the single-GEMM drops "
        "left in INT8) fits --max-f1-drop, then builds and evaluates it and reports its measured F1 and the "
        "`cli.py build --keep-fp16 ...` command that reproduces it. On the CPU it evaluates 50 questions and runs the "
        "rest in FP32 unless told (it says so); on CUDA all questions in FP16. Writes sensitivity.md, "
        "sensitivity.json, sensitivity.png (and leave-one-out.png) to --report-dir.")
    p.add_argument("--model", "-m", default=str(DEFAULT_MODEL), metavar="DIR",
                   help=f"Hugging Face-layout BERT QA folder (default {here(DEFAULT_MODEL)})")
    p.add_argument("--trust-pickle", action="store_true", help="allow a pytorch_model.bin checkpoint")
    p.add_argument("--calib-cache", required=True, metavar="FILE",
                   help="calibration cache of this model from `cli.py calibrate` (its ranges scale every variant)")
    p.add_argument("--squad", default=str(DEFAULT_EVAL_SQUAD), metavar="FILE",
                   help=f"SQuAD file to evaluate on (default {here(DEFAULT_EVAL_SQUAD)}: the official v1.1 dev set)")
    p.add_argument("--limit", metavar="N|all",
                   help="evaluate the first N questions (default 50 on the CPU, all on CUDA)")
    p.add_argument("-iln", "--int8-layernorm", dest="iln", action="store_true",
                   help="analyse builds with -iln (INT8 skip-LayerNorm outputs, in every variant)")
    p.add_argument("-imh", "--int8-mha", dest="imh", action="store_true",
                   help="analyse builds with -imh (INT8 attention, in every variant)")
    p.add_argument("--options", nargs="+", metavar="OPTIONS",
                   help="the same as option sets of `cli.py sweep`: plain, iln, imh, iln-imh (or --options=-iln)")
    p.add_argument("--layers", metavar="LIST",
                   help="analyse only these layers, e.g. 0,3,5 or 0-2 (default all); the others stay INT8")
    p.add_argument("--leave-one-out", action="store_true",
                   help="also build all INT8 but one GEMM, for each GEMM: the F1 it recovers (twice the builds)")
    p.add_argument("--no-groups", action="store_true",
                   help="skip the per-layer and per-kind group builds (only one GEMM INT8 per build)")
    p.add_argument("--max-f1-drop", type=float, default=1.0, metavar="X",
                   help="F1 points the suggested build may lose against the baseline (default 1.0)")
    p.add_argument("--refine", type=int, default=2, metavar="N",
                   help="when the suggested build misses the budget, keep the next most sensitive GEMM too and "
                        "measure again, at most N times (default 2)")
    p.add_argument("--trim", type=int, default=4, metavar="N",
                   help="when the suggested build is within the budget, return its kept GEMMs to INT8 one at a time, "
                        "cheapest first, keeping each change whose measured drop still fits: at most N tries, each "
                        "one engine build + evaluation (default 4; 0: off)")
    p.add_argument("--report-dir", default="sensitivity-report", metavar="DIR",
                   help="where sensitivity.md, sensitivity.json and the heat-maps go (default sensitivity-report)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when a GPU is present, else cpu")
    p.add_argument("--precision", choices=("fp16", "fp32"),
                   help="what is not INT8 runs in, the baseline too (default fp16 on CUDA, fp32 on the CPU)")
    p.add_argument("--batch-size", type=int, default=None, help="features per forward (default: 64 cuda, 16 cpu)")
    _add_feature_args(p)
    p.set_defaults(func=cmd_sensitivity)

    p = verb("calibrate", "INT8 calibration: per-tensor ranges of the FP32 model over SQuAD questions")
    p.add_argument("--squad", required=True, metavar="FILE",
                   help="SQuAD JSON to draw calibration questions from (use train, not the evaluation set)")
    _add_model_args(p, precision=False)
    p.add_argument("--calib-num", type=int, default=100, metavar="N",
                   help="SQuAD questions to calibrate on (default 100; a question may give several features): "
                        "drawn without replacement by numpy default_rng(SEED).choice and kept in file order; "
                        "all of them when the file has fewer")
    p.add_argument("--seed", type=int, default=0, help="seed of the question draw (default 0)")
    p.add_argument("--method", choices=("entropy", "percentile", "mse", "max"), default="entropy",
                   help="how a range is picked from the activations (default entropy, TensorRT's "
                        "EntropyCalibrator2)")
    p.add_argument("--percentile", type=float, default=99.99, metavar="P",
                   help="percentile of |x| kept by --method percentile (default 99.99)")
    p.add_argument("--smooth", type=float, metavar="ALPHA", nargs="?", const=0.8,
                   help="SmoothQuant-style smoothing of the QKV, FC1 and FC2 inputs (LayerNorm and GELU outputs): "
                        "their outlier channels move into the weights (quantized per row), so the per-tensor INT8 "
                        "range fits the rest; ALPHA is the migration strength in [0, 1] (--smooth alone: 0.8). Such "
                        "caches quantize those inputs per channel, which TensorRT's calibration cache cannot hold")
    p.add_argument("-o", "--output", required=True, metavar="CACHE",
                   help="calibration cache (JSON with a checksum); reused when made from the same inputs")
    p.add_argument("--trt-cache", metavar="FILE",
                   help="also write TensorRT's calibration-cache text; tensor names are our site names")
    p.add_argument("--force", action="store_true", help="recompute even when the cache at -o is reusable")
    p.add_argument("--eval-squad", metavar="FILE",
                   help="the evaluation file: warn when calibration questions share ids or contexts with it")
    g = p.add_argument_group("featurization")
    g.add_argument("-s", "--max-seq-length", type=int, default=384, help="tokens per window (default 384)")
    g.add_argument("--doc-stride", type=int, default=128,
                   help="tokens shared by consecutive windows of a long passage (default 128)")
    g.add_argument("--max-query-length", type=int, default=64, help="question tokens kept (default 64)")
    g.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=cmd_calibrate)

    p = verb("build", "build an engine file (FP16/FP32, or INT8 from a calibration cache)")
    p.add_argument("--model", "-m", required=True, metavar="DIR",
                   help="Hugging Face-layout BERT QA folder, or a random-weight preset (bert-base, bert-large) "
                        "for timing")
    p.add_argument("--trust-pickle", action="store_true", help="allow a pytorch_model.bin checkpoint")
    p.add_argument("-o", "--output", required=True, metavar="ENGINE", help="engine file to write")
    p.add_argument("--device", choices=("cpu", "cuda"),
                   help="where the engine will run (default: cuda when present); a cuda engine is tied to its GPU")
    p.add_argument("--fp16", action="store_true", help="run what is not INT8 in FP16 (default FP32)")
    p.add_argument("--int8", action="store_true",
                   help="INT8 GEMMs: per-channel weight scales, activation scales from --calib-cache")
    p.add_argument("--strict", action="store_true",
                   help="no fallback to higher precision for layers the flags quantize (our engine never falls "
                        "back, so this only records the intent)")
    p.add_argument("-iln", "--int8-layernorm", dest="iln", action="store_true",
                   help="INT8 skip-LayerNorm outputs (the residual stream is INT8)")
    p.add_argument("-imh", "--int8-mha", dest="imh", action="store_true",
                   help="INT8 multi-head attention (Q, K, V, probabilities, context), one INT8 kernel")
    p.add_argument("-g", "--force-fc2-gemm", dest="g", action="store_true",
                   help="FC2 on the plain library GEMM (cuBLASLt), not the fused Triton kernel")
    p.add_argument("-b", "--batch-size", type=int, action="append", metavar="B",
                   help="profile batch size; repeat for several (default 1)")
    p.add_argument("-s", "--seq-length", type=int, action="append", metavar="S",
                   help="profile sequence length; repeat for several (default 128); each (B, S) pair is a profile")
    p.add_argument("--calib-cache", metavar="FILE", help="calibration cache from `cli.py calibrate` (for --int8)")
    p.add_argument("--keep-fp16", metavar="GEMMS", default="",
                   help="mixed precision: comma-separated GEMMs kept in FP16 under --int8, e.g. layer3.fc2,layer5.fc1 "
                        "or fc2 for every layer's (as `cli.py sensitivity` suggests)")
    p.add_argument("--timing-cache", metavar="FILE",
                   help="kernel timings reused across builds (CUDA): a build of shapes already timed on this GPU "
                        "times nothing (default: timing.json in the workbench cache directory)")
    p.set_defaults(func=cmd_build)

    p = verb("bench", "time an engine: median/p95/p99 latency and throughput, and the GPU's power and clock "
                      "while it ran")
    p.add_argument("-e", "--engine", required=True, metavar="ENGINE", help="engine file")
    p.add_argument("-b", "--batch-size", type=int, action="append", metavar="B", help="default: each profile")
    p.add_argument("-s", "--seq-length", type=int, action="append", metavar="S", help="default: each profile")
    p.add_argument("--iterations", type=int, default=200, help="timed runs per shape (default 200)")
    p.add_argument("--warmup", type=int, default=20, help="untimed runs first (default 20)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when present")
    p.add_argument("--fuse", action="store_true", help=FUSE_HELP)
    p.add_argument("--padded", type=float, default=0.0, metavar="FRACTION",
                   help="make this fraction of each sequence padding (default 0: full sequences, whose graph runs "
                        "attention without a mask; padded batches take the general graph, as real traffic does)")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except WorkbenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
