"""QAT results made elsewhere (qat/imports.py): modelopt / pytorch-quantization names, the TensorRT demo's names and
a fake-quant ONNX round-trip our ranges exactly; unknown or unmodelled names and missing sites are one-line errors."""
from __future__ import annotations

import copy
import logging
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from common.errors import WorkbenchError
from model.checkpoint import LoadedModel
from qat.folder import QatScales, read_qat_scales, to_hf_state_dict
from qat.imports import (amax_for_scale, hf_quantizer_role, main, read_external_scales, scales_for_build,
                         to_modelopt_state, to_trt_demo_state, trt_demo_role, write_qat_folder)
from quant.fakequant import fake_quant_model
from quant.policy import PrecisionPolicy
from quant.quantizer import quantize, scale_from_amax, weight_scales
from quant.spec import QuantSpec, ScaleSource
from tests.test_engines import CFG, inputs, loaded_model
from tests.test_qat_model import max_ranges

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FULL = PrecisionPolicy(int8=True, iln=True, imh=True, fp16_gemms=("layer1.fc2",))
POLICIES = {"int8": PrecisionPolicy(int8=True), "int8 -imh": PrecisionPolicy(int8=True, imh=True),
            "int8 -iln -imh keep": FULL}


def qat_spec(policy: PrecisionPolicy, seed: int = 0, wider: float = 1.01) -> QuantSpec:
    """Ranges as QAT leaves them: float32 values (learned parameters), source "qat"."""
    amax = {k: float(np.float32(v * wider)) for k, v in max_ranges(loaded_model(seed).model).items()}
    return policy.spec(CFG.num_layers, amax, ScaleSource("qat"))


def save(tmp_path, state, name="scales.safetensors"):
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def loaded(model) -> LoadedModel:
    return LoadedModel(model, CFG, "tiny", "digest", None)


# --- names --------------------------------------------------------------------------------------------------

def test_name_mapping():
    r = hf_quantizer_role
    assert r("bert.encoder.layer.0.attention.self.key._input_quantizer._amax", CFG).target == "embeddings.ln_out"
    assert r("module.bert.encoder.layer.1.attention.self.value.input_quantizer._amax", CFG).target == \
        "layer0.ffn_ln_out"
    assert r("bert.encoder.layer.1.attention.self.matmul_a_input_quantizer._amax", CFG).target == "layer1.probs"
    assert r("bert.encoder.layer.0.attention.self.k_bmm_quantizer._amax", CFG).target == "layer0.k"
    assert r("bert.encoder.layer.0.intermediate.dense_act._input_quantizer._amax", CFG).target == \
        "layer0.attn_ln_out"
    assert r("qa_outputs.input_quantizer._amax", CFG).target == "layer1.ffn_ln_out"
    assert r("bert.encoder.final_input_quantizer._amax", CFG).target == "layer1.ffn_ln_out"
    assert r("bert.encoder.layer.1.output.add_residual_input_quantizer._amax", CFG).kind == "check"
    assert r("bert.encoder.layer.1.output.LayerNorm.input_quantizer._amax", CFG).kind == "unmodelled"
    w = r("bert.encoder.layer.1.attention.self.value.weight_quantizer._amax", CFG)
    assert (w.kind, w.target, w.rows) == ("weight", "layers.1.qkv.weight", (128, 192))
    assert r("bert.encoder.layer.2.attention.self.query.input_quantizer._amax", CFG) is None  # 2 layers
    assert r("bert.encoder.layer.0.attention.self.query.input_quantizer._pre_quant_scale", CFG) is None
    t = trt_demo_role
    assert t("l1_attention_self_qv_b_input_quantizer_amax", CFG).target == "layer1.k"
    assert t("l1_attention_self_av_b_input_quantizer_amax", CFG).target == "layer1.v"
    assert t("l0_attention_output_dense_input_amax", CFG).target == "layer0.context"
    assert t("l0_output_dense_input_amax", CFG).target == "layer0.fc2_in"
    assert t("l1_attention_output_add_local_input_quantizer_amax", CFG).kind == "unmodelled"
    assert t("bert_encoder_final_input_quantizer_amax", CFG).target == "layer1.ffn_ln_out"


