"""Adding a GEMM family, an attention family or a format is a change in one place: toy ones, registered here, are
listed as build candidates, chosen by an engine header, and run by the runtime without any edit to it."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from common.errors import WorkbenchError
from engines import backends
from engines.engine_file import EngineHeader
from engines.runtime import Engine
from engines.tuning import LIBRARY, GemmProblem, kernel_key
from quant.fakequant import fake_quant_model
from quant.formats import INT8, QuantFormat, get_format, register_format, unregister_format
from quant.policy import PrecisionPolicy
from quant.quantizer import dequantize, fake_quantize, quantize, scale_from_amax
from quant.spec import QuantSpec, SiteSpec
from tests.test_engines import CFG, build, inputs, loaded_model, max_calibration


@pytest.fixture
def toy_gemm():
    """A toy INT8 GEMM family that runs the reference and records every call."""
    calls: list[tuple[str, tuple[int, ...]]] = []
    reference = backends.gemm_backend(LIBRARY, "int8").run

    def run(config, a, *args, **kw):
        calls.append((config, tuple(a.shape)))
        return reference("", a, *args, **kw)

    backends.register_gemm(backends.GemmBackend("toy", "int8", lambda problem: ["a", "b"], run))
    yield calls
    backends.unregister("toy", "int8")


def test_a_registered_gemm_family_is_a_build_candidate_after_the_reference(toy_gemm):
    problem = GemmProblem("qkv", 64, 192, 64, "int8", "bias")
    impls = backends.gemm_candidates(problem, "int8", gpu_kernels=False)
    assert impls[0] == LIBRARY and impls[-2:] == ["toy:a", "toy:b"]
    assert not any(i.startswith("triton:") for i in impls)  # GPU kernel families only where they can run
    assert "triton:128x128x128-g8-w8-s3" in backends.gemm_candidates(problem, "int8", gpu_kernels=True)
    assert backends.gemm_candidates(problem, "fp", gpu_kernels=True) == [LIBRARY]


def test_the_runtime_runs_a_registered_family_the_header_names(toy_gemm):
    loaded = loaded_model()
    policy = PrecisionPolicy(int8=True)
    engine = build(loaded, policy, max_calibration(loaded))
    x = inputs(batch=2, seq=32)
    with torch.no_grad():
        want = engine(*x)
    m = 2 * 32
    chosen = {kernel_key("qkv", m): "toy:b", kernel_key("fc1", m): "toy:a"}
    header = dataclasses.replace(engine.header, kernels={**engine.header.kernels, **chosen})
    toy = Engine(header, engine.t, engine.device).eval()
    with torch.no_grad():
        got = toy(*x)
    assert toy_gemm == [("b", (m, CFG.hidden_size)), ("a", (m, CFG.hidden_size))] * CFG.num_layers
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_a_family_this_workbench_lacks_or_cannot_run_falls_back_to_the_reference():
    loaded = loaded_model()
    engine = build(loaded, PrecisionPolicy(int8=True), max_calibration(loaded))
    header = dataclasses.replace(engine.header, kernels={**engine.header.kernels,
                                                         kernel_key("qkv", 64): "sparse24:x",
                                                         kernel_key("fc1", 64): "triton:128x128x128-g8-w4-s3"})
    cpu = Engine(header, engine.t, engine.device)
    assert cpu.impl("qkv", 64) == LIBRARY and cpu.impl("fc1", 64) == LIBRARY  # unknown; GPU kernels on a CPU
    with pytest.raises(WorkbenchError, match="no int8 GEMM implementation 'sparse24:x' is registered"):
        backends.gemm_backend("sparse24:x", "int8")


def test_a_registered_attention_family_runs_where_the_header_names_it():
    calls = []
    reference = backends.attention_backend(LIBRARY, "fp").run

    def run(config, qkv, *args, **kw):
        calls.append(config)
        return reference("", qkv, *args, **kw)

    backends.register_attention(backends.AttentionBackend("toy-attention", "fp", lambda b, s: ["x"], run))
    try:
        assert backends.attention_candidates(2, 32, "fp", gpu_kernels=False) == [LIBRARY, "toy-attention:x"]
        loaded = loaded_model()
        engine = build(loaded, PrecisionPolicy(int8=True), max_calibration(loaded))
        header = dataclasses.replace(engine.header, kernels={**engine.header.kernels,
                                                             "attention.b4s64": "toy-attention:x"})
        x = inputs(batch=4, seq=64)
        with torch.no_grad():
            want = engine(*x)
            got = Engine(header, engine.t, engine.device)(*x)
        assert calls == ["x"] * CFG.num_layers
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=0, atol=0)
    finally:
        backends.unregister("toy-attention", "fp")


@pytest.fixture
def int4():
    fmt = register_format(QuantFormat("int4", torch.int8, 7, integer=True))
    yield fmt
    unregister_format("int4")


def test_a_registered_format_quantizes_through_the_one_quantizer(int4):
    x = torch.linspace(-2.0, 2.0, 101)
    scale = scale_from_amax(1.4, int4)
    assert float(scale) == pytest.approx(0.2)
    codes = quantize(x, scale, int4)
    assert codes.dtype == torch.int8 and int(codes.max()) == 7 and int(codes.min()) == -7
    assert torch.equal(codes, torch.clamp(torch.round(x / 0.2), -7, 7).to(torch.int8))
    assert torch.equal(fake_quantize(x, scale, int4), dequantize(codes, scale))
    assert get_format("int4") is int4


def test_a_registered_format_round_trips_through_an_engine_header_and_the_fake_quant_reference(int4):
    loaded = loaded_model()
    engine = build(loaded, PrecisionPolicy(int8=True), max_calibration(loaded))
    int4_spec = QuantSpec({name: SiteSpec(int4, s.amax, s.granularity, s.source)
                           for name, s in engine.spec.sites.items()}, int4)
    header = dataclasses.replace(engine.header, quant=int4_spec.to_json())
    assert EngineHeader.from_json(header.to_json(), "x.engine").spec == int4_spec
    x = inputs(batch=2, seq=32)
    with torch.no_grad():
        fp = loaded.model(*x)[0]
        err8 = (fake_quant_model(loaded.model, engine.policy, engine.spec)(*x)[0] - fp).abs().mean()
        err4 = (fake_quant_model(loaded.model, engine.policy, int4_spec)(*x)[0] - fp).abs().mean()
    assert err4 > 2 * err8  # 15 levels instead of 255: the format reached every quantized site and weight


def test_the_flags_compile_to_one_spec():
    policy = PrecisionPolicy(int8=True, iln=True, fp16_gemms=("layer1.fc2",))
    sites = policy.quantized_sites(2)
    spec = policy.spec(2, {s: 2.54 for s in sites}, smoothed={"layer0.fc2_in"})
    assert tuple(spec.sites) == sites and "layer1.fc2_in" not in spec.sites
    assert all(s.format is INT8 for s in spec.sites.values()) and spec.weight_format is INT8
    assert spec.sites["layer0.fc2_in"].granularity == "per_channel"
    assert spec.sites["layer0.attn_ln_out"].granularity == "per_tensor"
    assert spec.sites["layer0.attn_ln_out"].scale == float(torch.tensor(2.54) / 127)
    assert PrecisionPolicy(fp16=True).spec(2, {}) == QuantSpec()
    with pytest.raises(WorkbenchError, match="no range for embeddings.ln_out"):
        policy.spec(2, {})


# ------------------------------------------------------------------ sparse families: 2:4 weights of --sparse builds

def pruned_model(seed: int = 0):
    """A random model whose encoder GEMM weights keep the 2 largest |w| of every 4 along K (2:4)."""
    loaded = loaded_model(seed)
    with torch.no_grad():
        for name, p in loaded.model.named_parameters():
            if name.startswith("layers.") and name.endswith("weight") and p.dim() == 2:
                groups = p.view(p.shape[0], -1, 4)
                drop = groups.abs().argsort(dim=-1)[..., :2]
                groups.scatter_(-1, drop, 0.0)
    return loaded


@pytest.fixture
def toy_sparse():
    """A toy sparse GEMM family (INT8 and FP) that runs the reference and records every call."""
    calls: list[str] = []
    for fmt in ("int8", "fp"):
        reference = backends.gemm_backend(LIBRARY, fmt).run

        def run(config, a, *args, reference=reference, **kw):
            calls.append(config)
            return reference("", a, *args, **kw)

        backends.register_gemm(backends.GemmBackend("toy24", fmt, lambda problem: ["x"], run, sparse=True))
    yield calls
    for fmt in ("int8", "fp"):
        backends.unregister("toy24", fmt)


def test_a_sparse_family_is_a_candidate_only_for_2to4_weights(toy_sparse):
    problem = GemmProblem("qkv", 64, 192, 64, "int8", "bias")
    assert "toy24:x" not in backends.gemm_candidates(problem, "int8", gpu_kernels=True)
    assert backends.gemm_candidates(problem, "int8", gpu_kernels=False, sparse=True)[-1] == "toy24:x"
    assert not backends.runnable("toy24:x", "int8", gpu_kernels=True)
    assert backends.runnable("toy24:x", "int8", gpu_kernels=False, sparse=True)
    assert backends.is_sparse("toy24:x") and backends.is_sparse("cusparselt:alg0")
    assert not backends.is_sparse("triton:a") and not backends.is_sparse(LIBRARY)


def test_an_engine_never_offers_or_runs_a_sparse_family_on_dense_weights(toy_sparse):
    loaded = pruned_model()
    calib = max_calibration(loaded)
    dense = build(loaded, PrecisionPolicy(int8=True), calib)  # 2:4 weights, but not a --sparse build
    sparse = build(loaded, PrecisionPolicy(int8=True, sparse=True), calib)
    assert not any(g.sparse for g in dense.gemms.values()) and all(g.sparse for g in sparse.gemms.values())
    for kind in ("qkv", "attn_out", "fc1", "fc2"):
        assert "toy24:x" not in dense.gemm_candidates(kind, 64)[1]
        assert "toy24:x" in sparse.gemm_candidates(kind, 64)[1]
    assert dense.gemm_candidates("qkv", 64, "fp") is None  # no FP GEMMs in this build
    chosen = {kernel_key("qkv", 64): "toy24:x", kernel_key("fc1", 64): "toy24:x"}
    x = inputs(batch=2, seq=32)
    with torch.no_grad():
        want = dense(*x)
        on_dense = Engine(dataclasses.replace(dense.header, kernels={**dense.header.kernels, **chosen}), dense.t,
                          dense.device)
        assert on_dense.impl("qkv", 64, "int8", sparse=False) == LIBRARY
        for g, w in zip(on_dense(*x), want):
            torch.testing.assert_close(g, w, rtol=0, atol=0)
        assert toy_sparse == []
        with pytest.raises(WorkbenchError, match="runs 2:4-sparse weights only"):
            on_dense._linear("layers.0.qkv", torch.zeros(4, CFG.hidden_size, dtype=torch.int8), impl="toy24:x")
        on_sparse = Engine(dataclasses.replace(sparse.header, kernels={**sparse.header.kernels, **chosen}),
                           sparse.t, sparse.device)
        for g, w in zip(on_sparse(*x), want):
            torch.testing.assert_close(g, w, rtol=0, atol=0)
    assert toy_sparse == ["x"] * 2 * CFG.num_layers


def test_the_fp_gemms_of_a_sparse_build_are_timing_candidates_under_their_own_key(toy_sparse):
    """FP GEMMs are timed in --sparse builds only, under gemm.KIND.fp.mM (a --keep-fp16 build holds both)."""
    from engines.runtime import gemm_kernel_key

    loaded = pruned_model(seed=3)
    policy = PrecisionPolicy(int8=True, sparse=True, fp16_gemms=("layer1.fc1",))
    engine = build(loaded, policy, max_calibration(loaded))
    problem, candidates, calls = engine.gemm_candidates("fc1", 16, "fp")
    assert calls == 1 and problem.dtype == "float32" and problem.epilogue == "bias+gelu->int8"
    assert list(candidates) == [LIBRARY, "toy24:x"]
    assert torch.equal(candidates["toy24:x"](), candidates[LIBRARY]())
    assert gemm_kernel_key("fc1", 16, quantized=False) == "gemm.fc1.fp.m16"
    header = dataclasses.replace(engine.header, kernels={**engine.header.kernels, "gemm.fc1.fp.m64": "toy24:x"})
    toy = Engine(header, engine.t, engine.device)
    assert toy.impl("fc1", 64, "fp", sparse=True) == "toy24:x" and toy.impl("fc1", 64, "int8", sparse=True) == LIBRARY
    toy_sparse.clear()
    with torch.no_grad():
        toy(*inputs(batch=2, seq=32))
    assert toy_sparse == ["x"]  # layer 1's FP fc1 only
