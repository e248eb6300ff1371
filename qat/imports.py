"""Building from QAT results made elsewhere: modelopt / pytorch-quantization state dicts, the TensorRT BERT demo's
names, and fake-quant ONNX files, read into our quantization spec (issue 18, item 3).

    read_external_scales(path, config, strict=False) -> ImportedScales   any of the three, by the file's suffix
    scales_for_build(path, loaded, policy, strict=False) -> QatScales    what engines.build takes, checked first
    write_qat_folder(imported, folder, model, source_dir)                 an imported result as our QAT folder
    to_modelopt_state(spec, config) / to_trt_demo_state(spec, config)    our spec in their names (round trips)

Sources
-------
* modelopt (`mtq.quantize` on a Hugging Face BertForQuestionAnswering) and pytorch-quantization (NVIDIA's QAT
  BERT, FasterTransformer's quantized BERT): module path + `[_]input_quantizer.[_]amax` / `weight_quantizer` /
  `output_quantizer`; the attention matmuls as `matmul_{q,k,v,a}_input_quantizer` (pytorch-quantization) or
  `{q,k,v,p}_bmm_quantizer` (modelopt's attention plugin); residual adds as `add_local_input_quantizer` /
  `add_residual_input_quantizer`. Leading underscores, a `bert.` prefix and a `module.` prefix are optional.
  `.safetensors`, or a pickle (`.pt`, `.pth`, `.bin`, `.ckpt`) only through torch.load(weights_only=True); a
  checkpoint dict with a "model" or "state_dict" entry (the TensorRT demo's `torch.load(path)["model"]`) is
  unwrapped. Hugging Face parameter names in the same file are the weights (used when all are there).
* The TensorRT demo's names (demo/BERT/builder_utils.py `onnx_to_trt_name`, as builder.py reads them):
  `l{I}_attention_self_query_input_amax`, `l{I}_attention_self_qv_a_input_quantizer_amax`, ...,
  `bert_encoder_final_input_quantizer_amax`. Its weight names (`l0_..._kernel`, `_bias`, `_gamma`, ...) are
  recognised and not read (their layout depends on the checkpoint they came from).
* A fake-quant ONNX (`.onnx`): each QuantizeLinear (with its DequantizeLinear) is an amax = scale * 127. Which
  tensor it reads is decided, in this order, by (1) one of our site names (`layer3.fc2_in`) in the tensor it reads,
  its node name or its scale's name; (2) a quantizer name in those (a torch export names nodes by module path:
  `/bert/encoder/layer.0/attention/self/query/input_quantizer/QuantizeLinear`); (3) the graph: the GEMM its DQ
  feeds (the weight initializer on the GEMM's other side, through Transpose / weight Q/DQ, named as a Hugging
  Face or our parameter: query/key/value -> QKV input, ...) or, for attention, what produced the tensor (through
  Reshape / Transpose: the query/key/value projection's bias or weight -> q/k/v; a Softmax -> probs, the n-th
  Softmax being layer n when there are exactly num_layers). Weights: float initializers, or INT8 codes behind a
  DequantizeLinear, named as Hugging Face parameters or ours (`layers.3.fc1.weight`, also `layer3.fc1.weight`),
  stored [out, in] or [in, out] (told by how the graph uses them: read by MatMul as is, or through a Transpose);
  an export that keeps only codes gives the dequantized weights, which the build re-rounds to the same codes.
  Per-channel weight scales are checked against max |w| per row and not used: the build takes per-row scales
  from the weights themselves, as TensorRT does. Only symmetric INT8 (int8 zero point 0) is accepted; a
  per-channel Mul right ahead of a quantizer (a smoothed site) is refused. ONNX's QuantizeLinear saturates to
  [-128, 127] where ours clamps to [-127, 127]: the same scale, one code apart below -amax.

Name -> site (ours: model/bert.py's taps; `in(I)` is layer I's QKV input, embeddings.ln_out for I = 0 else
layer{I-1}.ffn_ln_out; L = num_layers). Several quantizers of one tensor: the largest amax (nothing any of them
kept is clipped), with a warning when they differ.

  modelopt / pytorch-quantization (bert.encoder.layer.I...)  TensorRT demo name                        site
  layer.I.attention.self.{query,key,value}.input_quantizer    l{I}_attention_self_{query,key,value}_input   in(I)
  layer.I.attention.self.{query,key,value}.output_quantizer                                              layerI.{q,k,v}
  layer.I.attention.self.matmul_{q,k,v}_input_quantizer,      l{I}_attention_self_{qv_a,qv_b,av_b}_input_quantizer
    {q,k,v}_bmm_quantizer                                                                                layerI.{q,k,v}
  layer.I.attention.self.matmul_a_input_quantizer,            l{I}_attention_self_av_a_input_quantizer
    p_bmm_quantizer                                                                                      layerI.probs
  layer.I.attention.output.dense.input_quantizer              l{I}_attention_output_dense_input        layerI.context
  layer.I.attention.output.LayerNorm.output_quantizer                                               layerI.attn_ln_out
  layer.I.intermediate.dense[_act].input_quantizer            l{I}_intermediate_dense_input         layerI.attn_ln_out
  layer.I.output.dense[_act].input_quantizer                  l{I}_output_dense_input                   layerI.fc2_in
  layer.I.output.LayerNorm.output_quantizer                                                          layerI.ffn_ln_out
  (bert.)embeddings.LayerNorm.output_quantizer                                                     embeddings.ln_out
  encoder.final_input_quantizer, qa_outputs.input_quantizer   bert_encoder_final_input_quantizer  layer{L-1}.ffn_ln_out
    (modelopt names end `._amax`, pytorch-quantization's `._input_quantizer._amax`; TensorRT names `_amax`)

  Checked, not used (the same tensor as a site; our engines give it that site's scale, as the TRT demo's BERT
  builder does, which never reads them): a warning when the amax differs.

    layer.I.attention.output.add_residual_input_quantizer           in(I)
    layer.I.output.add_residual_input_quantizer                     layerI.attn_ln_out

  Weights: `*.weight_quantizer` of query/key/value, attention.output.dense, intermediate.dense, output.dense
  (TRT `..._kernel_amax`): per-channel amax checked against max |w| per row when the weights are at hand, not
  used (the build rounds each row with its own max |w|).

  Refused (one-line error; `ignore_unmodelled=True` drops them with a warning instead): quantizers of tensors
  our engines never round. Every one of them is more rounding than our engine does, never a different scale for a
  tensor we round: dropping them builds a model slightly closer to floating point than the QAT model.

    embeddings.LayerNorm.input_quantizer, layer.I.attention.output.LayerNorm.input_quantizer,
    layer.I.output.LayerNorm.input_quantizer            the residual sums before LayerNorm (modelopt's default
                                                        config quantizes LayerNorm inputs)
    layer.I.attention.output.add_local_input_quantizer, layer.I.output.add_local_input_quantizer
    (TRT ..._add_local_input_quantizer_amax), *.dense.output_quantizer
                                                        GEMM outputs before the residual add: TensorRT's -iln
                                                        skip-LayerNorm plugin reads them as INT8; our -iln GEMM
                                                        epilogue adds the residual in float and rounds the
                                                        LayerNorm's output instead
    intermediate.dense.output_quantizer                 FC1's output before GELU
    qa_outputs.weight_quantizer, qa_outputs.output_quantizer   the QA head, which stays in floating point

  Anything else (embedding quantizers, `_pre_quant_scale` of SmoothQuant/AWQ, per-channel activation ranges,
  a layer beyond the config's) is an unknown name: one-line error listing the first few and the count.

Policy flags implied: --int8 when any GEMM input has a range, with --keep-fp16 for each GEMM whose input has none
(what the source left unquantized); -imh when q, k, v, probs and context of every layer have ranges; -iln when
every LayerNorm output has (embeddings.ln_out, attn_ln_out, ffn_ln_out of every layer; with modelopt names the
last ffn_ln_out comes from qa_outputs.input_quantizer). A GEMM whose input is also an -iln site cannot be told
to have been left in FP16. `strict`: no fallback: every --int8 site must have a range, and every -imh site once
any attention site (q, k, v, probs) has one; the missing ones are listed in one line.
"""
from __future__ import annotations

