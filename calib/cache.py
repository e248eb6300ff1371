"""The calibration cache: per-quantization-point amax, plus everything that determined it.

Calibration runs the FP32 model over the calibration questions, which is the slow part of building an INT8 model,
so its result is saved and reused. Reuse is decided by `key()`, a digest of the inputs (method, settings, sample
count, model and data digests, tool version), never by file name or timestamp. The file carries a sha256 of its
own canonical JSON so a truncated or hand-edited cache is detected and recomputed instead of silently producing a
mis-scaled engine. Names of quantization points are opaque here; the precision policy owns them.
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quant.quantizer import QMAX
from common.errors import WorkbenchError
from common.files import atomic_write_json, cache_root, read_bytes, sha256_bytes

FORMAT = "bert-int8-workbench/calibration-cache"
FORMAT_VERSION = 2          # 2 adds per-channel smoothing vectors; files without them are written as 1
READABLE_VERSIONS = (1, 2)

log = logging.getLogger(__name__)


class CacheError(WorkbenchError):
    """A calibration cache file that cannot be trusted (truncated, malformed, tampered, other format)."""


@dataclass(frozen=True)
class TensorRange:
    """amax of the site's tensor; with `smooth` (quant/smoothing.py), amax of x / smooth, channel by channel."""

    amax: float
    smooth: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.amax, bool) or not isinstance(self.amax, (int, float)) or not math.isfinite(self.amax):
            raise WorkbenchError(f"amax must be a finite number, got {self.amax!r}")
        if self.amax < 0:
            raise WorkbenchError(f"amax must be >= 0, got {self.amax!r}")
        if self.smooth is not None and not (self.smooth and all(_positive(v) for v in self.smooth)):
            raise WorkbenchError("a smoothing vector must hold finite positive numbers")

    @property
    def scale(self) -> float:
        return self.amax / QMAX


@dataclass(frozen=True)
class CalibrationCache:
    ranges: dict[str, TensorRange]
    method: str
    settings: dict
    num_samples: int
    model_digest: str
    data_digest: str
    tool_version: str

    def describe(self) -> str:
        """"entropy (100 q)", "percentile 99.9 (100 q)", "entropy +smooth 0.8 (100 q)": for reports and engine
        headers."""
        method = self.method
        if method == "percentile" and "percentile" in self.settings:
            method = f"percentile {self.settings['percentile']:g}"
        if self.settings.get("smooth_alpha") is not None:
            method += f" +smooth {self.settings['smooth_alpha']:g}"
        return f"{method} ({self.num_samples} q)"

    def key(self) -> str:
        """sha256 over what determines the ranges (not the ranges themselves)."""
        return cache_key(**self._inputs())

    def _inputs(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "settings": self.settings,
            "num_samples": self.num_samples,
            "model_digest": self.model_digest,
            "data_digest": self.data_digest,
            "tool_version": self.tool_version,
        }


def cache_key(method: str, settings: dict, num_samples: int, model_digest: str, data_digest: str,
              tool_version: str) -> str:
    """The reuse key from the inputs alone, so a caller can look for a reusable cache before running the model."""
    return sha256_bytes(_canonical({
        "method": method,
        "settings": settings,
        "num_samples": num_samples,
        "model_digest": model_digest,
        "data_digest": data_digest,
        "tool_version": tool_version,
    }))


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def default_cache_path(key: str) -> Path:
    """Where a cache with this key lives under the shared cache root."""
    return cache_root() / "calibration" / f"{key[:32]}.json"


def save_cache(cache: CalibrationCache, path: str | os.PathLike) -> None:
    smoothed = any(r.smooth is not None for r in cache.ranges.values())
    body = {
        "format": FORMAT,
        # version 1 when nothing needs 2, so that older tools keep reading what they can use
        "format_version": FORMAT_VERSION if smoothed else 1,
        **cache._inputs(),
        "tensors": {name: {"amax": r.amax, "scale": r.scale, **({"smooth": list(r.smooth)} if r.smooth else {})}
                    for name, r in sorted(cache.ranges.items())},
    }
    atomic_write_json(path, {**body, "checksum": sha256_bytes(_canonical(body))})


def _parse(data: bytes, path: Path) -> dict:
    if not data.strip():
        raise CacheError(f"{path}: calibration cache is empty")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CacheError(f"{path}: calibration cache is not UTF-8 text (byte {e.start})") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        stripped = text.strip()
        what = "truncated" if stripped.startswith("{") and not stripped.endswith("}") else "malformed JSON"
        raise CacheError(f"{path}: calibration cache is {what} (line {e.lineno} column {e.colno}: {e.msg})") from None
    if not isinstance(obj, dict):
        raise CacheError(f"{path}: calibration cache is not a JSON object")
    return obj


_KIND_NAMES = {str: "string", int: "integer", dict: "object"}


