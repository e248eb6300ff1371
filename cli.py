#!/usr/bin/env python3
"""BERT INT8 workbench: calibrate, build, evaluate and compare INT8 builds of a SQuAD question-answering BERT.

Each verb is a small function over the packages: data/ (SQuAD, tokenization, features, answers), model/ (the
reference BERT), calib/, engines/, eval/. Problems with the user's input raise WorkbenchError, which ends here as
one line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.errors import WorkbenchError

EXAMPLES = {
    "infer": """examples:
  python cli.py infer --model ../shared/models/minilm-l6-h384-squad11 \\
      -p "TensorRT is a high performance deep learning inference platform ..." -q "What is TensorRT?"
  python cli.py infer --model DIR -pf passage.txt -qf questions.txt
  python cli.py infer --model DIR            # interactive: asks for a passage, then questions""",
    "eval": """examples:
  python cli.py eval --squad ../shared/data/squad/dev-v1.1.json --model ../shared/models/minilm-l6-h384-squad11 \\
      --precision fp16 -o predictions.json --metrics-json metrics.json
  python cli.py eval --squad dev.json --model DIR --limit 50 --device cpu""",
}


# ---------------------------------------------------------------- shared options

def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", required=True, metavar="DIR",
                   help="Hugging Face-layout BERT QA folder (config.json, model.safetensors, vocab.txt/tokenizer.json)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow a pytorch_model.bin checkpoint (still loaded with weights_only=True)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when a GPU is present, else cpu")
    p.add_argument("--precision", choices=("fp32", "fp16", "bf16"), help="default: fp16 on cuda, fp32 on cpu")
    p.add_argument("--batch-size", type=int, default=None, help="features per forward (default: 64 cuda, 16 cpu)")


def _add_feature_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("featurization and answers")
    g.add_argument("-s", "--max-seq-length", type=int, default=384, help="tokens per window (default 384)")
    g.add_argument("--doc-stride", type=int, default=128,
                   help="tokens shared by consecutive windows of a long passage (Hugging Face meaning; default 128)")
    g.add_argument("--max-query-length", type=int, default=64, help="question tokens kept (default 64)")
    g.add_argument("--n-best-size", type=int, default=20, help="candidate spans kept per question (default 20)")
    g.add_argument("--max-answer-length", type=int, default=30, help="longest answer in tokens (default 30)")
    g.add_argument("--null-score-diff-threshold", type=float, default=0.0,
                   help="SQuAD v2.0: predict no answer when null score > best span score + this (default 0)")
    g.add_argument("--no-cache", action="store_true", help="do not read or write the featurized-data cache")
    g.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _settings(args, version_2: bool = False):
    from data.answers import AnswerSettings
    from data.features import FeatureSettings

    return (FeatureSettings(args.max_seq_length, args.doc_stride, args.max_query_length),
            AnswerSettings(args.n_best_size, args.max_answer_length, version_2, args.null_score_diff_threshold))


def _load_runnable(args, feature_settings):
    """Model + tokenizer on the chosen device and precision; returns (forward, wordpiece, device, label)."""
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
    if args.batch_size is None:
        args.batch_size = 64 if device.type == "cuda" else 16
    label = f"{Path(loaded.source).name} [{device.type}, {str(dtype).removeprefix('torch.')}]"
    return model, wordpiece, device, label


# ---------------------------------------------------------------- verbs

def cmd_infer(args) -> int:
    from data.squad import examples_from_pairs
    from eval.qa import predict

    passage = _passage(args)
    questions = _questions(args)
    feature_settings, answer_settings = _settings(args)
    model, wordpiece, device, label = _load_runnable(args, feature_settings)

    def answer(context: str, qs: list[str]) -> None:
        examples = examples_from_pairs(context, qs)
        preds, _ = predict(examples, model, wordpiece, device, feature_settings=feature_settings,
                           answer_settings=answer_settings, batch_size=args.batch_size, cache=False, progress=False)
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
    model, wordpiece, device, label = _load_runnable(args, feature_settings)
    print(f"evaluating {label} on {len(squad.examples)} questions of {args.squad} (SQuAD v{squad.version})",
          file=sys.stderr)
    score, predictions, timings = evaluate(
        squad.examples, squad.version, model, wordpiece, device, feature_settings=feature_settings,
        answer_settings=answer_settings, batch_size=args.batch_size, cache=not args.no_cache,
        progress=not args.no_progress)
    for line in timings.lines():
        print(line, file=sys.stderr)
    out = Path(args.output)
    nbest = out.with_name(out.stem + ".nbest" + out.suffix)
    write_predictions(predictions, out, nbest)
    print(f"wrote {out} and {nbest}", file=sys.stderr)
    if args.metrics_json:
        atomic_write_json(args.metrics_json, score.to_json())
    line = f"EM {score.exact_match:.2f}  F1 {score.f1:.2f}  ({score.n} questions)"
    if score.has_ans_n is not None or score.no_ans_n is not None:
        line += _v2_breakdown(score)
    print(line)
    return 0


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
    _add_model_args(p)
    p.add_argument("-p", "--passage", nargs="+", help="passage text (several are joined with spaces)")
    p.add_argument("-pf", "--passage-file", metavar="FILE", help="read the passage from a text file")
    p.add_argument("-q", "--question", nargs="+", help="one or more questions about the passage")
    p.add_argument("-qf", "--question-file", metavar="FILE", help="questions, one per line")
    _add_feature_args(p)
    p.set_defaults(func=cmd_infer)

    p = verb("eval", "evaluate on a SQuAD file: official EM/F1 and predictions")
    p.add_argument("--squad", required=True, metavar="FILE", help="SQuAD v1.1 or v2.0 JSON (e.g. dev-v1.1.json)")
    _add_model_args(p)
    p.add_argument("--limit", type=int, metavar="N", help="evaluate only the first N questions")
    p.add_argument("-o", "--output", default="predictions.json", metavar="FILE",
                   help="official-format predictions {id: answer} (default predictions.json; the n-best list "
                        "goes beside it as *.nbest.json)")
    p.add_argument("--metrics-json", metavar="FILE", help='write {"exact_match": .., "f1": .., "n": ..}')
    _add_feature_args(p)
    p.set_defaults(func=cmd_eval)
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