import logging
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

from common.errors import WorkbenchError
from model.bert import BertQA, all_sites
from model.checkpoint import LoadedModel, hf_names
from model.config import BertConfig
from qat.folder import QatScales, policy_flags, save_model_folder, save_qat_scales
from quant.formats import INT8, QuantFormat
from quant.policy import GEMMS, PrecisionPolicy
from quant.quantizer import scale_from_amax
from quant.spec import PER_TENSOR, QuantSpec, ScaleSource, SiteSpec

log = logging.getLogger(__name__)

IGNORE_FLAG = "--ignore-unmodelled"   # how a command line spells ignore_unmodelled (named in the refusal)
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
_SHOWN = 3                                 # names shown in a one-line error before "(+N more)"
_POLICY = PrecisionPolicy()                # gemm_input_site does not depend on the flags


# ---------------------------------------------------------------------------------------------------------------
# What an external name means

@dataclass(frozen=True)
class Role:
    """What one external quantizer is to us. kind: "site" (its amax is that site's range), "check" (the same
    tensor as `target`, compared, not used), "weight" (per-channel weight amax of our parameter `target`, rows
    `rows`), "unmodelled" (a tensor our engines keep in floating point; `why`)."""

    kind: str
    target: str = ""
    rows: tuple[int, int] | None = None
    why: str = ""


def _qkv_in(i: int) -> str:
    return _POLICY.gemm_input_site(i, "qkv")


def _site(name: str) -> Role:
    return Role("site", name)


_UNMODELLED_SUM = "a residual sum before LayerNorm"
_UNMODELLED_GEMM_OUT = "a GEMM output before the residual add"


def _layer_role(i: int, module: str, quantizer: str, cfg: BertConfig) -> Role | None:
    """Layer i's quantizer `quantizer` on module path `module` (lower case, below bert.encoder.layer.i)."""
    h = cfg.hidden_size
    part = {"query": 0, "key": 1, "value": 2}
    if module.startswith("attention.self.") and module.split(".")[2] in part and module.count(".") == 2:
        p = module.split(".")[2]
        return {"input_quantizer": _site(_qkv_in(i)),
                "output_quantizer": _site(f"layer{i}.{p[0]}"),
                "weight_quantizer": Role("weight", f"layers.{i}.qkv.weight", (part[p] * h, part[p] * h + h))
                }.get(quantizer)
    if module == "attention.self":
        for site, names in (("q", ("matmul_q_input_quantizer", "q_bmm_quantizer")),
                            ("k", ("matmul_k_input_quantizer", "k_bmm_quantizer")),
                            ("v", ("matmul_v_input_quantizer", "v_bmm_quantizer")),
                            ("probs", ("matmul_a_input_quantizer", "p_bmm_quantizer"))):
            if quantizer in names:
                return _site(f"layer{i}.{site}")
        return None
    gemm = {"attention.output.dense": ("attn_out", f"layer{i}.context", "the attention-output GEMM's output"),
            "intermediate.dense": ("fc1", f"layer{i}.attn_ln_out", "FC1's output before GELU"),
            "intermediate.dense_act": ("fc1", f"layer{i}.attn_ln_out", None),
            "output.dense": ("fc2", f"layer{i}.fc2_in", "FC2's output before the residual add"),
            "output.dense_act": ("fc2", f"layer{i}.fc2_in", None)}.get(module)
    if gemm is not None:
        name, site, out_why = gemm
        if quantizer == "input_quantizer":
            return _site(site)
        if quantizer == "weight_quantizer":
            return Role("weight", f"layers.{i}.{name}.weight")
        if quantizer == "output_quantizer" and out_why:
            return Role("unmodelled", why=out_why)
        return None
    residual = {"attention.output": _qkv_in(i), "output": f"layer{i}.attn_ln_out"}.get(module)
    if residual is not None:
        if quantizer == "add_local_input_quantizer":
            return Role("unmodelled", why=_UNMODELLED_GEMM_OUT)
        if quantizer == "add_residual_input_quantizer":
            return Role("check", residual)
        return None
    norm = {"attention.output.layernorm": f"layer{i}.attn_ln_out", "output.layernorm": f"layer{i}.ffn_ln_out"}
    if module in norm:
        return {"input_quantizer": Role("unmodelled", why=_UNMODELLED_SUM),
                "output_quantizer": _site(norm[module])}.get(quantizer)
    return None


_LAYER_PATH = re.compile(r"encoder\.layers?\.(\d+)\.(.+)")


def hf_quantizer_role(name: str, cfg: BertConfig) -> Role | None:
    """The role of a modelopt / pytorch-quantization quantizer amax named `name` (module path + quantizer +
    `amax`, underscores optional); None when it is no quantizer amax we know."""
    tokens = [t.strip("_").lower() for t in name.split(".")]
    while tokens and tokens[0] in ("module", "model"):
        tokens = tokens[1:]
    if len(tokens) < 3 or tokens[-1] != "amax" or not tokens[-2].endswith("quantizer"):
        return None
    if tokens[0] == "bert":
        tokens = tokens[1:]
    quantizer, module = tokens[-2], ".".join(tokens[:-2])
    last = f"layer{cfg.num_layers - 1}.ffn_ln_out"
    if module == "embeddings.layernorm":
        return {"input_quantizer": Role("unmodelled", why="the embedding sum before LayerNorm"),
                "output_quantizer": _site("embeddings.ln_out")}.get(quantizer)
    if module == "encoder" and quantizer == "final_input_quantizer":
        return _site(last)
    if module == "qa_outputs":
        return {"input_quantizer": _site(last),
                "weight_quantizer": Role("unmodelled", why="the QA head (it stays in floating point)"),
                "output_quantizer": Role("unmodelled", why="the QA head (it stays in floating point)")
                }.get(quantizer)
    match = _LAYER_PATH.fullmatch(module)
    if match is None or int(match.group(1)) >= cfg.num_layers:
        return None
    return _layer_role(int(match.group(1)), match.group(2), quantizer, cfg)