def test_amax_for_scale_finds_the_same_float32_scale():
    g = np.random.default_rng(0)
    for a in g.uniform(1e-3, 50, 3000).astype(np.float32):
        s = float(scale_from_amax(float(a)))
        back, exact = amax_for_scale(s)
        assert exact and float(scale_from_amax(back)) == s


# --- state dicts: round trips -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(POLICIES))
@pytest.mark.parametrize("names", ["modelopt", "trt-demo"])
def test_state_dict_round_trip_through_our_folder(tmp_path, name, names):
    policy, model = POLICIES[name], loaded_model(0).model
    spec = qat_spec(policy)
    state = to_modelopt_state(spec, CFG) if names == "modelopt" else to_trt_demo_state(spec, CFG)
    imported = read_external_scales(save(tmp_path, state), CFG)
    assert imported.convention == names and imported.weights is None
    for site, s in spec.sites.items():  # bit-identical
        assert imported.spec.sites[site].amax == s.amax and imported.spec.sites[site].source == ScaleSource("qat")
    if names == "modelopt" and not policy.iln:  # qa_outputs' input quantizer ranges the last LayerNorm output
        assert set(imported.spec.sites) == set(spec.sites)
    assert imported.precision_policy().quantized_sites(CFG.num_layers) == policy.quantized_sites(CFG.num_layers)
    folder = write_qat_folder(imported, tmp_path / "qat", model)
    scales = read_qat_scales(folder)
    assert scales.spec_for(policy, CFG.num_layers) == (spec, {})
    assert scales.precision_policy() == imported.precision_policy()


def test_modelopt_state_with_weights_and_pickle(tmp_path):
    model = loaded_model(1).model
    spec = qat_spec(FULL, 1)
    state = to_modelopt_state(spec, CFG, model)
    assert state["bert.encoder.layer.0.attention.self.key.weight_quantizer._amax"].shape == (64, 1)
    torch.save({"model": state, "epoch": 3}, tmp_path / "ckpt.pt")  # the TensorRT demo's checkpoint layout
    imported = read_external_scales(tmp_path / "ckpt.pt", CFG)
    assert imported.notes == ()  # weight amaxes are their rows' max |w|
    ref = model.state_dict()
    assert all(torch.equal(w, ref[k]) for k, w in imported.weights.items())
    build = PrecisionPolicy(int8=True, imh=True, fp16=True, fp16_gemms=("layer1.fc2",))
    scales = scales_for_build(tmp_path / "ckpt.pt", loaded(model), build)
    assert isinstance(scales, QatScales) and "imported" in scales.describe()
    spec_b, smooth = scales.spec_for(build, CFG.num_layers)
    assert smooth == {} and all(spec_b.sites[s] == spec.sites[s] for s in spec_b.sites)
    other = loaded_model(2).model
    with pytest.raises(WorkbenchError, match="ckpt.pt: its weights are not tiny's") as e:
        scales_for_build(tmp_path / "ckpt.pt", loaded(other), FULL)
    assert "\n" not in str(e.value)


def test_build_refuses_flags_the_file_has_no_ranges_for(tmp_path):
    path = save(tmp_path, to_modelopt_state(qat_spec(PrecisionPolicy(int8=True)), CFG))
    with pytest.raises(WorkbenchError, match=r"scales.safetensors: no range for layer0.q .*quantized for --int8;"):
        scales_for_build(path, loaded(loaded_model(0).model), PrecisionPolicy(int8=True, imh=True))


def test_disagreeing_and_redundant_quantizers_warn(tmp_path, caplog):
    spec = qat_spec(PrecisionPolicy(int8=True))
    state = to_trt_demo_state(spec, CFG)
    state["l1_attention_self_key_input_amax"] = state["l1_attention_self_key_input_amax"] * 1.5
    state["l0_output_add_residual_input_quantizer_amax"] = torch.tensor(spec.sites["layer0.attn_ln_out"].amax)
    state["l1_attention_output_add_residual_input_quantizer_amax"] = torch.tensor(3.0)
    with caplog.at_level(logging.WARNING, logger="qat.imports"):
        imported = read_external_scales(save(tmp_path, state), CFG)
    want = float(np.float32(spec.sites["layer0.ffn_ln_out"].amax) * np.float32(1.5))
    assert imported.spec.sites["layer0.ffn_ln_out"].amax == want  # the largest of Q, K, V's input ranges
    assert len(imported.notes) == 2 and "disagree" in imported.notes[0] and "not used" in imported.notes[1]
    assert "l0_output_add_residual" not in " ".join(imported.notes)  # equal: silent
    assert len(caplog.records) == 2


