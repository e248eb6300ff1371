"""Calibration cache file: round trip, reuse key, and refusal of damaged files."""
from __future__ import annotations

import dataclasses
import json
import logging
import re

import pytest

from calib.cache import (
    FORMAT_VERSION,
    CacheError,
    CalibrationCache,
    TensorRange,
    default_cache_path,
    find_reusable,
    load_cache,
    save_cache,
)
from common.errors import WorkbenchError
from common.files import cache_root


def _cache(**over) -> CalibrationCache:
    fields = dict(
        ranges={"layer0.qkv_in": TensorRange(3.25), "layer0.fc2_in": TensorRange(12.7), "emb.out": TensorRange(0.0)},
        method="entropy",
        settings={"percentile": 99.99, "num_bins": 2048, "calib_num": 100, "seed": 0, "max_seq_length": 384},
        num_samples=100,
        model_digest="a" * 64,
        data_digest="b" * 64,
        tool_version="0.1.0",
    )
    return CalibrationCache(**{**fields, **over})


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "calib.json"
    save_cache(_cache(), path)
    return path


def _one_line_naming(err: pytest.ExceptionInfo, path) -> str:
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg
    return msg


def test_tensor_range_scale_and_validation():
    assert TensorRange(12.7).scale == pytest.approx(0.1)
    for bad in (-1.0, float("nan"), float("inf"), "3", True):
        with pytest.raises(WorkbenchError):
            TensorRange(bad)


def test_round_trip_and_file_layout(saved, tmp_path):
    assert load_cache(saved) == _cache()
    raw = json.loads(saved.read_text())
    assert raw["format_version"] == 1  # nothing smoothed: the version older tools read
    assert re.fullmatch(r"[0-9a-f]{64}", raw["checksum"])
    assert raw["tensors"]["layer0.fc2_in"] == {"amax": 12.7, "scale": 12.7 / 127}
    assert [p.name for p in tmp_path.iterdir()] == ["calib.json"]  # atomic write leaves no temporary behind


def test_smoothing_vectors_round_trip_as_format_2(tmp_path):
    from dataclasses import replace

    cache = replace(_cache(), ranges={**_cache().ranges, "layer0.attn_ln_out": TensorRange(3.5, (1.0, 0.25, 0.5))})
    path = tmp_path / "smoothed.json"
    save_cache(cache, path)
    raw = json.loads(path.read_text())
    assert raw["format_version"] == FORMAT_VERSION == 2
    assert raw["tensors"]["layer0.attn_ln_out"]["smooth"] == [1.0, 0.25, 0.5]
    assert load_cache(path) == cache
    raw["tensors"]["layer0.attn_ln_out"]["smooth"] = [1.0, -0.25, 0.5]  # re-signed, so only the vector is wrong
    body = {k: v for k, v in raw.items() if k != "checksum"}
    from calib.cache import _canonical
    from common.files import sha256_bytes
    path.write_text(json.dumps({**body, "checksum": sha256_bytes(_canonical(body))}))
    with pytest.raises(CacheError) as err:
        load_cache(path)
    assert "smoothing vector" in _one_line_naming(err, path)
    with pytest.raises(WorkbenchError):
        TensorRange(1.0, (1.0, float("nan")))


def test_key_depends_on_every_input_and_not_on_the_ranges():
    base = _cache()
    changes = dict(
        method="percentile",
        settings={**base.settings, "seed": 1},
        num_samples=99,
        model_digest="c" * 64,
        data_digest="d" * 64,
        tool_version="0.1.1",
    )
    keys = {base.key()} | {_cache(**{k: v}).key() for k, v in changes.items()}
    assert len(keys) == 1 + len(changes)
    assert _cache(ranges={}).key() == base.key()
    assert _cache(settings=dict(reversed(list(base.settings.items())))).key() == base.key()  # order-free


def test_truncated_file_is_refused(saved):
    data = saved.read_bytes()
    saved.write_bytes(data[: len(data) // 2])
    with pytest.raises(CacheError) as err:
        load_cache(saved)
    assert "truncated" in _one_line_naming(err, saved)


def test_tampered_amax_fails_the_checksum(saved):
    text = saved.read_text()
    tampered = text.replace('"amax": 3.25', '"amax": 3.35')
    assert tampered != text
    saved.write_text(tampered)
    with pytest.raises(CacheError) as err:
        load_cache(saved)
    assert "checksum mismatch" in _one_line_naming(err, saved)


def test_malformed_json_is_refused(saved):
    saved.write_text('{"format_version": 1,, }\n')
    with pytest.raises(CacheError) as err:
        load_cache(saved)
    assert "malformed JSON" in _one_line_naming(err, saved)


def test_wrong_format_version_is_refused(saved):
    obj = json.loads(saved.read_text())
    obj["format_version"] = FORMAT_VERSION + 1
    saved.write_text(json.dumps(obj))
    with pytest.raises(CacheError) as err:
        load_cache(saved)
    assert f"format version {FORMAT_VERSION + 1}" in _one_line_naming(err, saved)


@pytest.mark.parametrize(
    "content, words",
    [
        ("", "empty"),
        ("[1, 2]", "not a JSON object"),
        ('{"format": "something-else", "format_version": 1}', "not a calibration cache"),
    ],
)
def test_other_unusable_files_are_refused(saved, content, words):
    saved.write_text(content)
    with pytest.raises(CacheError) as err:
        load_cache(saved)
    assert words in _one_line_naming(err, saved)


def test_missing_file_is_a_cache_error(tmp_path):
    with pytest.raises(CacheError) as err:
        load_cache(tmp_path / "nope.json")
    assert "not found" in _one_line_naming(err, tmp_path / "nope.json")


def test_find_reusable_returns_the_matching_cache(saved, caplog):
    with caplog.at_level(logging.WARNING):
        assert find_reusable(saved, _cache().key()) == _cache()
        assert find_reusable(saved.with_name("absent.json"), _cache().key()) is None
    assert caplog.records == []


def test_find_reusable_warns_once_for_a_different_key(saved, caplog):
    with caplog.at_level(logging.WARNING):
        assert find_reusable(saved, _cache(num_samples=7).key()) is None
    [record] = caplog.records
    assert str(saved) in record.getMessage() and record.getMessage().endswith("recomputing")


def test_find_reusable_warns_once_for_a_damaged_file(saved, caplog):
    saved.write_text(saved.read_text().replace("12.7", "12.8", 1))
    with caplog.at_level(logging.WARNING):
        assert find_reusable(saved, _cache().key()) is None
    [record] = caplog.records
    msg = record.getMessage()
    assert "\n" not in msg and msg.startswith(f"{saved}:") and "checksum mismatch" in msg
    assert msg.endswith(", recomputing")


def test_saving_twice_replaces_and_default_path_is_under_cache_root(tmp_path):
    cache = _cache()
    path = default_cache_path(cache.key())
    assert path.parent.parent == cache_root() and str(tmp_path) in str(path)  # conftest isolates the cache root
    save_cache(cache, path)
    updated = dataclasses.replace(cache, ranges={"x": TensorRange(1.0)})
    save_cache(updated, path)
    assert load_cache(path) == updated
