"""FP8 E4M3 from our kernels against the references: the GEMM with its fused epilogue (plugins.fp8_linear.fp8_linear,
the INT8 GEMM's kernels on E4M3 codes) and the E4M3 codes of the LayerNorm, the attention kernels (padded and
packed) and the quantize pass.

On the CPU the kernels run in Triton's interpreter, whose own float32 -> E4M3 conversion rounds wrongly (ties away
from zero, and a mantissa that rounds up loses its carry: -127.99 became -64); the kernels round to E4M3's grid
first there (plugins.common.round_to_e4m3), so these tests hold them to the GPU's rounding, to the bit. The GEMM's
operands are drawn so that every float32 sum is exact in any order (`e4m3_codes`): the accumulator is then the
reference's exactly, and without GELU the outputs are too, bit for bit; full-range codes, whose sums round, are
held to the rule the build holds candidates to (engines.tuning.agrees). The `cuda` tests take BERT's shapes through
every tile configuration; one test compiles the kernels for sm_90 and sm_89 without a GPU.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from engines.tuning import FP8_CODES_OFF, FP8_NEAR_ZERO, agrees, attention_agrees, fp8_steps
from quant.formats import FP8_E4M3, INT8, QuantFormat
from tests.test_plugins_common import DEVICE, assert_codes_close, gen, kernels, poison, rel  # noqa: F401

L = kernels("int8_linear")
F8 = kernels("fp8_linear")  # after int8_linear: fp8_linear launches its kernels
LN = kernels("layernorm")
Q = kernels("quantize")
A = kernels("attention")
V = kernels("varlen_attention")
common = kernels("common")
E4M3 = torch.float8_e4m3fn


def e4m3_codes(shape, g, exact: bool = True) -> torch.Tensor:
    """E4M3 codes. exact: magnitudes 2**e * (1 + j/8) for e in [-1, 3] (0.5 to 15), a tenth of them 0, so every
    product is a multiple of 2**-8 below 2**8 and any sum of fewer than 256 of them is exact in float32, whatever
    the order. Else normal values over a quarter of the range, as an activation's codes look (products and sums
    round)."""
    if not exact:  # clamped: torch casts a value past E4M3's 448 to NaN
        return (torch.randn(shape, generator=g) * 112).clamp(-448, 448).to(E4M3)
    e = torch.randint(-1, 4, shape, generator=g).float()
    v = torch.exp2(e) * (1 + torch.randint(0, 8, shape, generator=g).float() / 8)
    v = torch.where(torch.rand(shape, generator=g) < 0.5, -v, v)
    return torch.where(torch.rand(shape, generator=g) < 0.1, torch.zeros_like(v), v).to(E4M3)


def problem(m, n, k, seed, exact=True, device=DEVICE):
    """FP8 operands with per-channel weight scales, a bias, an FP16 residual, -iln-style INT8 residual codes with
    per-channel scales and --fp8 -iln's E4M3 residual codes; outputs around +-5."""
    g = gen(seed)
    a, w = e4m3_codes((m, k), g, exact), e4m3_codes((n, k), g, exact)
    w_scale = (torch.rand(n, generator=g) + 0.5) * (0.3 if exact else 3e-4) / k ** 0.5
    bias = torch.randn(n, generator=g) * 0.5
    res = (torch.randn(m, n, generator=g) * 2).half()
    res8 = torch.randint(-127, 128, (m, n), dtype=torch.int8, generator=g)
    res_scale = torch.rand(n, generator=g) * 0.03 + 0.01
    res_e4m3 = e4m3_codes((m, n), g, exact)
    t = [x.to(device) for x in (a, w, w_scale, bias, res, res8, res_scale, res_e4m3)]
    return dict(a_q=t[0], w_q=t[1], a_scale=0.7, w_scale=t[2], bias=t[3]), dict(residual=t[4], res8=t[5],
                                                                               res_scale=t[6], res_e4m3=t[7])