def test_nvidia_checkpoint_names(tmp_path):
    """NVIDIA's QAT BERT (pytorch-quantization, DeepLearningExamples): underscored quantizers, matmul quantizers,
    FC1 as intermediate.dense_act, residual quantizers; TensorRT-demo weight names are noted, not read."""
    model, spec = loaded_model(0).model, qat_spec(FULL)
    state = {k.replace("intermediate.dense.", "intermediate.dense_act."): v
             for k, v in to_hf_state_dict(model.state_dict(), CFG).items()}
    for site, s in spec.sites.items():
        for name in to_modelopt_state(QuantSpec({site: s}), CFG):
            name = (name.replace("input_quantizer._amax", "_input_quantizer._amax")
                    .replace("q_bmm_quantizer", "matmul_q_input_quantizer").replace("k_bmm_quantizer",
                                                                                    "matmul_k_input_quantizer")
                    .replace("v_bmm_quantizer", "matmul_v_input_quantizer")
                    .replace("p_bmm_quantizer", "matmul_a_input_quantizer"))
            state[name] = torch.tensor(s.amax)
    state["bert.encoder.layer.1.output.add_residual_input_quantizer._amax"] = torch.tensor(
        spec.sites["layer1.attn_ln_out"].amax)
    state["l0_attention_self_query_kernel"] = torch.zeros(3)
    imported = read_external_scales(save(tmp_path, state), CFG)
    assert imported.weights is not None and imported.notes == (
        "1 weights in TensorRT-demo names not read (their layout depends on the checkpoint they were converted "
        "from)",)
    assert {s: v.amax for s, v in imported.spec.sites.items()} == {s: v.amax for s, v in spec.sites.items()}


# --- errors -------------------------------------------------------------------------------------------------

def test_unknown_names_are_one_line(tmp_path, capsys):
    state = to_modelopt_state(qat_spec(PrecisionPolicy(int8=True)), CFG)
    state["bert.encoder.layer.0.attention.self.query.input_quantizer._pre_quant_scale"] = torch.ones(64)
    state["bert.encoder.layer.5.output.dense.input_quantizer._amax"] = torch.tensor(1.0)
    state["optimizer.step"] = torch.tensor(3)
    state["bert.embeddings.word_embeddings.weight_quantizer._amax"] = torch.tensor(1.0)
    path = save(tmp_path, state)
    with pytest.raises(WorkbenchError) as e:
        read_external_scales(path, CFG)
    msg = str(e.value)
    assert msg.startswith(f"{path}: 4 names map to no site or weight of this 2-layer BERT: ") and "(+1 more)" in msg
    assert "\n" not in msg
    assert main([str(path), "--model", "bert-base"]) == 2  # a 12-layer preset: layer 5 exists, the rest do not
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "3 names map to no site" in err


def test_unmodelled_quantizers_refused_or_dropped(tmp_path):
    state = to_trt_demo_state(qat_spec(PrecisionPolicy(int8=True)), CFG)
    for i in range(2):
        state[f"l{i}_attention_output_add_local_input_quantizer_amax"] = torch.tensor(4.0)
        state[f"l{i}_output_add_local_input_quantizer_amax"] = torch.tensor(5.0)
    path = save(tmp_path, state)
    with pytest.raises(WorkbenchError, match=r"4 quantizers round tensors our engines keep in floating point "
                                             r"\(a GEMM output before the residual add\): l0_attention_output_add_"
                                             r"local_input_quantizer_amax, .*--ignore-unmodelled") as e:
        read_external_scales(path, CFG)
    assert "\n" not in str(e.value)
    imported = read_external_scales(path, CFG, ignore_unmodelled=True)
    assert "4 quantizers" in imported.notes[0] and imported.precision_policy() == PrecisionPolicy(int8=True)


