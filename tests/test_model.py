"""The reference BERT against transformers' BertForQuestionAnswering, and checkpoint loading's refusals."""
from __future__ import annotations

import json

import pytest
import torch

from common.errors import WorkbenchError
from model.bert import all_sites
from model.checkpoint import load_model
from model.config import PRESETS, BertConfig, load_hf_config
from tests.conftest import MINILM

TINY = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64, type_vocab_size=2)


def _hf_tiny(tmp_path, seed=0, **overrides):
    """Save a random Hugging Face QA BERT (with non-trivial biases and LayerNorms) in the HF layout."""
    from transformers import BertConfig as HFConfig, BertForQuestionAnswering

    torch.manual_seed(seed)
    hf = BertForQuestionAnswering(HFConfig(**{**TINY, **overrides})).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(tmp_path)
    return hf


def _inputs(vocab, batch=3, seq=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    types = torch.zeros_like(ids)
    types[:, seq // 3:] = 1
    mask = torch.ones_like(ids)
    mask[1, seq // 2:] = 0  # one padded row
    return ids, types, mask


def _compare_with_hf(hf, ours, vocab):
    ids, types, mask = _inputs(vocab)
    with torch.no_grad():
        ref = hf(input_ids=ids, token_type_ids=types, attention_mask=mask)
        start, end = ours(ids, types, mask)
    valid = mask.bool()  # logits at padded positions are never used
    assert (start - ref.start_logits)[valid].abs().max() < 1e-4
    assert (end - ref.end_logits)[valid].abs().max() < 1e-4


def test_matches_transformers_fp32(tmp_path):
    hf = _hf_tiny(tmp_path)
    loaded = load_model(tmp_path)
    assert loaded.config.num_layers == 2 and loaded.model_dir == tmp_path
    _compare_with_hf(hf, loaded.model.eval(), TINY["vocab_size"])


@pytest.mark.shared
def test_matches_transformers_on_shared_minilm():
    from transformers import BertForQuestionAnswering

    hf = BertForQuestionAnswering.from_pretrained(MINILM, dtype=torch.float32).eval()
    _compare_with_hf(hf, load_model(MINILM).model.eval(), 30522)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_close_to_fp32(tmp_path, dtype):
    _hf_tiny(tmp_path)
    model = load_model(tmp_path).model.eval()
    ids, types, mask = _inputs(TINY["vocab_size"])
    with torch.no_grad():
        ref, _ = model(ids, types, mask)
        low, _ = model.to(dtype)(ids, types, mask)
    assert low.dtype == torch.float32
    rel = (low - ref).norm() / ref.norm()
    assert rel < (1e-2 if dtype == torch.bfloat16 else 3e-3), rel


def test_tap_sees_every_site_in_order(tmp_path):
    _hf_tiny(tmp_path)
    model = load_model(tmp_path).model.eval()
    seen = []
    model.tap = lambda name, x: seen.append(name) or x
    with torch.no_grad():
        model(*_inputs(TINY["vocab_size"]))
    assert tuple(seen) == all_sites(2)


def test_presets_are_seeded_random_weights():
    a = load_model("bert-base", seed=3)
    b = load_model("bert-base", seed=3)
    assert a.config == PRESETS["bert-base"] and a.model_dir is None
    assert torch.equal(a.model.layers[0].qkv.weight, b.model.layers[0].qkv.weight)
    assert 0.015 < a.model.layers[0].qkv.weight.std() < 0.025
    assert PRESETS["bert-large"].num_layers == 24 and PRESETS["bert-large"].hidden_size == 1024


# ---------------------------------------------------------------- bad input: one-line errors naming the file

def test_folder_without_weights(tmp_path):
    _hf_tiny(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(WorkbenchError, match=r"no weights"):
        load_model(tmp_path)


def test_missing_folder(tmp_path):
    with pytest.raises(WorkbenchError, match="model folder not found"):
        load_model(tmp_path / "nope")


def test_weights_do_not_fit_config(tmp_path):
    _hf_tiny(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["hidden_size"], cfg["intermediate_size"] = 64, 128
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WorkbenchError, match=r"weights do not fit config.json: .*has shape \[99, 32\]") as e:
        load_model(tmp_path)
    assert str(tmp_path) in str(e.value) and "\n" not in str(e.value)


def test_more_layers_than_config(tmp_path):
    _hf_tiny(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["num_hidden_layers"] = 1
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WorkbenchError, match="weights have layer 1 but config.json says 1 layers"):
        load_model(tmp_path)


def test_fewer_layers_than_config(tmp_path):
    _hf_tiny(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WorkbenchError, match=r"missing tensor bert.encoder.layer.2"):
        load_model(tmp_path)


def test_truncated_safetensors(tmp_path):
    _hf_tiny(tmp_path)
    st = tmp_path / "model.safetensors"
    st.write_bytes(st.read_bytes()[:1000])
    with pytest.raises(WorkbenchError, match="unreadable safetensors"):
        load_model(tmp_path)


def test_malformed_config(tmp_path):
    _hf_tiny(tmp_path)
    (tmp_path / "config.json").write_text('{"hidden_size": 32,')
    with pytest.raises(WorkbenchError, match=r"config.json: malformed model config at line 1"):
        load_model(tmp_path)


def test_config_checks(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**TINY, "num_attention_heads": 5}))
    with pytest.raises(WorkbenchError, match="not divisible"):
        load_hf_config(path)
    path.write_text(json.dumps({**TINY, "hidden_act": "relu"}))
    with pytest.raises(WorkbenchError, match="hidden_act 'relu' is not supported"):
        load_hf_config(path)
    path.write_text(json.dumps({**TINY, "model_type": "roberta"}))
    with pytest.raises(WorkbenchError, match="only BERT"):
        load_hf_config(path)
    path.write_text(json.dumps({"hidden_size": 32}))
    with pytest.raises(WorkbenchError, match="missing vocab_size"):
        load_hf_config(path)
    path.write_text(json.dumps(TINY))
    assert load_hf_config(path) == BertConfig(99, 32, 2, 4, 64, 64, 2)


def test_pickle_refused_unless_trusted(tmp_path):
    hf = _hf_tiny(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(WorkbenchError, match="--trust-pickle"):
        load_model(tmp_path)
    _compare_with_hf(hf, load_model(tmp_path, trust_pickle=True).model.eval(), TINY["vocab_size"])


def test_trusted_pickle_still_refuses_code(tmp_path):
    """weights_only=True rejects pickles that would construct arbitrary objects."""
    _hf_tiny(tmp_path)
    (tmp_path / "model.safetensors").unlink()

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(WorkbenchError, match="weights_only=True"):
        load_model(tmp_path, trust_pickle=True)


def test_not_a_qa_checkpoint(tmp_path):
    from safetensors.torch import load_file, save_file

    _hf_tiny(tmp_path)
    st = tmp_path / "model.safetensors"
    state = {k: v for k, v in load_file(st).items() if not k.startswith("qa_outputs")}
    save_file(state, st)
    with pytest.raises(WorkbenchError, match="no question-answering head"):
        load_model(tmp_path)



def test_gelu_tanh_gradient_is_finite_and_exact():
    """QAT trains through the engine's GELU: its gradient is the formula's derivative (float64 autograd of the
    same expression, where that is finite) and finite where exp overflows (y << 0), which a real model's FC1 meets."""
    from model.bert import gelu_tanh

    y = torch.cat([torch.linspace(-200, 200, 4001), torch.randn(1000) * 4]).requires_grad_()
    out = gelu_tanh(y)
    assert torch.equal(out.detach(), gelu_tanh(y.detach()))  # the forward is unchanged by the backward
    out.sum().backward()
    y64 = y.detach().double().requires_grad_()
    u = y64 + 0.044715 * y64 ** 3
    (y64 / (1 + torch.exp(-1.5957691216057308 * u))).sum().backward()
    finite = torch.isfinite(y64.grad)
    assert not finite.all()  # the naive derivative does overflow in this range
    assert torch.isfinite(y.grad).all()
    torch.testing.assert_close(y.grad[finite].double(), y64.grad[finite], rtol=1e-5, atol=1e-6)
    assert y.grad[y.detach() < -20].abs().max() == 0
