"""The engine forward: the reference BERT's function with the build's precision, from an engine's tensors.

One code path for the CPU and CUDA: INT8 GEMMs go through `torch._int_mm` (cuBLASLt on CUDA, exact int32
accumulation on both), activations are rounded by calib.quantizer (the one quantizer), and dequantization applies
`input scale x per-channel weight scale` to the int32 accumulator before the bias. So a CPU engine and a CUDA
engine compute the same INT8 math, and both match the fake-quant reference (calib/fakequant.py) up to
floating-point rounding.

Attention without -imh runs PyTorch's fused SDPA. With -imh, Q, K, V, the probabilities and the context are
rounded to INT8 values exactly as the policy says, but the two attention matmuls still run on FP16 tensor cores
(no INT8 attention kernel yet): the numerics of INT8 attention, not its speed.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from calib.policy import GEMMS, PrecisionPolicy
from calib.quantizer import dequantize, quantize
from engines.engine_file import EngineHeader
from model.config import BertConfig

_MIN_ROWS_CUDA = 32  # cuBLASLt's int8 GEMM in torch._int_mm needs more than 16 rows


class Engine(torch.nn.Module):
    def __init__(self, header: EngineHeader, tensors: dict[str, torch.Tensor], device: torch.device):
        super().__init__()
        self.header = header
        self.cfg = BertConfig.from_json(header.model_config)
        self.policy = PrecisionPolicy(**header.policy)
        self.dtype = torch.float16 if self.policy.fp16 else torch.float32
        self.device = torch.device(device)
        self.t = {k: v.to(self.device) for k, v in tensors.items()}
        self.scale = dict(header.act_scales)
        self.produced_int8 = {s for s in self.scale if self.policy.rounded_where_produced(s)}

    # ------------------------------------------------------------ pieces

    def _round(self, site: str, x: torch.Tensor) -> torch.Tensor:
        """Round a -iln/-imh site to its INT8 grid (identity for sites the build keeps in FP)."""
        if site not in self.produced_int8:
            return x
        s = self.scale[site]
        return dequantize(quantize(x, s), s, x.dtype)

    def _gemm(self, name: str, x: torch.Tensor, input_site: str) -> torch.Tensor:
        w, bias = self.t[f"{name}.weight"], self.t[f"{name}.bias"]
        if w.dtype != torch.int8:
            return F.linear(x, w, bias)
        s_in = self.scale[input_site]
        rows = x.reshape(-1, x.shape[-1])
        xq = quantize(rows, s_in)
        m = xq.shape[0]
        if xq.is_cuda and m < _MIN_ROWS_CUDA:
            xq = F.pad(xq, (0, 0, 0, _MIN_ROWS_CUDA - m))
        acc = torch._int_mm(xq, w.t())[:m]  # int32, exact
        out = acc.float() * (self.t[f"{name}.weight_scale"] * s_in) + bias
        return out.to(self.dtype).view(*x.shape[:-1], w.shape[0])

    def _ln(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.t[f"{name}.weight"], self.t[f"{name}.bias"],
                            self.cfg.layer_norm_eps)

    def _attention(self, i: int, q, k, v, mask_bias: torch.Tensor) -> torch.Tensor:
        if not self.policy.imh:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask_bias.to(q.dtype))
        q, k, v = (self._round(f"layer{i}.{n}", t) for n, t in zip("qkv", (q, k, v)))
        scores = (q @ k.transpose(-1, -2)).float() * (1.0 / math.sqrt(q.shape[-1])) + mask_bias
        probs = self._round(f"layer{i}.probs", scores.softmax(-1).to(v.dtype))
        return probs @ v

    # ------------------------------------------------------------ forward

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t, cfg = self.t, self.cfg
        b, s = input_ids.shape
        x = (t["embeddings.word.weight"][input_ids] + t["embeddings.position.weight"][:s]
             + t["embeddings.token_type.weight"][token_type_ids])
        x = self._round("embeddings.ln_out", self._ln("embeddings.ln", x))
        mask_bias = (1.0 - attention_mask[:, None, None, :].float()) * torch.finfo(self.dtype).min
        for i in range(cfg.num_layers):
            x = self._layer(i, x, mask_bias)
        logits = F.linear(x, t["qa.weight"], t["qa.bias"]).float()
        return logits[..., 0], logits[..., 1]

    def _layer(self, i: int, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        p, site = f"layers.{i}.", lambda gemm: self.policy.gemm_input_site(i, gemm)
        heads = self._gemm(p + "qkv", x, site("qkv")).view(b, s, 3, self.cfg.num_heads, self.cfg.head_dim)
        q, k, v = heads.permute(2, 0, 3, 1, 4)
        context = self._attention(i, q, k, v, mask_bias).transpose(1, 2).reshape(b, s, h)
        context = self._round(f"layer{i}.context", context)
        x = self._round(f"layer{i}.attn_ln_out", self._ln(p + "ln1", x + self._gemm(p + "attn_out", context,
                                                                                     site("attn_out"))))
        ffn = F.gelu(self._gemm(p + "fc1", x, site("fc1")))
        return self._round(f"layer{i}.ffn_ln_out", self._ln(p + "ln2", x + self._gemm(p + "fc2", ffn, site("fc2"))))


def engine_tensors(model, policy: PrecisionPolicy) -> dict[str, torch.Tensor]:
    """The engine's weights from a reference BertQA: INT8 rows + per-channel scales for quantized GEMMs."""
    from calib.quantizer import weight_scales

    dtype = torch.float16 if policy.fp16 else torch.float32
    out: dict[str, torch.Tensor] = {}
    quantized = {f"layers.{i}.{g}.weight" for i in range(model.config.num_layers) for g in GEMMS} \
        if policy.int8 else set()
    for name, p in model.state_dict().items():
        p = p.detach().float().cpu()
        if name in quantized:
            scales = weight_scales(p)
            out[name] = quantize(p, scales).contiguous()
            out[name.replace(".weight", ".weight_scale")] = scales.view(-1).contiguous()
        elif name.replace(".bias", ".weight") in quantized:
            out[name] = p.contiguous()  # FP32: added to the FP32 dequantized accumulator
        else:
            out[name] = p.to(dtype).contiguous()
    return out
