"""The fake-quant reference: the INT8 build's function computed in floating point, for checking engines.

A copy of the reference BertQA where every GEMM the policy quantizes sees its input and its weights rounded
through quant.quantizer (per-tensor activation scales, per-output-channel weight scales), the -iln/-imh sites
are rounded where the tap meets them, and GELU is the engine's (PrecisionPolicy.gelu_tanh). An INT8 engine with
the same scales must compute the same function: its integer GEMMs accumulate exactly, so only floating-point
rounding separates the two.

With smoothing (quant/smoothing.py) a smoothed site is quantized per channel with scale * s, the GEMM reads those
codes times the per-tensor scale (x / s, rounded) and its weights are W * s rounded per row: the engine's order.
"""
from __future__ import annotations

import copy
from typing import Mapping

import torch

from quant.policy import PrecisionPolicy
from quant.quantizer import dequantize, fake_quantize, quantize, weight_scales
from quant.smoothing import channel_scales, smoothed_weight
from quant.spec import QuantSpec
from model.bert import BertQA, gelu_tanh


def fake_quant_model(model: BertQA, policy: PrecisionPolicy, spec: QuantSpec,
                     smooth: Mapping[str, torch.Tensor] | None = None) -> BertQA:
    """`spec` (PrecisionPolicy.spec) holds each site in policy.quantized_sites(...) with its format and amax;
    `smooth` maps the smoothed sites to their vectors s."""
    smooth = smooth or {}
    layers = model.config.num_layers
    sites = policy.quantized_sites(layers)
    spec.require(sites)
    act_scales = spec.scales()
    fmt = {site: spec.sites[site].format for site in sites}
    fq = engine_function_copy(model, policy)
    for i, gemm, site in policy.quantized_gemms(layers):
        linear = getattr(fq.layers[i], gemm)
        s = smooth.get(site)
        with torch.no_grad():
            w = smoothed_weight(linear.weight, s)
            linear.weight.copy_(fake_quantize(w, weight_scales(w, spec.weight_format), spec.weight_format))
        scale = act_scales[site]
        codes_scale = channel_scales(scale, s)
        linear.register_forward_pre_hook(
            lambda _m, args, a=scale, c=codes_scale, f=fmt[site]:
            (dequantize(quantize(args[0], c, f), a, args[0].dtype),))
    # -iln / -imh sites are rounded where they are produced (the residual stream and attention see them too).
    # Quantizing an already-quantized tensor with the same scale is exact, so a GEMM input that is also such a
    # site is not changed by its pre-hook.
    tap_sites = {s: channel_scales(act_scales[s], smooth.get(s)) for s in sites if policy.rounded_where_produced(s)}
    fq.tap = lambda name, x: fake_quantize(x, tap_sites[name], fmt[name]) if name in tap_sites else x
    return fq



def engine_function_copy(model: BertQA, policy: PrecisionPolicy) -> BertQA:
    """A copy of the reference model in eval mode with the engine's GELU (PrecisionPolicy.gelu_tanh): the base of
    the fake-quant reference and of QAT's trainable model."""
    copied = copy.deepcopy(model).eval()
    if policy.gelu_tanh:
        for layer in copied.layers:
            layer.act = gelu_tanh
    return copied
