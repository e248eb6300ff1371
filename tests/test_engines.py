"""Engines against their references: FP engines vs the reference BERT, INT8 engines vs the fake-quant reference."""
from __future__ import annotations

import pytest
import torch

from calib.calibrate import observed_amax
from calib.cache import CalibrationCache, TensorRange
from quant.fakequant import fake_quant_model
from quant.policy import PrecisionPolicy, calibration_sites
from common.errors import WorkbenchError
from engines.build import build_engine, kernel_choices, load_runnable
from engines.engine_file import Profile, save_engine
from engines.runtime import Engine
from model.bert import BertQA
from model.checkpoint import LoadedModel
from model.config import BertConfig

CFG = BertConfig(vocab_size=120, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                 max_position_embeddings=64)
POLICIES = {
    "int8": PrecisionPolicy(int8=True),
    "int8 -iln": PrecisionPolicy(int8=True, iln=True),
    "int8 -imh": PrecisionPolicy(int8=True, imh=True),
    "int8 -iln -imh": PrecisionPolicy(int8=True, iln=True, imh=True),
    "int8 --keep-fp16 attn_out,layer0.fc2": PrecisionPolicy(int8=True, fp16_gemms=("attn_out", "layer0.fc2")),
    "int8 -iln --keep-fp16 layer1.fc1,qkv": PrecisionPolicy(int8=True, iln=True, fp16_gemms=("layer1.fc1", "qkv")),
}


def loaded_model(seed: int = 0) -> LoadedModel:
    """A random model with non-trivial biases and LayerNorms (fresh per test)."""
    torch.manual_seed(seed)
    model = BertQA(CFG).init_random(seed).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return LoadedModel(model, CFG, "tiny", f"tiny-{seed}", None)