def test_strict_lists_sites_without_ranges(tmp_path):
    spec = qat_spec(PrecisionPolicy(int8=True, imh=True))
    state = to_modelopt_state(spec, CFG)
    del state["bert.encoder.layer.1.output.dense.input_quantizer._amax"]
    del state["bert.encoder.layer.0.attention.self.p_bmm_quantizer._amax"]
    path = save(tmp_path, state)
    imported = read_external_scales(path, CFG)  # not strict: layer1's FC2 was left unquantized, no -imh
    assert imported.precision_policy() == PrecisionPolicy(int8=True, fp16_gemms=("layer1.fc2",))
    with pytest.raises(WorkbenchError) as e:
        read_external_scales(path, CFG, strict=True)
    assert str(e.value) == f"{path}: 2 sites have no range (--strict): layer0.probs, layer1.fc2_in"


def test_bad_files(tmp_path):
    with pytest.raises(WorkbenchError, match="not found"):
        read_external_scales(tmp_path / "none.safetensors", CFG)
    (tmp_path / "x.safetensors").write_bytes(b"garbage")
    with pytest.raises(WorkbenchError, match="x.safetensors: unreadable safetensors file"):
        read_external_scales(tmp_path / "x.safetensors", CFG)
    (tmp_path / "x.onnx").write_bytes(b"garbage")
    with pytest.raises(WorkbenchError, match="x.onnx: unreadable ONNX file"):
        read_external_scales(tmp_path / "x.onnx", CFG)
    path = save(tmp_path, {"bert.encoder.layer.0.attention.output.dense.input_quantizer._amax": torch.ones(64)})
    with pytest.raises(WorkbenchError, match="per-channel activation range"):
        read_external_scales(path, CFG)


# --- fake-quant ONNX ----------------------------------------------------------------------------------------

