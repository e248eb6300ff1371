"""A calibration cache compiled with the build flags into the quantization spec (quant/spec.py), checked first.

The one place a cache's ranges become a build's spec: the engine builder and QAT's starting point both call it.
"""
from __future__ import annotations

import logging

import torch

from calib.cache import CalibrationCache
from calib.calibrators import GRIDS
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
    grid_warning(calib.method, policy, where)
    smooth = {site: torch.tensor(r.smooth, dtype=torch.float32) for site, r in calib.ranges.items()
              if r.smooth is not None}
    check_vectors(smooth, config.num_layers, config.hidden_size, config.intermediate_size, where)
    source = ScaleSource("calibration", calib.method, calib.settings.get("smooth_alpha"))
    spec = policy.spec(config.num_layers, {s: r.amax for s, r in calib.ranges.items()}, source, set(smooth))
    return spec, {s: v for s, v in smooth.items() if s in spec.sites}


# By format: its grid in words, and the caches whose method picks ranges for it.
_GRID_WORDS = {"int8": ("INT8's uniform grid", "an entropy, percentile, mse or max cache"),
               "fp8_e4m3": ("FP8 E4M3's grid", "a max, percentile or mse-fp8 cache")}


def grid_warning(method: str, policy: PrecisionPolicy, where: str = "the calibration cache") -> None:
    """One warning when the cache's method picked its ranges for another grid than the build's format (entropy and
    mse for INT8's uniform grid, mse-fp8 for FP8 E4M3's): the build works, its ranges are just not the ones a
    method for this format would choose."""
    grid, fmt = GRIDS.get(method), policy.format
    if grid is None or fmt is None or grid is fmt:
        return
    log.warning("%s was calibrated with %s, which picks ranges for %s: for %s prefer %s", where, method,
                _GRID_WORDS[grid.name][0], "--fp8" if policy.fp8 else "--int8", _GRID_WORDS[fmt.name][1])