_TRT_NAME = re.compile(r"l(\d+)_(.+)_amax")
_TRT_WEIGHT = re.compile(r"(l\d+_.+_(kernel|bias|beta|gamma)(_notrans)?|bert_embeddings_.+|cls_squad_output_.+)")


def trt_demo_role(name: str, cfg: BertConfig) -> Role | None:
    """The role of a TensorRT BERT demo name (builder.py's init_dict keys for QAT)."""
    if name == "bert_encoder_final_input_quantizer_amax":
        return _site(f"layer{cfg.num_layers - 1}.ffn_ln_out")
    match = _TRT_NAME.fullmatch(name)
    if match is None or int(match.group(1)) >= cfg.num_layers:
        return None
    i, rest = int(match.group(1)), match.group(2)
    h = cfg.hidden_size
    for n, p in enumerate(("query", "key", "value")):
        if rest == f"attention_self_{p}_input":
            return _site(_qkv_in(i))
        if rest == f"attention_self_{p}_kernel":
            return Role("weight", f"layers.{i}.qkv.weight", (n * h, n * h + h))
    for site, trt in (("q", "qv_a"), ("k", "qv_b"), ("v", "av_b"), ("probs", "av_a")):
        if rest == f"attention_self_{trt}_input_quantizer":
            return _site(f"layer{i}.{site}")
    for prefix, gemm, site in (("attention_output_dense", "attn_out", f"layer{i}.context"),
                               ("intermediate_dense", "fc1", f"layer{i}.attn_ln_out"),
                               ("output_dense", "fc2", f"layer{i}.fc2_in")):
        if rest == f"{prefix}_input":
            return _site(site)
        if rest == f"{prefix}_kernel":
            return Role("weight", f"layers.{i}.{gemm}.weight")
    if rest in ("attention_output_add_local_input_quantizer", "output_add_local_input_quantizer"):
        return Role("unmodelled", why=_UNMODELLED_GEMM_OUT)
    if rest == "attention_output_add_residual_input_quantizer":
        return Role("check", _qkv_in(i))
    if rest == "output_add_residual_input_quantizer":
        return Role("check", f"layer{i}.attn_ln_out")
    return None


def external_role(name: str, cfg: BertConfig) -> tuple[Role, str] | None:
    """(role, naming convention) of a quantizer name in either convention; None: unknown."""
    role = hf_quantizer_role(name, cfg)
    if role is not None:
        return role, "modelopt"
    role = trt_demo_role(name, cfg)
    return (role, "trt-demo") if role is not None else None


# ---------------------------------------------------------------------------------------------------------------
# Our spec in their names (for round trips and for handing our ranges to their tools)

def _consumers(site: str, cfg: BertConfig) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(modelopt names, TensorRT demo names) of the quantizers that read `site`'s tensor in their models."""
    last = cfg.num_layers - 1
    if site == "embeddings.ln_out" or (site.endswith(".ffn_ln_out") and int(site[5:site.index(".")]) < last):
        i = 0 if site == "embeddings.ln_out" else int(site[5:site.index(".")]) + 1
        return (tuple(f"bert.encoder.layer.{i}.attention.self.{p}.input_quantizer._amax"
                      for p in ("query", "key", "value")),
                tuple(f"l{i}_attention_self_{p}_input_amax" for p in ("query", "key", "value")))
    if site == f"layer{last}.ffn_ln_out":
        return ("qa_outputs.input_quantizer._amax",), ("bert_encoder_final_input_quantizer_amax",)
    i, kind = int(site[5:site.index(".")]), site.split(".")[1]
    mo = f"bert.encoder.layer.{i}."
    return {
        "q": ((mo + "attention.self.q_bmm_quantizer._amax",), (f"l{i}_attention_self_qv_a_input_quantizer_amax",)),
        "k": ((mo + "attention.self.k_bmm_quantizer._amax",), (f"l{i}_attention_self_qv_b_input_quantizer_amax",)),
        "v": ((mo + "attention.self.v_bmm_quantizer._amax",), (f"l{i}_attention_self_av_b_input_quantizer_amax",)),
        "probs": ((mo + "attention.self.p_bmm_quantizer._amax",),
                  (f"l{i}_attention_self_av_a_input_quantizer_amax",)),
        "context": ((mo + "attention.output.dense.input_quantizer._amax",),
                    (f"l{i}_attention_output_dense_input_amax",)),
        "attn_ln_out": ((mo + "intermediate.dense.input_quantizer._amax",), (f"l{i}_intermediate_dense_input_amax",)),
        "fc2_in": ((mo + "output.dense.input_quantizer._amax",), (f"l{i}_output_dense_input_amax",)),
    }[kind]