EPILOGUES = {  # name: (GELU, residual: None, "fp16", "int8", "int8/channel", "e4m3", output: fp16, fp32 or codes)
    "fp16": (False, None, "fp16"),
    "fp32": (False, None, "fp32"),
    "gelu": (True, None, "fp16"),
    "residual": (False, "fp16", "fp16"),
    "residual8/channel": (False, "int8/channel", "fp16"),
    "fp8": (False, None, "fp8"),
    "fp8/channel": (False, None, "fp8/channel"),
    "gelu+fp8": (True, None, "fp8"),               # FC1 writing FC2's codes
    "residual+fp8/channel": (False, "fp16", "fp8/channel"),
    "residual8+fp8": (False, "int8", "fp8"),
    "gelu+int8": (True, None, "int8"),             # an FP8 GEMM writing an INT8 GEMM's codes
    "residual-e4m3+fp8": (False, "e4m3", "fp8"),   # --fp8 -iln: the residual stream as E4M3 codes
}


def epilogue_kwargs(name, operands, extra):
    """fp8_linear's keyword arguments for one epilogue; an output's scale clips its top 20% (saturation tested),
    per tensor or per channel."""
    gelu, residual, out = EPILOGUES[name]
    kw = dict(gelu=gelu, out_dtype=torch.float32 if out == "fp32" else torch.float16)
    if residual == "fp16":
        kw["residual"] = extra["residual"]
    elif residual == "e4m3":
        kw.update(residual=extra["res_e4m3"], residual_scale=0.05)
    elif residual is not None:
        kw.update(residual=extra["res8"], residual_scale=extra["res_scale"] if residual.endswith("/channel")
                  else 1 / 57.3)
    if out.startswith(("fp8", "int8")):
        fmt = FP8_E4M3 if out.startswith("fp8") else INT8
        y = F8.fp8_linear_reference(**operands, **{**kw, "out_dtype": torch.float32}).abs()
        if out.endswith("/channel"):
            kw["out_recip"] = (fmt.qmax / (0.8 * y.amax(dim=0).clamp_min(1e-3))).contiguous()
        else:
            kw["out_recip"] = common.out_recip(0.8 * float(y.max()) / fmt.qmax)
        kw["out_format"] = fmt
    return kw


def bits(t: torch.Tensor) -> torch.Tensor:
    """E4M3 codes as their bytes, on the CPU (torch.equal compares them bit for bit, -0 against 0 too)."""
    return t.cpu().view(torch.uint8)


def assert_fp8_codes_close(q, ref, rate=1e-3):
    """E4M3 codes equal but for a rare one-step difference (a value at a rounding boundary), and codes whose values
    are closer than the build's FP8_NEAR_ZERO (E4M3's grid near zero is finer than float32 sums in another order
    hold a value that cancels); no NaN (poison). `rate`: the share that may be a step off (on the GPU's FP8 tensor
    cores, the build's FP8_CODES_OFF)."""
    assert q.dtype == ref.dtype == E4M3 and q.shape == ref.shape
    q, ref = q.cpu(), ref.cpu()
    assert not torch.isnan(q.float()).any(), "unwritten (poisoned) codes"
    diff = (fp8_steps(q) - fp8_steps(ref)).abs()
    near = (q.float() - ref.float()).abs() <= FP8_NEAR_ZERO * ref.float().abs().max()
    far = diff.masked_fill(near, 0)
    assert int(far.max()) <= 1, f"codes differ by {int(far.max())} E4M3 steps away from zero"
    ones = int((diff == 1).sum())
    assert ones <= max(4, rate * diff.numel()), f"{ones} codes of {diff.numel()} differ"


def check(out, ref, exact, rate=1e-3):
    """exact: bit for bit (codes' bits, -0 included). Else FP outputs within 1e-3 and codes within a step, rarely
    (GELU: its exp in another order, the dequantization in one multiply-add; codes in `rate` of places)."""
    assert out.shape == ref.shape and out.dtype == ref.dtype
    if exact:
        out, ref = (bits(out), bits(ref)) if ref.dtype == E4M3 else (out.cpu(), ref.cpu())
        assert torch.equal(out, ref), f"{int((out != ref).sum())} elements differ"
    elif ref.dtype == E4M3:
        assert_fp8_codes_close(out, ref, rate)
    elif ref.dtype == torch.int8:
        assert_codes_close(out, ref, rate)
    else:
        assert rel(out, ref) < 1e-3


