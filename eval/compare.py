"""Comparing builds: latency at each profile, the report's columns, and `cli.py eval` with several builds.

Shared by `cli.py eval` (several builds given on the command line) and `cli.py sweep` (the grid) through
eval.measure, so a row means the same in both: EM/F1 on the same questions, median/p99 compute latency
(eval.benchmark.time_until_stable on random tokens of the profile's full shape: rounds until two agree) and
throughput at each profile, engine size and build time from the engine file. `ComparisonPlan` and
`evaluate_builds` are `cli.py eval`'s: the baseline and profiles of the builds given, each build measured, one
table against the baseline.
"""
from __future__ import annotations

import math
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from common.errors import WorkbenchError
from eval.report import ProfileLatency, profile_label

if TYPE_CHECKING:
    import torch

    from calib.cache import CalibrationCache
    from qat.folder import QatScales
    from eval.measure import Build, Measured, Questions

# Timed runs per profile: a few on the CPU (CI, laptops: each forward takes a fraction of a second), enough on CUDA
# for a stable median and a meaningful p99.
BENCH_DEFAULTS = {"cpu": (5, 1), "cuda": (100, 10)}  # device type -> (iterations, warm-up)
_NAME_OK = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


def bench_defaults(device: torch.device, iterations: int | None, warmup: int | None) -> tuple[int, int]:
    """(iterations, warm-up) for timing: the device's defaults where not given; checked."""
    default_iterations, default_warmup = BENCH_DEFAULTS["cuda" if device.type == "cuda" else "cpu"]
    iterations = default_iterations if iterations is None else iterations
    warmup = default_warmup if warmup is None else warmup
    if iterations < 1 or warmup < 0:
        raise WorkbenchError(f"--bench-iterations must be at least 1 and --bench-warmup at least 0 "
                             f"(got {iterations} and {warmup})")
    return iterations, warmup


def time_profiles(forward, profiles: Sequence[tuple[int, int]], vocab_size: int, device: torch.device,
                  iterations: int, warmup: int, tolerance: float | None = None) -> tuple[ProfileLatency, ...]:
    """Compute latency of `forward` at each (batch, seq_len), on random tokens of exactly that shape: rounds of
    `iterations` calls until two agree (eval.benchmark.time_until_stable), with the runs and spread behind it."""
    from eval.benchmark import Latency, random_inputs, time_until_stable

    out = []
    for batch, seq_len in profiles:
        inputs = random_inputs(batch, seq_len, vocab_size, device)
        t = time_until_stable(forward, inputs, iterations, warmup, device, tolerance=tolerance)
        out.append(ProfileLatency.from_latency(Latency.from_samples(batch, seq_len, t.samples_ms), runs=t.runs,
                                               spread=round(t.spread, 4), stable=t.stable))
    return tuple(out)


def timing_policy(device: torch.device, iterations: int, warmup: int, tolerance: float | None = None) -> str:
    """How the figures were timed, in words (reports record it)."""
    from eval.benchmark import STABLE_DEFAULTS

    tol, rounds, seconds = STABLE_DEFAULTS["cuda" if device.type == "cuda" else "cpu"]
    tol = tolerance or tol
    return (f"median of the last two rounds of {iterations} runs (after {warmup} warm-up), once two consecutive "
            f"rounds agree within {tol:.0%} (at most {rounds} rounds or {seconds:.0f} s a profile, else marked not "
            "stable)")


def latency_line(latency: Sequence[ProfileLatency]) -> str:
    return ", ".join(f"{profile_label(lat.profile)} {lat.median_ms:.3f} ms (p99 {lat.p99_ms:.3f}"
                     + (f", {lat.runs} runs" if lat.runs else "")
                     + (f", NOT stable: rounds ±{lat.spread:.0%} apart" if lat.stable is False else "") + ")"
                     for lat in latency)


def describe_calibration(cache: CalibrationCache | QatScales | None) -> str:
    """The report's calibration column: "entropy (100 q)", "percentile 99.9 (100 q)", "QAT (learned)", or "-"
    without INT8."""
    return "-" if cache is None else cache.describe()


