"""SQuAD calibration: run the FP32 reference model over sampled questions and pick one amax per tap site.

Ranges come from the FP32 model, as TensorRT's calibrator takes them, whatever precision the engine later runs in.
Only real tokens count: a batch is padded to its longest window, and padded positions (and the attention rows of
padded queries) hold activations no real input produces, in numbers that depend on how features were batched; every
site drops them on the device before its calibrator sees the batch. Questions are a fixed-seed sample kept in file order, so the data file,
count and seed name the same questions every time and the cache key is known before anything runs.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import median
from typing import Mapping, Sequence

import numpy as np
import torch
from tqdm import tqdm

from calib.cache import CalibrationCache, TensorRange, cache_key, find_reusable, save_cache
from calib.calibrators import ALGORITHM_VERSION, HistogramCollector, MaxCalibrator, make_calibrator
from quant.policy import calibration_method, calibration_sites
from quant.smoothing import check_alpha, smoothable_sites, smoothing_factors
from common.errors import WorkbenchError
from common.version import __version__
from data.features import FEATURIZER_VERSION, Features, FeatureSettings, featurize
from data.squad import Example, SquadFile
from data.tokenizer import WordPiece, load_wordpiece
from model.checkpoint import LoadedModel, load_model
from model.config import PRESETS
from model.runner import batches_by_length

OFFICIAL_DEV_V11_SHA256 = "95aa6a52d5d6a735563366753ca50492a658031da74f301ac5238b03966972c9"
# How each site's tensor is laid out, by kind (the part of the site name after the dot); all others are [B, S, X].
_LAYOUT = {"q": "heads", "k": "heads", "v": "heads", "probs": "pairs"}  # [B, N, S, D] and [B, N, S, S]

_KIND_ORDER = {k: i for i, k in enumerate(("ln_out", "q", "k", "v", "probs", "context", "attn_ln_out", "fc2_in",
                                           "ffn_ln_out"))}  # forward order, for the summary

log = logging.getLogger(__name__)

# `cli.py calibrate --help`
EXAMPLES = """examples:
  python cli.py calibrate --squad ../shared/data/squad/train-v1.1-explorer-reconstruction.json \\
      --model ../shared/models/minilm-l6-h384-squad11 --calib-num 100 --method entropy \\
      -o minilm.calib.json --trt-cache minilm.trtcache --eval-squad ../shared/data/squad/dev-v1.1.json
  python cli.py calibrate --squad train.json --model DIR --method percentile --percentile 99.99 -o calib.json
  python cli.py calibrate --squad train.json --model DIR -o calib.json --force   # recompute even if reusable
  python cli.py calibrate -sq train.json -c DIR -v DIR/vocab.txt -s 128 -o calib.json   # TensorRT demo spellings"""


@dataclass(frozen=True)
class CalibrationSpec:
    """Everything besides model, tokenizer, data and batch size that decides the ranges (see `settings`)."""

    method: str = "entropy"
    calib_num: int = 100          # SQuAD questions, not features
    seed: int = 0
    percentile: float = 99.99     # used by the percentile method only
    num_bins: int = 2048          # histogram methods only
    features: FeatureSettings = FeatureSettings()
    smooth: float | None = None   # --smooth ALPHA for the QKV, FC1 and FC2 inputs (quant/smoothing.py); None: off

    def __post_init__(self) -> None:
        if self.calib_num < 1:
            raise WorkbenchError(f"calib_num must be at least 1 question, got {self.calib_num}")
        if self.seed < 0:
            raise WorkbenchError(f"seed must be >= 0, got {self.seed}")
        make_calibrator(self.method, percentile=self.percentile, num_bins=self.num_bins)  # validates the rest
        if self.smooth is not None:
            check_alpha(self.smooth)

    def settings(self, tokenizer_digest: str) -> dict:
        """The cache's settings: what changes the result (not the batch size: see collect_ranges)."""
        out = {"calib_num": self.calib_num, "seed": self.seed, **asdict(self.features),
               "featurizer_version": FEATURIZER_VERSION, "tokenizer_digest": tokenizer_digest,
               "algorithm_version": ALGORITHM_VERSION}
        if self.method != "max":
            out.update(num_bins=self.num_bins)
        if self.method == "percentile":
            out["percentile"] = self.percentile
        if self.smooth is not None:
            out["smooth_alpha"] = self.smooth
        return out


