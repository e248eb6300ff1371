"""The quantization spec: for each quantized site of a build, its format, granularity, scale source and amax.

It is what calibration or QAT hands to the engine builder, what the engine header stores, and what an ONNX
export will write as Q/DQ nodes: the one description of "how is this tensor quantized". The TensorRT-style build
flags decide *which* sites are quantized (quant.policy); `PrecisionPolicy.spec` compiles them, with the ranges of
a calibration cache or QAT, into a QuantSpec, and nothing else chooses formats or scales.

Weights are not listed site by site: every quantized GEMM's weight is quantized per output channel from its own
rows (quant.quantizer.weight_scales) in `weight_format`, and the engine stores those scales beside the codes.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from common.errors import WorkbenchError
from quant.formats import INT8, QuantFormat, get_format
from quant.quantizer import scale_from_amax

PER_TENSOR = "per_tensor"
PER_CHANNEL = "per_channel"  # a per-tensor amax times a per-channel vector (smoothing: quant/smoothing.py)
GRANULARITIES = (PER_TENSOR, PER_CHANNEL)
SOURCES = ("calibration", "qat", "fixed")


@dataclass(frozen=True)
class ScaleSource:
    """Where a site's amax came from: a calibration method (with SmoothQuant-style smoothing strength, if any),
    QAT (learned), or fixed (set by hand or by a test)."""

    kind: str = "calibration"
    method: str = ""               # entropy, percentile, mse, max (calibration only)
    smooth: float | None = None    # smoothing alpha of the cache the amax came from

    def __post_init__(self) -> None:
        if self.kind not in SOURCES:
            raise WorkbenchError(f"unknown scale source {self.kind!r} (one of {', '.join(SOURCES)})")

    def __str__(self) -> str:
        text = self.kind + (f":{self.method}" if self.method else "")
        return text + (f"+smooth{self.smooth:g}" if self.smooth is not None else "")

    @classmethod
    def parse(cls, text: str) -> ScaleSource:
        """Inverse of str(): "calibration:entropy+smooth0.8" -> ScaleSource("calibration", "entropy", 0.8)."""
        match = re.fullmatch(r"([a-z]+)(?::([a-z0-9_.-]+))?(?:\+smooth([0-9.eE+-]+))?", text)
        if match is None:
            raise WorkbenchError(f"not a scale source: {text!r}")
        kind, method, smooth = match.groups()
        return cls(kind, method or "", float(smooth) if smooth is not None else None)


@dataclass(frozen=True)
class SiteSpec:
    """One quantized activation site."""

    format: QuantFormat
    amax: float
    granularity: str = PER_TENSOR
    source: ScaleSource = field(default_factory=ScaleSource)

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise WorkbenchError(f"unknown granularity {self.granularity!r} (one of {', '.join(GRANULARITIES)})")
        if not (self.amax >= 0 and self.amax != float("inf")):
            raise WorkbenchError(f"a site's amax must be a finite number >= 0, got {self.amax!r}")

    @property
    def scale(self) -> float:
        """amax / qmax, rounded to float32 once (quant.quantizer.scale_from_amax), as every kernel uses it."""
        return float(scale_from_amax(self.amax, self.format))

    def to_json(self) -> dict:
        return {"format": self.format.name, "amax": self.amax, "granularity": self.granularity,
                "source": str(self.source)}

    @classmethod
    def from_json(cls, d: Any, where: str) -> SiteSpec:
        if not isinstance(d, dict) or not isinstance(d.get("format"), str) or \
                not isinstance(d.get("amax"), (int, float)) or isinstance(d.get("amax"), bool):
            raise WorkbenchError(f"{where}: a site must be an object with a format name and a numeric amax")
        return cls(get_format(d["format"]), float(d["amax"]), str(d.get("granularity", PER_TENSOR)),
                   ScaleSource.parse(str(d.get("source", "calibration"))))


@dataclass(frozen=True)
class QuantSpec:
    """Every quantized activation site of a build (forward order) and the format of its GEMM weights."""

    sites: Mapping[str, SiteSpec] = field(default_factory=dict)
    weight_format: QuantFormat = INT8

    def require(self, sites: Sequence[str]) -> None:
        """Refuse, in one line, a spec that lacks a site the build or the reference quantizes."""
        missing = [s for s in sites if s not in self.sites]
        if missing:
            raise WorkbenchError(f"the quantization spec has no range for {missing[0]} ({len(missing)} sites "
                                 "missing)")

    def scales(self) -> dict[str, float]:
        return {name: s.scale for name, s in self.sites.items()}

    def to_json(self) -> dict:
        return {"weight_format": self.weight_format.name,
                "sites": {name: s.to_json() for name, s in self.sites.items()}}

    @classmethod
    def from_json(cls, d: Any, where: str = "quantization spec") -> QuantSpec:
        if not isinstance(d, dict) or not isinstance(d.get("sites"), dict):
            raise WorkbenchError(f"{where}: expected an object with 'sites'")
        return cls({name: SiteSpec.from_json(s, f"{where} site {name}") for name, s in d["sites"].items()},
                   get_format(str(d.get("weight_format", INT8.name))))
