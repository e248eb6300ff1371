"""Issue 20's offline throughput on the GPU: random-weight BERT-large and BERT-base over every window of the official
dev set (their real token lengths), bucketed against padded to 384 and HF eager FP16, one run per model.

    python -m benchmarks.device_throughput --squad dev-v1.1.json --presets bert-large bert-base --batch 128 \
        --buckets 64 16 --variants "int8 -iln" fp16 --out throughput.md

Each variant is built once with profiles batch x {STEP, 2 STEP, ..., 384} (`engines.engine_file.length_buckets`;
INT8 scales from a max calibration on random tokens, benchmarks.bench_engines.max_ranges), then
`eval.throughput.offline_run` times it bucketed and padded to 384 over the same windows (several `--buckets` steps:
a build and a bucketed row per step, in one run); HF eager FP16 (SDPA) runs
the bucketed batches once per model. The windows are tokenized with the assets/ MiniLM's BERT uncased vocabulary.
`--varlen` builds each variant --varlen (issue 20, item 2) with one more profile and its ladder, 3 batch x 128
(the largest budget's tokens in up to 3x the windows: engines.engine_file.packing_budget), and adds its packed
row: the windows packed to fill that budget, each batch in the smallest budget that holds it; the build's own path
timing (packed or bucketed) is printed with its kernels.
"""
from __future__ import annotations

import argparse
import statistics
from collections import Counter

import torch

from benchmarks.bench_engines import VARIANTS, max_ranges
from common.errors import WorkbenchError
from common.files import atomic_write_text
from data.tokenizer import load_wordpiece
from engines.build import build_engine, kernel_choices
from engines.engine_file import Profile, length_buckets, pick_profile
from engines.graphs import GraphRunner
from engines.runtime import Engine
from engines.tuning import TimingCache
from eval.benchmark import time_compute
from eval.sweep import DEFAULT_MODEL
from eval.throughput import hf_eager, kernel_profile, offline_run, squad_features
from model.checkpoint import load_model
from model.runner import batches_by_length


def bucket_times(runner: GraphRunner, features, batch: int, replays: int = 10) -> list[str]:
    """Where a bucketed pass's GPU time goes: each bucket's graph replayed alone (median of `replays`, CUDA events)
    times the batches the pass runs in it. Their sum against the pass's wall time shows the gaps between batches;
    ns per computed token per bucket shows which lengths run the kernels slowly."""
    header = runner.engine.header
    runs = Counter(pick_profile(header, len(idx), seq) for idx, seq in batches_by_length(features.attention_mask,
                                                                                           batch))
    lines, total = [], 0.0
    for profile, count in sorted(runs.items(), key=lambda kv: kv[0].seq_len):
        graph = runner.capture(profile).graph
        ms = statistics.median(time_compute(graph.replay, (), replays, 0, runner.engine.device))
        total += count * ms
        lines.append(f"    {profile}: {count} batches x {ms:.3f} ms = {count * ms:.1f} ms, "
                     f"{ms * 1e6 / (profile.batch * profile.seq_len):.0f} ns a computed token")
    return [f"  each bucket's graph alone x its batches: {total:.1f} ms of GPU time a pass", *lines]


def _variant_row(say, args, loaded, preset: str, name: str, step: int, features, timing, padded: bool) -> bool:
    """One variant built with buckets every `step`: its bucketed row (and with `padded` the padded one, with
    --varlen the packed one) and its kernels; False where it cannot build."""
    device, policy = torch.device("cuda"), VARIANTS[name]
    calib = max_ranges(loaded, device) if policy.quantized else None
    # --varlen: the same tokens in up to 3x the windows, so packed batches of short windows fill the budget
    longest = [Profile(args.batch, 384)] + ([Profile(3 * args.batch, 128)] if args.varlen else [])
    profiles = length_buckets(longest, step)
    label = f"{preset} {name}" + (f", buckets every {step}" if len(args.buckets) > 1 else "")
    try:
        header, tensors = build_engine(loaded, policy, profiles, calib, device, None, timing, varlen=args.varlen)
    except WorkbenchError as e:  # one variant that cannot build leaves the others' rows
        say(f"{label}: not built: {e}")
        return False
    runner = GraphRunner(Engine(header, tensors, device).eval(), label)
    bucketed, paths = None, []
    if not args.packed_only:
        bucketed = offline_run(f"{label}, bucketed", runner, features, device, args.batch, passes=args.passes)
        say(bucketed.row())
        for line in bucket_times(runner, features, args.batch):
            say(line)
        paths.append((bucketed, {"packed": False}))
    if padded and not args.packed_only:
        padded_run = offline_run(f"{label}, padded to 384", runner, features, device, args.batch,
                                 passes=args.passes, pad_to=384)
        say(padded_run.row(bucketed))
        paths.append((padded_run, {"pad_to": 384, "packed": False}))
    if args.varlen:
        packed = offline_run(f"{label}, packed", runner, features, device, args.batch, passes=args.passes,
                             packed=True)
        say(packed.row(bucketed))
        paths.append((packed, {"packed": True}))
    for run, path in paths if args.profile else ():
        say(f"  {run.name}:")
        for line in kernel_profile(runner, features, device, args.batch, run.computed_tokens, top=14, **path):
            say(line)
    say("  kernels: " + "; ".join(kernel_choices(header)[-2 if args.varlen else -1:]))
    del runner, tensors
    torch.cuda.empty_cache()
    return True


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--squad", required=True)
    ap.add_argument("--presets", nargs="+", default=["bert-large", "bert-base"])
    ap.add_argument("--variants", nargs="+", default=["int8 -iln", "fp16"], choices=list(VARIANTS))
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--buckets", type=int, nargs="+", default=[64],
                    help="bucket steps: one build per step, each with its bucketed row (padded: the first's)")
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--varlen", action="store_true", help="build --varlen and time the packed path too")
    ap.add_argument("--packed-only", action="store_true",
                    help="with --varlen: the packed row alone (a shorter call; no bucketed or padded row)")
    ap.add_argument("--profile", action="store_true",
                    help="each path's pass once more under torch.profiler: its kernels, ms and ns per token")
    ap.add_argument("--out", default="throughput.md")
    args = ap.parse_args(argv)
    device, timing = torch.device("cuda"), TimingCache("/tmp/timing.json")
    features = squad_features(args.squad, load_wordpiece(DEFAULT_MODEL, 30522), 384)
    lengths = features.attention_mask.sum(1)
    lines = [f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}; {len(lengths):,} windows of "
             f"{args.squad}, mean {lengths.mean():.0f} real tokens of 384; batches of {args.batch}; buckets every "
             f"{' or '.join(map(str, args.buckets))}", ""]

    def say(line: str) -> None:
        lines.append(line)
        print(line, flush=True)
        atomic_write_text(args.out, "\n".join(lines) + "\n")

    for preset in args.presets:
        loaded = load_model(preset)
        for name in args.variants:
            for i, step in enumerate(args.buckets):
                if not _variant_row(say, args, loaded, preset, name, step, features, timing, padded=i == 0):
                    break
        if not args.no_hf:
            forward = hf_eager(loaded.config, device)
            if forward is not None:
                say(offline_run(f"{preset} HF eager fp16, bucketed", forward, features, device, args.batch,
                                passes=1).row())
            del forward
            torch.cuda.empty_cache()
        say("")


if __name__ == "__main__":
    main()
