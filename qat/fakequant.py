"""Trainable fake quantization: the engine's INT8 math in the forward, straight-through and LSQ in the backward.

Forward, bit for bit what quant/fakequant.py (and so the engine) computes for a site with range `amax`:

    scale = quant.quantizer.scale_from_amax(amax, fmt)             # float32(amax / qmax)
    c     = scale, or s * scale for a smoothed site                 # quant.smoothing.channel_scales
    codes = quant.quantizer.quantize(x, c, fmt)                     # round-half-even(x * float32(1 / c)), clamp
    out   = quant.quantizer.dequantize(codes, c or scale)           # codes * c where the site is produced
                                                                    # (the -iln/-imh taps: out ~ x); codes * scale
                                                                    # where a GEMM reads a smoothed site (out ~ x/s)

Backward (v = x * float32(1 / c), the scaled value before rounding; d = s where the output is dequantized per
channel, else 1):

    d out / d x    = d / s    for |v| <= qmax (straight-through inside the range), 0 outside (clipped)
    d out / d amax = g * d * (q(v) - v) / qmax   inside,   g * d * q(v) / qmax   outside (q(v) = +-qmax)

The amax rule is LSQ's (Esser et al., "Learned Step Size Quantization", ICLR 2020): the step size is learned
with the straight-through estimate of the rounding, so its gradient sees both errors a range trades off: inside
the range the rounding error (q(v) - v, which a smaller step reduces) and outside it the clipping (+-qmax, which a
larger step removes). PACT (Choi et al. 2018) learns a clipping level from the clipped values alone (its gradient
is 0 for every value inside the range), so only a weight-decay term ever pulls the range down; it was designed
for one-sided ReLU outputs, while BERT's sites are symmetric and start from a calibrated range where the rounding
error matters as much as the clipping. We learn amax = qmax * step (the quantity the spec and the engine store),
so the step-size gradient is divided by qmax, and scale it by LSQ's g = 1 / sqrt(numel(x) * qmax) (numel of the
tensor in this call, batch included, as the reference LSQ code does): it keeps the summed gradient of a large
activation from dominating the global gradient-norm clipping. Under AdamW (qat/train.py), whose step is ~lr
whatever a gradient's size, g mostly leaves the direction; the scales get their own learning rate
(`TrainConfig.scale_lr`). Freezing the scales (`--freeze-scales`) is `requires_grad_(False)` on the amax
parameters: x's gradient is unchanged.

Why not nvidia-modelopt's TensorQuantizer. It is the preferred base, and we read its source (modelopt 0.47,
torch/quantization/tensor_quant.py `_tensor_quant`, what `FakeTensorQuantFunction` runs on the CPU, and its CUDA
kernel, torch/kernels/quantization/gemm/tensor_quant_gpu.cu: `scale = max_bound / amax; rint(input * scale) /
scale`). Its INT8 fake quant does not compute our codes or our values:
  - it multiplies by `scale = 127 / amax` (one float32 division) where we multiply by float32(1 / float32(amax /
    127)); the two reciprocals differ in the last bit for 28% of random amax values, and then codes differ at .5
    boundaries: amax = 0.894774317741394 gives 141.93524 against 141.93523, and x = 0.010568199679255486 becomes
    code 2 here (and in the engine) but code 1 in modelopt (tests/test_qat_fakequant.py keeps this example);
  - it dequantizes by dividing by that scale (`outputs / scale`) where the engine's epilogue multiplies by
    amax / 127: 27% of its outputs differ from ours in the last bit on random data even where the codes agree;
  - it treats amax <= 2^-24 as zero, we only amax == 0;
  - its amax is a buffer without a gradient (`FakeTensorQuantFunction.backward` returns None for it); the LSQ mode
    it has (`StaticBlockScaleQuantizer.enable_lsq`) is for block-quantized weights and divides by the scale;
  - it has no form of our smoothed sites, which round with per-channel scales s * scale and dequantize with the
    per-tensor scale (one scale to quantize, another to dequantize).
The QAT forward must be the engine's function exactly (a test holds it to torch.equal with the fake-quant
reference), so the quantizer is ours; it sits at our tap sites and GEMM inputs (qat/model.py), and modelopt is
not imported (it also costs ~5 s to import).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from quant.formats import INT8, QuantFormat
from quant.quantizer import dequantize, fake_quantize, quantize, reciprocal, scale_from_amax, weight_scales

MIN_AMAX = 1e-6  # learned ranges are kept at or above this (amax 0 would make every code 0 and scale_from_amax 1)


def _codes_scale(scale: torch.Tensor, s: torch.Tensor | None) -> torch.Tensor:
    """quant.smoothing.channel_scales without the host round trip: s * float32 scale, one float32 multiply."""
    return scale if s is None else s.float() * scale


class _FakeQuant(torch.autograd.Function):
    """x -> dequantize(quantize(x, c), c if per_channel_out else scale); see the module docstring."""

    @staticmethod
    def forward(ctx, x, amax, s, per_channel_out: bool, fmt: QuantFormat):
        scale = scale_from_amax(amax.detach(), fmt).to(x.device)
        c = _codes_scale(scale, s)
        codes = quantize(x, c, fmt)
        ctx.save_for_backward(x, c, s)
        ctx.fmt, ctx.per_channel_out = fmt, per_channel_out
        return dequantize(codes, c if per_channel_out else scale, x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, c, s = ctx.saved_tensors
        fmt = ctx.fmt
        v = x.float() * reciprocal(c, x.device)
        inside = v.abs() <= fmt.qmax
        g = grad.float()
        d = s.float() if (s is not None and ctx.per_channel_out) else None  # dequantized per channel: out ~ x
        grad_x = grad_amax = None
        if ctx.needs_input_grad[0]:
            through = g if (s is None or d is not None) else g / s.float()  # d / s: 1, or 1 / s (out ~ x / s)
            grad_x = torch.where(inside, through, torch.zeros_like(through)).to(x.dtype)
        if ctx.needs_input_grad[1]:
            q = fmt.codes(v).float()
            d_step = torch.where(inside, q - v, q)
            if d is not None:
                d_step = d_step * d
            lsq = 1.0 / math.sqrt(x.numel() * fmt.qmax)
            grad_amax = (g * d_step).sum() * (lsq / fmt.qmax)
        return grad_x, grad_amax, None, None, None


class _Regrid(torch.autograd.Function):
    """A GEMM reading a site already rounded where it was produced (-iln/-imh): the same formula as a GEMM input
    (codes * scale), which on an already-rounded tensor only re-expresses its codes (x / s for a smoothed site,
    x itself otherwise), so the backward is that linear map: no clipping mask, no amax term (the tap that produced
    x already accounted for both)."""

    @staticmethod
    def forward(ctx, x, amax, s, fmt: QuantFormat):
        scale = scale_from_amax(amax.detach(), fmt).to(x.device)
        ctx.save_for_backward(s)
        return dequantize(quantize(x, _codes_scale(scale, s), fmt), scale, x.dtype)

    @staticmethod
    def backward(ctx, grad):
        (s,) = ctx.saved_tensors
        return (grad if s is None else (grad.float() / s.float()).to(grad.dtype)), None, None, None


class _WeightFakeQuant(torch.autograd.Function):
    """W -> fake_quantize(W, weight_scales(W)) per output channel, recomputed every forward from the current W;
    straight-through backward (the row max sets the scale, so nothing is clipped)."""

    @staticmethod
    def forward(ctx, w, fmt: QuantFormat):
        return fake_quantize(w, weight_scales(w, fmt), fmt)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def fake_quant_weight(w: torch.Tensor, fmt: QuantFormat = INT8) -> torch.Tensor:
    """A GEMM weight [out, in] as the engine stores it (per-output-channel scales), with a straight-through
    gradient; `w` is the smoothed weight W * s where the GEMM's input is smoothed."""
    return _WeightFakeQuant.apply(w, fmt)


