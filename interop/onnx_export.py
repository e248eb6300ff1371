"""A build as explicit-quantization ONNX: QuantizeLinear/DequantizeLinear at exactly the build's sites.

The graph is written node by node (onnx.helper) from the reference BERT's weights, mirroring model/bert.py op for
op, rather than traced by torch.onnx: the TorchScript exporter is deprecated and the dynamo one needs onnxscript,
and writing it directly lets every tensor carry the name we need (no renaming pass, no exporter-specific
symbolics for Q/DQ). What it holds:

    inputs   input_ids, segment_ids, input_mask: int32 [batch, sequence] (the TensorRT BERT demo's names)
    outputs  start_logits, end_logits: float32 [batch, sequence]
    tensors  every tap site of model/bert.py under its own name (`embeddings.ln_out`, `layer3.fc2_in`, ...), in
             every export, INT8 or not: the names of calib/trt_cache.py's TensorRT calibration cache, so the FP
             export plus that cache also drives TensorRT's implicit quantization.
    mask     padding keys' scores get -10000 (the reference adds float32's lowest: the same softmax, see graph())

Quantization (the build's QuantSpec, quant/spec.py; the function of quant.fakequant.fake_quant_model):

    site S quantized     S -> QuantizeLinear(scale, zero point 0) -> S.quantized -> DequantizeLinear -> S.dequantized
                         scale = SiteSpec.scale = float32(amax / 127), a scalar (per tensor)
    smoothed site        S -> Mul(1 / s) -> S.smoothed -> Q -> DQ: the codes of x / s (quant/smoothing.py); a GEMM
                         reading it has W * s in its weights; where the site is rounded for every consumer
                         (-iln), the others read S.dequantized * s (S.rounded)
    -imh / -iln sites    every consumer reads S.dequantized (or S.rounded): rounded where produced
    --int8 alone         only the GEMM reads S.dequantized; the residual stream reads S
    quantized GEMM       weights stored as codes [in, out] (int8) with per-output-channel scales (DequantizeLinear
                         axis=1) from quant.quantizer.weight_scales of W (or W * s), then MatMul, Add(bias)
    the rest             FP32 (the engine's GELU: the tanh form under --int8/--fp16, erf for FP32)

The FP16 export is this FP32 graph with the FP16 engine's tanh GELU and `precision: fp16` in its metadata: a
TensorRT build (interop/tensorrt_backend.py) runs it in FP16 from the builder flag, as TensorRT's own BERT ONNX
flow does.

How the ONNX rounding differs from ours (quant/quantizer.py), and why the match is within a tolerance, not exact:
QuantizeLinear divides (round_half_even(x / scale), as ONNX specifies and ONNX Runtime computes it) where we
multiply by the float32 reciprocal (x * float32(1/scale)); the two differ by an ulp, so about one value in 10^6 near
a .5 boundary gets the neighbouring code. INT8 QuantizeLinear saturates to [-128, 127] (TensorRT's Q layer
likewise), ours to [-127, 127]: a negative value beyond the calibrated range (-127.5 * scale or below) becomes
-128 there and -127 here; inside the calibrated range the codes are the same. With smoothing, x / s is a float32
Mul before the division, where we multiply once by float32(1 / (s * scale)). `symmetric_clamp=True` puts a
Max(x, -127 scale) (`S.clamped`) ahead of each INT8 QuantizeLinear, so the codes are ours to the ulp: the export
then answers like our INT8 engine (ONNX Runtime on the shared MiniLM: the same answers to 60 dev questions),
at one elementwise op a site; off (the default) it is the plain Q/DQ pattern TensorRT fuses.
"""
from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from common.errors import WorkbenchError
from common.files import atomic_path, check_writable_dir
from model.checkpoint import LoadedModel
from quant.formats import FP8_E4M3, INT8, QuantFormat
from quant.policy import PrecisionPolicy
from quant.quantizer import quantize, weight_scales
from quant.smoothing import smoothed_weight
from quant.spec import QuantSpec

OPSET = 17                  # LayerNormalization is a single op from 17 on; FP8 Q/DQ needs 19
INPUTS = ("input_ids", "segment_ids", "input_mask")
OUTPUTS = ("start_logits", "end_logits")
DYNAMIC_AXES = ("batch", "sequence")
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json")
METADATA_PREFIX = "workbench."
PRODUCER = "bert-int8-workbench"
MASK_BIAS = -10000.0         # added to the scores of padding keys
_TANH_C = 0.7978845608028654   # sqrt(2 / pi)
_SQRT1_2 = 0.7071067811865476  # 1 / sqrt(2)


