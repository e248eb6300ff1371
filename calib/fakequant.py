"""The fake-quant reference: the INT8 build's function computed in floating point, for checking engines.

A copy of the reference BertQA where every GEMM the policy quantizes sees its input and its weights rounded
through calib.quantizer (per-tensor activation scales, per-output-channel weight scales), and the -iln/-imh sites
are rounded where the tap meets them. An INT8 engine with the same scales must compute the same function: its
integer GEMMs accumulate exactly, so only floating-point rounding separates the two.
"""
from __future__ import annotations

import copy
from typing import Mapping

import torch

from calib.policy import GEMMS, PrecisionPolicy
from calib.quantizer import fake_quantize, weight_scales
from model.bert import BertQA


def fake_quant_model(model: BertQA, policy: PrecisionPolicy, act_scales: Mapping[str, float]) -> BertQA:
    """`act_scales` maps each site in policy.quantized_sites(...) to its scale (amax / 127)."""
    layers = model.config.num_layers
    sites = policy.quantized_sites(layers)
    missing = [s for s in sites if s not in act_scales]
    if missing:
        raise KeyError(f"no scale for {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    fq = copy.deepcopy(model).eval()
    if policy.int8:
        for i, layer in enumerate(fq.layers):
            for gemm in GEMMS:
                if not policy.quantizes_gemm(i, gemm):
                    continue
                linear = getattr(layer, gemm)
                with torch.no_grad():
                    linear.weight.copy_(fake_quantize(linear.weight, weight_scales(linear.weight)))
                scale = act_scales[policy.gemm_input_site(i, gemm)]
                linear.register_forward_pre_hook(lambda _m, args, s=scale: (fake_quantize(args[0], s),))
    # -iln / -imh sites are rounded where they are produced (the residual stream and attention see them too).
    # Quantizing an already-quantized tensor with the same scale is exact, so a GEMM input that is also such a
    # site is not changed by its pre-hook.
    tap_sites = {s: act_scales[s] for s in sites if policy.rounded_where_produced(s)}
    fq.tap = lambda name, x: fake_quantize(x, tap_sites[name]) if name in tap_sites else x
    return fq

