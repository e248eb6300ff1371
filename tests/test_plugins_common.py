"""plugins' shared INT8 rounding step against quant.quantizer, and the helpers the plugins tests share.

The kernel tests run on CUDA with compiled kernels where there is a GPU, and elsewhere on CPU tensors in
Triton's interpreter. Triton picks the mode when it decorates a kernel, i.e. when a plugins module is imported,
so `kernels()` sets TRITON_INTERPRET=1 around that import (re-importing modules that something imported
earlier in compiled mode) and then restores the variable: the rest of the test session never sees it.
"""
from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

from quant.quantizer import reciprocal, quantize

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _has_compiled_kernels(module) -> bool:
    from triton.runtime.jit import JITFunction

    return any(isinstance(v, JITFunction) for v in vars(module).values())


def kernels(name: str):
    """plugins.<name>, with kernels that run on DEVICE; skips the calling test module without Triton."""
    pytest.importorskip("triton", reason="Triton is not installed (plugins' kernels need it)")
    if DEVICE == "cuda":
        return importlib.import_module(f"plugins.{name}")
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        common = importlib.import_module("plugins.common")
        reload = _has_compiled_kernels(common)
        if reload:
            importlib.reload(common)
        module = importlib.import_module(f"plugins.{name}")
        if reload or _has_compiled_kernels(module):
            module = importlib.reload(module)
        return module
    finally:
        if before is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = before


@pytest.fixture
def poison(monkeypatch):
    """Outputs start as int8 -128 / NaN, values no kernel writes, so an element left unwritten fails."""
    monkeypatch.setattr(sys.modules["plugins.common"], "POISON", True)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def replayed(run, a: torch.Tensor, seed: int) -> torch.Tensor:
    """run() warmed up, captured in a CUDA graph, and replayed after new INT8 codes were written into its input
    `a` in place: the graph's output, which must be the function of the new input."""
    run()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    a.copy_(torch.randint(-127, 128, a.shape, dtype=torch.int8, generator=gen(seed)).to(a.device))
    graph.replay()
    torch.cuda.synchronize()
    return out


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    assert torch.isfinite(out).all(), "non-finite (unwritten?) output elements"
    return float((out - ref).norm() / ref.norm())


def assert_codes_close(q: torch.Tensor, ref: torch.Tensor, rate: float = 1e-3):
    """INT8 codes equal, but for a rare 1-off where a value sits on a .5 boundary (FMA, exp, reduction order): in
    at most `rate` of places (an FP8 GEMM's INT8 codes: engines.tuning.FP8_CODES_OFF, its tensor cores' sums)."""
    assert q.dtype == torch.int8 and q.shape == ref.shape
    q, ref = q.cpu(), ref.cpu()
    assert int(q.min()) >= -127, "unwritten (poisoned) or out-of-range codes"
    diff = (q.int() - ref.int()).abs()
    assert int(diff.max()) <= 1, f"codes differ by {int(diff.max())}"
    # at most 1 in 1,000, or 4 in a small sample (a row of 1,536 codes can hold 2 at a rate of 1 in 2,000)
    ones = int((diff == 1).sum())
    assert ones <= max(4, rate * diff.numel()), f"{ones} codes of {diff.numel()} differ"


# ------------------------------------------------------------------------------------------------ tests


def test_codes_reference_is_calib_quantizer():
    common = kernels("common")
    g = gen(11)
    for scale in (0.013, 0.5, 1.0 / 127, 3.7):
        for dtype in (torch.float16, torch.float32):
            x = (torch.randn(64, 96, generator=g) * 60 * scale).to(dtype)
            recip = common.out_recip(scale)
            assert recip == reciprocal(scale, torch.device("cpu"))
            assert torch.equal(common.codes_reference(x, recip), quantize(x, scale))


def test_codes_reference_rounds_half_to_even_and_clamps():
    common = kernels("common")
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, 127.5, -127.5, 1e10, -1e10, float("inf")])
    assert common.codes_reference(x, 1.0).tolist() == [0, 2, 2, 0, -2, -2, 126, 127, -127, 127, -127, 127]


def test_available(monkeypatch):
    pytest.importorskip("triton")
    import plugins

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert plugins.available() and plugins.interpreted()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert plugins.available() == torch.cuda.is_available()


def test_programmatic_dependent_launch_only_on_hopper_cuda_compiled(monkeypatch):
    """PDL where it exists (CUDA, sm_90+, compiled kernels) unless BERTQA_PDL=0 turned it off; never on the CPU
    or in the interpreter, whose kernels have no grid-dependency instructions."""
    pytest.importorskip("triton")
    common = importlib.import_module("plugins.common")
    cuda = torch.device("cuda", 0)
    assert not common.pdl(torch.device("cpu"))
    monkeypatch.setattr(common, "_pdl_capable", lambda device: True)
    monkeypatch.setattr(common, "interpreted", lambda: False)
    monkeypatch.setattr(common, "PDL_ENABLED", True)
    assert common.pdl(cuda)
    monkeypatch.setattr(common, "PDL_ENABLED", False)
    assert not common.pdl(cuda)
    monkeypatch.setattr(common, "PDL_ENABLED", True)
    monkeypatch.setattr(common, "interpreted", lambda: True)
    assert not common.pdl(cuda)
    monkeypatch.setattr(common, "interpreted", lambda: False)
    monkeypatch.setattr(common, "_pdl_capable", lambda device: False)
    assert not common.pdl(cuda)
