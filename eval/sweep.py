"""The sweep (`cli.py sweep`): build the standard grid of builds, evaluate and time each, and pick the one to ship.

The grid is data: one frozen `GridRow` per build (name, precision flags, and for INT8 a calibration method or a
QAT folder). The default grid is

    fp16 (the baseline; fp32 on the CPU, where FP16 arithmetic is emulated and slower than FP32)
    INT8 x {entropy, entropy --smooth, percentile 99.9, percentile 99.99, mse, max} x {plain, -iln, -imh, -iln -imh}
    FP8 (--fp8) x {max, mse on FP8's grid} x {plain, -iln}: skipped on a CUDA GPU below compute capability 8.9
        (FP8_METHODS; -iln carries the residual stream as E4M3 codes)
    x --sparse when the model's GEMM weights are 2:4 sparse (the INT8 rows)

and `--grid FILE` takes a JSON list of rows instead (see `load_grid`). Sparse rows are built `--sparse` when the
model's GEMM weights are 2:4 (`cli.py prune`): each build times the 2:4 family (cuSPARSELt) against the dense
kernels per GEMM and profile and keeps the faster; on a dense model they are skipped with a message (nothing for
sparse kernels to skip; no row is faked).

QAT rows (`--qat DIR`, or "qat": "DIR" in a grid file): `qat` is a scale source beside the calibration methods. A
`cli.py qat` folder holds trained weights and learned scales (quant_spec.json), so its row builds from that folder,
not from the sweep's model: no calibration runs, the engine takes the folder's weights and scales (as `cli.py build
--model QATDIR --int8` does), and the row key and the engine-reuse check hold the folder's weights digest and
`QatScales.key()`. `--qat` rows get the flags the folder was trained for (`qat_rows`). The folder must be of the
sweep model's architecture and tokenizer (checked before anything slow runs), so the featurized questions serve it
too and its ΔF1 is against the same baseline (the base model's FP16 row); the sweep does not train.

For each row: calibrate (one calibration per method and percentile serves every option set; caches live in the
workbench cache directory under their key, so a later sweep reuses them), build the engine into
`REPORT_DIR/engines/NAME.engine` (an engine already there is reused when its header's model digest, calibration
key, policy, profiles, device and workbench version, and its embedded tokenizer, match), evaluate it and time it
at every profile (eval.measure; `REPORT_DIR/predictions/NAME.json`; the questions are featurized once for every
row), and store the row as `REPORT_DIR/rows/NAME.json` (atomically) with a key of everything its accuracy depends
on (model and tokenizer digests, calibration key, policy, profiles, the evaluation file's digest and question
limit, feature and answer settings, device type and GPU, workbench version) and a timing key (the machine: CPU
model, cores and torch threads, or GPU; library versions; the timing settings). A rerun skips every row whose stored
keys match ("finished earlier"), recomputes those whose inputs changed, and re-times (reusing the accuracy) those
timed on another machine or whose timing was not stable, so an interrupted sweep resumes where it stopped and no
figure from another device or a noisy moment is kept.

Timing: each profile is timed in rounds until two agree (eval.benchmark.time_until_stable), and builds within
timing noise of the fastest tie (eval.report). A machine whose load changes during the sweep can still slow every
row of a stretch alike, so at the end the baseline is timed again at the selection profile: when it moved by more
than twice the timing tolerance, the rows timed in this run are timed again; if the baseline still moves they are
marked not stable (a figure that is not stable ties with every build) and the next run re-times them. The
report records the device, model, data, date, commit and how the figures were timed. At the end the rows become
the report (`eval.report`): table, Markdown, CSV, JSON and the Pareto plot in REPORT_DIR.
"""
from __future__ import annotations

import json
import math
import re
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from common.errors import WorkbenchError
from common.files import atomic_write_json, read_json
from common.version import __version__
from eval.compare import bench_defaults, check_name, describe_calibration, latency_line, time_profiles, timing_policy
from eval.measure import Questions, machine_key, measure, provenance, release
from eval.report import BuildResult, Report, build_report, delta_f1, profile_label, render_text, write_report_dir

if TYPE_CHECKING:
    import torch

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "assets"
DEFAULT_MODEL = ASSETS / "minilm-l6-h384-squad11"
DEFAULT_CALIB_SQUAD = ASSETS / "squad" / "train-v1.1-calib-first-paragraphs.json.gz"
DEFAULT_EVAL_SQUAD = ASSETS / "squad" / "dev-v1.1.json.gz"
DEFAULT_REPORT_DIR = "sweep-report"

SMOOTH_ALPHA = 0.8  # the default grid's smoothing strength: quant.smoothing.DEFAULT_ALPHA (a test holds them equal)
ROW_FORMAT = "bert-int8-workbench sweep row"
ROW_FORMAT_VERSION = 2  # 2: a timing key beside the key, and the timing's runs, spread and stability

# Calibration methods of the default grid: tag (used in row names and --methods) -> (method, percentile, smooth
# alpha). The smoothed entropy row is the workbench's own accuracy tool (quant/smoothing.py), beside TensorRT's.
METHODS: dict[str, tuple[str, float | None, float | None]] = {
    "entropy": ("entropy", None, None),
    "entropy-sm": ("entropy", None, SMOOTH_ALPHA),
    "p99.9": ("percentile", 99.9, None),
    "p99.99": ("percentile", 99.99, None),
    "mse": ("mse", None, None),
    "max": ("max", None, None),
}
# Option sets: tag (used in row names and --options) -> (-iln, -imh).
OPTION_SETS: dict[str, tuple[bool, bool]] = {"plain": (False, False), "iln": (True, False), "imh": (False, True),
                                             "iln-imh": (True, True)}
# FP8 rows of the default grid: tag (row name "fp8-TAG") -> (method, percentile, smooth alpha). Max, and MSE on
# FP8 E4M3's own grid (calib.calibrators "mse-fp8"): entropy and INT8's mse pick ranges for INT8's uniform grid
# (an --fp8 build from them warns), and E4M3's steps grow with the value, so clipping percentiles give the bulk
# no finer steps, only clip the tail (grid files may still ask for them).
FP8_METHODS: dict[str, tuple[str, float | None, float | None]] = {
    "max": ("max", None, None),
    "mse": ("mse-fp8", None, None),
}
CALIBRATION_METHODS = ("entropy", "percentile", "mse", "mse-fp8", "max")
# What --methods takes: the method tags, plus percentile (every percentile row) and qat (QAT rows).
METHOD_TAGS = (*METHODS, "mse-fp8", "percentile", "qat")


@dataclass(frozen=True)
class DeviceDefaults:
    """What a sweep does when not told: CUDA runs the real thing, the CPU a quick look (CI, laptops)."""

    calib_num: int                          # calibration questions
    eval_limit: int | None                  # evaluation questions (None: the whole file)
    profiles: tuple[tuple[int, int], ...]   # (batch, seq_len) engine profiles, each timed
    half: bool                              # non-INT8 work in FP16 (else FP32)


# Timed runs per profile: eval.compare.BENCH_DEFAULTS (5 after 1 warm-up on the CPU, 100 after 10 on CUDA).
DEVICE_DEFAULTS = {
    "cuda": DeviceDefaults(calib_num=100, eval_limit=None, profiles=((1, 128), (64, 384)), half=True),
    "cpu": DeviceDefaults(calib_num=20, eval_limit=30, profiles=((1, 384),), half=False),
}


# `cli.py sweep --help`
DESCRIPTION = (
    "the workbench's answer: build the grid of INT8 builds and the FP16 baseline, evaluate and time each, and pick "
    "the fastest build within the F1 budget. The default grid: FP16; INT8 x {entropy, entropy --smooth 0.8, "
    "percentile 99.9, percentile 99.99, mse, max} x {plain, -iln, -imh, -iln -imh}; FP8 x {max, mse-fp8} x "
    "{plain, -iln} (--fp8: skipped, with the reason, on a GPU below compute capability 8.9); INT8 x --sparse when "
    "the model's GEMM weights are 2:4 sparse (built --sparse: 2:4 kernels where the build times them faster; "
    "skipped, with the reason, on a dense model). "
    "--qat DIR adds an INT8 row per `cli.py qat` folder: its trained weights and learned scales, built with the "
    "flags it was trained for, no calibration. "
    "Calibration caches, kernel timings and featurized questions are reused from the workbench cache. Resumable: "
    "each finished row is stored in REPORT_DIR/rows/ with a key of all its inputs, and a rerun skips the rows whose "
    "inputs did not change. Without arguments it runs on the model and SQuAD files in assets/, on CUDA when "
    "present; on the CPU it evaluates 30 questions, calibrates on 20, times one 1x384 profile 5 times and runs the "
    "non-INT8 work in FP32 (it says so). Each profile is timed in rounds until two agree; builds within timing "
    "noise of the fastest are a tie that the higher F1 wins; rows timed on another machine or not stable are "
    "re-timed by a rerun, and the report records device, model, data, date, commit and the runs timed.")