@dataclass
class _Graph:
    """Nodes and initializers under construction; every tensor name is unique."""

    opset: int
    nodes: list = field(default_factory=list)
    initializers: list = field(default_factory=list)
    names: set = field(default_factory=set)
    _count: int = 0

    def fresh(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def _claim(self, name: str) -> str:
        if name in self.names:
            raise AssertionError(f"tensor name {name} used twice")
        self.names.add(name)
        return name

    def const(self, name: str, value: np.ndarray | torch.Tensor, dtype: np.dtype | None = None) -> str:
        from onnx import numpy_helper

        if isinstance(value, torch.Tensor):
            value = _numpy(value)
        array = np.asarray(value, dtype=dtype) if dtype is not None else np.asarray(value)
        self.initializers.append(numpy_helper.from_array(array, self._claim(name)))
        return name

    def scalar(self, value: float, hint: str = "const") -> str:
        return self.const(self.fresh(hint), np.array(value, dtype=np.float32))

    def ints(self, values, hint: str = "shape") -> str:
        return self.const(self.fresh(hint), np.array(values, dtype=np.int64))

    def op(self, op_type: str, inputs: list[str], out: str | None = None, **attrs: Any) -> str:
        from onnx import helper

        out = self._claim(out or self.fresh(op_type.lower()))
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=f"{op_type}:{out}", **attrs))
        return out


def _numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.float8_e4m3fn:
        import ml_dtypes

        return t.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn)
    return t.numpy()


def _zero_point(g: _Graph, name: str, fmt: QuantFormat, shape: tuple[int, ...] = ()) -> str:
    """Zero point 0 of the format's type: it also sets QuantizeLinear's output type."""
    if fmt.name == INT8.name:
        return g.const(name, np.zeros(shape, dtype=np.int8))
    if fmt.name == FP8_E4M3.name:
        if g.opset < 19:
            raise WorkbenchError(f"FP8 Q/DQ nodes need --opset 19 or later (asked for {g.opset})")
        return g.const(name, torch.zeros(shape, dtype=torch.float8_e4m3fn))
    raise WorkbenchError(f"ONNX export: no ONNX type for the quantization format {fmt.name}")


