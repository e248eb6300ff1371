"""The reference BERT question-answering forward: the oracle every engine is checked against.

Plain PyTorch, one page. Every tensor that an INT8 build may quantize passes through `tap(name, x)`: identity by
default; calibration installs a tap that records ranges, and the fake-quant reference one that quantizes. The site
names are the vocabulary of the precision policy (quant/policy.py):

    embeddings.ln_out                    embedding LayerNorm output = layer 0's QKV GEMM input
    layer{i}.q / .k / .v                 per-head query, key, value (after the QKV GEMM and bias)
    layer{i}.probs                       attention probabilities
    layer{i}.context                     attention context = attention-output GEMM input
    layer{i}.attn_ln_out                 first skip-LayerNorm output = FC1 input
    layer{i}.fc2_in                      GELU output = FC2 input
    layer{i}.ffn_ln_out                  second skip-LayerNorm output = next layer's QKV input (and the QA head's)
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from model.config import BertConfig

Tap = Callable[[str, torch.Tensor], torch.Tensor]


def no_tap(name: str, x: torch.Tensor) -> torch.Tensor:
    return x


def leaves_alone(tap: Tap, site: str) -> bool:
    """Whether `tap` passes `site` through unchanged and unobserved: no_tap, or a tap whose `passes(site)` says so
    (qat.model.SiteTap, for the sites it does not round). Calibration's taps record every site: never."""
    passes = getattr(tap, "passes", None)
    return tap is no_tap or (passes is not None and bool(passes(site)))


_TRAINING = contextvars.ContextVar("training_step", default=False)


@contextlib.contextmanager
def training_step() -> Iterator[None]:
    """The forward passes of a training step (qat.train: the student's and the teacher's) run inside this, so
    their attention may run fused (fuses_attention); everything outside is evaluation, calibration or export."""
    token = _TRAINING.set(True)
    try:
        yield
    finally:
        _TRAINING.reset(token)


def fuses_attention(x: torch.Tensor, tap: Tap, probs_site: str) -> bool:
    """Whether a layer runs its attention as one fused kernel (SDPA) instead of the explicit softmax: in a training
    step (training_step) on a GPU, for probabilities that are neither rounded nor recorded. The same function; the
    fused kernel never writes the batch x heads x S x S probabilities in FP32, which the explicit form writes and
    reads several times a step, forward and backward (and the teacher's forward once). Everything else
    (evaluation, calibration, -imh QAT, the CPU) runs the explicit form, the one the engines are checked
    against."""
    return x.is_cuda and _TRAINING.get() and leaves_alone(tap, probs_site)


_GELU_K = 1.5957691216057308  # 2 * sqrt(2 / pi)


def _gelu_tanh_value(y: torch.Tensor) -> torch.Tensor:
    u = y + 0.044715 * (y * y * y)
    return y / (1.0 + torch.exp(-_GELU_K * u))


class _GeluTanh(torch.autograd.Function):
    """The forward as written; the backward from the sigmoid form. Autograd through `y / (1 + exp(-k u))` is NaN
    wherever exp overflows (y below about -9: inf / inf), which QAT's first step meets in a real model's FC1."""

    @staticmethod
    def forward(ctx, y):
        ctx.save_for_backward(y)
        return _gelu_tanh_value(y)

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        sig = torch.sigmoid(_GELU_K * (y + 0.044715 * (y * y * y)))
        return grad * (sig + y * sig * (1.0 - sig) * _GELU_K * (1.0 + 3 * 0.044715 * y * y))


def gelu_tanh(y: torch.Tensor) -> torch.Tensor:
    """GELU's tanh form, 0.5 y (1 + tanh(sqrt(2/pi) (y + 0.044715 y^3))), written as y * sigmoid(2u): the GELU of
    FP16 and INT8 engines (quant.policy.PrecisionPolicy.gelu_tanh), as TensorRT's BERT plugins compute it. It
    fuses into GEMM epilogues cheaply: BERT's erf GELU made our INT8 FC1 at 128 x 384 1.58x slower on an H200
    (docs/gelu-h200.md), and cuBLASLt's fused GELU is this form. The two differ by less than 5e-4. In float32;
    plugins/int8_linear.py computes it with the GPU's tanh instruction. Differentiable with a finite gradient
    everywhere (QAT trains through it).
    """
    y = y.float()
    return _GeluTanh.apply(y) if y.requires_grad else _gelu_tanh_value(y)