EXAMPLES = """examples:
  python cli.py sweep                     # the default: assets/ model and SQuAD files, CUDA if present
  python cli.py sweep --model DIR --calib-squad train.json --eval-squad dev.json -b 1 -s 128 -b 64 -s 384 \\
      --report-dir report/
  python cli.py sweep --methods entropy max --options plain iln --eval-limit 500
  python cli.py sweep --methods entropy-sm --qat out/qat-iln-imh   # + int8-qat-iln-imh: QAT's weights and scales
  python cli.py sweep --grid grid.json    # a JSON list of rows, e.g.
      # [{"name": "fp16", "fp16": true}, {"name": "int8-mse-iln", "int8": true, "method": "mse", "iln": true},
      #  {"name": "fp8-p99.99", "fp8": true, "method": "percentile"},
      #  {"name": "int8-qat", "int8": true, "iln": true, "imh": true, "qat": "out/qat-iln-imh"}]"""


def shown(path: str | Path) -> str:
    """A path for --help: relative to the working directory when under it."""
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return str(path)


@dataclass(frozen=True)
class DeviceSettings:
    """The flags as the sweep runs them: what was not given comes from the device's defaults (`defaulted`)."""

    half: bool
    eval_limit: int | None
    calib_num: int
    profiles: list[tuple[int, int]]
    iterations: int
    warmup: int
    defaulted: frozenset[str]        # which of precision, eval_limit, calib_num, profiles, iterations were not given


def device_settings(device: torch.device, *, precision: str | None = None, eval_limit: str | int | None = None,
                    calib_num: int | None = None, batch_sizes: Sequence[int] | None = None,
                    seq_lengths: Sequence[int] | None = None, bench_iterations: int | None = None,
                    bench_warmup: int | None = None, max_seq_length: int = 384) -> DeviceSettings:
    """`cli.py sweep`'s flags (None: not given) resolved against DEVICE_DEFAULTS and checked."""
    from data.squad import parse_question_limit

    d = DEVICE_DEFAULTS[device.type]
    limit = d.eval_limit if eval_limit is None else parse_question_limit(eval_limit, "--eval-limit")
    profiles = pair_profiles(batch_sizes, seq_lengths, d.profiles, max_seq_length)
    iterations, warmup = bench_defaults(device, bench_iterations, bench_warmup)
    given = {"precision": precision, "eval_limit": eval_limit, "calib_num": calib_num,
             "profiles": batch_sizes or seq_lengths or None, "iterations": bench_iterations}
    return DeviceSettings(d.half if precision is None else precision == "fp16", limit,
                          d.calib_num if calib_num is None else calib_num, profiles, iterations, warmup,
                          frozenset(k for k, v in given.items() if v is None))


def cpu_notice(device: torch.device, s: DeviceSettings, device_given: bool = False) -> str | None:
    """On the CPU, what the sweep does that a GPU run would not (only for what the flags left to the defaults)."""
    if device.type != "cpu":
        return None
    said = {"eval_limit": f"{'the first ' + str(s.eval_limit) if s.eval_limit else 'all'} evaluation questions "
                          "(--eval-limit; CUDA's default is all of them)",
            "calib_num": f"{s.calib_num} calibration questions (--calib-num; 100 on CUDA)",
            "profiles": f"profile {', '.join(f'{b}x{q}' for b, q in s.profiles)} (-b/-s; 1x128 and 64x384 on CUDA)",
            "iterations": f"{s.iterations} timed runs per profile (--bench-iterations; 100 on CUDA)",
            "precision": "FP32 for what is not INT8 (--precision; FP16 on CUDA, emulated and slow on the CPU)"}
    said = [text for key, text in said.items() if key in s.defaulted]
    if not said:
        return None
    return (f"on the CPU{'' if device_given else ' (no CUDA GPU)'}: a quick sweep with {'; '.join(said)}. "
            "Accuracy on so few questions and CPU latency are not what a GPU run reports.")


# ------------------------------------------------------------------------------------------------------ grid

@dataclass(frozen=True)
class GridRow:
    """One build of the grid. `fp16` None follows the sweep's precision (FP16 on CUDA, FP32 on the CPU). An FP8 row
    (`fp8`, --fp8) takes a calibration method as an INT8 row does (the same caches); -iln, -imh and QAT folders are
    INT8's only."""

    name: str
    int8: bool = False
    fp8: bool = False                  # --fp8: FP8 E4M3 GEMMs instead of INT8
    fp16: bool | None = None
    iln: bool = False
    imh: bool = False
    fc2_library_gemm: bool = False     # -g
    keep_fp16: tuple[str, ...] = ()    # --keep-fp16 GEMMs (mixed precision)
    sparse: bool = False               # --sparse: 2:4 kernels where the build times them faster
    method: str | None = None          # calibration method of an INT8 row
    percentile: float | None = None    # for method "percentile" (default 99.99)
    smooth: float | None = None        # calibrate --smooth ALPHA (None: off)
    qat: str | None = None             # a `cli.py qat` folder: its weights and learned scales instead of `method`
    baseline: bool = False             # the row the others are compared with

    def __post_init__(self) -> None:
        where = f"grid row {self.name!r}"
        check_name(self.name, "grid row name")
        object.__setattr__(self, "keep_fp16", tuple(self.keep_fp16))
        if self.qat is not None:
            object.__setattr__(self, "qat", str(self.qat))
        self._check_format(where)
        if self.quantized and self.method is None and self.qat is None:
            raise WorkbenchError(f"{where}: an {'FP8' if self.fp8 else 'INT8'} row needs a calibration method "
                                 f"({', '.join(CALIBRATION_METHODS)})" + ("" if self.fp8 else " or a QAT folder (qat)"))
        if not self.quantized:
            return
        if self.baseline:
            raise WorkbenchError(f"{where}: the baseline is a build without INT8 or FP8")
        if self.qat is not None:
            if self.method is not None:
                raise WorkbenchError(f"{where}: give a calibration method or a QAT folder (qat), not both")
            extra = [f for f, on in (("percentile", self.percentile is not None), ("smooth", self.smooth is not None))
                     if on]
            if extra:
                raise WorkbenchError(f"{where}: {extra[0]} applies to calibrated rows; a QAT row's scales come from "
                                     "its folder")
            if not self.qat:
                raise WorkbenchError(f"{where}: qat must name a `cli.py qat` folder")
            return
        if self.method not in CALIBRATION_METHODS:
            raise WorkbenchError(f"{where}: unknown calibration method {self.method!r} "
                                 f"(one of {', '.join(CALIBRATION_METHODS)})")
        if self.method == "percentile":
            if self.percentile is None:
                object.__setattr__(self, "percentile", 99.99)
            if not (isinstance(self.percentile, (int, float)) and math.isfinite(self.percentile)
                    and 0 < self.percentile <= 100):
                raise WorkbenchError(f"{where}: percentile must be in (0, 100], got {self.percentile!r}")
            object.__setattr__(self, "percentile", float(self.percentile))
        elif self.percentile is not None:
            raise WorkbenchError(f"{where}: percentile applies to method percentile only")
        if self.smooth is not None:
            from quant.smoothing import check_alpha
            try:
                object.__setattr__(self, "smooth", check_alpha(self.smooth))
            except WorkbenchError as e:
                raise WorkbenchError(f"{where}: {e}") from None

    def _check_format(self, where: str) -> None:
        """INT8 or FP8 (not both); the fields a row without either cannot have; FP8 without INT8's -imh and QAT
        folders (one line each, as `cli.py build` refuses them)."""
        if self.int8 and self.fp8:
            raise WorkbenchError(f"{where}: give int8 or fp8, not both")
        int8_only = [f for f, on in (("imh", self.imh), ("qat", self.qat is not None)) if on]
        if self.fp8 and int8_only:
            raise WorkbenchError(f"{where}: {int8_only[0]} is INT8-only (-imh and QAT scales): drop it from the FP8 "
                                 "row, or make the row \"int8\": true")
        if self.quantized:
            return
        if int8_only:
            raise WorkbenchError(f"{where}: {int8_only[0]} applies to INT8 rows only (add \"int8\": true)")
        extra = [f for f, on in (("iln", self.iln), ("method", self.method is not None),
                                 ("keep_fp16", bool(self.keep_fp16)),
                                 ("sparse", self.sparse), ("percentile", self.percentile is not None),
                                 ("smooth", self.smooth is not None)) if on]
        if extra:
            raise WorkbenchError(f"{where}: {extra[0]} applies to INT8 and FP8 rows only (add \"int8\": true or "
                                 "\"fp8\": true)")

    @property
    def quantized(self) -> bool:
        """An INT8 or an FP8 row: it builds from ranges (a calibration, or for INT8 a QAT folder's)."""
        return self.int8 or self.fp8

    @property
    def method_tag(self) -> str | None:
        """entropy, p99.9, p99.99, mse, mse-fp8, max (+ "-sm" when smoothed), or qat: what --methods selects."""
        if self.qat is not None:
            return "qat"
        tag = f"p{self.percentile:g}" if self.method == "percentile" else self.method
        return tag + ("-sm" if self.smooth is not None else "") if tag else None

    @property
    def options_tag(self) -> str:
        """plain, iln, imh, iln-imh: what --options selects."""
        return "-".join(t for t, on in (("iln", self.iln), ("imh", self.imh)) if on) or "plain"

    def policy(self, half: bool):
        from quant.policy import PrecisionPolicy

        kwargs: dict[str, Any] = dict(int8=self.int8, fp8=self.fp8, fp16=half if self.fp16 is None else self.fp16,
                                      iln=self.iln, imh=self.imh, fc2_library_gemm=self.fc2_library_gemm,
                                      sparse=self.sparse)
        if self.keep_fp16:
            kwargs["fp16_gemms"] = self.keep_fp16
        try:
            return PrecisionPolicy(**kwargs)
        except WorkbenchError as e:
            raise WorkbenchError(f"grid row {self.name!r}: {e}") from None
        except TypeError:  # a policy without mixed precision
            raise WorkbenchError(f"grid row {self.name!r}: keep_fp16 is not supported by this workbench") from None

    def calibration_spec(self, calib_num: int, seed: int, features):
        from calib.calibrate import CalibrationSpec

        if not self.quantized or self.qat is not None:
            return None
        return CalibrationSpec(self.method, calib_num, seed, self.percentile if self.percentile is not None else 99.99,
                               features=features, smooth=self.smooth)


