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

from common.errors import WorkbenchError

EXAMPLES = {
    "build": """examples:
  python cli.py build --model DIR --fp16 -b 1 -s 128 -b 64 -s 384 -o engines/fp16.engine
  python cli.py build --model DIR --int8 --fp16 -iln -b 64 -s 384 --calib-cache calib.json -o engines/int8.engine
  python cli.py build --model bert-large --fp16 -b 1 -s 128 -o engines/large.engine    # random weights: timing""",
    "bench": """examples:
  python cli.py bench -e engines/int8.engine                  # every profile of the engine
  python cli.py bench -e engines/int8.engine -b 1 -s 128 --iterations 1000 --fuse""",
    "infer": """examples:
  python cli.py infer --model ../shared/models/minilm-l6-h384-squad11 \\
      -p "TensorRT is a high performance deep learning inference platform ..." -q "What is TensorRT?"
  python cli.py infer --model DIR -pf passage.txt -qf questions.txt
  python cli.py infer --model DIR            # interactive: asks for a passage, then questions""",
    "eval": """examples:
  python cli.py eval --squad ../shared/data/squad/dev-v1.1.json --model ../shared/models/minilm-l6-h384-squad11 \\
      --precision fp16 -o predictions.json --metrics-json metrics.json
  python cli.py eval --squad dev.json --model DIR --limit 50 --device cpu""",
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


def _add_feature_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("featurization and answers")
    g.add_argument("-s", "--max-seq-length", type=int, default=384, help="tokens per window (default 384)")
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


def _settings(args, version_2: bool = False):
    from data.answers import AnswerSettings
    from data.features import FeatureSettings

    return (FeatureSettings(args.max_seq_length, args.doc_stride, args.max_query_length, args.legacy_windows),
            AnswerSettings(args.n_best_size, args.max_answer_length, version_2, args.null_score_diff_threshold))


def _runnables(args, feature_settings, engines=()):
    """(forward, wordpiece, device, label, batch_size) for --model (if given), then for each engine file."""
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
    return GraphRunner(engine, str(path), fuse=args.fuse), wordpiece, device, label, batch


def _load_runnable(args, feature_settings):
    """Model + tokenizer on the chosen device and precision; returns (forward, wordpiece, device, label, batch)."""
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
    return model, wordpiece, device, label, batch


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
                                                        [args.engine] if args.engine else [])[0]

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
    squad = load_squad(args.squad, limit=args.limit)
    feature_settings, answer_settings = _settings(args, version_2=squad.version.startswith("2"))
    runnables = _runnables(args, feature_settings, args.engines)
    results = {}
    for forward, wordpiece, device, label, batch in runnables:
        print(f"evaluating {label} on {len(squad.examples)} questions of {args.squad} (SQuAD v{squad.version})",
              file=sys.stderr)
        score, predictions, timings = evaluate(
            squad.examples, squad.version, forward, wordpiece, device, feature_settings=feature_settings,
            answer_settings=answer_settings, batch_size=batch, cache=not args.no_cache,
            progress=not args.no_progress)
        for line in timings.lines():
            print(line, file=sys.stderr)
        out = Path(args.output)
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
    if args.metrics_json:
        atomic_write_json(args.metrics_json, next(iter(results.values())) if len(results) == 1 else results)
    return 0


def cmd_build(args) -> int:
    import itertools
    import time

    from calib.cache import load_cache
    from calib.policy import PrecisionPolicy
    from data.tokenizer import load_wordpiece
    from engines.build import build_engine
    from engines.engine_file import Profile, save_engine
    from model.checkpoint import load_model
    from model.runner import pick_device

    t0 = time.perf_counter()
    device = pick_device(args.device)
    policy = PrecisionPolicy(int8=args.int8, fp16=args.fp16, iln=args.iln, imh=args.imh, strict=args.strict,
                             fc2_library_gemm=args.g)
    profiles = [Profile(b, s) for b, s in itertools.product(args.batch_size or [1], args.seq_length or [128])]
    calib = load_cache(args.calib_cache) if args.calib_cache else None
    if calib is not None and not args.int8:
        print("warning: --calib-cache is not used without --int8", file=sys.stderr)
    loaded = load_model(args.model, trust_pickle=args.trust_pickle)
    wordpiece = load_wordpiece(loaded.model_dir, vocab_size=loaded.config.vocab_size) if loaded.model_dir else None
    header, tensors = build_engine(loaded, policy, profiles, calib, device, wordpiece)
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
    from eval.benchmark import Latency, random_inputs, time_compute, time_end_to_end
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
    print(f"{args.engine}: {engine.policy.describe()} on {device.type}"
          f"{' (' + engine.header.gpu_name + ')' if engine.header.gpu_name else ''}; "
          f"median of {args.iterations} after {args.warmup} warm-up")
    for shape in shapes:
        x = random_inputs(shape.batch, shape.seq_len, engine.cfg.vocab_size, device)
        compute = Latency.from_samples(shape.batch, shape.seq_len,
                                       time_compute(runner, x, args.iterations, args.warmup, device))
        e2e = Latency.from_samples(shape.batch, shape.seq_len,
                                   time_end_to_end(runner, x, args.iterations, args.warmup, device))
        print(f"compute     {compute.row()}\nend-to-end  {e2e.row()}")
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
                           features=FeatureSettings(args.max_seq_length, args.doc_stride, args.max_query_length))
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
    p.add_argument("-o", "--output", default="predictions.json", metavar="FILE",
                   help="official-format predictions {id: answer} (default predictions.json; the n-best list "
                        "goes beside it as *.nbest.json)")
    p.add_argument("--metrics-json", metavar="FILE", help='write {"exact_match": .., "f1": .., "n": ..}')
    _add_feature_args(p)
    p.set_defaults(func=cmd_eval)

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
                   help="INT8 multi-head attention numerics (Q, K, V, probabilities, context)")
    p.add_argument("-g", "--force-fc2-gemm", dest="g", action="store_true",
                   help="FC2 on the plain library GEMM (it always is today; recorded in the engine)")
    p.add_argument("-b", "--batch-size", type=int, action="append", metavar="B",
                   help="profile batch size; repeat for several (default 1)")
    p.add_argument("-s", "--seq-length", type=int, action="append", metavar="S",
                   help="profile sequence length; repeat for several (default 128); each (B, S) pair is a profile")
    p.add_argument("--calib-cache", metavar="FILE", help="calibration cache from `cli.py calibrate` (for --int8)")
    p.set_defaults(func=cmd_build)

    p = verb("bench", "time an engine: median/p95/p99 latency and throughput")
    p.add_argument("-e", "--engine", required=True, metavar="ENGINE", help="engine file")
    p.add_argument("-b", "--batch-size", type=int, action="append", metavar="B", help="default: each profile")
    p.add_argument("-s", "--seq-length", type=int, action="append", metavar="S", help="default: each profile")
    p.add_argument("--iterations", type=int, default=200, help="timed runs per shape (default 200)")
    p.add_argument("--warmup", type=int, default=20, help="untimed runs first (default 20)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when present")
    p.add_argument("--fuse", action="store_true", help=FUSE_HELP)
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