def calibration_of_engine(calib_digest: str | None, described: str = "") -> str:
    """The calibration column for an engine file: what its header says (engines built since the header holds a
    description), else the cache of that key in the workbench cache directory (where `cli.py sweep` keeps them);
    a cache kept elsewhere shows as its key."""
    from calib.cache import CacheError, default_cache_path, load_cache

    if calib_digest is None:
        return "-"
    if described:
        return described
    path = default_cache_path(calib_digest)
    if path.exists():
        try:
            cache = load_cache(path)
            if cache.key() == calib_digest:
                return describe_calibration(cache)
        except CacheError:
            pass
    return f"cache {calib_digest[:12]}"


def check_name(name: str, what: str = "build name") -> str:
    """Names become file names (predictions/NAME.json, engines/NAME.engine): letters, digits, . _ + - only."""
    if not isinstance(name, str) or not _NAME_OK.fullmatch(name):
        raise WorkbenchError(f"{what} {name!r}: use letters, digits, '.', '_', '+' and '-' (it names files), "
                             "starting with a letter or digit")
    return name


def unique_names(names: Sequence[str]) -> list[str]:
    """Row names from labels (engine file stems, model folder names): characters other than letters, digits and
    . _ + - become _, and a repeated name gets -2, -3, ..."""
    out: list[str] = []
    for name in names:
        base = re.sub(r"[^A-Za-z0-9._+-]", "_", name).lstrip("._+-") or "build"
        candidate, n = base, 1
        while candidate in out:
            n += 1
            candidate = f"{base}-{n}"
        out.append(candidate)
    return out


# ------------------------------------------------------------------------------------------ cli.py eval

EXAMPLES = """examples:
  python cli.py eval --squad ../shared/data/squad/dev-v1.1.json --model ../shared/models/minilm-l6-h384-squad11 \\
      --precision fp16 -o predictions.json --metrics-json metrics.json
  python cli.py eval --squad dev.json --model DIR --limit 50 --device cpu
  python cli.py eval --squad dev.json --model DIR engines/int8.engine engines/int8-iln.engine \\
      --max-f1-drop 1.0 --report-dir report/          # the FP16 model is the baseline: table, files, plot
  python cli.py eval --squad dev.json engines/fp16.engine engines/int8.engine --profile 64x384"""
COMPARING_HELP = (
    "With several builds (or any of these flags) eval also times each build (on CUDA at each of its engine "
    "profiles, the model at the profiles the engines have; on the CPU at the selection profile only) until two "
    "rounds of timed runs agree, and prints one table: options, calibration, EM, F1, ΔEM/ΔF1 against the baseline, "
    "median/p99 latency, throughput and speed-up per profile, engine size, build time; the chosen build is the "
    "fastest at the selection profile whose F1 is within --max-f1-drop of the baseline, builds within timing "
    "noise of it being a tie that the higher F1 wins. Builds of another model than the baseline's are named.")
BASELINE_HELP = (
    "what the others are compared with. fp16: --model evaluated in FP16 (--precision must be fp16 or unset), or "
    "without --model the one engine built with --fp16 and without --int8 or --fp8; model: --model at its --precision; "
    "ENGINE: one of the engine files given. Default: model when --model is given (FP16 on CUDA), else fp16")


def wants_comparison(n_builds: int, *flags) -> bool:
    """`eval` compares with several builds, or when any comparison flag is given (not None)."""
    return n_builds > 1 or any(v is not None for v in flags)


