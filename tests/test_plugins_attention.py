"""plugins.attention: the reference against SDPA, the fused kernel against the reference (Triton's interpreter on
the CPU; BERT's shapes on a GPU in the `cuda` tests)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tests.test_plugins_common import DEVICE, gen, kernels, poison, rel  # noqa: F401

A = kernels("attention")
out_recip = kernels("common").out_recip


def problem(batch, s, heads, d, seed, padded=True, device=DEVICE):
    """FP16 QKV rows with BERT-like spread, and a key bias that pads the tail of every other sequence."""
    g = gen(seed)
    qkv = (torch.randn(batch * s, 3 * heads * d, generator=g) * 1.5).half()
    bias = None
    if padded:
        bias = torch.zeros(batch, s, dtype=torch.float16)
        for i in range(1, batch, 2):
            bias[i, s - s // 3:] = torch.finfo(torch.float16).min
    return qkv.to(device), bias.to(device) if bias is not None else None


def recips(ref: torch.Tensor, per_channel: bool):
    """Output scales that clip the top 20% of |context| (clamping exercised), per tensor or per channel."""
    if per_channel:
        return (127 / (0.8 * ref.float().abs().amax(dim=0).clamp_min(1e-3))).contiguous()
    return out_recip(0.8 * float(ref.float().abs().max()) / 127)


def assert_attention_codes(q, ref):
    """Codes within 1 of the reference's, and rarely off (the kernel rounds p to FP16 before p.v, module doc):
    under 1 in 50, the limit the engine builder holds the kernel to against SDPA (engines.tuning)."""
    from engines.tuning import attention_agrees

    assert q.dtype == torch.int8 and q.shape == ref.shape and int(q.min()) >= -127
    diff = (q.int().cpu() - ref.int().cpu()).abs()
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 0.02
    assert attention_agrees(q.cpu(), ref.cpu())


def test_reference_is_sdpa_in_float32():
    qkv, bias = problem(2, 24, 3, 16, seed=1, device="cpu")
    q, k, v = qkv.float().view(2, 24, 3, 3, 16).permute(2, 0, 3, 1, 4)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.float()[:, None, None, :])
    got = A.attention_reference(qkv, 2, 3, bias, out_dtype=torch.float32)
    assert torch.allclose(got, want.transpose(1, 2).reshape(48, 48), atol=1e-5, rtol=1e-5)


# The interpreter takes seconds per call with 128-query blocks: the CPU runs the small blocks (several key
# blocks per row, ragged edges), the GPU every candidate at BERT's shapes (test_cuda_bert_shapes).
CONFIGS = {c.name: c for c in (A.AttentionConfig(16, 16), A.AttentionConfig(32, 64))}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_small_blocks(config, poison):
    """S = 40 is ragged for both block sizes; with and without padding; FP16 out and INT8 codes (one scale,
    one per channel)."""
    cfg = CONFIGS[config]
    for padded in (False, True):
        qkv, bias = problem(2, 40, 2, 16, seed=3 + list(CONFIGS).index(config), padded=padded)
        ref32 = A.attention_reference(qkv, 2, 2, bias, out_dtype=torch.float32)
        out = A.fused_attention(qkv, 2, 2, bias, config=cfg)
        assert out.dtype == torch.float16 and rel(out, ref32) < 2e-3
        for per_channel in (False, True):
            r = recips(ref32, per_channel)
            r = r.to(qkv.device) if per_channel else r
            assert_attention_codes(A.fused_attention(qkv, 2, 2, bias, out_recip=r, config=cfg),
                                   A.attention_reference(qkv, 2, 2, bias, out_recip=r))


@pytest.mark.parametrize("config", [A.AttentionConfig(16, 16), A.AttentionConfig(16, 16, tma=True),
                                    A.AttentionConfig(32, 16, tma=True)], ids=lambda c: c.name)
def test_whole_blocks_without_masks_and_through_tma(config, poison):
    """S = 32, a multiple of both block sizes: the unmasked path (pointer loads, or TMA tiles that must not
    cross into the next sequence), with padding and without; FP16 out and INT8 codes per channel."""
    for padded in (False, True):
        qkv, bias = problem(3, 32, 2, 16, seed=11, padded=padded)
        ref32 = A.attention_reference(qkv, 3, 2, bias, out_dtype=torch.float32)
        assert rel(A.fused_attention(qkv, 3, 2, bias, config=config), ref32) < 2e-3
        r = recips(ref32, per_channel=True).to(qkv.device)
        assert_attention_codes(A.fused_attention(qkv, 3, 2, bias, out_recip=r, config=config),
                               A.attention_reference(qkv, 3, 2, bias, out_recip=r))


def test_padding_keys_get_no_weight():
    """A padded key changes nothing: the same sequence with garbage in its padded positions' K and V."""
    qkv, bias = problem(2, 32, 2, 16, seed=5)
    noisy = qkv.clone().view(2, 32, 3, 2, 16)
    noisy[1, 32 - 32 // 3:, 1:] = 100.0  # K and V of sequence 1's padding
    a = A.fused_attention(qkv, 2, 2, bias, config=A.AttentionConfig(16, 16))
    b = A.fused_attention(noisy.view(64, 96), 2, 2, bias, config=A.AttentionConfig(16, 16))
    assert torch.equal(a, b)


def test_bad_inputs_say_what_is_wrong():
    qkv, bias = problem(2, 16, 2, 16, seed=6)
    with pytest.raises(ValueError, match="not \\[batch \\* S"):
        A.fused_attention(qkv, 3, 2)
    with pytest.raises(ValueError, match="head size"):
        A.fused_attention(qkv[:, :72], 2, 2)
    with pytest.raises(ValueError, match="FP16/BF16"):
        A.fused_attention(qkv.float(), 2, 2)
    with pytest.raises(ValueError, match="key_bias"):
        A.fused_attention(qkv, 2, 2, bias[:, :8])
    with pytest.raises(ValueError, match="per-channel out_recip"):
        A.fused_attention(qkv, 2, 2, out_recip=torch.ones(8, device=qkv.device))
    with pytest.raises(ValueError, match="power of two"):
        A.AttentionConfig(48, 64)


def test_config_names_round_trip():
    for c in A.CANDIDATE_CONFIGS:
        assert A.AttentionConfig.parse(c.name) == c
    assert len({c.name for c in A.CANDIDATE_CONFIGS}) == len(A.CANDIDATE_CONFIGS)
    with pytest.raises(ValueError, match="not an attention configuration"):
        A.AttentionConfig.parse("fused-attention:64x64-w4-s2+cp")


@pytest.mark.cuda
@pytest.mark.parametrize("config", [c.name for c in A.CANDIDATE_CONFIGS])
@pytest.mark.parametrize("batch,s", [(1, 128), (3, 384)])
def test_cuda_bert_shapes(config, batch, s, poison):
    """BERT-large's heads (16 x 64) at batch 1 x 128 and a padded 3 x 384, against the reference and SDPA."""
    cfg = A.AttentionConfig.parse(config)
    qkv, bias = problem(batch, s, 16, 64, seed=batch * s)
    ref32 = A.attention_reference(qkv, batch, 16, bias, out_dtype=torch.float32)
    out = A.fused_attention(qkv, batch, 16, bias, config=cfg)
    assert rel(out, ref32) < 2e-3
    q, k, v = qkv.view(batch, s, 3, 16, 64).permute(2, 0, 3, 1, 4)
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=bias[:, None, None, :]).transpose(1, 2)
    assert rel(out, sdpa.reshape(batch * s, 1024)) < 3e-3
    r = recips(ref32, per_channel=False)
    assert_attention_codes(A.fused_attention(qkv, batch, 16, bias, out_recip=r, config=cfg),
                           A.attention_reference(qkv, batch, 16, bias, out_recip=r))
    assert math.isfinite(float(out.float().sum()))


