"""Sensitivity analysis (`cli.py sensitivity`): which INT8 GEMMs cost the most F1, and a mixed-precision build
that keeps the worst of them out of INT8, measured like any other build.

The unit is the policy's unit of mixed precision, one encoder GEMM ("layer3.fc2": its input site and its weights,
`quant.policy.PrecisionPolicy.fp16_gemms`). Every variant is a real engine (engines.build.build_engine +
engines.runtime.Engine, a GraphRunner on CUDA) evaluated by eval.measure on the same questions (featurized once):

    baseline        the build without INT8 at the same precision (FP16 on CUDA, FP32 on the CPU)
    all-int8        every GEMM INT8 (with -iln/-imh when asked)
    options-only    with -iln/-imh only: no GEMM INT8, just the -iln/-imh points (their own cost: the floor)
    only:layerI.K   exactly one GEMM INT8 (every other one in --keep-fp16): its F1 drop against the baseline
    only:layerI     the four GEMMs of one layer INT8 (a row of the heat-map as one group)
    only:K          GEMM kind K INT8 in every analysed layer (a column as one group; `--keep-fp16 K` keeps it)
    all-but:...     with --leave-one-out: all INT8 but that GEMM; F1 recovered against all-int8

The suggestion is greedy and says what it is: each GEMM's cost is its single-point drop (above the floor; a gain
counts as 0, it is noise on few questions, not a credit), the estimated drop of a build is the sum of the costs of
the GEMMs it leaves in INT8 (plus the floor), and the costliest GEMMs are kept out of INT8 until that estimate fits
--max-f1-drop. The suggested policy is then built and evaluated, and the report gives the *measured* F1 and ΔF1;
when the measurement misses the budget (interactions the sum does not see), the next costliest GEMM is kept too
and measured again, at most `refine` times. The sum overstates more often than not (single drops clipped at 0, and
errors that do not add up: all-INT8 can cost less than the sum), so the greedy keeps more than needed: once a
measured list is within the budget, kept GEMMs go back to INT8 one build at a time, cheapest first, each change
kept only when its measured drop still fits (at most `trim` builds). The suggestion is the last list measured
within the budget, the smallest one; `tried` lists every list measured and what it decided. A list measured
before (all-INT8 is the empty one) is never built again. When all-INT8 is already within the budget nothing is
kept.

Files (atomically) in the report folder: sensitivity.md (the tables), sensitivity.json (every number; read it
back with `load_result`), sensitivity.png (the heat-map of single-GEMM ΔF1, layers x kinds) and, with
--leave-one-out, leave-one-out.png (ΔF1 against all-INT8: F1 recovered).

One sign convention in everything a person reads (stdout, stderr, sensitivity.md, the heat-maps): ΔF1, a build's
F1 minus its reference's, negative = worse. Internally (and in sensitivity.json, whose keys say so:
`only_f1_drop`, `group_f1_drop`, `matrix_f1_drop`) a GEMM's cost is its drop, baseline F1 minus its F1.

With --fp8 the same analysis runs on FP8 builds: every variant quantizes its GEMMs in FP8 E4M3 instead of INT8
(`cli.py build --fp8`, scales from the same cache; plain FP8 builds only), the text says FP8, the suggestion's
command builds --fp8, and the variant names and JSON keys keep "int8" as the name of the quantized role (all-fp8
is the all-quantized build's name; its method, and the JSON's `all_int8`, stay).
"""
from __future__ import annotations

import logging
import math
import re
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

from quant.policy import GEMMS, PrecisionPolicy
from common.errors import WorkbenchError
from common.files import atomic_write_json, atomic_write_text, read_json
from common.version import __version__
from eval.report import F1_TOLERANCE

if TYPE_CHECKING:
    import torch

FORMAT = "bert-int8-workbench sensitivity"
FORMAT_VERSION = 1
DEFAULT_REPORT_DIR = "sensitivity-report"
DEFAULT_MAX_F1_DROP = 1.0
DEFAULT_REFINE = 2
DEFAULT_TRIM = 4
COSTS = 0.005           # a single-GEMM drop that prints as a cost (ΔF1 -0.01 or worse); below it is not "sensitive"
CPU_LIMIT = 50          # questions evaluated on the CPU unless told (CUDA: all of them)
FILES = {"markdown": "sensitivity.md", "json": "sensitivity.json", "heatmap": "sensitivity.png",
         "leave_one_out": "leave-one-out.png"}
OPTION_SETS: dict[str, tuple[bool, bool]] = {"plain": (False, False), "iln": (True, False), "imh": (False, True),
                                             "iln-imh": (True, True)}


# `cli.py sensitivity --help` (cli.py imports this module only to show it)
DESCRIPTION = (
    "which INT8 GEMMs cost the most F1: quantize one GEMM at a time, show a layer x kind table and heat-map, and "
    "suggest (then build and measure) a mixed-precision build. Every variant is an engine built in memory from "
    "--model and --calib-cache and evaluated on the same questions (featurized once): the baseline without INT8 at "
    "the same precision; all INT8; for each GEMM (layerN.qkv, attn_out, fc1, fc2) a build where only it is INT8 "
    "(the others kept out, as --keep-fp16 does), whose F1 drop against the baseline is its sensitivity; each whole "
    "layer and each GEMM kind as one group (--no-groups skips them); with --leave-one-out also all-INT8-but-one "
    "builds (F1 recovered); with -iln/-imh those points stay INT8 in every variant and their own cost is measured "
    "too. The suggestion keeps the GEMMs with the largest single-GEMM drops out of INT8 until the estimated drop "
    "(the sum of the single-GEMM drops left in INT8) fits --max-f1-drop, then builds and evaluates it and reports "
    "its measured F1 and the `cli.py build --keep-fp16 ...` command that reproduces it. On the CPU it evaluates "
    "50 questions and runs the rest in FP32 unless told (it says so); on CUDA all questions in FP16. Writes "
    "sensitivity.md, sensitivity.json, sensitivity.png (and leave-one-out.png) to --report-dir. --fp8: the same "
    "analysis of FP8 E4M3 builds (one GEMM at a time in FP8 instead of INT8; a max, percentile or mse-fp8 cache).")
EXAMPLES = """examples:
  python cli.py calibrate --squad assets/squad/train-v1.1-calib-first-paragraphs.json.gz \\
      --model assets/minilm-l6-h384-squad11 -o calib.json
  python cli.py sensitivity --calib-cache calib.json          # assets/ model and dev set; CUDA if present
  python cli.py sensitivity --model DIR --calib-cache calib.json --squad dev.json --max-f1-drop 0.5 \\
      --report-dir sens/                                      # the table, sensitivity.png, sensitivity.json
  python cli.py sensitivity --calib-cache calib.json -iln --leave-one-out   # also all-but-one builds
  python cli.py sensitivity --calib-cache calib-mse-fp8.json --fp8         # which GEMMs cost F1 in FP8
  python cli.py sensitivity --calib-cache calib.json --device cpu --limit 20 --layers 0,5
  python cli.py sensitivity -c DIR -v vocab.txt --calib-cache calib.json   # TensorRT demo spellings"""


# ------------------------------------------------------------------------------------------------ names

def gemm_name(layer: int, kind: str) -> str:
    return f"layer{layer}.{kind}"


def all_gemms(num_layers: int) -> tuple[str, ...]:
    return tuple(gemm_name(i, k) for i in range(num_layers) for k in GEMMS)


