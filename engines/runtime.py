"""The engine forward: the reference BERT's function with the build's precision, from an engine's tensors.

The INT8 math is that of the fused ops in plugins/ (each defined by its `*_reference` function): an INT8 GEMM
takes INT8 codes, accumulates exactly in int32, and dequantizes in an FP32 epilogue that also adds the bias,
the GELU, the residual, and writes either FP16/FP32 or directly the codes the next GEMM reads; a LayerNorm writes
its output and, where the next GEMM is INT8, its codes in the same pass. So the activations between ops are
what TensorRT's INT8 BERT keeps between its plugins, and each tensor is read and written once. Under -iln the
residual stream is INT8 where the LayerNorms produce it, so it is carried as the codes alone (1 byte a value):
the next GEMMs read them as their input and, dequantized in their epilogue, as their residual.

Which site is quantized, in which format and with which scale is the header's quantization spec (quant/spec.py);
which kernel runs a GEMM or an attention is a name from the registry of kernel families (engines/backends.py):
the reference of each format (plain torch ops; cuBLASLt's INT8 GEMM through `torch._int_mm` on CUDA; all of it on
the CPU, which is how CI runs engines) and the families of Triton kernels (CUDA). `build` times the registered
candidates per profile and records the fastest in the engine header (engines/tuning.py); a CPU engine, and
anything the header does not name or this workbench cannot run, runs the reference. In a --sparse build the 2:4
GEMMs (FP ones too) may run a sparse family where the build timed it faster; a dense weight never does.

Attention without -imh runs PyTorch's fused SDPA, or where the build timed it faster (INT8 and FP8 builds on
CUDA), plugins/attention.py's kernel, which reads Q, K, V from the QKV output and writes the context as the next
GEMM reads it (its INT8 or E4M3 codes when that GEMM is quantized): one launch for SDPA and the context's quantize
pass. An FP8 build's LayerNorms write E4M3 codes in the same pass as INT8 builds' write INT8 ones, and its GEMMs
may run the Triton kernel with the fused epilogue (plugins/fp8_linear.py), cuBLASLt or the reference. With
-imh, the QKV GEMM writes Q, K and V as INT8 codes (one scale per section of its output, the pseudo-site
"layerI.qkv") and attention is INT8 attention (plugins/attention.py: fused_attention_int8, which
attention_int8_reference defines and the CPU runs): integer q.k and p.v, the probabilities rounded with their
calibrated scale, the context written as codes.

`forward_packed` is the same forward on a packed token stream (build --varlen): the windows of a batch back to
back, positions per token, cu_seqlens marking the windows. Embeddings, GEMMs and LayerNorms are row-wise, so they
run the very code of `forward` on real tokens only; attention is the variable-length attention of the same
format (plugins/varlen_attention.py, its families in engines/backends.py with varlen=True), which attends within
each window. engines/packed.py holds the rest of the packed path (its graphs and its build-time timing).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from calib.sparsity import is_2to4_sparse
from common.errors import WorkbenchError
from engines import backends
from engines.engine_file import EngineHeader, packing_budget
from engines.tuning import LIBRARY, GemmProblem, agrees, attention_agrees, attention_key, kernel_key
from model.config import BertConfig
from quant.formats import INT8, QuantFormat
from quant.policy import GEMMS, PrecisionPolicy
from quant.quantizer import dequantize, quantize, reciprocal, weight_scales
from quant.smoothing import channel_scales, smoothed_weight

SMOOTH_PREFIX = "smooth."  # engine tensors "smooth.SITE": a smoothed site's vector s (quant/smoothing.py)
ROTATE_WEIGHTS_UP_TO_ROWS = backends.SMALL_M_ROWS  # build-time timing runs every layer's weights up to this M


@dataclass(frozen=True)
class Activation:
    """A LayerNorm output as the forward carries it (the residual stream and the next GEMM's input): FP, its INT8
    codes at `site`, or both. --int8: FP plus the codes where the next GEMM is INT8; -iln: the codes alone."""

    fp: torch.Tensor | None
    codes: torch.Tensor | None
    site: str


@dataclass(frozen=True)
class Padded:
    """The attention layout of `forward`: batch x seq_len rows, with the padding's key bias or None (no padding)."""

    batch: int
    seq_len: int
    key_bias: torch.Tensor | None


@dataclass(frozen=True)
class Packed:
    """The attention layout of `forward_packed`: windows back to back, cu_seqlens int32 [windows + 1] on the
    device, none longer than max_seqlen."""

    cu_seqlens: torch.Tensor
    max_seqlen: int


@dataclass(frozen=True)
class Gemm:
    """One encoder GEMM as the engine runs it: quantized (codes in, per-channel weight scales) or FP."""

    kind: str                         # qkv, attn_out, fc1, fc2
    weight: torch.Tensor              # codes [N, K] in `format`, or FP16/FP32
    bias: torch.Tensor                # float32 for quantized GEMMs, else the engine's dtype
    weight_scale: torch.Tensor | None  # float32 [N] for quantized GEMMs
    input_scale: float | None         # per-tensor scale of the input codes
    format: QuantFormat | None = None  # the spec's format of input and weights; None: floating point
    sparse: bool = False              # a 2:4 weight of a --sparse build: sparse families may run it

    @property
    def quantized(self) -> bool:
        return self.format is not None

    @property
    def backend_format(self) -> str:
        """The format whose kernel families run it (engines/backends.py)."""
        return self.format.name if self.format is not None else "fp"


def gemm_kernel_key(kind: str, m: int, quantized: bool = True) -> str:
    """The header key of a GEMM kind's implementation at m rows: gemm.KIND.mM for the quantized GEMMs;
    gemm.KIND.fp.mM for the FP ones (timed in --sparse builds only), so a --keep-fp16 build holds both."""
    return kernel_key(kind if quantized else f"{kind}.fp", m)


def _triton_usable(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    from plugins import available
    return available()


def _fp8_kernels_usable() -> bool:
    from plugins.fp8_linear import fp8_kernels_available
    return fp8_kernels_available()


def activation_codes(shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """INT8 codes shaped like a calibrated activation's (normal, std 127/4, clamped): the -imh attention tuner's
    QKV. Uniform codes over [-127, 127] make every score huge at real scales, so near-tied keys split a row's
    probability and a context code moves by two probability steps in a few of millions of places: at the shared
    MiniLM's scales that failed every INT8 attention candidate at the check and left -imh builds on the slow
    reference path, while the same candidates agree on these codes (benchmarks/device_attention_check.py)."""
    x = torch.randn(shape, generator=generator, device=device) * (127 / 4)
    return x.round_().clamp_(-127, 127).to(torch.int8)


class Engine(torch.nn.Module):
    def __init__(self, header: EngineHeader, tensors: dict[str, torch.Tensor], device: torch.device):
        super().__init__()
        self.header = header
        self.cfg = BertConfig.from_json(header.model_config)
        self.policy = PrecisionPolicy(**header.policy)
        self.dtype = torch.float16 if self.policy.fp16 else torch.float32
        self.device = torch.device(device)
        self.t = {k: v.to(self.device) for k, v in tensors.items()}
        self.spec = header.spec
        self.scale = self.spec.scales()
        self.produced_codes = {s for s in self.scale if self.policy.rounded_where_produced(s)}  # -iln, -imh
        # Smoothed sites (quant/smoothing.py) are quantized per channel: their scales and reciprocals, made once.
        smooth = {k.removeprefix(SMOOTH_PREFIX): v for k, v in self.t.items() if k.startswith(SMOOTH_PREFIX)}
        self.channel_scale = {site: channel_scales(self.scale[site], v).contiguous()
                              for site, v in smooth.items() if site in self.scale}
        self.channel_recip = {site: reciprocal(v, self.device).contiguous() for site, v in self.channel_scale.items()}
        if self.policy.imh:  # the QKV GEMM writes Q, K, V codes: one scale per section of its output
            for i in range(self.cfg.num_layers):
                sections = [torch.full((self.cfg.hidden_size,), self.scale[f"layer{i}.{n}"]) for n in "qkv"]
                self.channel_scale[f"layer{i}.qkv"] = torch.cat(sections).to(self.device).contiguous()
                self.channel_recip[f"layer{i}.qkv"] = reciprocal(self.channel_scale[f"layer{i}.qkv"], self.device)
        self.use_triton = _triton_usable(self.device)
        self.fp8_kernels = self.use_triton and _fp8_kernels_usable()  # our kernels write E4M3 codes here
        self.kernels = dict(header.kernels)
        self.gemms = {f"layers.{i}.{g}": self._gemm_of(i, g) for i in range(self.cfg.num_layers) for g in GEMMS}

    def _gemm_of(self, i: int, kind: str) -> Gemm:
        p = f"layers.{i}.{kind}"
        w = self.t[f"{p}.weight"]
        fmt = self.policy.gemm_format(i, kind)
        sparse = self.policy.sparse and is_2to4_sparse(w)  # checked here: the header's word is not enough
        if fmt is None:
            return Gemm(kind, w, self.t[f"{p}.bias"], None, None, sparse=sparse)
        if w.dtype != fmt.dtype or f"{p}.weight_scale" not in self.t:
            raise WorkbenchError(f"engine tensors do not match its header: {p}.weight is {w.dtype}, the spec says "
                                 f"{fmt.name} with per-channel scales; rebuild the engine")
        return Gemm(kind, w, self.t[f"{p}.bias"].float().contiguous(), self.t[f"{p}.weight_scale"].float(),
                    self.scale[self.policy.gemm_input_site(i, kind)], fmt, sparse)

    # ------------------------------------------------------------ kernel choice

    def impl(self, kind: str, m: int, format: str = "int8", sparse: bool = False) -> str:
        """The implementation of a GEMM kind in `format` at m rows: the header's choice for this m, else the
        choice for the nearest larger m it has, else the reference; the reference too where the choice cannot
        run here (a family of GPU kernels on the CPU, one this workbench has not registered, a sparse family for
        a weight that is not 2:4: `sparse` says whether it is)."""
        if kind == "fc2" and self.policy.fc2_library_gemm:
            return LIBRARY
        chosen = self.kernels.get(gemm_kernel_key(kind, m, format != "fp"))
        if chosen is None:
            prefix = gemm_kernel_key(kind, 0, format != "fp")[:-1]  # "gemm.KIND.m" or "gemm.KIND.fp.m"
            known = sorted((int(k[len(prefix):]), v) for k, v in self.kernels.items()
                           if k.startswith(prefix) and k[len(prefix):].isdigit())
            larger = [v for km, v in known if km >= m]
            chosen = larger[0] if larger else (known[-1][1] if known else LIBRARY)
        return chosen if backends.runnable(chosen, format, self.use_triton, sparse=sparse) else LIBRARY

    def attention_impl(self, b: int, s: int, padded: bool) -> str:
        """The attention implementation at batch b, length s, with the padding bias or without a mask: the
        header's choice for that case (the builder times the fused kernel against SDPA, or under -imh the INT8
        kernel against its reference, for each), else the library path. Engines built before the two cases were
        timed apart hold one choice per shape, for both."""
        chosen = self.kernels.get(attention_key(b, s, padded), self.kernels.get(attention_key(b, s), LIBRARY))
        return chosen if backends.runnable(chosen, self._attention_format, self.use_triton, attention=True) \
            else LIBRARY

    def varlen_attention_impl(self, tokens: int) -> str:
        """The packed path's attention implementation for a stream of `tokens` rows: the header's choice for that
        token budget, else for the nearest larger one it has, else the library path (as `impl`)."""
        from engines.packed import varlen_attention_key

        prefix = varlen_attention_key(0)[:-1]
        known = sorted((int(k[len(prefix):]), v) for k, v in self.kernels.items()
                       if k.startswith(prefix) and k[len(prefix):].isdigit())
        larger = [v for t, v in known if t >= tokens]
        chosen = larger[0] if larger else (known[-1][1] if known else LIBRARY)
        return chosen if backends.runnable(chosen, self._attention_format, self.use_triton, attention=True,
                                           varlen=True) else LIBRARY

    @property
    def runs_packed(self) -> bool:
        """Whether eval, bench and infer run this engine packed: built --varlen, and (where the build timed both
        paths, on CUDA) the packed path was the faster one (engines/packed.py)."""
        from engines.packed import runs_packed

        return runs_packed(self.header)

    @property
    def packing(self) -> tuple[int, int]:
        """(tokens, windows) the packed path fills a batch with: engines.engine_file.packing_budget."""
        return packing_budget(self.header)

    @property
    def _attention_format(self) -> str:
        return "int8" if self.policy.imh else "fp"

    # ------------------------------------------------------------ ops

    def _recip(self, site: str) -> float | torch.Tensor | None:
        """float32 1/scale of a site this build quantizes (a vector per channel where smoothed); None for sites it
        keeps in FP."""
        if site in self.channel_recip:
            return self.channel_recip[site]
        return reciprocal(self.scale[site], self.device) if site in self.scale else None

    def _format(self, site: str) -> QuantFormat:
        """The format of a site's codes: the spec's (-imh's QKV pseudo-sites are INT8, as -imh is)."""
        found = self.spec.sites.get(site)
        return found.format if found is not None else INT8

    def _site_scale(self, site: str) -> float | torch.Tensor:
        """A quantized site's scale: a number, or a float32 vector per channel where smoothed."""
        return self.channel_scale.get(site, self.scale.get(site))

    def _fp(self, x: Activation) -> torch.Tensor:
        """The FP value of an activation (its codes dequantized where it is carried as codes alone)."""
        return x.fp if x.fp is not None else dequantize(x.codes, self._site_scale(x.site), self.dtype)

    def _input(self, name: str, x: Activation) -> torch.Tensor:
        """What GEMM `name` reads of x: the codes where it is INT8, else the FP value."""
        return x.codes if self.gemms[name].quantized else self._fp(x)

    def _linear(self, name: str, a: torch.Tensor, *, residual: Activation | None = None, gelu: bool = False,
                out_site: str | None = None, impl: str | None = None) -> torch.Tensor:
        """y = a @ W.T + b [GELU] [+ residual], as FP or as the codes of `out_site` (when it is quantized). An
        INT8 GEMM reads a residual carried as codes alone as they are, and dequantizes them in its epilogue."""
        g = self.gemms[name]
        recip = self._recip(out_site) if out_site else None
        res = {}
        if residual is not None:
            res = dict(residual=residual.fp) if residual.fp is not None else \
                dict(residual=residual.codes, residual_scale=self._site_scale(residual.site))
        if g.quantized or g.sparse:
            impl = impl or self.impl(g.kind, a.shape[0], g.backend_format, g.sparse)
        backend = backends.gemm_backend(impl or LIBRARY, g.backend_format)
        if backend.sparse and not g.sparse:
            raise WorkbenchError(f"{name}: {impl} runs 2:4-sparse weights only, and this weight is not one")
        if recip is not None and self._format(out_site) is not INT8:  # INT8 families write INT8 codes alone
            res["out_format"] = self._format(out_site)
        return backend.run(backends.split(impl or LIBRARY)[1], a, g.weight, g.input_scale, g.weight_scale, g.bias,
                           gelu=gelu, gelu_tanh=self.policy.gelu_tanh, out_recip=recip, out_dtype=self.dtype, **res)

    def _ln(self, name: str, x: torch.Tensor, site: str, fp_out: bool = False) -> Activation:
        """LayerNorm of x as an Activation at `site`: FP, with its codes where the site is quantized. -iln sites
        are INT8 where produced: there the codes alone, or with `fp_out` (an FP consumer follows: the QA head)
        the codes and their dequantized value, written in the same pass."""
        recip = self._recip(site)
        args = (x, self.t[f"{name}.weight"], self.t[f"{name}.bias"], self.cfg.layer_norm_eps, recip)
        rounded = recip is not None and site in self.produced_codes
        if rounded and fp_out:
            args += (self._site_scale(site),)
        fmt = self._format(site)
        if self._kernels_write(fmt):
            from plugins.layernorm import layernorm_quant as run
        else:
            from plugins.layernorm import layernorm_quant_reference as run
        return Activation(*run(*args, codes_only=rounded and not fp_out, fmt=fmt), site)

    def _kernels_write(self, fmt: QuantFormat) -> bool:
        """Whether our Triton kernels run here and can write `fmt`'s codes (E4M3 needs compute capability 8.9)."""
        return self.use_triton and (fmt is INT8 or self.fp8_kernels)

    def _attend(self, i: int, qkv: torch.Tensor, layout: Padded | Packed, impl: str) -> torch.Tensor:
        """Layer i's attention from its QKV output [rows, 3H] (under -imh its Q, K, V codes) to the
        attention-output GEMM's input [rows, H]: the context's codes where that GEMM is quantized (under -imh
        always: rounded where produced), else the context. `layout`: padded batches (with their key bias or
        none) or packed windows (variable-length attention)."""
        quantized_out = self.gemms[f"layers.{i}.attn_out"].quantized
        site = f"layer{i}.context"
        imh = self.policy.imh
        fmt = INT8 if imh else self._format(site)
        config, heads = backends.split(impl)[1], self.cfg.num_heads
        options = dict(scales=self._attention_scales(i) if imh else None,
                       out_recip=self._recip(site) if quantized_out or imh else None, out_dtype=self.dtype,
                       gpu_kernels=self._kernels_write(fmt))
        if quantized_out and fmt is not INT8:  # FP8 context codes, written by the attention (INT8's by default)
            options["out_format"] = fmt
        if isinstance(layout, Packed):
            run = backends.attention_backend(impl, self._attention_format, varlen=True).run
            context = run(config, qkv, layout.cu_seqlens, layout.max_seqlen, heads, **options)
        else:
            run = backends.attention_backend(impl, self._attention_format).run
            context = run(config, qkv, layout.batch, heads, layout.key_bias, **options)
        if imh and not quantized_out:
            return dequantize(context, self._site_scale(site), self.dtype)
        return context

    def _attention_scales(self, i: int):
        from plugins.attention import AttentionScales
        return AttentionScales(*(self.scale[f"layer{i}.{n}"] for n in ("q", "k", "v", "probs")))

    # ------------------------------------------------------------ forward

    def _key_bias(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """[b, s] in the engine's dtype: 0 for a real token, the dtype's lowest value for padding; made once per
        forward, and attention adds it to its scores as it is."""
        return ((1.0 - attention_mask.float()) * torch.finfo(self.dtype).min).to(self.dtype).contiguous()

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor,
                attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """attention_mask None: no padding anywhere in the batch, so attention takes no mask (SDPA's fastest
        kernels take none: 1.5x faster at BERT-large 128 x 384 than with the padding bias, docs/attention-h200.md)."""
        b, s = input_ids.shape
        x = self._embed(input_ids, token_type_ids, self.t["embeddings.position.weight"][:s])
        key_bias = None if attention_mask is None else self._key_bias(attention_mask)
        attention = self.attention_impl(b, s, padded=key_bias is not None)
        logits = self._encode(x.view(b * s, self.cfg.hidden_size), Padded(b, s, key_bias), attention).view(b, s, 2)
        return logits[..., 0], logits[..., 1]

    def forward_packed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor, position_ids: torch.Tensor,
                       cu_seqlens: torch.Tensor, max_seqlen: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Start and end logits [T] of windows packed back to back: ids, token types and positions [T] per token,
        cu_seqlens int32 [windows + 1] on the device (windows of length 0 allowed; rows past cu_seqlens[-1]
        belong to none and their logits mean nothing), max_seqlen at least the longest window (model.packing
        makes these on the host)."""
        x = self._embed(input_ids, token_type_ids, self.t["embeddings.position.weight"][position_ids])
        attention = self.varlen_attention_impl(input_ids.shape[0])
        logits = self._encode(x, Packed(cu_seqlens, max_seqlen), attention)
        return logits[:, 0], logits[:, 1]

    def _embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Word + position + token-type embeddings (in this order in both forwards: the same sums)."""
        t = self.t
        return t["embeddings.word.weight"][input_ids] + positions + t["embeddings.token_type.weight"][token_type_ids]

    def _encode(self, x: torch.Tensor, layout: Padded | Packed, attention: str) -> torch.Tensor:
        """The embeddings' rows [rows, H] through the embedding LayerNorm, the layers and the QA head: float32
        logits [rows, 2]."""
        x = self._ln("embeddings.ln", x, "embeddings.ln_out")
        for i in range(self.cfg.num_layers):
            x = self._layer(i, x, layout, attention, last=i == self.cfg.num_layers - 1)
        return F.linear(self._fp(x), self.t["qa.weight"], self.t["qa.bias"]).float()

    def _layer(self, i: int, x: Activation, layout: Padded | Packed, attention: str, last: bool = False) -> Activation:
        """x: the residual stream [rows, H], this layer's QKV input; the last layer's output goes to the QA head."""
        p = f"layers.{i}."
        qkv = self._linear(p + "qkv", self._input(p + "qkv", x), out_site=f"layer{i}.qkv" if self.policy.imh else None)
        ctx = self._attend(i, qkv, layout, attention)
        y = self._linear(p + "attn_out", ctx, residual=x)
        x1 = self._ln(p + "ln1", y, f"layer{i}.attn_ln_out")
        ffn = self._linear(p + "fc1", self._input(p + "fc1", x1), gelu=True, out_site=f"layer{i}.fc2_in")
        y2 = self._linear(p + "fc2", ffn, residual=x1)
        return self._ln(p + "ln2", y2, f"layer{i}.ffn_ln_out", fp_out=last)

    # ------------------------------------------------------------ tuning support

    def attention_candidates(self, b: int, s: int, padded: bool) -> tuple[GemmProblem, dict[str, callable],
                                                                           int] | None:
        """Layer 0's attention at batch b, length s as the forward runs it (random FP16 QKV output, or under -imh
        random codes), one zero-argument call per implementation (SDPA and the fused kernel's configurations, or
        the INT8 kernel's reference and its configurations) for build-time timing, in one of the two cases the
        engine's graphs hold: a quarter of every sequence padded (the key bias), or no padding and no mask. They
        are timed apart because the fastest differs (at BERT-large 128 x 384 on an H200 our kernel led with the
        bias, cuDNN without a mask: docs/attention-h200.md)."""
        if not self.use_triton or self.dtype != torch.float16:  # (an FP32 key bias is -inf in the log2 domain)
            return None
        cfg = self.cfg
        gen = torch.Generator(device=self.device).manual_seed(b * s)
        if self.policy.imh:
            qkv = activation_codes((b * s, 3 * cfg.hidden_size), gen, self.device)
        else:
            qkv = torch.randn(b * s, 3 * cfg.hidden_size, generator=gen, device=self.device).to(self.dtype)
        bias = None
        if padded:
            mask = torch.ones(b, s, device=self.device)
            mask[:, s - s // 4:] = 0.0
            bias = self._key_bias(mask)
        problem = GemmProblem("attention", b * s, cfg.hidden_size, s,
                              # (timing-cache keys: "+padded" once named the two cases timed together; -imh's
                              # "int8" those timed and checked on uniform codes, which few kernels passed)
                              "int8-codes" if self.policy.imh else "float16",
                              ("softmax+bias->" if padded else "softmax->") + self.context_output())
        impls = backends.attention_candidates(b, s, self._attention_format, self.use_triton)
        return problem, {impl: (lambda impl=impl: self._attend(0, qkv, Padded(b, s, bias), impl)) for impl in impls}, 1

    def context_output(self) -> str:
        """What attention writes, in timing-cache keys: the attention-output GEMM's code format, or float16."""
        return self._format("layer0.context").name if self.gemms["layers.0.attn_out"].quantized else "float16"

    def attention_agreement(self) -> Callable[[torch.Tensor, torch.Tensor], bool]:
        """How the build holds an attention candidate to the library path's output: tuning.attention_agrees
        against SDPA; under -imh against the INT8 reference, whose context codes a candidate may miss by
        plugins.attention.context_code_step (layer 0's, the layer timed) in under 1 place in 1,000."""
        if not self.policy.imh:
            return attention_agrees
        from plugins.attention import context_code_step

        step = context_code_step(self._attention_scales(0), self._recip("layer0.context"))
        return functools.partial(agrees, max_step=step)

    def _timing_operand(self, fmt: QuantFormat | None, shape: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
        """A random GEMM operand as the forward carries it: INT8 codes over the whole range, E4M3 codes of normal
        values over a quarter of the range (as an activation's codes look), or FP values (`fmt` None)."""
        if fmt is INT8:
            return torch.randint(-127, 128, shape, generator=gen, device=self.device, dtype=torch.int8)
        if fmt is not None:
            return fmt.codes(torch.randn(shape, generator=gen, device=self.device) * (fmt.qmax / 4))
        return torch.randn(shape, generator=gen, device=self.device).to(self.dtype)

    def gemm_candidates(self, kind: str, m: int, format: str = "int8"
                        ) -> tuple[GemmProblem, dict[str, callable], int] | None:
        """The `format` `kind` GEMM at m rows as the forward launches it (random input codes, or FP values for
        the "fp" GEMMs a --sparse build times; each layer's weights and epilogue), one zero-argument call per
        implementation for build-time timing, and how many GEMMs one call runs. At few rows the weights are most
        of the traffic, so a call runs the GEMM of every such layer of this kind with the same epilogue, each with
        its own weights, as a forward does (one layer's weights would sit in L2 and time too fast); at many rows
        it runs the first such layer only. Calls return the first layer's output, which the candidates must
        agree on. Sparse families are candidates only where the weights are 2:4 (Gemm.sparse)."""
        layers = [i for i in range(self.cfg.num_layers) if self.gemms[f"layers.{i}.{kind}"].backend_format == format]
        if not layers:
            return None

        def out_site(i: int) -> str | None:  # where the GEMM writes codes: FC1 (FC2's input), QKV under -imh
            if kind == "fc1" and f"layer{i}.fc2_in" in self.scale:
                return f"layer{i}.fc2_in"
            return f"layer{i}.qkv" if kind == "qkv" and self.policy.imh else None

        first = layers[0]  # the layers timed together share its epilogue and its weights' kind (2:4 or not)
        layers = [i for i in layers if (out_site(i) is None) == (out_site(first) is None)
                  and self.gemms[f"layers.{i}.{kind}"].sparse == self.gemms[f"layers.{first}.{kind}"].sparse]
        if m > ROTATE_WEIGHTS_UP_TO_ROWS:
            layers = layers[:1]
        g = self.gemms[f"layers.{layers[0]}.{kind}"]
        n, k = g.weight.shape
        gen = torch.Generator(device=self.device).manual_seed(m)
        a = self._timing_operand(g.format if g.quantized else None, (m, k), gen)
        residual, res_kind = None, ""
        if kind in ("attn_out", "fc2"):  # the residual as the forward carries it (codes alone under -iln)
            site = self.policy.gemm_input_site(layers[0], "qkv" if kind == "attn_out" else "fc1")
            fmt = self._format(site) if site in self.produced_codes else None
            r = self._timing_operand(fmt, (m, n), gen)
            residual = Activation(r, None, site) if fmt is None else Activation(None, r, site)
            res_kind = "+residual" if fmt is None else "+residual8" if fmt is INT8 else f"+residual:{fmt.name}"
        gelu = kind == "fc1"
        epilogue = "bias" + ("+gelu" if gelu else "") + res_kind + \
            (f"->{self._format(out_site(layers[0])).name}" if out_site(layers[0])
             else f"->{str(self.dtype).removeprefix('torch.')}")
        problem = GemmProblem(kind, m, n, k, g.backend_format if g.quantized else str(a.dtype).removeprefix("torch."),
                              epilogue)

        def call(impl: str) -> torch.Tensor:
            return [self._linear(f"layers.{i}.{kind}", a, residual=residual, gelu=gelu, out_site=out_site(i),
                                 impl=impl) for i in layers][0]

        impls = backends.gemm_candidates(problem, g.backend_format, gpu_kernels=True,  # timed on CUDA only
                                         sparse=g.sparse)
        return problem, {impl: (lambda impl=impl: call(impl)) for impl in impls}, len(layers)


def engine_tensors(model, policy: PrecisionPolicy,
                   smooth: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The engine's weights from a reference BertQA: codes (the policy's format) + per-channel scales for
    quantized GEMMs (rows of W * s where the GEMM's input site is smoothed), and the vectors s of the smoothed
    sites the build quantizes."""
    fmt = policy.format
    dtype = torch.float16 if policy.fp16 else torch.float32
    out: dict[str, torch.Tensor] = {}
    num_layers = model.config.num_layers
    quantized = {f"layers.{i}.{g}.weight": policy.gemm_input_site(i, g) for i in range(num_layers) for g in GEMMS
                 if policy.quantizes_gemm(i, g)}
    sites = set(policy.quantized_sites(num_layers))
    smooth = {site: v for site, v in (smooth or {}).items() if site in sites}
    for site, v in smooth.items():
        out[SMOOTH_PREFIX + site] = v.detach().float().cpu().contiguous()
    for name, p in model.state_dict().items():
        p = p.detach().float().cpu()
        if name in quantized:
            p = smoothed_weight(p, smooth.get(quantized[name]))
            scales = weight_scales(p, fmt)
            out[name] = quantize(p, scales, fmt).contiguous()
            out[name.replace(".weight", ".weight_scale")] = scales.view(-1).contiguous()
        elif name.replace(".bias", ".weight") in quantized:
            out[name] = p.contiguous()  # FP32: added to the FP32 dequantized accumulator
        else:
            out[name] = p.to(dtype).contiguous()
    return out