_ROW_FIELDS = {f.name: f for f in fields(GridRow)}
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "name": (str,), "int8": (bool,), "fp8": (bool,), "fp16": (bool, type(None)), "iln": (bool,), "imh": (bool,),
    "fc2_library_gemm": (bool,), "keep_fp16": (list,), "sparse": (bool,), "method": (str, type(None)),
    "percentile": (int, float, type(None)), "smooth": (int, float, type(None)), "qat": (str, type(None)),
    "baseline": (bool,),
}


def row_from_json(obj: Any, where: str) -> GridRow:
    if not isinstance(obj, dict):
        raise WorkbenchError(f"{where}: expected a JSON object, found {type(obj).__name__}")
    unknown = sorted(set(obj) - set(_ROW_FIELDS))
    if unknown:
        raise WorkbenchError(f"{where}: unknown field {unknown[0]!r} (fields: {', '.join(_ROW_FIELDS)})")
    if "name" not in obj:
        raise WorkbenchError(f"{where}: missing field 'name'")
    for key, value in obj.items():
        types = _FIELD_TYPES[key]
        if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
            raise WorkbenchError(f"{where}: field {key!r} has the wrong type ({value!r})")
    if "keep_fp16" in obj and not all(isinstance(g, str) for g in obj["keep_fp16"]):
        raise WorkbenchError(f"{where}: keep_fp16 must be a list of GEMM names like \"layer3.fc2\" or \"fc2\"")
    return GridRow(**{k: tuple(v) if k == "keep_fp16" else v for k, v in obj.items()})


def load_grid(path: str | Path) -> list[GridRow]:
    """A grid file: a JSON list of rows (or {"rows": [...]}), each {"name": ..., "int8": ..., "method": ...}.

    Fields: name, int8, fp8 (FP8 E4M3 GEMMs instead: --fp8, no imh or qat), fp16 (omitted: the sweep's
    precision), iln, imh, fc2_library_gemm, keep_fp16 (GEMM names), sparse, method (entropy, percentile, mse,
    mse-fp8, max), percentile (default 99.99), smooth (alpha), qat (a `cli.py qat` folder, relative to the working
    directory: its weights and learned scales instead of a method; the row's flags may quantize no site the folder
    has no range for), baseline. Example:
        [{"name": "fp16", "fp16": true},
         {"name": "int8-entropy-iln", "int8": true, "method": "entropy", "iln": true},
         {"name": "int8-p99.9", "int8": true, "method": "percentile", "percentile": 99.9},
         {"name": "fp8-mse", "fp8": true, "method": "mse-fp8"},
         {"name": "int8-qat-iln", "int8": true, "iln": true, "qat": "out/qat-iln"}]
    """
    obj = read_json(path, "grid file")
    rows = obj.get("rows") if isinstance(obj, dict) else obj
    if not isinstance(rows, list) or not rows:
        raise WorkbenchError(f"{path}: a grid file is a non-empty JSON list of rows (or {{\"rows\": [...]}})")
    try:
        grid = [row_from_json(r, f"rows[{i}]") for i, r in enumerate(rows)]
        check_grid(grid)
    except WorkbenchError as e:
        raise WorkbenchError(f"{path}: {e}") from None
    return grid


def default_grid(half: bool) -> list[GridRow]:
    """The baseline, INT8 for every method and option set, FP8 for FP8_METHODS, then INT8 again with --sparse."""
    rows = [GridRow("fp16" if half else "fp32", fp16=half, baseline=True)]
    for sparse in (False, True):
        for tag, (method, percentile, smooth) in METHODS.items():
            for options, (iln, imh) in OPTION_SETS.items():
                name = "-".join(p for p in ("int8", tag, "" if options == "plain" else options,
                                            "sparse" if sparse else "") if p)
                rows.append(GridRow(name, int8=True, fp16=half, iln=iln, imh=imh, method=method,
                                    percentile=percentile, smooth=smooth, sparse=sparse))
        if not sparse:
            rows += [GridRow(f"fp8-{tag}" + ("-iln" if iln else ""), fp8=True, fp16=half, iln=iln, method=method,
                             percentile=percentile, smooth=smooth)
                     for iln in (False, True) for tag, (method, percentile, smooth) in FP8_METHODS.items()]
    return rows


def check_grid(grid: Sequence[GridRow]) -> GridRow:
    """Unique names and exactly one baseline (marked, or the one row without INT8 or FP8); returns the baseline."""
    names = [r.name for r in grid]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise WorkbenchError(f"grid row name {dup[0]!r} is used twice")
    return baseline_row(grid)


def baseline_row(grid: Sequence[GridRow]) -> GridRow:
    marked = [r for r in grid if r.baseline]
    if len(marked) > 1:
        raise WorkbenchError(f"more than one baseline row ({', '.join(r.name for r in marked)}); mark exactly one")
    if marked:
        return marked[0]
    plain = [r for r in grid if not r.quantized]
    if not plain:
        raise WorkbenchError('the grid has no baseline: add a row without INT8 or FP8, e.g. {"name": "fp16", '
                             '"fp16": true}')
    if len(plain) > 1:
        raise WorkbenchError(f"several rows without INT8 or FP8 ({', '.join(r.name for r in plain)}): mark the "
                             'baseline with "baseline": true')
    return plain[0]