def assert_codes_of_own_output(ops, kw, config):
    """The kernel's E4M3 codes are codes_reference of its own float32 output (same tiles, same sums), bit for
    bit: whatever the accumulation order did, the epilogue's conversion is the reference's. (The float32 output
    tile may not fit shared memory where the E4M3 one did: a skip, as for any tile that cannot fit.)"""
    y32 = fp8_linear_or_skip(ops, {**kw, "out_recip": None, "out_dtype": torch.float32}, config)
    codes = fp8_linear_or_skip(ops, kw, config)
    want = common.codes_reference(y32, kw["out_recip"], FP8_E4M3)
    assert torch.equal(bits(codes), bits(want))


# 16x32 tiles, 32-deep K steps over K = 72 (a masked tail), M = 130 and N = 80 ragged; TMA wants 16-byte rows (K = 96)
POINTER = L.GemmConfig(16, 32, 32, group_m=2, num_warps=4, num_stages=1)
CONFIGS = {"tma+store": (L.GemmConfig(64, 64, 32, group_m=2, num_warps=4, num_stages=2, loads="tma",
                                      tma_store=True), 96),
           "tma-persistent": (L.GemmConfig(64, 64, 32, group_m=2, num_warps=4, num_stages=2,
                                           loads="tma-persistent"), 96),
           "split-k3": (L.GemmConfig(16, 32, 32, group_m=2, num_warps=4, num_stages=1, split_k=3), 72),
           "fast-accum": (L.GemmConfig(16, 32, 32, group_m=2, num_warps=4, num_stages=1, fast_accum=True), 72),
           "tma fast-accum": (L.GemmConfig(64, 64, 32, group_m=2, num_warps=4, num_stages=2, loads="tma",
                                           fast_accum=True), 96)}


def test_exact_sums_are_exact_in_any_order():
    """The premise of the exact tests: float32 sums of these codes' products do not depend on the order."""
    ops, _ = problem(33, 40, 255, seed=1, device="cpu")
    exact = ops["a_q"].double() @ ops["w_q"].double().t()
    products = ops["a_q"].float()[:, None, :] * ops["w_q"].float()[None, :, :]  # each exact in float32
    assert torch.equal(F8.fp8_matmul(ops["a_q"], ops["w_q"]).double(), exact)
    for order in (torch.arange(255), torch.arange(254, -1, -1), torch.randperm(255, generator=gen(2))):
        assert torch.equal(products[..., order].cumsum(-1, dtype=torch.float32)[..., -1].double(), exact)
    assert float(exact.abs().max()) > 2 ** 11  # sums that need more bits than the products


@pytest.mark.parametrize("epilogue", list(EPILOGUES))
def test_kernel_matches_reference(epilogue, poison):
    ops, extra = problem(130, 80, 72, seed=10 + list(EPILOGUES).index(epilogue))
    kw = epilogue_kwargs(epilogue, ops, extra)
    check(F8.fp8_linear(**ops, **kw, config=POINTER), F8.fp8_linear_reference(**ops, **kw), exact=not kw["gelu"])


@pytest.mark.parametrize("config", list(CONFIGS))
def test_tma_persistent_and_split_k(config, poison, monkeypatch):
    """The other kernel variants on FP8 operands: TMA loads with the TMA epilogue (ragged edges clipped), the
    persistent TMA loop on fewer programs than tiles, split K into float32 partials, fast accumulation (whose
    sums the interpreter keeps in float32, so this checks its plumbing; the `cuda` tests its sums)."""
    monkeypatch.setattr(L, "_sm_count", lambda device: 3)
    cfg, k = CONFIGS[config]
    ops, extra = problem(130, 80, k, seed=30 + k)
    for epilogue in ("gelu+fp8", "residual+fp8/channel", "residual8/channel", "residual-e4m3+fp8"):
        kw = epilogue_kwargs(epilogue, ops, extra)
        check(F8.fp8_linear(**ops, **kw, config=cfg), F8.fp8_linear_reference(**ops, **kw), exact=not kw["gelu"])


def test_full_range_codes_agree_as_the_build_requires(poison):
    """Codes over the whole range: products and sums round, in another order than the reference's; outputs stay
    within float32 rounding of it and codes within one step in few places (engines.tuning.agrees, the build's
    rule), with the default configuration too; the codes are those of the kernel's own float32 output."""
    ops, extra = problem(67, 96, 160, seed=7, exact=False)
    for config in (POINTER, None):
        for epilogue in ("fp32", "gelu+fp8", "residual+fp8/channel"):
            kw = epilogue_kwargs(epilogue, ops, extra)
            got, ref = F8.fp8_linear(**ops, **kw, config=config), F8.fp8_linear_reference(**ops, **kw)
            assert agrees(got.cpu(), ref.cpu())
            if ref.dtype == torch.float32:
                assert rel(got, ref) < 1e-6
            else:
                assert_codes_of_own_output(ops, kw, config)