class ComparisonPlan:
    """`eval` with several builds (or --report-dir/--baseline/--max-f1-drop/--profile): time each build at its
    profiles, then one comparison table against the baseline (eval.report), optionally written to --report-dir.

    Made from the flags before anything slow runs (their errors come first); `model_precision` is what --model is
    loaded at (FP16 when it is the FP16 baseline)."""

    def __init__(self, *, max_f1_drop: float | None = None, profile: str | None = None,
                 report_dir: str | None = None, baseline: str | None = None, model: str | None = None,
                 precision: str | None = None):
        from eval.report import DEFAULT_MAX_F1_DROP, parse_profile

        self.max_f1_drop = DEFAULT_MAX_F1_DROP if max_f1_drop is None else max_f1_drop
        if not (math.isfinite(self.max_f1_drop) and self.max_f1_drop >= 0):
            raise WorkbenchError(f"--max-f1-drop {max_f1_drop!r}: must be a finite number of F1 points >= 0")
        self.profile = parse_profile(profile) if profile else None
        if report_dir and Path(report_dir).exists() and not Path(report_dir).is_dir():
            raise WorkbenchError(f"{report_dir}: --report-dir is a file, expected a directory")
        self.report_dir, self.has_model = report_dir, bool(model)
        self.choice = baseline or ("model" if model else "fp16")
        if self.choice == "model" and not model:
            raise WorkbenchError("--baseline model needs --model DIR")
        self.model_precision = precision
        if self.choice == "fp16" and model:  # the FP16 baseline is the model run in FP16
            if precision not in (None, "fp16"):
                raise WorkbenchError(f"--baseline fp16 evaluates --model in FP16: drop --precision {precision}, "
                                     "or use --baseline model to compare against the model at its --precision")
            self.model_precision = "fp16"
        self.rows: list = []

    def resolve(self, builds: Sequence[Build], max_seq_length: int, iterations: int | None,
                warmup: int | None) -> None:
        """Row names, the baseline, the profiles each build is timed at, and the timing settings."""
        from eval.runnables import engine_profiles

        self.names = unique_names([b.name for b in builds])
        self.baseline = self._baseline(builds)
        engines = [b for b in builds if b.kind == "engine"]
        shared = sorted({p for b in engines for p in engine_profiles(b)})
        model_profiles = shared or [self.profile or (1, max_seq_length)]
        self.profiles = [model_profiles if b.kind == "model" else engine_profiles(b) for b in builds]
        if self.profile is not None:
            missing = [self.names[i] for i, ps in enumerate(self.profiles) if self.profile not in ps]
            if missing:
                raise WorkbenchError(f"--profile {self.profile[0]}x{self.profile[1]}: not a profile of "
                                     f"{', '.join(missing)}")
        common = set(self.profiles[0]).intersection(*map(set, self.profiles[1:]))
        if builds[0].device.type != "cuda" and common:  # the CPU times what decides the choice, nothing more
            selection = self.profile or max(common, key=lambda p: (p[0] * p[1], p[0], p[1]))
            self.profiles = [[selection] for _ in builds]
        self.iterations, self.warmup = bench_defaults(builds[0].device, iterations, warmup)
        self.timing = timing_policy(builds[0].device, self.iterations, self.warmup)
        base = builds[self.baseline]
        for i, b in enumerate(builds):
            if b.model_digest and base.model_digest and b.model_digest != base.model_digest:
                print(f"warning: {self.names[i]} was built from another model ({model_source(b)}, weights sha256 "
                      f"{b.model_digest[:12]}) than the baseline {self.names[self.baseline]} ({model_source(base)}, "
                      f"{base.model_digest[:12]}): its ΔEM/ΔF1 compare two models", file=sys.stderr)

    def _baseline(self, builds: Sequence[Build]) -> int:
        engines = [i for i, b in enumerate(builds) if b.kind == "engine"]
        if self.choice in ("fp16", "model") and self.has_model:
            return 0
        if self.choice == "fp16":
            fp16 = [i for i in engines if builds[i].engine.policy.fp16 and not builds[i].engine.policy.quantized]
            if not fp16:
                raise WorkbenchError("no FP16 baseline: give --model DIR (evaluated in FP16 as the baseline), an "
                                     "engine built with --fp16 and without --int8 or --fp8, or --baseline ENGINE")
            if len(fp16) > 1:
                raise WorkbenchError(f"several FP16 engines without INT8 or FP8 "
                                     f"({', '.join(self.names[i] for i in fp16)}): "
                                     "pick the baseline with --baseline ENGINE")
            return fp16[0]
        wanted = Path(self.choice)
        match = [i for i in engines if Path(builds[i].path).resolve() == wanted.resolve()
                 or self.names[i] == self.choice]
        if not match:
            raise WorkbenchError(f"--baseline {self.choice}: not one of the engine files given (or fp16, model)")
        return match[0]

    def measure(self, i: int, build: Build, questions: Questions) -> Measured:
        """Evaluate and time build `i`, keep its row (its predictions go to --report-dir/predictions/NAME.json)."""
        from dataclasses import replace

        from eval.measure import measure

        m = measure(replace(build, name=self.names[i]), questions, self.profiles[i], iterations=self.iterations,
                    warmup=self.warmup, is_baseline=i == self.baseline, report_dir=self.report_dir or None)
        print(f"{self.names[i]}: {latency_line(m.result.latency)} (median of {self.iterations} after {self.warmup} "
              "warm-up)", file=sys.stderr)
        self.rows.append(m.result)
        return m

    def finish(self, provenance: dict | None = None) -> None:
        from eval.report import build_report, render_text, write_report_dir

        report = build_report(self.rows, self.max_f1_drop, self.profile, {**(provenance or {}), "timing": self.timing})
        print()
        print(render_text(report), end="")
        if self.report_dir:
            files = write_report_dir(report, self.report_dir)
            print(f"wrote {', '.join(str(p) for p in files.values())} and the predictions in "
                  f"{Path(self.report_dir) / 'predictions'}", file=sys.stderr)


