"""--fp8 builds (issue 21): the policy, the FP8 GEMM reference, the engine's CPU path against the fake-quant
reference, FP8 scales from an existing cache, engine files, the pre-Hopper refusal, the agreement rule for FP8
codes; the engine on our FP8 Triton kernels (fused GEMM epilogue, E4M3 codes from the LayerNorms and attention)
in Triton's interpreter and the build's FP8 candidates; _scaled_mm and FP8 builds on CUDA."""
from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

import cli
from common.errors import WorkbenchError
from engines import backends
from engines.build import build_engine, load_runnable
from engines.engine_file import Profile, read_header, save_engine
from engines.runtime import Engine
from engines.tuning import FP8_CODES_OFF, agrees, fp8_steps
from plugins.fp8_linear import fp8_linear_reference, fp8_scaled_mm
from plugins.int8_linear import quantized_epilogue_reference
from quant.formats import FP8_E4M3, INT8
from quant.policy import PrecisionPolicy
from quant.quantizer import fake_quantize, quantize, scale_from_amax, weight_scales
from tests.test_engines import (CFG, assert_matches_fake_quant, build, inputs, loaded_model, max_calibration, rel,
                                valid)
from tests.test_plugins_common import kernels

FP8_POLICIES = {
    "fp8": PrecisionPolicy(fp8=True),
    "fp8 --keep-fp16 qkv,layer1.fc2": PrecisionPolicy(fp8=True, fp16_gemms=("qkv", "layer1.fc2")),
    "fp8 --keep-fp16 attn_out,layer0.fc1": PrecisionPolicy(fp8=True, fp16_gemms=("attn_out", "layer0.fc1")),
    "fp8 -iln": PrecisionPolicy(fp8=True, iln=True),  # the residual stream as E4M3 codes
    "fp8 -iln --keep-fp16 qkv,layer1.fc2": PrecisionPolicy(fp8=True, iln=True, fp16_gemms=("qkv", "layer1.fc2")),
}


def test_policy_formats_and_spec_scales_from_an_int8_cache():
    """--fp8 quantizes --int8's sites, in E4M3, with scale amax / 448 from the same cache's ranges."""
    loaded = loaded_model()
    calib = max_calibration(loaded)
    policy = PrecisionPolicy(fp8=True, fp16_gemms=("layer1.fc2",))
    assert policy.format is FP8_E4M3 and policy.gemm_format(0, "qkv") is FP8_E4M3
    assert policy.gemm_format(1, "fc2") is None and "--fp8" in policy.describe()
    assert policy.quantized_sites(2) == PrecisionPolicy(int8=True, fp16_gemms=("layer1.fc2",)).quantized_sites(2)
    header, tensors = build_engine(loaded, policy, [Profile(1, 32)], calib, torch.device("cpu"), None)
    assert header.spec.weight_format is FP8_E4M3 and header.calibration == "max (4 q)"
    for site, s in header.spec.sites.items():
        assert s.format is FP8_E4M3
        assert s.scale == float(scale_from_amax(calib.ranges[site].amax, FP8_E4M3))
        assert s.scale == pytest.approx(calib.ranges[site].amax / 448, rel=1e-6)
    w = tensors["layers.0.fc1.weight"]
    assert w.dtype == torch.float8_e4m3fn and tensors["layers.0.fc1.weight_scale"].shape == (w.shape[0],)
    assert float(w.float().abs().amax(dim=1).min()) == 448.0  # every row uses its full range
    assert tensors["layers.1.fc2.weight"].dtype == torch.float32  # --keep-fp16: floating point


@pytest.mark.parametrize("kwargs, message", [
    (dict(int8=True, fp8=True), "give --int8 or --fp8, not both"),
    (dict(fp8=True, imh=True), "INT8-only"),
    (dict(iln=True), "add --int8"),
])
def test_policy_refuses_fp8_with_int8_options(kwargs, message):
    with pytest.raises(WorkbenchError, match=message):
        PrecisionPolicy(**kwargs)