def test_bad_arguments_are_refused():
    ops, _ = problem(4, 32, 64, seed=3)
    with pytest.raises(ValueError, match="fp8_linear: a_q and w_q must be 2-D torch.float8_e4m3fn"):
        F8.fp8_linear(**{**ops, "a_q": ops["a_q"].to(torch.int8)})
    with pytest.raises(ValueError, match=r"\[N, 64\]"):
        F8.fp8_linear(**{**ops, "w_q": ops["w_q"][:, :32].contiguous()})
    toy = QuantFormat("toy", torch.int16, 1000, integer=True)
    with pytest.raises(ValueError, match="not toy"):
        F8.fp8_linear(**ops, out_recip=1.0, out_format=toy)
    assert F8.fp8_linear(**{**ops, "a_q": ops["a_q"][:0]}).shape == (0, 32)


# ------------------------------------------------------------------------------------ E4M3 codes of other kernels


def e4m3_grid_and_ties() -> torch.Tensor:
    """Every finite E4M3 value, the midpoints between neighbours (ties), a float32 step either side of each,
    values past the saturation and tiny ones of both signs."""
    grid = torch.arange(256, dtype=torch.uint8).view(E4M3).float()
    grid = grid[torch.isfinite(grid)].unique()
    mid = (grid[1:] + grid[:-1]) / 2
    up, down = torch.nextafter(mid, mid + 1), torch.nextafter(mid, mid - 1)
    extra = torch.tensor([500.0, -500.0, 464.0, -464.0, 463.99, 1e30, -1e30, 0.0, -0.0, -1e-5, 1e-5, -2.0 ** -10])
    return torch.cat([grid, mid, up, down, extra, torch.randn(4000, generator=gen(5)) * 60])


def test_quantize_rounds_to_nearest_even_like_torch():
    """quantize_rows to E4M3 (recip 1: nothing but the rounding) gives torch's cast of the saturated value, bit
    for bit (-0 too), at every tie and around it; and strided views with an arbitrary reciprocal."""
    x = e4m3_grid_and_ties().to(DEVICE)
    q = Q.quantize_rows(x, 1.0, FP8_E4M3)
    ref = Q.quantize_rows_reference(x, 1.0, FP8_E4M3)
    assert q.dtype == E4M3 and torch.equal(bits(q), bits(ref))
    assert torch.equal(ref, torch.clamp(x, -448, 448).to(E4M3))
    ctx = (torch.randn(2, 4, 9, 16, generator=gen(3)) * 40).half().to(DEVICE).transpose(1, 2)
    recip = common.out_recip(0.37)
    want = Q.quantize_rows_reference(ctx, recip, FP8_E4M3)
    assert torch.equal(bits(Q.quantize_rows(ctx, recip, FP8_E4M3)), bits(want))


@pytest.mark.parametrize("shape,dtype", [((2, 5, 384), torch.float16), ((2, 3, 100), torch.float32)],
                         ids=["fp16-384", "fp32-ragged-100"])