@dataclass(frozen=True)
class CalibrationRun:
    cache: CalibrationCache
    reused: bool                     # found at the output path; nothing below was measured
    num_features: int | None = None
    featurize_s: float = 0.0
    collect_s: float = 0.0           # model forward + calibrators + amax computation


def load_calibration_model(spec: str | Path, *, trust_pickle: bool = False,
                           vocab_file: str | Path | None = None) -> tuple[LoadedModel, WordPiece]:
    """A fine-tuned model and its tokenizer (the folder's, or `vocab_file`); presets are refused before their
    random weights are built."""
    if str(spec) in PRESETS:
        raise WorkbenchError(f"{spec} is a random-weight timing preset with no vocabulary: calibration needs a "
                             "fine-tuned model folder")
    loaded = load_model(spec, trust_pickle=trust_pickle)
    return loaded, load_wordpiece(loaded.model_dir, vocab_size=loaded.config.vocab_size, vocab_file=vocab_file)


def check_fits(loaded: LoadedModel, settings: FeatureSettings) -> None:
    if settings.max_seq_length > loaded.config.max_position_embeddings:
        raise WorkbenchError(f"max_seq_length {settings.max_seq_length} exceeds the model's "
                             f"max_position_embeddings {loaded.config.max_position_embeddings}")


def select_questions(examples: Sequence[Example], n: int, seed: int) -> list[Example]:
    """n questions drawn without replacement by numpy default_rng(seed), in file order; all when n >= len."""
    if n < 1:
        raise WorkbenchError(f"calib_num must be at least 1 question, got {n}")
    if n >= len(examples):
        return list(examples)
    picked = np.sort(np.random.default_rng(seed).choice(len(examples), size=n, replace=False))
    return [examples[i] for i in picked]


def overlap_warning(chosen: Sequence[Example], eval_squad: SquadFile) -> str | None:
    """One line when calibration questions share ids or contexts with the evaluation file, else None."""
    ids = {ex.qid for ex in eval_squad.examples}
    contexts = {ex.context for ex in eval_squad.examples}
    same_id = sum(ex.qid in ids for ex in chosen)
    same_context = sum(ex.context in contexts for ex in chosen)
    either = sum(ex.qid in ids or ex.context in contexts for ex in chosen)
    if not either:
        return None
    return (f"{either} of {len(chosen)} calibration questions overlap the evaluation file {eval_squad.path} "
            f"({same_id} share a question id, {same_context} a context): calibrating on the evaluation set "
            "inflates accuracy")


def calibrate(squad: SquadFile, loaded: LoadedModel, wordpiece: WordPiece, spec: CalibrationSpec, *,
              device: torch.device, batch_size: int, output: str | Path | None = None, force: bool = False,
              eval_squad: SquadFile | None = None, feature_cache: bool = True,
              progress: bool = True) -> CalibrationRun:
    """Reuse the cache at `output` when it was made from the same inputs (unless `force`), else compute and save."""
    output = Path(output) if output is not None else None
    if output is not None and output.is_dir():
        raise WorkbenchError(f"{output}: is a directory, expected a calibration cache file name")
    check_fits(loaded, spec.features)
    chosen = select_questions(squad.examples, spec.calib_num, spec.seed)
    if spec.calib_num > len(squad.examples):
        log.warning("calib_num %d exceeds the %d questions of %s: calibrating on all of them",
                    spec.calib_num, len(squad.examples), squad.path)
    if squad.digest == OFFICIAL_DEV_V11_SHA256:
        log.warning("%s is the official SQuAD v1.1 dev set: calibrating on the evaluation set inflates accuracy "
                    "(calibrate on train)", squad.path)
    if eval_squad is not None and (line := overlap_warning(chosen, eval_squad)):
        log.warning("%s", line)

    inputs = dict(method=spec.method, settings=spec.settings(wordpiece.digest),
                  num_samples=len(chosen), model_digest=loaded.digest, data_digest=squad.digest,
                  tool_version=__version__)
    cached = find_reusable(output, cache_key(**inputs), inputs) if output is not None and not force else None
    if cached is not None:
        return CalibrationRun(cached, reused=True)

    t0 = time.perf_counter()
    features = featurize(chosen, wordpiece, spec.features, cache=feature_cache, progress=progress)
    t1 = time.perf_counter()
    model = loaded.model.to(device=device, dtype=torch.float32).eval()
    smooth = smoothing_vectors(model, features, spec.smooth, device=device, batch_size=batch_size,
                               progress=progress) if spec.smooth is not None else {}
    ranges = collect_ranges(model, features, calibration_sites(loaded.config.num_layers), spec.method,
                            percentile=spec.percentile, num_bins=spec.num_bins, device=device,
                            batch_size=batch_size, progress=progress, smooth=smooth)
    t2 = time.perf_counter()
    cache = CalibrationCache(ranges={name: TensorRange(a, tuple(smooth[name].tolist()) if name in smooth else None)
                                     for name, a in ranges.items()}, **inputs)
    if output is not None:
        try:
            save_cache(cache, output)
        except OSError as e:
            raise WorkbenchError(f"{output}: cannot write calibration cache: {e.strerror or e}") from None
    return CalibrationRun(cache, reused=False, num_features=len(features), featurize_s=t1 - t0, collect_s=t2 - t1)


