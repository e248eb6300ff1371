"""Throughput on the real windows of a SQuAD file (`cli.py bench --squad`), as MLPerf's BERT Offline scenario counts
it: every window of the file is one sample; samples/s over a whole pass.

Padded-to-384 figures overstate the work: the official dev set's windows are mostly far shorter than 384 tokens.
So the engine is timed several ways in one run: **bucketed** (windows sorted by length, batches at the engine's
largest batch, each trimmed to its longest window rounded up to 8 and run in the smallest profile that holds it:
an engine built with `--buckets` has a ladder of them), **padded** (the same batches padded to the engine's longest
profile: what a single-profile engine does), **packed** (no padding at all: the windows of a batch back to back
in one token stream, model/packing.py, run in the smallest token budget that holds them; what an engine built
`--varlen` runs, its attention kernels timed at build; other engines run it on the library path), and with `--hf`
Hugging Face transformers' eager FP16 BERT (SDPA) on the same trimmed batches, random weights (only its speed is
compared). Each pass goes through eval's own path
(model.runner.run_logits: host batches in, FP32 logits out, copies overlapped with compute on CUDA); one untimed
pass first captures every bucket's graph. A single-stream distribution (one window per call, in file order) gives
per-window latency. Windows come from the file tokenized with the engine's tokenizer (a preset engine has none:
the model folder in assets/ lends its BERT uncased vocabulary, or -v names one); preset engines' weights are random,
so their token ids only need the real lengths.
"""
from __future__ import annotations

import functools
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from common.errors import WorkbenchError
from model.runner import Forward, run_logits


@dataclass(frozen=True)
class OfflineRun:
    """One way of running every window once, timed over `passes` passes (the median counts)."""

    name: str
    windows: int
    real_tokens: int       # tokens of the windows themselves
    computed_tokens: int   # tokens computed, padding included (on CUDA: the profile each batch ran in)
    seconds: list[float]   # each timed pass

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds)

    @property
    def samples_per_s(self) -> float:
        return self.windows / self.median_s

    def row(self, base: "OfflineRun | None" = None) -> str:
        ratio = f"  {self.samples_per_s / base.samples_per_s:5.2f}x" if base is not None else ""
        return (f"{self.name:<28} {self.samples_per_s:>10,.0f} samples/s  {self.median_s * 1e3:9.1f} ms a pass "
                f"(median of {len(self.seconds)})  {self.real_tokens / self.computed_tokens:5.1%} of computed tokens "
                f"real{ratio}")


def batch_tokens(mask: np.ndarray, batch: int, pad_to: int | None = None, header=None) -> int:
    """Tokens the batches of run_logits hold: batch rows x its length, summed; or on CUDA (`header`: the engine's,
    whose graphs run each batch padded to the smallest profile that holds it) that profile's batch x length."""
    from engines.engine_file import pick_profile
    from model.runner import batches_by_length

    if header is None:
        return sum(len(idx) * seq for idx, seq in batches_by_length(mask, batch, pad_to=pad_to))
    return sum(p.batch * p.seq_len for p in (pick_profile(header, len(idx), seq)
                                             for idx, seq in batches_by_length(mask, batch, pad_to=pad_to)))


def packed_tokens(mask: np.ndarray, batch: int, budgets: list[int] | None = None,
                  packing: tuple[int, int] | None = None) -> int:
    """Tokens run_logits' packed batches hold (filled to `packing`, the engine's (tokens, windows), else by
    `batch`): their real tokens, or on CUDA (`budgets`: the engine's token budgets, batch x seq_len of each
    profile) the smallest budget holding each batch."""
    from model.packing import batches_of

    lengths, packs = batches_of(mask, batch, packing)
    held = [int(lengths[idx].sum()) for idx in packs]
    if budgets is None:
        return sum(held)
    return sum(min((b for b in budgets if b >= t), default=t) for t in held)