def inputs(batch=3, seq=40, seed=1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, CFG.vocab_size, (batch, seq), generator=g)
    types = torch.zeros_like(ids)
    types[:, seq // 3:] = 1
    mask = torch.ones_like(ids)
    mask[1, seq // 2:] = 0
    return ids.to(device), types.to(device), mask.to(device)


def max_calibration(loaded: LoadedModel) -> CalibrationCache:
    """Ranges = the max |x| of every site on fresh random inputs (enough for checking the math)."""
    amax = observed_amax(loaded.model, [inputs(batch=4, seq=48, seed=7)])
    assert set(amax) == set(calibration_sites(CFG.num_layers))
    return CalibrationCache({k: TensorRange(v) for k, v in amax.items()}, "max", {}, 4, loaded.digest, "d", "t")


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def valid(t, mask):
    return t[mask.bool()]


def build(loaded, policy, calib=None, device="cpu"):
    header, tensors = build_engine(loaded, policy, [Profile(4, 64)], calib, torch.device(device), None)
    return Engine(header, tensors, torch.device(device)).eval()


def test_fp32_engine_matches_reference():
    loaded = loaded_model()
    x = inputs()
    with torch.no_grad():
        ref = loaded.model(*x)
        out = build(loaded, PrecisionPolicy())(*x)
    for o, r in zip(out, ref):
        assert (valid(o, x[2]) - valid(r, x[2])).abs().max() < 1e-4


def test_fp16_engine_close_to_reference():
    loaded = loaded_model()
    x = inputs()
    with torch.no_grad():
        ref = loaded.model(*x)
        out = build(loaded, PrecisionPolicy(fp16=True))(*x)
    assert rel(valid(out[0], x[2]), valid(ref[0], x[2])) < 3e-3


@pytest.mark.parametrize("name", list(POLICIES))
def test_int8_engine_matches_fake_quant_reference(name):
    loaded = loaded_model(seed=3)
    assert_matches_fake_quant(loaded, POLICIES[name], max_calibration(loaded))


def assert_matches_fake_quant(loaded: LoadedModel, policy: PrecisionPolicy, calib: CalibrationCache) -> None:
    """Same scales (and smoothing vectors), same rounding: the engine's integer GEMMs must give the fake-quant
    function, and far closer to it than quantization moves the output away from FP32."""
    engine = build(loaded, policy, calib)
    smooth = {k: torch.tensor(r.smooth) for k, r in calib.ranges.items() if r.smooth is not None}
    fq = fake_quant_model(loaded.model, policy, engine.spec, smooth)
    x = inputs(seed=11)  # fresh inputs, not the calibration ones
    with torch.no_grad():
        ref = loaded.model(*x)
        want = fq(*x)
        got = engine(*x)
    for g, w, r in zip(got, want, ref):
        g, w, r = (valid(t, x[2]) for t in (g, w, r))
        quant_error = rel(w, r)
        assert quant_error > 1e-4, "quantization changed nothing: the INT8 path did not run"
        assert rel(g, w) < max(1e-5, 0.02 * quant_error), (rel(g, w), quant_error)


def test_int8_weights_are_int8_with_channel_scales():
    loaded = loaded_model()
    _, tensors = build_engine(loaded, PrecisionPolicy(int8=True, fp16=True), [Profile(1, 32)],
                              max_calibration(loaded), torch.device("cpu"), None)
    w = tensors["layers.0.fc1.weight"]
    assert w.dtype == torch.int8 and w.shape == (CFG.intermediate_size, CFG.hidden_size)
    assert tensors["layers.0.fc1.weight_scale"].shape == (CFG.intermediate_size,)
    assert int(w.abs().max(dim=1).values.min()) == 127  # every row uses its full range
    assert tensors["qa.weight"].dtype == torch.float16


def test_policy_sites():
    n = CFG.num_layers
    assert len(PrecisionPolicy(int8=True).quantized_sites(n)) == 4 * n  # one input per GEMM
    assert len(PrecisionPolicy(int8=True, imh=True).quantized_sites(n)) == 4 * n + 4 * n  # + q, k, v, probs
    iln = PrecisionPolicy(int8=True, iln=True).quantized_sites(n)
    assert f"layer{n - 1}.ffn_ln_out" in iln and "embeddings.ln_out" in iln
    with pytest.raises(WorkbenchError, match="add --int8"):
        PrecisionPolicy(iln=True)


def test_attention_probabilities_are_max_calibrated():
    """Entropy would clip softmax outputs at 1/16 of their range; the policy keeps their peaks."""
    from calib.calibrate import collect_ranges
    from quant.policy import calibration_method
    from data.features import Features

    assert calibration_method("layer0.probs", "entropy") == "max"
    assert calibration_method("layer0.context", "entropy") == "entropy"
    loaded = loaded_model()
    ids, types, mask = inputs(batch=4, seq=32, seed=5)
    n, s = ids.shape
    feats = Features(ids.int().numpy(), types.int().numpy(), torch.ones(n, s, dtype=torch.int32).numpy(),
                     torch.arange(n, dtype=torch.int32).numpy(), -torch.ones(n, s, 2, dtype=torch.int32).numpy(),
                     torch.zeros(n, dtype=torch.int32).numpy(), torch.zeros(n, dtype=torch.int32).numpy())
    ranges = collect_ranges(loaded.model, feats, ["layer0.probs"], "entropy", device=torch.device("cpu"),
                            progress=False)
    peak = []
    loaded.model.tap = lambda name, x: (peak.append(float(x.max())) if name == "layer0.probs" else None) or x
    with torch.no_grad():
        loaded.model(ids, types, torch.ones_like(ids))
    assert ranges["layer0.probs"] == pytest.approx(max(peak))


def test_int8_without_calibration_is_an_error():
    with pytest.raises(WorkbenchError, match="cli.py calibrate"):
        build(loaded_model(), PrecisionPolicy(int8=True))


def test_calibration_of_another_model_is_an_error():
    calib = max_calibration(loaded_model(seed=1))
    with pytest.raises(WorkbenchError, match="another model"):
        build(loaded_model(seed=2), PrecisionPolicy(int8=True), calib)


@pytest.mark.parametrize("smoothed", [False, True], ids=["plain", "smoothed"])
def test_saved_engine_runs_the_same(tmp_path, smoothed):
    loaded = loaded_model()
    policy = PrecisionPolicy(int8=True, iln=True)
    calib = (smoothed_max_calibration if smoothed else max_calibration)(loaded)
    header, tensors = build_engine(loaded, policy, [Profile(4, 64)], calib, torch.device("cpu"), None)
    assert header.calibration == ("max +smooth 0.5 (4 q)" if smoothed else "max (4 q)")  # for reports
    save_engine(tmp_path / "x.engine", header, tensors)
    engine, wordpiece = load_runnable(tmp_path / "x.engine", torch.device("cpu"))
    assert wordpiece is None and engine.header.calibration == header.calibration
    x = inputs()
    with torch.no_grad():
        assert torch.equal(engine(*x)[0], Engine(header, tensors, torch.device("cpu"))(*x)[0])


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["fp16", "int8", "int8 -iln -imh", "int8 smoothed", "int8 -iln smoothed"])
def test_cuda_engine_agrees_with_cpu_engine_and_graphs(name):
    from engines.graphs import GraphRunner

    policy = PrecisionPolicy(fp16=True) if name == "fp16" else PrecisionPolicy(fp16=True, **{
        "int8": True, "iln": "-iln" in name, "imh": "-imh" in name})
    loaded = loaded_model(seed=5)
    calib = (smoothed_max_calibration if "smoothed" in name else max_calibration)(loaded) if policy.int8 else None
    x = inputs(seed=13)
    with torch.no_grad():
        cpu = build(loaded, PrecisionPolicy(**{**policy.__dict__, "fp16": False}), calib)(*x)
        cuda_engine = build(loaded, policy, calib, device="cuda")
        eager = cuda_engine(*(t.cuda() for t in x))
        graphed = GraphRunner(cuda_engine)(*(t.cuda() for t in x))
    for c, e, g in zip(cpu, eager, graphed):
        assert rel(valid(e.cpu(), x[2]), valid(c, x[2])) < 2e-2  # FP16 activations vs FP32 on the CPU
        assert rel(valid(g.cpu(), x[2]), valid(e.cpu(), x[2])) < 2e-3  # padded into the 4x64 profile


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["fp16", "int8"])
def test_dense_batches_replay_the_graph_without_a_mask(name):
    """A batch that fills its profile with no padding replays the graph whose attention takes no mask: the same
    logits as the general graph; a padded batch or a mask on the GPU (unread) takes the general one."""
    from engines.graphs import GraphRunner

    policy = PrecisionPolicy(fp16=True, int8=name == "int8")
    loaded = loaded_model(seed=6)
    engine = build(loaded, policy, max_calibration(loaded) if policy.int8 else None, device="cuda")
    full = inputs(batch=4, seq=64, seed=19)
    full[2].fill_(1)
    runner = GraphRunner(engine)
    with torch.no_grad():
        dense = runner(*full)[0].clone()  # host mask, all ones: read, dense
        general = runner(*(t.cuda() for t in full))[0].clone()  # a device mask is not read
        eager = engine(*(t.cuda() for t in full))[0]
    assert sorted(no_mask for _, no_mask in runner.graphs) == [False, True]
    assert rel(dense.float(), eager.float()) < 2e-3 and rel(general.float(), eager.float()) < 2e-3
    padded = inputs(batch=4, seq=64, seed=19)  # row 1 padded
    with torch.no_grad():
        got = runner(*padded)[0]
        want = engine(*(t.cuda() for t in padded))[0]
    assert rel(valid(got, padded[2].cuda()).float(), valid(want, padded[2].cuda()).float()) < 2e-3