def collect_ranges(model: torch.nn.Module, features: Features, sites: Sequence[str], method: str, *,
                   percentile: float = 99.99, num_bins: int = 2048, device: torch.device, batch_size: int = 32,
                   progress: bool = True, smooth: Mapping[str, torch.Tensor] | None = None) -> dict[str, float]:
    """amax per site over the real tokens of every feature; `model` is already on `device` in its final dtype.
    Sites in `smooth` are calibrated as x / s (quant/smoothing.py)."""
    calibrators = {site: make_calibrator(calibration_method(site, method), percentile=percentile, num_bins=num_bins)
                   for site in sites}
    divide = {site: v.to(device=device, dtype=torch.float32) for site, v in (smooth or {}).items()}
    seen: set[str] = set()
    # Histogram methods: a max pass first fixes each histogram's range, so no batch re-bins it and the ranges do
    # not depend on batch size or order (they moved by up to 12% with batching when histograms grew as they went).
    histograms = {site: c for site, c in calibrators.items() if isinstance(c, HistogramCollector)}
    if histograms:
        maxima = {site: MaxCalibrator() for site in histograms}
        _run(model, features, maxima, f"calibrate (max pass for {method})", device, batch_size, progress, divide,
             seen)
        for site, collector in histograms.items():
            collector.fix_range(maxima[site].compute_amax(), device)
    _run(model, features, calibrators, f"calibrate ({method})", device, batch_size, progress, divide, seen)
    missing = [site for site in sites if site not in seen]
    if missing:
        raise WorkbenchError(f"the model never reached calibration site {missing[0]} ({len(missing)} missing)")
    ranges = {}
    for site, calibrator in calibrators.items():
        try:
            ranges[site] = calibrator.compute_amax()
        except WorkbenchError as e:
            raise WorkbenchError(f"{site}: {e}") from None
    return ranges


class _ChannelMax:
    """max |x| per channel (last dim) of [rows, H] batches: what smoothing factors are made of."""

    def __init__(self) -> None:
        self.amax: torch.Tensor | None = None

    def collect(self, x: torch.Tensor) -> None:
        m = x.detach().abs().amax(dim=0).float()
        self.amax = m if self.amax is None else torch.maximum(self.amax, m)


def smoothing_vectors(model, features: Features, alpha: float, *, device: torch.device, batch_size: int = 32,
                      progress: bool = True) -> dict[str, torch.Tensor]:
    """One pass for the per-channel maxima of the LayerNorm outputs that GEMMs read, then s per site (CPU float32)."""
    sites = smoothable_sites(len(model.layers))
    collectors = {site: _ChannelMax() for site in sites}
    _run(model, features, collectors, "calibrate (channel max for --smooth)", device, batch_size, progress, {}, set())
    return {site: smoothing_factors(collectors[site].amax, getattr(model.layers[layer], gemm).weight, alpha)
            for site, (layer, gemm) in sites.items()}


