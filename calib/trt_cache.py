"""TensorRT's text calibration-cache format, so our ranges can drive a TensorRT INT8 build.

Layout: a header "TRT-<version>-<algorithm>", then "name: <scale>" per tensor, the scale (amax/127) written as the
8 lowercase hex digits of its big-endian IEEE float32 bits. <version> is TensorRT's version number (8600 for
8.6.0, 100300 for 10.3.0).

TensorRT takes the scales as they are; it only compares the header's algorithm with that of the calibrator whose
readCalibrationCache supplies the file and ignores (recalibrates) on a mismatch. It has no percentile or MSE
calibrator, so those caches use the EntropyCalibration2 header, the type of IInt8EntropyCalibrator2 (the default
calibrator and what the TensorRT BERT demo uses); `algorithm=` overrides this when the reader is another type.
"""
from __future__ import annotations

import math
import os
import re
import struct
from typing import Mapping

from quant.quantizer import QMAX
from common.errors import WorkbenchError
from common.files import atomic_write_text, read_bytes

HEADERS = {
    "entropy": "EntropyCalibration2",
    "max": "MinMaxCalibration",
    "percentile": "EntropyCalibration2",
    "mse": "EntropyCalibration2",
}
ALGORITHMS = ("EntropyCalibration2", "EntropyCalibration", "MinMaxCalibration", "LegacyCalibration")
_HEADER = re.compile(r"TRT-(\d+)-(\w+)")
_HEX = re.compile(r"[0-9a-fA-F]{8}")


def _amax(value: object) -> float:
    """Accept plain amax floats or anything with an .amax (a cache's TensorRange, unless smoothed: its amax is that
    of x / s, which a per-tensor TensorRT scale cannot express)."""
    if getattr(value, "smooth", None) is not None:
        raise WorkbenchError("a smoothed calibration cache (--smooth) cannot be written as a TensorRT calibration "
                             "cache: its ranges are per channel; calibrate without --smooth for TensorRT")
    amax = getattr(value, "amax", value)
    if isinstance(amax, bool) or not isinstance(amax, (int, float)) or not math.isfinite(amax) or amax < 0:
        raise WorkbenchError(f"amax must be a finite number >= 0, got {amax!r}")
    return float(amax)


def scale_to_hex(scale: float) -> str:
    return struct.pack(">f", scale).hex()


def hex_to_scale(text: str) -> float:
    return struct.unpack(">f", bytes.fromhex(text))[0]


def to_trt_cache_text(
    ranges: Mapping[str, float], method: str, trt_version: str = "8600", algorithm: str | None = None
) -> str:
    """`ranges` maps tensor name -> amax; lines come out in name order so identical ranges give identical files."""
    if algorithm is None:
        check_int8_method(method)
        algorithm = HEADERS[method]
    if algorithm not in ALGORITHMS:
        choices = ", ".join(ALGORITHMS)
        raise WorkbenchError(f"unknown TensorRT calibration algorithm {algorithm!r}; choose one of {choices}")
    if not str(trt_version).isdigit():
        raise WorkbenchError(f"TensorRT version must be digits such as 8600, got {trt_version!r}")
    lines = [f"TRT-{trt_version}-{algorithm}"]
    for name in sorted(ranges):
        if not name or "\n" in name:
            raise WorkbenchError(f"tensor name {name!r} cannot be written to a TensorRT calibration cache")
        lines.append(f"{name}: {scale_to_hex(_amax(ranges[name]) / QMAX)}")
    return "\n".join(lines) + "\n"


def check_int8_method(method: str) -> None:
    """TensorRT's calibration cache holds INT8 scales: a method that picks ranges for another grid (mse-fp8) is
    refused in one line, as is an unknown one."""
    if method in HEADERS:
        return
    if method == "mse-fp8":
        raise WorkbenchError("a TensorRT calibration cache holds INT8 scales, and mse-fp8 picks ranges for FP8 "
                             "E4M3's grid: calibrate with entropy, percentile, mse or max for TensorRT")
    raise WorkbenchError(f"unknown calibration method {method!r}; choose one of {', '.join(HEADERS)}")


def parse_trt_cache_text(text: str) -> tuple[str, dict[str, float]]:
    """(header, {name: scale}). Names may contain ':' (TensorFlow-style 'x:0'); the last ': ' splits the value."""
    lines = text.splitlines()
    if not lines or not _HEADER.fullmatch(lines[0].strip()):
        raise WorkbenchError("line 1: expected a TensorRT calibration cache header like 'TRT-8600-EntropyCalibration2'")
    scales: dict[str, float] = {}
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        name, sep, value = line.rpartition(":")
        name, value = name.strip(), value.strip()
        if not sep or not name or not _HEX.fullmatch(value):
            raise WorkbenchError(f"line {number}: expected 'name: <8 hex digits>', got {line[:80]!r}")
        if name in scales:
            raise WorkbenchError(f"line {number}: tensor {name!r} appears twice")
        scale = hex_to_scale(value)
        if not math.isfinite(scale) or scale < 0:
            raise WorkbenchError(f"line {number}: scale of {name!r} is {scale!r}, not a finite number >= 0")
        scales[name] = scale
    return lines[0].strip(), scales


def write_trt_cache(
    path: str | os.PathLike,
    ranges: Mapping[str, float],
    method: str,
    trt_version: str = "8600",
    algorithm: str | None = None,
) -> None:
    atomic_write_text(path, to_trt_cache_text(ranges, method, trt_version, algorithm))


def read_trt_cache(path: str | os.PathLike) -> tuple[str, dict[str, float]]:
    """parse_trt_cache_text on a file, with the file named in any error."""
    try:
        return parse_trt_cache_text(read_bytes(path, "TensorRT calibration cache").decode("utf-8"))
    except UnicodeDecodeError as e:
        raise WorkbenchError(f"{path}: TensorRT calibration cache is not text (byte {e.start})") from None
    except WorkbenchError as e:
        msg = str(e)
        raise WorkbenchError(msg if msg.startswith(f"{path}:") else f"{path}: {msg}") from None