def evaluate_from_flags(flags) -> None:
    """`cli.py eval`: its parsed flags (argparse.Namespace) run; the comparison (a plan) with several builds or any
    comparison flag, made first so that its flags are checked before anything slow runs."""
    from data.squad import load_squad
    from eval.measure import Questions, settings_from_flags
    from eval.runnables import load_builds

    if flags.limit is not None and flags.limit < 1:
        raise WorkbenchError(f"--limit must be at least 1, got {flags.limit}")
    check_outputs(flags.output, flags.metrics_json, flags.report_dir)
    plan = None
    if wants_comparison((1 if flags.model else 0) + len(flags.engines), flags.report_dir, flags.baseline,
                        flags.max_f1_drop, flags.profile):
        plan = ComparisonPlan(max_f1_drop=flags.max_f1_drop, profile=flags.profile, report_dir=flags.report_dir,
                              baseline=flags.baseline, model=flags.model, precision=flags.precision)
    squad = load_squad(flags.squad, limit=flags.limit)
    fs, answer_settings = settings_from_flags(flags, version_2=squad.version.startswith("2"))
    builds = load_builds(model=flags.model, engines=flags.engines, device=flags.device,
                         precision=plan.model_precision if plan else flags.precision, trust_pickle=flags.trust_pickle,
                         batch_size=flags.batch_size, max_seq_length=fs.max_seq_length, fuse=flags.fuse,
                         vocab_file=flags.vocab_file, backend=flags.backend)
    questions = Questions(squad.examples, squad.version, fs, answer_settings, cache=not flags.no_cache,
                          progress=not flags.no_progress)
    evaluate_builds(builds, questions, plan, squad_path=flags.squad, output=flags.output,
                    metrics_json=flags.metrics_json, iterations=flags.bench_iterations, warmup=flags.bench_warmup,
                    data=f"{flags.squad} (sha256 {squad.digest[:12]}), {len(squad.examples):,} questions")


def check_outputs(output: str | None, metrics_json: str | None, report_dir: str | None) -> None:
    """Every file `eval` will write can be written, checked before anything slow runs (one line, exit 2)."""
    from common.files import check_writable_dir, check_writable_file

    if report_dir:
        check_writable_dir(report_dir, "--report-dir folder")
    for path, what in ((output or (None if report_dir else "predictions.json"), "-o predictions file"),
                       (metrics_json, "--metrics-json file")):
        if path:
            check_writable_file(path, what)


def model_source(build: Build) -> str:
    """Which model a build runs: an engine's header names the folder it was built from."""
    return (build.engine.header.source if build.kind == "engine" and build.engine is not None else build.path) or "?"