def _run(model, features: Features, collectors: Mapping, desc: str, device: torch.device, batch_size: int,
         progress: bool, divide: Mapping[str, torch.Tensor], seen: set[str]) -> None:
    """One pass of the model over all features, feeding each site's real values (divided by its smoothing vector,
    if any) to its collector; `seen` gathers the sites reached."""
    if batch_size < 1:
        raise WorkbenchError(f"--batch-size must be at least 1, got {batch_size}")
    mask = features.attention_mask
    lengths = mask.sum(1)
    if not np.array_equal(mask != 0, np.arange(mask.shape[1]) < lengths[:, None]):
        raise ValueError("attention masks must be a run of ones followed by padding, as featurize makes them")
    windows = np.bincount(features.example_index)
    num_questions = int((windows > 0).sum())
    batch: dict = {}

    def tap(name: str, x: torch.Tensor) -> torch.Tensor:
        collector = collectors.get(name)
        if collector is not None:
            real = real_values(x, _LAYOUT.get(kind(name), "tokens"), batch["rows"], batch["lengths"])
            if name in divide:
                real = real.float() / divide[name]
            try:
                collector.collect(real)
            except WorkbenchError as e:
                raise WorkbenchError(f"{name}: {e}") from None
            seen.add(name)
        return x

    # Questions, not features, drive the bar: a question is done when its last window has run.
    windows_left, done = windows.copy(), 0
    previous_tap, model.tap = model.tap, tap
    try:
        with torch.inference_mode(), tqdm(total=num_questions, desc=desc, unit="q", disable=not progress,
                                          leave=False) as bar:
            for idx, seq in batches_by_length(mask, batch_size):
                inputs = [torch.from_numpy(a[idx, :seq]).to(device, non_blocking=True).long()
                          for a in (features.input_ids, features.token_type_ids, mask)]
                # Real-token indices come from the host copy of the mask: no device sync to find them.
                rows = np.flatnonzero(mask[idx, :seq])
                batch.update(rows=torch.from_numpy(rows).to(device, non_blocking=True),
                             lengths=lengths[idx].tolist())
                model(*inputs)
                windows_left -= np.bincount(features.example_index[idx], minlength=len(windows_left))
                now = num_questions - int((windows_left > 0).sum())
                bar.update(now - done)
                done = now
    finally:
        model.tap = previous_tap