class _Exporter:
    """The reference forward (model/bert.py) written as ONNX nodes, with the build's Q/DQ."""

    def __init__(self, loaded: LoadedModel, policy: PrecisionPolicy, spec: QuantSpec,
                 smooth: Mapping[str, torch.Tensor], opset: int, symmetric_clamp: bool = False):
        self.model, self.cfg, self.policy, self.spec = loaded.model.float().eval(), loaded.config, policy, spec
        self.symmetric_clamp = symmetric_clamp
        self.smooth = {k: v.detach().float().cpu() for k, v in smooth.items() if k in spec.sites}
        self.g = _Graph(opset)

    # ------------------------------------------------------------------------------------------ quantization
    def site(self, name: str, tensor: str) -> tuple[str, str | None]:
        """`tensor` (already named `name`) at a tap site: (what the forward continues with, what a quantized GEMM
        reading this site reads; None when the site is not quantized)."""
        g, site = self.g, self.spec.sites.get(name)
        if site is None:
            return tensor, None
        s = self.smooth.get(name)
        x = tensor
        if s is not None:
            inv = g.const(f"{name}.smooth_inv", (1.0 / s).float())
            x = g.op("Mul", [tensor, inv], f"{name}.smoothed")
        scale = g.const(f"{name}.scale", np.array(site.scale, dtype=np.float32))
        if self.symmetric_clamp and site.format.integer:
            low = np.float32(-site.format.qmax) * np.float32(site.scale)  # -127 scale: rounds to code -127
            x = g.op("Max", [x, g.const(f"{name}.low", np.array(low, dtype=np.float32))], f"{name}.clamped")
        zero = _zero_point(g, f"{name}.zero_point", site.format)
        codes = g.op("QuantizeLinear", [x, scale, zero], f"{name}.quantized")
        y = g.op("DequantizeLinear", [codes, scale, zero], f"{name}.dequantized")
        if not self.policy.rounded_where_produced(name):
            return tensor, y
        if s is None:
            return y, y
        return g.op("Mul", [y, g.const(f"{name}.smooth", s.float())], f"{name}.rounded"), y

    def linear(self, prefix: str, module: torch.nn.Linear, x: str, x_quantized: str | None,
               layer: int | None = None, gemm: str | None = None, out: str | None = None) -> str:
        """MatMul + Add: a quantized GEMM reads `x_quantized` and DequantizeLinear(codes of W [* s]), per output
        channel; an FP GEMM reads `x` and W^T."""
        g = self.g
        quantized = layer is not None and self.policy.quantizes_gemm(layer, gemm)
        if quantized:
            site = self.policy.gemm_input_site(layer, gemm)
            if x_quantized is None:
                raise AssertionError(f"{prefix}: quantized GEMM without a quantized input {site}")
            fmt = self.spec.weight_format
            w = smoothed_weight(module.weight.detach().float(), self.smooth.get(site))
            scales = weight_scales(w, fmt)                                  # [out, 1]
            codes = g.const(f"{prefix}.weight_quantized", quantize(w, scales, fmt).t().contiguous())
            scale = g.const(f"{prefix}.weight_scale", scales[:, 0].contiguous())
            zero = _zero_point(g, f"{prefix}.weight_zero_point", fmt, (w.shape[0],))
            weight = g.op("DequantizeLinear", [codes, scale, zero], f"{prefix}.weight", axis=1)
            y = g.op("MatMul", [x_quantized, weight], f"{prefix}.matmul")
        else:
            weight = g.const(f"{prefix}.weight", module.weight.detach().float().t().contiguous())
            y = g.op("MatMul", [x, weight], f"{prefix}.matmul")
        return g.op("Add", [y, g.const(f"{prefix}.bias", module.bias.detach().float())], out or f"{prefix}.out")

    # ----------------------------------------------------------------------------------------------- forward
    def layer_norm(self, prefix: str, module: torch.nn.LayerNorm, x: str, out: str) -> str:
        return self.g.op("LayerNormalization", [x, self.g.const(f"{prefix}.weight", module.weight.detach().float()),
                                                self.g.const(f"{prefix}.bias", module.bias.detach().float())],
                         out, axis=-1, epsilon=float(module.eps))

    def gelu(self, prefix: str, x: str, out: str) -> str:
        """BERT's erf GELU for FP32 builds; the tanh form (model.bert.gelu_tanh) for FP16 and INT8 builds, written
        as 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))): the pattern TensorRT and ONNX Runtime fuse."""
        g, op = self.g, self.g.op
        if self.policy.gelu_tanh:
            cube = op("Mul", [op("Mul", [x, x]), x])
            inner = op("Add", [x, op("Mul", [cube, g.scalar(0.044715)])])
            t = op("Tanh", [op("Mul", [inner, g.scalar(_TANH_C)])])
            return op("Mul", [op("Mul", [x, g.scalar(0.5)]), op("Add", [t, g.scalar(1.0)])], out)
        e = op("Erf", [op("Mul", [x, g.scalar(_SQRT1_2)])])
        return op("Mul", [op("Mul", [x, g.scalar(0.5)]), op("Add", [e, g.scalar(1.0)])], out)

    def encoder_layer(self, i: int, x: str, x_q: str | None, mask_bias: str) -> tuple[str, str | None]:
        g, op, cfg, layer = self.g, self.g.op, self.cfg, self.model.layers[i]
        p, n, d, h = f"layer{i}", cfg.num_heads, cfg.head_dim, cfg.hidden_size
        qkv = self.linear(f"{p}.qkv", layer.qkv, x, x_q, i, "qkv")
        heads = op("Transpose", [op("Reshape", [qkv, g.ints([0, 0, 3, n, d])])], f"{p}.heads",
                   perm=[2, 0, 3, 1, 4])                                                 # [3, B, N, S, D]
        q, k, v = (self.site(f"{p}.{t}", op("Gather", [heads, g.const(g.fresh("index"), np.array(j))],
                                            f"{p}.{t}", axis=0))[0] for j, t in enumerate("qkv"))
        scores = op("MatMul", [q, op("Transpose", [k], f"{p}.k_t", perm=[0, 1, 3, 2])], f"{p}.qk")
        scores = op("Add", [op("Mul", [scores, g.scalar(1.0 / math.sqrt(d))]), mask_bias], f"{p}.scores")
        probs, _ = self.site(f"{p}.probs", op("Softmax", [scores], f"{p}.probs", axis=-1))
        ctx = op("Transpose", [op("MatMul", [probs, v], f"{p}.pv")], f"{p}.pv_t", perm=[0, 2, 1, 3])
        context, context_q = self.site(f"{p}.context", op("Reshape", [ctx, g.ints([0, 0, h])], f"{p}.context"))
        attn = self.linear(f"{p}.attn_out", layer.attn_out, context, context_q, i, "attn_out")
        x, x_q = self.site(f"{p}.attn_ln_out", self.layer_norm(f"{p}.ln1", layer.ln1, op("Add", [x, attn]),
                                                                f"{p}.attn_ln_out"))
        ffn = self.gelu(p, self.linear(f"{p}.fc1", layer.fc1, x, x_q, i, "fc1"), f"{p}.fc2_in")
        ffn, ffn_q = self.site(f"{p}.fc2_in", ffn)
        out = self.linear(f"{p}.fc2", layer.fc2, ffn, ffn_q, i, "fc2")
        return self.site(f"{p}.ffn_ln_out", self.layer_norm(f"{p}.ln2", layer.ln2, op("Add", [x, out]),
                                                             f"{p}.ffn_ln_out"))

    def graph(self):
        from onnx import TensorProto, helper

        g, op, m = self.g, self.g.op, self.model
        for name in INPUTS:
            g.names.add(name)
        emb = m.embeddings
        words = op("Gather", [g.const("embeddings.word.weight", emb.word.weight.float()), "input_ids"],
                   "embeddings.word", axis=0)
        seq = op("Slice", [op("Shape", ["input_ids"]), g.ints([1]), g.ints([2])], "embeddings.sequence")
        positions = op("Slice", [g.const("embeddings.position.weight", emb.position.weight.float()), g.ints([0]),
                                 seq, g.ints([0])], "embeddings.position")
        types = op("Gather", [g.const("embeddings.token_type.weight", emb.token_type.weight.float()),
                              "segment_ids"], "embeddings.token_type", axis=0)
        x = op("Add", [op("Add", [words, positions]), types], "embeddings.sum")
        x, x_q = self.site("embeddings.ln_out", self.layer_norm("embeddings.ln", emb.ln, x, "embeddings.ln_out"))
        # Padding keys get -10000 added to their score, [B, 1, 1, S]. The reference adds float32's lowest value; both
        # make exp() underflow to exactly 0 in the softmax (its argument is below -104), so the probabilities are
        # the same, and -10000 survives a TensorRT FP16 build, where float32's lowest becomes -inf and 0 * -inf NaN.
        keep = op("Cast", ["input_mask"], "mask.float", to=TensorProto.FLOAT)
        bias = op("Mul", [op("Sub", [g.scalar(1.0), keep]), g.scalar(MASK_BIAS)])
        mask_bias = op("Unsqueeze", [bias, g.ints([1, 2])], "mask.bias")
        for i in range(self.cfg.num_layers):
            x, x_q = self.encoder_layer(i, x, x_q, mask_bias)
        logits = self.linear("qa", m.qa, x, None, out="qa.logits")
        for j, name in enumerate(OUTPUTS):
            op("Gather", [logits, g.const(g.fresh("index"), np.array(j))], name, axis=2)
        dims = list(DYNAMIC_AXES)
        inputs = [helper.make_tensor_value_info(n, TensorProto.INT32, dims) for n in INPUTS]
        outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, dims) for n in OUTPUTS]
        return helper.make_graph(g.nodes, "bert_qa", inputs, outputs, g.initializers)


