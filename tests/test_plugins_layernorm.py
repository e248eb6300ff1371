"""plugins.layernorm: the reference against torch's LayerNorm and quant.quantizer, the kernel against the reference."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from quant.quantizer import quantize
from tests.test_plugins_common import DEVICE, assert_codes_close, gen, kernels, poison, rel  # noqa: F401

LN = kernels("layernorm")
common = kernels("common")


def inputs(shape, dtype, seed, device=DEVICE, param_dtype=None):
    """A residual-stream-like x (offset, wide rows) and non-trivial LayerNorm parameters; never zeros."""
    g = gen(seed)
    h = shape[-1]
    x = torch.randn(*shape, generator=g) * 3 + torch.randn(*shape[:-1], 1, generator=g)
    w = 1 + 0.2 * torch.randn(h, generator=g)
    b = 0.1 * torch.randn(h, generator=g)
    p = param_dtype or dtype
    return x.to(dtype).to(device), w.to(p).to(device), b.to(p).to(device)


def scale_for(y):
    return 0.9 * float(y.float().abs().max()) / 127  # clips the widest values: clamping is exercised


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_reference_is_torch_layer_norm_and_quantize(dtype):
    x, w, b = inputs((4, 9, 384), dtype, seed=21, device="cpu")
    y, q = LN.layernorm_quant_reference(x, w, b, 1e-12, None)
    assert q is None and y.dtype == dtype
    expect = F.layer_norm(x.float(), (384,), w.float(), b.float(), 1e-12)
    assert rel(y, expect) < (1e-3 if dtype == torch.float16 else 1e-6)
    s = scale_for(y)
    y, q = LN.layernorm_quant_reference(x, w, b, 1e-12, common.out_recip(s))
    # the codes are what the engine's separate quantize of the x.dtype output gives, exactly
    assert torch.equal(q, quantize(y, s))


CASES = {  # name: (shape, dtype, parameter dtype)
    "fp16-384": ((3, 7, 384), torch.float16, None),
    "fp16-fp32params-768": ((10, 768), torch.float16, torch.float32),
    "fp32-1024": ((5, 1024), torch.float32, None),
    "fp16-ragged-100": ((2, 3, 100), torch.float16, None),
    "one-row": ((1, 384), torch.float16, None),
    "fp16-even-256": ((4, 4, 256), torch.float16, None),  # H a power of two, whole programs: no masks (EVEN)
}


@pytest.mark.parametrize("quant", [False, True], ids=["fp", "fp+int8"])
@pytest.mark.parametrize("case", list(CASES))
def test_kernel_matches_reference(case, quant, poison):
    shape, dtype, pdtype = CASES[case]
    x, w, b = inputs(shape, dtype, seed=10 * list(CASES).index(case) + quant, param_dtype=pdtype)
    ref_y, _ = LN.layernorm_quant_reference(x, w, b, 1e-12)
    recip = common.out_recip(scale_for(ref_y)) if quant else None
    y, q = LN.layernorm_quant(x, w, b, 1e-12, recip)
    ref_y, ref_q = LN.layernorm_quant_reference(x, w, b, 1e-12, recip)
    assert y.shape == x.shape and y.dtype == dtype and y.is_contiguous()
    assert rel(y, ref_y) < 1e-3
    if quant:
        assert_codes_close(q, ref_q)
        # codes are those of the kernel's own x.dtype output, exactly
        assert torch.equal(q, common.codes_reference(y, recip))
    else:
        assert q is None


@pytest.mark.parametrize("rows,warps", [(None, None), (1, 8), (4, 2), (16, 4)])
def test_launch_parameters_change_no_math(rows, warps, poison):
    """37 rows (ragged for every rows-per-program) under each launch, the defaults too (one row per program at
    few rows): outputs within the reference's tolerance, codes those of the output."""
    x, w, b = inputs((37, 384), torch.float16, seed=41)
    ref_y, _ = LN.layernorm_quant_reference(x, w, b, 1e-12)
    recip = common.out_recip(scale_for(ref_y))
    y, q = LN.layernorm_quant(x, w, b, 1e-12, recip, rows_per_program=rows, num_warps=warps)
    assert rel(y, ref_y) < 1e-3 and torch.equal(q, common.codes_reference(y, recip))
    assert_codes_close(q, LN.layernorm_quant_reference(x, w, b, 1e-12, recip)[1])
    assert LN.default_launch(37, 384) == (1, 8) and LN.default_launch(LN.FEW_ROWS + 1, 1024) == (4, 4)
    with pytest.raises(ValueError, match="powers of two"):
        LN.layernorm_quant(x, w, b, 1e-12, recip, rows_per_program=3)


def test_row_strided_and_non_contiguous_inputs(poison):
    x, w, b = inputs((12, 400), torch.float16, seed=5)
    recip = common.out_recip(0.04)
    for view in (x[:, :384], x[:, :384].t().contiguous().t(), x[::2, 8:392]):
        y, q = LN.layernorm_quant(view, w[:384], b[:384], 1e-5, recip)
        ref_y, ref_q = LN.layernorm_quant_reference(view, w[:384], b[:384], 1e-5, recip)
        assert rel(y, ref_y) < 1e-3
        assert_codes_close(q, ref_q)


def test_bad_arguments_are_refused():
    x, w, b = inputs((2, 64), torch.float16, seed=1)
    with pytest.raises(ValueError, match="weight"):
        LN.layernorm_quant(x, w[:32], b, 1e-5)
    with pytest.raises(ValueError, match="floating"):
        LN.layernorm_quant(x.to(torch.int32), w, b, 1e-5)
    y, q = LN.layernorm_quant(x[:0], w, b, 1e-5, 1.0)
    assert y.shape == (0, 64) and q.shape == (0, 64)


