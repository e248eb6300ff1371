"""The precision policy: which tensors of a BERT encoder an INT8 build quantizes, defined once.

Calibration records every site any option may need (one cache serves all builds); engines and QAT ask the
policy which sites a given set of build flags quantizes. Site names are the tap names of model/bert.py, and the
tensor names of our TensorRT calibration-cache export.

    --int8   the inputs of every encoder GEMM (QKV, attention output, FC1, FC2); weights per output channel
    --fp8    the same GEMMs in FP8 E4M3 (Hopper's FP8 tensor cores): per-tensor activation scales amax / 448 from
             the same calibration ranges, weights per output channel, FP32 accumulation; with -iln the LayerNorms'
             outputs, the residual stream included, are E4M3 codes; -imh stays INT8-only
    -imh     INT8 multi-head attention: Q, K, V, the attention probabilities and the context
    -iln     INT8 skip-LayerNorm: the outputs of the embedding LayerNorm and the two skip-LayerNorms of each layer,
             so the residual stream itself is INT8 (E4M3 under --fp8)

Mixed precision (`fp16_gemms`, the build's --keep-fp16): named GEMMs stay in FP16 under --int8 or --fp8, their
inputs and weights unquantized; what a sensitivity analysis suggests for the few points that cost the most accuracy.

A LayerNorm output is also the next GEMM's input, so under --int8 alone it is quantized where the GEMM reads it
(the residual stays FP16) and under -iln at the LayerNorm (the residual too); both use the same scale.
The QA head (a 2-wide GEMM) stays in FP16/FP32: it is negligible work and sits right on the logits.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Container, Mapping, Sequence

from common.errors import WorkbenchError
from model.bert import all_sites
from quant.formats import FP8_E4M3, INT8, QuantFormat
from quant.spec import PER_CHANNEL, PER_TENSOR, QuantSpec, ScaleSource, SiteSpec

GEMMS = ("qkv", "attn_out", "fc1", "fc2")
_GEMM_NAME = re.compile(rf"(layer\d+\.)?({'|'.join(GEMMS)})")


@dataclass(frozen=True)
class PrecisionPolicy:
    """Build flags with the TensorRT BERT demo's meanings."""

    int8: bool = False
    fp16: bool = False   # non-quantized work in FP16 (else FP32)
    iln: bool = False    # -iln
    imh: bool = False    # -imh
    strict: bool = False  # no fallback to higher precision for a layer the flags quantize
    fc2_library_gemm: bool = False  # -g: FC2 on the plain library GEMM
    fp16_gemms: tuple[str, ...] = ()  # --keep-fp16: "layer3.fc2" (one GEMM) or "fc2" (that GEMM in every layer)
    sparse: bool = False  # --sparse: every encoder GEMM weight is 2:4 (sparse tensor-core kernels may run it)
    fp8: bool = False     # --fp8: the --int8 GEMMs in FP8 E4M3 instead

    def __post_init__(self) -> None:
        if self.int8 and self.fp8:
            raise WorkbenchError("give --int8 or --fp8, not both")
        if self.imh and self.fp8:
            raise WorkbenchError("-imh is INT8-only for now: drop it with --fp8, or build --int8")
        if (self.iln or self.imh) and not self.quantized:
            raise WorkbenchError("-iln and -imh quantize on top of --int8 (-iln: or --fp8): add --int8")
        object.__setattr__(self, "fp16_gemms", tuple(sorted(set(self.fp16_gemms))))  # JSON gives lists
        check_gemm_names(self.fp16_gemms, "--keep-fp16")
        if self.fp16_gemms and not self.quantized:
            raise WorkbenchError("--keep-fp16 keeps GEMMs out of INT8 or FP8: it needs --int8 or --fp8")

    @property
    def quantized(self) -> bool:
        """Whether these flags quantize anything (--int8 or --fp8): the build then needs ranges."""
        return self.int8 or self.fp8

    @property
    def gelu_tanh(self) -> bool:
        """Whether the engine's GELU is the tanh form (model.bert.gelu_tanh), as TensorRT's BERT plugins compute
        it: the form our INT8 GEMMs fuse into their epilogue and cuBLASLt fuses into an FP16 GEMM's. FP32 engines
        keep BERT's erf GELU and reproduce the reference model."""
        return self.quantized or self.fp16

    def quantizes_gemm(self, layer: int, gemm: str) -> bool:
        """Whether this GEMM runs quantized, in `format` (its input site and its weights)."""
        return self.quantized and not names_gemm(self.fp16_gemms, layer, gemm)

    def quantized_gemms(self, num_layers: int) -> list[tuple[int, str, str]]:
        """(layer, GEMM, its input site) of every GEMM these flags quantize, in forward order."""
        return [(i, g, self.gemm_input_site(i, g)) for i in range(num_layers) for g in GEMMS
                if self.quantizes_gemm(i, g)]

    def gemm_input_site(self, layer: int, gemm: str) -> str:
        """The tap site whose tensor the GEMM reads."""
        return {
            "qkv": "embeddings.ln_out" if layer == 0 else f"layer{layer - 1}.ffn_ln_out",
            "attn_out": f"layer{layer}.context",
            "fc1": f"layer{layer}.attn_ln_out",
            "fc2": f"layer{layer}.fc2_in",
        }[gemm]

    def quantized_sites(self, num_layers: int) -> tuple[str, ...]:
        """Every site these flags quantize, in forward order."""
        wanted: set[str] = set()
        if self.quantized:
            wanted |= {self.gemm_input_site(i, g) for i in range(num_layers) for g in GEMMS
                       if self.quantizes_gemm(i, g)}
        if self.imh:
            wanted |= {f"layer{i}.{s}" for i in range(num_layers) for s in ("q", "k", "v", "probs", "context")}
        if self.iln:
            wanted |= {"embeddings.ln_out"} | {f"layer{i}.{s}" for i in range(num_layers)
                                               for s in ("attn_ln_out", "ffn_ln_out")}
        return tuple(s for s in all_sites(num_layers) if s in wanted)

    def rounded_where_produced(self, site: str) -> bool:
        """-imh and -iln sites are rounded (INT8, or E4M3 under --fp8) where they are produced, so every consumer
        (residual included) sees the rounded tensor; --int8 alone rounds only where a GEMM reads its input."""
        kind = site.rsplit(".", 1)[1]
        return (self.imh and kind in ("q", "k", "v", "probs", "context")) or \
            (self.iln and kind in ("ln_out", "attn_ln_out", "ffn_ln_out"))

    @property
    def format(self) -> QuantFormat | None:
        """The format of every site and GEMM weight these flags quantize (None: nothing is quantized)."""
        return INT8 if self.int8 else FP8_E4M3 if self.fp8 else None

    def gemm_format(self, layer: int, gemm: str) -> QuantFormat | None:
        """The format this GEMM's input and weights run in; None: floating point."""
        return self.format if self.quantizes_gemm(layer, gemm) else None

    def spec(self, num_layers: int, amax: Mapping[str, float], source: ScaleSource = ScaleSource(),
             smoothed: Container[str] = ()) -> QuantSpec:
        """The flags compiled to a quantization spec: every site they quantize, with its format, its amax from
        `amax` (a calibration cache's or QAT's ranges), and per-channel granularity where smoothed. The one
        place build flags become formats and scales."""
        fmt = self.format
        if fmt is None:
            return QuantSpec()
        sites = self.quantized_sites(num_layers)
        missing = [s for s in sites if s not in amax]
        if missing:
            raise WorkbenchError(f"no range for {missing[0]} ({len(missing)} sites missing)")
        return QuantSpec({s: SiteSpec(fmt, float(amax[s]), PER_CHANNEL if s in smoothed else PER_TENSOR, source)
                          for s in sites}, fmt)

    def describe(self) -> str:
        flags = [f for f, on in (("--int8", self.int8), ("--fp8", self.fp8), ("--fp16", self.fp16), ("-iln", self.iln),
                                 ("-imh", self.imh), ("-g", self.fc2_library_gemm), ("--sparse", self.sparse),
                                 ("--strict", self.strict)) if on]
        if self.fp16_gemms:
            flags.append("--keep-fp16 " + ",".join(self.fp16_gemms))
        return " ".join(flags) or "fp32"