def parse_layers(text: str | None, num_layers: int) -> tuple[int, ...]:
    """"0,3,5", "0-2", "all" or None (all) -> sorted layer indices, checked against the model."""
    if text is None or text.strip() == "all":
        return tuple(range(num_layers))
    out: set[int] = set()
    for part in (p.strip() for p in text.split(",")):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise WorkbenchError(f"--layers {text!r}: give layer numbers like 0,3,5 or a range 0-2 (or all)")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if lo > hi:
            raise WorkbenchError(f"--layers {text!r}: range {part} runs backwards")
        out.update(range(lo, hi + 1))
    bad = sorted(i for i in out if i >= num_layers)
    if bad:
        raise WorkbenchError(f"--layers {text!r}: layer {bad[0]} does not exist "
                             f"(the model has layers 0-{num_layers - 1})")
    return tuple(sorted(out))


def parse_options(values: Sequence[str] | None) -> tuple[bool, bool]:
    """--options: sweep option sets (plain, iln, imh, iln-imh) or the build flags (-iln, -imh) -> (iln, imh)."""
    iln = imh = False
    for value in values or ():
        for word in value.replace(",", " ").split():
            tag = word.lstrip("-")
            if tag not in OPTION_SETS:
                raise WorkbenchError(f"--options {word!r}: use {', '.join(OPTION_SETS)} (or -iln, -imh)")
            a, b = OPTION_SETS[tag]
            iln, imh = iln or a, imh or b
    return iln, imh


def compact_keep_list(keep: Iterable[str], num_layers: int) -> tuple[str, ...]:
    """GEMM names for --keep-fp16, a kind kept in every layer written once ("fc2" for layer0.fc2 ... layerN.fc2)."""
    keep = set(keep)
    out = []
    for kind in GEMMS:
        every = {gemm_name(i, kind) for i in range(num_layers)}
        if every <= keep:
            out.append(kind)
            keep -= every
    return tuple(sorted(out) + sorted(keep, key=_gemm_order))


def _gemm_order(name: str) -> tuple[int, int]:
    layer, kind = name.split(".")
    return int(layer.removeprefix("layer")), GEMMS.index(kind)


# ------------------------------------------------------------------------------------------------ variants

@dataclass(frozen=True)
class Variant:
    """One build of the analysis: `int8_gemms` are the GEMMs it quantizes, in INT8 or with `fp8` in FP8 E4M3
    (None: the baseline, nothing quantized)."""

    name: str
    method: str                          # baseline, all-int8, options-only, only, group, leave-one-out, suggested,
                                         # trim
    target: str | None                   # the GEMM (or group: "layer3", "fc2") the variant is about
    int8_gemms: tuple[str, ...] | None

    def policy(self, num_layers: int, half: bool, iln: bool, imh: bool, fp8: bool = False) -> PrecisionPolicy:
        if self.int8_gemms is None:
            return PrecisionPolicy(fp16=half)
        quantized = set(self.int8_gemms)
        keep = tuple(g for g in all_gemms(num_layers) if g not in quantized)
        return PrecisionPolicy(int8=not fp8, fp8=fp8, fp16=half, iln=iln, imh=imh, fp16_gemms=keep)


def plan_variants(num_layers: int, layers: Sequence[int] | None = None, *, floor: bool = False,
                  groups: bool = True, leave_one_out: bool = False, fp8: bool = False) -> list[Variant]:
    """Every build of the analysis, in evaluation order: baseline, all-INT8 (named all-fp8 with `fp8`; its method,
    the variant's role, stays all-int8), then the rest."""
    layers = tuple(range(num_layers)) if layers is None else tuple(layers)
    everything = all_gemms(num_layers)
    out = [Variant("baseline", "baseline", None, None),
           Variant("all-fp8" if fp8 else "all-int8", "all-int8", None, everything)]
    if floor:
        out.append(Variant("options-only", "options-only", None, ()))
    out += [Variant(f"only:{g}", "only", g, (g,)) for g in (gemm_name(i, k) for i in layers for k in GEMMS)]
    if groups:
        out += [Variant(f"only:layer{i}", "group", f"layer{i}", tuple(gemm_name(i, k) for k in GEMMS))
                for i in layers]
        if len(layers) > 1:  # with one layer, kind K in the analysed layers is that layer's K: a cell
            out += [Variant(f"only:{k}", "group", k, tuple(gemm_name(i, k) for i in layers)) for k in GEMMS]
    if leave_one_out:
        out += [Variant(f"all-but:{g}", "leave-one-out", g, tuple(x for x in everything if x != g))
                for g in (gemm_name(i, k) for i in layers for k in GEMMS)]
    return out


# ------------------------------------------------------------------------------------------------ results

@dataclass(frozen=True)
class Measurement:
    name: str
    method: str
    target: str | None
    options: str              # the policy in build-flag words
    int8_gemms: int           # how many GEMMs run in INT8
    exact_match: float
    f1: float
    n_questions: int
    build_s: float
    eval_s: float
    same_as: str | None = None  # an earlier variant with the same policy, whose numbers these are

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: Any) -> Measurement:
        return cls(**obj)


@dataclass(frozen=True)
class Attempt:
    """One keep list the suggestion built and measured, and why: the report shows every one, so that what the
    measurements decided (a GEMM kept after a miss, a GEMM returned to INT8 or restored) is not hidden."""

    keep: tuple[str, ...]            # GEMMs kept out of INT8 in this build
    measured_drop: float
    step: str = "greedy"             # greedy (the estimate's keep list), refine (one more kept), trim (one fewer)
    gemm: str | None = None          # refine: the GEMM kept too; trim: the GEMM returned to INT8
    fits: bool = False               # measured within the budget (a trim that fits is accepted, else reverted)

    def to_json(self) -> dict:
        return {"keep": list(self.keep), "measured_drop": self.measured_drop, "step": self.step, "gemm": self.gemm,
                "fits": self.fits}

    @classmethod
    def from_json(cls, obj: Any, index: int, max_f1_drop: float) -> Attempt:
        """Older files have keep and measured_drop only (greedy, then refine steps, each keeping one more)."""
        keep, drop = tuple(obj["keep"]), obj["measured_drop"]
        step = obj.get("step", "greedy" if index == 0 else "refine")
        gemm = obj.get("gemm", keep[-1] if step == "refine" and keep else None)
        return cls(keep, drop, step, gemm, obj.get("fits", drop <= max_f1_drop + F1_TOLERANCE))


@dataclass(frozen=True)
class Suggestion:
    max_f1_drop: float
    keep: tuple[str, ...]            # GEMMs kept out of INT8, costliest first
    estimated_drop: float            # floor + sum of the costs of the GEMMs left in INT8
    measured: Measurement | None     # the build with `keep` (the all-int8 measurement when nothing is kept)
    measured_drop: float | None
    fits: bool                       # the measured drop is within the budget
    tried: tuple[Attempt, ...] = ()  # every keep list measured, in order (greedy, refine, trim)
    note: str = ""
    command: str | None = None       # `cli.py build ...` that reproduces it

    def to_json(self) -> dict:
        d = asdict(self)
        d["measured"] = self.measured.to_json() if self.measured else None
        d["tried"] = [a.to_json() for a in self.tried]
        d["keep"] = list(self.keep)
        return d

    @classmethod
    def from_json(cls, obj: Any) -> Suggestion:
        obj = dict(obj)
        obj["keep"] = tuple(obj["keep"])
        obj["measured"] = Measurement.from_json(obj["measured"]) if obj.get("measured") else None
        obj["tried"] = tuple(Attempt.from_json(t, i, obj["max_f1_drop"]) for i, t in enumerate(obj.get("tried", ())))
        return cls(**obj)


