"""Activation smoothing (SmoothQuant, Xiao et al. 2023) for the GEMMs whose input an INT8 kernel of ours writes.

BERT's LayerNorm outputs (and, less so, its GELU outputs) carry a few outlier channels, an order of magnitude
above the rest. A per-tensor INT8 scale must either cover them (and round every other channel coarsely) or clip
them: entropy calibration clips, and on the shared MiniLM that costs ~2.5 F1. Smoothing divides each input
channel c of such a GEMM by s[c] and multiplies the weight's column c by s[c]; the product is unchanged, the
activation's channels become even, and the weight (quantized per output row) takes the spread, which it tolerates.

    s[c] = max|x[:, c]| ** alpha / max|W[:, c]| ** (1 - alpha)      (normalised to max 1)

The INT8 math with smoothing (the engine and the fake-quant reference both do exactly this): the site's codes are
quantize(x, scale * s), i.e. per channel, where `scale` is the calibrated per-tensor scale of x / s; the GEMM
dequantizes with that per-tensor `scale` and a weight quantized per row from W * s. The kernel that writes the
codes (LayerNorm, plugins/layernorm.py; FC1's epilogue, plugins/int8_linear.py) loads one vector of per-channel
reciprocals, and the GEMM that reads them is the plain INT8 GEMM.

Unlike the original paper we do not fold 1/s into LayerNorm's gamma/beta (nor into FC1, which GELU follows): the
LayerNorm output is also the residual stream, which must stay unscaled; the codes are the only thing that sees
x / s. The attention context (written by plugins/quantize.py) is not smoothed.
"""
from __future__ import annotations

from typing import Mapping

import torch

from common.errors import WorkbenchError

DEFAULT_ALPHA = 0.8  # best of 0.5 / 0.8 / 1.0 with entropy on the shared MiniLM (BENCHMARKS.md)
_FLOOR = 1e-5  # channels that are ~0 in the activations or the weights: keep s finite and positive


def smoothable_sites(num_layers: int) -> dict[str, tuple[int, str]]:
    """Smoothed sites -> the (layer, GEMM) that reads them: the embedding LayerNorm and each layer's second
    LayerNorm feed the next QKV, the first LayerNorm feeds FC1, the GELU output feeds FC2. The last layer's
    output feeds only the (FP) QA head and is not smoothed."""
    out = {"embeddings.ln_out": (0, "qkv")}
    for i in range(num_layers):
        out[f"layer{i}.attn_ln_out"] = (i, "fc1")
        out[f"layer{i}.fc2_in"] = (i, "fc2")
        if i + 1 < num_layers:
            out[f"layer{i}.ffn_ln_out"] = (i + 1, "qkv")
    return out


def check_alpha(alpha: float) -> float:
    if not 0.0 <= alpha <= 1.0:
        raise WorkbenchError(f"--smooth ALPHA (migration strength) must be within [0, 1], got {alpha:g}")
    return float(alpha)


def smoothing_factors(channel_amax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """s [H] from the activation's per-channel max |x| [H] and the reading GEMM's weight [N, H]; float32, max 1."""
    act = channel_amax.detach().float().cpu().clamp_min(_FLOOR)
    w = weight.detach().float().cpu().abs().amax(dim=0).clamp_min(_FLOOR)
    if act.shape != w.shape:
        raise WorkbenchError(f"smoothing: activation has {act.numel()} channels, the weight reads {w.numel()}")
    s = act.pow(alpha) / w.pow(1.0 - alpha)
    return (s / s.max()).contiguous()


def smoothed_weight(weight: torch.Tensor, s: torch.Tensor | None) -> torch.Tensor:
    """W * s along the input channels: what gets quantized per row in place of W."""
    return weight if s is None else weight * s.to(weight.device, weight.dtype)[None, :]


def channel_scales(scale: float, s: torch.Tensor | None) -> float | torch.Tensor:
    """A site's quantization scale: the per-tensor scale, or per channel (last dim) scale * s when smoothed.
    float32, multiplied once, so every user of a smoothed site rounds with the same scales."""
    return scale if s is None else s.float() * float(scale)  # a Python float meets float32 as float32(scale)


def check_vectors(smooth: Mapping[str, torch.Tensor], num_layers: int, hidden: int, intermediate: int,
                  where: str) -> None:
    """Smoothing vectors from a file: smoothable sites only, as wide as the GEMM that reads them, positive."""
    sites = smoothable_sites(num_layers)
    for site, v in smooth.items():
        if site not in sites:
            raise WorkbenchError(f"{where}: {site} has a smoothing vector but is not a smoothable site")
        width = intermediate if sites[site][1] == "fc2" else hidden
        if v.shape != (width,) or not torch.isfinite(v).all() or (v <= 0).any():
            raise WorkbenchError(f"{where}: the smoothing vector of {site} must be {width} finite positive numbers")