@pytest.mark.parametrize("name", ["fp32", "int8 -iln -imh"])
def test_no_mask_means_no_padding(name):
    """attention_mask None (the graph for batches without padding) computes what an all-ones mask does."""
    loaded = loaded_model(seed=2)
    policy = PrecisionPolicy() if name == "fp32" else POLICIES[name]
    engine = build(loaded, policy, max_calibration(loaded) if policy.int8 else None)
    ids, types, mask = inputs(batch=2, seq=24, seed=4)
    with torch.no_grad():
        for a, b in zip(engine(ids, types, None), engine(ids, types, torch.ones_like(mask))):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)


def test_benchmarks_state_the_padding_of_their_batches():
    """Timed calls tell a GraphRunner whether the batch has padding (read once, outside the timing); models are
    called as they are."""
    from engines.graphs import GraphRunner
    from eval.benchmark import padding_stated

    loaded = loaded_model()
    engine = build(loaded, PrecisionPolicy())
    runner = GraphRunner(engine)
    full = inputs(batch=2, seq=16)
    full[2].fill_(1)
    assert padding_stated(runner, full).keywords == {"dense": True}
    assert padding_stated(runner, inputs()).keywords == {"dense": False}
    assert padding_stated(loaded.model, full) is loaded.model
    with torch.no_grad():  # off CUDA the runner runs the engine, whatever it is told
        assert torch.equal(padding_stated(runner, full)(*full)[0], engine(*full)[0])