def select_rows(grid: Sequence[GridRow], methods: Sequence[str] | None = None,
                options: Sequence[str] | None = None) -> list[GridRow]:
    """INT8 and FP8 rows restricted to the given method tags (`percentile` = every percentile, `mse` = MSE on
    either grid, mse-fp8 on FP8's alone, `qat` = the QAT rows) and option sets (an FP8 row is plain or iln); rows
    without either (the baseline) always stay."""
    def method_ok(r: GridRow) -> bool:
        return methods is None or r.method_tag in methods or ("percentile" in methods and r.method == "percentile") \
            or ("mse" in methods and r.method_tag == "mse-fp8")

    return [r for r in grid if not r.quantized or (method_ok(r) and (options is None or r.options_tag in options))]


def read_qat_folder(folder: str | Path):
    """The learned scales (qat.folder.QatScales) of a `cli.py qat` folder; a missing folder or a plain model folder
    (no quant_spec.json: nothing to build INT8 from) is a one-line error naming it."""
    from qat.folder import QUANT_SPEC_NAME, read_qat_scales

    if not Path(folder).is_dir():
        raise WorkbenchError(f"{folder}: QAT folder not found (expected a `cli.py qat` output folder)")
    scales = read_qat_scales(folder)
    if scales is None:
        raise WorkbenchError(f"{folder}: no {QUANT_SPEC_NAME}: a plain model folder, not a `cli.py qat` output "
                             "(a QAT row needs its learned scales)")
    return scales


def qat_rows(folders: Sequence[str | Path], grid: Sequence[GridRow] = ()) -> list[GridRow]:
    """--qat: one INT8 row per `cli.py qat` folder, with the flags it was trained for (-iln, -imh, --keep-fp16),
    named int8-qat[-OPTIONS]; where two rows (or one of `grid`'s) would share a name, the folder's name is added."""
    rows, seen = [], set()
    for folder in folders:
        if Path(folder).resolve() in seen:
            raise WorkbenchError(f"{folder}: --qat names this folder twice")
        seen.add(Path(folder).resolve())
        flags = read_qat_folder(folder).policy
        row = GridRow("int8-qat", int8=True, iln=flags["iln"], imh=flags["imh"],
                      keep_fp16=tuple(flags["fp16_gemms"]), qat=str(folder))
        rows.append(row if row.options_tag == "plain" else replace(row, name=f"int8-qat-{row.options_tag}"))
    names, taken, out = [r.name for r in rows], {r.name for r in grid}, []
    for row in rows:
        name = row.name
        if name in taken or names.count(name) > 1:
            tail = re.sub(r"[^A-Za-z0-9._+-]+", "-", Path(row.qat).resolve().name).strip("-._+") or "folder"
            name = base = f"{name}-{tail}"
            n = 2
            while name in taken:  # two folders of the same name
                name, n = f"{base}-{n}", n + 1
        taken.add(name)
        out.append(replace(row, name=name))
    return out


# -------------------------------------------------------------------------------------------------- settings

def pair_profiles(batches: Sequence[int] | None, seq_lens: Sequence[int] | None,
                  default: Sequence[tuple[int, int]], max_seq_length: int) -> list[tuple[int, int]]:
    """-b and -s pair up in order (-b 1 -s 128 -b 64 -s 384: profiles 1x128 and 64x384, as in the TensorRT demo);
    a single value of one goes with every value of the other; without -s the sequence length is
    --max-seq-length, without -b the batch is 1; with neither, the device's default profiles."""
    if not batches and not seq_lens:
        return [tuple(p) for p in default]
    batches, seq_lens = list(batches or [1]), list(seq_lens or [max_seq_length])
    if len(batches) == 1:
        batches *= len(seq_lens)
    if len(seq_lens) == 1:
        seq_lens *= len(batches)
    if len(batches) != len(seq_lens):
        raise WorkbenchError(f"{len(batches)} -b values and {len(seq_lens)} -s values: give them in pairs "
                             "(-b 1 -s 128 -b 64 -s 384), or one of either")
    profiles = list(zip(batches, seq_lens))
    for b, s in profiles:
        if b < 1 or s < 1:
            raise WorkbenchError(f"profile {b}x{s}: batch and sequence length must be at least 1")
    dup = sorted({p for p in profiles if profiles.count(p) > 1})
    if dup:
        raise WorkbenchError(f"profile {profile_label(dup[0], 'x')} given twice")
    return profiles


@dataclass
class SweepConfig:
    model: str | Path
    calib_squad: str | Path
    eval_squad: str | Path
    report_dir: str | Path
    grid: list[GridRow]
    profiles: list[tuple[int, int]]
    device: torch.device
    half: bool
    calib_num: int
    eval_limit: int | None
    feature_settings: Any            # data.features.FeatureSettings
    answer_settings: Any             # data.answers.AnswerSettings
    bench_iterations: int
    bench_warmup: int
    seed: int = 0
    max_f1_drop: float = 1.0
    selection_profile: tuple[int, int] | None = None
    force: bool = False              # recompute every row and rebuild every engine
    feature_cache: bool = True
    progress: bool = True
    trust_pickle: bool = False
    vocab_file: str | None = None    # -v: a vocab.txt instead of the model folder's tokenizer (QAT rows must match)
    say: Callable[[str], None] = field(default=lambda line: print(line, file=sys.stderr, flush=True))
    on_row_done: Callable[[str], None] | None = None  # called after each row is stored (tests interrupt here)
    timing_tolerance: float | None = None  # rounds agree within it (None: eval.benchmark.STABLE_DEFAULTS)
    distributed: Any = None          # eval.distributed.Workers: rows on Ray workers (--workers/--ray); None: here


@dataclass(frozen=True)
class SweepResult:
    report: Report
    results: tuple[BuildResult, ...]
    reused: tuple[str, ...]          # rows taken from earlier runs
    computed: tuple[str, ...]        # rows measured by this run
    skipped: tuple[str, ...]         # sparse (and FP8) rows that were not built
    files: dict[str, Path]           # report files written
    failed: dict[str, str] = field(default_factory=dict)  # row -> why (distributed rows that failed twice)


def config_from_flags(flags, feature_settings, answer_settings) -> tuple[SweepConfig, str | None]:
    """`cli.py sweep`'s parsed flags (an argparse.Namespace: model, calib_squad, eval_squad, report_dir, grid,
    methods, options, qat, batch_size, seq_length, precision, calib_num, seed, eval_limit, max_f1_drop, profile,
    bench_iterations, bench_warmup, device, force, no_cache, no_progress, trust_pickle, vocab_file) as a SweepConfig,
    and the notice of what a CPU run leaves out (None on CUDA, or when the flags said it all). The --qat rows come
    after the rows --methods/--options select."""
    from eval.distributed import device_and_workers
    from eval.report import parse_profile

    device, workers = device_and_workers(flags)
    s = device_settings(device, precision=flags.precision, eval_limit=flags.eval_limit, calib_num=flags.calib_num,
                        batch_sizes=flags.batch_size, seq_lengths=flags.seq_length,
                        bench_iterations=flags.bench_iterations, bench_warmup=flags.bench_warmup,
                        max_seq_length=feature_settings.max_seq_length)
    grid = default_grid(s.half) if flags.grid == "default" else load_grid(flags.grid)
    grid = select_rows(grid, flags.methods, flags.options)
    cfg = SweepConfig(
        model=flags.model, calib_squad=flags.calib_squad, eval_squad=flags.eval_squad, report_dir=flags.report_dir,
        grid=grid + qat_rows(getattr(flags, "qat", None) or (), grid), profiles=s.profiles, device=device, half=s.half,
        calib_num=s.calib_num, eval_limit=s.eval_limit, feature_settings=feature_settings,
        answer_settings=answer_settings, bench_iterations=s.iterations, bench_warmup=s.warmup, seed=flags.seed,
        max_f1_drop=flags.max_f1_drop, selection_profile=parse_profile(flags.profile) if flags.profile else None,
        force=flags.force, feature_cache=not flags.no_cache, progress=not flags.no_progress,
        trust_pickle=flags.trust_pickle, vocab_file=getattr(flags, "vocab_file", None), distributed=workers)
    return cfg, cpu_notice(device, s, device_given=bool(flags.device))


# -------------------------------------------------------------------------------------------------- row store

