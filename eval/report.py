"""The comparison report of `cli.py eval`: which build to ship, given an F1 budget against the FP16 baseline.

Users evaluate several builds (an FP16 baseline, INT8 engines with `-iln`/`-imh`, each from some calibration
method) on the same SQuAD questions and time them at some profiles. This module turns those measurements
(`BuildResult` rows) into ΔEM/ΔF1 against the baseline, speed-ups at each profile, the Pareto front of F1 against
latency and one choice, and writes them as a terminal table, Markdown, CSV, JSON and a plot.

The selection rule (`choose`):
  * a row qualifies when `row.f1 >= baseline.f1 - max_f1_drop` (F1 in points, compared with a 1e-9 tolerance so
    a drop of exactly X qualifies despite floating-point rounding); the baseline always qualifies (drop 0), so
    with a baseline present there is always a choice;
  * among qualifying rows, the lowest median latency at the selection profile wins; rows whose medians are within
    timing noise of the fastest one tie with it (the larger of 2% and each timing's own spread, the disagreement
    of its last two rounds: eval.benchmark.time_until_stable; a figure marked not stable ties with any), and ties
    go to the higher F1, then to the faster median, then to the alphabetically first name; so on a noisy machine
    the choice is decided by accuracy, not by noise;
  * the selection profile is the one given, else the largest batch×seq_len (product) profile that every row has;
    equal products go to the larger batch.

Nothing here imports torch or matplotlib at import time: the plot (`eval.plots`) is imported only when written.
"""
from __future__ import annotations

import csv
import io
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from common.errors import WorkbenchError
from common.files import atomic_write_json, atomic_write_text, read_json
from common.version import __version__

FORMAT = "bert-int8-workbench eval report"
FORMAT_VERSION = 1
DEFAULT_MAX_F1_DROP = 1.0
F1_TOLERANCE = 1e-9  # F1 points; absorbs float rounding so that a drop of exactly max_f1_drop qualifies
TIE_TOLERANCE = 0.02  # medians closer than this fraction (or than a timing's own spread) are a tie

Profile = tuple[int, int]  # (batch, seq_len)


def profile_label(profile: Profile, sep: str = "×") -> str:
    return f"{profile[0]}{sep}{profile[1]}"


def parse_profile(text: str) -> Profile:
    """'64x384' (or '64×384') -> (64, 384); for a `--profile` flag."""
    m = re.fullmatch(r"\s*(\d+)\s*[x×X]\s*(\d+)\s*", text)
    if not m or int(m[1]) < 1 or int(m[2]) < 1:
        raise WorkbenchError(f"profile {text!r}: expected BATCHxSEQ_LEN with positive integers, e.g. 64x384")
    return int(m[1]), int(m[2])


# ----------------------------------------------------------------------------------------------- data classes

def _get(obj: Any, key: str, types: type | tuple[type, ...], where: str, optional: bool = False) -> Any:
    """One field of a JSON object, type-checked, so a damaged report fails with one line naming the field."""
    if not isinstance(obj, dict):
        raise WorkbenchError(f"{where}: expected a JSON object, found {type(obj).__name__}")
    if key not in obj:
        raise WorkbenchError(f"{where}: missing field {key!r}")
    value = obj[key]
    if value is None and optional:
        return None
    wrong_bool = isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,))
    if wrong_bool or not isinstance(value, types):  # JSON true/false are not numbers here
        raise WorkbenchError(f"{where}: field {key!r} has the wrong type ({value!r})")
    return value