def test_layernorm_writes_e4m3_codes(shape, dtype, poison):
    """The LayerNorm's E4M3 codes are those of its own x.dtype output, exactly, and within a step of the
    reference's (whose output may differ in the last bit); per tensor and per channel, codes alone, and -iln's
    dequantized output beside them."""
    h = shape[-1]
    g = gen(h)
    x, w, b = (torch.randn(*shape, generator=g) * 3, 1 + 0.2 * torch.randn(h, generator=g),
               0.1 * torch.randn(h, generator=g))
    x, w, b = (t.to(dtype).to(DEVICE) for t in (x, w, b))
    ref_y, _ = LN.layernorm_quant_reference(x, w, b, 1e-12)
    for recip in (common.out_recip(0.9 * float(ref_y.float().abs().max()) / 448),
                  (448 / (0.9 * ref_y.float().abs().reshape(-1, h).amax(0))).contiguous()):
        y, q = LN.layernorm_quant(x, w, b, 1e-12, recip, fmt=FP8_E4M3)
        _, ref_q = LN.layernorm_quant_reference(x, w, b, 1e-12, recip, fmt=FP8_E4M3)
        assert q.dtype == E4M3 and rel(y, ref_y) < 1e-3
        assert torch.equal(bits(q), bits(common.codes_reference(y, recip, FP8_E4M3)))
        assert_fp8_codes_close(q, ref_q, rate=2e-3)
        none, alone = LN.layernorm_quant(x, w, b, 1e-12, recip, codes_only=True, fmt=FP8_E4M3)
        assert none is None and torch.equal(bits(alone), bits(q))
        scale = common.out_recip(1 / recip) if isinstance(recip, float) else (1 / recip).contiguous()
        rounded, q2 = LN.layernorm_quant(x, w, b, 1e-12, recip, scale, fmt=FP8_E4M3)
        assert torch.equal(rounded, (q2.float() * scale).to(dtype))