# ------------------------------------------------------------------------------------------- -imh: INT8 attention


def problem_int8(batch, s, heads, d, seed, padded=True, device=DEVICE):
    """Q, K, V codes and scales that give BERT-like scores (std about 3), with the padding of `problem`."""
    g = gen(seed)
    codes = torch.randint(-127, 128, (batch * s, 3 * heads * d), dtype=torch.int8, generator=g)
    sqk = (3 / (127 * 127 / 3)) ** 0.5  # s_q = s_k: q.k has std 127**2 / 3 * sqrt(d), over sqrt(d)
    scales = A.AttentionScales(q=sqk, k=sqk * 1.1, v=0.02, probs=0.9 / 127)  # probabilities above 0.9 clamp
    _, bias = problem(batch, s, 1, 16, seed, padded, device)
    return codes.to(device), scales, bias


def assert_int8_attention_codes(q, ref, scales, r):
    """The INT8 kernel's context codes against the reference's: a probability code rounded the other way moves a
    context code by up to plugins.attention.context_code_step, in few places (the builder's check, the same)."""
    from engines.tuning import agrees

    assert q.dtype == torch.int8 and int(q.min()) >= -127
    assert agrees(q.cpu(), ref.cpu(), codes_off=1e-3, max_step=A.context_code_step(scales, r))


