"""The QAT model computes the fake-quant reference's function exactly at init, and exposes its ranges as parameters."""
from __future__ import annotations

import types

import pytest
import torch

import model.bert as bert
from model.bert import BertQA, leaves_alone, no_tap
from qat.model import QATLinear, freeze_scales, learned_spec, qat_model, scale_parameters, smoothing_of
from quant.fakequant import fake_quant_model
from quant.policy import PrecisionPolicy, calibration_sites
from quant.smoothing import smoothable_sites
from quant.spec import PER_CHANNEL, QuantSpec, ScaleSource
from tests.test_engines import CFG, POLICIES, inputs, loaded_model  # noqa: F401 (inputs: the other QAT tests)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_model(seed: int = 0) -> BertQA:
    """A random model with non-trivial biases and LayerNorms (tests/test_engines.py's)."""
    return loaded_model(seed).model


def max_ranges(model: BertQA, smooth: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
    """amax = max |x| (of x / s at a smoothed site) of every site on random inputs."""
    smooth = smooth or {}
    amax: dict[str, float] = {}

    def tap(name, x):
        y = x / smooth[name] if name in smooth else x
        amax[name] = max(amax.get(name, 0.0), float(y.abs().max()))
        return x

    model.tap = tap
    with torch.no_grad():
        model(*inputs(batch=4, seq=48, seed=7))
    model.tap = lambda name, x: x
    assert set(amax) == set(calibration_sites(CFG.num_layers))
    return amax


def smoothing_vectors(seed: int = 5) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {site: (0.2 + torch.rand(CFG.intermediate_size if gemm == "fc2" else CFG.hidden_size, generator=g))
            for site, (_, gemm) in smoothable_sites(CFG.num_layers).items()}


def spec_for(model, policy, smooth=None):
    smooth = smooth or {}
    return policy.spec(CFG.num_layers, max_ranges(model, smooth), ScaleSource("fixed"), set(smooth))


@pytest.mark.parametrize("name", list(POLICIES))
def test_equals_fake_quant_model_at_init(name):
    model, policy = tiny_model(3), POLICIES[name]
    spec = spec_for(model, policy)
    x = inputs(seed=11)
    with torch.no_grad():
        want = fake_quant_model(model, policy, spec)(*x)
        got = qat_model(model, policy, spec)(*x)
        ref = model(*x)
    for g, w, r in zip(got, want, ref):
        assert torch.equal(g, w)
        assert not torch.equal(g, r)  # the quantization did something


@pytest.mark.parametrize("name", ["int8", "int8 -iln", "int8 -iln -imh"])
def test_equals_fake_quant_model_with_smoothed_sites(name):
    model, policy, smooth = tiny_model(4), POLICIES[name], smoothing_vectors()
    spec = spec_for(model, policy, smooth)
    assert any(s.granularity == PER_CHANNEL for s in spec.sites.values())
    x = inputs(seed=12)
    with torch.no_grad():
        want = fake_quant_model(model, policy, spec, smooth)(*x)
        qm = qat_model(model, policy, spec, smooth)
        got = qm(*x)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    assert smoothing_of(qm).keys() == {s for s in smooth if s in spec.sites}


def test_scales_are_parameters_and_learned_spec_round_trips():
    model, policy, smooth = tiny_model(), POLICIES["int8 -iln -imh"], smoothing_vectors()
    spec = spec_for(model, policy, smooth)
    qm = qat_model(model, policy, spec, smooth)
    params = {id(p) for p in qm.parameters()}
    amax = scale_parameters(qm)
    assert len(amax) == len(spec.sites) and all(id(p) in params for p in amax)
    assert all(p.requires_grad for p in amax)
    learned = learned_spec(qm)
    assert list(learned.sites) == list(spec.sites)  # forward order
    for site, s in learned.sites.items():
        assert s.amax == float(torch.tensor(spec.sites[site].amax, dtype=torch.float32))
        assert s.scale == spec.sites[site].scale and s.granularity == spec.sites[site].granularity
        assert str(s.source) == "qat"
    assert qm.layers[0].qkv.weight is not model.layers[0].qkv.weight  # a copy
    assert isinstance(qm.layers[0].fc2, QATLinear)
    # state-dict names of the reference model are kept; the ranges sit beside them
    names = set(qm.state_dict())
    assert set(model.state_dict()) <= names and "quantizers.layer0_probs.amax" in names
    freeze_scales(qm)
    assert not any(p.requires_grad for p in scale_parameters(qm))


def test_gradients_reach_weights_and_scales():
    model, policy = tiny_model(), POLICIES["int8 -iln -imh"]
    qm = qat_model(model, policy, spec_for(model, policy)).train()
    start, end = qm(*inputs())
    (start.logsumexp(-1).sum() + end[:, 3].sum()).backward()
    assert qm.layers[0].fc1.weight.grad is not None and qm.layers[0].fc1.weight.grad.abs().sum() > 0
    assert qm.embeddings.word.weight.grad.abs().sum() > 0
    moved = [p for p in scale_parameters(qm) if p.grad is not None and p.grad != 0]
    assert len(moved) == len(scale_parameters(qm))


def test_no_int8_is_the_plain_model():
    model = tiny_model()
    plain = qat_model(model, PrecisionPolicy(), QuantSpec())
    x = inputs()
    with torch.no_grad():
        for g, w in zip(plain(*x), model(*x)):
            assert torch.equal(g, w)
    assert scale_parameters(plain) == []


@pytest.mark.parametrize("name", ["fp32", "int8", "int8 -imh"])
def test_fused_training_attention_is_the_explicit_function(name, monkeypatch):
    """GPU training runs attention as SDPA where the probabilities are neither rounded nor recorded
    (model.bert.fuses_attention); forced here on the CPU: the same logits and gradients as the explicit softmax,
    with a padded row. Under -imh the probabilities are rounded, so the explicit form runs even when forced."""
    model = tiny_model(6)
    policy = POLICIES[name] if name != "fp32" else PrecisionPolicy()
    spec = spec_for(model, policy) if policy.quantized else QuantSpec()
    x = inputs(seed=13)
    assert leaves_alone(no_tap, "layer0.probs") and not leaves_alone(lambda site, t: t, "layer0.probs")
    qm = qat_model(model, policy, spec)
    assert leaves_alone(qm.tap, "layer0.probs") == (not policy.imh) and leaves_alone(qm.tap, "layer0.ffn_ln_out") \
        == (not policy.iln)
    assert not bert.fuses_attention(x[0].float(), qm.tap, "layer0.probs")  # the CPU: never
    gpu = types.SimpleNamespace(is_cuda=True)  # fuses_attention reads only the tensor's device
    assert not bert.fuses_attention(gpu, no_tap, "layer0.probs")  # outside a training step: evaluation's form
    with bert.training_step():
        assert bert.fuses_attention(gpu, no_tap, "layer0.probs")
        assert not bert.fuses_attention(gpu, lambda site, t: t, "layer0.probs")  # a tap that records the site
    assert not bert.fuses_attention(gpu, no_tap, "layer0.probs")

    def run(fused):
        monkeypatch.setattr(bert, "fuses_attention", lambda t, tap, site: fused and leaves_alone(tap, site))
        copy = qat_model(model, policy, spec).train()
        start, end = copy(*x)
        (start.logsumexp(-1).sum() + end[:, 5].sum()).backward()
        return start, end, {k: p.grad for k, p in copy.named_parameters() if p.grad is not None}
    explicit, fused = run(False), run(True)
    real = x[2].bool()
    for a, b in zip(explicit[:2], fused[:2]):
        torch.testing.assert_close(a[real], b[real], rtol=1e-5, atol=1e-5)
    assert explicit[2].keys() == fused[2].keys()
    for k in explicit[2]:
        torch.testing.assert_close(explicit[2][k], fused[2][k], rtol=1e-4, atol=1e-5)
