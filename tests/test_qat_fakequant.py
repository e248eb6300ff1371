"""The trainable quantizer: the engine's codes in the forward, straight-through and LSQ gradients in the backward."""
from __future__ import annotations

import math

import pytest
import torch

from qat.fakequant import SiteQuantizer, fake_quant_weight
from quant.formats import FP8_E4M3, INT8
from quant.quantizer import dequantize, fake_quantize, quantize, scale_from_amax, weight_scales


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_forward_is_the_engines_quantizer():
    g = torch.Generator().manual_seed(0)
    for amax in (0.894774317741394, 3.0, 17.25, 1e-3):
        q = SiteQuantizer("layer0.q", amax)
        scale = float(scale_from_amax(amax))
        x = torch.randn(4, 33, generator=g) * amax * 0.7
        ties = (torch.arange(-130, 130).float() + 0.5) * scale  # .5 boundaries and clipped values
        for t in (x, ties):
            assert torch.equal(q(t), fake_quantize(t, scale))
            assert torch.equal(q.gemm_input(t), fake_quantize(t, scale))
            assert torch.equal(q.regrid(q(t)), q(t))


def test_modelopt_example_rounds_as_the_engine():
    """The .5-boundary case modelopt's 127/amax rounds the other way (qat/fakequant.py's docstring)."""
    amax, x = 0.894774317741394, torch.tensor([0.010568199679255486])
    assert int(quantize(x, scale_from_amax(amax))) == 2
    assert float(torch.round(x * (torch.tensor(127.0) / torch.tensor(amax)))) == 1.0  # modelopt's codes
    with torch.no_grad():
        assert float(SiteQuantizer("s", amax)(x) / scale_from_amax(amax)) == 2.0


def test_modelopt_fake_quant_differs():
    """The same case through modelopt's own INT8 fake quant (CPU path: tensor_quant._tensor_quant)."""
    tensor_quant = pytest.importorskip("modelopt.torch.quantization.tensor_quant")
    amax, x = torch.tensor([0.894774317741394]), torch.tensor([0.010568199679255486])
    theirs = tensor_quant.fake_tensor_quant(x, amax, None, 8, False, True)
    ours = fake_quantize(x, scale_from_amax(amax))
    assert float(ours) == 2 * float(scale_from_amax(amax)) and not torch.equal(theirs, ours)
    assert torch.allclose(theirs, ours / 2)  # code 1


def test_smoothed_site_quantizes_per_channel():
    g = torch.Generator().manual_seed(1)
    s = 0.3 + torch.rand(16, generator=g)
    x = torch.randn(2, 5, 16, generator=g) * 3
    q = SiteQuantizer("layer0.attn_ln_out", 2.5, smooth=s)
    scale = float(scale_from_amax(2.5))
    codes = quantize(x, s * scale)
    assert torch.equal(q(x), dequantize(codes, s * scale))              # produced: ~ x
    assert torch.equal(q.gemm_input(x), dequantize(codes, scale))       # a GEMM's input: ~ x / s
    assert torch.equal(q.regrid(q(x)), dequantize(codes, scale))


def test_straight_through_inside_the_range_and_zero_outside():
    q = SiteQuantizer("s", 2.0)
    x = torch.tensor([-3.0, -2.0, -0.7, 0.0, 0.33, 1.99, 2.5], requires_grad=True)
    q(x).backward(torch.ones_like(x))
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0]


def test_lsq_gradient_of_amax():
    amax = 2.0
    q = SiteQuantizer("s", amax)
    x = torch.tensor([-3.0, -0.7, 0.33, 1.99, 2.5])
    grad_out = torch.tensor([1.0, 2.0, -1.0, 0.5, 3.0])
    q(x).backward(grad_out)
    v = x * (1 / (amax / 127))
    inside = v.abs() <= 127
    d_step = torch.where(inside, torch.round(v) - v, torch.round(v).clamp(-127, 127))
    want = float((grad_out * d_step).sum()) / math.sqrt(x.numel() * 127) / 127
    assert q.amax.grad is not None and math.isclose(float(q.amax.grad), want, rel_tol=1e-5)
    # clipped values pull the range up: a gradient descent step on amax widens it
    q2 = SiteQuantizer("s", 1.0)
    q2(torch.tensor([5.0, -5.0])).backward(torch.tensor([-1.0, 1.0]))  # loss falls as the outputs move outward
    assert float(q2.amax.grad) < 0


def test_smoothed_gradients():
    s = torch.tensor([0.5, 1.0, 2.0])
    q = SiteQuantizer("s", 1.0, smooth=s)
    x = torch.tensor([[0.1, 0.2, 0.3]], requires_grad=True)
    q.gemm_input(x).sum().backward()
    assert torch.allclose(x.grad, 1 / s)
    x.grad = None
    q(x).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_frozen_amax_gets_no_gradient():
    q = SiteQuantizer("s", 2.0, learn=False)
    x = torch.tensor([0.5, 3.0], requires_grad=True)
    q(x).sum().backward()
    assert q.amax.grad is None and x.grad.tolist() == [1.0, 0.0]


def test_weights_per_output_channel_with_straight_through_gradient():
    g = torch.Generator().manual_seed(2)
    w = (torch.randn(6, 10, generator=g) * torch.arange(1, 7)[:, None]).requires_grad_()
    out = fake_quant_weight(w)
    assert torch.equal(out, fake_quantize(w.detach(), weight_scales(w)))
    out.backward(torch.full_like(out, 2.0))
    assert torch.equal(w.grad, torch.full_like(w, 2.0))


@pytest.mark.parametrize("fmt", [INT8, FP8_E4M3])
def test_other_formats_use_their_codes(fmt):
    q = SiteQuantizer("s", 4.0, fmt)
    x = torch.linspace(-5, 5, 101)
    assert torch.equal(q(x), fake_quantize(x, scale_from_amax(4.0, fmt), fmt))