def check_gemm_names(names: Sequence[str], flag: str) -> None:
    """GEMM lists (--keep-fp16, prune's --exclude) name "layerN.GEMM" (one) or "GEMM" (that GEMM in every layer)."""
    bad = [g for g in names if not _GEMM_NAME.fullmatch(g)]
    if bad:
        raise WorkbenchError(f"{flag}: {bad[0]!r} is not a GEMM: use layerN.GEMM or GEMM, with GEMM one of "
                             f"{', '.join(GEMMS)}")


def names_gemm(names: Sequence[str], layer: int, gemm: str) -> bool:
    """Whether a GEMM list (check_gemm_names) names layer `layer`'s `gemm`."""
    return gemm in names or f"layer{layer}.{gemm}" in names


def parse_gemm_list(text: str) -> tuple[str, ...]:
    """"layer3.fc2, fc1" -> ("fc1", "layer3.fc2"); names are checked by PrecisionPolicy."""
    return tuple(sorted({part.strip() for part in text.split(",") if part.strip()}))


def calibration_method(site: str, method: str) -> str:
    """The calibrator a site gets when the user asks for `method`.

    Attention probabilities are softmax outputs, bounded in [0, 1], and their few large values are what attention
    is: histogram methods see mostly near-zero mass and clip them (entropy picks 1/16 of the range, the smallest
    threshold it tries, on every probs site of the shared MiniLM), so those sites always use max.
    """
    return "max" if site.endswith(".probs") else method


def calibration_sites(num_layers: int) -> tuple[str, ...]:
    """What calibration records: the union over every option, i.e. all tap sites."""
    return all_sites(num_layers)
