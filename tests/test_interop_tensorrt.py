"""The TensorRT backend (interop/tensorrt_backend.py): its one-line error where TensorRT does not import (always
checked, with the import blocked); a real build where TensorRT 10 and a GPU are present (skipped otherwise, as
everywhere in this workplace)."""
from __future__ import annotations

import argparse
import sys

import pytest
import torch

from common.errors import WorkbenchError
from interop import tensorrt_backend
from interop.onnx_export import export_onnx
from quant.policy import PrecisionPolicy
from tests.test_engines import inputs, loaded_model, rel, valid


@pytest.fixture
def no_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError


def test_missing_tensorrt_is_one_line_saying_how_to_install(no_tensorrt, tmp_path):
    for call in (tensorrt_backend.import_tensorrt,
                 lambda: tensorrt_backend.build_plan(tmp_path / "m.onnx", tmp_path / "m.plan", profiles=[(1, 128)]),
                 lambda: tensorrt_backend.TrtForward(tmp_path / "m.plan"),
                 lambda: tensorrt_backend.plan_from_flags(argparse.Namespace(output=str(tmp_path / "m.plan")),
                                                          [(1, 128)])):
        with pytest.raises(WorkbenchError) as e:
            call()
        message = str(e.value)
        assert "\n" not in message and "pip install tensorrt" in message and "TensorRT 10" in message
    assert not tensorrt_backend.available()
    assert not list(tmp_path.iterdir())  # nothing exported or written before the error


@pytest.mark.cuda
def test_tensorrt_plan_runs_the_fp32_export(tmp_path):
    pytest.importorskip("tensorrt")
    if not tensorrt_backend.available():
        pytest.skip("TensorRT older than 10")
    loaded = loaded_model()
    export_onnx(loaded, PrecisionPolicy(), None, {}, tmp_path / "fp32.onnx")
    plan = tensorrt_backend.build_plan(tmp_path / "fp32.onnx", tmp_path / "fp32.plan", profiles=[(4, 64)],
                                       timing_cache=tmp_path / "timing.cache", say=lambda line: None)
    assert plan.stat().st_size > 0 and (tmp_path / "timing.cache").stat().st_size > 0
    x = inputs()
    with torch.no_grad():
        ref = loaded.model(*x)
    got = tensorrt_backend.TrtForward(plan)(*(t.cuda() for t in x))
    assert rel(valid(got[0].cpu(), x[2]), valid(ref[0], x[2])) < 1e-3


def test_the_verbs_take_backend_tensorrt_and_say_how_to_install_it(no_tensorrt, tmp_path, capsys):
    """`build --backend tensorrt` (export, then a plan), and `bench`/`eval` of a .plan: one line saying how to
    install TensorRT where it does not import, exit 2, nothing written; a --backend that does not fit the file is
    one line too."""
    import cli
    from tests.test_calib_calibrate import make_tiny_model, write_squad

    folder = make_tiny_model(tmp_path / "model")
    out = tmp_path / "out"
    squad = write_squad(tmp_path / "dev.json")
    capsys.readouterr()  # transformers' progress bar while the tiny model was saved
    for argv in (["build", "--model", str(folder), "--backend", "tensorrt", "--fp16", "-b", "1", "-s", "64",
                  "-o", str(out / "m.plan")],
                 ["bench", "-e", str(tmp_path / "m.plan")],
                 ["eval", "--squad", str(squad), str(tmp_path / "m.plan")]):
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "pip install tensorrt" in err, argv
    assert not out.exists() or not list(out.iterdir())
    assert cli.main(["bench", "-e", str(tmp_path / "m.engine"), "--backend", "tensorrt"]) == 2
    assert "--backend tensorrt runs TensorRT plans" in capsys.readouterr().err