@dataclass(frozen=True)
class SensitivityResult:
    settings: dict                   # model, calibration, questions, device, precision, options, layers
    layers: tuple[int, ...]          # the layers analysed (heat-map rows)
    num_layers: int
    baseline: Measurement
    all_int8: Measurement
    floor: Measurement | None        # options-only (with -iln/-imh)
    only: dict[str, float]           # GEMM -> F1 drop when it alone is INT8
    groups: dict[str, float]         # "layer3" / "fc2" -> F1 drop when that group alone is INT8
    leave_one_out: dict[str, float] | None  # GEMM -> F1 recovered when it alone stays out of INT8
    suggestion: Suggestion
    variants: tuple[Measurement, ...]

    @property
    def quantized_as(self) -> str:
        """INT8, or FP8 for an --fp8 analysis (older results: INT8)."""
        return format_word(bool(self.settings.get("fp8")))

    @property
    def all_int8_drop(self) -> float:
        return self.baseline.f1 - self.all_int8.f1

    @property
    def floor_drop(self) -> float:
        return self.baseline.f1 - self.floor.f1 if self.floor is not None else 0.0

    def matrix(self, which: str = "only") -> list[list[float]]:
        """Rows: the analysed layers; columns: qkv, attn_out, fc1, fc2."""
        values = self.only if which == "only" else (self.leave_one_out or {})
        return [[values.get(gemm_name(i, k), math.nan) for k in GEMMS] for i in self.layers]

    def ranked(self) -> list[tuple[str, float]]:
        """GEMMs that cost F1 on their own (a drop that prints as ΔF1 -0.01 or worse), worst first (ties in forward
        order); a GEMM at ΔF1 0.00 or a gain is not sensitive and is not ranked."""
        return sorted(((g, d) for g, d in self.only.items() if d >= COSTS),
                      key=lambda kv: (-kv[1], _gemm_order(kv[0])))

    def to_json(self) -> dict:
        return {
            "format": FORMAT, "format_version": FORMAT_VERSION, "workbench": __version__,
            "settings": self.settings, "layers": list(self.layers), "num_layers": self.num_layers,
            "kinds": list(GEMMS),
            "baseline": self.baseline.to_json(), "all_int8": self.all_int8.to_json(),
            "floor": self.floor.to_json() if self.floor else None,
            "only_f1_drop": self.only, "group_f1_drop": self.groups,
            "leave_one_out_f1_recovered": self.leave_one_out,
            "matrix_f1_drop": _nan_to_none(self.matrix("only")),
            "suggestion": self.suggestion.to_json(),
            "variants": [m.to_json() for m in self.variants],
        }

    @classmethod
    def from_json(cls, obj: Any, where: str = "sensitivity JSON") -> SensitivityResult:
        if not isinstance(obj, dict) or obj.get("format") != FORMAT or obj.get("format_version") != FORMAT_VERSION:
            raise WorkbenchError(f"{where}: not a sensitivity result of format version {FORMAT_VERSION}")
        try:
            return cls(settings=obj["settings"], layers=tuple(obj["layers"]), num_layers=obj["num_layers"],
                       baseline=Measurement.from_json(obj["baseline"]), all_int8=Measurement.from_json(obj["all_int8"]),
                       floor=Measurement.from_json(obj["floor"]) if obj["floor"] else None,
                       only=dict(obj["only_f1_drop"]), groups=dict(obj["group_f1_drop"]),
                       leave_one_out=None if obj["leave_one_out_f1_recovered"] is None
                       else dict(obj["leave_one_out_f1_recovered"]),
                       suggestion=Suggestion.from_json(obj["suggestion"]),
                       variants=tuple(Measurement.from_json(m) for m in obj["variants"]))
        except (KeyError, TypeError) as e:
            raise WorkbenchError(f"{where}: malformed sensitivity result ({e})") from None


def _nan_to_none(matrix: list[list[float]]) -> list[list[float | None]]:
    return [[None if math.isnan(v) else v for v in row] for row in matrix]


def load_result(path: str | Path) -> SensitivityResult:
    return SensitivityResult.from_json(read_json(path, "sensitivity JSON"), str(path))


# ------------------------------------------------------------------------------------------------ suggestion

@dataclass(frozen=True)
class GreedyPlan:
    keep: tuple[str, ...]            # kept out of INT8, costliest first
    estimated_drop: float            # floor + costs of the GEMMs left in INT8
    fits: bool                       # the estimate is within the budget
    order: tuple[str, ...]           # every GEMM, costliest first (what refinement keeps next)
    costs: dict[str, float]


def greedy_keep(drops: Mapping[str, float], max_f1_drop: float, floor: float = 0.0) -> GreedyPlan:
    """Keep the costliest GEMMs out of INT8 until the estimated drop fits `max_f1_drop`.

    cost(g) = max(0, drops[g] - floor): a GEMM's single-point drop above what the -iln/-imh points cost on their
    own; a gain counts as 0. estimate(keep) = floor + sum of the costs of the GEMMs not kept. GEMMs are taken in
    decreasing cost (ties: forward order); a GEMM of cost 0 is never kept (it cannot lower the estimate).
    """
    costs = {g: max(0.0, d - floor) for g, d in drops.items()}
    order = tuple(sorted(costs, key=lambda g: (-costs[g], _gemm_order(g))))
    estimate = floor + sum(costs.values())
    keep: list[str] = []
    for g in order:
        if estimate <= max_f1_drop + F1_TOLERANCE or costs[g] <= 0:
            break
        keep.append(g)
        estimate -= costs[g]
    estimate = max(estimate, floor)  # float rounding of the running sum
    return GreedyPlan(tuple(keep), estimate, estimate <= max_f1_drop + F1_TOLERANCE, order, costs)


# ------------------------------------------------------------------------------------------------ the run

@dataclass
class SensitivityConfig:
    model: str | Path
    calib_cache: str | Path
    squad: str | Path
    device: torch.device
    half: bool                                  # non-INT8 work in FP16 (else FP32); the baseline too
    limit: int | None
    feature_settings: Any                       # data.features.FeatureSettings
    answer_settings: Any                        # data.answers.AnswerSettings
    iln: bool = False
    imh: bool = False
    fp8: bool = False                           # --fp8: the GEMMs quantized in FP8 E4M3 instead of INT8
    layers: str | None = None                   # --layers text (None: all)
    groups: bool = True                         # per-layer and per-kind group variants
    leave_one_out: bool = False
    max_f1_drop: float = DEFAULT_MAX_F1_DROP
    refine: int = DEFAULT_REFINE                # extra builds when the suggestion misses the budget
    trim: int = DEFAULT_TRIM                    # extra builds returning kept GEMMs to INT8 when it is within
    batch_size: int | None = None               # features per forward (default 64 CUDA, 16 CPU)
    feature_cache: bool = True
    progress: bool = True
    trust_pickle: bool = False
    vocab_file: str | None = None               # -v: a vocab.txt instead of the model folder's tokenizer
    sparse: bool = False                        # the model's GEMM weights are 2:4 (run_sensitivity finds out)
    say: Callable[[str], None] = field(default=lambda line: print(line, file=sys.stderr, flush=True))
    report_dir: str | Path | None = None        # measured variants stored in REPORT_DIR/variants/ (None: not)
    distributed: Any = None                     # eval.distributed.Workers (--workers/--ray); None: this process
    force: bool = False                         # --force: measure every variant again (the store is rewritten)


VARIANT_FORMAT = "bert-int8-workbench sensitivity variant"