@pytest.mark.cuda
@pytest.mark.parametrize("h", [384, 768, 1024])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cuda_large(h, dtype, poison):
    x, w, b = inputs((32, 384, h), dtype, seed=h, param_dtype=torch.float16 if dtype == torch.float16 else None)
    ref_y, _ = LN.layernorm_quant_reference(x, w, b, 1e-12)
    recip = common.out_recip(scale_for(ref_y))
    y, q = LN.layernorm_quant(x, w, b, 1e-12, recip)
    ref_y, ref_q = LN.layernorm_quant_reference(x, w, b, 1e-12, recip)
    assert rel(y, ref_y) < (1e-2 if dtype == torch.bfloat16 else 1e-3)
    assert torch.equal(q, common.codes_reference(y, recip))
    assert_codes_close(q, ref_q)


@pytest.mark.parametrize("case", ["fp16-384", "fp32-1024"])
def test_round_scale_outputs_the_dequantized_codes(case, poison):
    """-iln: with round_scale the FP output is the INT8 value itself, i.e. quant.quantizer.dequantize(codes)."""
    from quant.quantizer import dequantize

    shape, dtype, pdtype = CASES[case]
    x, w, b = inputs(shape, dtype, seed=77, param_dtype=pdtype)
    s = scale_for(LN.layernorm_quant_reference(x, w, b, 1e-12)[0])
    recip = common.out_recip(s)
    y, q = LN.layernorm_quant(x, w, b, 1e-12, recip, s)
    ref_y, ref_q = LN.layernorm_quant_reference(x, w, b, 1e-12, recip, s)
    assert torch.equal(ref_y, dequantize(ref_q, s, dtype))
    assert torch.equal(y.cpu(), dequantize(q.cpu(), s, dtype))  # the kernel's own codes, dequantized exactly
    assert_codes_close(q, ref_q)
    with pytest.raises(ValueError, match="round_scale needs out_recip"):
        LN.layernorm_quant(x, w, b, 1e-12, None, s)


@pytest.mark.parametrize("case", ["fp16-384", "fp16-ragged-100", "fp32-1024"])
def test_codes_only_writes_the_same_codes_and_nothing_else(case, poison):
    """-iln: with codes_only the codes are the one output, the same codes as with the FP output beside them."""
    shape, dtype, pdtype = CASES[case]
    x, w, b = inputs(shape, dtype, seed=78, param_dtype=pdtype)
    recip = common.out_recip(scale_for(LN.layernorm_quant_reference(x, w, b, 1e-12)[0]))
    y, q = LN.layernorm_quant(x, w, b, 1e-12, recip, codes_only=True)
    ref_y, ref_q = LN.layernorm_quant_reference(x, w, b, 1e-12, recip, codes_only=True)
    assert y is None and ref_y is None and q.shape == x.shape
    assert torch.equal(q, LN.layernorm_quant(x, w, b, 1e-12, recip)[1])
    assert torch.equal(ref_q, LN.layernorm_quant_reference(x, w, b, 1e-12, recip)[1])
    assert_codes_close(q, ref_q)
    for f in (LN.layernorm_quant, LN.layernorm_quant_reference):
        with pytest.raises(ValueError, match="codes_only needs out_recip"):
            f(x, w, b, 1e-12, None, codes_only=True)
        with pytest.raises(ValueError, match="codes_only needs out_recip"):
            f(x, w, b, 1e-12, recip, 0.1, codes_only=True)


@pytest.mark.parametrize("case", ["fp16-384", "fp16-ragged-100", "fp32-1024"])
@pytest.mark.parametrize("iln", [False, True], ids=["codes", "codes+round"])
def test_per_channel_scales(case, iln, poison):
    """Smoothed sites (quant/smoothing.py): one scale per channel, codes = quantize(y, scale * s)."""
    from quant.quantizer import dequantize
    from quant.smoothing import channel_scales

    shape, dtype, pdtype = CASES[case]
    x, w, b = inputs(shape, dtype, seed=91, param_dtype=pdtype)
    h = shape[-1]
    s = 0.05 + torch.rand(h, generator=gen(92))
    scales = channel_scales(scale_for(LN.layernorm_quant_reference(x, w, b, 1e-12)[0]) / 2, s).to(x.device)
    recip = (1.0 / scales).contiguous()
    round_scale = scales.contiguous() if iln else None
    y, q = LN.layernorm_quant(x, w, b, 1e-12, recip, round_scale)
    ref_y, ref_q = LN.layernorm_quant_reference(x, w, b, 1e-12, recip, round_scale)
    assert_codes_close(q, ref_q)
    plain_y = LN.layernorm_quant_reference(x, w, b, 1e-12)[0]
    assert torch.equal(ref_q.cpu(), quantize(plain_y.cpu(), scales.cpu()))  # the one quantizer, per channel
    if iln:
        assert torch.equal(y.cpu(), dequantize(q.cpu(), scales.cpu(), dtype))
    else:
        assert rel(y, ref_y) < 1e-3
    with pytest.raises(ValueError, match="floats or both tensors"):
        LN.layernorm_quant(x, w, b, 1e-12, recip, 0.1)
    with pytest.raises(ValueError, match="contiguous float32"):
        LN.layernorm_quant(x, w, b, 1e-12, recip[:-1])