def no_answer_hint(score, predictions) -> str | None:
    """SQuAD v2.0 scored by a model that never predicts "no answer" (a v1.1 model): why NoAns is 0, in one line."""
    if not score.no_ans_n or any(p.text == "" for p in predictions.values()):
        return None
    return (f"warning: the model answered all {score.no_ans_n:,} unanswerable questions of this SQuAD v2.0 file "
            "(NoAns 0.00): it never predicts \"no answer\", as a model fine-tuned on SQuAD v1.1 does not; "
            "compare HasAns, or lower --null-score-diff-threshold for a v2.0 model")


def evaluate_builds(builds: Sequence[Build], questions: Questions, plan: ComparisonPlan | None, *, squad_path: str,
                    output: str | None = None, metrics_json: str | None = None, iterations: int | None = None,
                    warmup: int | None = None, data: str | None = None) -> None:
    """`cli.py eval`: each build's EM/F1 (one line each on stdout), its predictions (-o: FILE, or FILE.BUILD.json
    per build when several; default predictions.json unless --report-dir), the metrics JSON, and with a plan the
    comparison table."""
    from common.files import atomic_write_json
    from data.answers import write_predictions
    from eval.measure import measure

    if plan is not None:
        plan.resolve(builds, questions.feature_settings.max_seq_length, iterations, warmup)
    results = {}
    for i, b in enumerate(builds):
        print(f"evaluating {b.label} on {len(questions.examples)} questions of {squad_path} "
              f"(SQuAD v{questions.version})", file=sys.stderr)
        m = plan.measure(i, b, questions) if plan is not None else measure(b, questions)
        for line in m.timings.lines():
            print(line, file=sys.stderr)
        if output is not None or plan is None or not plan.report_dir:  # -o: one predictions file per build
            out = Path(output or "predictions.json")
            if len(builds) > 1:  # one predictions file per model/engine, named after it
                out = out.with_name(f"{out.stem}.{b.label.split(' ')[0].removesuffix('.engine')}{out.suffix}")
            nbest = out.with_name(out.stem + ".nbest" + out.suffix)
            write_predictions(m.predictions, out, nbest)
            print(f"wrote {out} and {nbest}", file=sys.stderr)
        line = f"EM {m.score.exact_match:.2f}  F1 {m.score.f1:.2f}  ({m.score.n} questions)" + v2_breakdown(m.score)
        print(line if len(builds) == 1 else f"{b.label}: {line}")
        if hint := no_answer_hint(m.score, m.predictions):
            print(hint, file=sys.stderr)
        results[b.label] = m.score.to_json()
    if metrics_json:
        atomic_write_json(metrics_json, next(iter(results.values())) if len(results) == 1 else results)
    if plan is not None:
        from eval.measure import provenance

        models = dict.fromkeys(f"{model_source(b)} (sha256 {b.model_digest[:12]})" for b in builds if b.model_digest)
        plan.finish(provenance(builds[0].device, model=", ".join(models) or None, data=data or squad_path))


def v2_breakdown(score) -> str:
    """SQuAD v2.0's HasAns/NoAns scores, "" under v1.1."""
    parts = []
    if score.has_ans_n:
        parts.append(f"HasAns EM {score.has_ans_exact:.2f} F1 {score.has_ans_f1:.2f} ({score.has_ans_n})")
    if score.no_ans_n:
        parts.append(f"NoAns EM {score.no_ans_exact:.2f} F1 {score.no_ans_f1:.2f} ({score.no_ans_n})")
    return "  |  " + "  |  ".join(parts) if parts else ""


__all__ = ["BASELINE_HELP", "BENCH_DEFAULTS", "COMPARING_HELP", "ComparisonPlan", "EXAMPLES", "bench_defaults",
           "calibration_of_engine", "check_name", "check_outputs", "describe_calibration", "evaluate_builds",
           "evaluate_from_flags", "latency_line", "model_source", "no_answer_hint", "time_profiles", "timing_policy",
           "unique_names", "v2_breakdown", "wants_comparison"]