class _VariantStore:
    """REPORT_DIR/variants/NAME.json: each variant measured, with a key of everything its numbers depend on (the
    run's `base` key and the variant's policy), written atomically as it is measured. A rerun, or a distributed
    run whose driver was killed, measures only the variants not stored under an equal key; with `force` (--force)
    nothing stored is read, and each variant measured replaces its file."""

    def __init__(self, report_dir: str | Path, base: dict, force: bool = False):
        self.folder, self.base, self.force = Path(report_dir) / "variants", base, force

    def _path(self, v: Variant) -> Path:
        return self.folder / f"{v.name.replace(':', '_')}.json"

    def _key(self, policy: PrecisionPolicy) -> dict:
        import json

        return json.loads(json.dumps({**self.base, "policy": asdict(policy)}, sort_keys=True))

    def get(self, v: Variant, policy: PrecisionPolicy) -> Measurement | None:
        path = self._path(v)
        if self.force or not path.exists():
            return None
        try:
            obj = read_json(path, "stored variant")
            if obj.get("format") != VARIANT_FORMAT or obj.get("key") != self._key(policy):
                return None
            m = Measurement.from_json(obj["measurement"])
        except (WorkbenchError, AttributeError, KeyError, TypeError):
            return None
        return replace(m, name=v.name, method=v.method, target=v.target, same_as=None)

    def put(self, v: Variant, policy: PrecisionPolicy, m: Measurement) -> None:
        atomic_write_json(self._path(v), {"format": VARIANT_FORMAT, "key": self._key(policy),
                                          "measurement": m.to_json()})


class _Evaluator:
    """Builds each variant's engine in memory and measures it (eval.measure, accuracy only) on questions featurized
    once; a policy already measured is not built again."""

    def __init__(self, cfg: SensitivityConfig, loaded, calib, questions, store: _VariantStore | None = None,
                 remote: Any = None):
        """`store`: variants measured earlier are taken from it, and each one measured is put there; `remote`
        (eval.distributed.RemoteBuilds): builds run as Ray tasks instead of here."""
        from engines.engine_file import Profile

        self.cfg, self.loaded, self.calib, self.questions = cfg, loaded, calib, questions
        self.store, self.remote, self.reused = store, remote, set()
        self.device = cfg.device
        self.batch = cfg.batch_size or (64 if self.device.type == "cuda" else 16)
        self.profiles = [Profile(self.batch, cfg.feature_settings.max_seq_length)]
        self.timing = None
        if self.device.type == "cuda":
            from common.files import cache_root
            from engines.tuning import TimingCache

            self.timing = TimingCache(cache_root() / "timing.json")  # kernel timings shared with `cli.py build`
        self.seen: dict[PrecisionPolicy, Measurement] = {}

    def policy(self, v: Variant) -> PrecisionPolicy:
        cfg = self.cfg
        return v.policy(self.loaded.config.num_layers, cfg.half, cfg.iln, cfg.imh, cfg.fp8)

    def measure(self, v: Variant) -> Measurement:
        """The variant's numbers: those of its policy measured before (`same_as`), stored, or built now."""
        policy = self.policy(v)
        if policy in self.seen:
            m = self.seen[policy]
            return replace(m, name=v.name, method=v.method, target=v.target, build_s=0.0, eval_s=0.0,
                           same_as=m.same_as or m.name)
        m = self.remote.ready.pop(v.name, None) if self.remote is not None else None  # prefetched, stored
        if m is None and self.store is not None and (m := self.store.get(v, policy)) is not None:
            self.reused.add(v.name)
        elif m is None:
            m = self.remote.measure(v) if self.remote is not None else self._build_and_measure(v, policy)
            if self.store is not None:
                self.store.put(v, policy, m)
        self.seen[policy] = m
        return m

    def prefetch(self, variants: Sequence[Variant]) -> None:
        """With `remote`: every variant whose policy is neither measured nor stored (the first of each policy)
        measured at once, in parallel, each stored as it arrives; `measure` then takes them."""
        if self.remote is None:
            return
        todo, policies = [], set(self.seen)
        for v in variants:
            policy = self.policy(v)
            if policy not in policies and (self.store is None or self.store.get(v, policy) is None):
                policies.add(policy)
                todo.append(v)
        self.remote.run(todo, lambda v, m: self.store.put(v, self.policy(v), m) if self.store else None)

    def _build_and_measure(self, v: Variant, policy: PrecisionPolicy) -> Measurement:
        from engines.build import build_engine
        from engines.runtime import Engine
        from eval.measure import measure, release
        from eval.runnables import engine_build

        n_int8 = len(v.int8_gemms) if v.int8_gemms is not None else 0
        t0 = time.perf_counter()
        with _grid_warning_said():
            header, tensors = build_engine(self.loaded, policy, self.profiles,
                                           self.calib if policy.quantized else None, self.device, None, self.timing)
        engine = Engine(header, tensors, self.device).eval()
        build_s = time.perf_counter() - t0
        build = engine_build(engine, v.name, batch=self.batch, build_s=build_s)
        measured = measure(build, self.questions, progress=False)
        del build, engine, tensors
        release(self.device)
        score = measured.score
        return Measurement(v.name, v.method, v.target, describe(policy, self.loaded.config.num_layers), n_int8,
                           score.exact_match, score.f1, score.n, round(build_s, 3), round(measured.eval_s, 3))


@contextmanager
def _grid_warning_said():
    """calib.spec warns when the cache picked its ranges for the other format's grid (an mse cache under --fp8):
    said once before the builds (_check_calibration), not again by each of the analysis' builds."""
    logger = logging.getLogger("calib.spec")
    before, logger.disabled = logger.disabled, True
    try:
        yield
    finally:
        logger.disabled = before


def device_settings(device: torch.device, *, limit: str | int | None = None,
                    precision: str | None = None) -> tuple[int | None, bool]:
    """`cli.py sensitivity`'s --limit and --precision (None: not given) on `device`: (questions, half). The CPU
    evaluates CPU_LIMIT questions in FP32 unless told; CUDA all of them in FP16."""
    from data.squad import parse_question_limit

    questions = ((CPU_LIMIT if device.type == "cpu" else None) if limit is None else parse_question_limit(limit))
    return questions, device.type == "cuda" if precision is None else precision == "fp16"


def cpu_notice(device: torch.device, limit: int | None, *, limit_given: bool, precision_given: bool,
               device_given: bool = False, fp8: bool = False) -> str | None:
    """On the CPU, what the analysis does that a GPU run would not (for what the flags left to the defaults)."""
    if device.type != "cpu" or (limit_given and precision_given):
        return None
    said = [f"the first {limit} questions (--limit; CUDA's default is all of them)" if not limit_given else None,
            f"FP32 for what is not {format_word(fp8)} (--precision; FP16 on CUDA)" if not precision_given else None]
    coarse = (" F1 differences on so few questions are coarse: read the ranking, not the decimals."
              if limit is not None and limit <= 500 else "")
    return f"on the CPU{'' if device_given else ' (no CUDA GPU)'}: {'; '.join(s for s in said if s)}.{coarse}"


def config_from_flags(flags, feature_settings, answer_settings) -> tuple[SensitivityConfig, str | None]:
    """`cli.py sensitivity`'s parsed flags (an argparse.Namespace: model, calib_cache, squad, limit, iln, imh, fp8,
    options, layers, leave_one_out, no_groups, max_f1_drop, refine, trim, report_dir, device, precision,
    batch_size, no_cache, no_progress, trust_pickle, vocab_file, workers, ray, force) as a SensitivityConfig, and
    the notice of what a CPU run does differently (None on CUDA, or when the flags said it all)."""
    from eval.distributed import device_and_workers

    iln, imh = parse_options(flags.options)
    iln, imh, fp8 = flags.iln or iln, flags.imh or imh, bool(getattr(flags, "fp8", False))
    if fp8 and (iln or imh):
        raise WorkbenchError("sensitivity --fp8 analyses plain FP8 builds: drop -iln/-imh, or analyse INT8 builds")
    device, workers = device_and_workers(flags)
    limit, half = device_settings(device, limit=flags.limit, precision=flags.precision)
    notice = cpu_notice(device, limit, limit_given=flags.limit is not None,
                        precision_given=flags.precision is not None, device_given=bool(flags.device), fp8=fp8)
    report_dir = Path(flags.report_dir)
    if report_dir.exists() and not report_dir.is_dir():
        raise WorkbenchError(f"{report_dir}: --report-dir is a file, expected a directory")
    return SensitivityConfig(
        model=flags.model, calib_cache=flags.calib_cache, squad=flags.squad, device=device, half=half, limit=limit,
        feature_settings=feature_settings, answer_settings=answer_settings, iln=iln, imh=imh, fp8=fp8,
        layers=flags.layers, groups=not flags.no_groups, leave_one_out=flags.leave_one_out,
        max_f1_drop=flags.max_f1_drop, refine=flags.refine, trim=flags.trim, batch_size=flags.batch_size,
        feature_cache=not flags.no_cache, progress=not flags.no_progress, trust_pickle=flags.trust_pickle,
        vocab_file=getattr(flags, "vocab_file", None), report_dir=flags.report_dir, distributed=workers,
        force=flags.force), notice