def _plain_json(obj: Any) -> Any:
    """Tuples become lists, keys sorted: how a key reads back from its file."""
    return json.loads(json.dumps(obj, sort_keys=True))


def device_description(device: torch.device) -> dict:
    """What a row's accuracy depends on of the device: its type and torch version, and on CUDA the GPU (its
    engines are built for it). The machine's other details only move latency (`timing_key`)."""
    m = machine_key(device)
    return {k: m[k] for k in ("type", "torch", "gpu", "compute_capability") if k in m}


def timing_key(machine: dict, bench: tuple[int, int], tolerance: float) -> dict:
    """What a stored row's latency depends on besides its build: the machine (eval.measure.machine_key) and the
    timing settings. A row stored under another timing key keeps its accuracy and is re-timed."""
    from eval.benchmark import STABLE_DEFAULTS

    _, rounds, seconds = STABLE_DEFAULTS["cuda" if machine.get("type") == "cuda" else "cpu"]
    return _plain_json({"machine": machine, "bench": {"iterations": bench[0], "warmup": bench[1],
                                                      "tolerance": tolerance, "max_rounds": rounds,
                                                      "max_seconds": seconds}})


def row_key(*, model_digest: str, calibration_key: str | None, policy, profiles: Sequence[tuple[int, int]],
            eval_digest: str, eval_limit: int | None, n_questions: int, feature_settings, answer_settings,
            device: dict, tokenizer_digest: str | None = None) -> dict:
    """Everything a stored row's accuracy depends on; a rerun reuses the row only when all of it is equal (its
    latency also needs an equal `timing_key`). The tokenizer is there for the rows without a calibration key
    (the baseline, QAT rows): -v changes it and not the weights."""
    return _plain_json({
        "workbench": __version__,
        "model_digest": model_digest,
        "tokenizer": tokenizer_digest,
        "calibration_key": calibration_key,
        "policy": asdict(policy),
        "profiles": [list(p) for p in profiles],
        "eval_data": {"digest": eval_digest, "limit": eval_limit, "questions": n_questions},
        "features": asdict(feature_settings),
        "answers": asdict(answer_settings),
        "device": device,
    })


def row_path(report_dir: Path, name: str) -> Path:
    return report_dir / "rows" / f"{name}.json"