class _Graph:
    """A fake-quant BertForQuestionAnswering in ONNX (Hugging Face layout: separate query/key/value projections,
    weights as initializers with Hugging Face names), quantized as quant.fakequant.fake_quant_model does:
    --int8 GEMM inputs get a Q/DQ pair per GEMM, -iln/-imh sites one where they are produced, GEMM weights a
    per-channel Q/DQ pair. `naming`: "sites" (a quantized tensor is named by its site), "paths" (Q nodes named
    by modelopt module path, as a torch export names them) or "anonymous" (placed by graph structure only)."""

    def __init__(self, model, policy, spec, naming, seq, codes=False):
        from onnx import TensorProto, helper, numpy_helper
        self.h, self.np_, self.tp = helper, numpy_helper, TensorProto
        self.policy, self.spec, self.naming, self.codes = policy, spec, naming, codes
        self.nodes, self.inits, self.n = [], [], 0
        cfg, state = model.config, to_hf_state_dict(model.state_dict(), model.config)
        self.state = state
        self.const("zp", np.zeros((), np.int8))
        ids, tt, mask = "input_ids", "token_type_ids", "attention_mask"
        self.const("positions", np.arange(seq, dtype=np.int64))
        emb = self.op("Add", [self.op("Add", [self.gather("bert.embeddings.word_embeddings.weight", ids),
                                               self.gather("bert.embeddings.position_embeddings.weight",
                                                           "positions")]),
                              self.gather("bert.embeddings.token_type_embeddings.weight", tt)])
        x = self.layer_norm(emb, "bert.embeddings.LayerNorm", "embeddings.ln_out",
                            "/bert/embeddings/LayerNorm/output_quantizer")
        self.const("one", np.ones((), np.float32))
        self.const("axes12", np.array([1, 2], np.int64))
        self.const("neg", np.array(np.finfo(np.float32).min, np.float32))
        bias = self.op("Mul", [self.op("Unsqueeze", [self.op("Sub", ["one", mask]), "axes12"]), "neg"])
        self.const("heads", np.array([0, 0, cfg.num_heads, cfg.head_dim], np.int64))
        self.const("hidden", np.array([0, 0, cfg.hidden_size], np.int64))
        self.const("inv_sqrt_d", np.array(1 / math.sqrt(cfg.head_dim), np.float32))
        for c, v in (("c_half", 0.5), ("c_k", 0.044715), ("c_s", math.sqrt(2 / math.pi))):
            self.const(c, np.array(v, np.float32))
        for i in range(cfg.num_layers):
            x = self.encoder_layer(i, x, bias)
        logits = self.linear(i, "qa", x, "qa_outputs", quantized=False)
        self.const("i0", np.array(0, np.int64))
        self.const("i1", np.array(1, np.int64))
        self.nodes.append(helper.make_node("Gather", [logits, "i0"], ["start_logits"], axis=2))
        self.nodes.append(helper.make_node("Gather", [logits, "i1"], ["end_logits"], axis=2))
        f = TensorProto.FLOAT
        graph = helper.make_graph(
            self.nodes, "fake_quant_bert",
            [helper.make_tensor_value_info(ids, TensorProto.INT64, ["B", seq]),
             helper.make_tensor_value_info(tt, TensorProto.INT64, ["B", seq]),
             helper.make_tensor_value_info(mask, f, ["B", seq])],
            [helper.make_tensor_value_info(n, f, ["B", seq]) for n in ("start_logits", "end_logits")],
            self.inits)
        self.model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        self.model.ir_version = 8

    def name(self, site=None):
        if self.naming == "sites" and site is not None:
            return site
        self.n += 1
        return f"t{self.n}"

    def const(self, name, value):
        self.inits.append(self.np_.from_array(value, name))
        return name

    def op(self, op_type, inputs, out_site=None, **attrs):
        out = self.name(out_site)
        self.nodes.append(self.h.make_node(op_type, inputs, [out], **attrs))
        return out

    def qdq(self, x, site, path, node_name=None):
        """Q/DQ of activation `x` with `site`'s scale."""
        scale = self.const(self.name() + "_scale", np.array(self.spec.sites[site].scale, np.float32))
        q = self.name()
        qname = (path + "/QuantizeLinear") if self.naming == "paths" else ""
        self.nodes.append(self.h.make_node("QuantizeLinear", [x, scale, "zp"], [q], name=qname))
        return self.op("DequantizeLinear", [q, scale, "zp"])

    def produced(self, x, site, path):
        """A tensor as its consumers see it: rounded where produced under -iln/-imh."""
        if site in self.spec.sites and self.policy.rounded_where_produced(site):
            return self.qdq(x, site, path)
        return x

    def gather(self, table, ids):
        self.const(table, self.state[table].numpy())
        return self.op("Gather", [table, ids])

    def layer_norm(self, x, prefix, site, path):
        self.const(prefix + ".weight", self.state[prefix + ".weight"].numpy())
        self.const(prefix + ".bias", self.state[prefix + ".bias"].numpy())
        y = self.op("LayerNormalization", [x, prefix + ".weight", prefix + ".bias"], site, axis=-1, epsilon=1e-12)
        return self.produced(y, site, path)

    def linear(self, layer, gemm, x, prefix, quantized=None, input_site=None):
        w = self.state[prefix + ".weight"]
        quantized = self.policy.quantizes_gemm(layer, gemm) if quantized is None else quantized
        if quantized and not self.policy.rounded_where_produced(input_site):
            x = self.qdq(x, input_site, "/" + prefix.replace(".", "/") + "/input_quantizer")
        self.const(prefix + ".bias", self.state[prefix + ".bias"].numpy())
        if quantized and self.codes:  # INT8 codes [in, out], DequantizeLinear per column, read by MatMul as is
            s = self.const(self.name() + "_wscale", weight_scales(w).flatten().numpy())
            zp = self.const(self.name() + "_wzp", np.zeros(w.shape[0], np.int8))
            codes = self.const(prefix + ".weight_codes", quantize(w, weight_scales(w)).t().contiguous().numpy())
            self.nodes.append(self.h.make_node("DequantizeLinear", [codes, s, zp], [prefix + ".weight"], axis=1))
            return self.op("Add", [self.op("MatMul", [x, prefix + ".weight"]), prefix + ".bias"])
        wname = self.const(prefix + ".weight", w.numpy())
        if quantized:
            s = self.const(self.name() + "_wscale", weight_scales(w).flatten().numpy())
            zp = self.const(self.name() + "_wzp", np.zeros(w.shape[0], np.int8))
            q = self.op("QuantizeLinear", [wname, s, zp], axis=0)
            wname = self.op("DequantizeLinear", [q, s, zp], axis=0)
        return self.op("Add", [self.op("MatMul", [x, self.op("Transpose", [wname], perm=[1, 0])]), prefix + ".bias"])

    def encoder_layer(self, i, x, bias):
        p, site = f"bert.encoder.layer.{i}", f"layer{i}."
        path = f"/bert/encoder/layer.{i}"
        qkv_in = PrecisionPolicy().gemm_input_site(i, "qkv")
        heads = {}
        for n in ("query", "key", "value"):
            y = self.linear(i, "qkv", x, f"{p}.attention.self.{n}", input_site=qkv_in)
            y = self.op("Transpose", [self.op("Reshape", [y, "heads"])], site + n[0], perm=[0, 2, 1, 3])
            heads[n] = self.produced(y, site + n[0], f"{path}/attention/self/{n[0]}_bmm_quantizer")
        scores = self.op("MatMul", [heads["query"], self.op("Transpose", [heads["key"]], perm=[0, 1, 3, 2])])
        scores = self.op("Add", [self.op("Mul", [scores, "inv_sqrt_d"]), bias])
        probs = self.produced(self.op("Softmax", [scores], site + "probs", axis=-1), site + "probs",
                              f"{path}/attention/self/p_bmm_quantizer")
        ctx = self.op("Transpose", [self.op("MatMul", [probs, heads["value"]])], perm=[0, 2, 1, 3])
        ctx = self.produced(self.op("Reshape", [ctx, "hidden"], site + "context"), site + "context",
                            f"{path}/attention/output/dense/input_quantizer")
        a = self.linear(i, "attn_out", ctx, f"{p}.attention.output.dense", input_site=site + "context")
        x1 = self.layer_norm(self.op("Add", [a, x]), f"{p}.attention.output.LayerNorm", site + "attn_ln_out",
                             f"{path}/attention/output/LayerNorm/output_quantizer")
        y = self.linear(i, "fc1", x1, f"{p}.intermediate.dense", input_site=site + "attn_ln_out")
        if self.policy.gelu_tanh:  # 0.5 y (1 + tanh(sqrt(2/pi) (y + 0.044715 y^3)))
            cube = self.op("Mul", [self.op("Mul", [y, y]), y])
            inner = self.op("Mul", [self.op("Add", [y, self.op("Mul", [cube, "c_k"])]), "c_s"])
            g = self.op("Mul", [self.op("Mul", [y, "c_half"]), self.op("Add", [self.op("Tanh", [inner]), "one"])],
                        site + "fc2_in")
        else:
            raise NotImplementedError
        o = self.linear(i, "fc2", g, f"{p}.output.dense", input_site=site + "fc2_in")
        return self.layer_norm(self.op("Add", [o, x1]), f"{p}.output.LayerNorm", site + "ffn_ln_out",
                               f"{path}/output/LayerNorm/output_quantizer")