@pytest.mark.cuda
def test_cublaslt_gelu_is_the_tanh_form():
    """The FP16 engine's FC1 (cuBLASLt GEMM + GELU epilogue) computes model.bert.gelu_tanh of the GEMM."""
    from engines.backends import linear_gelu_tanh
    from model.bert import gelu_tanh

    g = torch.Generator().manual_seed(3)
    a, w, b = torch.randn(256, 128, generator=g), torch.randn(512, 128, generator=g) / 8, torch.randn(512, generator=g)
    want = gelu_tanh(torch.nn.functional.linear(a.half().float(), w.half().float(), b.half().float()))
    got = linear_gelu_tanh(a.half().cuda(), w.half().cuda(), b.half().cuda())
    assert got.dtype == torch.float16 and rel(got.float().cpu(), want) < 2e-3
    assert rel(linear_gelu_tanh(a, w, b), gelu_tanh(torch.nn.functional.linear(a, w, b))) < 1e-6


def test_gelu_of_engines():
    """FP16 and INT8 engines use GELU's tanh form, FP32 engines BERT's erf GELU; the two are close, and
    model.bert.gelu_tanh is the tanh form."""
    from model.bert import gelu_tanh

    assert PrecisionPolicy(fp16=True).gelu_tanh and PrecisionPolicy(int8=True).gelu_tanh
    assert not PrecisionPolicy().gelu_tanh
    y = torch.linspace(-12, 12, 100_001, dtype=torch.float64)
    tanh_form = torch.nn.functional.gelu(y, approximate="tanh")
    assert (gelu_tanh(y.float()).double() - tanh_form).abs().max() < 1e-6 * 12
    assert 1e-4 < (tanh_form - torch.nn.functional.gelu(y)).abs().max() < 5e-4
    loaded = loaded_model()
    policy = PrecisionPolicy(int8=True)
    fq = fake_quant_model(loaded.model, policy, build(loaded, policy, max_calibration(loaded)).spec)
    assert all(layer.act is gelu_tanh for layer in fq.layers)
    assert all(layer.act is torch.nn.functional.gelu for layer in loaded.model.layers)  # the reference: erf


def test_keep_fp16_gemms_stay_floating_point():
    loaded = loaded_model()
    policy = PrecisionPolicy(int8=True, fp16=True, fp16_gemms=("layer1.fc2", "qkv"))
    _, tensors = build_engine(loaded, policy, [Profile(1, 32)], max_calibration(loaded), torch.device("cpu"), None)
    kept = {"layers.1.fc2", "layers.0.qkv", "layers.1.qkv"}
    for i in range(CFG.num_layers):
        for g in ("qkv", "attn_out", "fc1", "fc2"):
            name = f"layers.{i}.{g}"
            assert (tensors[name + ".weight"].dtype == torch.float16) == (name in kept)
            assert (name + ".weight_scale" in tensors) == (name not in kept)
    sites = policy.quantized_sites(CFG.num_layers)
    assert "embeddings.ln_out" not in sites and "layer1.fc2_in" not in sites and "layer0.fc2_in" in sites


