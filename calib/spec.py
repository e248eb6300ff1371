"""A calibration cache compiled with the build flags into the quantization spec (quant/spec.py), checked first.

The one place a cache's ranges become a build's spec: the engine builder and QAT's starting point both call it.
"""
from __future__ import annotations

import logging

import torch

from calib.cache import CalibrationCache
from common.errors import WorkbenchError
from model.config import BertConfig
from quant.policy import PrecisionPolicy
from quant.smoothing import check_vectors
from quant.spec import QuantSpec, ScaleSource

log = logging.getLogger(__name__)


def spec_from_cache(calib: CalibrationCache, policy: PrecisionPolicy, config: BertConfig, model_digest: str,
                    where: str = "the calibration cache") -> tuple[QuantSpec, dict[str, torch.Tensor]]:
    """The spec of the sites `policy` quantizes, with the cache's amax (per channel where smoothed), and the
    smoothing vectors of those sites. Refuses a cache made for another model or missing a site, in one line."""
    if calib.model_digest != model_digest:
        raise WorkbenchError(f"{where} was made for another model (weights digest {calib.model_digest[:12]}, "
                             f"this model {model_digest[:12]}): recalibrate")
    missing = [s for s in policy.quantized_sites(config.num_layers) if s not in calib.ranges]
    if missing:
        raise WorkbenchError(f"{where} has no range for {missing[0]} ({len(missing)} sites missing): recalibrate "
                             "with this workbench")
    if policy.fp8 and calib.method == "entropy":
        log.warning("%s was calibrated with entropy, whose threshold rule is INT8's uniform grid: for --fp8 "
                    "prefer a max, percentile or mse cache", where)
    smooth = {site: torch.tensor(r.smooth, dtype=torch.float32) for site, r in calib.ranges.items()
              if r.smooth is not None}
    check_vectors(smooth, config.num_layers, config.hidden_size, config.intermediate_size, where)
    source = ScaleSource("calibration", calib.method, calib.settings.get("smooth_alpha"))
    spec = policy.spec(config.num_layers, {s: r.amax for s, r in calib.ranges.items()}, source, set(smooth))
    return spec, {s: v for s, v in smooth.items() if s in spec.sites}