def store_row(path: Path, key: dict, result: BuildResult, seconds: float, timing: dict | None = None,
              timed_on: dict | None = None) -> None:
    """`timed_on`: the worker that timed it (eval.distributed: its host, GPU index and uuid), when distributed."""
    atomic_write_json(path, {"format": ROW_FORMAT, "format_version": ROW_FORMAT_VERSION, "key": key,
                             "timing_key": timing, "result": result.to_json(), "seconds": round(seconds, 3),
                             "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                             **({"timed_on": timed_on} if timed_on is not None else {})})


def _changed(new: dict, old: Any) -> list[str]:
    return sorted(k for k in set(new) | set(old if isinstance(old, dict) else {})
                  if not isinstance(old, dict) or old.get(k) != new.get(k))


def stored_row(path: Path, key: dict, timing: dict | None = None) -> tuple[BuildResult | None, str | None, str | None]:
    """(result, None, None) when the row stored at `path` was made from `key` and timed under `timing`;
    (result, None, why) when its accuracy can be reused but it must be timed again (another machine or timing
    settings, or a timing that was not stable); (None, why, None) when it cannot be reused; (None, None, None)
    when nothing is stored."""
    if not path.exists():
        return None, None, None
    try:
        obj = read_json(path, "stored row")
        if not isinstance(obj, dict) or obj.get("format") != ROW_FORMAT or \
                obj.get("format_version") != ROW_FORMAT_VERSION:
            return None, "its stored result is not a sweep row of this version", None
        stored_key = obj.get("key")
        if stored_key != key:
            return None, f"its inputs changed since it was stored ({', '.join(_changed(key, stored_key))})", None
        result = BuildResult.from_json(obj.get("result"), "result")
    except WorkbenchError as e:
        return None, f"its stored result is unreadable ({e})", None
    stored_timing = obj.get("timing_key")
    if timing is not None and stored_timing != timing:
        what = _changed(timing.get("machine", {}), (stored_timing or {}).get("machine"))
        return result, None, (f"it was timed on another machine ({', '.join(what)} differ)" if what else
                              "it was timed with other timing settings")
    unstable = [f"{profile_label(lat.profile)} ±{lat.spread or 0:.0%}" for lat in result.latency
                if lat.stable is False]
    if unstable:
        return result, None, f"its timing was not stable ({', '.join(unstable)})"
    return result, None, None


# ------------------------------------------------------------------------------------------------- the sweep

def _engine_mismatch(path: Path, *, model_digest: str, calibration_key: str | None, policy,
                     profiles: Sequence[tuple[int, int]], device: torch.device,
                     tokenizer: str | None = None) -> str | None:
    """Why the engine at `path` cannot serve this row (None: it can). `tokenizer` (serialized): the one it must
    embed, which its header does not name (-v changes it and not the weights)."""
    from safetensors import safe_open

    from engines.build import TOKENIZER_TENSOR
    from engines.engine_file import read_header, this_gpu

    try:
        h = read_header(path)
        with safe_open(str(path), framework="pt") as f:
            embedded = bytes(f.get_tensor(TOKENIZER_TENSOR).numpy()) if TOKENIZER_TENSOR in f.keys() else None
    except WorkbenchError as e:
        return f"unreadable ({e})"
    gpu = this_gpu(device) if device.type == "cuda" else None
    checks = (
        ("model", h.model_digest == model_digest),
        ("calibration", h.calib_digest == calibration_key),
        ("policy", _plain_json(h.policy) == _plain_json(asdict(policy))),
        ("profiles", [(p.batch, p.seq_len) for p in h.profiles] == [tuple(p) for p in profiles]),
        ("device", h.device == device.type and (gpu is None or (h.gpu_name, h.compute_capability) == gpu)),
        ("workbench version", h.versions.get("workbench") == __version__),
        ("tokenizer", tokenizer is None or embedded == tokenizer.encode()),
    )
    bad = [what for what, ok in checks if not ok]
    return f"built from other inputs ({', '.join(bad)})" if bad else None


@dataclass
class _Inputs:
    """What every row of a sweep shares: the model, the question sets, the rows left after skipping."""

    loaded: Any                      # model.checkpoint.LoadedModel
    wordpiece: Any
    eval_squad: Any                  # data.squad.SquadFile
    calib_squad: Any                 # None without INT8 or FP8 rows
    questions: Questions             # the evaluation questions, featurized once
    rows: list[GridRow]
    skipped: list[str]               # sparse rows (on a dense model), FP8 rows (on a GPU without FP8)
    baseline: GridRow
    eval_batch: int                  # features per forward: the largest batch of the profiles that serve -s
    qat: dict[str, Any] = field(default_factory=dict)  # QAT row name -> its folder's qat.folder.QatScales


def _check_config(cfg: SweepConfig) -> tuple[GridRow, int]:
    """The grid's baseline and the evaluation batch; every setting checked before anything slow runs."""
    fs = cfg.feature_settings
    report_dir = Path(cfg.report_dir)
    if report_dir.exists() and not report_dir.is_dir():
        raise WorkbenchError(f"{report_dir}: --report-dir is a file, expected a directory")
    baseline = check_grid(cfg.grid)
    if cfg.calib_num < 1:
        raise WorkbenchError(f"--calib-num must be at least 1, got {cfg.calib_num}")
    if cfg.eval_limit is not None and cfg.eval_limit < 1:
        raise WorkbenchError(f"--eval-limit must be at least 1 (or all), got {cfg.eval_limit}")
    serving = [p for p in cfg.profiles if p[1] >= fs.max_seq_length]
    if not serving:
        raise WorkbenchError(f"no profile serves the evaluation's --max-seq-length {fs.max_seq_length} "
                             f"(profiles {', '.join(profile_label(p, 'x') for p in cfg.profiles)}): add one with "
                             f"-s {fs.max_seq_length}, or lower --max-seq-length")
    if cfg.selection_profile is not None and tuple(cfg.selection_profile) not in [tuple(p) for p in cfg.profiles]:
        raise WorkbenchError(f"--profile {profile_label(cfg.selection_profile, 'x')} is not one of the sweep's "
                             f"profiles ({', '.join(profile_label(p, 'x') for p in cfg.profiles)})")
    return baseline, max(b for b, _ in serving)


def _load_inputs(cfg: SweepConfig) -> _Inputs:
    """The model and SQuAD files, checked against the profiles; sparse and FP8 rows skipped with the reason."""
    from calib.calibrate import check_fits, load_calibration_model
    from calib.sparsity import gemm_sparsity
    from data.squad import load_squad

    baseline, eval_batch = _check_config(cfg)
    loaded, wordpiece = load_calibration_model(cfg.model, trust_pickle=cfg.trust_pickle, vocab_file=cfg.vocab_file)
    check_fits(loaded, cfg.feature_settings)
    for b, s in cfg.profiles:
        if s > loaded.config.max_position_embeddings:
            raise WorkbenchError(f"profile {b}x{s}: sequence length exceeds the model's max_position_embeddings "
                                 f"{loaded.config.max_position_embeddings}")
    qat = _qat_scales(cfg, loaded, wordpiece)
    eval_squad = load_squad(cfg.eval_squad, limit=cfg.eval_limit)
    calib_squad = load_squad(cfg.calib_squad) if any(r.quantized and r.qat is None for r in cfg.grid) else None
    answer_settings = replace(cfg.answer_settings, version_2_with_negative=eval_squad.version.startswith("2"))
    questions = Questions(eval_squad.examples, eval_squad.version, cfg.feature_settings, answer_settings,
                          wordpiece=wordpiece, cache=cfg.feature_cache, progress=cfg.progress)
    rows, skipped = list(cfg.grid), []
    sparse = [r.name for r in rows if r.sparse]
    if sparse:
        check = gemm_sparsity(loaded.model, loaded.config.num_layers)
        if check.all_sparse:
            cfg.say(f"{len(sparse)} --sparse row{'s' if len(sparse) > 1 else ''}: the model's GEMM weights are 2:4; "
                    "each build times the 2:4 kernels (cuSPARSELt) against dense ones per GEMM and keeps the faster")
        else:
            skipped = sparse
            cfg.say(f"{len(skipped)} sparse row{'s' if len(skipped) > 1 else ''} skipped: the model's GEMM weights "
                    f"are not 2:4 sparse ({check.summary()}; `cli.py prune` makes them so)")
            rows = [r for r in rows if not r.sparse]
    fp8_skipped = _skip_fp8(cfg, rows)
    rows, skipped = [r for r in rows if r.name not in fp8_skipped], skipped + fp8_skipped
    if baseline.name not in [r.name for r in rows]:
        raise WorkbenchError(f"the baseline row {baseline.name!r} cannot be a sparse row")
    return _Inputs(loaded, wordpiece, eval_squad, calib_squad, questions, rows, skipped, baseline, eval_batch, qat)


def _skip_fp8(cfg: SweepConfig, rows: Sequence[GridRow]) -> list[str]:
    """The FP8 rows this device cannot build, said in one line (a CUDA GPU below compute capability 8.9, which
    `cli.py build --fp8` refuses); the CPU builds them on the reference path."""
    from engines.build import fp8_unsupported

    fp8 = [r.name for r in rows if r.fp8]
    why = fp8_unsupported(cfg.device) if fp8 else None
    if why:
        cfg.say(f"{len(fp8)} FP8 row{'s' if len(fp8) > 1 else ''} skipped: FP8 GEMMs need {why}")
        return fp8
    return []


def _qat_scales(cfg: SweepConfig, loaded, wordpiece) -> dict[str, Any]:
    """Each QAT row's learned scales, checked before anything slow runs: its folder must hold the sweep model's
    architecture (config.json) and the sweep's tokenizer (the -v vocabulary when given: `cli.py qat -v` writes it
    into the folder as vocab.txt), since the questions are featurized once with the sweep's and the row is
    compared with its baseline; and the row's flags may quantize only sites the folder has ranges for."""
    from data.tokenizer import load_wordpiece
    from model.config import load_hf_config

    out = {}
    for row in cfg.grid:
        if row.qat is None:
            continue
        scales = read_qat_folder(row.qat)
        config = load_hf_config(Path(row.qat) / "config.json")
        differ = [f"{f.name} {getattr(config, f.name)} vs {getattr(loaded.config, f.name)}" for f in fields(config)
                  if getattr(config, f.name) != getattr(loaded.config, f.name)]
        if differ:
            raise WorkbenchError(f"{row.qat}: not a QAT folder of the sweep's model {loaded.source}: its config.json "
                                 f"differs ({', '.join(differ)})")
        theirs = load_wordpiece(row.qat, vocab_size=config.vocab_size)
        # The digest names the file (-v my.txt became the folder's vocab.txt): equal serializations tokenize alike.
        if theirs.digest != wordpiece.digest and theirs.tokenizer.to_str() != wordpiece.tokenizer.to_str():
            raise WorkbenchError(f"{row.qat}: its tokenizer differs from " + (
                f"the sweep's -v {cfg.vocab_file} (a folder trained with -v holds that vocabulary as its vocab.txt)"
                if cfg.vocab_file else f"that of the sweep's model {loaded.source} (trained with -v? give the "
                "sweep the same -v)"))
        scales.spec_for(row.policy(cfg.half), config.num_layers, f"grid row {row.name!r}: the QAT scales of {row.qat}")
        cfg.say(f"QAT row {row.name}: the weights and learned scales of {row.qat} (trained for "
                f"{scales.precision_policy().describe()}), no calibration")
        out[row.name] = scales
    return out


def _row_inputs(cfg: SweepConfig, inp: _Inputs, row: GridRow) -> _Inputs:
    """What one row builds from: a QAT row's own folder (its trained weights, whose digest keys the row and its
    engine; the caller drops it after the row), every other row the sweep's model."""
    from model.checkpoint import load_model

    return inp if row.qat is None else replace(inp, loaded=load_model(row.qat, trust_pickle=cfg.trust_pickle))


class _Calibrations:
    """One calibration per (method, percentile, smooth), made (or reused from the workbench cache) when first
    needed; its key is predicted from the inputs, so a stored row can be reused without calibrating. A QAT row's
    "calibration" is its folder's learned scales, keyed by QatScales.key()."""

    def __init__(self, cfg: SweepConfig, inp: _Inputs):
        self.cfg, self.inp = cfg, inp
        self.made: dict[tuple, Any] = {}

    def key(self, row: GridRow) -> str | None:
        from calib.cache import cache_key

        if row.qat is not None:
            return self.inp.qat[row.name].key()
        spec = row.calibration_spec(self.cfg.calib_num, self.cfg.seed, self.cfg.feature_settings)
        if spec is None:
            return None
        inp = self.inp
        return cache_key(spec.method, spec.settings(inp.wordpiece.digest),
                         min(spec.calib_num, len(inp.calib_squad.examples)), inp.loaded.digest,
                         inp.calib_squad.digest, __version__)

    def get(self, row: GridRow, key: str):
        from calib.cache import default_cache_path
        from calib.calibrate import calibrate

        if row.qat is not None:  # learned by QAT: nothing to calibrate
            return self.inp.qat[row.name]
        cfg, inp, ident = self.cfg, self.inp, (row.method, row.percentile, row.smooth)
        if ident not in self.made:
            spec = row.calibration_spec(cfg.calib_num, cfg.seed, cfg.feature_settings)
            t0 = time.perf_counter()
            path = default_cache_path(key)
            run = calibrate(inp.calib_squad, inp.loaded, inp.wordpiece, spec, device=cfg.device,
                            batch_size=64 if cfg.device.type == "cuda" else 16, output=path,
                            eval_squad=inp.eval_squad, feature_cache=cfg.feature_cache, progress=cfg.progress)
            if run.cache.key() != key:  # the key this sweep predicted must be the one calibrate used
                raise RuntimeError(f"calibration key mismatch: {run.cache.key()} != {key}")
            cfg.say(f"  calibration {describe_calibration(run.cache)}: " +
                    (f"reused cache {path}" if run.reused else f"{time.perf_counter() - t0:.1f} s, cache {path}"))
            self.made[ident] = run.cache
        return self.made[ident]


def _engine_file(cfg: SweepConfig, inp: _Inputs, row: GridRow, policy, calib: Callable[[], Any],
                 ckey: str | None, force: bool = False) -> tuple[Path, str]:
    """The row's engine file, reused when built from the same inputs, else (re)built with the calibration
    `calib()` gives; and what happened."""
    from eval.runnables import build_engine_file

    engine_path = Path(cfg.report_dir) / "engines" / f"{row.name}.engine"
    mismatch = "--force" if force and engine_path.exists() else (
        _engine_mismatch(engine_path, model_digest=inp.loaded.digest, calibration_key=ckey, policy=policy,
                         profiles=cfg.profiles, device=cfg.device, tokenizer=inp.wordpiece.tokenizer.to_str())
        if engine_path.exists() else None)
    if engine_path.exists() and mismatch is None:
        return engine_path, f"engine {engine_path} reused"
    header, _ = build_engine_file(engine_path, inp.loaded, policy, cfg.profiles, calib() if policy.quantized else None,
                                  cfg.device, inp.wordpiece)
    return engine_path, ((f"engine rebuilt ({mismatch})" if mismatch else "engine built") +
                         f" in {header.build_seconds:.2f} s")


def _measure_row(cfg: SweepConfig, inp: _Inputs, calibrations: _Calibrations, row: GridRow, policy,
                 ckey: str | None, base_result: BuildResult | None) -> tuple[BuildResult, float, str]:
    """Calibrate (once per method), build (or reuse) the row's engine, evaluate and time it (eval.measure): its
    result, the seconds it took and the line that says so."""
    from eval.runnables import engine_file_build

    t0 = time.perf_counter()
    calib = calibrations.get(row, ckey) if ckey else None
    engine_path, built = _engine_file(cfg, inp, row, policy, lambda: calib, ckey, force=cfg.force)
    build = replace(engine_file_build(engine_path, cfg.device, max_seq_length=cfg.feature_settings.max_seq_length),
                    name=row.name, batch=inp.eval_batch, options=policy.describe(),
                    calibration=describe_calibration(calib))
    m = measure(build, inp.questions, cfg.profiles, iterations=cfg.bench_iterations, warmup=cfg.bench_warmup,
                is_baseline=row is inp.baseline, report_dir=cfg.report_dir, tolerance=cfg.timing_tolerance)
    seconds = time.perf_counter() - t0
    del build
    release(cfg.device)
    r = m.result
    delta = (" (baseline)" if row is inp.baseline else
             f" (ΔF1 {delta_f1(r, base_result):+.2f})" if base_result is not None else "")
    return r, seconds, (f"EM {r.exact_match:.2f} F1 {r.f1:.2f}{delta}; {latency_line(r.latency)}; {built}, "
                        f"evaluated in {m.eval_s:.1f} s, timed in {m.time_s:.1f} s; {seconds:.1f} s")


def _retime_row(cfg: SweepConfig, inp: _Inputs, calibrations: _Calibrations, row: GridRow, policy,
                ckey: str | None, result: BuildResult) -> tuple[BuildResult, str]:
    """A stored row's accuracy kept, its profiles timed again on this machine (its engine reused or rebuilt)."""
    from eval.runnables import engine_file_build

    engine_path, built = _engine_file(cfg, inp, row, policy, lambda: calibrations.get(row, ckey) if ckey else None,
                                      ckey)
    build = engine_file_build(engine_path, cfg.device, max_seq_length=cfg.feature_settings.max_seq_length)
    t0 = time.perf_counter()
    latency = time_profiles(build.forward, cfg.profiles, build.vocab_size, cfg.device, cfg.bench_iterations,
                            cfg.bench_warmup, tolerance=cfg.timing_tolerance)
    seconds = time.perf_counter() - t0
    del build
    release(cfg.device)
    return (replace(result, latency=latency, engine_bytes=engine_path.stat().st_size),
            f"{latency_line(latency)}; {built}, timed in {seconds:.1f} s")


def _tolerance(cfg: SweepConfig) -> float:
    from eval.benchmark import STABLE_DEFAULTS

    return cfg.timing_tolerance or STABLE_DEFAULTS["cuda" if cfg.device.type == "cuda" else "cpu"][0]


def _selection(cfg: SweepConfig) -> tuple[int, int]:
    return tuple(cfg.selection_profile) if cfg.selection_profile else max(
        map(tuple, cfg.profiles), key=lambda p: (p[0] * p[1], p[0], p[1]))


def _timing_check(cfg: SweepConfig, inp: _Inputs, calibrations: _Calibrations, results: list[BuildResult],
                  timed_now: set[str], stored: dict[str, tuple]) -> str | None:
    """The baseline timed again at the selection profile once every row is done. When it moved by more than twice
    the timing tolerance, the machine's load changed during the sweep: every row timed in this run (and the
    baseline) is timed again, and the baseline checked once more; if it still moves, those rows are marked not
    stable (a figure that is not stable ties with every build, eval.report) and stored so, and a rerun re-times
    them. Returns the line that says what it found (None when nothing was timed in this run)."""
    from eval.runnables import engine_file_build

    base_i = next(i for i, r in enumerate(inp.rows) if r is inp.baseline)
    engine_path = Path(cfg.report_dir) / "engines" / f"{inp.baseline.name}.engine"
    profile = _selection(cfg)
    if not timed_now or not engine_path.exists() or results[base_i].latency_at(profile) is None:
        return None

    def drift() -> tuple[float, str]:
        build = engine_file_build(engine_path, cfg.device, max_seq_length=cfg.feature_settings.max_seq_length)
        now = time_profiles(build.forward, [profile], build.vocab_size, cfg.device, cfg.bench_iterations,
                            cfg.bench_warmup, tolerance=cfg.timing_tolerance)[0]
        del build
        release(cfg.device)
        before = results[base_i].latency_at(profile)
        return (abs(now.median_ms - before.median_ms) / min(now.median_ms, before.median_ms),
                f"the baseline {inp.baseline.name} at {profile_label(profile)}: {before.median_ms:.3f} ms when "
                f"timed, {now.median_ms:.3f} ms at the end")

    moved, where = drift()
    if moved <= 2 * _tolerance(cfg):
        return f"timing check: {where} (±{moved:.0%}): the machine held steady"
    again = [i for i, r in enumerate(inp.rows) if r.name in timed_now | {inp.baseline.name}]
    cfg.say(f"timing check: {where} (±{moved:.0%}): the machine's load changed during the sweep; timing the "
            f"{len(again)} rows of this run again")
    for i in again:
        row = inp.rows[i]
        results[i], line = _retime_row(cfg, _row_inputs(cfg, inp, row), calibrations, row, row.policy(cfg.half),
                                       calibrations.key(row), results[i])
        key, tkey, seconds = stored[row.name]
        store_row(row_path(Path(cfg.report_dir), row.name), key, results[i], seconds, tkey)
        cfg.say(f"  {row.name}: {line}")
    moved, where = drift()
    if moved <= 2 * _tolerance(cfg):
        return (f"timing check: the machine's load changed during the sweep: the {len(again)} rows timed in this "
                f"run were timed again, then {where} (±{moved:.0%}): steady")
    for i in again:
        r = results[i]
        results[i] = replace(r, latency=tuple(replace(lat, stable=False, spread=round(max(lat.spread or 0, moved), 4))
                                              for lat in r.latency))
        key, tkey, seconds = stored[r.name]
        store_row(row_path(Path(cfg.report_dir), r.name), key, results[i], seconds, tkey)
    return (f"timing check: the machine's load changed during the sweep and still does ({where}, ±{moved:.0%}, after "
            f"timing the {len(again)} rows of this run again): they are marked not stable, so they tie with every "
            "build (the higher F1 wins); rerun on a quiet machine to time them again")


def run_sweep(cfg: SweepConfig) -> SweepResult:
    """Run (or resume) the sweep of `cfg.grid` and write the report; see the module doc. Interrupted (Ctrl-C), it
    says where the finished rows are and how to resume."""
    try:
        return _sweep(cfg)
    except KeyboardInterrupt:
        cfg.say(f"finished rows are stored in {Path(cfg.report_dir) / 'rows'}: "
                + ("rerun the same command without --force to resume (with --force every row is recomputed)"
                   if cfg.force else "rerun the same command to resume"))
        raise


def _sweep(cfg: SweepConfig) -> SweepResult:
    if cfg.distributed is not None:  # --workers/--ray: the rows as Ray tasks (Ray is imported only there)
        from eval.distributed import distributed_sweep

        return distributed_sweep(cfg)
    inp = _load_inputs(cfg)
    report_dir, rows, baseline, n = Path(cfg.report_dir), inp.rows, inp.baseline, len(inp.rows)
    cfg.say(f"sweep: {n} builds of {inp.loaded.source} on {cfg.device.type}; evaluating on "
            f"{len(inp.questions.examples):,} questions of {inp.eval_squad.path}; profiles "
            f"{', '.join(profile_label(p, 'x') for p in cfg.profiles)}; report in {report_dir}")
    dev_desc, machine = device_description(cfg.device), machine_key(cfg.device)
    tkey = timing_key(machine, (cfg.bench_iterations, cfg.bench_warmup), _tolerance(cfg))
    calibrations = _Calibrations(cfg, inp)
    results: list[BuildResult] = []
    reused: list[str] = []
    computed: list[str] = []
    timed_now: set[str] = set()
    stored: dict[str, tuple] = {}  # row name -> (key, timing key, seconds): what the timing check re-stores
    base_result: BuildResult | None = None
    t_sweep = time.perf_counter()
    for i, row in enumerate(rows, 1):
        rinp = _row_inputs(cfg, inp, row)  # a QAT row's own model, dropped after the row
        policy, ckey = row.policy(cfg.half), calibrations.key(row)
        key = _row_key_for(cfg, inp, rinp, policy, ckey, dev_desc)
        stored_at = row_path(report_dir, row.name)
        result, why, retime = (None, None, None) if cfg.force else stored_row(stored_at, key, tkey)
        measured_now = result is None or retime is not None
        if result is not None and retime is not None:
            cfg.say(f"[{i}/{n}] row {row.name}: finished earlier, its accuracy reused (EM {result.exact_match:.2f}, "
                    f"F1 {result.f1:.2f}); {retime}: timing it again")
            t0 = time.perf_counter()
            result, line = _retime_row(cfg, rinp, calibrations, row, policy, ckey, result)
            result = replace(result, is_baseline=row is baseline)
            store_row(stored_at, key, result, time.perf_counter() - t0, tkey)
            stored[row.name] = (key, tkey, time.perf_counter() - t0)
            cfg.say(f"[{i}/{n}] {row.name}: re-timed: {line}")
            reused.append(row.name)
            timed_now.add(row.name)
        elif result is not None:
            result = replace(result, is_baseline=row is baseline)
            cfg.say(f"[{i}/{n}] row {row.name}: finished earlier, reusing its result "
                    f"(EM {result.exact_match:.2f}, F1 {result.f1:.2f})")
            reused.append(row.name)
        else:
            if why:
                cfg.say(f"[{i}/{n}] row {row.name}: {why}: recomputing")
            result, seconds, line = _measure_row(cfg, rinp, calibrations, row, policy, ckey, base_result)
            store_row(stored_at, key, result, seconds, tkey)
            stored[row.name] = (key, tkey, seconds)
            cfg.say(f"[{i}/{n}] {row.name}: {line}")
            computed.append(row.name)
            timed_now.add(row.name)
        results.append(result)
        if row is baseline:
            base_result = result
        if measured_now and cfg.on_row_done is not None:
            cfg.on_row_done(row.name)
        if row.name not in stored:
            stored[row.name] = (key, tkey, 0.0)
        del rinp
    check = _timing_check(cfg, inp, calibrations, results, timed_now, stored)
    if check:
        cfg.say(check)
    return _finish(cfg, inp, results, reused, computed, t_sweep, check, retimed=len(timed_now & set(reused)))


def _row_key_for(cfg: SweepConfig, inp: _Inputs, rinp: _Inputs, policy, ckey: str | None, device: dict) -> dict:
    """The row's `row_key` from the sweep's inputs and `rinp` (its own: a QAT row's folder), on `device`."""
    return row_key(model_digest=rinp.loaded.digest, calibration_key=ckey, policy=policy, profiles=cfg.profiles,
                   eval_digest=inp.eval_squad.digest, eval_limit=cfg.eval_limit,
                   n_questions=len(inp.questions.examples), feature_settings=cfg.feature_settings,
                   answer_settings=inp.questions.answer_settings, device=device, tokenizer_digest=inp.wordpiece.digest)


def _finish(cfg: SweepConfig, inp: _Inputs, results: list[BuildResult], reused: list[str], computed: list[str],
            t_sweep: float, check: str | None = None, retimed: int = 0, failed: dict[str, str] | None = None,
            more: dict[str, str] | None = None) -> SweepResult:
    """The report of every row (rows stored for builds not in this grid are named, and left out); `failed` rows
    (distributed, failed twice) are listed in the report's provenance, `more` added to it."""
    report_dir = Path(cfg.report_dir)
    extra = sorted(p.stem for p in (report_dir / "rows").glob("*.json") if p.stem not in {r.name for r in inp.rows})
    if extra:
        cfg.say(f"{report_dir / 'rows'} also holds {', '.join(extra)}: not in this grid, left out of the report")
    calib = (f"{inp.calib_squad.path} (sha256 {inp.calib_squad.digest[:12]}), {cfg.calib_num} questions drawn with "
             f"seed {cfg.seed}" if inp.calib_squad is not None else None)
    meta = provenance(cfg.device, model=f"{inp.loaded.source} (sha256 {inp.loaded.digest[:12]})",
                      data=f"{inp.eval_squad.path} (sha256 {inp.eval_squad.digest[:12]}), "
                           f"{len(inp.questions.examples):,} questions", calibration_data=calib)
    meta["timing"] = timing_policy(cfg.device, cfg.bench_iterations, cfg.bench_warmup, cfg.timing_tolerance)
    if check:
        meta["timing check"] = check.removeprefix("timing check: ")
    meta.update(more or {})
    if failed:
        meta["failed rows"] = "; ".join(f"{name} ({why})" for name, why in failed.items()) + " (rerun to retry)"
    report = build_report(results, cfg.max_f1_drop, cfg.selection_profile, meta)
    files = write_report_dir(report, report_dir)
    cfg.say(f"sweep done in {time.perf_counter() - t_sweep:.1f} s: {len(computed)} rows measured, {len(reused)} "
            f"reused{f' ({retimed} of them timed again)' if retimed else ''}; wrote "
            f"{', '.join(str(p) for p in files.values())}")
    return SweepResult(report, tuple(results), tuple(reused), tuple(computed), tuple(inp.skipped), files,
                       dict(failed or {}))


def final_lines(result: SweepResult, report_dir: str | Path) -> str:
    """The table, the rule and verdict, and the build to ship with its engine file."""
    chosen = result.report.chosen
    engine = Path(report_dir) / "engines" / f"{chosen.name}.engine"
    failed = "".join(f"FAILED: {name}: {why} (not in the table; rerun to retry)\n"
                     for name, why in result.failed.items())
    return (render_text(result.report) + failed +
            f"build to ship: {chosen.name} ({chosen.options}; calibration {chosen.calibration}): {engine}\n")


__all__ = ["sweep_from_flags", "CALIBRATION_METHODS", "DEFAULT_CALIB_SQUAD", "DEFAULT_EVAL_SQUAD", "DEFAULT_MODEL",
           "DEFAULT_REPORT_DIR", "DESCRIPTION", "DEVICE_DEFAULTS", "DeviceDefaults", "DeviceSettings", "EXAMPLES",
           "GridRow", "METHODS", "OPTION_SETS", "SweepConfig", "SweepResult", "baseline_row", "check_grid",
           "config_from_flags", "cpu_notice", "default_grid", "device_settings", "final_lines", "load_grid",
           "pair_profiles", "qat_rows", "read_qat_folder", "row_key", "run_sweep", "select_rows", "shown",
           "stored_row", "store_row"]


def sweep_from_flags(flags) -> str:
    """`cli.py sweep`: the config its flags describe (with the CPU notice on stdout first), run; the closing lines."""
    from eval.measure import settings_from_flags

    cfg, notice = config_from_flags(flags, *settings_from_flags(flags))
    if notice:
        print(notice, flush=True)
    return final_lines(run_sweep(cfg), flags.report_dir).rstrip("\n")