def attention_problem(batch, s, heads, d, seed):
    g = gen(seed)
    qkv = (torch.randn(batch * s, 3 * heads * d, generator=g) * 1.5).half()
    bias = torch.zeros(batch, s, dtype=torch.float16)
    bias[1:, s - s // 3:] = torch.finfo(torch.float16).min
    return qkv.to(DEVICE), bias.to(DEVICE)


def context_recips(ctx: torch.Tensor):
    """E4M3 reciprocals that clip the top 20% of |context|: one, and one per channel."""
    amax = ctx.float().abs()
    return [common.out_recip(0.8 * float(amax.max()) / 448),
            (448 / (0.8 * amax.amax(dim=0).clamp_min(1e-3))).contiguous().to(ctx.device)]


@pytest.mark.parametrize("config", [A.AttentionConfig(16, 16), A.AttentionConfig(16, 16, tma=True)],
                         ids=lambda c: c.name)
def test_attention_writes_e4m3_context_codes(config, poison):
    """The fused attention's E4M3 context codes are those of its own float32 context exactly (the store path)
    and agree with the reference's as the build requires of a candidate against SDPA (attention_agrees)."""
    for s, padded in ((40, True), (32, False)):  # ragged blocks with padding; whole blocks (TMA tiles) without
        qkv, bias = attention_problem(2, s, 2, 16, seed=s)
        bias = bias if padded else None
        ctx32 = A.fused_attention(qkv, 2, 2, bias, out_dtype=torch.float32, config=config)
        for recip in context_recips(ctx32):
            got = A.fused_attention(qkv, 2, 2, bias, out_recip=recip, config=config, out_format=FP8_E4M3)
            assert torch.equal(bits(got), bits(common.codes_reference(ctx32, recip, FP8_E4M3)))
            ref = A.attention_reference(qkv, 2, 2, bias, out_recip=recip, out_format=FP8_E4M3)
            assert ref.dtype == E4M3 and attention_agrees(got.cpu(), ref.cpu())


def test_varlen_attention_writes_e4m3_context_codes(poison):
    """Packed windows (one empty, tail rows past the last) with E4M3 context codes per channel: the codes of the
    kernel's own float32 context, and close to the per-window reference's."""
    lengths, heads, d = [9, 0, 23, 17], 2, 16
    qkv = (torch.randn(sum(lengths) + 5, 3 * heads * d, generator=gen(9)) * 1.5).half().to(DEVICE)
    cu = torch.tensor([0, 9, 9, 32, 49], dtype=torch.int32, device=DEVICE)
    cfg = A.AttentionConfig(16, 16)
    ctx32 = V.fused_varlen_attention(qkv, cu, 23, heads, out_dtype=torch.float32, config=cfg)[:49]
    recip = context_recips(ctx32)[1]
    got = V.fused_varlen_attention(qkv, cu, 23, heads, out_recip=recip, config=cfg, out_format=FP8_E4M3)[:49]
    assert torch.equal(bits(got), bits(common.codes_reference(ctx32, recip, FP8_E4M3)))
    ref = V.varlen_attention_reference(qkv, cu, 23, heads, out_recip=recip, out_format=FP8_E4M3)[:49]
    assert attention_agrees(got.cpu(), ref.cpu())


# ------------------------------------------------------------------------------------ compiled for the GPU, no GPU

COMPILE_SCRIPT = Path(__file__).with_name("fp8_compile_check.py")


def test_kernels_compile_for_hopper_and_ada():
    """Triton compiles for a GPU on any machine (ptxas ships with it): in a process of its own (compiled mode, not
    the interpreter), the FP8 kernels build for sm_90 and sm_89, on E4M3 tensor-core instructions (wgmma on
    Hopper, mma.sync on Ada), with the hardware's round-to-nearest-even conversion to E4M3."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(COMPILE_SCRIPT)], capture_output=True, text=True, env=env,
                          cwd=Path(__file__).resolve().parent.parent, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    cvt = "cvt.rn.satfinite.e4m3x2.f32"
    assert "wgmma.mma_async.sync.aligned.m64n64k32.f32.e4m3.e4m3" in found["gemm-ptr-sm90"]
    assert cvt in found["gemm-ptr-sm90"]
    assert "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32" in found["gemm-ptr-sm89"]
    assert "wgmma.mma_async.sync.aligned.m64n64k32.f32.e4m3.e4m3" in found["gemm-tma-sm90"]
    assert "cp.async.bulk.tensor" in found["gemm-tma-sm90"]
    assert "wgmma.mma_async.sync.aligned.m64n64k32.f32.e4m3.e4m3" in found["splitk-partial-sm90"]
    for name in ("splitk-epilogue-sm90", "layernorm-sm90", "layernorm-codes-only-sm90", "attention-sm90",
                 "varlen-sm90", "varlen-tma-sm90", "quantize-sm90"):
        assert cvt in found[name], name
    assert "cp.async.bulk.tensor" in found["varlen-tma-sm90"] and "cp.async.bulk.tensor" not in found["varlen-sm90"]
    # --fp8 -iln: the residual read as E4M3 codes, converted by the hardware, through pointers and through TMA
    for name in ("gemm-ptr-sm90-res-e4m3", "gemm-tma-sm90-res-e4m3"):
        assert "cvt.rn.f16x2.e4m3x2" in found[name] and "wgmma.mma_async.sync.aligned.m64n64k32.f32.e4m3.e4m3" in \
            found[name], name
    assert "cp.async.bulk.tensor" in found["gemm-tma-sm90-res-e4m3"]
    assert "cvt.rn.f16x2.e4m3x2" not in found["gemm-tma-sm90"]
    # fast accumulation (GemmConfig.fast_accum) drops the float32 add of each K step's wgmma sum, nothing else
    adds = {mode: int(found[f"gemm-ptr-sm90-{mode}"][-1].split(": ")[1]) for mode in ("precise", "fast")}
    assert adds["fast"] + 32 <= adds["precise"], adds  # 64x64 tile, 4 warps: an add per accumulator (32 a thread)
    assert found["gemm-ptr-sm90-fast"][:-1] == found["gemm-ptr-sm90-precise"][:-1]
    assert "wgmma.mma_async.sync.aligned.m64n64k32.f32.e4m3.e4m3" in found["gemm-ptr-sm90-fast"]


# ------------------------------------------------------------------------------------ GPU: BERT-sized problems


def fp8_linear_or_skip(ops, kw, cfg):
    """fp8_linear at `cfg`, or a skip where that tile's E4M3 kernel needs more shared memory than the GPU has
    (the build times such a candidate as a failure and never chooses it)."""
    from triton.runtime.errors import OutOfResources

    try:
        return F8.fp8_linear(**ops, **kw, config=cfg)
    except OutOfResources as e:
        pytest.skip(f"{cfg} does not fit this GPU with E4M3 operands: {e}")


@pytest.mark.cuda
@pytest.mark.parametrize("n,k", [(1024, 1024), (4096, 1024), (1024, 4096)])
@pytest.mark.parametrize("config", range(len(L.CANDIDATE_CONFIGS)))
def test_cuda_every_config(n, k, config, poison):
    """Every candidate tile at BERT-large's GEMMs (M = 4096) on full-range codes: FP outputs within 1e-3 of the
    reference; codes within one step, E4M3 and INT8 ones in under the build's FP8_CODES_OFF of places (the tensor
    cores sum in another order, and within a K step at reduced precision: on an H100, 0.10-0.14% of INT8 codes
    one step off); the E4M3 codes those of the kernel's own output, bit for bit. A tile whose E4M3 kernel needs
    more shared memory than the GPU has (128x256x128 persistent on an H100) is skipped: the build's timing
    leaves a candidate that fails out."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 tensor cores need compute capability 8.9")
    cfg = L.CANDIDATE_CONFIGS[config]
    if cfg.tma and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA loads need sm_90 or newer")
    ops, extra = problem(4096, n, k, seed=n + k + config, exact=False)
    for epilogue in ("fp16", "gelu+fp8", "residual+fp8/channel", "residual8/channel", "gelu+int8",
                         "residual-e4m3+fp8"):
        kw = epilogue_kwargs(epilogue, ops, extra)
        check(fp8_linear_or_skip(ops, kw, cfg), F8.fp8_linear_reference(**ops, **kw), exact=False,
              rate=FP8_CODES_OFF)
        if kw.get("out_format") is FP8_E4M3:
            assert_codes_of_own_output(ops, kw, cfg)