def layer_sites(i: int) -> tuple[str, ...]:
    """The tap sites of encoder layer i, in the order the forward visits them."""
    return tuple(f"layer{i}.{s}" for s in ("q", "k", "v", "probs", "context", "attn_ln_out", "fc2_in", "ffn_ln_out"))


def all_sites(num_layers: int) -> tuple[str, ...]:
    return ("embeddings.ln_out",) + tuple(s for i in range(num_layers) for s in layer_sites(i))


class Embeddings(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.word = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.ln = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word(input_ids) + self.position(positions)[None] + self.token_type(token_type_ids)
        return self.ln(x)


class EncoderLayer(nn.Module):
    """Post-LN transformer layer: attention, add & norm, GELU FFN, add & norm."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        h = cfg.hidden_size
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.qkv = nn.Linear(h, 3 * h)  # rows: [W_q; W_k; W_v], one GEMM as the engines run it
        self.attn_out = nn.Linear(h, h)
        self.ln1 = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.fc1 = nn.Linear(h, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, h)
        self.ln2 = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.act: Callable[[torch.Tensor], torch.Tensor] = F.gelu  # gelu_tanh in fake-quant copies (quant/fakequant.py)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor, tap: Tap, name: str) -> torch.Tensor:
        b, s, h = x.shape
        heads = self.qkv(x).view(b, s, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # 3,B,N,S,D
        q, k, v = (tap(f"{name}.{n}", t) for n, t in zip("qkv", heads))
        if fuses_attention(x, tap, f"{name}.probs"):
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_bias == 0)
        else:
            scores = (q @ k.transpose(-1, -2)).float() * (1.0 / math.sqrt(self.head_dim)) + mask_bias
            probs = tap(f"{name}.probs", scores.softmax(-1).to(v.dtype))  # softmax in FP32 whatever the precision
            ctx = probs @ v
        context = tap(f"{name}.context", ctx.transpose(1, 2).reshape(b, s, h))
        x = tap(f"{name}.attn_ln_out", self.ln1(x + self.attn_out(context)))
        ffn = tap(f"{name}.fc2_in", self.act(self.fc1(x)).to(x.dtype))
        return tap(f"{name}.ffn_ln_out", self.ln2(x + self.fc2(ffn)))


def attention_bias(attention_mask: torch.Tensor) -> torch.Tensor:
    """What every layer adds to its attention scores [B, 1, 1, S]: padding keys get a large negative score; FP32
    because the softmax runs in FP32."""
    return (1.0 - attention_mask[:, None, None, :].float()) * torch.finfo(torch.float32).min


class BertQA(nn.Module):
    """BERT encoder plus the SQuAD span head; returns (start_logits, end_logits) in FP32."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = Embeddings(cfg)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_layers))
        self.qa = nn.Linear(cfg.hidden_size, 2)
        self.tap: Tap = no_tap

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.tap("embeddings.ln_out", self.embeddings(input_ids, token_type_ids))
        mask_bias = attention_bias(attention_mask)
        for i, layer in enumerate(self.layers):
            x = layer(x, mask_bias, self.tap, f"layer{i}")
        logits = self.qa(x).float()
        return logits[..., 0], logits[..., 1]

    def init_random(self, seed: int = 0) -> "BertQA":
        """BERT's initialisation (normal, std 0.02) for random-weight timing presets."""
        gen = torch.Generator(device="cpu").manual_seed(seed)
        with torch.no_grad():
            for mod in self.modules():
                if isinstance(mod, (nn.Linear, nn.Embedding)):
                    mod.weight.copy_(torch.randn(mod.weight.shape, generator=gen) * 0.02)
                    if isinstance(mod, nn.Linear):
                        mod.bias.zero_()
                elif isinstance(mod, nn.LayerNorm):
                    mod.weight.fill_(1.0)
                    mod.bias.zero_()
        return self
