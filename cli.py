#!/usr/bin/env python3
"""BERT INT8 workbench: calibrate, build, evaluate and compare INT8 builds of a SQuAD question-answering BERT.

The parsers and one thin function per verb over the packages: data/ (SQuAD, tokenization, features, answers),
model/ (the reference BERT), quant/ and calib/, engines/, eval/ (eval.measure: a build evaluated and timed).
Problems with the user's input raise WorkbenchError, which ends here as one line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import sys

from common.errors import WorkbenchError, warnings_to_stderr

# A verb's examples (and longer description) live with its logic (VERBS) and are read only to show --help.
EXAMPLES = """examples (python cli.py VERB --help for each verb's flags and examples):
  python cli.py sweep                          # the grid of INT8 builds on assets/, and the build to ship
  python cli.py calibrate --squad train.json --model DIR -o calib.json
  python cli.py build --model DIR --int8 --fp16 -b 1 -s 128 -b 64 -s 384 --calib-cache calib.json \\
      -o engines/int8.engine                   # profiles 1x128 and 64x384 (-b and -s pair up in order)
  python cli.py eval --squad dev.json --model DIR engines/int8.engine --report-dir report/
  python cli.py bench -e engines/int8.engine
  python cli.py infer -e engines/int8.engine -p "Paris is the capital of France." -q "What is the capital?"

The TensorRT BERT demo's spellings are accepted: -c/--config-dir (--model), -v/--vocab-file, -sq/--squad-json
(--squad), -tcf/--timing-cache-file (--timing-cache)."""
PAIRS = "-b and -s pair up in order (-b 1 -s 128 -b 64 -s 384: 1x128 and 64x384); one value goes with each of the other"


# ---------------------------------------------------------------- flags shared by several verbs, declared once

def _model_flags(p, required: bool = False, default: str | None = None, help_: str | None = None,
                 vocab: bool = False) -> None:
    from eval.sweep import shown

    p.add_argument("--model", "-m", "-c", "--config-dir", dest="model", required=required, default=default,
                   metavar="DIR", help=help_ or ("Hugging Face-layout BERT QA folder (config.json, model.safetensors, "
                   "vocab.txt/tokenizer.json)" + (f" (default {shown(default)})" if default else "")))
    if vocab:
        p.add_argument("-v", "--vocab-file", metavar="FILE", help="a vocab.txt to use instead of the model folder's "
                       "tokenizer (checked against the model's vocab_size)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow a pytorch_model.bin checkpoint (still loaded with weights_only=True)")


def _run_flags(p, device: str = "default: cuda when a GPU is present, else cpu", precision: str | None = "any",
               batch: bool = True, fuse: bool = False) -> None:
    """--device; --precision ("any": a model's fp32/fp16/bf16; "int8": what INT8 leaves); --batch-size; with
    `fuse` (verbs that run engines): --fuse and --backend."""
    p.add_argument("--device", choices=("cpu", "cuda"), help=device)
    if fuse:
        p.add_argument("--backend", choices=("workbench", "onnxruntime", "tensorrt"), help="what runs an engine: "
                       "our runtime (engine files), ONNX Runtime (.onnx files from `cli.py export-onnx`) or TensorRT "
                       "(.plan files, where it is installed); default: by extension")
        p.add_argument("--fuse", action="store_true", help="CUDA: compile the engine's elementwise work into fused "
                       "kernels (TorchInductor) before capturing its CUDA graphs; slower start, faster steady state")
    if precision == "any":
        p.add_argument("--precision", choices=("fp32", "fp16", "bf16"), help="default: fp16 on cuda, fp32 on cpu")
    elif precision == "int8":
        p.add_argument("--precision", choices=("fp16", "fp32"),
                       help="what is not INT8 runs in, the baseline too (default fp16 on CUDA, fp32 on the CPU)")
    if batch:
        p.add_argument("--batch-size", type=int, default=None, help="features per forward (default: 64 cuda, 16 cpu)")


def _squad_flag(p, help_: str, **kw) -> None:
    p.add_argument("--squad", "-sq", "--squad-json", dest="squad", metavar="FILE", help=help_, **kw)


def _profile_flags(p, b_help: str, s_help: str) -> None:
    """-b/-s, repeatable: engine profiles (batch x sequence length)."""
    p.add_argument("-b", "--batch-size", type=int, action="append", metavar="B", help=b_help)
    p.add_argument("-s", "--seq-length", type=int, action="append", metavar="S", help=s_help)


def _report_flags(p, default_dir: str | None, dir_help: str, default_drop: float | None = 1.0,
                  drop_help: str = "F1 points a build may lose against the baseline and still be chosen") -> None:
    p.add_argument("--max-f1-drop", type=float, default=default_drop, metavar="X", help=f"{drop_help} (default 1.0)")
    p.add_argument("--report-dir", default=default_dir, metavar="DIR", help=dir_help)


def _feature_flags(p, short_s: bool = True, answers: bool = True) -> None:
    """How questions become windows (with `answers`: and how answers are read back); --no-progress."""
    g = p.add_argument_group("featurization and answers" if answers else "featurization")
    g.add_argument(*(("-s",) if short_s else ()), "--max-seq-length", type=int, default=384,
                   help="tokens per window (default 384)")
    g.add_argument("--doc-stride", type=int, help="tokens shared by consecutive windows of a long passage (Hugging "
                   "Face meaning; default 128, or half a window's context tokens when 128 does not fit, said so)")
    g.add_argument("--max-query-length", type=int, default=64, help="question tokens kept (default 64)")
    if answers:
        g.add_argument("--legacy-windows", action="store_true", help="reproduce tokenizers 0.23.2's windows, which "
                       "drop context tokens past --max-seq-length (the shared MiniLM's reference scores used them)")
        g.add_argument("--n-best-size", type=int, default=20, help="candidate spans kept per question (default 20)")
        g.add_argument("--max-answer-length", type=int, default=30, help="longest answer in tokens (default 30)")
        g.add_argument("--null-score-diff-threshold", type=float, default=0.0,
                       help="SQuAD v2.0: predict no answer when null score > best span score + this (default 0)")
        g.add_argument("--no-cache", action="store_true", help="do not read or write the featurized-data cache")
    g.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _bench_flags(p) -> None:
    """How `eval` and `sweep` time each build at its profiles."""
    p.add_argument("--bench-iterations", type=int, metavar="N",
                   help="timed runs per profile (default 100 on CUDA, 5 on the CPU)")
    p.add_argument("--bench-warmup", type=int, metavar="N", help="untimed runs first (default 10 on CUDA, 1 on CPU)")


def _distributed_flags(p, unit: str, cpu: str = "") -> None:
    """--workers and --ray: `sweep` and `sensitivity` over GPUs and hosts with Ray (eval/distributed.py)."""
    g = p.add_argument_group("across GPUs and hosts (Ray: pip install 'ray==2.60.*'; imported only with these)")
    g.add_argument("--workers", type=int, metavar="N", help=f"run {unit}s on N workers at once, one {unit} per GPU "
                   f"(N GPUs of this host; on the CPU N processes{cpu}), e.g. --workers 8; with --ray: at most N at "
                   "once")
    g.add_argument("--ray", metavar="ADDRESS", help=f"run {unit}s on an existing Ray cluster, one per GPU ('auto': "
                   "the one started on this host by `ray start`; or HOST:6379, ray://HOST:10001), every node seeing "
                   "the same paths (model, data, report folder, workbench cache), e.g. --ray auto")


# ---------------------------------------------------------------- verbs

def _thin(module: str, function: str, say: bool = False):
    """A verb that is one function of its module: what it returns (if anything) goes to stdout; with `say` it also
    gets a `say` for its progress lines, which go to stderr."""
    def command(args) -> int:
        fn = getattr(__import__(module, fromlist=[function]), function)
        out = fn(args, say=lambda line: print(line, file=sys.stderr)) if say else fn(args)
        if out is not None:
            print(out)
        return 0
    return command


# ---------------------------------------------------------------- parser

class _Parser(argparse.ArgumentParser):
    """A verb's parser; its description and examples come from its module (VERBS) when --help is shown, so that
    parsing does not import it (eval.qa, eval.benchmark and eval.sensitivity import torch)."""

    help_from: str | None = None

    def format_help(self) -> str:
        if self.help_from:
            module = __import__(self.help_from, fromlist=["EXAMPLES"])
            self.description, self.epilog = getattr(module, "DESCRIPTION", self.description), module.EXAMPLES
        return super().format_help()


def _infer_parser(p) -> None:
    _model_flags(p, vocab=True)
    _run_flags(p, fuse=True)
    a = p.add_argument
    a("-e", "--engine", metavar="ENGINE", help="run an engine file instead of --model")
    a("-p", "--passage", nargs="+", help="passage text (several are joined with spaces); without -p/-pf the prompt "
      "asks for one, which may span lines: an empty line ends it")
    a("-pf", "--passage-file", metavar="FILE", help="read the passage from a text file")
    a("-q", "--question", nargs="+", help="one or more questions about the passage")
    a("-qf", "--question-file", metavar="FILE", help="questions, one per line")
    a("--encoding", default="utf-8", help="of the -pf/-qf files (default utf-8; undecodable text is refused)")
    _squad_flag(p, "instead: answer and score every question of a SQuAD file (predictions.json), as eval does")
    _feature_flags(p)


def _eval_parser(p) -> None:
    from eval.compare import BASELINE_HELP, COMPARING_HELP

    a = p.add_argument
    _squad_flag(p, "SQuAD v1.1 or v2.0 JSON (e.g. dev-v1.1.json)", required=True)
    a("engines", nargs="*", metavar="ENGINE", help="engine files (from `cli.py build`) to evaluate")
    _model_flags(p, vocab=True)
    _run_flags(p, fuse=True)
    a("--limit", type=int, metavar="N", help="evaluate only the first N questions")
    a("-o", "--output", metavar="FILE", help="official-format predictions {id: answer} (default predictions.json, "
      "none with --report-dir) and FILE.nbest.json beside it; with several builds one FILE.BUILD.json each")
    a("--metrics-json", metavar="FILE", help='write {"exact_match": .., "f1": .., "n": ..}')
    g = p.add_argument_group("comparing builds", COMPARING_HELP)
    g.add_argument("--baseline", metavar="fp16|model|ENGINE", help=BASELINE_HELP)
    _report_flags(g, None, "write report.md, report.csv, report.json, pareto.png (F1 against latency, the front and "
                  "the chosen build marked) and predictions/BUILD.json there", default_drop=None)
    g.add_argument("--profile", metavar="BxS", help="selection profile, e.g. 64x384 (default: the largest B x S every "
                   "build has; on the CPU the only profile timed)")
    _bench_flags(g)
    _feature_flags(p)


def _sweep_parser(p) -> None:
    from eval.sweep import DEFAULT_CALIB_SQUAD as CALIB, DEFAULT_EVAL_SQUAD as DEV, DEFAULT_MODEL, DEFAULT_REPORT_DIR
    from eval.sweep import METHOD_TAGS, METHODS, OPTION_SETS, shown

    a = p.add_argument
    _model_flags(p, default=str(DEFAULT_MODEL), vocab=True)
    a("--calib-squad", default=str(CALIB), metavar="FILE", help=f"calibrate on it (default {shown(CALIB)})")
    a("--eval-squad", default=str(DEV), metavar="FILE", help=f"evaluate on it (default {shown(DEV)}: SQuAD v1.1 dev)")
    a("--grid", default="default", metavar="default|FILE",
      help="the builds: the default grid, or a JSON file listing rows (see eval/sweep.py load_grid)")
    a("--methods", nargs="+", choices=METHOD_TAGS, metavar="METHOD",
      help=f"only INT8 and FP8 rows calibrated by these ({', '.join(METHODS)}; percentile = both; mse = INT8's and "
      "FP8's, mse-fp8 = FP8's alone; qat: a grid's QAT rows)")
    a("--qat", nargs="+", metavar="DIR", help="add an INT8 row per `cli.py qat` folder: its weights and learned "
      "scales, built with the flags it was trained for (int8-qat[-iln|-imh|-iln-imh]), no calibration")
    a("--options", nargs="+", choices=list(OPTION_SETS), metavar="OPTIONS",
      help=f"only INT8 and FP8 rows with these option sets ({', '.join(OPTION_SETS)}; FP8 rows are plain or iln)")
    _profile_flags(p, f"profile batch size; {PAIRS} (default: 1x128 and 64x384 on CUDA, 1x384 on the CPU)",
                   "profile sequence length (default --max-seq-length when only -b is given)")
    a("--calib-num", type=int, metavar="N", help="calibration questions (default 100 on CUDA, 20 on the CPU)")
    a("--seed", type=int, default=0, help="seed of the calibration question draw (default 0)")
    a("--eval-limit", metavar="N|all", help="evaluate the first N questions (default all on CUDA, 30 on the CPU)")
    _report_flags(p, DEFAULT_REPORT_DIR, f"rows/, engines/, predictions/ and the report (default {DEFAULT_REPORT_DIR})")
    a("--profile", metavar="BxS", help="selection profile, e.g. 64x384 (default: the largest B x S)")
    _bench_flags(p)
    _run_flags(p, precision="int8", batch=False)
    a("--force", action="store_true", help="recompute every row, rebuild every engine (calibrations are reused)")
    _distributed_flags(p, "row", ", the timing done afterwards one row at a time")
    _feature_flags(p, short_s=False)


def _sensitivity_parser(p) -> None:
    from eval.sweep import DEFAULT_EVAL_SQUAD as DEV, DEFAULT_MODEL, shown

    a = p.add_argument
    _model_flags(p, default=str(DEFAULT_MODEL), vocab=True)
    a("--calib-cache", required=True, metavar="FILE", help="this model's cache from `cli.py calibrate`")
    _squad_flag(p, f"evaluate on it (default {shown(DEV)}: SQuAD v1.1 dev)", default=str(DEV))
    a("--limit", metavar="N|all", help="evaluate the first N questions (default 50 on the CPU, all on CUDA)")
    a("-iln", "--int8-layernorm", dest="iln", action="store_true", help="analyse -iln builds (in every variant)")
    a("-imh", "--int8-mha", dest="imh", action="store_true", help="analyse -imh builds (in every variant)")
    a("--fp8", action="store_true", help="analyse plain FP8 E4M3 builds: one GEMM at a time in FP8 instead of INT8 "
      "(no -iln/-imh)")
    a("--options", nargs="+", metavar="OPTIONS", help="as `cli.py sweep`'s: plain, iln, imh, iln-imh (or -iln)")
    a("--layers", metavar="LIST", help="analyse these layers: 0,3,5 or 0-2 (default all); the others stay INT8")
    a("--leave-one-out", action="store_true", help="also all INT8 but one GEMM, each: the F1 it recovers")
    a("--no-groups", action="store_true", help="skip the per-layer and per-kind group builds")
    _report_flags(p, "sensitivity-report", "sensitivity.md, .json and the heat-maps (default sensitivity-report)",
                  drop_help="F1 points the suggested build may lose against the baseline")
    a("--refine", type=int, default=2, metavar="N", help="while the suggestion misses the budget, keep the next "
      "costliest GEMM too and measure again, at most N times (default 2)")
    a("--trim", type=int, default=4, metavar="N", help="while within the budget, return kept GEMMs to INT8 one "
      "measured build at a time, cheapest first, at most N builds (default 4; 0: off)")
    _run_flags(p, precision="int8")
    a("--force", action="store_true", help="measure every build again (default: a rerun reuses the builds stored in "
      "REPORT_DIR/variants/ under the same inputs)")
    _distributed_flags(p, "build")
    _feature_flags(p)


def _calibrate_parser(p) -> None:
    a = p.add_argument
    _squad_flag(p, "SQuAD JSON to calibrate on (train, not the evaluation set)", required=True)
    _model_flags(p, required=True, vocab=True)
    _run_flags(p, precision=None)
    a("--calib-num", type=int, default=100, metavar="N", help="SQuAD questions (default 100; all when fewer), drawn "
      "without replacement by numpy default_rng(SEED).choice, kept in file order")
    a("--seed", type=int, default=0, help="seed of the question draw (default 0)")
    a("--method", choices=("entropy", "percentile", "mse", "mse-fp8", "max"), default="entropy",
      help="how a range is picked from the activations (default entropy, TensorRT's EntropyCalibrator2; mse-fp8: "
      "least squared error on FP8 E4M3's grid, for --fp8 builds)")
    a("--percentile", type=float, metavar="P", help="--method percentile: the |x| percentile kept (default 99.99)")
    a("--smooth", type=float, metavar="ALPHA", nargs="?", const=0.8, help="SmoothQuant-style: the outlier channels of "
      "the QKV, FC1 and FC2 inputs move into the weights, migration strength ALPHA in [0, 1] (alone: 0.8); "
      "per-channel input scales, which a TensorRT cache cannot hold")
    a("-o", "--output", required=True, metavar="CACHE", help="the cache (JSON, checksummed); reused when made from "
      "the same inputs")
    a("--trt-cache", metavar="FILE", help="also write TensorRT's calibration-cache text (our site names)")
    a("--force", action="store_true", help="recompute even when the cache at -o is reusable")
    a("--eval-squad", metavar="FILE", help="warn when calibration questions share ids or contexts with this file")
    _feature_flags(p, answers=False)


def _train_parser(p, mode: str) -> None:
    """`cli.py qat`, `finetune` and `prune`: one training loop (qat/train.py), with or without fake quantization."""
    a, qat = p.add_argument, mode == "qat"
    _squad_flag(p, "SQuAD JSON to train on (train, not the evaluation set)", required=True)
    _model_flags(p, required=True, vocab=True)
    if mode == "prune":
        a("--method", choices=("magnitude", "sparsegpt"), default="sparsegpt", help="which 2 of each 4 weights stay "
          "(magnitude: the largest |w|, nvidia-modelopt's; sparsegpt: SparseGPT on the first 128 training windows, the "
          "kept weights updated to make up for the pruned ones, much closer to the dense model before fine-tuning; "
          "default sparsegpt)")
        a("--exclude", metavar="GEMMS", default="", help="GEMMs left dense, e.g. layer0.fc2 or fc2 (every layer's)")
    if qat:
        a("--calib-cache", required=True, metavar="FILE", help="this model's cache from `cli.py calibrate`: the "
          "ranges QAT starts from (and its smoothing)")
        a("-iln", "--int8-layernorm", dest="iln", action="store_true", help="train with -iln's INT8 residual stream")
        a("-imh", "--int8-mha", dest="imh", action="store_true", help="train with -imh's INT8 attention")
        a("--keep-fp16", metavar="GEMMS", default="", help="GEMMs kept out of INT8, as `cli.py build --keep-fp16`")
        a("--freeze-scales", action="store_true", help="keep the calibrated ranges (default: learn them, LSQ)")
        a("--sparse", action="store_true", help="a 2:4-pruned model (`cli.py prune`) keeps its pattern")
    a("-o", "--output", required=True, metavar="DIR", help="model folder to write (Hugging Face layout"
      + (" + quant_spec.json, the learned scales `cli.py build --int8` takes)" if qat else ")"))
    a("--epochs", type=float, default=2.0, help="passes over the training windows (default 2)")
    a("--max-steps", type=int, metavar="N", help="optimizer steps (overrides --epochs; 0: none, e.g. prune only)")
    a("--lr", type=float, default=3e-5, help="peak learning rate, linear warm-up (10%%) and decay (default 3e-5)")
    a("--batch-size", type=int, default=32, help="windows per step (default 32)")
    a("--distill", action="store_true", help="also match the starting model's start/end distributions")
    a("--distill-alpha", type=float, default=0.5, metavar="A", help="with --distill, the weight of the teacher's "
      "term (1 - A: the labels'; 1: the teacher alone, e.g. when the labels are noisy; default 0.5)")
    a("--distill-temperature", type=float, default=2.0, metavar="T", help="with --distill, the softmax "
      "temperature of both distributions (default 2)")
    a("--distill-hidden", type=float, default=0.0, metavar="W", help="with --distill, also match the teacher's "
      "hidden states layer by layer (mean squared difference over real tokens) at weight W, e.g. 1 (default 0: "
      "off)")
    if qat:
        a("--scale-lr", type=float, default=1e-3, help="peak learning rate of the learned amax values, in the "
          "activations' own units (default 1e-3)")
    a("--limit", metavar="N|all", help="train on the first N questions (default all)")
    a("--seed", type=int, default=0, help="seed of the shuffling (default 0)")
    a("--checkpoint-every", type=int, default=500, metavar="N", help="steps between checkpoints (default 500); a "
      "rerun with the same -o resumes from the last")
    a("--restart", action="store_true", help="ignore checkpoints in -o and start over")
    _run_flags(p, precision=None, batch=False)
    _feature_flags(p, answers=False)


def _precision_flags(p) -> None:
    """What a build quantizes and where its ranges come from: `cli.py build` and `cli.py export-onnx` alike."""
    a = p.add_argument
    a("--fp16", action="store_true", help="run what is not INT8 in FP16 (default FP32)")
    a("--int8", action="store_true", help="INT8 GEMMs: per-channel weight scales, activation scales from --calib-cache")
    a("--fp8", action="store_true", help="FP8 E4M3 GEMMs instead (compute capability 8.9+ or the CPU): scales amax/448 "
      "from the same --calib-cache (max, percentile or mse-fp8)")
    a("--strict", action="store_true", help="no fallback to higher precision (ours never falls back: only recorded)")
    a("-iln", "--int8-layernorm", dest="iln", action="store_true", help="INT8 skip-LayerNorm outputs (INT8 residual; "
      "with --fp8: E4M3 codes)")
    a("-imh", "--int8-mha", dest="imh", action="store_true", help="INT8 attention (Q, K, V, probabilities, context)")
    a("--sparse", action="store_true", help="2:4-sparse GEMM weights (`cli.py prune`); dense ones are refused")
    a("--prune-2to4", action="store_true", help="with --sparse: prune dense weights by magnitude (costs accuracy)")
    a("--calib-cache", metavar="FILE", help="calibration cache from `cli.py calibrate` (for --int8)")
    a("--qat-scales", metavar="FILE", help="for --int8: QAT ranges made elsewhere (modelopt or pytorch-quantization "
      "state dict, TensorRT demo *_amax names, fake-quant ONNX); without it or --calib-cache, a QAT folder's own")
    a("--ignore-unmodelled", action="store_true", help="with --qat-scales: drop quantizers of tensors our engine "
      "never rounds (residual sums, GEMM outputs), with a warning")
    a("--keep-fp16", metavar="GEMMS", default="", help="mixed precision: GEMMs kept out of INT8 under --int8 (in FP16, "
      "or FP32 without --fp16), e.g. layer3.fc2,layer5.fc1 or fc2 (every layer's), as `cli.py sensitivity` suggests")


def _build_parser(p) -> None:
    a = p.add_argument
    _model_flags(p, required=True, vocab=True,
                 help_="BERT QA folder, or a random-weight preset (bert-base, bert-large) to time")
    a("-o", "--output", required=True, metavar="ENGINE", help="engine file to write")
    _run_flags(p, "where the engine will run (default: cuda when present); a cuda engine is tied to its GPU",
               precision=None, batch=False)
    _precision_flags(p)
    a("-g", "--force-fc2-gemm", dest="g", action="store_true", help="FC2 on cuBLASLt, not the fused Triton kernel")
    _profile_flags(p, f"profile batch size (default 1); {PAIRS}", "profile sequence length (default 128)")
    a("--backend", choices=("workbench", "tensorrt"), default="workbench", help="tensorrt: export to ONNX and "
      "build a TensorRT plan (-o X.plan) where TensorRT 10 is installed (not here: never run in this workplace)")
    a("--buckets", type=int, metavar="STEP", help="also every STEP tokens below each -s, at its -b: batches sorted by "
      "length run in the smallest bucket that holds them (e.g. -b 128 -s 384 --buckets 16: on SQuAD's "
      "windows 16-wide buckets compute 95%% real tokens, 64-wide 84%%; the GEMM kernels are timed at fewer lengths "
      "than there are buckets, each running the kernels timed at a length at most 25%% longer)")
    a("--varlen", action="store_true", help="padding-free: eval, bench and infer pack the windows of a batch into "
      "one token stream; each profile B x S is a budget of B*S tokens in at most B windows, batches fill the largest "
      "budget, and CUDA builds time packed against bucketed (e.g. -b 128 -s 384 -b 384 -s 128 --buckets 64 "
      "--varlen: 49,152 tokens a batch in up to 384 windows)")
    a("--timing-cache", "-tcf", "--timing-cache-file", dest="timing_cache", metavar="FILE", help="CUDA kernel "
      "timings reused across builds (default: timing.json in the workbench cache)")


def _export_parser(p) -> None:
    a = p.add_argument
    _model_flags(p, required=True, help_="BERT QA folder, or a random-weight preset (bert-base, bert-large)")
    a("-o", "--output", required=True, metavar="MODEL.onnx", help="ONNX file to write (tokenizer files beside it); "
      "inputs input_ids, segment_ids, input_mask and outputs start_logits, end_logits, as TensorRT's BERT demo")
    _precision_flags(p)
    a("--opset", type=int, metavar="N", help="ONNX opset (default 17)")
    a("--trt-cache", metavar="FILE", help="also TensorRT's calibration cache of --calib-cache under the graph's "
      "tensor names (implicit quantization of an FP export)")
    a("--symmetric-clamp", action="store_true", help="INT8 codes in [-127, 127] as our engines' (ONNX's "
      "QuantizeLinear alone saturates at -128)")


def _bench_parser(p) -> None:
    a = p.add_argument
    a("-e", "--engine", required=True, metavar="ENGINE", help="engine file")
    _profile_flags(p, f"default: each profile's; {PAIRS}", "default: each profile's")
    a("--iterations", type=int, default=200, help="timed runs per shape (default 200)")
    a("--warmup", type=int, default=20, help="untimed runs first (default 20)")
    _run_flags(p, "default: cuda when present", precision=None, batch=False, fuse=True)
    a("--padded", type=float, default=0.0, metavar="FRACTION", help="this fraction of each sequence is padding "
      "(default 0: the graph without an attention mask; padded batches take the general one, as real traffic does)")
    _squad_flag(p, "MLPerf-Offline-style: samples/s over every window of this SQuAD file, bucketed and padded")
    a("-v", "--vocab-file", metavar="FILE", help="with --squad: the vocabulary a random-weight engine's windows use")
    a("--passes", type=int, default=3, help="with --squad: timed passes over the windows (default 3)")
    a("--hf", action="store_true", help="with --squad: Hugging Face eager FP16 on the same batches, same run")
    a("--single-stream", type=int, default=0, metavar="N", help="with --squad: N windows one at a time: p50/p90/p99")
    a("--profile", action="store_true", help="with --squad: where each path's time goes (its kernels on a GPU, "
      "ms a pass and ns per computed token)")


VERBS = {  # name: (one-line help, the module holding its examples (shown by --help), its flags, its command)
    "infer": ("answer questions about a passage", "eval.qa", _infer_parser, _thin("eval.qa", "infer_from_flags")),
    "eval": ("official SQuAD EM/F1 and predictions of a model and/or engines; several builds compared in one table",
             "eval.compare", _eval_parser, _thin("eval.compare", "evaluate_from_flags")),
    "sweep": ("the workbench's answer: the grid of INT8 builds and the FP16 baseline evaluated and timed, and the "
              "fastest build within the F1 budget", "eval.sweep", _sweep_parser, _thin("eval.sweep", "sweep_from_flags")),
    "sensitivity": ("which INT8 GEMMs cost the most F1, and a measured mixed-precision build that keeps them out",
                    "eval.sensitivity", _sensitivity_parser,
                    _thin("eval.sensitivity", "sensitivity_from_flags", say=True)),
    "calibrate": ("INT8 calibration: per-tensor ranges of the FP32 model over SQuAD questions", "calib.calibrate",
                  _calibrate_parser, _thin("calib.calibrate", "calibrate_from_flags", say=True)),
    "qat": ("quantization-aware fine-tuning from a calibration cache: a model folder with learned INT8 scales",
            "qat.run", lambda p: _train_parser(p, "qat"), _thin("qat.run", "qat_from_flags")),
    "finetune": ("the same training loop without quantization: FP baselines", "qat.run",
                 lambda p: _train_parser(p, "finetune"), _thin("qat.run", "finetune_from_flags")),
    "prune": ("2:4 structured pruning of the encoder GEMMs, then fine-tuning that keeps the pattern", "qat.run",
              lambda p: _train_parser(p, "prune"), _thin("qat.run", "prune_from_flags")),
    "build": ("build an engine file (FP16/FP32, or INT8 from a calibration cache or a QAT folder)", "eval.runnables",
              _build_parser, _thin("eval.runnables", "engine_file_from_flags", say=True)),
    "export-onnx": ("the build as explicit-quantization ONNX (Q/DQ at the build's sites) for TensorRT and ONNX "
                    "Runtime", "interop.onnx_export", _export_parser, _thin("interop.onnx_export", "export_from_flags",
                                                                            say=True)),
    "bench": ("time an engine: median/p95/p99 latency and throughput, the GPU's power and clock while it ran",
              "eval.benchmark", _bench_parser, _thin("eval.benchmark", "bench_from_flags")),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cli.py", description=__doc__.split("\n\n")[0], epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB", parser_class=_Parser)
    for name, (help_, help_from, add_flags, command) in VERBS.items():
        p = sub.add_parser(name, help=help_, description=help_, formatter_class=argparse.RawDescriptionHelpFormatter)
        p.help_from = help_from
        add_flags(p)
        p.set_defaults(func=command)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings_to_stderr()
    try:
        if "doc_stride" in args and args.doc_stride is None:  # 128, or what fits the window (a warning says which)
            args.doc_stride = __import__("data.features", fromlist=["default_stride"]).default_stride(args)
        return args.func(args)
    except WorkbenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (MemoryError, RuntimeError) as e:  # torch.cuda.OutOfMemoryError is a RuntimeError
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if not isinstance(e, MemoryError) and not any(w in text for w in ("out of memory", "allocate memory")):
            raise
        print(f"error: out of memory ({text[:200]}): use smaller profiles (-b/-s) or a smaller --batch-size",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
