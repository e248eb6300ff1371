"""plugins.sparse_linear: the cuSPARSELt families against the dense references they must reproduce.

On the CPU: the wrapper's own logic with the library replaced by exact fakes (compression cache, algorithm
choice, padding, operand order, the epilogue), when the family is a candidate, and what the build says about
2:4 GEMMs. `cuda` tests run the library on random 2:4 weights at small and BERT-sized shapes, every epilogue.
"""
from __future__ import annotations

import dataclasses
import gc

import pytest
import torch

from engines import backends
from engines.build import _sparse_note, build_engine, kernel_choices
from engines.engine_file import Profile
from engines.tuning import LIBRARY, GemmProblem
from plugins import sparse_linear as S
from quant.policy import PrecisionPolicy
from tests.test_backends import pruned_model
from tests.test_engines import inputs, max_calibration
from tests.test_plugins_common import assert_codes_close, gen, rel, replayed
from tests.test_plugins_int8_linear import EPILOGUES, kwargs_for, problem

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def prune24(w: torch.Tensor, seed: int) -> torch.Tensor:
    """w with 2 of every 4 consecutive values along K zeroed, at random places."""
    n, k = w.shape
    keep = torch.rand(n, k // 4, 4, generator=gen(seed)).argsort(dim=-1)[..., :2]
    mask = torch.zeros(n, k // 4, 4, dtype=torch.bool).scatter_(-1, keep, True).view(n, k)
    return torch.where(mask.to(w.device), w, torch.zeros((), dtype=w.dtype, device=w.device))


def sparse_problem(m, n, k, seed, epilogue, device=DEVICE):
    """An INT8 problem (tests/test_plugins_int8_linear.py) with a 2:4 weight, and its epilogue's arguments."""
    a, w, a_scale, w_scale, bias, res = problem(m, n, k, seed, device=device,
                                                residual=EPILOGUES[epilogue].get("residual"))
    w = prune24(w, seed)
    return a, w, a_scale, w_scale, bias, kwargs_for(epilogue, a, w, a_scale, w_scale, bias, res)


@pytest.fixture
def fake_library(monkeypatch):
    """cuSPARSELt replaced by exact CPU fakes: the "compressed" weight is the weight itself, the product is
    computed in float64 (exact for int8), and every call is recorded."""
    calls = {"compress": 0, "mm": []}

    def compress(w):
        calls["compress"] += 1
        return w.clone()

    def mm(data, b, bias=None, alpha=None, out_dtype=None, transpose_result=False, alg_id=0):
        assert transpose_result and not b.is_contiguous() and b.shape[1] % S._DENSE_ROWS[b.dtype] == 0
        calls["mm"].append(alg_id)
        out = data.double() @ b.double() + (bias.double()[:, None] if bias is not None else 0)
        return out.t().contiguous().to(out_dtype or b.dtype)

    monkeypatch.setattr(S, "_compress", compress)
    monkeypatch.setattr(torch, "_cslt_sparse_mm", mm)
    return calls


# ------------------------------------------------------------------------------------------------ CPU

def test_a_weight_is_compressed_once_while_it_is_the_same_unmodified_tensor(fake_library):
    w = prune24(torch.randint(-127, 128, (64, 96), dtype=torch.int8, generator=gen(1)), 1)
    first = S.compressed(w)
    assert S.compressed(w) is first and fake_library["compress"] == 1
    other = w.clone()  # a new tensor (a new engine's weights): compressed afresh, never the stale entry
    assert S.compressed(other) is not first and fake_library["compress"] == 2
    w.mul_(1)  # written in place: compressed again
    assert S.compressed(w) is not first and fake_library["compress"] == 3
    with torch.inference_mode():
        frozen = w.clone()  # no version counter; still one compression
    assert S.compressed(frozen) is S.compressed(frozen) and fake_library["compress"] == 4
    key = id(other)
    del other
    gc.collect()
    assert key not in S._COMPRESSED  # a dead weight's entry goes with it
    with pytest.raises(ValueError, match="not 2:4 sparse"):
        S.compressed(torch.ones(64, 96, dtype=torch.int8))


@pytest.mark.parametrize("epilogue", list(EPILOGUES))
def test_sparse_linear_is_the_reference_around_the_library(fake_library, epilogue):
    """Operand order, row padding and the float32 epilogue, exact against int8_linear_reference (the library
    being exact here, as its int32 accumulator is on the GPU)."""
    from plugins.int8_linear import int8_linear_reference

    a, w, a_scale, w_scale, bias, kw = sparse_problem(37, 64, 96, list(EPILOGUES).index(epilogue), epilogue,
                                                      device="cpu")
    out = S.sparse_linear(a, S.compressed(w), a_scale, w_scale, bias, config="alg5", **kw)
    assert torch.equal(out, int8_linear_reference(a, w, a_scale, w_scale, bias, **kw))
    assert fake_library["mm"] == [5]


def test_sparse_mm_pads_rows_and_runs_the_named_algorithm(fake_library):
    w = prune24(torch.randn(64, 96, generator=gen(2)).half(), 2)
    bias = torch.randn(64, generator=gen(3)).half()
    cw = S.compressed(w)
    for m, config in ((16, "alg0"), (12, "alg0"), (40, "alg2")):  # 12 rows padded to 16
        a = torch.randn(m, 96, generator=gen(m)).half()
        out = S.sparse_mm(a, cw, bias=bias, config=config)
        assert out.shape == (m, 64) and out.is_contiguous()
        assert torch.equal(out, (a.double() @ w.double().t() + bias.double()).half())
    assert fake_library["mm"] == [0, 0, 2]
    with pytest.raises(ValueError, match="unknown configuration"):  # the library's search is not offered
        S.sparse_mm(torch.zeros(8, 96).half(), cw, config="search")
    with pytest.raises(ValueError, match="unknown configuration"):
        S.sparse_mm(torch.zeros(8, 96).half(), cw, config="fastest")
    with pytest.raises(ValueError, match="fused bias must be a contiguous torch.float16"):
        S.sparse_mm(torch.zeros(8, 96).half(), cw, bias=bias.float())


def test_cusparselt_is_a_candidate_only_for_sparse_builds_on_cuda(monkeypatch):
    int8 = GemmProblem("qkv", 128, 1152, 384, "int8", "bias")
    here = backends.gemm_candidates(int8, "int8", True, sparse=True)
    assert any(i.startswith("cusparselt") for i in here) == S.available()  # never on the CPU
    assert not any(i.startswith("cusparselt") for i in backends.gemm_candidates(int8, "int8", True))  # dense build
    monkeypatch.setattr(S, "available", lambda: True)  # as on a GPU with cuSPARSELt
    assert backends.gemm_candidates(int8, "int8", True, sparse=True)[-1:] == ["cusparselt:alg0"]
    assert not any(i.startswith("cusparselt") for i in backends.gemm_candidates(int8, "int8", True))
    assert not any(i.startswith("cusparselt") for i in backends.gemm_candidates(int8, "int8", False, sparse=True))
    assert backends.runnable("cusparselt:alg0", "fp", True, sparse=True)
    assert not backends.runnable("cusparselt:alg0", "fp", True, sparse=False)
    for dtype, n, k, offered in (("float16", 1152, 384, True), ("bfloat16", 48, 16, True), ("int8", 48, 64, False),
                                 ("float32", 1152, 384, False), ("int8", 1152, 100, False)):
        fmt = "int8" if dtype == "int8" else "fp"
        impls = backends.gemm_candidates(GemmProblem("fc1", 64, n, k, dtype, "bias"), fmt, True, sparse=True)
        assert any(i.startswith("cusparselt") for i in impls) == offered, (dtype, n, k)
    monkeypatch.setattr(S, "available", lambda: False)  # cuSPARSELt missing: not a candidate, not run
    assert not backends.runnable("cusparselt:alg0", "int8", True, sparse=True)


def test_a_sparse_build_says_which_gemms_run_sparse_and_why():
    loaded = pruned_model(seed=4)
    policy = PrecisionPolicy(int8=True, fp16=True, sparse=True)
    header, _ = build_engine(loaded, policy, [Profile(1, 32)], max_calibration(loaded), torch.device("cpu"), None)
    assert kernel_choices(header) == ["2:4 weights: dense kernels on the pruned weights (not timed: sparse GEMMs are "
                                      "chosen by CUDA builds)"]
    timed = dataclasses.replace(header, kernels={
        **header.kernels, "gemm.qkv.m32": "cusparselt:alg0", "gemm.fc1.m32": "triton:16x32x128-g8-w4-s4-pf",
        "sparse.gemm.fc1.m32": _sparse_note({LIBRARY: 0.2, "triton:x": 0.1, "cusparselt:alg0": 0.15}),
        "gemm.attn_out.m32": LIBRARY, "sparse.gemm.attn_out.m32": _sparse_note({LIBRARY: 0.1}),
        "gemm.fc2.fp.m32": LIBRARY,
        "sparse.gemm.fc2.fp.m32": _sparse_note({LIBRARY: 0.1, "cusparselt:x": float("inf")})})
    assert timed.kernels["sparse.gemm.fc1.m32"] == "slower: cusparselt:alg0 0.150 ms against 0.100 ms dense"
    assert kernel_choices(timed) == [
        "1x32: qkv cusparselt:alg0 (2:4 sparse), attn_out library dense (no sparse kernel here), "
        "fc1 triton:16x32x128-g8-w4-s4-pf dense (sparse slower here), fc2/fp16 library dense (sparse failed here)",
        "2:4 weights: 1 of 4 GEMM choices run sparse (cuSPARSELt), the others dense kernels on the pruned weights"]
    slower = dataclasses.replace(timed, kernels={**timed.kernels, "gemm.qkv.m32": LIBRARY})
    assert kernel_choices(slower)[-1] == ("2:4 weights: dense kernels on the pruned weights (sparse GEMMs were "
                                          "slower at every GEMM timed)")
    dense = dataclasses.replace(header, policy={**header.policy, "sparse": False},
                                kernels={**header.kernels, "gemm.qkv.m32": LIBRARY})
    assert kernel_choices(dense) == ["1x32: qkv library"]


# ------------------------------------------------------------------------------------------------ CUDA

SHAPES = [(1, 64, 96), (37, 64, 96), (128, 1152, 384), (128, 384, 1536), (384, 1536, 384)]  # BERT-base-like


@pytest.mark.cuda
@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("epilogue", list(EPILOGUES))
@pytest.mark.parametrize("config", S.CONFIGS)
def test_cuda_sparse_linear_matches_the_reference(m, n, k, epilogue, config):
    """The int32 accumulator is exact and the epilogue the reference's own ops: equal bit for bit."""
    from plugins.int8_linear import int8_linear_reference

    a, w, a_scale, w_scale, bias, kw = sparse_problem(m, n, k, m + n + k, epilogue)
    out = S.sparse_linear(a, S.compressed(w), a_scale, w_scale, bias, config=config, **kw)
    ref = int8_linear_reference(a, w, a_scale, w_scale, bias, **kw)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert torch.equal(out, ref), f"{int((out != ref).sum())} of {out.numel()} differ"


FP_EPILOGUES = {
    "bias": dict(),
    "gelu": dict(gelu=True),
    "residual": dict(residual=True),
    "residual8": dict(residual=True, residual_scale=1 / 57.3),
    "codes": dict(codes=True),
    "residual+codes/channel": dict(residual=True, codes="channel"),
}


@pytest.mark.cuda
@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("epilogue", list(FP_EPILOGUES))
@pytest.mark.parametrize("config", S.CONFIGS)
def test_cuda_fp16_sparse_family_matches_the_fp_library(m, n, k, epilogue, config):
    """The FP16 family against the FP library family's function: rel. error < 1e-3, codes within the budget."""
    e, g = FP_EPILOGUES[epilogue], gen(m + n + k)
    a = torch.randn(m, k, generator=g).half().cuda()
    w = prune24(torch.randn(n, k, generator=g) / k ** 0.5, m + n).half().cuda()
    kw = dict(bias=(torch.randn(n, generator=g) * 0.5).half().cuda(), gelu=e.get("gelu", False))
    if e.get("residual"):
        res = torch.randn(m, n, generator=g) * 2
        kw["residual"] = (torch.clamp(torch.round(res * 30), -127, 127).to(torch.int8) if "residual_scale" in e
                          else res.half()).cuda()
        kw["residual_scale"] = e.get("residual_scale")
    library, sparse = (backends.gemm_backend(f, "fp").run for f in (LIBRARY, "cusparselt"))
    if e.get("codes"):
        y = library("", a, w, None, None, **kw).float()
        amax = y.abs().amax(dim=0).clamp_min(1e-3) if e["codes"] == "channel" else y.abs().max()
        recip = (127 / (0.8 * amax)).float()
        kw["out_recip"] = recip.contiguous() if e["codes"] == "channel" else float(recip)
    ref = library("", a, w, None, None, **kw)
    out = sparse(config, a, w, None, None, **kw)
    if ref.dtype == torch.int8:
        assert_codes_close(out, ref)
    else:
        assert out.dtype == ref.dtype and rel(out, ref) < 1e-3


@pytest.mark.cuda
def test_cuda_sparse_linear_replays_in_a_cuda_graph():
    """Compressed on the warm-up call, captured, replayed on new inputs written in place."""
    from plugins.int8_linear import int8_linear_reference

    a, w, a_scale, w_scale, bias, kw = sparse_problem(128, 1536, 384, 5, "gelu+int8")
    out = replayed(lambda: S.sparse_linear(a, S.compressed(w), a_scale, w_scale, bias, config="alg0", **kw), a, 6)
    assert torch.equal(out, int8_linear_reference(a, w, a_scale, w_scale, bias, **kw))
    fresh = w.clone()
    with pytest.raises(RuntimeError, match="inside a CUDA graph capture"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            S.compressed(fresh)


@pytest.mark.cuda
@pytest.mark.parametrize("policy", [PrecisionPolicy(int8=True, fp16=True, sparse=True),
                                    PrecisionPolicy(fp16=True, sparse=True)], ids=["int8", "fp16"])
def test_cuda_sparse_build_chooses_per_gemm_and_says_why(policy):
    from engines.runtime import Engine

    loaded = pruned_model(seed=5)
    calib = max_calibration(loaded) if policy.int8 else None
    header, tensors = build_engine(loaded, policy, [Profile(2, 32)], calib, torch.device("cuda"), None)
    fp = "" if policy.int8 else ".fp"
    for kind in ("qkv", "attn_out", "fc1", "fc2"):
        chosen = header.kernels[f"gemm.{kind}{fp}.m64"]
        assert backends.is_sparse(chosen) or f"sparse.gemm.{kind}{fp}.m64" in header.kernels
    lines = kernel_choices(header)
    assert lines[0].startswith("2x32: qkv") and lines[-1].startswith("2:4 weights: ")
    dense_policy = dataclasses.replace(policy, sparse=False)
    dense, dense_tensors = build_engine(loaded, dense_policy, [Profile(2, 32)], calib, torch.device("cuda"), None)
    x = inputs(batch=2, seq=32, device="cuda")
    with torch.no_grad():
        got = Engine(header, tensors, torch.device("cuda"))(*x)
        want = Engine(dense, dense_tensors, torch.device("cuda"))(*x)
    for g, w_ in zip(got, want):
        assert rel(g.float(), w_.float()) < 2e-2
