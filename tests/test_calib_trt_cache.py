"""TensorRT calibration-cache text: scale encoding, headers, round trip, refusal of malformed lines."""
from __future__ import annotations

import struct

import pytest

from calib.cache import TensorRange
from calib.trt_cache import parse_trt_cache_text, read_trt_cache, to_trt_cache_text, write_trt_cache
from common.errors import WorkbenchError


def test_known_scale_encodings():
    text = to_trt_cache_text({"one": 127.0, "half": 63.5, "tenth": 12.7}, "entropy")
    lines = dict(line.split(": ") for line in text.splitlines()[1:])
    assert lines == {"one": "3f800000", "half": "3f000000", "tenth": struct.pack(">f", 0.1).hex()}


@pytest.mark.parametrize(
    "method, header",
    [
        ("entropy", "TRT-8600-EntropyCalibration2"),
        ("max", "TRT-8600-MinMaxCalibration"),
        ("percentile", "TRT-8600-EntropyCalibration2"),
        ("mse", "TRT-8600-EntropyCalibration2"),
    ],
)
def test_header_per_method(method, header):
    assert to_trt_cache_text({"x": 1.0}, method).splitlines()[0] == header


def test_version_and_algorithm_override():
    text = to_trt_cache_text({"x": 1.0}, "percentile", trt_version="100300", algorithm="MinMaxCalibration")
    assert text.startswith("TRT-100300-MinMaxCalibration\n")
    with pytest.raises(WorkbenchError, match="version"):
        to_trt_cache_text({"x": 1.0}, "max", trt_version="8.6")
    with pytest.raises(WorkbenchError, match="unknown calibration method"):
        to_trt_cache_text({"x": 1.0}, "kl")


def test_round_trip_keeps_names_and_float32_scales():
    ranges = {"layer0.qkv_in": 3.25, "input_ids:0": 127.0, "emb.out": 0.0, "layer11.fc2_in": TensorRange(41.7)}
    header, scales = parse_trt_cache_text(to_trt_cache_text(ranges, "max"))
    assert header == "TRT-8600-MinMaxCalibration"
    assert set(scales) == set(ranges)
    for name, amax in ranges.items():
        amax = getattr(amax, "amax", amax)
        assert scales[name] == struct.unpack(">f", struct.pack(">f", amax / 127))[0]
    assert to_trt_cache_text(dict(reversed(list(ranges.items()))), "max") == to_trt_cache_text(ranges, "max")


@pytest.mark.parametrize(
    "text, line",
    [
        ("EntropyCalibration2\nx: 3f800000\n", 1),
        ("TRT-8600-EntropyCalibration2\nx: 3f800000\ny 3f800000\n", 3),
        ("TRT-8600-EntropyCalibration2\nx: 3f80000\n", 2),
        ("TRT-8600-EntropyCalibration2\nx: 3f800000\n\nx: 3f800000\n", 4),
        ("TRT-8600-EntropyCalibration2\n: 3f800000\n", 2),
        ("TRT-8600-EntropyCalibration2\nx: 7fc00000\n", 2),  # NaN scale
    ],
)
def test_malformed_lines_name_the_line(text, line):
    with pytest.raises(WorkbenchError, match=rf"^line {line}:"):
        parse_trt_cache_text(text)


def test_write_and_read_file(tmp_path):
    path = tmp_path / "bert.calib"
    write_trt_cache(path, {"a": 127.0}, "entropy")
    assert path.read_text() == "TRT-8600-EntropyCalibration2\na: 3f800000\n"
    assert read_trt_cache(path) == ("TRT-8600-EntropyCalibration2", {"a": 1.0})
    path.write_text("TRT-8600-EntropyCalibration2\na: zz\n")
    with pytest.raises(WorkbenchError, match=rf"^{path}: line 2:"):
        read_trt_cache(path)
    with pytest.raises(WorkbenchError, match="not found"):
        read_trt_cache(tmp_path / "missing.calib")


def test_smoothed_ranges_are_refused():
    assert "x: " in to_trt_cache_text({"x": TensorRange(1.0)}, "entropy")
    with pytest.raises(WorkbenchError, match="smoothed calibration cache"):
        to_trt_cache_text({"x": TensorRange(1.0, (1.0, 0.5))}, "entropy")