def real_values(x: torch.Tensor, layout: str, rows: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
    """The values of `x` at real tokens only. `rows` indexes the real (sample, position) pairs of the flattened
    [B*S] batch; `lengths` are the samples' real lengths (masks are a prefix of ones).

    tokens [B, S, X]: real rows. heads [B, N, S, D]: real positions of every head (the [B, S, N*D] view is how the
    QKV GEMM wrote them). pairs [B, N, S, S]: real query rows x real key columns, one slice per sample: a masked
    select would find the same elements with a device-wide nonzero and host sync per call, ~10x slower on the CPU.
    """
    if layout == "pairs":
        return torch.cat([x[b, :, :n, :n].reshape(-1) for b, n in enumerate(lengths)])
    if layout == "heads":
        x = x.transpose(1, 2)
    elif layout != "tokens":
        raise ValueError(f"unknown tensor layout {layout!r}")
    return x.reshape(x.shape[0] * x.shape[1], -1).index_select(0, rows)


def kind(site: str) -> str:
    """The part after the dot: q, k, v, probs, context, attn_ln_out, fc2_in, ffn_ln_out, ln_out."""
    return site.rpartition(".")[2]


def summary_lines(run: CalibrationRun, extremes: int = 5) -> list[str]:
    """Method, counts and time, the widest and narrowest ranges, and amax per kind of site."""
    cache = run.cache
    head = f"{cache.method}: {cache.num_samples} questions, {len(cache.ranges)} sites"
    smoothed = sum(r.smooth is not None for r in cache.ranges.values())
    if smoothed:
        head += f" ({smoothed} smoothed, alpha {cache.settings.get('smooth_alpha', '?')}: amax of x / s)"
    if run.reused:
        head += ", reused cache (model not run)"
    else:
        total = run.featurize_s + run.collect_s
        head += (f", {run.num_features} features, {total:.2f} s (featurize {run.featurize_s:.2f} s, model + "
                 f"calibrators {run.collect_s:.2f} s; {cache.num_samples / max(total, 1e-9):,.1f} questions/s)")
    by_amax = sorted(cache.ranges.items(), key=lambda kv: (-kv[1].amax, kv[0]))
    w = max([len(name) for name in cache.ranges] + [11])
    lines = [head]
    narrowest = by_amax[::-1][:extremes]
    for title, rows in ((f"widest {extremes}", by_amax[:extremes]), (f"narrowest {extremes}", narrowest)):
        lines.append(f"  {title:<{w}}  {'amax':>10}  {'scale':>11}")
        lines += [f"  {name:<{w}}  {r.amax:>10.5g}  {r.scale:>11.5g}" for name, r in rows]
    kinds: dict[str, list[float]] = {}
    for name, r in sorted(cache.ranges.items(), key=lambda kv: _KIND_ORDER.get(kind(kv[0]), len(_KIND_ORDER))):
        kinds.setdefault(kind(name), []).append(r.amax)
    lines.append(f"  {'kind':<{w}}  {'min amax':>10}  {'median':>11}  {'max amax':>10}  sites")
    lines += [f"  {k:<{w}}  {min(v):>10.5g}  {median(v):>11.5g}  {max(v):>10.5g}  {len(v):>5}"
              for k, v in kinds.items()]
    return lines


def calibrate_from_flags(flags, say=print) -> str:
    """`cli.py calibrate`: its flags (squad, model, vocab_file, trust_pickle, device, batch_size, calib_num, seed,
    method, percentile (None: not given), smooth, output, trt_cache, force, eval_squad, max_seq_length,
    doc_stride, max_query_length, no_progress) checked, the cache made or reused, the TensorRT cache written;
    `say` gets what was reused and written, the returned text is the summary table."""
    from calib.trt_cache import check_int8_method, write_trt_cache
    from data.squad import load_squad
    from model.runner import pick_device

    if flags.trt_cache:
        check_int8_method(flags.method)  # before the slow work
    for bad, why in ((flags.calib_num < 1, f"--calib-num must be at least 1, got {flags.calib_num}"),
                     (flags.batch_size is not None and flags.batch_size < 1,
                      f"--batch-size must be at least 1, got {flags.batch_size}"),
                     (flags.seed < 0, f"--seed must be >= 0, got {flags.seed}"),
                     (flags.trt_cache and Path(flags.trt_cache).is_dir(),
                      f"{flags.trt_cache}: is a directory, expected a TensorRT calibration cache file name"),
                     (flags.trt_cache and flags.smooth is not None, "--trt-cache: TensorRT's calibration cache holds "
                      "one scale per tensor and cannot express --smooth (per-channel input scales folded into the "
                      "weights); calibrate without --smooth for TensorRT"),
                     (flags.percentile is not None and flags.method != "percentile",
                      f"--percentile {flags.percentile} applies to --method percentile only (--method "
                      f"{flags.method} would ignore it): drop it, or use --method percentile")):
        if bad:
            raise WorkbenchError(why)
    percentile = 99.99 if flags.percentile is None else flags.percentile
    spec = CalibrationSpec(flags.method, flags.calib_num, flags.seed, percentile, smooth=flags.smooth,
                           features=FeatureSettings(flags.max_seq_length, flags.doc_stride, flags.max_query_length))
    device, squad = pick_device(flags.device), load_squad(flags.squad)
    eval_squad = load_squad(flags.eval_squad) if flags.eval_squad else None
    loaded, wordpiece = load_calibration_model(flags.model, trust_pickle=flags.trust_pickle,
                                               vocab_file=getattr(flags, "vocab_file", None))
    run = calibrate(squad, loaded, wordpiece, spec, device=device, output=flags.output, force=flags.force,
                    batch_size=flags.batch_size or (64 if device.type == "cuda" else 16), eval_squad=eval_squad,
                    progress=not flags.no_progress)
    if run.reused:
        say(f"reused calibration cache {flags.output} ({run.cache.method}, {run.cache.num_samples} questions)")
    else:
        say(f"wrote calibration cache {flags.output} ({run.cache.describe()}; build with --calib-cache "
            f"{flags.output})")
    if flags.trt_cache:
        write_trt_cache(flags.trt_cache, run.cache.ranges, run.cache.method)
        say(f"wrote TensorRT calibration cache {flags.trt_cache}")
    return "\n".join(summary_lines(run))


def observed_amax(model, batches, smooth: Mapping[str, torch.Tensor] | None = None) -> dict[str, float]:
    """max |x| of every tap site over the forwards of `batches` ((input_ids, token_type_ids, attention_mask)
    tuples), of x / s at a smoothed site: the plain max ranges tests and timing runs build engines from (padded
    positions included, unlike `calibrate`, which keeps real tokens only)."""
    smooth = smooth or {}
    amax: dict[str, float] = {}

    def tap(name: str, x: torch.Tensor) -> torch.Tensor:
        seen = x / smooth[name] if name in smooth else x
        amax[name] = max(amax.get(name, 0.0), float(seen.abs().max()))
        return x

    model.tap = tap
    try:
        with torch.no_grad():
            for batch in batches:
                model(*batch)
    finally:
        model.tap = lambda name, x: x
    return amax