def write_onnx(tmp_path, model, policy, spec, naming, seq=12, codes=False):
    import onnx
    g = _Graph(model, policy, spec, naming, seq, codes)
    onnx.checker.check_model(g.model)
    path = tmp_path / f"{naming}.onnx"
    onnx.save(g.model, str(path))
    return path


@pytest.mark.parametrize("naming", ["sites", "paths", "anonymous"])
@pytest.mark.parametrize("name", list(POLICIES))
def test_fake_quant_onnx_round_trip(tmp_path, name, naming):
    policy, model = POLICIES[name], loaded_model(0).model
    spec = qat_spec(policy)
    path = write_onnx(tmp_path, model, policy, spec, naming)
    imported = read_external_scales(path, CFG)
    assert imported.convention == {"sites": "site", "paths": "modelopt", "anonymous": "graph"}[naming]
    assert set(imported.spec.sites) == set(spec.sites)
    for site, s in spec.sites.items():
        assert imported.spec.sites[site].scale == s.scale, site  # identical as float32
    assert imported.notes == ()  # weight scales are their rows' max |w| / 127
    ref = model.state_dict()
    assert imported.weights.keys() == ref.keys() and all(torch.equal(imported.weights[k], ref[k]) for k in ref)
    assert imported.precision_policy().quantized_sites(CFG.num_layers) == policy.quantized_sites(CFG.num_layers)
    scales = read_qat_scales(write_qat_folder(imported, tmp_path / "qat"))
    got, _ = scales.spec_for(policy, CFG.num_layers)
    assert got.scales() == spec.scales()