def _finite(value: float, what: str) -> float:
    if not math.isfinite(value):
        raise WorkbenchError(f"{what} must be a finite number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class ProfileLatency:
    """Latency of one build at one engine profile (the shape it was timed at)."""

    batch: int
    seq_len: int
    median_ms: float
    p99_ms: float
    sequences_per_s: float
    runs: int | None = None        # timed calls behind the figure (all rounds; warm-up not counted)
    spread: float | None = None    # how far the last two rounds' medians were apart (a fraction): the noise
    stable: bool | None = None     # they agreed within the timing's tolerance

    def __post_init__(self):
        if self.batch < 1 or self.seq_len < 1:
            raise WorkbenchError(f"profile {self.batch}x{self.seq_len}: batch and seq_len must be positive")
        if _finite(self.median_ms, "median_ms") <= 0:  # speed-ups divide by it
            raise WorkbenchError(f"profile {self.batch}x{self.seq_len}: median_ms must be > 0")
        _finite(self.p99_ms, "p99_ms")
        _finite(self.sequences_per_s, "sequences_per_s")

    @property
    def profile(self) -> Profile:
        return self.batch, self.seq_len

    @property
    def noise(self) -> float:
        """The fraction within which another median is a tie with this one."""
        return max(TIE_TOLERANCE, self.spread or 0.0)

    @classmethod
    def from_latency(cls, latency: Any, **timing) -> "ProfileLatency":
        """From `eval.benchmark.Latency` (duck-typed so this module does not import torch); `timing`: runs,
        spread, stable."""
        return cls(latency.batch, latency.seq_len, latency.median_ms, latency.p99_ms, latency.sequences_per_s,
                   **timing)

    def to_json(self) -> dict:
        return {"batch": self.batch, "seq_len": self.seq_len, "median_ms": self.median_ms, "p99_ms": self.p99_ms,
                "sequences_per_s": self.sequences_per_s, "runs": self.runs, "spread": self.spread,
                "stable": self.stable}

    @classmethod
    def from_json(cls, obj: Any, where: str = "latency") -> "ProfileLatency":
        num = (int, float)
        opt = {k: _get(obj, k, t, where, optional=True) if k in obj else None
               for k, t in (("runs", int), ("spread", num), ("stable", bool))}
        return cls(_get(obj, "batch", int, where), _get(obj, "seq_len", int, where),
                   float(_get(obj, "median_ms", num, where)), float(_get(obj, "p99_ms", num, where)),
                   float(_get(obj, "sequences_per_s", num, where)), **opt)


@dataclass(frozen=True)
class BuildResult:
    """One evaluated build: its accuracy on the shared questions, its latency per profile, what it cost to build.

    `options` is the build's flags as written ("int8 fp16 -iln"); `calibration` says where its INT8 scales came
    from ("entropy (100 q)") or "-". EM and F1 are in points (0-100), as the official SQuAD script reports them.
    """

    name: str
    options: str
    calibration: str
    is_baseline: bool
    exact_match: float
    f1: float
    n_questions: int
    latency: tuple[ProfileLatency, ...] = ()
    engine_bytes: int | None = None
    build_s: float | None = None
    predictions_file: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "latency", tuple(self.latency))  # accept a list, keep the row hashable
        if not self.name:
            raise WorkbenchError("a build needs a non-empty name")
        _finite(self.exact_match, f"{self.name}: exact_match")
        _finite(self.f1, f"{self.name}: f1")
        shapes = [lat.profile for lat in self.latency]
        dup = sorted({s for s in shapes if shapes.count(s) > 1})
        if dup:
            raise WorkbenchError(f"{self.name}: profile {profile_label(dup[0])} timed twice")

    @property
    def profiles(self) -> tuple[Profile, ...]:
        return tuple(lat.profile for lat in self.latency)

    def latency_at(self, profile: Profile) -> ProfileLatency | None:
        return next((lat for lat in self.latency if lat.profile == tuple(profile)), None)

    def to_json(self) -> dict:
        return {"name": self.name, "options": self.options, "calibration": self.calibration,
                "is_baseline": self.is_baseline, "exact_match": self.exact_match, "f1": self.f1,
                "n_questions": self.n_questions, "latency": [lat.to_json() for lat in self.latency],
                "engine_bytes": self.engine_bytes, "build_s": self.build_s,
                "predictions_file": self.predictions_file}

    @classmethod
    def from_json(cls, obj: Any, where: str = "build") -> "BuildResult":
        num = (int, float)
        name = _get(obj, "name", str, where)
        where = f"{where} {name!r}"
        latency = _get(obj, "latency", list, where)
        build_s = _get(obj, "build_s", num, where, optional=True)
        return cls(
            name=name,
            options=_get(obj, "options", str, where),
            calibration=_get(obj, "calibration", str, where),
            is_baseline=_get(obj, "is_baseline", bool, where),
            exact_match=float(_get(obj, "exact_match", num, where)),
            f1=float(_get(obj, "f1", num, where)),
            n_questions=_get(obj, "n_questions", int, where),
            latency=tuple(ProfileLatency.from_json(lat, f"{where} latency[{i}]") for i, lat in enumerate(latency)),
            engine_bytes=_get(obj, "engine_bytes", int, where, optional=True),
            build_s=None if build_s is None else float(build_s),
            predictions_file=_get(obj, "predictions_file", str, where, optional=True),
        )