def offline_run(name: str, forward: Forward, features, device: torch.device, batch: int, *, passes: int = 3,
                pad_to: int | None = None, packed: bool = False) -> OfflineRun:
    """Every window through `forward` once untimed (graphs captured, kernels warm), then `passes` timed passes;
    bucketed (or padded to `pad_to`), or `packed` (the forward's packed entry: an engine's GraphRunner)."""
    if passes < 1:
        raise WorkbenchError(f"--passes must be at least 1, got {passes}")

    def one_pass() -> float:
        t0 = time.perf_counter()
        run_logits(forward, features, device, batch_size=batch, progress=False, pad_to=pad_to, packed=packed)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    one_pass()
    seconds = [one_pass() for _ in range(passes)]
    mask = features.attention_mask
    engine = getattr(forward, "engine", None)
    header = engine.header if engine is not None and device.type == "cuda" else None  # graphs: profile shapes
    if packed:
        computed = packed_tokens(mask, batch, header and [p.batch * p.seq_len for p in header.profiles],
                                 getattr(forward, "packing", None))
    else:
        computed = batch_tokens(mask, batch, pad_to, header)
    return OfflineRun(name, len(mask), int(mask.sum()), computed, seconds)


def kernel_profile(forward: Forward, features, device: torch.device, batch: int, tokens: int, top: int = 12,
                   **path) -> list[str]:
    """Where one pass's time goes (`bench --squad --profile`): the pass run once more under torch.profiler, its
    kernels on CUDA (its ops' own CPU time elsewhere) with ms a pass and ns per computed token (`tokens`: the
    pass's OfflineRun.computed_tokens), the largest `top` first. `path` as run_logits takes it (pad_to=, packed=)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        run_logits(forward, features, device, batch_size=batch, progress=False, **path)
        if cuda:
            torch.cuda.synchronize(device)

    def spent(e) -> float:  # microseconds
        return e.device_time_total if cuda else e.self_cpu_time_total
    events = sorted((e for e in prof.key_averages() if spent(e) > 0), key=lambda e: -spent(e))
    whole = sum(spent(e) for e in events)
    what = "kernels" if cuda else "ops (CPU time)"
    lines = [f"    {what} of one pass: {whole / 1e3:.1f} ms, {whole * 1e3 / max(tokens, 1):.0f} ns a computed token"]
    for e in events[:top]:
        lines.append(f"      {spent(e) / 1e3:8.1f} ms {spent(e) * 1e3 / max(tokens, 1):6.0f} ns/token "
                     f"{e.count:6d} calls  {kernel_label(e.key)[:100]}")
    return lines


def kernel_label(name: str) -> str:
    """A kernel's name as a profile line shows it. CUTLASS's mangled template names differ only past their first
    hundred characters, so our CUTLASS GEMMs (plugins/cutlass_int8.cu) read as their schedule, wgmma shape, TMA
    multicast (a cluster) and epilogue instead."""
    if not name.startswith("_ZN7cutlass13device_kernel"):
        return name
    mma = re.search(r"MMA_(\d+x\d+x\d+)_S32S8S8", name)
    epilogue = re.search(r"2wb(\d+)", name)  # a length-prefixed identifier: 2wb5Plain
    return " ".join(filter(None, [
        "cutlass GEMM", next((s.lower() for s in ("Pingpong", "Cooperative") if s in name), None),
        mma and f"wgmma {mma.group(1)}", "multicast" if "TMA_LOAD_MULTICAST" in name else None,
        epilogue and f"epilogue {name[epilogue.end():epilogue.end() + int(epilogue.group(1))]}"]))


def single_stream(forward: Forward, features, device: torch.device, n: int, warmup: int = 10) -> dict[str, float]:
    """Per-window latency, one window per call in file order (trimmed to its length rounded up to 8; for an engine
    that runs packed, its real tokens alone through the packed path): the first `n` windows after `warmup`
    untimed ones; milliseconds at p50, p90, p99 and the mean."""
    from model.packing import packed_batch, window_lengths

    count = min(n, len(features.input_ids))
    if count < 1:
        raise WorkbenchError("--single-stream needs at least one window")
    lengths = features.attention_mask.sum(1)
    packed = getattr(forward, "runs_packed", False)
    real = window_lengths(features.attention_mask) if packed else None
    samples = []
    with torch.inference_mode():
        for i in [*range(min(warmup, count)), *range(count)]:
            if packed:
                one = packed_batch(features.input_ids, features.token_type_ids, real, np.array([i]))
                call = functools.partial(forward.packed, *(t.to(device) for t in one.tensors), one.max_seqlen)
            else:
                seq = int(min(features.input_ids.shape[1], -(-int(lengths[i]) // 8) * 8))
                call = functools.partial(forward, *(torch.from_numpy(a[i:i + 1, :seq]).long().to(device) for a in
                                                    (features.input_ids, features.token_type_ids,
                                                     features.attention_mask)))
            t0 = time.perf_counter()
            call()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            samples.append((time.perf_counter() - t0) * 1e3)
    timed = np.array(samples[min(warmup, count):])
    return {"p50": float(np.percentile(timed, 50)), "p90": float(np.percentile(timed, 90)),
            "p99": float(np.percentile(timed, 99)), "mean": float(timed.mean()), "n": len(timed)}


def hf_eager(config, device: torch.device) -> Forward | None:
    """Hugging Face transformers' BertForQuestionAnswering with `config`'s shape, random weights, FP16 (FP32 on the
    CPU), SDPA attention; None where transformers is not installed."""
    try:
        from transformers import BertConfig as HFConfig, BertForQuestionAnswering
    except ImportError:
        return None
    c = config
    hf = BertForQuestionAnswering(HFConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads, intermediate_size=c.intermediate_size,
        max_position_embeddings=c.max_position_embeddings, attn_implementation="sdpa"))
    hf = (hf.half() if device.type == "cuda" else hf).to(device).eval()

    def forward(input_ids, token_type_ids, attention_mask):
        out = hf(input_ids=input_ids, token_type_ids=token_type_ids, attention_mask=attention_mask)
        return out.start_logits, out.end_logits
    return forward


def squad_features(squad: str | Path, wordpiece, max_seq_length: int, limit: int | None = None):
    """The windows of a SQuAD file as eval featurizes them at `max_seq_length` (doc stride 128, or what fits a
    shorter window; 64 question tokens; the featurization cache applies)."""
    from data.features import FeatureSettings, featurize, fitting_stride
    from data.squad import load_squad

    stride, _ = fitting_stride(max_seq_length, 64)
    return featurize(load_squad(squad, limit).examples, wordpiece, FeatureSettings(max_seq_length, stride, 64),
                     progress=False)


def _tokenizer(engine_path, wordpiece, vocab_file: str | None, vocab_size: int):
    """The engine's own tokenizer; for a preset engine, -v or the BERT uncased vocabulary of assets/'s model."""
    from data.tokenizer import load_wordpiece
    from eval.sweep import DEFAULT_MODEL

    if wordpiece is not None and vocab_file is None:
        return wordpiece, "the engine's tokenizer"
    if vocab_file is None and not DEFAULT_MODEL.is_dir():
        raise WorkbenchError(f"{engine_path}: a random-weight engine has no tokenizer; give -v VOCAB.txt to make "
                             "its windows")
    wp = load_wordpiece(Path(vocab_file).parent if vocab_file else DEFAULT_MODEL, vocab_size=vocab_size,
                        vocab_file=vocab_file)
    return wp, (vocab_file or f"{DEFAULT_MODEL.name}'s vocabulary (the preset's weights are random)")


def bench_squad(path, squad: str | Path, *, device: str | None = None, passes: int = 3, hf: bool = False,
                single: int = 0, vocab_file: str | None = None, limit: int | None = None,
                profile: bool = False) -> Iterator[str]:
    """`cli.py bench --squad`: the engine file's offline throughput over every window of `squad`, bucketed and
    padded and packed (and HF eager with `hf`), with `profile` each path's kernel_profile, then `single` windows
    one at a time; a line (or block) at a time."""
    from engines.build import load_runnable
    from engines.graphs import GraphRunner
    from model.runner import pick_device

    if str(path).endswith(".onnx"):
        raise WorkbenchError(f"{path}: bench --squad times engine files (`cli.py build`); time an ONNX export with "
                             "bench -e FILE.onnx -b B -s S")
    dev = pick_device(device)
    engine, wordpiece = load_runnable(path, dev)
    header = engine.header
    longest = max(p.seq_len for p in header.profiles)
    wordpiece, source = _tokenizer(path, wordpiece, vocab_file, engine.cfg.vocab_size)
    features = squad_features(squad, wordpiece, longest, limit)
    batch = max(p.batch for p in header.profiles if p.seq_len == longest)
    lengths = features.attention_mask.sum(1)
    yield (f"{path}: {engine.policy.describe()} on {dev.type}{' (' + header.gpu_name + ')' if header.gpu_name else ''}"
           f"; {len(lengths):,} windows of {squad} ({source}; {longest} tokens at most, mean {lengths.mean():.0f}, "
           f"median {np.median(lengths):.0f}); batches of {batch}; profiles {', '.join(map(str, header.profiles))}")
    runner = GraphRunner(engine, str(path))
    runs = [offline_run("engine, bucketed", runner, features, dev, batch, passes=passes)]
    yield runs[0].row()
    runs.append(offline_run(f"engine, padded to {longest}", runner, features, dev, batch, passes=passes,
                            pad_to=longest))
    yield runs[1].row(runs[0])
    runs.append(offline_run("engine, packed" + ("" if header.varlen else " (not built --varlen)"), runner, features,
                            dev, batch, passes=passes, packed=True))
    yield runs[2].row(runs[0]) + f"  ({runs[2].samples_per_s / runs[1].samples_per_s:.2f}x padded)"
    for run, path_args in zip(runs if profile else (), ({}, {"pad_to": longest}, {"packed": True})):
        yield "\n".join([f"  {run.name}: where a pass's time goes"]
                        + kernel_profile(runner, features, dev, batch, run.computed_tokens,
                                         **{"packed": False, **path_args}))
    if hf:
        forward = hf_eager(engine.cfg, dev)
        if forward is None:
            yield "HF eager: transformers is not installed here, not timed"
        else:
            runs.append(offline_run("HF eager fp16, bucketed" if dev.type == "cuda" else "HF eager fp32, bucketed",
                                    forward, features, dev, batch, passes=passes))
            yield runs[-1].row(runs[0])
            del forward
    if single:
        s = single_stream(runner, features, dev, single)
        yield (f"single stream, {s['n']} windows one at a time: p50 {s['p50']:.3f} ms, p90 {s['p90']:.3f} ms, "
               f"p99 {s['p99']:.3f} ms, mean {s['mean']:.3f} ms")
    yield ("(ratios: against the bucketed engine; samples/s = windows / median pass time; the engine runs "
           f"{'packed' if engine.runs_packed else 'bucketed'} in eval and infer)")


def bench_squad_from_flags(flags) -> Iterator[str]:
    return bench_squad(flags.engine, flags.squad, device=flags.device, passes=flags.passes, hf=flags.hf,
                       single=flags.single_stream, vocab_file=flags.vocab_file, profile=flags.profile)


__all__ = ["OfflineRun", "batch_tokens", "bench_squad", "bench_squad_from_flags", "hf_eager", "kernel_profile",
           "offline_run", "packed_tokens", "single_stream", "squad_features"]