def test_int8_reference_is_the_fake_quant_function():
    """attention_int8_reference = the -imh fake-quant attention (codes dequantized, float64 math, probabilities
    rounded with s_p after the softmax, context rounded): only rounding-boundary cases may move a code by 1."""
    from quant.quantizer import quantize

    batch, s, heads, d = 2, 24, 3, 16
    codes, sc, bias = problem_int8(batch, s, heads, d, seed=31, device="cpu")
    q, k, v = codes.double().view(batch, s, 3, heads, d).permute(2, 0, 3, 1, 4)
    q, k, v = q * sc.q, k * sc.k, v * sc.v
    scores = q @ k.transpose(-1, -2) / math.sqrt(d) + bias.double()[:, None, None, :]
    p = quantize(scores.softmax(-1), sc.probs).double() * sc.probs
    ctx = (p @ v).transpose(1, 2).reshape(batch * s, heads * d)
    got = A.attention_int8_reference(codes, batch, heads, sc, bias, out_dtype=torch.float32)
    assert rel(got, ctx) < 1e-3
    r = recips(ctx, per_channel=False)
    assert_int8_attention_codes(A.attention_int8_reference(codes, batch, heads, sc, bias, out_recip=r),
                                quantize(ctx, 1 / r), sc, r)


INT8_CONFIGS = {c.name: c for c in (A.AttentionConfig(16, 16, int8=True), A.AttentionConfig(32, 64, int8=True))}


@pytest.mark.parametrize("config", list(INT8_CONFIGS))
@pytest.mark.parametrize("s,d", [(40, 16), (32, 32)], ids=["ragged-fp16dot", "even-int8dot"])
def test_int8_kernel_matches_reference(config, s, d, poison):
    """Ragged (masked) and whole blocks, q.k on FP16 (D = 16) and INT8 (D = 32) tensor cores, with and without
    padding; FP16 out and codes (one scale, one per channel)."""
    cfg = INT8_CONFIGS[config]
    for padded in (False, True):
        codes, sc, bias = problem_int8(2, s, 2, d, seed=s + d + padded, padded=padded)
        ref32 = A.attention_int8_reference(codes, 2, 2, sc, bias, out_dtype=torch.float32)
        out = A.fused_attention_int8(codes, 2, 2, sc, bias, config=cfg)
        assert out.dtype == torch.float16 and rel(out, ref32) < 2e-3
        for per_channel in (False, True):
            r = recips(ref32, per_channel)
            r = r.to(codes.device) if per_channel else r
            assert_int8_attention_codes(A.fused_attention_int8(codes, 2, 2, sc, bias, out_recip=r, config=cfg),
                                        A.attention_int8_reference(codes, 2, 2, sc, bias, out_recip=r), sc, r)


def test_context_code_step_bounds_one_flipped_probability():
    """One probability code off by 1 moves ctx by s_p * s_v * v_code: the step covers the largest V code."""
    sc = A.AttentionScales(q=0.1, k=0.1, v=0.02, probs=1 / 127)
    r = 127 / 0.5  # context amax 0.5
    step = A.context_code_step(sc, r)
    assert step == math.ceil(sc.probs * sc.v * 127 * r) + 1 == 7
    assert A.context_code_step(sc, torch.tensor([r / 2, r])) == step  # per channel: the finest scale counts


def test_int8_bad_inputs_say_what_is_wrong():
    codes, sc, _ = problem_int8(2, 16, 2, 16, seed=6)
    with pytest.raises(ValueError, match="INT8 codes"):
        A.fused_attention_int8(codes.half(), 2, 2, sc)
    with pytest.raises(ValueError, match="not an INT8 attention configuration"):
        A.fused_attention_int8(codes, 2, 2, sc, config=A.AttentionConfig(16, 16))
    long = torch.zeros(A.MAX_INT8_LENGTH + 16, 96, dtype=torch.int8)
    with pytest.raises(ValueError, match="exceed"):
        A.attention_int8_reference(long, 1, 2, sc)
    with pytest.raises(ValueError, match="no TMA"):
        A.AttentionConfig(16, 16, tma=True, int8=True)
    for c in A.INT8_CANDIDATE_CONFIGS:
        assert c.int8 and A.AttentionConfig.parse(c.name) == c


@pytest.mark.cuda
@pytest.mark.parametrize("config", [c.name for c in A.INT8_CANDIDATE_CONFIGS])
@pytest.mark.parametrize("batch,s", [(1, 128), (3, 384)])
def test_cuda_int8_bert_shapes(config, batch, s, poison):
    """BERT-large's heads (16 x 64) at batch 1 x 128 and a padded 3 x 384, against the reference."""
    cfg = A.AttentionConfig.parse(config)
    codes, sc, bias = problem_int8(batch, s, 16, 64, seed=batch * s)
    ref32 = A.attention_int8_reference(codes, batch, 16, sc, bias, out_dtype=torch.float32)
    assert rel(A.fused_attention_int8(codes, batch, 16, sc, bias, config=cfg), ref32) < 2e-3
    r = recips(ref32, per_channel=False)
    assert_int8_attention_codes(A.fused_attention_int8(codes, batch, 16, sc, bias, out_recip=r, config=cfg),
                                A.attention_int8_reference(codes, batch, 16, sc, bias, out_recip=r), sc, r)