def _export(spec: QuantSpec, cfg: BertConfig, which: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    known = set(all_sites(cfg.num_layers))
    out: dict[str, torch.Tensor] = {}
    for site, s in spec.sites.items():
        if site not in known:
            raise WorkbenchError(f"site {site!r} is not a site of this {cfg.num_layers}-layer model")
        if s.granularity != PER_TENSOR:
            raise WorkbenchError(f"site {site} is smoothed (per-channel): external QAT names have no place for its "
                                 "smoothing vector")
        for name in _consumers(site, cfg)[which]:
            out[name] = torch.tensor(s.amax, dtype=dtype)
    return out


def to_modelopt_state(spec: QuantSpec, config: BertConfig, model: BertQA | None = None,
                      dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Our spec in the names a modelopt-quantized Hugging Face BertForQuestionAnswering uses (the input quantizers
    of the GEMMs that read each site, the bmm quantizers of modelopt's attention plugin for q/k/v/probs); amax in
    float32 as modelopt stores it (exact for QAT's float32 ranges). With `model`: its weights under Hugging Face
    names too, and each quantized GEMM's per-row weight amax [out, 1]."""
    out = _export(spec, config, 0, dtype)
    if model is not None:
        from qat.folder import to_hf_state_dict
        hf = to_hf_state_dict(model.state_dict(), config)
        out.update(hf)
        for i, gemm in ((i, g) for i in range(config.num_layers) for g in GEMMS):
            if _POLICY.gemm_input_site(i, gemm) not in spec.sites:
                continue
            names = hf_names(config)[f"layers.{i}.{gemm}.weight"]
            for name in names:
                out[name.removesuffix("weight") + "weight_quantizer._amax"] = \
                    hf[name].abs().amax(dim=1, keepdim=True).to(dtype)
    return out


def to_trt_demo_state(spec: QuantSpec, config: BertConfig, dtype: torch.dtype = torch.float32
                      ) -> dict[str, torch.Tensor]:
    """Our spec in the TensorRT BERT demo's init_dict names (what builder.py reads with --int8 and a QAT model)."""
    return _export(spec, config, 1, dtype)


# ---------------------------------------------------------------------------------------------------------------
# The result

@dataclass(frozen=True)
class ImportedQatScales(QatScales):
    """QatScales (what engines.build takes) that remember where they came from, for reports and headers."""

    origin: str = ""

    def describe(self) -> str:
        return f"QAT (imported: {self.origin})"


@dataclass(frozen=True)
class ImportedScales:
    """A QAT result made elsewhere, in our terms.

    convention: how its ranges were named ("modelopt" for modelopt / pytorch-quantization module paths,
    "trt-demo", "site" for our site names in an ONNX, "graph" for Q/DQ placed by the ONNX graph; "+"-joined);
    spec: every site the file gives a range for (forward order, INT8, per tensor, source "qat");
    policy: the flags those sites imply ({"int8", "iln", "imh", "fp16_gemms"}, qat.folder's layout);
    weights: our BertQA state dict when the file carries every weight (an ONNX's initializers, a state dict's
    Hugging Face tensors), else None; weight_amax: per-row weight amax the file gave, by our parameter name
    (checked, not used); sources: site -> the external names that gave its range; notes: what was read but not
    used, and why (also logged)."""

    path: Path
    config: BertConfig
    convention: str
    spec: QuantSpec
    policy: dict[str, Any]
    weights: dict[str, torch.Tensor] | None = None
    weight_amax: dict[str, torch.Tensor] = field(default_factory=dict)
    sources: dict[str, tuple[str, ...]] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    def precision_policy(self, **build_flags: Any) -> PrecisionPolicy:
        return PrecisionPolicy(**{**self.policy, "fp16_gemms": tuple(self.policy["fp16_gemms"]), **build_flags})

    def qat_scales(self) -> ImportedQatScales:
        """As qat.folder.QatScales (spec restricted to the sites of the implied flags, no smoothing)."""
        sites = self.precision_policy().quantized_sites(self.config.num_layers)
        return ImportedQatScales(QuantSpec({s: self.spec.sites[s] for s in sites}, self.spec.weight_format),
                                 dict(self.policy), {}, f"{self.path.name}, {self.convention}")

    def summary(self) -> str:
        """One line for the CLI: what was read and what it implies."""
        return (f"{self.path} ({self.convention}): {len(self.spec.sites)} ranges "
                f"({self.precision_policy().describe()})" + (", weights" if self.weights is not None else "")
                + (f"; {len(self.notes)} notes" if self.notes else ""))


# ---------------------------------------------------------------------------------------------------------------
# Reading

@dataclass
class _Found:
    """One external range: its label (name or ONNX node), role, value (amax; per row for weights)."""

    label: str
    role: Role
    value: torch.Tensor
    convention: str


def read_external_scales(path: str | Path, config: BertConfig, *, strict: bool = False,
                         ignore_unmodelled: bool = False) -> ImportedScales:
    """Read a QAT result made elsewhere: `.onnx` (fake-quant Q/DQ), `.safetensors` or a pickle (modelopt /
    pytorch-quantization or TensorRT demo names). Every problem is one WorkbenchError line naming the file."""
    path = Path(path)
    if not path.is_file():
        raise WorkbenchError(f"{path}: QAT scales file not found")
    if path.suffix == ".onnx":
        found, weights, notes = _read_onnx(path, config)
    else:
        found, weights, notes = _read_state_dict(path, config)
    return _assemble(path, config, found, weights, notes, strict, ignore_unmodelled)


def _one_line(path: Path, what: str, names: Sequence[str], tail: str = "") -> WorkbenchError:
    shown = ", ".join(names[:_SHOWN]) + (f" (+{len(names) - _SHOWN} more)" if len(names) > _SHOWN else "")
    return WorkbenchError(f"{path}: {len(names)} {what}: {shown}{tail}")


def _problems(path: Path, what: str, problems: Sequence[tuple[str, str]]) -> WorkbenchError:
    """One line for (name, problem) pairs: the first problem's names, and how many have others."""
    reason = problems[0][1]
    names = [n for n, r in problems if r == reason]
    others = len(problems) - len(names)
    return _one_line(path, f"{what} ({reason})", names, f"; {others} more with other problems" if others else "")


def _assemble(path: Path, cfg: BertConfig, found: list[_Found], weights: dict[str, torch.Tensor] | None,
              notes: list[str], strict: bool, ignore_unmodelled: bool) -> ImportedScales:
    layers = cfg.num_layers
    problems = []
    primary: dict[str, list[_Found]] = defaultdict(list)
    checks: dict[str, list[_Found]] = defaultdict(list)
    weight_amax: dict[str, list[_Found]] = defaultdict(list)
    unmodelled: list[_Found] = []
    for f in found:
        v = f.value
        if not torch.isfinite(v).all() or (v < 0).any():
            problems.append((f.label, "an amax that is not a finite number >= 0"))
            continue
        if f.role.kind in ("site", "check") and v.numel() != 1:
            problems.append((f.label, "per-channel activation ranges: ours are per tensor"))
            continue
        if f.role.kind == "unmodelled":
            unmodelled.append(f)
        else:
            {"site": primary, "check": checks, "weight": weight_amax}[f.role.kind][f.role.target].append(f)
    if problems:
        raise _problems(path, "ranges cannot be used", problems)
    if unmodelled:
        kinds = sorted({f.role.why for f in unmodelled})
        if not ignore_unmodelled:
            raise _one_line(path, f"quantizers round tensors our engines keep in floating point "
                                  f"({'; '.join(kinds)})", [f.label for f in unmodelled],
                            f"; {IGNORE_FLAG} builds without those roundings")
        notes.append(f"{len(unmodelled)} quantizers of tensors our engines keep in floating point dropped "
                     f"({'; '.join(kinds)})")

    amax: dict[str, float] = {}
    sources: dict[str, tuple[str, ...]] = {}
    for site in all_sites(layers):
        if site not in primary:
            continue
        values = [float(f.value.reshape(())) for f in primary[site]]
        amax[site] = max(values)
        sources[site] = tuple(f.label for f in primary[site])
        if len(set(values)) > 1:
            notes.append(f"{site}: {len(values)} quantizers of this one tensor disagree "
                         f"({', '.join(f'{f.label}={v:.6g}' for f, v in zip(primary[site], values))}): "
                         f"using the largest, {amax[site]:.6g}")
    for site, fs in checks.items():
        for f in fs:
            v = float(f.value.reshape(()))
            if site in amax and v != amax[site]:
                notes.append(f"{f.label}: amax {v:.6g} differs from {amax[site]:.6g}, the range of the same tensor "
                             f"({site}) the engine uses; not used (TensorRT's BERT builder does not read it either)")
    if not amax:
        raise WorkbenchError(f"{path}: no activation ranges (found {len(found)} quantizers, none of a tensor we "
                             "quantize)")
    policy = _implied_policy(amax, layers)
    if not policy.int8:
        raise _one_line(path, "ranges, none of a GEMM input (nothing for --int8 to quantize)", list(amax))
    if strict:
        wanted = list(PrecisionPolicy(int8=True).quantized_sites(layers))
        if any(s.rsplit(".", 1)[1] in ("q", "k", "v", "probs") for s in amax):
            wanted += [s for s in PrecisionPolicy(int8=True, imh=True).quantized_sites(layers) if s not in wanted]
        missing = [s for s in all_sites(layers) if s in wanted and s not in amax]
        if missing:
            raise _one_line(path, "sites have no range (--strict)", missing)
    source = ScaleSource("qat")
    spec = QuantSpec({s: SiteSpec(INT8, amax[s], PER_TENSOR, source) for s in all_sites(layers) if s in amax}, INT8)
    w_amax = _weight_amax(weight_amax, cfg, notes)
    if weights is not None:
        notes.extend(check_weight_amax(w_amax, weights))
    elif w_amax:
        notes.append(f"{len(w_amax)} weight amaxes not used: the build takes each weight row's scale from its own "
                     "max |w|, as TensorRT does")
    for note in notes:
        log.warning("%s: %s", path, note)
    conventions = sorted({f.convention for f in found if f.convention})
    return ImportedScales(path, cfg, "+".join(conventions), spec, policy_flags(policy), weights, w_amax, sources,
                          tuple(notes))


def _implied_policy(amax: Mapping[str, float], layers: int) -> PrecisionPolicy:
    missing = [(i, g) for i in range(layers) for g in GEMMS if _POLICY.gemm_input_site(i, g) not in amax]
    whole = {g for g in GEMMS if all((i, g) in missing for i in range(layers))}
    keep = sorted(whole | {f"layer{i}.{g}" for i, g in missing if g not in whole})
    int8 = len(missing) < layers * len(GEMMS)
    imh = all(f"layer{i}.{s}" in amax for i in range(layers) for s in ("q", "k", "v", "probs", "context"))
    iln = "embeddings.ln_out" in amax and all(f"layer{i}.{s}" in amax for i in range(layers)
                                              for s in ("attn_ln_out", "ffn_ln_out"))
    if not int8:  # ranges of attention outputs only: nothing for --int8 to quantize (the caller refuses it)
        return PrecisionPolicy()
    return PrecisionPolicy(int8=True, iln=iln, imh=imh, fp16_gemms=tuple(keep))


def _weight_amax(found: Mapping[str, list[_Found]], cfg: BertConfig, notes: list[str]) -> dict[str, torch.Tensor]:
    """Per our weight parameter: the per-row amax [out] (QKV assembled from query, key, value; a per-tensor amax
    broadcast over the rows, with a note)."""
    out: dict[str, torch.Tensor] = {}
    per_tensor = 0
    for param, fs in found.items():
        rows = 3 * cfg.hidden_size if param.endswith(".qkv.weight") else \
            cfg.intermediate_size if param.endswith(".fc1.weight") else cfg.hidden_size
        vec = torch.full((rows,), float("nan"))
        for f in fs:
            lo, hi = f.role.rows or (0, rows)
            v = f.value.detach().float().flatten()
            if v.numel() == 1:
                per_tensor += 1
                v = v.expand(hi - lo)
            if v.numel() != hi - lo:
                raise WorkbenchError(f"{f.label}: {v.numel()} weight amaxes for {hi - lo} rows")
            vec[lo:hi] = v
        if not torch.isnan(vec).any():
            out[param] = vec
    if per_tensor:
        notes.append(f"{per_tensor} per-tensor weight amaxes: the build quantizes weights per row (finer)")
    return out


def check_weight_amax(weight_amax: Mapping[str, torch.Tensor], weights: Mapping[str, torch.Tensor]) -> list[str]:
    """Notes on per-row weight amaxes that are not max |w| of their rows (the build uses max |w|): empty when
    every one matches to float32 rounding."""
    off, worst, where = 0, 0.0, ""
    for param, a in weight_amax.items():
        w = weights.get(param)
        if w is None:
            continue
        rowmax = w.detach().float().abs().amax(dim=1)
        rel = ((a.float() - rowmax).abs() / rowmax.clamp_min(1e-30))
        bad = int((rel > 1e-6).sum())
        if bad:
            off += 1
            if float(rel.max()) > worst:
                worst, where = float(rel.max()), param
    if not off:
        return []
    return [f"{off} GEMM weights have rows whose amax is not their max |w| (largest relative difference "
            f"{worst:.3g}, {where}): the build rounds each row with its own max |w|, as TensorRT does"]


# --- state dicts

def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise WorkbenchError(f"{path}: unreadable safetensors file ({e})") from None
    if path.suffix not in PICKLE_SUFFIXES:
        raise WorkbenchError(f"{path}: expected .safetensors, .onnx or a pickle ({', '.join(PICKLE_SUFFIXES)})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for bad or unsafe pickles
        raise WorkbenchError(f"{path}: cannot load with weights_only=True ({type(e).__name__}: {e})") from None
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WorkbenchError(f"{path}: expected a state dict of tensors (or a checkpoint with one under 'model')")
    return state


def _hf_parameter_names(cfg: BertConfig) -> dict[str, str]:
    """Hugging Face parameter name (with and without "bert.") -> the canonical one."""
    names = {n: n for ns in hf_names(cfg).values() for n in ns}
    # NVIDIA's BERT (DeepLearningExamples, its QAT checkpoints) fuses FC1's bias and GELU: intermediate.dense_act
    names.update({n.replace(".intermediate.dense.", ".intermediate.dense_act."): n for n in list(names)
                  if ".intermediate.dense." in n})
    names.update({n.removeprefix("bert."): c for n, c in list(names.items()) if n.startswith("bert.")})
    return names


_IGNORED_PARAMS = re.compile(r"(module\.)?(bert\.)?(embeddings\.position_ids|pooler\..+)")


def _read_state_dict(path: Path, cfg: BertConfig) -> tuple[list[_Found], dict[str, torch.Tensor] | None, list[str]]:
    state = _load_tensors(path)
    hf = _hf_parameter_names(cfg)
    ours = _our_parameter_names(cfg)
    found, unknown, params, trt_weights = [], [], {}, 0
    for name, tensor in state.items():
        bare = name.removeprefix("module.")
        known = external_role(name, cfg)
        if known is not None:
            found.append(_Found(name, known[0], tensor.detach().float(), known[1]))
        elif bare in hf:
            params[hf[bare]] = tensor
        elif bare in ours:
            params[bare] = tensor
        elif _TRT_WEIGHT.fullmatch(name):
            trt_weights += 1
        elif not _IGNORED_PARAMS.fullmatch(name):
            unknown.append(name)
    if unknown:
        raise _one_line(path, f"names map to no site or weight of this {cfg.num_layers}-layer BERT", unknown)
    notes = []
    if trt_weights:
        notes.append(f"{trt_weights} weights in TensorRT-demo names not read (their layout depends on the "
                     "checkpoint they were converted from)")
    return found, _weights(params, cfg, notes), notes


def _our_parameter_names(cfg: BertConfig) -> set[str]:
    with torch.device("meta"):
        return set(BertQA(cfg).state_dict())


def _weights(params: Mapping[str, torch.Tensor], cfg: BertConfig, notes: list[str]) -> dict[str, torch.Tensor] | None:
    """Our state dict from Hugging Face and/or our parameter names when every weight is there (else None + note)."""
    if not params:
        return None
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in BertQA(cfg).state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    missing = []
    for ours, theirs in hf_names(cfg).items():
        if ours in params:
            out[ours] = params[ours].detach().float()
        elif all(t in params for t in theirs):
            parts = [params[t].detach().float() for t in theirs]
            out[ours] = torch.cat(parts, 0) if len(parts) > 1 else parts[0]
        else:
            missing.append(ours)
            continue
        if tuple(out[ours].shape) != shapes[ours]:
            notes.append(f"weights not imported: {ours} has shape {list(out[ours].shape)}, the config implies "
                         f"{list(shapes[ours])}")
            return None
    if missing:
        notes.append(f"weights not imported: {len(missing)} of {len(shapes)} parameters missing ({missing[0]}, ...)")
        return None
    return out


# --- fake-quant ONNX

_TRANSPARENT = {"Identity", "Cast", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Dropout", "Flatten"}
_SITE_IN_NAME = re.compile(r"(embeddings\.ln_out|layer\d+\.(?:q|k|v|probs|context|attn_ln_out|fc2_in|ffn_ln_out))"
                           r"(?![A-Za-z0-9])")
_QUANTIZER_IN_PATH = re.compile(r"(.*?[^/.]*quantizer)(?:[/.].*)?$")


def amax_for_scale(scale: float, fmt: QuantFormat = INT8) -> tuple[float, bool]:
    """An amax whose scale (quant.quantizer.scale_from_amax: float32(amax) / qmax in float32) is exactly `scale`
    rounded to float32, and whether one exists (about 1 float32 scale in 127 is no float32 amax / 127: then the
    nearest, one float32 step off)."""
    s = np.float32(scale)
    a = np.float32(s * np.float32(fmt.qmax))
    candidates = [a]
    up = down = a
    for _ in range(4):
        up, down = np.nextafter(up, np.float32(np.inf)), np.nextafter(down, np.float32(0))
        candidates += [down, up]
    for c in candidates:
        if np.float32(scale_from_amax(float(c), fmt)) == s:
            return float(c), True
    return float(a), False


def _read_onnx(path: Path, cfg: BertConfig) -> tuple[list[_Found], dict[str, torch.Tensor] | None, list[str]]:
    """A fake-quant ONNX file's ranges (one per Q/DQ node) and weights, placed on our sites and parameters."""
    g = _OnnxGraph(_load_onnx(path).graph, cfg)
    r = _QdqReading(values=dict(g.consts))  # values: plus weights stored as INT8 codes, dequantized
    for node in g.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            _read_qdq(g, node, r)
    if r.problems:
        raise _problems(path, "Q/DQ nodes cannot be used", r.problems)
    if r.unknown:
        raise _one_line(path, "QuantizeLinear nodes read no tensor we can place (no site or quantizer name, no "
                              "GEMM weight or attention producer found)", r.unknown)
    params = _onnx_params(g, r.values)
    for name, (scale, rows, label) in r.weight_scales.items():
        param, _ = g.to_ours[name]
        per_row = torch.from_numpy(scale.astype(np.float64) * INT8.qmax).float().flatten()
        r.found.append(_Found(label, Role("weight", param, rows), per_row, ""))
    weights = _weights(params, cfg, r.notes)
    return r.found, weights, r.notes


def _load_onnx(path: Path) -> Any:
    """The ONNX model in `path`, a damaged file being one WorkbenchError line."""
    import onnx
    try:
        return onnx.load(str(path))
    except Exception as e:  # protobuf and onnx raise several types for a damaged file
        raise WorkbenchError(f"{path}: unreadable ONNX file ({type(e).__name__}: {e})") from None


@dataclass
class _QdqReading:
    """What reading an ONNX file's Q/DQ nodes has gathered so far, so each node can be read by its own function."""

    found: list[_Found] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)
    weight_scales: dict[str, tuple[np.ndarray, tuple[int, int] | None, str]] = field(default_factory=dict)
    values: dict[str, np.ndarray] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


_ONWARD, _NOT_HERE = object(), object()  # a forward walk's non-answers: follow the user's outputs / pass it by


class _OnnxGraph:
    """An ONNX graph indexed for walking (constants, producers, users) and named in our parameters."""

    def __init__(self, graph: Any, cfg: BertConfig) -> None:
        """Index `graph` once, so the walks below are lookups rather than scans of every node."""
        from onnx import numpy_helper
        self.graph, self.cfg = graph, cfg
        self.consts: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        for node in graph.node:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                self.consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        self.producer = {out: node for node in graph.node for out in node.output}
        self.users: dict[str, list] = defaultdict(list)
        for node in graph.node:
            for x in node.input:
                self.users[x].append(node)
        self.hf = _hf_parameter_names(cfg)
        self.to_ours = _parameter_owner(cfg)          # HF or our parameter name -> (our parameter, rows)
        self.softmaxes = [n for n in graph.node if n.op_type == "Softmax"]

    def _first_behind(self, name: str, wanted: Mapping[str, Any]) -> str | None:
        """The first name in `wanted` along weight Q/DQ, Transpose and the like (8 steps at most), else None."""
        for _ in range(8):
            if name in wanted:
                return name
            node = self.producer.get(name)
            if node is None or node.op_type not in _TRANSPARENT | {"QuantizeLinear", "DequantizeLinear"}:
                return None
            name = node.input[0]
        return None

    def weight_behind(self, name: str) -> str | None:
        """The parameter a GEMM operand is: the first name behind it that names one of ours (HF or ours), else None."""
        return self._first_behind(name, self.to_ours)

    def constant_behind(self, name: str) -> bool:
        """Whether a tensor is a constant seen through Q/DQ and the like (a weight's Q/DQ pair reads one)."""
        return self._first_behind(name, self.consts) is not None

    def _first_ahead(self, name: str, steps: int, look: Callable[[str, Any], Any]) -> Any:
        """The first answer of `look(tensor, user)` walking forward from `name`, breadth first; None if none."""
        frontier = [name]
        for _ in range(steps):
            nxt = []
            for t in frontier:
                for u in self.users.get(t, []):
                    answer = look(t, u)
                    if answer is _ONWARD:
                        nxt.extend(u.output)
                    elif answer is not _NOT_HERE:
                        return answer
            frontier = nxt
        return None

    def stored_transposed(self, name: str) -> bool | None:
        """Whether a weight is stored [in, out] (x @ W), from how the graph uses it; None: not used by a GEMM."""
        return self._first_ahead(name, 6, self._transposed_use)

    @staticmethod
    def _transposed_use(t: str, u: Any) -> Any:
        """For stored_transposed: whether user `u` reads weight `t` as [in, out], or where the walk goes on."""
        if u.op_type == "MatMul":
            return u.input[1] == t
        if u.op_type == "Gemm":
            trans_b = next((a.i for a in u.attribute if a.name == "transB"), 0)
            return u.input[1] == t and not trans_b
        if u.op_type == "Transpose":
            return False
        return _ONWARD if u.op_type in ("QuantizeLinear", "DequantizeLinear", "Identity", "Cast") else _NOT_HERE

    def smoothed_ahead(self, x: str) -> bool:
        """A per-channel Mul (a smoothing vector) right ahead of the quantizer, past a clamp."""
        consts = self.consts
        node = self.producer.get(x)
        if node is not None and node.op_type in ("Max", "Min", "Clip"):
            node = self.producer.get(next((i for i in node.input if i not in consts), ""))
        return node is not None and node.op_type in ("Mul", "Div") and \
            any(i in consts and consts[i].size > 1 for i in node.input)

    def gemm_site(self, dq_out: str) -> str | None:
        """The site of the GEMM input a DQ output feeds, told by the weight on the GEMM's other side; else None."""
        return self._first_ahead(dq_out, 4, self._gemm_use)

    def _gemm_use(self, t: str, node: Any) -> Any:
        """For gemm_site: the site when `node` is a GEMM with one of our weights opposite `t`, or where to go on."""
        if node.op_type in ("MatMul", "Gemm"):
            other = node.input[1] if node.input[0] == t else node.input[0]
            owner = self.to_ours.get(self.weight_behind(other) or "")
            return _NOT_HERE if owner is None else _gemm_input_of(owner[0], self.cfg)
        return _ONWARD if node.op_type in _TRANSPARENT else _NOT_HERE

    def produced_site(self, x: str) -> str | None:
        """The site of a tensor told by what produced it (a Softmax, a q/k/v projection, a LayerNorm); else None."""
        for _ in range(8):
            node = self.producer.get(x)
            if node is None:
                return None
            if node.op_type in _TRANSPARENT:
                x = node.input[0]
                continue
            if node.op_type == "Softmax":
                if len(self.softmaxes) == self.cfg.num_layers:
                    return f"layer{self.softmaxes.index(node)}.probs"
                return None
            for operand in node.input:
                owner = self.to_ours.get(self.weight_behind(operand) or "")
                if owner is not None:
                    site = _site_produced_with(owner, node.op_type, self.cfg)
                    if site is not None:
                        return site
            return None
        return None


def _site_produced_with(owner: tuple[str, tuple[int, int] | None], op_type: str, cfg: BertConfig) -> str | None:
    """The site a node of `op_type` produces when it reads parameter `owner` (q/k/v, a LayerNorm out), else None."""
    param, rows = owner
    m = re.fullmatch(r"layers\.(\d+)\.(\w+)\.(weight|bias)", param)
    if m and m.group(2) == "qkv" and rows is not None and op_type in ("Add", "MatMul", "Gemm"):
        return f"layer{m.group(1)}.{'qkv'[rows[0] // cfg.hidden_size]}"
    if m and m.group(2) in ("ln1", "ln2") and op_type == "LayerNormalization":
        return f"layer{m.group(1)}.{'attn_ln_out' if m.group(2) == 'ln1' else 'ffn_ln_out'}"
    if param.startswith("embeddings.ln.") and op_type == "LayerNormalization":
        return "embeddings.ln_out"
    return None


def _named_role(names: Iterable[str], cfg: BertConfig) -> tuple[Role, str] | None:
    """The role one of `names` gives by name: a site name in it first, then a quantizer's name or path."""
    names = [n for n in names if n]
    for n in names:
        m = _SITE_IN_NAME.search(n)
        if m:
            return _site(m.group(1)), "site"
    for n in names:
        path_like = n.strip("/").replace("/", ".")
        m = _QUANTIZER_IN_PATH.fullmatch(path_like)
        for candidate in (path_like, (m.group(1) + ".amax") if m else ""):
            known = external_role(candidate, cfg) if candidate else None
            if known is not None:
                return known
    return None


def _read_qdq(g: _OnnxGraph, node: Any, r: _QdqReading) -> None:
    """One Q/DQ node into `r`: a problem, a weight's INT8 codes or scale, or an activation's range."""
    label = node.name or f"{node.op_type}({node.input[0]})"
    scale = _symmetric_int8_scale(g, node, label, r.problems)
    if scale is None:
        return
    x = node.input[0]
    if node.op_type == "DequantizeLinear":
        if x in g.consts:  # weights stored as INT8 codes
            _read_int8_codes(g, node, scale, label, r)
        return
    if g.constant_behind(x):  # a weight's Q/DQ pair
        name = g.weight_behind(x)
        if name is not None:
            r.weight_scales[name] = (scale.astype(np.float32), g.to_ours[name][1], label)
        return
    _read_activation(g, node, scale, label, r)


def _symmetric_int8_scale(g: _OnnxGraph, node: Any, label: str, problems: list[tuple[str, str]]) -> np.ndarray | None:
    """A Q/DQ node's scale when it is a constant and the node symmetric INT8; else None, the problem noted."""
    import onnx
    consts = g.consts
    scale = consts.get(node.input[1]) if len(node.input) > 1 else None
    zp = consts.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if scale is None:
        problems.append((label, "a scale that is not a constant"))
        return None
    out_type = next((a.i for a in node.attribute if a.name == "output_dtype"), 0)
    int8 = (zp is not None and zp.dtype == np.int8) or (zp is None and out_type == onnx.TensorProto.INT8) or \
        (node.op_type == "DequantizeLinear" and node.input[0] in consts and consts[node.input[0]].dtype == np.int8)
    if not int8 or (zp is not None and np.any(zp != 0)):
        problems.append((label, "not symmetric INT8: an int8 zero point 0 is"))
        return None
    return scale


def _read_int8_codes(g: _OnnxGraph, node: Any, scale: np.ndarray, label: str, r: _QdqReading) -> None:
    """A weight an export keeps only as INT8 codes behind a DequantizeLinear: dequantized, its scale kept."""
    x = node.input[0]
    axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
    codes = g.consts[x].astype(np.float32)
    s = scale.astype(np.float32)
    if s.size > 1:
        shape = [1] * codes.ndim
        shape[axis] = s.size
        s = s.reshape(shape)
    name = next((n for n in (node.output[0], x) if n in g.to_ours), None)
    if name is not None:
        r.values[name] = codes * s
        r.weight_scales[name] = (scale.astype(np.float32), g.to_ours[name][1], label)


def _read_activation(g: _OnnxGraph, node: Any, scale: np.ndarray, label: str, r: _QdqReading) -> None:
    """An activation QuantizeLinear: its amax on the site it reads, or a problem / unknown label in `r`."""
    x = node.input[0]
    if scale.size != 1:
        r.problems.append((label, "per-channel activation scales: ours are per tensor"))
        return
    if g.smoothed_ahead(x):
        r.problems.append((label, "smoothed sites, a per-channel Mul ahead of the quantizer: smoothing vectors "
                                  "are not imported"))
        return
    known = _activation_role(g, node)
    if known is None:
        r.unknown.append(label)
        return
    amax, exact = amax_for_scale(float(scale.reshape(())))
    if not exact:
        r.notes.append(f"{label}: scale {float(scale.reshape(())):.9g} is no float32 amax / 127; the nearest is "
                       "one float32 step off")
    r.found.append(_Found(label, known[0], torch.tensor(amax, dtype=torch.float64), known[1]))


def _activation_role(g: _OnnxGraph, node: Any) -> tuple[Role, str] | None:
    """Which site a QuantizeLinear reads: by the names around it, else by the graph (its GEMM or producer)."""
    x = node.input[0]
    dq_outs = [u.output[0] for u in g.users.get(node.output[0], []) if u.op_type == "DequantizeLinear"]
    dq_names = [u.name for u in g.users.get(node.output[0], []) if u.op_type == "DequantizeLinear"]
    known = _named_role([x, node.name, node.input[1], *dq_outs, *dq_names], g.cfg)
    if known is None:
        site = next((s for s in (g.gemm_site(o) for o in dq_outs) if s), None) or g.produced_site(x)
        known = (_site(site), "graph") if site else None
    return known


def _onnx_params(g: _OnnxGraph, values: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """The float weights among the graph's values, by parameter name, turned [out, in] where stored [in, out]."""
    params: dict[str, torch.Tensor] = {}
    for name, value in values.items():
        if name not in g.to_ours or not np.issubdtype(value.dtype, np.floating):
            continue
        if value.ndim == 2 and g.stored_transposed(name):
            value = value.T
        params[g.hf.get(name, g.to_ours[name][0])] = torch.from_numpy(np.array(value, dtype=np.float32))
    return params


def _parameter_owner(cfg: BertConfig) -> dict[str, tuple[str, tuple[int, int] | None]]:
    """Hugging Face (with and without "bert.", dense_act for FC1) and our parameter names (also as "layer3.fc1.weight"
    for "layers.3.fc1.weight") -> (our parameter, rows of it)."""
    h = cfg.hidden_size
    owner: dict[str, tuple[str, tuple[int, int] | None]] = {}
    for ours, theirs in hf_names(cfg).items():
        owner[ours] = owner[re.sub(r"^layers\.(\d+)\.", r"layer\1.", ours)] = (ours, None)
        for n, name in enumerate(theirs):
            owner[name] = (ours, (n * h, n * h + h) if len(theirs) > 1 else None)
    for alias, canonical in _hf_parameter_names(cfg).items():
        owner[alias] = owner[canonical]
    return owner


def _gemm_input_of(param: str, cfg: BertConfig) -> str | None:
    if param.startswith("qa."):
        return f"layer{cfg.num_layers - 1}.ffn_ln_out"
    m = re.fullmatch(r"layers\.(\d+)\.(qkv|attn_out|fc1|fc2)\.(weight|bias)", param)
    return _POLICY.gemm_input_site(int(m.group(1)), m.group(2)) if m else None


# ---------------------------------------------------------------------------------------------------------------
# For the build

def scales_for_build(path: str | Path, loaded: LoadedModel, policy: PrecisionPolicy, strict: bool = False, *,
                     ignore_unmodelled: bool = False) -> ImportedQatScales:
    """The ranges of a QAT result made elsewhere as engines.build takes them (a QatScales): read (strict with
    `strict` or the build's --strict), checked against the build — every site `policy` quantizes has a range,
    the file's weights (if it has them) are the model's, its weight amaxes are compared with the model's rows —
    each failure one line naming the file."""
    path = Path(path)
    imported = read_external_scales(path, loaded.config, strict=strict or policy.strict,
                                    ignore_unmodelled=ignore_unmodelled)
    layers = loaded.config.num_layers
    missing = [s for s in policy.quantized_sites(layers) if s not in imported.spec.sites]
    if missing:
        raise WorkbenchError(f"{path}: no range for {missing[0]} ({len(missing)} sites {policy.describe()} "
                             f"quantizes): it was quantized for {imported.precision_policy().describe()}; build "
                             "with those flags (or fewer)")
    state = loaded.model.state_dict()
    if imported.weights is not None:
        worst, where = 0.0, ""
        for name, w in imported.weights.items():
            ref = state[name].detach().float()
            diff = float((w - ref).abs().max()) / max(float(ref.abs().max()), 1e-30)
            if diff > worst:
                worst, where = diff, name
        if worst > 1e-3:
            raise WorkbenchError(f"{path}: its weights are not {loaded.source}'s ({where} differs by {worst:.3g} "
                                 "of its largest value): build from the weights the ranges were trained with "
                                 "(qat.imports.write_qat_folder makes a model folder of them)")
        if worst > 0:
            log.warning("%s: its weights differ from %s's by up to %.3g (relative; e.g. FP16 storage): the build "
                        "uses %s's", path, loaded.source, worst, loaded.source)
    for note in check_weight_amax(imported.weight_amax, state) if imported.weights is None else []:
        log.warning("%s: %s", path, note)
    return imported.qat_scales()


def write_qat_folder(imported: ImportedScales, folder: str | Path, model: BertQA | None = None,
                     source_dir: str | Path | None = None) -> Path:
    """An imported QAT result as our QAT folder (Hugging Face layout + quant_spec.json, qat/folder.py): the
    weights are the file's own, else `model`'s; config and tokenizer files from `source_dir`. `cli.py build
    --model FOLDER --int8` then takes its scales like any QAT folder's."""
    if imported.weights is None and model is None:
        raise WorkbenchError(f"{imported.path}: carries no weights: give the model its ranges were trained with")
    if imported.weights is not None:
        model = BertQA(imported.config)
        model.load_state_dict(imported.weights)
    folder = save_model_folder(folder, model, source_dir)
    save_qat_scales(folder, imported.qat_scales(), {"imported_from": str(imported.path),
                                                    "names": imported.convention})
    return Path(folder)



# ---------------------------------------------------------------------------------------------------------------
# `python -m qat.imports FILE --model DIR [-o QATDIR]`: what a file holds, or an imported result as our QAT folder

def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    from common.errors import exit_status, warnings_to_stderr
    from model.checkpoint import load_model

    p = argparse.ArgumentParser(prog="python -m qat.imports", description="Read a QAT result made elsewhere "
                                "(modelopt / pytorch-quantization / TensorRT-demo names, or a fake-quant ONNX).")
    p.add_argument("file")
    p.add_argument("--model", required=True, help="model folder (or preset) giving the config and weights")
    p.add_argument("--strict", action="store_true", help="every --int8 site must have a range")
    p.add_argument("--ignore-unmodelled", action="store_true",
                   help="drop quantizers of tensors our engines keep in floating point instead of refusing")
    p.add_argument("-o", "--output", help="write a QAT folder (weights + quant_spec.json) here")
    args = p.parse_args(argv)
    warnings_to_stderr("qat")

    def work() -> None:
        loaded = load_model(args.model)
        imported = read_external_scales(args.file, loaded.config, strict=args.strict,
                                        ignore_unmodelled=args.ignore_unmodelled)
        print(imported.summary())
        if args.output:
            out = write_qat_folder(imported, args.output, loaded.model, loaded.model_dir)
            print(f"wrote {out} (build it with `cli.py build --model {out} --int8 ...`)")
    return exit_status(work)


if __name__ == "__main__":
    raise SystemExit(main())