def test_keep_fp16_names_are_checked():
    assert PrecisionPolicy(int8=True, fp16_gemms=["fc2", "layer3.qkv", "fc2"]).fp16_gemms == ("fc2", "layer3.qkv")
    assert "--keep-fp16 fc2,layer3.qkv" in PrecisionPolicy(int8=True, fp16_gemms=("layer3.qkv", "fc2")).describe()
    with pytest.raises(WorkbenchError, match="not a GEMM"):
        PrecisionPolicy(int8=True, fp16_gemms=("layer1.ffn",))
    with pytest.raises(WorkbenchError, match="needs --int8"):
        PrecisionPolicy(fp16_gemms=("fc2",))


@pytest.mark.cuda
@pytest.mark.parametrize("name", list(POLICIES))
def test_triton_kernels_agree_with_library_kernels(name):
    """Every Triton tile configuration against the reference ops on CUDA: same engine, same inputs."""
    import plugins.attention as A
    from engines.backends import LIBRARY, triton_impl
    from plugins.int8_linear import CANDIDATE_CONFIGS

    policy = PrecisionPolicy(**{**POLICIES[name].__dict__, "fp16": True})
    loaded = loaded_model(seed=8)
    engine = build(loaded, policy, max_calibration(loaded), device="cuda")
    x = [t.cuda() for t in inputs(seed=17)]
    with torch.no_grad():
        engine.use_triton = False
        want = engine(*x)[0]
        engine.use_triton = True
        for config in CANDIDATE_CONFIGS:
            engine.impl = lambda kind, m, fmt="int8", sparse=False, c=config: triton_impl(c)
            got = engine(*x)[0]
            assert rel(valid(got, x[2]).float(), valid(want, x[2]).float()) < 2e-3, config
        # The fused attention kernel (under -imh the INT8 one), each configuration (the GEMMs stay on the last
        # one). Attention is not bit-exact against its library path (FP16 rounding of p against SDPA; exp2 and the
        # sum's reciprocal against the INT8 reference), so a context code can flip; -iln rounds the residual stream
        # to INT8 at each LayerNorm, which carries a flip on as whole codes (on the CPU 2-3e-3 with -iln against
        # 4e-4 without, for the same model and inputs).
        bound = 6e-3 if policy.iln else 3e-3
        for config in A.INT8_CANDIDATE_CONFIGS if policy.imh else A.CANDIDATE_CONFIGS:
            engine.attention_impl = lambda b, s, padded, c=config: c.name
            got = engine(*x)[0]
            assert rel(valid(got, x[2]).float(), valid(want, x[2]).float()) < bound, config
    assert LIBRARY == "library"


def on_attention_kernel(policy, seed, input_seed, config, monkeypatch):
    """A CPU engine for `policy`, inputs with padding, the logits of its reference attention, and the engine
    then set to run attention configuration `config` (Triton's interpreter, as the caller imported it)."""
    loaded = loaded_model(seed=seed)
    engine = build(loaded, policy, max_calibration(loaded))
    x = inputs(seed=input_seed)
    with torch.no_grad():
        want = engine(*x)
    monkeypatch.setattr(engine, "attention_impl", lambda b, s, padded: config)
    return engine, x, want


@pytest.mark.parametrize("name", ["int8", "int8 --keep-fp16 attn_out,layer0.fc2"])
def test_fused_attention_in_the_engine_matches_sdpa(name, monkeypatch):
    """The engine's fused-attention path (QKV output -> the context's codes, or FP16 context where attention-out
    stays FP16) against its SDPA path, with padding, on the CPU through Triton's interpreter: the same logits
    within attention's FP16 error, and the context's codes mostly the same."""
    from tests.test_plugins_common import kernels

    attention = kernels("attention")  # the interpreter's module, which the engine's import then finds
    policy = PrecisionPolicy(**{**POLICIES[name].__dict__, "fp16": True})
    engine, x, want = on_attention_kernel(policy, 12, 5, attention.AttentionConfig(16, 16).name, monkeypatch)
    with torch.no_grad():
        got = engine(*x)
    for g, w in zip(got, want):
        assert rel(valid(g, x[2]).float(), valid(w, x[2]).float()) < 3e-3  # about 4e-4 seen