def describe(policy: PrecisionPolicy, num_layers: int) -> str:
    """The policy's build flags, the --keep-fp16 list shortened to a count of INT8 (or FP8) GEMMs."""
    words = replace(policy, fp16_gemms=()).describe()
    if policy.quantized and policy.fp16_gemms:
        n = sum(policy.quantizes_gemm(i, k) for i in range(num_layers) for k in GEMMS)
        words += f" ({n} of {num_layers * len(GEMMS)} GEMMs {format_word(policy.fp8)})"
    return words


def format_word(fp8: bool) -> str:
    """The format the analysed GEMMs are quantized to, as every line a person reads names it."""
    return "FP8" if fp8 else "INT8"


def check_budget(max_f1_drop: float) -> float:
    if not (isinstance(max_f1_drop, (int, float)) and math.isfinite(max_f1_drop) and max_f1_drop >= 0):
        raise WorkbenchError(f"--max-f1-drop {max_f1_drop!r}: must be a finite number of F1 points >= 0")
    return float(max_f1_drop)


def _check_config(cfg: SensitivityConfig) -> None:
    check_budget(cfg.max_f1_drop)
    if cfg.limit is not None and cfg.limit < 1:
        raise WorkbenchError(f"--limit must be at least 1 (or all), got {cfg.limit}")
    if cfg.refine < 0:
        raise WorkbenchError(f"--refine must be at least 0, got {cfg.refine}")
    if cfg.trim < 0:
        raise WorkbenchError(f"--trim must be at least 0, got {cfg.trim}")
    if cfg.batch_size is not None and cfg.batch_size < 1:
        raise WorkbenchError(f"--batch-size must be at least 1, got {cfg.batch_size}")


def _measure_all(cfg: SensitivityConfig, ev: _Evaluator, variants: Sequence[Variant]) -> dict[str, Measurement]:
    """Every planned variant measured, one line each (under the progress bar when there is one)."""
    from tqdm import tqdm

    measured: dict[str, Measurement] = {}
    with tqdm(variants, desc="sensitivity", unit="build", disable=not cfg.progress, file=sys.stderr,
              leave=False) as bar:
        for v in bar:
            bar.set_postfix_str(v.name)
            m = ev.measure(v)
            measured[v.name] = m
            base = measured.get("baseline")
            delta = f" (ΔF1 {m.f1 - base.f1:+.2f})" if base is not None and v.method != "baseline" else ""
            how = (f"same build as {m.same_as}" if m.same_as else "finished earlier, reused" if v.name in ev.reused
                   else f"built {m.build_s:.1f} s, evaluated {m.eval_s:.1f} s")
            line = f"  {v.name}: EM {m.exact_match:.2f} F1 {m.f1:.2f}{delta}; {how}"
            if cfg.progress:
                bar.write(line, file=sys.stderr)
            else:
                cfg.say(line)
    return measured


