"""The packed (padding-free) path of a --varlen engine: its header entries and its build-time timing.

`build --varlen` records `varlen` in the engine header; each profile B x S is then also a token budget, B*S
tokens in at most B windows (engines/graphs.py captures a graph per budget), and `eval`, `bench` and `infer`
run the engine packed (Engine.forward_packed, model/packing.py) unless the build chose otherwise:

- On CUDA the build times the variable-length attention's candidates per budget (the library path, our Triton
  kernels, PyTorch's varlen_attn for FP16), each first checked against the library path's output, and keeps the
  fastest under "attention.varlen.tT" (T = the budget's tokens).
- It then times the two ways of running the same windows, packed into budgets and bucketed (length-sorted
  batches, each in the smallest profile that holds it: engines/graphs.py), whole forwards replayed from their
  graphs, and records the faster as PATH_KEY ("packed" or "bucketed") with both times (PATH_TIMES_KEY). The
  windows are synthetic: lengths spread evenly from a quarter of the longest profile to all of it (4 x its batch
  of them), token ids at random; `bench --squad` measures a real file's. A packed path whose logits disagree with
  the bucketed one's is not chosen (a warning says so).
- On the CPU nothing is timed: the engine runs packed, as asked.
"""
from __future__ import annotations

import hashlib
import json
import logging
import statistics
from typing import Callable

import numpy as np
import torch

from engines.engine_file import EngineHeader
from engines.tuning import LIBRARY, GemmProblem, TimingCache, choose

log = logging.getLogger(__name__)

PATH_KEY = "path"              # header kernels: "packed" or "bucketed", where the build timed both
PATH_TIMES_KEY = "path.times"  # header kernels: both paths' times, in words
PACKED, BUCKETED = "packed", "bucketed"
# The most the two paths' start logits may differ in any window, relative to that window's (FP16 attention kernels
# and GEMM algorithms that differ between row counts, INT8 codes flipping at rounding boundaries, over 24 layers);
# a packed path that mixes windows or misplaces positions is off by the order of the logits themselves.
PATH_AGREEMENT = 5e-2


def varlen_attention_key(tokens: int) -> str:
    """The header key of the packed path's attention implementation at a token budget of `tokens`."""
    return f"attention.varlen.t{tokens}"


def runs_packed(header: EngineHeader) -> bool:
    """Whether the engine runs packed: built --varlen, and not timed slower than bucketed by its build."""
    return header.varlen and header.kernels.get(PATH_KEY, PACKED) == PACKED


GOLDEN = 0.6180339887498949  # the fractional parts of k * GOLDEN spread evenly over [0, 1) in any prefix