# ------------------------------------------------------------------------------------------------ arithmetic

def baseline_of(rows: Sequence[BuildResult]) -> BuildResult:
    """The one baseline row; also refuses colliding names and rows scored on different question counts."""
    names = [r.name for r in rows]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise WorkbenchError(f"build name {dup[0]!r} is used by more than one row; give each build its own name")
    base = [r for r in rows if r.is_baseline]
    if not base:
        raise WorkbenchError("no baseline row: mark the FP16 build as the baseline to compare the others against")
    if len(base) > 1:
        raise WorkbenchError(f"more than one baseline row ({', '.join(r.name for r in base)}); mark exactly one")
    counts = sorted({r.n_questions for r in rows})
    if len(counts) > 1:
        raise WorkbenchError(f"builds were scored on different question counts ({', '.join(map(str, counts))}); "
                             "compare builds only on the same questions")
    return base[0]


def common_profiles(rows: Sequence[BuildResult]) -> tuple[Profile, ...]:
    """Profiles every row was timed at, sorted by (batch, seq_len)."""
    if not rows:
        return ()
    shared = set(rows[0].profiles).intersection(*(r.profiles for r in rows[1:]))
    return tuple(sorted(shared))


def all_profiles(rows: Sequence[BuildResult]) -> tuple[Profile, ...]:
    """Profiles any row was timed at, sorted by (batch, seq_len): the table's latency columns."""
    return tuple(sorted({p for r in rows for p in r.profiles}))


def default_profile(rows: Sequence[BuildResult]) -> Profile:
    """The largest batch×seq_len profile every row has (equal products: the larger batch)."""
    shared = common_profiles(rows)
    if not shared:
        timed = "; ".join(f"{r.name}: {', '.join(map(profile_label, r.profiles)) or 'none'}" for r in rows)
        raise WorkbenchError(f"the builds share no timed profile ({timed}); time every build at one shape at least")
    return max(shared, key=lambda p: (p[0] * p[1], p[0], p[1]))


def _selection_profile(rows: Sequence[BuildResult], profile: Profile | None) -> Profile:
    if profile is None:
        return default_profile(rows)
    profile = (int(profile[0]), int(profile[1]))
    missing = [r.name for r in rows if r.latency_at(profile) is None]
    if missing:
        shared = ", ".join(map(profile_label, common_profiles(rows))) or "none"
        raise WorkbenchError(f"profile {profile_label(profile)} was not timed for {', '.join(missing)}; "
                             f"profiles every build has: {shared}")
    return profile


def delta_em(row: BuildResult, baseline: BuildResult) -> float:
    return row.exact_match - baseline.exact_match


def delta_f1(row: BuildResult, baseline: BuildResult) -> float:
    return row.f1 - baseline.f1


def within_budget(row: BuildResult, baseline: BuildResult, max_f1_drop: float) -> bool:
    """ΔF1 >= -max_f1_drop, the boundary included."""
    return delta_f1(row, baseline) >= -max_f1_drop - F1_TOLERANCE


def speedup(row: BuildResult, baseline: BuildResult, profile: Profile) -> float | None:
    """Baseline median / row median at `profile` (> 1: faster than the baseline); None if either lacks it."""
    mine, theirs = row.latency_at(profile), baseline.latency_at(profile)
    if mine is None or theirs is None:
        return None
    return theirs.median_ms / mine.median_ms


def _check_budget(max_f1_drop: float) -> float:
    if not (math.isfinite(max_f1_drop) and max_f1_drop >= 0):
        raise WorkbenchError(f"--max-f1-drop {max_f1_drop!r}: must be a finite number of F1 points >= 0")
    return float(max_f1_drop)


def within_noise(a: BuildResult, b: BuildResult, profile: Profile) -> bool:
    """Whether the medians of `a` and `b` at `profile` are a tie: closer than the larger of TIE_TOLERANCE and
    either timing's own spread, as a fraction of the faster one; or either figure is not stable."""
    la, lb = a.latency_at(profile), b.latency_at(profile)
    if la.stable is False or lb.stable is False:  # a figure that is not stable tells nothing: it ties with any
        return True
    return abs(la.median_ms - lb.median_ms) <= max(la.noise, lb.noise) * min(la.median_ms, lb.median_ms)