@pytest.mark.parametrize("keep", [(), ("attn_out",)], ids=["int8 -imh", "int8 -imh --keep-fp16 attn_out"])
def test_int8_attention_in_the_engine_matches_its_reference(keep, monkeypatch):
    """-imh: the engine's INT8 attention kernel (QKV codes -> the context's codes, dequantized where attention-out
    stays FP16) against the reference ops it runs on the CPU, with padding, through Triton's interpreter; and
    the build's timing candidates under -imh are the QKV GEMM writing codes and the INT8 kernel's."""
    from tests.test_plugins_common import kernels

    attention = kernels("attention")
    policy = PrecisionPolicy(int8=True, fp16=True, imh=True, fp16_gemms=keep)
    engine, x, want = on_attention_kernel(policy, 13, 6, attention.AttentionConfig(16, 16, int8=True).name,
                                          monkeypatch)
    with torch.no_grad():
        calls = []
        kernel = attention.fused_attention_int8
        monkeypatch.setattr(attention, "fused_attention_int8", lambda *a, **k: calls.append(1) or kernel(*a, **k))
        got = engine(*x)
    assert len(calls) == CFG.num_layers
    for g, w in zip(got, want):  # exact integer dots: often the very same codes
        assert rel(valid(g, x[2]).float(), valid(w, x[2]).float()) < 3e-3
    if not keep:
        problem, candidates, _ = engine.gemm_candidates("qkv", 64)
        assert problem.epilogue == "bias->int8" and candidates["library"]().dtype == torch.int8


def test_timing_candidates_run_every_layers_weights_at_few_rows(monkeypatch):
    """Build-time timing at small M runs each INT8 layer's own GEMM (weights do not sit in L2 as they would
    for one layer), leaving out layers whose epilogue differs (a kept-out fc2 makes its fc1 write FP), and runs
    one layer at large M; every call returns the first layer's output, which is what the forward computes."""
    import engines.runtime as runtime

    loaded = loaded_model(seed=10)
    calib = max_calibration(loaded)
    for keep, want in (((), [0, 1]), (("layer1.fc2",), [0])):
        engine = build(loaded, PrecisionPolicy(int8=True, fp16_gemms=keep), calib)
        seen = []
        real = engine._linear
        monkeypatch.setattr(engine, "_linear", lambda name, a, real=real, seen=seen, **kw:
                            seen.append((name, kw["out_site"])) or real(name, a, **kw))
        problem, candidates, calls = engine.gemm_candidates("fc1", 16)
        assert calls == len(want) and problem.epilogue == "bias+gelu->int8" and problem.m == 16
        out = candidates[runtime.LIBRARY]()
        assert seen == [(f"layers.{i}.fc1", f"layer{i}.fc2_in") for i in want], keep
        assert out.dtype == torch.int8 and out.shape == (16, CFG.intermediate_size)
        seen.clear()
        _, candidates, calls = engine.gemm_candidates("qkv", runtime.ROTATE_WEIGHTS_UP_TO_ROWS + 1)
        candidates[runtime.LIBRARY]()
        assert calls == 1 and seen == [("layers.0.qkv", None)]
    # split K and weight prefetch are timed at few rows only
    small = set(engine.gemm_candidates("fc2", runtime.ROTATE_WEIGHTS_UP_TO_ROWS)[1])
    large = set(engine.gemm_candidates("fc2", runtime.ROTATE_WEIGHTS_UP_TO_ROWS + 1)[1])
    assert large < small and all("-pf" in i or "-k" in i for i in small - large)
    assert any("-pf" in i for i in small) and not any("-pf" in i or "-k" in i for i in large)


