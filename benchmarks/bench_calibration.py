"""Calibration cost and stability: wall time per method and question count, and how far amax moves with more data.

    python -m benchmarks.bench_calibration --squad TRAIN --model DIR --out FILE.md [--counts 100 500 2000]
        [--methods entropy percentile mse max] [--timing-count 1000]

Every point is computed (no calibration cache, no feature cache), through the calib.calibrate functions the CLI
uses. Featurization is timed apart from the model + calibrators pass, since it is CPU work shared by all methods.
Stability: for consecutive counts (e.g. 500 -> 2000), per method, the median and max over sites of
|amax_big - amax_small| / amax_big. The samples of different counts are separate draws (not nested), as the CLI
would draw them. Writes a Markdown report to --out and prints it.
"""
from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path
from statistics import median

import torch

from calib.calibrate import check_fits, collect_ranges, load_calibration_model, select_questions
from quant.policy import calibration_sites
from common.errors import WorkbenchError
from common.files import atomic_write_text
from data.features import FeatureSettings, featurize
from data.squad import load_squad
from model.runner import pick_device

METHODS = ("entropy", "percentile", "mse", "max")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def run(args) -> str:
    device = pick_device(args.device)
    batch_size = args.batch_size or (64 if device.type == "cuda" else 16)
    settings = FeatureSettings(args.max_seq_length)
    squad = load_squad(args.squad)
    loaded, wordpiece = load_calibration_model(args.model)
    check_fits(loaded, settings)
    model = loaded.model.to(device=device, dtype=torch.float32).eval()
    sites = calibration_sites(loaded.config.num_layers)
    progress = not args.no_progress

    # Warm-up (CUDA context, cuBLAS handles, allocator) so the first timed point is not charged for it.
    warm = featurize(select_questions(squad.examples, 2, args.seed), wordpiece, settings, cache=False, progress=False)
    collect_ranges(model, warm, sites, "max", device=device, batch_size=batch_size, progress=False)

    rows, ranges = [], {}
    for count in sorted(set(args.counts) | {args.timing_count}):
        chosen = select_questions(squad.examples, count, args.seed)
        t0 = time.perf_counter()
        features = featurize(chosen, wordpiece, settings, cache=False, progress=progress)
        featurize_s = time.perf_counter() - t0
        for method in args.methods:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            _sync(device)
            t0 = time.perf_counter()
            ranges[count, method] = collect_ranges(model, features, sites, method, percentile=args.percentile,
                                                   device=device, batch_size=batch_size, progress=progress)
            _sync(device)
            collect_s = time.perf_counter() - t0
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
            rows.append((len(chosen), len(features), featurize_s, method, collect_s, peak))
            print(f"{len(chosen)} questions, {method}: {collect_s:.2f} s", file=sys.stderr)

    counts = sorted(set(args.counts))
    drift = []
    for small, big in zip(counts, counts[1:]):
        for method in args.methods:
            a, b = ranges[small, method], ranges[big, method]
            rel = {site: abs(b[site] - a[site]) / b[site] for site in sites if b[site] > 0}
            worst = max(rel, key=rel.get)
            drift.append((small, big, method, len(rel), median(rel.values()), rel[worst], worst))
    return _report(args, device, batch_size, loaded, squad, rows, drift)


def _report(args, device, batch_size, loaded, squad, rows, drift) -> str:
    layers = loaded.config.num_layers
    lines = [
        "# Calibration benchmark",
        "",
        f"{datetime.date.today()}; {_device_name(device)}; torch {torch.__version__}; "
        f"model `{Path(loaded.source).name}` ({layers} layers, {len(calibration_sites(layers))} sites), FP32; "
        f"data `{Path(squad.path).name}` ({len(squad.examples):,} questions); batch {batch_size} features, "
        f"max_seq_length {args.max_seq_length}, seed {args.seed}, percentile {args.percentile}.",
        "",
        "## Wall time",
        "",
        "featurize: tokenizing and windowing the questions (CPU, once per count, shared by the methods). "
        "calibrate: FP32 forward with the calibration tap + histogram/max collection + amax search, all sites.",
        "",
        "| questions | features | featurize s | method | calibrate s | questions/s | peak GPU GiB |",
        "| ---: | ---: | ---: | --- | ---: | ---: | ---: |",
    ]
    for n, f, fs, method, cs, peak in rows:
        mem = f"{peak:.1f}" if peak is not None else "-"
        lines.append(f"| {n:,} | {f:,} | {fs:.2f} | {method} | {cs:.2f} | {n / max(cs, 1e-9):,.1f} | {mem} |")
    lines += [
        "",
        "## amax drift with more questions",
        "",
        "Per method, over sites: relative change of amax from the smaller to the larger count, "
        "abs(amax_big - amax_small) / amax_big (sites with amax 0 left out).",
        "",
        "| from → to questions | method | sites | median | max | site of max |",
        "| --- | --- | ---: | ---: | ---: | --- |",
    ]
    for small, big, method, n, med, worst, site in drift:
        lines.append(f"| {small:,} → {big:,} | {method} | {n} | {med:.2%} | {worst:.2%} | `{site}` |")
    if not drift:
        lines.append("| (needs two --counts) | | | | | |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_calibration",
                                description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--squad", required=True, metavar="FILE", help="SQuAD file to draw questions from (train)")
    p.add_argument("--model", required=True, metavar="DIR", help="fine-tuned Hugging Face-layout BERT QA folder")
    p.add_argument("--out", required=True, metavar="FILE.md", help="Markdown report")
    p.add_argument("--counts", type=int, nargs="+", default=[100, 500, 2000], metavar="N",
                   help="question counts; drift is reported between consecutive ones (default 100 500 2000)")
    p.add_argument("--timing-count", type=int, default=1000, metavar="N",
                   help="one more count timed with every method (default 1000)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="default: all four")
    p.add_argument("--percentile", type=float, default=99.99, help="for the percentile method (default 99.99)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when present")
    p.add_argument("--batch-size", type=int, help="features per forward (default 64 cuda, 16 cpu)")
    p.add_argument("-s", "--max-seq-length", type=int, default=384)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        if min(args.counts + [args.timing_count]) < 1:
            raise WorkbenchError("question counts must be at least 1")
        report = run(args)
        atomic_write_text(args.out, report)
    except WorkbenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
