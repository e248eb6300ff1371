"""QAT folders: Hugging Face layout + quant_spec.json; weights and learned scales round-trip exactly."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from common.errors import WorkbenchError
from model.checkpoint import load_model
from qat.folder import QUANT_SPEC_NAME, load_qat_spec, read_qat_scales, save_qat_folder, to_hf_state_dict
from qat.model import learned_spec, policy_of, qat_model, scale_parameters
from quant.policy import PrecisionPolicy
from quant.spec import ScaleSource
from tests.test_qat_model import CFG, inputs, max_ranges, smoothing_vectors, tiny_model

POLICY = PrecisionPolicy(int8=True, iln=True, fp16_gemms=("layer1.fc2",))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def trained_student():
    """A QAT model whose weights and ranges differ from where they started (as after training)."""
    model, smooth = tiny_model(2), smoothing_vectors()
    spec = POLICY.spec(CFG.num_layers, max_ranges(model, smooth), ScaleSource("fixed"), set(smooth))
    student = qat_model(model, POLICY, spec, {s: v for s, v in smooth.items() if s in spec.sites})
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for p in student.parameters():
            p.mul_(1 + 0.01 * torch.randn(p.shape, generator=g))
    return student


@pytest.fixture
def saved(tmp_path):
    student = trained_student()
    source = tmp_path / "source"
    source.mkdir()
    (source / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\nhello\n", encoding="utf-8")
    (source / "tokenizer_config.json").write_text('{"do_lower_case": true}', encoding="utf-8")
    folder = save_qat_folder(tmp_path / "qat", student, source, {"steps": 3})
    return student, folder


def test_weights_round_trip_through_load_model(saved):
    student, folder = saved
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", QUANT_SPEC_NAME,
                                                        "tokenizer_config.json", "vocab.txt"]
    names = set(load_file(folder / "model.safetensors"))
    assert "bert.encoder.layer.1.attention.self.key.weight" in names and not any("quantizers" in n for n in names)
    loaded = load_model(folder)
    assert loaded.config == CFG
    ref = student.state_dict()
    for k, v in loaded.model.state_dict().items():
        assert torch.equal(v, ref[k]), k
    # the same logits: the loaded model against the QAT model's float weights without fake quantization
    x = inputs()
    with torch.no_grad():
        for a, b in zip(loaded.model(*x), _float_forward(student, x)):
            assert torch.equal(a, b)


def _float_forward(student, x):
    """The student's weights in a plain BertQA (erf GELU, no rounding)."""
    from model.bert import BertQA
    from qat.model import reference_state_dict
    m = BertQA(CFG)
    m.load_state_dict(reference_state_dict(student))
    return m.eval()(*x)


def test_scales_round_trip_and_rebuild_the_same_function(saved):
    student, folder = saved
    scales = read_qat_scales(folder)
    spec, flags = load_qat_spec(folder)
    assert spec == scales.spec == learned_spec(student)
    assert all(str(s.source) == "qat" for s in spec.sites.values())
    assert [s.amax for s in spec.sites.values()] == [float(p.detach()) for p in scale_parameters(student)]
    assert flags == {"int8": True, "iln": True, "imh": False, "fp16_gemms": ["layer1.fc2"]}
    assert scales.precision_policy() == policy_of(student)
    assert scales.smooth.keys() == {s for s, site in spec.sites.items() if site.granularity == "per_channel"}
    # the folder alone (weights + scales + smoothing) gives the trained QAT model's function exactly
    rebuilt = qat_model(load_model(folder).model, scales.precision_policy(), spec, scales.smooth)
    x = inputs(seed=4)
    with torch.no_grad():
        for a, b in zip(rebuilt(*x), student.eval()(*x)):
            assert torch.equal(a, b)


def test_plain_folder_has_no_scales(tmp_path):
    from qat.folder import save_model_folder
    folder = save_model_folder(tmp_path / "plain", tiny_model(), None)
    assert load_qat_spec(folder) is None and read_qat_scales(folder) is None
    assert load_model(folder).config == CFG


def _edit(folder, change):
    path = folder / QUANT_SPEC_NAME
    body = json.loads(path.read_text())
    change(body)
    path.write_text(json.dumps(body))


@pytest.mark.parametrize("change, message", [
    (lambda b: b.update(format="other"), "not a QAT scales file"),
    (lambda b: b.update(format_version=7), "version 7"),
    (lambda b: b.update(policy={"int8": "yes"}), "'policy' must be"),
    (lambda b: b["policy"].update(int8=False), "-iln and -imh quantize on top of --int8"),
    (lambda b: b["policy"].update(fp16_gemms=["fc9"]), "not a GEMM"),
    (lambda b: b.update(spec=[]), "expected an object with 'sites'"),
    (lambda b: b["spec"]["sites"].update({"layer0.q": dict(b["spec"]["sites"]["layer0.fc2_in"],
                                                           granularity="per_tensor")}),
     "layer0.q not quantized by them"),
    (lambda b: b["spec"]["sites"]["layer0.fc2_in"].update(amax=-1.0), "amax must be a finite number"),
    (lambda b: b["spec"]["sites"]["layer0.fc2_in"].update(amax="big"), "numeric amax"),
    (lambda b: b["spec"]["sites"]["layer0.fc2_in"].update(format="int3"), "unknown quantization format"),
    (lambda b: b["spec"]["sites"]["layer0.fc2_in"].update(source="magic"), "unknown scale source"),
    (lambda b: b["spec"]["sites"].pop("layer0.fc2_in"), "layer0.fc2_in missing"),
    (lambda b: b["spec"]["sites"].update({"layer9.q": b["spec"]["sites"]["layer0.fc2_in"]}), "not a site of"),
    (lambda b: b["smooth"].update({"layer0.fc2_in": [1.0, 2.0]}), "must be 128 finite positive"),
    (lambda b: b["smooth"].pop("layer0.fc2_in"), "per_channel but has no smoothing vector"),
    (lambda b: b["smooth"].update({"layer0.attn_ln_out": "x"}), "'smooth' must map"),
])
def test_malformed_quant_spec_is_one_line_naming_the_file(saved, change, message):
    _, folder = saved
    _edit(folder, change)
    with pytest.raises(WorkbenchError, match=message) as err:
        read_qat_scales(folder)
    text = str(err.value)
    assert "\n" not in text and text.startswith(str(folder / QUANT_SPEC_NAME)), text


def test_unparsable_quant_spec(saved):
    _, folder = saved
    (folder / QUANT_SPEC_NAME).write_text('{"format": ')
    with pytest.raises(WorkbenchError, match="malformed") as err:
        load_qat_spec(folder)
    assert str(folder / QUANT_SPEC_NAME) in str(err.value) and "\n" not in str(err.value)


def test_hf_names_split_qkv():
    model = tiny_model()
    hf = to_hf_state_dict(model.state_dict(), CFG)
    qkv = model.layers[0].qkv.weight
    h = CFG.hidden_size
    assert torch.equal(hf["bert.encoder.layer.0.attention.self.value.weight"], qkv[2 * h:])
    assert torch.equal(hf["bert.encoder.layer.0.attention.self.query.bias"], model.layers[0].qkv.bias[:h])