def test_kernel_choices_say_what_each_profile_runs():
    """`build` prints the timed choices per profile; engines that timed nothing print none."""
    from dataclasses import replace

    loaded = loaded_model(seed=9)
    header, _ = build_engine(loaded, PrecisionPolicy(int8=True, fp16=True), [Profile(1, 32), Profile(4, 64)],
                             max_calibration(loaded), torch.device("cpu"), None)
    assert kernel_choices(header) == []
    timed = replace(header, kernels={**header.kernels, "gemm.qkv.m32": "triton:16x32x128-g8-w4-s4-pf",
                                     "gemm.fc2.m32": "library", "attention.b1s32": "library",
                                     "attention.b1s32.dense": "fused-attention:64x128-w4-s2",
                                     "attention.b4s64": "fused-attention:64x128-w4-s2"})
    assert kernel_choices(timed) == ["1x32: qkv triton:16x32x128-g8-w4-s4-pf, fc2 library, attention sdpa, "
                                     "dense attention fused-attention:64x128-w4-s2",
                                     "4x64: attention fused-attention:64x128-w4-s2"]


@pytest.mark.cuda
def test_cuda_build_times_kernels_once(tmp_path):
    from engines.tuning import TimingCache

    loaded = loaded_model(seed=9)
    calib = max_calibration(loaded)
    policy = PrecisionPolicy(int8=True, fp16=True)
    first = TimingCache(tmp_path / "timing.json")
    header, _ = build_engine(loaded, policy, [Profile(1, 32), Profile(4, 64)], calib, torch.device("cuda"), None,
                             first)
    assert first.timed > 0 and first.reused == 0
    chosen = {k: v for k, v in header.kernels.items() if k.startswith(("gemm.", "attention."))}
    assert set(chosen) == {f"gemm.{g}.m{m}" for g in ("qkv", "attn_out", "fc1", "fc2") for m in (32, 256)} | \
        {"attention.b1s32", "attention.b4s64", "attention.b1s32.dense", "attention.b4s64.dense"}
    second = TimingCache(tmp_path / "timing.json")
    header2, _ = build_engine(loaded, policy, [Profile(1, 32), Profile(4, 64)], calib, torch.device("cuda"), None,
                              second)
    assert second.timed == 0 and second.reused == first.timed
    lines = kernel_choices(header)
    assert [line.split(":")[0] for line in lines] == ["1x32", "4x64"] and all("attention " in x for x in lines)
    assert {k: v for k, v in header2.kernels.items() if k.startswith(("gemm.", "attention."))} == chosen
    assert "nothing timed" in second.summary()


@pytest.mark.cuda
def test_pipelined_batches_give_the_same_logits_in_order():
    from engines.graphs import GraphRunner

    loaded = loaded_model(seed=10)
    engine = build(loaded, PrecisionPolicy(int8=True, fp16=True), max_calibration(loaded), device="cuda")
    runner = GraphRunner(engine)
    batches = [inputs(batch=b, seq=s, seed=20 + b) for b, s in ((4, 64), (2, 40), (3, 64), (2, 8))]
    with torch.no_grad():
        want = [tuple(t.cpu() for t in runner(*(a.cuda() for a in x))) for x in batches]
        got = list(runner.pipelined(batches))
    assert len(got) == len(want)
    for (gs, ge), (ws, we) in zip(got, want):
        assert gs.device.type == "cpu" and torch.equal(gs, ws) and torch.equal(ge, we)


def smoothed_max_calibration(loaded: LoadedModel, alpha: float = 0.5) -> CalibrationCache:
    """Max calibration with smoothing: per-channel maxima give s, then amax of x / s at the smoothed sites."""
    from quant.smoothing import smoothable_sites, smoothing_factors

    sites = smoothable_sites(CFG.num_layers)
    chmax: dict[str, torch.Tensor] = {}

    def channel_tap(name, x):
        if name in sites:
            m = x.abs().reshape(-1, x.shape[-1]).amax(0)
            chmax[name] = torch.maximum(chmax.get(name, m), m)
        return x

    loaded.model.tap = channel_tap
    with torch.no_grad():
        loaded.model(*inputs(batch=4, seq=48, seed=7))
    smooth = {site: smoothing_factors(chmax[site], getattr(loaded.model.layers[i], g).weight, alpha)
              for site, (i, g) in sites.items()}
    plain = max_calibration(loaded)
    amax: dict[str, float] = {}

    def tap(name, x):
        if name in smooth:
            amax[name] = max(amax.get(name, 0.0), float((x / smooth[name]).abs().max()))
        return x

    loaded.model.tap = tap
    with torch.no_grad():
        loaded.model(*inputs(batch=4, seq=48, seed=7))
    loaded.model.tap = lambda name, x: x
    ranges = {k: TensorRange(amax[k], tuple(smooth[k].tolist())) if k in smooth else r
              for k, r in plain.ranges.items()}
    return CalibrationCache(ranges, "max", {"smooth_alpha": alpha}, 4, loaded.digest, "d", "t")