@pytest.mark.parametrize("naming", ["sites", "anonymous"])
def test_fake_quant_onnx_with_int8_weight_codes(tmp_path, naming):
    """Weights stored as INT8 codes [in, out] behind a per-column DequantizeLinear that MatMul reads as is (the
    common export, square matrices included): imported dequantized and transposed; the build re-rounds them to
    the very same codes."""
    model = loaded_model(0).model
    spec = qat_spec(FULL)
    imported = read_external_scales(write_onnx(tmp_path, model, FULL, spec, naming, codes=True), CFG)
    assert all(imported.spec.sites[s].scale == v.scale for s, v in spec.sites.items())
    ref = model.state_dict()
    quantized = {f"layers.{i}.{g}.weight" for i, g, _ in FULL.quantized_gemms(CFG.num_layers)}
    for k, w in imported.weights.items():
        if k in quantized:
            assert torch.equal(quantize(w, weight_scales(w)), quantize(ref[k], weight_scales(ref[k]))), k
        else:
            assert torch.equal(w, ref[k]), k


@pytest.mark.parametrize("name", list(POLICIES))
def test_fake_quant_onnx_computes_our_fake_quant_function(tmp_path, name):
    """The ONNX graph of the round trip is the fake-quant reference's function (onnxruntime against
    quant.fakequant): the Q/DQ pairs the importer placed sit where our sites are."""
    ort = pytest.importorskip("onnxruntime")
    model, policy = loaded_model(0).model, POLICIES[name]
    path = write_onnx(tmp_path, model, policy, qat_spec(policy, wider=2.0), "anonymous")  # nothing saturates
    imported = read_external_scales(path, CFG)
    ids, tt, mask = inputs(batch=2, seq=12, seed=3)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    start, end = sess.run(None, {"input_ids": ids.numpy().astype(np.int64),
                                 "token_type_ids": tt.numpy().astype(np.int64),
                                 "attention_mask": mask.float().numpy()})
    with torch.no_grad():
        want = fake_quant_model(model, policy, imported.qat_scales().spec_for(policy, CFG.num_layers)[0])(ids, tt,
                                                                                                       mask)
        plain = model(ids, tt, mask)
    real = mask.bool()
    err = max(float((torch.from_numpy(a) - w).abs()[real].max()) for a, w in zip((start, end), want))
    gap = max(float((p - w).abs()[real].max()) for p, w in zip(plain, want))
    assert err < 0.01 * gap, (err, gap)  # ONNX rounds x / scale where we multiply by 1 / scale: rare ties


