"""INT8 calibration: amax estimation from activation batches, the reusable calibration cache, TensorRT cache export.

Only ranges live here; which tensors are quantized (and their names) is the precision policy's business.
"""
from calib.cache import CacheError, CalibrationCache, TensorRange, cache_key, find_reusable, load_cache, save_cache
from calib.calibrators import METHODS, Calibrator, make_calibrator
from calib.trt_cache import parse_trt_cache_text, to_trt_cache_text, write_trt_cache

__all__ = [
    "METHODS",
    "CacheError",
    "CalibrationCache",
    "Calibrator",
    "TensorRange",
    "cache_key",
    "find_reusable",
    "load_cache",
    "make_calibrator",
    "parse_trt_cache_text",
    "save_cache",
    "to_trt_cache_text",
    "write_trt_cache",
]