FAST_CONFIGS = [replace(c, fast_accum=True) for c in L.CANDIDATE_CONFIGS if c.block_m >= 64 and c.split_k == 1]


@pytest.mark.cuda
@pytest.mark.parametrize("config", range(len(FAST_CONFIGS)))
def test_cuda_fast_accumulation_is_the_same_product(config, poison):
    """Fast accumulation (GemmConfig.fast_accum) at BERT-large's longest K (FC2: M 4096, N 1024, K 4096): the same
    product, summed at the tensor cores' precision: float32 outputs within 1e-2 of the reference (a wrong tile is
    off by order 1). Whether it is close enough for a build is the build's agreement rule to say, GEMM by GEMM."""
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("wgmma's reduced-precision accumulation is Hopper's")
    ops, extra = problem(4096, 1024, 4096, seed=config, exact=False)
    kw = epilogue_kwargs("fp32", ops, extra)
    out = fp8_linear_or_skip(ops, kw, FAST_CONFIGS[config])
    ref = F8.fp8_linear_reference(**ops, **kw)
    assert torch.isfinite(out).all() and rel(out, ref) < 1e-2


@pytest.mark.cuda
@pytest.mark.parametrize("m", [1, 128, 384])
def test_cuda_default_config_and_graph_capture(m, poison):
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 tensor cores need compute capability 8.9")
    ops, extra = problem(m, 1536, 384, seed=m)
    kw = epilogue_kwargs("gelu+fp8", ops, extra)
    F8.fp8_linear(**ops, **kw)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = F8.fp8_linear(**ops, **kw)
    graph.replay()
    torch.cuda.synchronize()
    check(out, F8.fp8_linear_reference(**ops, **kw), exact=False, rate=FP8_CODES_OFF)


@pytest.mark.cuda
def test_cuda_layernorm_attention_and_quantize_codes(poison):
    """BERT-large's widths: the LayerNorm's and the attention's E4M3 codes are those of their own outputs, the
    quantize pass's the reference's, bit for bit, on the hardware's conversion."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 tensor cores need compute capability 8.9")
    x = (torch.randn(384, 1024, generator=gen(1)) * 3).half().cuda()
    w, b = torch.ones(1024, device="cuda", dtype=torch.float16), torch.zeros(1024, device="cuda", dtype=torch.float16)
    y, q = LN.layernorm_quant(x, w, b, 1e-12, 100.0, fmt=FP8_E4M3)
    assert torch.equal(bits(q), bits(common.codes_reference(y, 100.0, FP8_E4M3)))
    assert torch.equal(bits(Q.quantize_rows(x.t(), 37.0, FP8_E4M3)), bits(Q.quantize_rows_reference(x.t(), 37.0,
                                                                                                   FP8_E4M3)))
    qkv, bias = attention_problem(3, 384, 16, 64, seed=2)
    for cfg in A.CANDIDATE_CONFIGS:
        ctx32 = A.fused_attention(qkv, 3, 16, bias, out_dtype=torch.float32, config=cfg)
        for recip in context_recips(ctx32):
            got = A.fused_attention(qkv, 3, 16, bias, out_recip=recip, config=cfg, out_format=FP8_E4M3)
            ref = A.attention_reference(qkv, 3, 16, bias, out_recip=recip, out_format=FP8_E4M3)
            assert attention_agrees(got, ref), cfg.name