class SiteQuantizer(nn.Module):
    """One quantized activation site: its amax (a trainable float32 scalar `nn.Parameter`), its format and, for a
    smoothed site, its smoothing vector s (a fixed buffer, quant/smoothing.py)."""

    def __init__(self, site: str, amax: float, fmt: QuantFormat = INT8, smooth: torch.Tensor | None = None,
                 learn: bool = True):
        super().__init__()
        self.site = site
        self.fmt = fmt
        self.amax = nn.Parameter(torch.tensor(float(amax), dtype=torch.float32), requires_grad=learn)
        self.register_buffer("smooth", None if smooth is None else smooth.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The site rounded where it is produced (the -iln/-imh taps): codes with c = scale (* s), times c."""
        return _FakeQuant.apply(x, self.amax, self.smooth, True, self.fmt)

    def gemm_input(self, x: torch.Tensor) -> torch.Tensor:
        """What an INT8 GEMM reads from a float input: codes with c = scale (* s), times the per-tensor scale."""
        return _FakeQuant.apply(x, self.amax, self.smooth, False, self.fmt)

    def regrid(self, x: torch.Tensor) -> torch.Tensor:
        """What an INT8 GEMM reads from a site this quantizer already rounded (see _Regrid)."""
        return _Regrid.apply(x, self.amax, self.smooth, self.fmt)

    @torch.no_grad()
    def clamp_(self, min_amax: float = MIN_AMAX) -> None:
        self.amax.clamp_(min=min_amax)

    def extra_repr(self) -> str:
        return (f"{self.site}, {self.fmt.name}, amax={float(self.amax):.6g}"
                f"{', smoothed' if self.smooth is not None else ''}{'' if self.amax.requires_grad else ', frozen'}")