def with_outlier_channel(loaded: LoadedModel) -> LoadedModel:
    """BERT's LayerNorm outputs have a few channels an order of magnitude above the rest, which the GEMMs reading
    them weigh lightly: the outlier sets a per-tensor range that rounds every other channel coarsely."""
    last = f"layers.{CFG.num_layers - 1}.ln2"  # feeds only the QA head: left alone
    with torch.no_grad():
        for name, p in loaded.model.named_parameters():
            if name.endswith(("ln.weight", "ln1.weight", "ln2.weight")) and not name.startswith(last):
                p[5] = 25.0
            if name.endswith(("qkv.weight", "fc1.weight")):
                p[:, 5] *= 0.04
    return loaded


@pytest.mark.parametrize("name", ["int8", "int8 -iln", "int8 -iln --keep-fp16 layer1.fc1,qkv",
                                  "int8 --keep-fp16 attn_out,layer0.fc2"])
def test_smoothed_int8_engine_matches_fake_quant_reference(name):
    loaded = loaded_model(seed=5)
    calib = smoothed_max_calibration(loaded)
    assert build(loaded, POLICIES[name], calib).channel_recip, "no site was quantized per channel"
    assert_matches_fake_quant(loaded, POLICIES[name], calib)


def test_smoothing_cuts_the_error_of_an_outlier_channel():
    """What smoothing is for: with one LN channel 25x the rest, the same (max) calibration quantizes the
    smoothed build far closer to FP32."""
    loaded = with_outlier_channel(loaded_model(seed=5))
    x = inputs(seed=11)
    policy = PrecisionPolicy(int8=True)
    with torch.no_grad():
        ref = loaded.model(*x)
        plain = build(loaded, policy, max_calibration(loaded))(*x)
        smoothed = build(loaded, policy, smoothed_max_calibration(loaded))(*x)
    err_plain = rel(valid(plain[0], x[2]), valid(ref[0], x[2]))
    err_smooth = rel(valid(smoothed[0], x[2]), valid(ref[0], x[2]))
    assert err_smooth < 0.5 * err_plain, (err_smooth, err_plain)


def test_a_bad_smoothing_vector_is_refused_at_build():
    from dataclasses import replace

    loaded = loaded_model()
    calib = smoothed_max_calibration(loaded)
    short = replace(calib, ranges={**calib.ranges, "layer0.fc2_in": TensorRange(1.0, (1.0, 0.5))})
    with pytest.raises(WorkbenchError, match=r"smoothing vector of layer0.fc2_in must be 128 finite positive"):
        build(loaded, PrecisionPolicy(int8=True), short)
    stray = replace(calib, ranges={**calib.ranges, "layer0.q": TensorRange(1.0, (1.0,) * 64)})
    with pytest.raises(WorkbenchError, match="layer0.q has a smoothing vector but is not a smoothable site"):
        build(loaded, PrecisionPolicy(int8=True), stray)


def test_imh_attention_tuner_codes_look_like_activations():
    """The -imh attention candidates are checked on activation-like codes (engines.runtime.activation_codes), not
    uniform ones: near-saturated scores made every INT8 attention candidate fail the check at real scales."""
    from engines.runtime import activation_codes

    codes = activation_codes((256, 384), torch.Generator().manual_seed(0), torch.device("cpu"))
    assert codes.dtype == torch.int8 and int(codes.abs().max()) <= 127
    x = codes.float()
    assert 30 < float(x.std()) < 34 and abs(float(x.mean())) < 0.5
    assert float((x.abs() == 127).float().mean()) < 1e-3  # ~6e-5 of a normal lies beyond 4 sigma
