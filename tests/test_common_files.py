"""common.files: atomic writes leave either the old file or the new one, never a temp file or a partial write."""
from __future__ import annotations

import os
import stat

import pytest

from common.files import atomic_path, atomic_write_json, read_json


def test_atomic_write_replaces_whole_and_leaves_no_temp(tmp_path):
    target = tmp_path / "out" / "x.json"
    atomic_write_json(target, {"a": 1})
    atomic_write_json(target, {"a": 2})
    assert read_json(target) == {"a": 2}
    assert [p.name for p in target.parent.iterdir()] == ["x.json"]


def test_failure_inside_keeps_the_old_file(tmp_path):
    target = tmp_path / "x.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["x.txt"]


def test_outputs_get_the_mode_of_a_plain_open(tmp_path):
    """mkstemp creates 0600 files; a predictions file or report must be readable like any other output."""
    old = os.umask(0o022)
    try:
        atomic_write_json(tmp_path / "p.json", {})
        (tmp_path / "plain").write_text("")
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "p.json").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "plain").stat().st_mode) == 0o644