def test_onnx_refuses_asymmetric_and_unplaceable_quantizers(tmp_path):
    import onnx
    from onnx import helper, numpy_helper
    model = loaded_model(0).model
    spec = qat_spec(PrecisionPolicy(int8=True))
    g = _Graph(model, PrecisionPolicy(int8=True), spec, "anonymous", 12).model
    bad = copy.deepcopy(g)
    bad.graph.initializer.append(numpy_helper.from_array(np.array(3, np.int8), "zp3"))
    q = next(n for n in bad.graph.node if n.op_type == "QuantizeLinear" and n.input[2] == "zp")
    q.input[2] = "zp3"
    onnx.save(bad, str(tmp_path / "asym.onnx"))
    with pytest.raises(WorkbenchError, match=r"asym.onnx: 1 Q/DQ nodes cannot be used \(not symmetric INT8"):
        read_external_scales(tmp_path / "asym.onnx", CFG)
    smoothed = copy.deepcopy(g)  # a smoothing vector multiplied in ahead of a quantizer
    q = next(n for n in smoothed.graph.node if n.op_type == "QuantizeLinear" and n.input[2] == "zp")
    smoothed.graph.initializer.append(numpy_helper.from_array(np.full(64, 0.5, np.float32), "s_inv"))
    smoothed.graph.node.append(helper.make_node("Mul", [q.input[0], "s_inv"], ["x_over_s"]))
    q.input[0] = "x_over_s"
    onnx.save(smoothed, str(tmp_path / "smoothed.onnx"))
    with pytest.raises(WorkbenchError, match=r"smoothed.onnx: 1 Q/DQ nodes cannot be used \(smoothed sites"):
        read_external_scales(tmp_path / "smoothed.onnx", CFG)
    odd = copy.deepcopy(g)  # a Q on the attention scores: no site of ours
    softmax = next(n for n in odd.graph.node if n.op_type == "Softmax")
    odd.graph.initializer.append(numpy_helper.from_array(np.array(0.5, np.float32), "half"))
    odd.graph.node.append(helper.make_node("QuantizeLinear", [softmax.input[0], "half", "zp"], ["sq"],
                                           name="scores_q"))
    onnx.save(odd, str(tmp_path / "odd.onnx"))
    with pytest.raises(WorkbenchError, match=r"odd.onnx: 1 QuantizeLinear nodes read no tensor we can place .*: "
                                             r"scores_q$"):
        read_external_scales(tmp_path / "odd.onnx", CFG)


# --- a real modelopt model ----------------------------------------------------------------------------------

def test_real_modelopt_quantized_hf_bert(tmp_path):
    """mtq.quantize (INT8_DEFAULT_CFG plus its attention bmm quantizers) on a Hugging Face BertForQuestionAnswering
    with our tiny model's weights: its state dict imports, and each range is the max |x| our reference sees at the
    site it maps to (modelopt's max calibration over the same batch)."""
    transformers = pytest.importorskip("transformers")
    mtq = pytest.importorskip("modelopt.torch.quantization")
    from qat.folder import hf_config_json
    model = loaded_model(0).model
    hf = transformers.BertForQuestionAnswering(
        transformers.BertConfig(**hf_config_json(CFG), attn_implementation="eager")).eval()
    hf.load_state_dict(to_hf_state_dict(model.state_dict(), CFG))
    ids, tt, mask = inputs(batch=2, seq=16, seed=5)
    mask = torch.ones_like(mask)  # every position real: modelopt's max sees padding too, our calibrators do not
    cfg = copy.deepcopy(mtq.INT8_DEFAULT_CFG)
    cfg["quant_cfg"].append({"quantizer_name": "*[qkv]_bmm_quantizer", "cfg": {"num_bits": 8, "axis": None}})
    with torch.no_grad():
        hf = mtq.quantize(hf, cfg, lambda m: m(input_ids=ids, token_type_ids=tt, attention_mask=mask))
    path = save(tmp_path, {k: v.detach().clone() for k, v in hf.state_dict().items()}, "modelopt.safetensors")
    with pytest.raises(WorkbenchError, match="LayerNorm.input_quantizer") as e:  # modelopt rounds LayerNorm inputs
        read_external_scales(path, CFG)
    assert "residual sum before LayerNorm" in str(e.value) and "\n" not in str(e.value)
    imported = read_external_scales(path, CFG, ignore_unmodelled=True)
    assert imported.convention == "modelopt" and imported.notes[0].startswith("6 quantizers")
    assert imported.precision_policy() == PrecisionPolicy(int8=True, iln=True)
    ref = model.state_dict()
    assert all(torch.equal(w, ref[k]) for k, w in imported.weights.items())
    seen: dict[str, float] = {}

    def tap(name, x):
        seen[name] = max(seen.get(name, 0.0), float(x.abs().max()))
        return x

    model.tap = tap
    with torch.no_grad():
        model(ids, tt, mask)
    model.tap = lambda name, x: x
    assert set(imported.spec.sites) == set(PrecisionPolicy(int8=True, iln=True).quantized_sites(CFG.num_layers)) | {
        f"layer{i}.{s}" for i in range(CFG.num_layers) for s in "qkv"}
    for site, s in imported.spec.sites.items():
        assert s.amax == pytest.approx(seen[site], rel=1e-5), site