def tied_with_fastest(rows: Sequence[BuildResult], base: BuildResult, max_f1_drop: float,
                      profile: Profile) -> list[BuildResult]:
    """The qualifying rows within timing noise of the fastest qualifying row (it included)."""
    qualifying = [r for r in rows if within_budget(r, base, max_f1_drop)]
    fastest = min(qualifying, key=lambda r: (r.latency_at(profile).median_ms, -r.f1, r.name))
    return [r for r in qualifying if within_noise(r, fastest, profile)]


def choose(rows: Sequence[BuildResult], max_f1_drop: float = DEFAULT_MAX_F1_DROP,
           profile: Profile | None = None) -> BuildResult | None:
    """The fastest row at `profile` whose F1 is within `max_f1_drop` points of the baseline; rows within timing
    noise of the fastest are a tie, won by the higher F1 (see module doc).

    Never None when a baseline is present (it qualifies itself); None only for no rows at all.
    """
    if not rows:
        return None
    max_f1_drop = _check_budget(max_f1_drop)
    base = baseline_of(rows)
    profile = _selection_profile(rows, profile)
    tied = tied_with_fastest(rows, base, max_f1_drop, profile)
    return min(tied, key=lambda r: (-r.f1, r.latency_at(profile).median_ms, r.name))


def pareto_front(rows: Sequence[BuildResult], profile: Profile) -> list[BuildResult]:
    """Rows no other row beats on both median latency at `profile` (lower) and F1 (higher), fastest first.

    A row is dominated when another is at least as fast and at least as accurate and strictly better in one;
    rows not timed at `profile` take no part. Identical points are both kept.
    """
    timed = [(r.latency_at(profile).median_ms, r.f1, r) for r in rows if r.latency_at(profile) is not None]
    front = [(ms, f1, r) for ms, f1, r in timed
             if not any(o_ms <= ms and o_f1 >= f1 and (o_ms < ms or o_f1 > f1) for o_ms, o_f1, _ in timed)]
    return [r for _, _, r in sorted(front, key=lambda t: (t[0], -t[1], t[2].name))]


# ---------------------------------------------------------------------------------------------------- Report

@dataclass(frozen=True)
class ProfileSpeedup:
    batch: int
    seq_len: int
    speedup: float


@dataclass(frozen=True)
class Comparison:
    """One row against the baseline."""

    name: str
    delta_em: float
    delta_f1: float
    within_budget: bool
    speedups: tuple[ProfileSpeedup, ...]  # at the profiles both this row and the baseline were timed at

    def speedup_at(self, profile: Profile) -> float | None:
        return next((s.speedup for s in self.speedups if (s.batch, s.seq_len) == tuple(profile)), None)