def onnx_model(loaded: LoadedModel, policy: PrecisionPolicy, spec: QuantSpec | None = None,
               smooth: Mapping[str, torch.Tensor] | None = None, *, opset: int = OPSET, calibration: str = "",
               symmetric_clamp: bool = False):
    """The build as an in-memory onnx.ModelProto (see the module docstring); `spec` and `smooth` as
    calib.spec.spec_from_cache or QatScales.spec_for return them (needed when `policy` quantizes).
    `symmetric_clamp`: INT8 codes in [-127, 127] as our engines round, by a Max(x, -127 scale) ahead of each
    QuantizeLinear (one more elementwise op a site); off, QuantizeLinear saturates at -128 as TensorRT's does."""
    from onnx import helper

    if opset < 17:
        raise WorkbenchError(f"--opset {opset}: the export needs opset 17 or later (LayerNormalization)")
    spec = spec if spec is not None else QuantSpec()
    if policy.format is not None:
        if not spec.sites:
            raise WorkbenchError("--int8 needs activation scales: pass --calib-cache, or export a `cli.py qat` "
                                 "folder")
        spec.require(policy.quantized_sites(loaded.config.num_layers))
    else:
        spec = QuantSpec()
    graph = _Exporter(loaded, policy, spec, smooth or {}, opset, symmetric_clamp).graph()
    opsets = [helper.make_opsetid("", opset)]
    model = helper.make_model(graph, opset_imports=opsets, producer_name=PRODUCER,
                              ir_version=helper.find_min_ir_version_for(opsets))
    precision = "int8" if policy.int8 else "fp8" if policy.fp8 else "fp16" if policy.fp16 else "fp32"
    meta = {"policy": policy.describe(), "precision": precision, "spec": json.dumps(spec.to_json()),
            "smoothed": ",".join(sorted(k for k in (smooth or {}) if k in spec.sites)),
            "model_config": json.dumps(loaded.config.to_json()), "model_digest": loaded.digest,
            "source": loaded.source, "calibration": calibration, "gelu": "tanh" if policy.gelu_tanh else "erf",
            "int8_range": "[-127, 127]" if symmetric_clamp else "[-128, 127]"}
    helper.set_model_props(model, {METADATA_PREFIX + k: v for k, v in meta.items()})
    return model