def budget_layout(windows: int, tokens: int, max_seqlen: int, device: torch.device) -> torch.Tensor:
    """cu_seqlens of the windows the build times and checks packed attention on at a token budget of `tokens`
    rows and `windows` windows: lengths spread from max_seqlen down to a quarter of it, long and short mixed (the
    path timing's spread, synthetic_windows), as many as the rows hold with at most windows - 1 of them, the last
    cut to the rows left; then windows of length 0 (a graph's unused windows) and any rows left over (its tail).
    Spread lengths, not equal ones: windows of exactly max_seqlen fill whole 128-row query blocks, which real
    windows do not; timed on those, builds chose query blocks that waste about a third of their work on real
    windows (BENCHMARKS.md, seventh session)."""
    lo, lengths, left = max(1, max_seqlen // 4), [], tokens
    for k in range(max(windows - 1, 1)):
        if left <= 0:
            break
        n = min(max_seqlen - int((k * GOLDEN) % 1.0 * (max_seqlen - lo + 1)), left)
        lengths.append(n)
        left -= n
    lengths += [0] * (windows - len(lengths))
    return torch.tensor([0, *np.cumsum(lengths)], dtype=torch.int32, device=device)


def varlen_attention_candidates(engine, windows: int, tokens: int, max_seqlen: int
                                ) -> tuple[GemmProblem, dict[str, Callable[[], torch.Tensor]], int] | None:
    """Layer 0's packed attention at a token budget as the forward runs it (random FP16 QKV output, or under
    -imh activation-like codes; `tokens` rows in `windows` windows: budget_layout), one zero-argument call per
    implementation for build-time timing; None where only the library path runs (the CPU, FP32 engines)."""
    from engines import backends
    from engines.runtime import Packed, activation_codes

    if not engine.use_triton or engine.dtype != torch.float16:
        return None
    cfg, device = engine.cfg, engine.device
    gen = torch.Generator(device=device).manual_seed(tokens)
    if engine.policy.imh:
        qkv = activation_codes((tokens, 3 * cfg.hidden_size), gen, device)
    else:
        qkv = torch.randn(tokens, 3 * cfg.hidden_size, generator=gen, device=device).to(engine.dtype)
    layout = Packed(budget_layout(windows, tokens, max_seqlen, device), max_seqlen)
    problem = GemmProblem("varlen-attention", tokens, cfg.hidden_size, max_seqlen,
                          "int8-codes" if engine.policy.imh else "float16",
                          f"w{windows}-spread->{engine.context_output()}")
    impls = backends.attention_candidates(windows, max_seqlen, engine._attention_format, engine.use_triton,
                                          varlen=True)
    covered = int(layout.cu_seqlens[-1])  # rows past the windows hold nothing to compare (kernels leave them)
    return problem, {impl: (lambda impl=impl: engine._attend(0, qkv, layout, impl)[:covered]) for impl in impls}, 1


def tune_packed(engine, cache: TimingCache, machine: str) -> dict[str, str]:
    """A --varlen build's choices on CUDA (module docstring): the packed attention per token budget, then the
    path; header entries."""
    header = engine.header
    longest = max(p.seq_len for p in header.profiles)
    chosen: dict[str, str] = {}
    for p in sorted(set(header.profiles), key=lambda p: (p.batch * p.seq_len, -p.batch)):
        tokens = p.batch * p.seq_len
        if varlen_attention_key(tokens) in chosen:  # (another profile of as many tokens, more windows: timed,
            continue                                # the one packed batches of short windows fill)
        found = varlen_attention_candidates(engine, p.batch, tokens, longest)
        if found is None:
            continue
        problem, candidates, calls = found
        best, times = choose(problem, candidates, cache, machine, calls, engine.attention_agreement())
        chosen[varlen_attention_key(tokens)] = best
        log.info("packed attention, %d tokens: %s %.3f ms (library %.3f ms)", tokens, best, times[best],
                 times[LIBRARY])
    engine.kernels.update(chosen)  # the path timing runs what the header will say
    return {**chosen, **_choose_path(engine, cache, machine)}


def synthetic_windows(header: EngineHeader, vocab_size: int, seed: int = 0):
    """The path timing's windows (module docstring) as featurized arrays: ids, token types, attention mask."""
    from engines.engine_file import Profile

    longest: Profile = max(header.profiles, key=lambda p: (p.seq_len, p.batch))
    n, s = 4 * longest.batch, longest.seq_len
    rng = np.random.default_rng(seed)
    lengths = np.linspace(max(1, s // 4), s, n).round().astype(np.int64)
    ids = rng.integers(min(1000, vocab_size // 2), vocab_size, (n, s))
    types = (np.arange(s)[None, :] >= np.minimum(lengths[:, None] // 4, 64)).astype(np.int64)
    mask = (np.arange(s)[None, :] < lengths[:, None]).astype(np.int64)
    return ids * mask, types * mask, mask, longest.batch


def _choose_path(engine, cache: TimingCache, machine: str) -> dict[str, str]:
    """Packed against bucketed over the synthetic windows: each path's median pass in ms (whole forwards replayed
    from their graphs, inputs already on the GPU, logits left there), the faster recorded; packed only where its
    logits agree with the bucketed path's in every window (PATH_AGREEMENT)."""
    from engines.graphs import GraphRunner

    runner = GraphRunner(engine, "the engine being built")
    ids, types, mask, batch = synthetic_windows(engine.header, engine.cfg.vocab_size)
    passes = {BUCKETED: _bucketed_pass(runner, ids, types, mask, batch),
              PACKED: _packed_pass(runner, ids, types, mask, batch)}
    logits = {name: assemble(run()) for name, (run, assemble) in passes.items()}  # graphs captured here
    error = max(float(np.linalg.norm(p[:n] - b[:n]) / max(float(np.linalg.norm(b[:n])), 1e-30))
                for p, b, n in zip(logits[PACKED], logits[BUCKETED], mask.sum(1)))  # the worst window
    key = _path_problem(engine, int(mask.sum()))
    times = {name: cache.get(key.key(name, machine), lambda run=run: _median_ms(run))
             for name, (run, _) in passes.items()}
    best = PACKED if times[PACKED] <= times[BUCKETED] else BUCKETED
    if error > PATH_AGREEMENT:
        log.warning("the packed path's logits differ from the bucketed path's by %.2g (relative, in the worst window): "
                    "this build runs bucketed", error)
        best = BUCKETED
    words = f"packed {times[PACKED]:.3f} ms, bucketed {times[BUCKETED]:.3f} ms over {len(mask)} synthetic windows"
    log.info("path: %s (%s)", best, words)
    del runner
    return {PATH_KEY: best, PATH_TIMES_KEY: words}


def _path_problem(engine, real_tokens: int) -> GemmProblem:
    """The timing cache's key of a path timing: the model's shape, the build and every kernel it chose."""
    h = engine.header
    build = json.dumps([h.model_config, h.policy, [str(p) for p in h.profiles], engine.kernels], sort_keys=True)
    return GemmProblem("forward-path", real_tokens, engine.cfg.hidden_size, max(p.seq_len for p in h.profiles),
                       "windows", hashlib.sha256(build.encode()).hexdigest()[:16])


def _bucketed_pass(runner, ids, types, mask, batch: int):
    """The bucketed path over the windows, inputs on the GPU first: a pass (start logits of each batch, on the
    GPU) and how its logits become [N, S]."""
    from model.runner import batches_by_length

    dev = runner.engine.device
    batches = [(idx, [torch.from_numpy(a[idx, :s]).to(dev) for a in (ids, types, mask)], bool(mask[idx, :s].all()))
               for idx, s in batches_by_length(mask, batch)]

    def run() -> list[torch.Tensor]:
        return [runner(*args, dense=dense)[0].clone() for _, args, dense in batches]  # a replay overwrites outputs

    def assemble(outputs: list[torch.Tensor]) -> np.ndarray:
        out = np.zeros(mask.shape, dtype=np.float32)
        for (idx, _, _), start in zip(batches, outputs):
            out[idx, :start.shape[1]] = start.float().cpu().numpy()
        return out
    return run, assemble


def _packed_pass(runner, ids, types, mask, batch: int):
    """The packed path over the same windows (model/packing.py's batches, on the GPU first), as _bucketed_pass."""
    from model.packing import batches_of, packed_batch, scatter_logits

    dev = runner.engine.device
    lengths, indices = batches_of(mask, batch, runner.packing)
    packs = [packed_batch(ids, types, lengths, idx) for idx in indices]
    on_device = [([t.to(dev) for t in p.tensors], p.max_seqlen) for p in packs]

    def run() -> list[torch.Tensor]:
        return [runner.packed(*args, longest)[0].clone() for args, longest in on_device]

    def assemble(outputs: list[torch.Tensor]) -> np.ndarray:
        out = np.zeros(mask.shape, dtype=np.float32)
        for p, start in zip(packs, outputs):
            scatter_logits(out, p, start.cpu())
        return out
    return run, assemble


def _median_ms(run: Callable[[], object], passes: int = 5) -> float:
    """The median of `passes` timed passes (CUDA events) after one untimed one (graphs captured, kernels warm)."""
    run()
    times = []
    for _ in range(passes):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)
