"""Where a training step's time goes (QAT, prune and finetune share qat.train's loop): the shared MiniLM pruned 2:4
and fine-tuned with distillation, as `cli.py prune --distill` runs it, a few steps under torch.profiler.

    python -m benchmarks.device_train_profile --model assets/minilm-l6-h384-squad11 --squad train.json --out p.md

Prints the steps per second of each setting (the loop as it is; with the loss read every step and/or the explicit
softmax, as it was before; with the teacher's attention explicit) and, for the first, profiled apart, the CUDA
kernels that took the most time, the share of the wall time the GPU was busy (a step that is mostly idle GPU is
bound by the host, not by FLOPs) and where the device-to-host copies come from.
A measuring script for the device machine, not a test.
"""
from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from collections import Counter

import torch
from torch.profiler import ProfilerActivity, profile

from common.files import atomic_write_text
import model.bert as bert
from model.checkpoint import load_model
from qat.model import qat_model
from qat.prune import keep_masks, prune_2to4
from qat.run import training_features
from qat.train import TrainConfig, train
from quant.policy import PrecisionPolicy
from quant.spec import QuantSpec

SETTINGS = {  # name: TrainConfig fields
    "distill + hidden": dict(distill=True, distill_alpha=1.0, distill_hidden=1.0),
    "distill + hidden, the teacher's attention explicit": dict(distill=True, distill_alpha=1.0, distill_hidden=1.0),
    "distill + hidden, loss read every step": dict(distill=True, distill_alpha=1.0, distill_hidden=1.0),
    "distill + hidden, explicit attention": dict(distill=True, distill_alpha=1.0, distill_hidden=1.0),
    "distill + hidden, explicit attention, loss read every step": dict(distill=True, distill_alpha=1.0,
                                                                       distill_hidden=1.0),
    "distill": dict(distill=True, distill_alpha=1.0),
    "labels only": dict(),
}


@contextlib.contextmanager
def attention_as(name: str):
    """The attention a setting trains with: "explicit attention" never fused, "the teacher's attention explicit"
    fused in the student only (the rule before the teacher's forward joined the training step), else as it is."""
    original = bert.fuses_attention
    if "explicit attention" in name:
        bert.fuses_attention = lambda x, tap, site: False
    elif "teacher's attention explicit" in name:
        bert.fuses_attention = lambda x, tap, site: torch.is_grad_enabled() and original(x, tap, site)
    try:
        yield
    finally:
        bert.fuses_attention = original


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def steps(loaded, features, fields: dict, n: int, batch: int, profiler=None, every_step: bool = False) -> float:
    """Train a fresh pruned copy for `n` steps (after 3 untimed ones); returns steps per second. `every_step`:
    the host waits for each step's loss, as the loop did before it read them in batches."""
    student = qat_model(loaded.model, PrecisionPolicy(), QuantSpec()).requires_grad_(True)  # train() froze the teacher
    keep_masks(student, prune_2to4(student))
    with tempfile.TemporaryDirectory() as tmp:
        def run(count: int) -> float:
            cfg = TrainConfig(output_dir=tmp, max_steps=count, batch_size=batch, progress=False,
                              checkpoint_every=10**9, resume=False, **fields)
            sync()
            start = time.perf_counter()
            train(student, features, cfg, teacher=loaded.model if cfg.distill else None,
                  callback=(lambda step, loss: None) if every_step else None)  # a callback reads every loss
            sync()
            return time.perf_counter() - start
        run(3)
        if profiler is None:
            return n / run(n)
        with profiler:
            seconds = run(n)
        return n / seconds


def copy_sources(prof, steps: int) -> list[str]:
    """Where the device-to-host copies of the profiled steps come from (each one makes the host wait for the GPU):
    the op that launched each, its callers, and the innermost frame of our code (the profiler runs with stacks)."""
    found: Counter = Counter()
    for evt in prof.events():
        if not any("DtoH" in k.name for k in evt.kernels):
            continue
        chain, e = [], evt
        while e is not None and len(chain) < 4:
            chain.append(e.name)
            e = e.cpu_parent
        ours = next((f for f in evt.stack if "site-packages" not in f and "/torch/" not in f), "?")
        found[f"{' <- '.join(chain)} (at {ours})"] += 1
    return [f"- {n / steps:g} a step: {source}" for source, n in found.most_common(12)] or ["- none"]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--squad", required=True)
    ap.add_argument("--limit", type=int, default=1000, help="questions featurized (default 1000)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--out", default="train-profile.md")
    args = ap.parse_args(argv)
    loaded = load_model(args.model)
    features = training_features(loaded, args.squad, args.limit, progress=False)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none (CPU)"
    lines = [f"GPU: {gpu}, torch {torch.__version__}; batch {args.batch}, "
             f"{len(features)} windows of {features.input_ids.shape[1]} tokens", ""]
    for name, fields in SETTINGS.items():  # timed without the profiler, whose overhead slows a host-bound step
        with attention_as(name):
            rate = steps(loaded, features, fields, args.steps, args.batch, every_step="every step" in name)
        lines.append(f"- {name}: {rate:.2f} steps/s = {rate * args.batch:.0f} windows/s")
        print(lines[-1], flush=True)
    prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True)
    rate = steps(loaded, features, next(iter(SETTINGS.values())), args.steps, args.batch, prof)
    events = prof.key_averages()
    busy_us = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    wall_ms = args.steps / rate * 1e3
    lines += ["", f"Under the profiler, the first setting: GPU busy {busy_us / 1e3:.1f} ms of {wall_ms:.1f} ms wall "
              f"over {args.steps} steps", "", "```",
              events.table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=60), "```", "",
              "Device-to-host copies:", *copy_sources(prof, args.steps)]
    atomic_write_text(args.out, "\n".join(lines) + "\n")
    print("\n".join(line for line in lines if line.startswith(("Under", "Device-to-host", "- "))))


if __name__ == "__main__":
    main()