def metadata(model) -> dict[str, str]:
    """The workbench's metadata of an exported model (policy, precision, spec JSON, model_config JSON, ...)."""
    return {p.key.removeprefix(METADATA_PREFIX): p.value for p in model.metadata_props
            if p.key.startswith(METADATA_PREFIX)}


def tensor_names(model) -> set[str]:
    """Every tensor name of the graph: inputs, outputs, initializers and node outputs."""
    g = model.graph
    return ({v.name for v in g.input} | {v.name for v in g.output} | {t.name for t in g.initializer}
            | {o for n in g.node for o in n.output})


def check_output(path: str | Path) -> Path:
    """An output file name whose folder can be written, checked before any work."""
    path = Path(path)
    if path.is_dir():
        raise WorkbenchError(f"{path}: is a directory, expected an .onnx file name")
    check_writable_dir(path.parent if str(path.parent) else Path("."))
    return path


def export_onnx(loaded: LoadedModel, policy: PrecisionPolicy, spec: QuantSpec | None,
                smooth: Mapping[str, torch.Tensor] | None, path: str | Path, *, opset: int = OPSET,
                calibration: str = "", tokenizer: bool = True, symmetric_clamp: bool = False) -> Path:
    """Write the build to `path` (atomically, checked by onnx.checker first) and, when the model has a folder,
    its tokenizer files beside it. Returns the path. `symmetric_clamp`: see onnx_model."""
    import onnx

    path = check_output(path)
    model = onnx_model(loaded, policy, spec, smooth, opset=opset, calibration=calibration,
                       symmetric_clamp=symmetric_clamp)
    if model.ByteSize() >= 2**31 - 1:
        raise WorkbenchError(f"{path}: the model is over 2 GiB, beyond a single ONNX protobuf (external data is "
                             "not supported yet)")
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as e:  # a bug of ours, not the user's: keep the message whole
        raise AssertionError(f"the exported graph does not pass onnx.checker: {e}") from None
    try:
        with atomic_path(path) as tmp:
            onnx.save_model(model, str(tmp))
        if tokenizer and loaded.model_dir is not None:
            copy_tokenizer(loaded.model_dir, path.parent)
    except OSError as e:
        raise WorkbenchError(f"{path}: cannot write the ONNX model ({e.strerror or e})") from None
    return path


def copy_tokenizer(model_dir: str | Path, folder: str | Path) -> list[Path]:
    """The tokenizer files of a model folder copied (atomically each) into `folder`; the files copied."""
    out = []
    for name in TOKENIZER_FILES:
        src, dst = Path(model_dir) / name, Path(folder) / name
        if src.is_file() and src.resolve() != dst.resolve():
            with atomic_path(dst) as tmp:
                shutil.copyfile(src, tmp)
            out.append(dst)
    return out


EXAMPLES = """examples:
  python cli.py export-onnx --model DIR --int8 --fp16 -iln --calib-cache calib.json -o export/int8.onnx
  python cli.py export-onnx --model DIR --fp16 -o export/fp16.onnx --calib-cache calib.json \\
      --trt-cache export/fp16.trtcache      # FP export + TensorRT's cache under the graph's names
  python cli.py eval --squad dev.json export/int8.onnx       # run by ONNX Runtime (--backend onnxruntime)
  python cli.py bench -e export/int8.onnx -b 1 -s 128"""