@pytest.mark.parametrize("flags, message", [(["--int8", "--fp8"], "give --int8 or --fp8, not both"),
                                            (["--fp8", "-imh"], "INT8-only")])
def test_cli_build_refuses_in_one_line(flags, message, tmp_path, capsys):
    assert cli.main(["build", "--model", "bert-base", "--device", "cpu", *flags, "-o", str(tmp_path / "x")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0]


def test_fp8_reference_is_the_epilogue_of_the_exact_products():
    """Float32 accumulation of E4M3 products (each exact, the sums rounded) then the shared epilogue; FP8 codes."""
    g = torch.Generator().manual_seed(0)
    a, w = torch.randn(24, 64, generator=g), torch.randn(48, 64, generator=g)
    a_scale, w_scale = float(scale_from_amax(a.abs().max(), FP8_E4M3)), weight_scales(w, FP8_E4M3)
    a_q, w_q = quantize(a, a_scale, FP8_E4M3), quantize(w, w_scale, FP8_E4M3)
    bias, residual = torch.randn(48, generator=g), torch.randn(24, 48, generator=g)
    y = fp8_linear_reference(a_q, w_q, a_scale, w_scale.view(-1), bias, residual=residual, gelu=True,
                             out_dtype=torch.float32)
    exact = (a_q.double() @ w_q.double().t()).float()  # float32 sums round: the same up to summation order
    assert torch.allclose(y, quantized_epilogue_reference(exact, a_scale, w_scale.view(-1), bias, residual=residual,
                                                     gelu=True, out_dtype=torch.float32), rtol=1e-5, atol=1e-5)
    fq = torch.nn.functional.gelu(fake_quantize(a, a_scale, FP8_E4M3) @ fake_quantize(w, w_scale, FP8_E4M3).t()
                                  + bias, approximate="tanh") + residual
    assert (y - fq).abs().max() < 1e-4
    codes = fp8_linear_reference(a_q, w_q, a_scale, w_scale.view(-1), bias, out_recip=0.25)
    assert codes.dtype == torch.float8_e4m3fn
    with pytest.raises(ValueError, match="float8"):
        fp8_linear_reference(a_q.to(torch.int8), w_q, a_scale, w_scale.view(-1), bias)


def test_fp8_codes_agree_by_steps():
    x = torch.tensor([0.0, 1.0, -1.0, 448.0, 2.0 ** -9]).to(torch.float8_e4m3fn)
    assert fp8_steps(x).tolist() == [0, 56, -56, 126, 1]
    ref = torch.linspace(-400, 400, 4000).to(torch.float8_e4m3fn)
    one_step = ref.clone()
    one_step[0] = torch.tensor(-416.0).to(torch.float8_e4m3fn)  # -400 rounds to -384 or -416: one step apart
    assert agrees(ref, ref) and agrees(one_step, ref)
    assert not agrees((-ref.float()).to(torch.float8_e4m3fn), ref)
    one_step[:81] = torch.tensor(-416.0).to(torch.float8_e4m3fn)  # over 2% of places (FP8_CODES_OFF): too many
    assert FP8_CODES_OFF == 0.02 and not agrees(one_step, ref)
    one_step[:81] = ref[:81]
    one_step[:79] = torch.tensor(-416.0).to(torch.float8_e4m3fn)  # just under 2%: the tensor cores' own summation
    assert agrees(one_step, ref)


@pytest.mark.parametrize("name", list(FP8_POLICIES))
def test_fp8_engine_matches_fake_quant_reference(name):
    """The engine's CPU path (FP8 codes between ops, the FP8 reference GEMMs) computes the fake-quant function."""
    loaded = loaded_model(seed=3)
    assert_matches_fake_quant(loaded, FP8_POLICIES[name], max_calibration(loaded))


def test_fp8_iln_with_smoothed_sites_matches_fake_quant_reference():
    """--fp8 -iln from a smoothed cache: the LayerNorms write per-channel E4M3 codes, which the residual epilogues
    read back with their per-channel scales; still the fake-quant function."""
    from tests.test_engines import smoothed_max_calibration

    loaded = loaded_model(seed=3)
    assert_matches_fake_quant(loaded, PrecisionPolicy(fp8=True, iln=True), smoothed_max_calibration(loaded))


def test_fp8_codes_flow_between_ops():
    """LayerNorms, attention and FC1 write the next FP8 GEMM's codes: E4M3, never INT8."""
    loaded = loaded_model()
    engine = build(loaded, PrecisionPolicy(fp8=True), max_calibration(loaded))
    seen = []
    run = backends.gemm_backend(backends.LIBRARY, FP8_E4M3.name).run

    def spy(config, a, *args, **kw):
        seen.append((a.dtype, kw.get("out_format")))
        return run(config, a, *args, **kw)

    backends.register_gemm(dataclasses.replace(backends.gemm_backend(backends.LIBRARY, FP8_E4M3.name), run=spy))
    try:
        with torch.no_grad():
            engine(*inputs())
    finally:
        backends.register_gemm(dataclasses.replace(backends.gemm_backend(backends.LIBRARY, FP8_E4M3.name), run=run))
    assert len(seen) == 8 and all(dtype == torch.float8_e4m3fn for dtype, _ in seen)
    assert [fmt for _, fmt in seen].count(FP8_E4M3) == 2  # each FC1 writes FC2's FP8 codes


def test_fp8_engine_file_round_trips(tmp_path):
    loaded = loaded_model()
    header, tensors = build_engine(loaded, PrecisionPolicy(fp8=True, fp16=True), [Profile(4, 64)],
                                   max_calibration(loaded), torch.device("cpu"), None)
    save_engine(tmp_path / "x.engine", header, tensors)
    saved = read_header(tmp_path / "x.engine")
    assert saved.policy["fp8"] and saved.spec.weight_format is FP8_E4M3
    engine, _ = load_runnable(tmp_path / "x.engine", torch.device("cpu"))
    assert engine.t["layers.0.qkv.weight"].dtype == torch.float8_e4m3fn
    x = inputs()
    with torch.no_grad():
        assert torch.equal(engine(*x)[0], Engine(header, tensors, torch.device("cpu"))(*x)[0])


def test_entropy_cache_warns_for_fp8(caplog):
    loaded = loaded_model()
    calib = dataclasses.replace(max_calibration(loaded), method="entropy")
    with caplog.at_level(logging.WARNING, logger="calib.spec"):
        build_engine(loaded, PrecisionPolicy(fp8=True), [Profile(1, 32)], calib, torch.device("cpu"), None)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "entropy" in warnings[0] and "mse" in warnings[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="calib.spec"):
        build_engine(loaded, PrecisionPolicy(int8=True), [Profile(1, 32)], calib, torch.device("cpu"), None)
    assert not caplog.records


def test_pre_hopper_gpu_is_refused_at_build(monkeypatch):
    monkeypatch.setattr("engines.build.this_gpu", lambda device=None: ("Tesla V100-SXM2-16GB", "7.0"))
    loaded = loaded_model()
    with pytest.raises(WorkbenchError, match="V100.*7.0") as e:
        build_engine(loaded, PrecisionPolicy(fp8=True), [Profile(1, 32)], max_calibration(loaded),
                     torch.device("cuda"), None)
    assert "\n" not in str(e.value)
    monkeypatch.setattr("engines.build.this_gpu", lambda device=None: ("NVIDIA H200", "9.0"))
    from engines.build import check_fp8_device
    check_fp8_device(PrecisionPolicy(fp8=True), torch.device("cuda"))  # no error


def test_fp8_codes_near_zero_agree_in_value():
    """E4M3's grid near zero is finer than a float computation in another order holds: codes whose values differ
    by less than 1e-3 of the tensor's largest magnitude agree however many steps apart (a context value of 0.05
    code units against 0.0625 is 3 steps); a larger value 3 steps off does not, nor a NaN."""
    ref = torch.tensor([448.0, -300.0, 0.0625, 2.0, -0.25] + [1.0] * 3000).to(torch.float8_e4m3fn)
    near = ref.clone()
    near[2] = 0.05078125  # 3 steps, 0.012 code units: 3e-5 of the range
    assert int((fp8_steps(near) - fp8_steps(ref)).abs().max()) == 3 and agrees(near, ref)
    far = ref.clone()
    far[3] = 2.75  # 3 steps at 2.0
    assert not agrees(far, ref)
    nan = ref.clone()
    nan[4] = float("nan")
    assert not agrees(nan, ref)


def test_int8_codes_reference_is_unchanged():
    y = torch.randn(64, 64) * 40
    assert torch.equal(backends.fp_epilogue(y, None, None, 1.0), torch.clamp(torch.round(y), -127, 127).to(torch.int8))
    assert torch.equal(backends.fp_epilogue(y, None, None, 1.0, INT8), quantize(y, 1.0))


@pytest.mark.cuda
@pytest.mark.parametrize("m", [8, 128])
@pytest.mark.parametrize("out", ["fp16", "codes"])
def test_scaled_mm_family_agrees_with_the_reference(m, out):
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 tensor cores need compute capability 8.9")
    g = torch.Generator(device="cuda").manual_seed(m)
    a, w = torch.randn(m, 256, generator=g, device="cuda"), torch.randn(384, 256, generator=g, device="cuda")
    a_scale, w_scale = float(scale_from_amax(a.abs().max(), FP8_E4M3)), weight_scales(w, FP8_E4M3).view(-1)
    a_q, w_q = quantize(a, a_scale, FP8_E4M3), quantize(w, w_scale.view(-1, 1), FP8_E4M3)
    bias = torch.randn(384, generator=g, device="cuda")
    kw = dict(gelu=True, out_recip=0.5 if out == "codes" else None)
    ref = fp8_linear_reference(a_q, w_q, a_scale, w_scale, bias, **kw)
    got = fp8_scaled_mm(a_q, w_q, a_scale, w_scale, bias, **kw)
    assert agrees(got, ref)
    impl = backends.gemm_candidates(backends.GemmProblem("fc1", m, 384, 256, FP8_E4M3.name, "bias+gelu"),
                                    FP8_E4M3.name, gpu_kernels=True)
    assert impl[0] == backends.LIBRARY and backends.CUBLASLT in impl
    assert {backends.split(i)[0] for i in impl} == {backends.LIBRARY, backends.CUBLASLT, backends.TRITON}


@pytest.mark.cuda
def test_cuda_fp8_engine_agrees_with_cpu_engine():
    """A CUDA FP8 build times our Triton kernel, cuBLASLt and the reference for every GEMM (and attention: SDPA
    with the E4M3 codes pass, or the fused kernel writing them), keeps the fastest that agrees, runs the
    LayerNorms on the Triton kernel writing E4M3 codes, and computes what the CPU engine does."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 tensor cores need compute capability 8.9")
    loaded = loaded_model()
    calib = max_calibration(loaded)
    policy = PrecisionPolicy(fp8=True, fp16=True)
    cpu, gpu = build(loaded, policy, calib), build(loaded, policy, calib, device="cuda")
    gemms = {k: v for k, v in gpu.kernels.items() if k.startswith("gemm.")}
    assert len(gemms) == 4 and {backends.split(v)[0] for v in gemms.values()} <= {
        backends.LIBRARY, backends.CUBLASLT, backends.TRITON}, gemms
    assert any(k.startswith("attention.") for k in gpu.kernels) and gpu.fp8_kernels
    x = inputs()
    with torch.no_grad():
        want = cpu(*x)[0]
        got = gpu(*(t.cuda() for t in x))[0].cpu()
    mask = x[2].bool()
    assert float((got[mask] - want[mask]).norm() / want[mask].norm()) < 2e-2


# ------------------------------------------------------------------ our FP8 kernels in the engine (interpreter)

TRITON_GEMM = "triton:32x64x32-g2-w4-s1"
FUSED_ATTENTION = "fused-attention:16x32-w4-s2"


def spied(monkeypatch, module, name: str, calls: list):
    """Record each call of module.name (with its keyword arguments) and run it."""
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append((name, k)) or real(*a, **k))


def triton_forward(monkeypatch, policy: PrecisionPolicy):
    """An engine of `policy` run on its reference path (want), then on our Triton kernels in the interpreter
    (got), each kernel call recorded: (engine, inputs, want, got, calls)."""
    F8, LN, A, Q = kernels("fp8_linear"), kernels("layernorm"), kernels("attention"), kernels("quantize")
    kernels("int8_linear")  # fp8_linear's kernels, in the interpreter
    loaded = loaded_model(seed=5)
    engine = build(loaded, policy, max_calibration(loaded))
    x = inputs(batch=2, seq=24, seed=9)
    with torch.no_grad():
        want = engine(*x)
    calls: list = []
    for module, name in ((F8, "fp8_linear"), (LN, "layernorm_quant"), (A, "fused_attention"),
                         (Q, "quantize_rows")):
        spied(monkeypatch, module, name, calls)
    monkeypatch.setattr(engine, "use_triton", True)
    monkeypatch.setattr(engine, "fp8_kernels", True)
    monkeypatch.setattr(engine, "impl", lambda kind, m, fmt="int8", sparse=False: TRITON_GEMM)
    monkeypatch.setattr(engine, "attention_impl", lambda b, s, padded: FUSED_ATTENTION)
    with torch.no_grad():
        got = engine(*x)
    return engine, x, want, got, calls


@pytest.mark.usefixtures("one_torch_thread")
def test_fp8_iln_engine_on_triton_kernels_carries_e4m3_codes(monkeypatch):
    """--fp8 -iln on our Triton kernels (interpreter): every LayerNorm writes E4M3 codes alone (the last one with
    their FP values too, for the QA head), and the attention-output and FC2 GEMMs read the residual stream as those
    E4M3 codes with their scale; the logits match the engine's reference path."""
    _, x, want, got, calls = triton_forward(monkeypatch, PrecisionPolicy(fp8=True, fp16=True, iln=True))
    norms = [k for name, k in calls if name == "layernorm_quant"]
    assert len(norms) == 2 * CFG.num_layers + 1 and all(k["fmt"] is FP8_E4M3 for k in norms)
    assert [k["codes_only"] for k in norms] == [True] * (2 * CFG.num_layers) + [False]
    residuals = [k["residual"] for name, k in calls if name == "fp8_linear" and "residual" in k]
    assert len(residuals) == 2 * CFG.num_layers and all(r.dtype == torch.float8_e4m3fn for r in residuals)
    assert all(k.get("residual_scale") is not None for name, k in calls if name == "fp8_linear" and "residual" in k)
    for g, w in zip(got, want):  # about 3e-3 seen
        assert rel(valid(g, x[2]).float(), valid(w, x[2]).float()) < 1e-2


@pytest.mark.usefixtures("one_torch_thread")
def test_fp8_engine_on_triton_kernels_matches_its_reference_path(monkeypatch):
    """The FP8 engine's forward on our Triton kernels (Triton's interpreter): every GEMM on fp8_linear with its
    fused epilogue (FC1 writing FC2's E4M3 codes), every LayerNorm writing E4M3 codes in its pass, attention
    writing the context's E4M3 codes (no separate pass), against the same engine's reference path: the same
    logits within what a code flipped at a rounding boundary moves them. Where our kernels cannot write E4M3 (a
    GPU below 8.9) the LayerNorms' and the context's codes come from the reference ops."""
    engine, x, want, got, calls = triton_forward(monkeypatch, PrecisionPolicy(fp8=True, fp16=True))
    names = [name for name, _ in calls]
    assert names.count("fp8_linear") == 4 * CFG.num_layers
    assert names.count("layernorm_quant") == 2 * CFG.num_layers + 1 and "quantize_rows" not in names
    assert [k["out_format"] for name, k in calls if name == "fused_attention"] == [FP8_E4M3] * CFG.num_layers
    assert [k.get("out_format") for name, k in calls if name == "fp8_linear"].count(FP8_E4M3) == CFG.num_layers
    assert [k.get("fmt") for name, k in calls if name == "layernorm_quant"].count(FP8_E4M3) == 2 * CFG.num_layers
    for g, w in zip(got, want):  # about 3e-4 seen
        assert rel(valid(g, x[2]).float(), valid(w, x[2]).float()) < 5e-3
    calls.clear()
    monkeypatch.setattr(engine, "fp8_kernels", False)  # a GPU below 8.9: Triton, but no E4M3 from it
    monkeypatch.setattr(engine, "impl", lambda kind, m, fmt="int8", sparse=False: backends.LIBRARY)
    monkeypatch.setattr(engine, "attention_impl", lambda b, s, padded: backends.LIBRARY)
    with torch.no_grad():
        got = engine(*x)
    assert [name for name, _ in calls] == ["layernorm_quant"]  # the last one: FP16 for the QA head, no codes
    assert rel(valid(got[0], x[2]).float(), valid(want[0], x[2]).float()) < 1e-3  # (its sums' order differs)


@pytest.mark.usefixtures("one_torch_thread")
def test_fp8_build_candidates_agree_with_the_library(monkeypatch):
    """What a CUDA FP8 build times, run here in the interpreter: the Triton family (the INT8 family's tiles, and
    its wgmma tiles with fast accumulation) beside cuBLASLt and the reference for each GEMM, keyed by FP8
    problems; a Triton candidate agrees with the reference as the build requires; attention's candidates write
    E4M3 context codes and agree with SDPA's path (its codes pass in the quantize kernel) by the build's rule.
    Without FP8 kernels (the CPU, pre-Ada GPUs) the Triton and cuBLASLt families are not candidates."""
    kernels("int8_linear"), kernels("fp8_linear"), kernels("quantize"), kernels("attention")
    loaded = loaded_model(seed=6)
    engine = build(loaded, PrecisionPolicy(fp8=True, fp16=True), max_calibration(loaded))
    problem = backends.GemmProblem("fc1", 48, 128, 64, FP8_E4M3.name, "bias+gelu->fp8_e4m3")
    assert backends.gemm_candidates(problem, FP8_E4M3.name, gpu_kernels=True) == [backends.LIBRARY]
    monkeypatch.setattr("plugins.fp8_linear.fp8_kernels_available", lambda: True)
    monkeypatch.setattr(engine, "use_triton", True)
    monkeypatch.setattr(engine, "fp8_kernels", True)
    problem, candidates, calls = engine.gemm_candidates("fc1", 48, FP8_E4M3.name)
    assert problem.dtype == FP8_E4M3.name and problem.epilogue == "bias+gelu->fp8_e4m3" and calls == CFG.num_layers
    triton = [i for i in candidates if backends.split(i)[0] == backends.TRITON]
    int8_configs = backends.gemm_candidates(dataclasses.replace(problem, dtype="int8"), "int8", gpu_kernels=True)
    assert list(candidates)[0] == backends.LIBRARY and backends.CUBLASLT in candidates
    # INT8's tiles, then the wgmma tiles again with fast accumulation (GemmConfig.fast_accum)
    int8_triton = [i for i in int8_configs if backends.split(i)[0] == backends.TRITON]
    assert triton[:len(int8_triton)] == int8_triton and all("-fa" in i for i in triton[len(int8_triton):])
    ref = candidates[backends.LIBRARY]()
    assert ref.dtype == torch.float8_e4m3fn and agrees(candidates["triton:32x64x128-g8-w4-s4"](), ref)
    assert agrees(candidates["triton:64x64x128-g8-w4-s4-fa"](), ref)  # the interpreter's sums are float32
    problem, candidates, _ = engine.attention_candidates(2, 32, padded=True)
    assert problem.epilogue == "softmax+bias->fp8_e4m3"
    ref = candidates[backends.LIBRARY]()
    got = candidates["fused-attention:16x64-w4-s2"]()
    assert ref.dtype == got.dtype == torch.float8_e4m3fn and engine.attention_agreement()(got, ref)
