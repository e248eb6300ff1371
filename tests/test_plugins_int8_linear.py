"""plugins.int8_linear: the reference against the float64 math it defines, the kernel against the reference.

Small shapes run everywhere (Triton's interpreter on the CPU); `cuda` tests take the BERT-sized shapes through
every candidate tile configuration on a GPU.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.test_plugins_common import DEVICE, assert_codes_close, gen, kernels, poison, rel  # noqa: F401

L = kernels("int8_linear")
out_recip = kernels("common").out_recip

EPILOGUES = {
    "fp16": dict(),
    "gelu": dict(gelu=True),
    "residual": dict(residual=torch.float16),
    "int8": dict(int8=True),
    "gelu+int8": dict(gelu=True, int8=True),
    "residual+int8": dict(residual=torch.float16, int8=True),
    "gelu+int8/channel": dict(gelu=True, int8=True, per_channel=True),     # a smoothed fc2_in site
    "residual+int8/channel": dict(residual=torch.float16, int8=True, per_channel=True),
    "residual32+fp32": dict(residual=torch.float32, out_dtype=torch.float32),
    "gelu+residual+fp32": dict(gelu=True, residual=torch.float16, out_dtype=torch.float32),
    "residual8": dict(residual=torch.int8),                                  # -iln: the residual as codes
    "residual8/channel+int8": dict(residual=torch.int8, res_per_channel=True, int8=True),  # ... of a smoothed site
}


def problem(m, n, k, seed, device=DEVICE, residual=None):
    """Fresh random INT8 operands with realistic scales (y around +-5); never zeros."""
    g = gen(seed)
    a = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=g)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    w_scale = torch.rand(n, generator=g) * 0.004 + 0.001
    bias = torch.randn(n, generator=g) * 0.5
    a_scale = 0.05 * (1 + float(torch.rand((), generator=g)))
    if residual == torch.int8:
        res = torch.randint(-127, 128, (m, n), dtype=torch.int8, generator=g)
    else:
        res = (torch.randn(m, n, generator=g) * 2).to(residual) if residual is not None else None
    t = [x.to(device) if x is not None else None for x in (a, w, w_scale, bias, res)]
    return t[0], t[1], a_scale, t[2], t[3], t[4]


def kwargs_for(epilogue, a, w, a_scale, w_scale, bias, res):
    """Keyword arguments of one epilogue; an int8 output's scale clips the top 20% of |y| (clamping tested). An
    epilogue with an INT8 residual takes `res` as codes (an FP one is rounded to codes) with a residual scale."""
    e = EPILOGUES[epilogue]
    kw = dict(gelu=e.get("gelu", False), residual=res, out_dtype=e.get("out_dtype", torch.float16))
    if e.get("residual") == torch.int8 and res is not None:
        if res.dtype != torch.int8:
            kw["residual"] = torch.clamp(torch.round(res.float() * 30), -127, 127).to(torch.int8)
        scales = torch.rand(res.shape[1], generator=gen(res.shape[1])) * 0.03 + 0.01
        kw["residual_scale"] = scales.to(res.device).contiguous() if e.get("res_per_channel") else 1 / 57.3
    if e.get("int8"):
        y = L.int8_linear_reference(a, w, a_scale, w_scale, bias, **{**kw, "out_dtype": torch.float32})
        if e.get("per_channel"):  # each channel's own range, clipped by 20% (clamping tested per channel too)
            scales = (0.8 * y.abs().amax(dim=0).float().clamp_min(1e-3) / 127).cpu()
            kw["out_recip"] = (1.0 / scales).to(a.device).contiguous()
        else:
            kw["out_recip"] = out_recip(0.8 * float(y.abs().max()) / 127)
    return kw


def check(out, ref, exact):
    """Without GELU the kernel does the reference's float32 ops in the same order (no FMA contraction): it must
    agree bit for bit; under GELU (the device's fast exp or tanh, the dequantization in one multiply-add) it may
    differ in the last bits and a code by 1."""
    assert out.shape == ref.shape and out.dtype == ref.dtype
    if exact:
        assert torch.equal(out.cpu(), ref.cpu()), f"{int((out.cpu() != ref.cpu()).sum())} elements differ"
    elif ref.dtype == torch.int8:
        assert_codes_close(out, ref)
    else:
        assert rel(out, ref) < 1e-3


# --------------------------------------------------------------------------- the reference is the definition


def float64_definition(a, w, a_scale, w_scale, bias, residual, gelu, recip, residual_scale=None):
    """The module docstring's math in numpy float64, rounding only where it says float32."""
    acc = a.cpu().numpy().astype(np.int64) @ w.cpu().numpy().astype(np.int64).T
    s = (w_scale.cpu().numpy().astype(np.float32) * np.float32(a_scale)).astype(np.float64)
    y = acc * s + bias.cpu().numpy().astype(np.float64)
    if gelu:
        y = 0.5 * y * (1 + np.tanh(math.sqrt(2 / math.pi) * (y + 0.044715 * y ** 3)))  # GELU's tanh form
    # the size of the terms summed: float32 rounding errors scale with it, not with a cancelled sum
    mag = np.abs(acc * s) + np.abs(bias.cpu().numpy()) + np.abs(y)
    if residual is not None:
        r = residual.cpu().numpy().astype(np.float64)
        if residual_scale is not None:  # codes times their scale, one float32 product
            rs = residual_scale.cpu().numpy() if isinstance(residual_scale, torch.Tensor) else residual_scale
            r = (r.astype(np.float32) * np.float32(rs)).astype(np.float64)
        y, mag = y + r, mag + np.abs(r)
    if isinstance(recip, torch.Tensor):
        recip = recip.cpu().numpy().astype(np.float64)[None, :]  # already float32 values
    elif recip is not None:
        recip = float(np.float32(recip))
    t = y * recip if recip is not None else None
    codes = np.clip(np.round(t), -127, 127) if recip is not None else None  # np.round is half to even
    return y, mag, codes, t


@pytest.mark.parametrize("epilogue", list(EPILOGUES))
def test_reference_is_the_defined_math(epilogue):
    a, w, a_scale, w_scale, bias, res = problem(23, 40, 72, seed=100 + list(EPILOGUES).index(epilogue), device="cpu",
                                                residual=EPILOGUES[epilogue].get("residual"))
    kw = kwargs_for(epilogue, a, w, a_scale, w_scale, bias, res)
    acc = L.int32_matmul(a, w)
    assert acc.dtype == torch.int32
    assert np.array_equal(acc.numpy(), a.numpy().astype(np.int64) @ w.numpy().astype(np.int64).T)
    ref = L.int8_linear_reference(a, w, a_scale, w_scale, bias, **kw)
    exact = float64_definition(a, w, a_scale, w_scale, bias, kw["residual"], kw["gelu"], kw.get("out_recip"),
                               kw.get("residual_scale"))
    y, mag, codes, t = exact
    if ref.dtype == torch.int8:
        diff = np.abs(ref.numpy().astype(np.int64) - codes)
        assert diff.max() <= 1
        # float32 rounding can only move a value that sits within ~1e-4 of a .5 boundary
        near_half = np.abs(np.abs(t - np.floor(t)) - 0.5) < 1e-4
        assert not (diff[~near_half]).any()
    else:
        out_ulp = 2.0 ** -11 * np.abs(y) if ref.dtype == torch.float16 else 0.0  # half an fp16 ulp
        assert np.all(np.abs(ref.double().numpy() - y) <= out_ulp + 1e-6 * (mag + 1e-3))


def test_reference_rounds_where_the_definition_says():
    """Without GELU (whose exp is library-specific) the float32 reference is exact, op for op."""
    a, w, _, w_scale, bias, res = problem(19, 24, 48, seed=77, device="cpu", residual=torch.float32)
    a_scale = 1 / 70.3  # a double that float32 cannot hold: the product must use float32(a_scale)
    assert float(np.float32(a_scale)) != a_scale
    f32 = np.float32
    acc = (a.numpy().astype(np.int64) @ w.numpy().astype(np.int64).T).astype(f32)
    s = w_scale.numpy() * f32(a_scale)  # float32 * float32 -> float32
    y = acc * s + bias.numpy()
    ref = L.int8_linear_reference(a, w, a_scale, w_scale, bias, out_dtype=torch.float32)
    assert s.dtype == y.dtype == np.float32 and np.array_equal(ref.numpy(), y)
    ref = L.int8_linear_reference(a, w, a_scale, w_scale, bias, residual=res, out_dtype=torch.float32)
    assert np.array_equal(ref.numpy(), y + res.numpy())


# --------------------------------------------------------------------------- kernel == reference (all devices)


@pytest.mark.parametrize("m,n,k", [(1, 48, 64), (17, 96, 160), (130, 48, 64), (130, 96, 160)])
@pytest.mark.parametrize("epilogue", list(EPILOGUES))
def test_kernel_matches_reference(m, n, k, epilogue, poison):
    a, w, a_scale, w_scale, bias, res = problem(m, n, k, seed=m * 1000 + n + k + 10 * list(EPILOGUES).index(epilogue),
                                                residual=EPILOGUES[epilogue].get("residual"))
    kw = kwargs_for(epilogue, a, w, a_scale, w_scale, bias, res)
    # 16x32 tiles, 32-deep K steps: ragged M and N edges, several K steps, a partial last GROUP_M group
    cfg = L.GemmConfig(16, 32, 32, group_m=2, num_warps=4, num_stages=1)
    check(L.int8_linear(a, w, a_scale, w_scale, bias, config=cfg, **kw),
          L.int8_linear_reference(a, w, a_scale, w_scale, bias, **kw), exact=not kw["gelu"])


@pytest.mark.parametrize("recip", [30.0, 1000.0], ids=["floor-free", "floor-reached"])
def test_gelu_codes_clamp_at_minus_127_only_where_the_floor_reaches(recip, poison):
    """GELU's codes skip the clamp at -127 while GELU's floor (-0.17) times out_recip stays above it; at a
    reciprocal that puts the floor at -170 the clamp must stay, or those codes would wrap around."""
    a, w, a_scale, w_scale, bias, _ = problem(130, 96, 160, seed=55)
    kw = dict(gelu=True, out_recip=recip)
    ref = L.int8_linear_reference(a, w, a_scale, w_scale, bias, **kw)
    assert bool((ref == -127).any()) == (recip > 127.5 / 0.1705)
    check(L.int8_linear(a, w, a_scale, w_scale, bias, config=L.GemmConfig(16, 32, 32, group_m=2, num_warps=4,
                                                                           num_stages=1), **kw), ref, exact=False)


CONFIGS = {"uneven-k": L.GemmConfig(32, 64, 64, group_m=4, num_warps=4, num_stages=2), "default": None,
           **{str(c): c for c in L.CANDIDATE_CONFIGS}}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_every_config(config, poison):
    """Each candidate on a ragged problem (K = 160 is not a multiple of 64 or 128: the masked K loop)."""
    cfg = CONFIGS[config]
    a, w, a_scale, w_scale, bias, res = problem(130, 96, 160, seed=7 + list(CONFIGS).index(config),
                                                residual=torch.float16)
    for epilogue in ("gelu+int8", "residual", "residual8/channel+int8"):
        kw = kwargs_for(epilogue, a, w, a_scale, w_scale, bias, res if "residual" in epilogue else None)
        check(L.int8_linear(a, w, a_scale, w_scale, bias, config=cfg, **kw),
              L.int8_linear_reference(a, w, a_scale, w_scale, bias, **kw), exact=not kw["gelu"])


def test_row_strided_activations_and_residual(poison):
    a, w, a_scale, w_scale, bias, res = problem(33, 48, 64, seed=5, residual=torch.float16)
    a_big = torch.zeros(33, 96, dtype=torch.int8, device=a.device)
    a_big[:, 16:80] = a
    r_big = torch.zeros(33, 64, dtype=res.dtype, device=a.device)
    r_big[:, 8:56] = res
    cfg = L.GemmConfig(16, 32, 32, group_m=2, num_warps=4, num_stages=1)
    out = L.int8_linear(a_big[:, 16:80], w, a_scale, w_scale, bias, residual=r_big[:, 8:56], config=cfg)
    check(out, L.int8_linear_reference(a, w, a_scale, w_scale, bias, residual=res), exact=True)


def test_persistent_programs_walk_every_tile(poison, monkeypatch):
    """A persistent TMA launch on fewer programs than tiles (3 'SMs', 3 x 2 tiles, K in 3 steps with a ragged
    tail): each program loops over tiles and every output element is still written once, right."""
    monkeypatch.setattr(L, "_sm_count", lambda device: 3)
    a, w, a_scale, w_scale, bias, res = problem(130, 96, 160, seed=17, residual=torch.float16)
    for store in (False, True):
        cfg = L.GemmConfig(64, 64, 64, group_m=2, num_warps=4, num_stages=2, loads="tma-persistent",
                           tma_store=store)
        for epilogue in ("gelu+int8/channel", "residual"):
            kw = kwargs_for(epilogue, a, w, a_scale, w_scale, bias, res if "residual" in epilogue else None)
            check(L.int8_linear(a, w, a_scale, w_scale, bias, config=cfg, **kw),
                  L.int8_linear_reference(a, w, a_scale, w_scale, bias, **kw), exact=not kw["gelu"])


def test_tma_store_clips_ragged_edges_and_falls_back_on_unaligned_residual(poison):
    """The TMA epilogue (GemmConfig.tma_store) on 130 x 80 outputs in 64 x 64 tiles writes exactly the output,
    nothing past it (the copy engine clips), for each epilogue; a residual with a 40-byte row stride, which TMA
    cannot read, takes the pointer epilogue with the same result."""
    a, w, a_scale, w_scale, bias, res = problem(130, 80, 96, seed=29, residual=torch.float16)
    cfg = L.GemmConfig(64, 64, 64, group_m=2, num_warps=4, num_stages=2, loads="tma", tma_store=True)
    for epilogue in EPILOGUES:
        kw = kwargs_for(epilogue, a, w, a_scale, w_scale, bias, res if "residual" in epilogue else None)
        check(L.int8_linear(a, w, a_scale, w_scale, bias, config=cfg, **kw),
              L.int8_linear_reference(a, w, a_scale, w_scale, bias, **kw), exact=not kw["gelu"])
    a, w, a_scale, w_scale, bias, res = problem(33, 16, 64, seed=31, residual=torch.float16)
    r_big = torch.zeros(33, 20, dtype=res.dtype, device=a.device)
    r_big[:, :16] = res
    assert not L.tma_ok(r_big[:, :16])
    check(L.int8_linear(a, w, a_scale, w_scale, bias, residual=r_big[:, :16], config=cfg),
          L.int8_linear_reference(a, w, a_scale, w_scale, bias, residual=res), exact=True)


@pytest.mark.parametrize("k,split", [(512, 4), (416, 3), (96, 4)])
def test_split_k_slices_add_up_exactly(k, split, poison):
    """Split K: whole slices (512 = 4 x 2 steps of 64, unmasked), a ragged last slice (416 in 3), and slices
    that start past K (96 in 4: two slices sum nothing); the int32 partials add up to the exact accumulator."""
    a, w, a_scale, w_scale, bias, res = problem(33, 96, k, seed=23 + k, residual=torch.float16)
    cfg = L.GemmConfig(16, 32, 64, group_m=2, num_warps=4, num_stages=2, split_k=split)
    for epilogue in ("residual", "gelu+int8", "residual8"):
        kw = kwargs_for(epilogue, a, w, a_scale, w_scale, bias, res if "residual" in epilogue else None)
        check(L.int8_linear(a, w, a_scale, w_scale, bias, config=cfg, **kw),
              L.int8_linear_reference(a, w, a_scale, w_scale, bias, **kw), exact=not kw["gelu"])


def test_tma_config_on_unaligned_rows_takes_the_pointer_kernel(poison):
    """TMA needs 16-byte row strides; a view with 72-byte rows runs the pointer kernel, with the same result."""
    a, w, a_scale, w_scale, bias, _ = problem(33, 48, 64, seed=19)
    a_big = torch.zeros(33, 72, dtype=torch.int8, device=a.device)
    a_big[:, 8:72] = a
    view = a_big[:, 8:72]
    assert not L.tma_ok(view) and L.tma_ok(a) and L.tma_ok(w)
    cfg = L.GemmConfig(64, 64, 64, loads="tma")
    check(L.int8_linear(view, w, a_scale, w_scale, bias, config=cfg),
          L.int8_linear_reference(a, w, a_scale, w_scale, bias), exact=True)


def test_fp16_linear_is_the_same_kernel_on_fp16_operands(poison):
    """fp16_linear (the TMA kernel with FP16 operands, float32 sums, no dequantization) against float32 math,
    ragged tiles, with and without the TMA epilogue; non-TMA configurations are refused."""
    from model.bert import gelu_tanh

    g = gen(37)
    a, w = (torch.randn(130, 96, generator=g) * 2).half(), (torch.randn(80, 96, generator=g) / 10).half()
    bias, res = torch.randn(80, generator=g), torch.randn(130, 80, generator=g).half()
    a, w, bias, res = (t.to(DEVICE) for t in (a, w, bias, res))
    for store in (False, True):
        cfg = L.GemmConfig(64, 64, 32, group_m=2, num_warps=4, num_stages=2, loads="tma", tma_store=store)
        for gelu, residual in ((False, None), (True, None), (False, res)):
            y = a.float() @ w.float().t() + bias
            y = gelu_tanh(y) if gelu else y
            y = y + residual.float() if residual is not None else y
            out = L.fp16_linear(a, w, bias, residual=residual, gelu=gelu, config=cfg)
            assert out.dtype == torch.float16 and rel(out.float(), y) < 2e-3
    with pytest.raises(ValueError, match="TMA configuration"):
        L.fp16_linear(a, w, bias, config=L.GemmConfig(64, 64, 32))


def test_default_config_follows_m():
    assert L.default_config(4096, 1024, "cpu").block_m == 128
    small = L.default_config(128, 384, "cpu")
    assert small.block_m <= 32 and small in L.CANDIDATE_CONFIGS
    assert L.default_config(1, 48, "cpu") == min(L.CANDIDATE_CONFIGS, key=lambda c: c.block_m * c.block_n)
    assert any(c.block_m == 16 for c in L.CANDIDATE_CONFIGS)
    assert any(c.block_m * c.block_n >= 128 * 256 for c in L.CANDIDATE_CONFIGS)


def test_bad_arguments_are_refused():
    a, w, a_scale, w_scale, bias, _ = problem(4, 32, 64, seed=3)
    with pytest.raises(ValueError, match="power of two"):
        L.GemmConfig(48, 32, 32)
    with pytest.raises(ValueError, match="loads must be one of"):
        L.GemmConfig(64, 64, 64, loads="cp.async")
    with pytest.raises(ValueError, match="split_k"):
        L.GemmConfig(64, 64, 64, loads="tma", split_k=2)
    with pytest.raises(ValueError, match="tma_store"):
        L.GemmConfig(64, 64, 64, tma_store=True)
    with pytest.raises(ValueError, match="int8"):
        L.int8_linear(a.float(), w, a_scale, w_scale, bias)
    with pytest.raises(ValueError, match=r"\[N, 64\]"):
        L.int8_linear(a, w[:, :32].contiguous(), a_scale, w_scale, bias)
    with pytest.raises(ValueError, match="w_scale"):
        L.int8_linear(a, w, a_scale, w_scale.double(), bias)
    with pytest.raises(ValueError, match="residual"):
        L.int8_linear(a, w, a_scale, w_scale, bias, residual=torch.ones(4, 31, device=a.device))
    codes = torch.zeros(4, 32, dtype=torch.int8, device=a.device)
    for bad in (dict(residual=codes), dict(residual=codes.half(), residual_scale=0.1),
                dict(residual=codes, residual_scale=torch.ones(31, device=a.device))):
        with pytest.raises(ValueError, match="residual_scale"):
            L.int8_linear(a, w, a_scale, w_scale, bias, **bad)
    assert L.int8_linear(a[:0], w, a_scale, w_scale, bias).shape == (0, 32)


# --------------------------------------------------------------------------- GPU: BERT-sized problems


@pytest.mark.cuda
@pytest.mark.parametrize("n,k", [(1024, 1024), (4096, 1024), (1024, 4096)])
@pytest.mark.parametrize("config", range(len(L.CANDIDATE_CONFIGS)))
def test_cuda_large_every_config(n, k, config, poison):
    cfg = L.CANDIDATE_CONFIGS[config]
    if cfg.tma and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA loads need sm_90 or newer")
    a, w, a_scale, w_scale, bias, res = problem(4096, n, k, seed=n + k + config, residual=torch.float16)
    for epilogue in ("fp16", "gelu+int8", "residual", "residual8"):
        kw = kwargs_for(epilogue, a, w, a_scale, w_scale, bias, res if "residual" in epilogue else None)
        check(L.int8_linear(a, w, a_scale, w_scale, bias, config=cfg, **kw),
              L.int8_linear_reference(a, w, a_scale, w_scale, bias, **kw), exact=not kw["gelu"])


@pytest.mark.cuda
@pytest.mark.parametrize("m", [1, 16, 128, 384, 49152])
@pytest.mark.parametrize("epilogue", list(EPILOGUES))
def test_cuda_default_config(m, epilogue, poison):
    n, k = (1536, 384) if m < 49152 else (1024, 1024)
    a, w, a_scale, w_scale, bias, res = problem(m, n, k, seed=m + 10 * list(EPILOGUES).index(epilogue),
                                                residual=EPILOGUES[epilogue].get("residual"))
    kw = kwargs_for(epilogue, a, w, a_scale, w_scale, bias, res)
    check(L.int8_linear(a, w, a_scale, w_scale, bias, **kw),
          L.int8_linear_reference(a, w, a_scale, w_scale, bias, **kw), exact=not kw["gelu"])


@pytest.mark.cuda
def test_cuda_bfloat16_output(poison):
    a, w, a_scale, w_scale, bias, res = problem(256, 384, 384, seed=9, residual=torch.bfloat16)
    kw = dict(residual=res, gelu=True, out_dtype=torch.bfloat16)
    out = L.int8_linear(a, w, a_scale, w_scale, bias, **kw)
    assert rel(out, L.int8_linear_reference(a, w, a_scale, w_scale, bias, **kw)) < 1e-2


@pytest.mark.cuda
def test_cuda_graph_capture():
    """The engine captures its forward into CUDA graphs: the wrapper must launch without host syncs."""
    a, w, a_scale, w_scale, bias, res = problem(384, 1536, 384, seed=12, residual=torch.float16)
    kw = dict(gelu=True, out_recip=out_recip(0.05))
    L.int8_linear(a, w, a_scale, w_scale, bias, **kw)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = L.int8_linear(a, w, a_scale, w_scale, bias, **kw)
    a.copy_(torch.randint(-127, 128, a.shape, dtype=torch.int8, generator=gen(13)).cuda())
    graph.replay()
    torch.cuda.synchronize()
    assert_codes_close(out, L.int8_linear_reference(a, w, a_scale, w_scale, bias, **kw))



@pytest.mark.cuda
def test_cuda_pdl_chain_in_a_graph_matches_stream_order(monkeypatch):
    """Under programmatic dependent launch a kernel starts before the kernel it reads from has finished. A chain
    of dependent kernels captured in a CUDA graph (prefetching GEMM -> split-K prefetching GEMM with residual ->
    LayerNorm with codes -> quantize of a transposed view -> TMA GEMM), replayed on fresh inputs, must give bit
    for bit what it gives launched in plain stream order."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs sm_90")
    from plugins import common
    from plugins.layernorm import layernorm_quant
    from plugins.quantize import quantize_rows

    m, h = 128, 512
    a, w1, a_scale, s1, b1, res = problem(m, h, h, seed=31, residual=torch.float16)
    _, w2, _, s2, b2, _ = problem(m, h, h, seed=32)
    _, w3, _, s3, b3, _ = problem(m, h, h, seed=33)
    ln_w, ln_b = (torch.rand(h, generator=gen(34)) + 0.5).cuda(), torch.randn(h, generator=gen(35)).cuda()
    configs = [L.GemmConfig(64, 64, 128, prefetch=True), L.GemmConfig(32, 64, 128, split_k=4, prefetch=True),
               L.GemmConfig(64, 64, 128, loads="tma")]

    def chain():
        x = L.int8_linear(a, w1, a_scale, s1, b1, gelu=True, out_recip=out_recip(0.05), config=configs[0])
        y = L.int8_linear(x, w2, 0.05, s2, b2, residual=res, config=configs[1])
        _, yq = layernorm_quant(y, ln_w, ln_b, 1e-12, out_recip(0.03))
        t = yq.float().view(m, 8, h // 8).transpose(0, 1)  # a strided view, as attention's context is
        q = quantize_rows(t, out_recip(0.5)).view(m, h)
        return L.int8_linear(q, w3, 0.5, s3, b3, config=configs[2])

    outputs = {}
    for launch in (False, True):
        monkeypatch.setattr(common, "PDL_ENABLED", launch)
        assert common.pdl(a.device) is launch
        a.copy_(torch.randint(-127, 128, a.shape, dtype=torch.int8, generator=gen(36)).cuda())
        chain()  # compile outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = chain()
        runs = []
        for seed in (37, 38, 39):
            a.copy_(torch.randint(-127, 128, a.shape, dtype=torch.int8, generator=gen(seed)).cuda())
            graph.replay()
            runs.append(out.clone())
        torch.cuda.synchronize()
        outputs[launch] = runs
    for plain, pdl in zip(outputs[False], outputs[True]):
        assert torch.equal(plain, pdl)
    assert not torch.equal(outputs[True][0], outputs[True][1])  # the replays did read the new inputs


def test_prefetch_and_split_k_are_small_m_options():
    """Weight prefetch needs pointer loads; prefetch and split K are batch-1 tools that builds time only at
    few rows, and the default configuration never uses them."""
    with pytest.raises(ValueError, match="prefetch"):
        L.GemmConfig(64, 64, 128, loads="tma", prefetch=True)
    assert L.GemmConfig(64, 64, 128, prefetch=True).small_m and L.GemmConfig(64, 64, 128, split_k=2).small_m
    assert not L.GemmConfig(64, 64, 128).small_m
    assert any(c.prefetch for c in L.CANDIDATE_CONFIGS)
    for m, n in ((1, 48), (128, 1024), (128, 4096), (49152, 1024)):
        assert not L.default_config(m, n, "cpu").small_m


def test_gemm_exploration_plan_names_every_candidate(capsys):
    """benchmarks/device_gemm_explore's plan (its --dry-run needs no GPU): BERT-large's batch-1 shapes, every
    candidate."""
    pytest.importorskip("triton")
    from benchmarks.device_gemm_explore import main

    main(["--dry-run", "--shapes", "large-small"])
    out = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in out[:4]] == [f"large-small-{k}" for k in ("qkv", "attn_out", "fc1", "fc2")]
    assert all(f"{len(L.CANDIDATE_CONFIGS)} configs" in line for line in out[:4])
    assert out[-1].startswith("4 shapes")


def test_gemm_exploration_survives_a_crashing_compiler(monkeypatch, capsys):
    """Each kernel compiles in its own process: one that dies (an MLIR assertion aborts) or hangs is reported and
    kept out of the timing loop; one that raises is reported; --configs picks candidates by name."""
    pytest.importorskip("triton")
    import subprocess

    import benchmarks.device_gemm_explore as X

    shape = X.select(X.all_shapes(), "large-small-fc2")[0]
    picked = X.plan(shape, torch.device("cpu"), "-k4,+tma-persistent")
    assert picked and all("-k4" in X.triton_impl(c) or "+tma-persistent" in X.triton_impl(c) for c in picked)
    assert X.plan(shape, torch.device("cpu")) == list(L.CANDIDATE_CONFIGS)
    configs = list(L.CANDIDATE_CONFIGS[:4])
    outcome = dict(zip(map(X.triton_impl, configs), ("ok", "abort", "raise", "hang")))

    def fake_run(argv, **kw):
        what = outcome[argv[-1]]
        if what == "hang":
            raise subprocess.TimeoutExpired(argv, kw["timeout"])
        code = {"ok": 0, "abort": -6, "raise": 1}[what]
        return subprocess.CompletedProcess(argv, code, "", "Traceback\nAssertionError: boom" if code else "")

    monkeypatch.setattr(X.subprocess, "run", fake_run)
    failed, crashed = X.precompile([(shape, c) for c in configs], jobs=2)
    assert crashed == {X.kernel_key(shape, configs[1]), X.kernel_key(shape, configs[3])}
    assert len(failed) == 3 and "AssertionError: boom" in failed[1] and "status -6" in failed[0]
    assert "still compiling" in failed[2]