def scales_from_flags(flags, loaded: LoadedModel, policy: PrecisionPolicy, say=print):
    """Where the export takes its ranges from, as `cli.py build` does (engines.build.load_ranges)."""
    from engines.build import load_ranges

    return load_ranges(loaded, policy, calib_cache=getattr(flags, "calib_cache", None),
                       qat_scales=getattr(flags, "qat_scales", None),
                       ignore_unmodelled=bool(getattr(flags, "ignore_unmodelled", False)), say=say)


def export_from_flags(flags, say=print) -> str:
    """`cli.py export-onnx`: its flags (argparse.Namespace) model, trust_pickle, output, int8, fp16, iln, imh,
    keep_fp16, calib_cache, opset, and optionally qat_scales, ignore_unmodelled, strict, sparse, prune_2to4 (as
    `cli.py build` takes them), fp8, symmetric_clamp (INT8 codes in [-127, 127] as our engines'; see onnx_model)
    and trt_cache (TensorRT's calibration cache of --calib-cache's ranges under the graph's tensor names, for
    TensorRT's implicit quantization of an FP export). `say` gets warnings; the returned line says what was
    written."""
    import time
    from dataclasses import replace

    from calib.cache import load_cache
    from calib.trt_cache import write_trt_cache
    from engines.build import policy_from_flags, quant_spec, sparse_model
    from model.checkpoint import load_model

    t0 = time.perf_counter()
    policy = policy_from_flags(flags)
    output = check_output(flags.output)
    trt_cache = getattr(flags, "trt_cache", None)
    trt_ranges = None
    if trt_cache:
        if not getattr(flags, "calib_cache", None):
            raise WorkbenchError("--trt-cache writes the ranges of --calib-cache: give one")
        if Path(trt_cache).is_dir():
            raise WorkbenchError(f"{trt_cache}: is a directory, expected a TensorRT calibration cache file name")
        check_writable_dir(Path(trt_cache).parent if str(Path(trt_cache).parent) else Path("."))
        cache = load_cache(flags.calib_cache)
        if any(r.smooth is not None for r in cache.ranges.values()):
            raise WorkbenchError(f"--trt-cache: {flags.calib_cache} is smoothed (--smooth); TensorRT's calibration "
                                 "cache holds one scale per tensor: calibrate without --smooth for it")
        trt_ranges = cache
    loaded = load_model(flags.model, trust_pickle=bool(getattr(flags, "trust_pickle", False)))
    calib = scales_from_flags(flags, loaded, policy, say) if (policy.quantized or not trt_cache) else None
    try:
        spec, smooth = quant_spec(loaded, policy, calib)
    except WorkbenchError as e:  # name the file the ranges came from
        source = getattr(flags, "calib_cache", None) or getattr(flags, "qat_scales", None)
        if source and str(source) not in str(e):
            raise WorkbenchError(f"{source}: {e}") from None
        raise
    if trt_ranges is not None and trt_ranges.model_digest != loaded.digest:
        raise WorkbenchError(f"{flags.calib_cache} was made for another model (weights digest "
                             f"{trt_ranges.model_digest[:12]}, this model {loaded.digest[:12]}): recalibrate")
    model = sparse_model(loaded, policy, prune=bool(getattr(flags, "prune_2to4", False)))
    if model is not loaded.model:
        loaded = replace(loaded, model=model)
    opset = getattr(flags, "opset", None) or OPSET
    export_onnx(loaded, policy, spec, smooth, output, opset=opset,
                calibration=calib.describe() if calib is not None and policy.quantized else "",
                symmetric_clamp=bool(getattr(flags, "symmetric_clamp", False)))
    if trt_ranges is not None:
        write_trt_cache(trt_cache, trt_ranges.ranges, trt_ranges.method)
    size = output.stat().st_size / 2**20
    extra = ["tokenizer beside it" if loaded.model_dir is not None else "no tokenizer (random-weight preset)"]
    if trt_cache:
        extra.append(f"TensorRT calibration cache {trt_cache}")
    return (f"exported {output}: {policy.describe()}, opset {opset}, {len(spec.sites)} quantized sites, "
            f"{size:.1f} MiB, {', '.join(extra)}, in {time.perf_counter() - t0:.1f} s")


__all__ = ["DYNAMIC_AXES", "EXAMPLES", "INPUTS", "MASK_BIAS", "OPSET", "OUTPUTS", "TOKENIZER_FILES", "check_output",
           "copy_tokenizer", "export_from_flags", "export_onnx", "metadata", "onnx_model", "scales_from_flags", "tensor_names"]