def run_sensitivity(cfg: SensitivityConfig) -> SensitivityResult:
    """Measure every variant (see the module doc) and the suggestion; returns the numbers (write them with
    `write_report`)."""
    from calib.cache import load_cache
    from calib.calibrate import check_fits, load_calibration_model
    from calib.sparsity import gemm_sparsity
    from data.squad import load_squad
    from eval.compare import describe_calibration
    from eval.measure import Questions

    _check_config(cfg)
    calib = load_cache(cfg.calib_cache)
    loaded, wordpiece = load_calibration_model(cfg.model, trust_pickle=cfg.trust_pickle, vocab_file=cfg.vocab_file)
    check_fits(loaded, cfg.feature_settings)
    num_layers = loaded.config.num_layers
    layers = parse_layers(cfg.layers, num_layers)
    squad = load_squad(cfg.squad, limit=cfg.limit)
    # A 2:4 model (`cli.py prune`): the analysis is of 2:4 + INT8, and the suggested build is --sparse. The
    # variants are built dense: a --sparse build runs the same function (its 2:4 kernels, where the build times
    # them faster, on the same weights), and the analysis measures accuracy only.
    cfg = replace(cfg, answer_settings=replace(cfg.answer_settings,
                                               version_2_with_negative=squad.version.startswith("2")),
                  sparse=gemm_sparsity(loaded.model, num_layers).all_sparse)
    floor = cfg.iln or cfg.imh
    variants = plan_variants(num_layers, layers, floor=floor, groups=cfg.groups, leave_one_out=cfg.leave_one_out,
                             fp8=cfg.fp8)
    _check_calibration(loaded, calib, variants[1].policy(num_layers, cfg.half, cfg.iln, cfg.imh, cfg.fp8),
                       cfg.feature_settings.max_seq_length)

    t_start = time.perf_counter()
    questions = Questions(squad.examples, squad.version, cfg.feature_settings, cfg.answer_settings,
                          wordpiece=wordpiece, cache=cfg.feature_cache, progress=cfg.progress)
    features, _ = questions.featurized()
    ev = _evaluator(cfg, loaded, calib, questions, squad)
    precision = "fp16" if cfg.half else "fp32"
    cfg.say(f"sensitivity: {len(variants)} builds of {loaded.source} ({num_layers} layers, layers "
            f"{_layers_text(layers)} analysed, GEMMs in {format_word(cfg.fp8)}) on {cfg.device.type} in {precision}"
            f"{' with ' + ' '.join(f for f, on in (('-iln', cfg.iln), ('-imh', cfg.imh)) if on) if floor else ''}"
            f"{', 2:4 GEMM weights' if cfg.sparse else ''}; "
            f"{len(squad.examples):,} questions ({len(features):,} features) of {squad.path}; "
            f"calibration {describe_calibration(calib)} from {cfg.calib_cache}")
    ev.prefetch(variants)
    measured = _measure_all(cfg, ev, variants)

    baseline, all_int8 = measured["baseline"], measured[variants[1].name]
    floor_m = measured.get("options-only")
    only = {v.target: baseline.f1 - measured[v.name].f1 for v in variants if v.method == "only"}
    groups = {v.target: baseline.f1 - measured[v.name].f1 for v in variants if v.method == "group"}
    loo = ({v.target: measured[v.name].f1 - all_int8.f1 for v in variants if v.method == "leave-one-out"}
           if cfg.leave_one_out else None)
    suggestion, extra = _suggest(cfg, ev, num_layers, layers, baseline, all_int8, floor_m, only)
    settings = {
        "model": str(loaded.source), "model_digest": loaded.digest, "vocab_file": cfg.vocab_file,
        "tokenizer_digest": wordpiece.digest,
        "calib_cache": str(cfg.calib_cache), "calibration": describe_calibration(calib), "calib_key": calib.key(),
        "squad": str(squad.path), "squad_digest": squad.digest, "limit": cfg.limit, "questions": len(squad.examples),
        "features": len(features), "device": cfg.device.type, "precision": precision, "iln": cfg.iln,
        "imh": cfg.imh, "fp8": cfg.fp8, "sparse": cfg.sparse, "batch": ev.batch,
        "max_seq_length": cfg.feature_settings.max_seq_length,
        "feature_settings": asdict(cfg.feature_settings), "answer_settings": asdict(cfg.answer_settings),
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    return SensitivityResult(settings=settings, layers=layers, num_layers=num_layers, baseline=baseline,
                             all_int8=all_int8, floor=floor_m, only=only, groups=groups, leave_one_out=loo,
                             suggestion=suggestion, variants=tuple(measured.values()) + tuple(extra))


def _evaluator(cfg: SensitivityConfig, loaded, calib, questions, squad) -> _Evaluator:
    """The evaluator of this run: here, or with --workers/--ray its builds as Ray tasks; with a report folder,
    the variants stored there under a key of everything their numbers depend on (the device as the workers see
    it) are reused and each variant measured is stored."""
    from eval.sweep import device_description

    remote = None
    if cfg.distributed is not None:
        from eval.distributed import RemoteBuilds

        remote = RemoteBuilds(cfg)
    store = None
    if cfg.report_dir is not None:
        batch = cfg.batch_size or (64 if cfg.device.type == "cuda" else 16)
        store = _VariantStore(cfg.report_dir, {
            "workbench": __version__, "model_digest": loaded.digest, "tokenizer": questions.wordpiece.digest,
            "calibration_key": calib.key(), "squad_digest": squad.digest, "limit": cfg.limit,
            "questions": len(squad.examples), "features": asdict(cfg.feature_settings),
            "answers": asdict(cfg.answer_settings), "batch": batch,
            "device": remote.description if remote is not None else device_description(cfg.device)}, cfg.force)
    return _Evaluator(cfg, loaded, calib, questions, store, remote)


def _check_calibration(loaded, calib, all_int8: PrecisionPolicy, seq_len: int) -> None:
    """build_engine's own checks of the cache (another model's cache, missing ranges; with --fp8 the warning for a
    cache made for INT8's grid) before anything slow runs: a throw-away CPU build of the all-INT8 (or all-FP8)
    policy (no kernel timing; quantizing the weights takes a moment)."""
    import torch

    from engines.build import build_engine
    from engines.engine_file import Profile

    build_engine(loaded, all_int8, [Profile(1, seq_len)], calib, torch.device("cpu"), None)


def _suggest(cfg: SensitivityConfig, ev: _Evaluator, num_layers: int, layers: Sequence[int], baseline: Measurement,
             all_int8: Measurement, floor_m: Measurement | None,
             only: Mapping[str, float]) -> tuple[Suggestion, list[Measurement]]:
    """The suggestion and the builds measured for it (see the module doc): the greedy keep list, refined (one more
    kept per build) while its measured drop misses the budget, then trimmed (one fewer per build, cheapest first)
    while it stays within. A keep list measured before (all-INT8 is the empty one) is not built again and costs
    neither budget."""
    budget, q = cfg.max_f1_drop, format_word(cfg.fp8)
    all_drop = baseline.f1 - all_int8.f1
    floor = baseline.f1 - floor_m.f1 if floor_m is not None else 0.0
    within = lambda drop: drop <= budget + F1_TOLERANCE  # noqa: E731
    plan = greedy_keep(only, budget, floor)
    estimate = lambda keep: floor + sum(c for g, c in plan.costs.items() if g not in keep)  # noqa: E731
    if within(all_drop):
        return Suggestion(budget, (), estimate(()), all_int8, all_drop, True,
                          note=f"all-{q} is already within the budget (measured ΔF1 {-all_drop:+.2f}, budget "
                               f"-{budget:g}): nothing needs to stay out of {q}"), []
    if floor_m is not None and not within(floor):
        return Suggestion(budget, (), floor, None, None, False,
                          note=f"the -iln/-imh points alone measure ΔF1 {_delta(-floor)} (every GEMM out of {q}), "
                               f"beyond the budget -{budget:g}: no choice of GEMMs fits; analyse without -iln/-imh"), []
    keep = list(plan.keep)
    candidates = [g for g in plan.order if g not in keep]
    notes = []
    if len(layers) < num_layers:
        notes.append(f"only layers {_layers_text(layers)} were analysed: the others stay {q} and their cost is "
                     "not in the estimate")
    if not plan.fits:
        notes.append(f"keeping every GEMM that costs F1 still leaves an estimated ΔF1 {_delta(-plan.estimated_drop)}")
    cfg.say(f"suggestion: keep {', '.join(keep) or 'nothing'} out of {q} (estimated ΔF1 "
            f"{_delta(-plan.estimated_drop)}); building and evaluating it")
    known: dict[frozenset[str], Measurement] = {frozenset(): all_int8}
    tried: list[Attempt] = []
    builds: list[Measurement] = []

    def attempt(keep: Sequence[str], name: str, step: str, gemm: str | None) -> Attempt:
        """Measure a keep list (one build and evaluation, or the numbers of the same list measured before)."""
        m = known.get(frozenset(keep))
        if m is None:
            quantized = tuple(g for g in all_gemms(num_layers) if g not in set(keep))
            m = known[frozenset(keep)] = ev.measure(Variant(name, "trim" if step == "trim" else "suggested",
                                                            ",".join(keep) or None, quantized))
            builds.append(m)
            how = (f"same build as {m.same_as}" if m.same_as
                   else f"built {m.build_s:.1f} s, evaluated {m.eval_s:.1f} s")
        else:
            how = f"measured before as {m.name}"
        a = Attempt(tuple(keep), baseline.f1 - m.f1, step, gemm, within(baseline.f1 - m.f1))
        tried.append(a)
        cfg.say(f"  {name}: EM {m.exact_match:.2f} F1 {m.f1:.2f} (ΔF1 {-a.measured_drop:+.2f}); {how}")
        return a

    last = attempt(keep, "suggested", "greedy", None)
    refined = 0
    while not last.fits and candidates and refined < cfg.refine:
        keep.append(candidates.pop(0))
        refined += 1
        cfg.say(f"  the measured drop misses the budget: keeping {keep[-1]} too")
        last = attempt(keep, f"suggested+{refined}", "refine", keep[-1])
    if not last.fits:
        notes.append(f"the measured ΔF1 {_delta(-last.measured_drop)} misses the budget"
                     + (f" after {refined} more GEMM(s) kept one at a time (--refine {cfg.refine})" if refined
                        else " (--refine 0: not refined)" if cfg.refine == 0 else ""))
    elif cfg.trim:
        keep, trim_notes = _trim(cfg, keep, plan.costs, known, attempt)
        notes += trim_notes
    final = known[frozenset(keep)]
    drop = baseline.f1 - final.f1
    return (Suggestion(budget, tuple(keep), estimate(set(keep)), final, drop, within(drop), tuple(tried),
                       "; ".join(notes), _build_command(cfg, keep, num_layers, ev.batch)), builds)


def _trim(cfg: SensitivityConfig, keep: list[str], costs: Mapping[str, float],
          known: Mapping[frozenset[str], Measurement], attempt) -> tuple[list[str], list[str]]:
    """The sum of single drops overstates the real drop, so a keep list within the budget may keep more than needed:
    return kept GEMMs to INT8 one build at a time (`attempt`), cheapest first, keeping each change whose measured
    drop still fits, at most cfg.trim builds. A list measured before is skipped: here that is a refine list that
    missed, or all-INT8 (which missed). Returns the keep list and the notes."""
    order, q = sorted(keep, key=lambda g: (costs[g], _gemm_order(g))), format_word(cfg.fp8)
    returned, untried, trims, notes = [], [], 0, []
    for i, g in enumerate(order):
        fewer = [x for x in keep if x != g]
        if frozenset(fewer) in known:
            cfg.say(f"  trim: {g} back to {q} gives a keep list measured before to miss the budget; it stays")
            continue
        if trims == cfg.trim:
            untried = [x for x in order[i:] if frozenset(y for y in keep if y != x) not in known]
            break
        trims += 1
        if attempt(fewer, f"trim:{g}", "trim", g).fits:
            keep = fewer
            returned.append(g)
            cfg.say(f"  trim: {g} back to {q} still fits the budget: it goes back")
        else:
            cfg.say(f"  trim: {g} back to {q} misses the budget: it stays out of {q}")
    if returned:
        notes.append(f"measured trims returned {', '.join(returned)} to {q} (of {len(order)} kept before trimming)")
    if untried:
        notes.append(f"--trim {cfg.trim} spent: {', '.join(untried)} not tried back in {q}")
    return keep, notes


def _build_command(cfg: SensitivityConfig, keep: Sequence[str], num_layers: int, batch: int) -> str:
    parts = ["python", "cli.py", "build", "--model", _quote(str(cfg.model))]
    parts += ["-v", _quote(str(cfg.vocab_file))] if cfg.vocab_file else []
    parts.append("--fp8" if cfg.fp8 else "--int8")
    parts += [f for f, on in (("--fp16", cfg.half), ("-iln", cfg.iln), ("-imh", cfg.imh), ("--sparse", cfg.sparse))
              if on]
    parts += ["--calib-cache", _quote(str(cfg.calib_cache))]
    if keep:
        parts += ["--keep-fp16", ",".join(compact_keep_list(keep, num_layers))]
    parts += ["--device", cfg.device.type, "-b", str(batch), "-s", str(cfg.feature_settings.max_seq_length),
              "-o", "engines/suggested.engine"]
    return " ".join(parts)


def _quote(path: str) -> str:
    """A path for a command line: relative to the working directory when under it, shell-quoted."""
    import shlex

    try:
        path = str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        pass
    return shlex.quote(path)


def _shown(path: str) -> str:
    """A path for the report: relative to the working directory when under it, else as given."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except (ValueError, OSError):
        return str(path)


def _layers_text(layers: Sequence[int]) -> str:
    layers = list(layers)
    if layers and layers == list(range(layers[0], layers[-1] + 1)) and len(layers) > 2:
        return f"{layers[0]}-{layers[-1]}"
    return ",".join(map(str, layers))


# ------------------------------------------------------------------------------------------------ report

def _fmt(v: float | None, width: int = 8) -> str:
    """A drop shown as ΔF1 (its negation, signed; 0.00 unsigned)."""
    return f"{'-' if v is None or math.isnan(v) else _delta(-v):>{width}}"


def _delta(v: float) -> str:
    text = f"{v:+.2f}"
    return "0.00" if text in ("+0.00", "-0.00") else text


def _kept_in(precision: str, q: str = "INT8") -> str:
    """Where --keep-fp16 GEMMs run: FP16 in an FP16 build, the build's FP32 otherwise."""
    return ("FP16 (--keep-fp16)" if precision == "fp16" else
            f"FP32, this build's precision (--keep-fp16 keeps GEMMs out of {q} at the build's precision)")


def render_text(r: SensitivityResult, worst: int = 10) -> str:
    s, q = r.settings, r.quantized_as
    n = r.baseline.n_questions
    lines = [f"ΔF1 (points, negative = worse) when only that GEMM is {q}, against the {s['precision']} baseline (F1 "
             f"{r.baseline.f1:.2f}, EM {r.baseline.exact_match:.2f}) on {n:,} questions of {Path(s['squad']).name}; "
             f"one question moves F1 by up to {100 / n:.2f}",
             f"calibration {s['calibration']}; {s['device']}; "
             + ("options " + " ".join(f for f, on in (("-iln", s["iln"]), ("-imh", s["imh"])) if on) if r.floor
                else f"plain --{q.lower()} (no -iln/-imh)"),
             ""]
    has_layer_groups = any(k.startswith("layer") for k in r.groups)
    header = f"{'':<12}" + "".join(f"{k:>10}" for k in GEMMS) + ("   whole layer" if has_layer_groups else "")
    lines.append(header)
    for i, row in zip(r.layers, r.matrix("only")):
        line = f"{'layer' + str(i):<12}" + "".join(_fmt(v, 10) for v in row)
        if has_layer_groups:
            line += f"   {_fmt(r.groups.get(f'layer{i}'), 11)}"
        lines.append(line)
    if any(k in r.groups for k in GEMMS):
        label = "every layer" if len(r.layers) == r.num_layers else f"layers {_layers_text(r.layers)}"
        lines.append(f"{label:<12}" + "".join(_fmt(r.groups.get(k), 10) for k in GEMMS)
                     + (f"   {'':>11}" if has_layer_groups else ""))
    lines.append("")
    lines.append(f"all {q} ({r.all_int8.options}): F1 {r.all_int8.f1:.2f}, ΔF1 {-r.all_int8_drop:+.2f}; "
                 f"sum of the single-GEMM ΔF1 {_delta(-sum(r.only.values()))}"
                 + (f" (only layers {_layers_text(r.layers)})" if len(r.layers) < r.num_layers else ""))
    if r.floor is not None:
        lines.append(f"-iln/-imh points alone (no GEMM {q}): F1 {r.floor.f1:.2f}, ΔF1 {-r.floor_drop:+.2f}")
    if r.leave_one_out is not None:
        lines += ["", f"F1 recovered when all but that GEMM is {q}: ΔF1 against all-{q} (F1 "
                  f"{r.all_int8.f1:.2f}), positive = better", f"{'':<12}" + "".join(f"{k:>10}" for k in GEMMS)]
        for i, row in zip(r.layers, r.matrix("leave_one_out")):
            lines.append(f"{'layer' + str(i):<12}" + "".join(_fmt(-v, 10) for v in row))
    ranked = r.ranked()[:worst]
    recovered = f"; and ΔF1 recovered against all-{q} when only it is not" if r.leave_one_out else ""
    lines += ["", f"most sensitive GEMMs (ΔF1 when only it is {q}{recovered}):"]
    for k, (g, d) in enumerate(ranked, 1):
        extra = f"   recovered {_delta(r.leave_one_out[g])}" if r.leave_one_out and g in r.leave_one_out else ""
        lines.append(f"  {k:>2}. {g:<16}{_delta(-d):>8}{extra}")
    if not ranked:
        lines.append("  none: no GEMM costs F1 on its own (every single-GEMM ΔF1 is 0.00 or a gain)")
    lines += ["", *suggestion_lines(r.suggestion, _kept_in(s["precision"], q), r.baseline, q)]
    return "\n".join(lines) + "\n"


def suggestion_lines(sug: Suggestion, kept_word: str, baseline: Measurement, q: str = "INT8") -> list[str]:
    out = [f"mixed-precision suggestion (--max-f1-drop {sug.max_f1_drop:g}):"]
    if sug.measured is None:
        return out + [f"  none: {sug.note}"]
    if not sug.keep:
        out.append(f"  keep nothing out of {q}: {sug.note or 'the estimate fits the budget'}")
    else:
        n = len(sug.keep)
        out.append(f"  keep {', '.join(sug.keep)} out of {q} ({n} GEMM{'s' if n > 1 else ''}), in {kept_word}")
        out.append(f"  estimated ΔF1 {_delta(-sug.estimated_drop)} = the sum of the single-GEMM ΔF1 of the GEMMs "
                   f"left in {q} (gains counted as 0); an estimate, not a measurement")
    m = sug.measured
    out.append(f"  measured: F1 {m.f1:.2f}, EM {m.exact_match:.2f}, ΔF1 {m.f1 - baseline.f1:+.2f} against the "
               f"baseline: {'within' if sug.fits else 'NOT within'} the budget")
    if len(sug.tried) > 1:
        out.append("  tried, in order (one build and evaluation each):")
        out += [f"    {_attempt_text(a, q)}" for a in sug.tried]
    if sug.note and sug.keep:
        out.append(f"  note: {sug.note}")
    if sug.command:
        out.append(f"  reproduce: {sug.command}")
    return out


def _attempt_text(a: Attempt, q: str = "INT8") -> str:
    what = {"greedy": "the estimate's list" + ("" if a.keep else f" (all-{q})"), "refine": f"keep {a.gemm} too",
            "trim": f"{a.gemm} back to {q}"}
    verdict = "within" if a.fits else "misses"
    if a.step == "trim":
        verdict += ": accepted" if a.fits else ": reverted"
    return (f"{a.step:<7}{what.get(a.step, ''):<30}{len(a.keep):>3} kept   ΔF1 {-a.measured_drop:+.2f}   "
            f"{verdict}")


def render_markdown(r: SensitivityResult, image: str | None, loo_image: str | None) -> str:
    s, q = r.settings, r.quantized_as
    n = r.baseline.n_questions
    has_layer_groups = any(k.startswith("layer") for k in r.groups)
    lines = [f"# {q} sensitivity", "",
             f"Model `{_shown(s['model'])}`, calibration {s['calibration']} (`{_shown(s['calib_cache'])}`), {n:,} "
             f"questions of `{_shown(s['squad'])}`, {s['device']}, {s['precision']}"
             + (", " + " ".join(f for f, on in (("-iln", s["iln"]), ("-imh", s["imh"])) if on) if r.floor else "")
             + f". Baseline ({r.baseline.options}): EM {r.baseline.exact_match:.2f}, F1 {r.baseline.f1:.2f}; "
             f"one question moves F1 by up to {100 / n:.2f}. ΔF1: a build's F1 minus its reference's, negative = "
             "worse.", "",
             f"## ΔF1 when only that GEMM is {q}", "",
             "| layer | " + " | ".join(GEMMS) + (" | whole layer |" if has_layer_groups else " |"),
             "| --- " * (len(GEMMS) + 1 + has_layer_groups) + "|"]
    for i, row in zip(r.layers, r.matrix("only")):
        cells = [_fmt(v, 0) for v in row] + ([_fmt(r.groups.get(f"layer{i}"), 0)] if has_layer_groups else [])
        lines.append(f"| layer{i} | " + " | ".join(cells) + " |")
    if any(k in r.groups for k in GEMMS):
        cells = [_fmt(r.groups.get(k), 0) for k in GEMMS] + ([""] if has_layer_groups else [])
        lines.append("| every analysed layer | " + " | ".join(cells) + " |")
    lines += ["", f"All {q} ({r.all_int8.options}): F1 {r.all_int8.f1:.2f}, ΔF1 {-r.all_int8_drop:+.2f}."]
    if r.floor is not None:
        lines.append(f"The -iln/-imh points alone: F1 {r.floor.f1:.2f}, ΔF1 {-r.floor_drop:+.2f}.")
    if image:
        lines += ["", f"![ΔF1 per GEMM]({image})"]
    if r.leave_one_out is not None:
        lines += ["", f"## F1 recovered when all but that GEMM is {q} (ΔF1 against all-{q}, positive = better)", "",
                  "| layer | " + " | ".join(GEMMS) + " |", "| --- " * (len(GEMMS) + 1) + "|"]
        for i, row in zip(r.layers, r.matrix("leave_one_out")):
            lines.append(f"| layer{i} | " + " | ".join(_fmt(-v, 0) for v in row) + " |")
        if loo_image:
            lines += ["", f"![F1 recovered per GEMM]({loo_image})"]
    lines += ["", "## Most sensitive GEMMs", "", "GEMMs that cost F1 on their own (ΔF1 -0.01 or worse when only "
              f"they are {q}), costliest first:", "", "| rank | GEMM | ΔF1 |", "| --- | --- | --- |"]
    lines += [f"| {k} | {g} | {_delta(-d)} |" for k, (g, d) in enumerate(r.ranked(), 1)]
    if not r.ranked():
        lines.append("| - | none | - |")
    kept_word = _kept_in(s["precision"], q)
    lines += ["", "## Suggestion", "", "```", *suggestion_lines(r.suggestion, kept_word, r.baseline, q), "```", "",
              "## Every build", "", "| build | options | EM | F1 | ΔF1 | build s | eval s |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for m in r.variants:
        lines.append(f"| {m.name} | {m.options} | {m.exact_match:.2f} | {m.f1:.2f} | {m.f1 - r.baseline.f1:+.2f} | "
                     f"{m.build_s:.1f} | {m.eval_s:.1f} |" + (f" (= {m.same_as})" if m.same_as else ""))
    return "\n".join(lines) + "\n"


def write_report(r: SensitivityResult, directory: str | Path) -> dict[str, Path]:
    """sensitivity.md, sensitivity.json, sensitivity.png (and leave-one-out.png), each written atomically."""
    from eval.plots import sensitivity_heatmap

    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise WorkbenchError(f"{directory}: --report-dir is a file, expected a directory")
    files = {k: directory / v for k, v in FILES.items()}
    rows = [f"layer{i}" for i in r.layers]
    n, q = r.baseline.n_questions, r.quantized_as
    delta = [[-v for v in row] for row in r.matrix("only")]
    sensitivity_heatmap(delta, rows, list(GEMMS), files["heatmap"],
                        f"ΔF1 when only that GEMM is {q}\n{n:,} questions, baseline F1 {r.baseline.f1:.2f}",
                        value_label="ΔF1 (points, negative = worse)", worse="low")
    if r.leave_one_out is not None:
        sensitivity_heatmap(r.matrix("leave_one_out"), rows, list(GEMMS), files["leave_one_out"],
                            f"F1 recovered when only that GEMM is not {q}\n{n:,} questions, all-{q} F1 "
                            f"{r.all_int8.f1:.2f}", value_label=f"ΔF1 against all-{q} (points)", worse="low")
    else:
        files.pop("leave_one_out")
    atomic_write_json(files["json"], r.to_json())
    atomic_write_text(files["markdown"], render_markdown(r, FILES["heatmap"],
                                                         FILES["leave_one_out"] if r.leave_one_out else None))
    return files


__all__ = ["sensitivity_from_flags", "Attempt", "CPU_LIMIT", "DEFAULT_MAX_F1_DROP", "DEFAULT_REPORT_DIR", "DEFAULT_TRIM", "DESCRIPTION", "EXAMPLES",
           "FILES", "GreedyPlan", "Measurement", "SensitivityConfig", "SensitivityResult", "Suggestion", "Variant",
           "all_gemms", "compact_keep_list", "config_from_flags", "cpu_notice", "device_settings", "gemm_name",
           "greedy_keep", "load_result", "parse_layers", "parse_options", "plan_variants", "render_text",
           "run_sensitivity", "write_report"]


def sensitivity_from_flags(flags, say=print) -> str:
    """`cli.py sensitivity`: the config its flags describe (with the CPU notice on stdout first), run, its report
    written (`say` names the files); the table as text."""
    from eval.measure import settings_from_flags

    cfg, notice = config_from_flags(flags, *settings_from_flags(flags))
    if notice:
        print(notice, flush=True)
    result = run_sensitivity(cfg)
    files = write_report(result, flags.report_dir)
    say(f"wrote {', '.join(str(p) for p in files.values())}")
    return "\n" + render_text(result).rstrip("\n")