@dataclass(frozen=True)
class Report:
    """Rows, the rule they were judged by, and the outcome. Make it with `build_report`."""

    rows: tuple[BuildResult, ...]
    max_f1_drop: float
    profile: Profile                   # the selection profile
    profile_requested: Profile | None  # None: `profile` is the default (largest common), recomputed on reload
    chosen: BuildResult
    comparisons: tuple[Comparison, ...]  # in row order
    provenance: dict = field(default_factory=dict)  # device, model, data, date, commit, timing (as given)

    @property
    def baseline(self) -> BuildResult:
        return next(r for r in self.rows if r.is_baseline)

    @property
    def profiles(self) -> tuple[Profile, ...]:
        return all_profiles(self.rows)

    @property
    def front(self) -> list[BuildResult]:
        return pareto_front(self.rows, self.profile)

    def comparison(self, name: str) -> Comparison:
        return next(c for c in self.comparisons if c.name == name)

    @property
    def rule(self) -> str:
        how = "given" if self.profile_requested else "largest batch×seq_len every build has"
        return (f"fastest median latency at {profile_label(self.profile)} ({how}) among builds with "
                f"ΔF1 ≥ -{self.max_f1_drop:g} vs {self.baseline.name}; builds within timing noise of the fastest "
                f"(the larger of {TIE_TOLERANCE:.0%} and each timing's spread; any not stable) tie with it: higher "
                "F1, then name")

    @property
    def tied(self) -> list[BuildResult]:
        """The builds within timing noise of the fastest qualifying one, which the chosen build won on F1."""
        return tied_with_fastest(self.rows, self.baseline, self.max_f1_drop, self.profile)

    def verdict(self) -> str:
        """The footer: what was chosen and why; says so when no INT8 (non-baseline) build is within budget."""
        c, base, x, at = self.chosen, self.baseline, self.max_f1_drop, profile_label(self.profile)
        head = f"chosen: {c.name} — fastest within ΔF1 ≥ -{x:g} at {at}"
        faster = [r.name for r in self.tied if r.name != c.name
                  and r.latency_at(self.profile).median_ms < c.latency_at(self.profile).median_ms]
        tie = (f"; {', '.join(faster)} faster by less than the timing noise (or not stable): a tie, won on F1"
               if faster else "")
        if not tie and any(r.latency_at(self.profile).stable is False for r in self.tied):
            tie = "; timings not stable: a tie with every build, decided by F1, then latency"
        if not c.is_baseline:
            return f"{head} ({self.comparison(c.name).speedup_at(self.profile):.2f}x the baseline {base.name}{tie})"
        if faster:
            return f"{head} (the baseline{tie})"
        others = [r for r in self.rows if not r.is_baseline]
        if not others:
            return f"{head} (the baseline; no other build to compare)"
        inside = [r for r in others if self.comparison(r.name).within_budget]
        if inside:
            return f"{head} (the baseline; {len(inside)} other build(s) within budget, none faster)"
        best = max(others, key=lambda r: (r.f1, r.name))
        return (f"{head} (the baseline: no INT8 or FP8 build is within the budget; "
                f"closest {best.name} at ΔF1 {delta_f1(best, base):+.2f})")


def build_report(rows: Iterable[BuildResult], max_f1_drop: float = DEFAULT_MAX_F1_DROP,
                 profile: Profile | None = None, provenance: dict | None = None) -> Report:
    """Validate the rows (one baseline, unique names, same question count, a common profile) and compare them."""
    rows = tuple(rows)
    max_f1_drop = _check_budget(max_f1_drop)
    base = baseline_of(rows)
    requested = None if profile is None else (int(profile[0]), int(profile[1]))
    chosen_profile = _selection_profile(rows, requested)
    comparisons = tuple(
        Comparison(r.name, delta_em(r, base), delta_f1(r, base), within_budget(r, base, max_f1_drop),
                   tuple(ProfileSpeedup(p[0], p[1], speedup(r, base, p)) for p in r.profiles
                         if base.latency_at(p) is not None))
        for r in rows)
    return Report(rows, max_f1_drop, chosen_profile, requested, choose(rows, max_f1_drop, chosen_profile),
                  comparisons, dict(provenance or {}))


def timing_summary(rows: Sequence[BuildResult]) -> str:
    """How many timed runs stand behind the figures, and which were not stable."""
    runs = sorted({lat.runs for r in rows for lat in r.latency if lat.runs is not None})
    unstable = [f"{r.name} {profile_label(lat.profile)} (±{lat.spread:.0%})" for r in rows for lat in r.latency
                if lat.stable is False and lat.spread is not None]
    if not runs:
        return "runs per build and profile not recorded"
    text = f"{runs[0] if len(runs) == 1 else f'{runs[0]}-{runs[-1]}'} timed runs per build and profile"
    return text + (f"; not stable: {', '.join(unstable)}" if unstable else "; every figure stable")


# ------------------------------------------------------------------------------------------------- rendering

def _signed(v: float) -> str:
    s = f"{v:+.2f}"
    return "0.00" if s in ("+0.00", "-0.00") else s