def _field(obj: dict, name: str, kind: type, path: Path) -> Any:
    value = obj.get(name)
    if type(value) is not kind:  # exact type: JSON true is not an integer here
        raise CacheError(f"{path}: calibration cache field {name!r} is missing or not a JSON {_KIND_NAMES[kind]}")
    return value


def load_cache(path: str | os.PathLike) -> CalibrationCache:
    """Read and verify a cache; anything untrustworthy raises CacheError naming the file and the problem."""
    path = Path(path)
    try:
        data = read_bytes(path, "calibration cache")
    except WorkbenchError as e:
        raise CacheError(str(e)) from None
    obj = _parse(data, path)
    if obj.get("format") != FORMAT:
        raise CacheError(f"{path}: not a calibration cache (format is {obj.get('format')!r}, expected {FORMAT!r})")
    if obj.get("format_version") not in READABLE_VERSIONS:
        raise CacheError(
            f"{path}: calibration cache format version {obj.get('format_version')!r} is not supported "
            f"(expected one of {', '.join(map(str, READABLE_VERSIONS))})"
        )
    stored = obj.pop("checksum", None)
    if not isinstance(stored, str):
        raise CacheError(f"{path}: calibration cache has no checksum")
    try:
        actual = sha256_bytes(_canonical(obj))
    except ValueError:  # NaN/Infinity literals cannot come from save_cache
        raise CacheError(f"{path}: calibration cache contains NaN or Infinity") from None
    if actual != stored:
        raise CacheError(f"{path}: calibration cache checksum mismatch (file was modified or damaged)")

    tensors = _field(obj, "tensors", dict, path)
    ranges = {}
    for name, entry in tensors.items():
        amax = entry.get("amax") if isinstance(entry, dict) else None
        if isinstance(amax, bool) or not isinstance(amax, (int, float)) or not math.isfinite(amax) or amax < 0:
            raise CacheError(f"{path}: tensor {name!r} has no valid amax")
        smooth = entry.get("smooth")
        if smooth is not None and not (isinstance(smooth, list) and smooth and all(_positive(v) for v in smooth)):
            raise CacheError(f"{path}: tensor {name!r} has an invalid smoothing vector (positive numbers expected)")
        ranges[name] = TensorRange(float(amax), tuple(map(float, smooth)) if smooth is not None else None)
        scale = entry.get("scale")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isclose(
            scale, ranges[name].scale, rel_tol=1e-9
        ):
            raise CacheError(f"{path}: tensor {name!r} scale does not equal amax/{QMAX}")
    num_samples = _field(obj, "num_samples", int, path)
    if num_samples < 0:
        raise CacheError(f"{path}: calibration cache field 'num_samples' is negative")
    return CalibrationCache(
        ranges=ranges,
        method=_field(obj, "method", str, path),
        settings=_field(obj, "settings", dict, path),
        num_samples=num_samples,
        model_digest=_field(obj, "model_digest", str, path),
        data_digest=_field(obj, "data_digest", str, path),
        tool_version=_field(obj, "tool_version", str, path),
    )


def _positive(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def find_reusable(path: str | os.PathLike, expected_key: str,
                  expected_inputs: dict[str, Any] | None = None) -> CalibrationCache | None:
    """The cache at `path` if it is intact and was made from the same inputs; else None (with one warning line
    that names the inputs that changed, when `expected_inputs`, the `cache_key` arguments, are given)."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        cache = load_cache(path)
    except CacheError as e:
        log.warning("%s, recomputing", e)
        return None
    if cache.key() != expected_key:
        changed = changed_inputs(cache._inputs(), expected_inputs) if expected_inputs else []
        log.warning("%s: calibration cache was made from other inputs (%s), recomputing", path,
                    "; ".join(changed) or f"key {cache.key():.12} against {expected_key:.12}")
        return None
    return cache


_INPUT_NAMES = {"num_samples": "questions", "model_digest": "the model's weights", "data_digest": "the SQuAD file",
                "tool_version": "workbench version", "tokenizer_digest": "the tokenizer"}


def changed_inputs(cached: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """What differs between a cache's inputs and a run's, in words: "method max -> entropy", "calib_num 100 -> 50",
    "the model's weights" (digests are named, not shown)."""
    flat = [(k, cached.get(k), v) for k, v in expected.items() if k != "settings"]
    old_settings, new_settings = cached.get("settings") or {}, expected.get("settings") or {}
    flat += [(k, old_settings.get(k), new_settings.get(k)) for k in sorted(set(old_settings) | set(new_settings))]
    out = []
    for k, old, new in flat:
        if old != new:
            name = _INPUT_NAMES.get(k, k)
            out.append(name if "digest" in k else f"{name} {'-' if old is None else old} -> "
                                                   f"{'-' if new is None else new}")
    return out