def _opt(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _table(report: Report) -> tuple[list[str], list[list[str]], list[bool]]:
    """Headers, cells and which columns are numeric (right-aligned), shared by the text and Markdown tables."""
    profiles = report.profiles
    headers = ["", "build", "options", "calibration", "EM", "F1", "ΔEM", "ΔF1"]
    numeric = [False, False, False, False, True, True, True, True]
    for p in profiles:
        headers += [f"{profile_label(p)} median/p99 ms", f"{profile_label(p)} seq/s", f"{profile_label(p)} speed-up"]
        numeric += [True, True, True]
    headers += ["engine MiB", "build s"]
    numeric += [True, True]
    cells = []
    for r, c in zip(report.rows, report.comparisons):
        line = ["*" if r.name == report.chosen.name else "", r.name, r.options, r.calibration,
                f"{r.exact_match:.2f}", f"{r.f1:.2f}", _signed(c.delta_em), _signed(c.delta_f1)]
        for p in profiles:
            lat = r.latency_at(p)
            line += ["-", "-", "-"] if lat is None else [
                f"{lat.median_ms:.3f}/{lat.p99_ms:.3f}", f"{lat.sequences_per_s:,.0f}",
                _opt(c.speedup_at(p), ".2f") + ("x" if c.speedup_at(p) is not None else "")]
        line += [_opt(None if r.engine_bytes is None else r.engine_bytes / 2**20, ".1f"),
                 _opt(r.build_s, ".1f" if r.build_s is None or r.build_s >= 1 else ".2f")]
        cells.append(line)
    return headers, cells, numeric


def render_text(report: Report) -> str:
    """Aligned columns for the terminal, the chosen row marked `*`, then the rule and the verdict."""
    headers, cells, numeric = _table(report)
    widths = [max(len(row[i]) for row in [headers, *cells]) for i in range(len(headers))]

    def fmt(row: list[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(row, widths, numeric)).rstrip()

    n = report.baseline.n_questions
    lines = [fmt(headers), *(fmt(row) for row in cells), "",
             f"{n:,} questions; ΔEM/ΔF1 and speed-up vs {report.baseline.name}; engine MiB = 2^20 bytes",
             f"timing: {timing_summary(report.rows)}"
             + (f"; {report.provenance['device']}" if report.provenance.get("device") else ""),
             f"rule: {report.rule}", report.verdict()]
    return "\n".join(lines) + "\n"


def render_markdown(report: Report, image: str | None = None) -> str:
    """A GitHub table (chosen row marked `*`), the rule, the verdict and optionally the Pareto plot's image."""
    headers, cells, numeric = _table(report)

    def md(row: list[str]) -> str:
        return "| " + " | ".join(v.replace("|", "\\|") for v in row) + " |"

    n = report.baseline.n_questions
    lines = [f"# Builds compared on {n:,} questions", "", md(headers),
             "| " + " | ".join("---:" if num else "---" for num in numeric) + " |", *(md(row) for row in cells), "",
             f"ΔEM/ΔF1 and speed-up vs the baseline `{report.baseline.name}`; engine MiB = 2^20 bytes.", "",
             f"Rule: {report.rule}.", "", f"**{report.verdict()}**", ""]
    if image:
        lines += [f"![F1 against latency at {profile_label(report.profile)}]({image})", ""]
    lines += ["## Measured", "", *(f"- {k}: {v}" for k, v in report.provenance.items()),
              f"- timed runs: {timing_summary(report.rows)}", ""]
    return "\n".join(lines)


def _csv_text(report: Report) -> str:
    """One line per build; latency columns per profile named like `64x384_median_ms` (ASCII for spreadsheets)."""
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    profiles = report.profiles
    header = ["name", "options", "calibration", "is_baseline", "chosen", "within_budget", "exact_match", "f1",
              "delta_em", "delta_f1", "n_questions"]
    for p in profiles:
        tag = profile_label(p, "x")
        header += [f"{tag}_median_ms", f"{tag}_p99_ms", f"{tag}_sequences_per_s", f"{tag}_speedup"]
    header += ["engine_bytes", "build_s", "predictions_file"]
    w.writerow(header)
    for r, c in zip(report.rows, report.comparisons):
        line = [r.name, r.options, r.calibration, r.is_baseline, r.name == report.chosen.name, c.within_budget,
                r.exact_match, r.f1, c.delta_em, c.delta_f1, r.n_questions]
        for p in profiles:
            lat = r.latency_at(p)
            line += ["", "", "", ""] if lat is None else [lat.median_ms, lat.p99_ms, lat.sequences_per_s,
                                                          c.speedup_at(p) if c.speedup_at(p) is not None else ""]
        line += ["" if r.engine_bytes is None else r.engine_bytes, "" if r.build_s is None else r.build_s,
                 r.predictions_file or ""]
        w.writerow(line)
    return out.getvalue()


def write_csv(report: Report, path: str | os.PathLike) -> None:
    atomic_write_text(path, _csv_text(report))


def report_to_json(report: Report) -> dict:
    """All rows, the rule and the choice; derived comparisons are included for readers but recomputed on load."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "tool_version": __version__,
        "rule": {"max_f1_drop": report.max_f1_drop, "profile": list(report.profile),
                 "profile_requested": None if report.profile_requested is None else list(report.profile_requested),
                 "text": report.rule},
        "chosen": report.chosen.name,
        "verdict": report.verdict(),
        "provenance": report.provenance,
        "rows": [r.to_json() for r in report.rows],
        "comparisons": [{"name": c.name, "delta_em": c.delta_em, "delta_f1": c.delta_f1,
                         "within_budget": c.within_budget,
                         "speedups": [{"batch": s.batch, "seq_len": s.seq_len, "speedup": s.speedup}
                                      for s in c.speedups]} for c in report.comparisons],
    }


def write_json(report: Report, path: str | os.PathLike) -> None:
    atomic_write_json(path, report_to_json(report))


def report_from_json(obj: Any) -> Report:
    """Rebuild a Report from `report_to_json` output: rows and rule are read, everything else recomputed.

    The stored choice is not trusted: a resumed sweep may have added rows, and the rule decides again.
    """
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise WorkbenchError(f"not an eval report (no \"format\": \"{FORMAT}\")")
    if obj.get("format_version") != FORMAT_VERSION:
        raise WorkbenchError(f"eval report format version {obj.get('format_version')!r} is not supported "
                             f"(expected {FORMAT_VERSION})")
    rule = _get(obj, "rule", dict, "report")
    max_f1_drop = float(_get(rule, "max_f1_drop", (int, float), "rule"))
    requested = _get(rule, "profile_requested", list, "rule", optional=True)
    if requested is not None and (len(requested) != 2 or not all(type(v) is int for v in requested)):
        raise WorkbenchError(f"rule: profile_requested must be [batch, seq_len], got {requested!r}")
    rows = [BuildResult.from_json(r, f"rows[{i}]") for i, r in enumerate(_get(obj, "rows", list, "report"))]
    provenance = obj.get("provenance") if isinstance(obj.get("provenance"), dict) else None
    return build_report(rows, max_f1_drop, None if requested is None else (requested[0], requested[1]), provenance)


def load_report_json(path: str | os.PathLike) -> Report:
    """Read a report.json (e.g. to resume a sweep: add rows to `.rows` and `build_report` again)."""
    obj = read_json(path, "eval report")  # its errors already name the file
    try:
        return report_from_json(obj)
    except WorkbenchError as e:
        raise WorkbenchError(f"{path}: {e}") from None


REPORT_FILES = ("report.md", "report.csv", "report.json", "pareto.png")


def write_report_dir(report: Report, directory: str | os.PathLike) -> dict[str, Path]:
    """Write report.md, report.csv, report.json and pareto.png into `directory`, each atomically.

    Returns {file name: path}. Each file is written to a temporary name beside it and renamed when complete, so
    an interrupted run leaves either the previous file or the new one, never a partial one.
    """
    from eval.plots import pareto_plot  # matplotlib only when a plot is actually written

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {name: directory / name for name in REPORT_FILES}
    pareto_plot(report.rows, report.profile, report.chosen, paths["pareto.png"], max_f1_drop=report.max_f1_drop)
    write_csv(report, paths["report.csv"])
    write_json(report, paths["report.json"])
    atomic_write_text(paths["report.md"], render_markdown(report, image="pareto.png"))
    return paths


__all__ = [
    "BuildResult", "Comparison", "DEFAULT_MAX_F1_DROP", "ProfileLatency", "ProfileSpeedup", "Report",
    "REPORT_FILES", "all_profiles", "baseline_of", "build_report", "choose", "common_profiles",
    "default_profile", "delta_em", "delta_f1", "load_report_json", "pareto_front", "parse_profile",
    "profile_label", "render_markdown", "render_text", "report_from_json", "report_to_json", "speedup",
    "TIE_TOLERANCE", "tied_with_fastest", "timing_summary", "within_budget", "within_noise", "write_csv",
    "write_json", "write_report_dir",
]
