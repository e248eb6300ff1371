"""Padding-free execution (build --varlen): variable-length attention against the padded references, its Triton
kernels against their references (Triton's interpreter on the CPU), packing on the host, and packed, bucketed and
padded engines giving the same logits and answers on the CPU reference path; the CUDA graphs of the packed path
and the build's timing in the `cuda` tests."""
from __future__ import annotations

import dataclasses
import json
import types

import numpy as np
import pytest
import torch

import cli
from common.errors import WorkbenchError
from engines import backends
from engines.build import build_engine, kernel_choices, load_runnable
from engines.engine_file import (EngineHeader, Profile, length_buckets, packing_budget, pick_budget, read_header,
                                 save_engine)
from engines.graphs import GraphRunner
from engines.packed import (PATH_KEY, budget_layout, runs_packed, varlen_attention_candidates,
                            varlen_attention_key)
from engines.runtime import Engine
from engines.tuning import LIBRARY, agrees
from model.packing import batches_of, pack_padded, pack_windows, packed_batch, scatter_logits, window_lengths
from model.runner import run_logits
from quant.policy import PrecisionPolicy
from tests.test_engines import CFG, loaded_model, max_calibration
from tests.test_plugins_common import DEVICE, gen, kernels, poison, rel  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_torch_thread")

A = kernels("attention")
V = kernels("varlen_attention")  # after attention: it imports the interpreter's attention helpers
SQK = (3 / (127 * 127 / 3)) ** 0.5
SCALES = A.AttentionScales(q=SQK, k=SQK * 1.1, v=0.02, probs=0.9 / 127)  # as test_plugins_attention's


def windows(lengths, heads, d, seed, int8=False, tail=0, device=DEVICE):
    """Packed windows of `lengths` (0 allowed) and `tail` rows past the last (a graph's unused budget): FP16 QKV
    with BERT-like spread or Q, K, V codes; cu_seqlens int32 on the device."""
    g = gen(seed)
    total = sum(lengths) + tail
    if int8:
        qkv = torch.randint(-127, 128, (total, 3 * heads * d), dtype=torch.int8, generator=g)
    else:
        qkv = (torch.randn(total, 3 * heads * d, generator=g) * 1.5).half()
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32)
    return qkv.to(device), cu.to(device)


def random_lengths(n, longest, seed):
    """n window lengths in [1, longest], with 1 and `longest` among them (one window: `longest`)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, longest + 1, n)
    picks = rng.choice(n, min(n, 2), replace=False)
    lengths[picks] = (1, longest)[-len(picks):]
    return [int(x) for x in lengths]


def padded_batch(qkv, lengths, s):
    """The packed windows as a padded [n * s] batch (padding rows zero) and its key bias."""
    rows = torch.zeros(len(lengths) * s, qkv.shape[1], dtype=qkv.dtype)
    bias = torch.full((len(lengths), s), torch.finfo(torch.float16).min, dtype=torch.float16)
    start = 0
    for w, n in enumerate(lengths):
        rows[w * s:w * s + n] = qkv[start:start + n].cpu()
        bias[w, :n] = 0
        start += n
    return rows, bias


def real_rows(padded, lengths, s):
    """The real tokens' rows of a padded [n * s, H] output, packed."""
    return torch.cat([padded[w * s:w * s + n] for w, n in enumerate(lengths)])


# ------------------------------------------------------------------------------------------------ the references

@pytest.mark.parametrize("seed", [1, 2])
def test_references_match_the_padded_references_on_random_lengths(seed):
    """Per-window references = the padded references' real rows, FP and INT8, FP out and codes (one scale and
    per channel); windows of length 1 and the maximum among them."""
    heads, d, s = 3, 16, 48
    lengths = random_lengths(6, s, seed)
    qkv, cu = windows(lengths, heads, d, seed, device="cpu")
    rows, bias = padded_batch(qkv, lengths, s)
    want = real_rows(A.attention_reference(rows, len(lengths), heads, bias, out_dtype=torch.float32), lengths, s)
    got = V.varlen_attention_reference(qkv, cu, s, heads, out_dtype=torch.float32)
    assert got.shape == (sum(lengths), heads * d) and rel(got, want) < 1e-6
    r = 127 / (0.8 * float(want.abs().max()))
    for recip in (r, torch.full((heads * d,), r).contiguous()):
        codes = V.varlen_attention_reference(qkv, cu, s, heads, out_recip=recip)
        padded_codes = real_rows(A.attention_reference(rows, len(lengths), heads, bias, out_recip=recip), lengths, s)
        assert codes.dtype == torch.int8 and agrees(codes, padded_codes)
    codes, cu = windows(lengths, heads, d, seed, int8=True, device="cpu")
    rows, bias = padded_batch(codes, lengths, s)
    want = real_rows(A.attention_int8_reference(rows, len(lengths), heads, SCALES, bias, out_dtype=torch.float32),
                     lengths, s)
    assert rel(V.varlen_attention_int8_reference(codes, cu, s, heads, SCALES, out_dtype=torch.float32), want) < 1e-6
    r = 127 / (0.8 * float(want.abs().max()))
    assert agrees(V.varlen_attention_int8_reference(codes, cu, s, heads, SCALES, out_recip=r),
                  real_rows(A.attention_int8_reference(rows, len(lengths), heads, SCALES, bias, out_recip=r), lengths,
                            s), max_step=A.context_code_step(SCALES, r))


def test_library_families_are_the_references_through_padded_windows():
    """The library families (windows gathered into a padded batch and back, device ops only) against the
    per-window references; empty windows and rows past the last window (a graph's tail) included."""
    heads, d = 2, 16
    lengths = [5, 0, 1, 33, 0]
    qkv, cu = windows(lengths, heads, d, 3, tail=7, device="cpu")
    fp = backends.attention_backend(LIBRARY, "fp", varlen=True).run
    ref = V.varlen_attention_reference(qkv, cu, 40, heads, out_dtype=torch.float16)
    got = fp("", qkv, cu, 40, heads, out_dtype=torch.float16)
    assert got.shape == ref.shape and rel(got[:39], ref[:39]) < 2e-3 and not got[39:].any()
    codes, cu = windows(lengths, heads, d, 4, int8=True, tail=7, device="cpu")
    int8 = backends.attention_backend(LIBRARY, "int8", varlen=True).run
    for recip in (None, 40.0):
        want = V.varlen_attention_int8_reference(codes, cu, 40, heads, SCALES, out_recip=recip)
        assert torch.equal(int8("", codes, cu, 40, heads, scales=SCALES, out_recip=recip), want)


def test_bad_packed_inputs_say_what_is_wrong():
    qkv, cu = windows([3, 5], 2, 16, 5, device="cpu")
    with pytest.raises(ValueError, match="int32"):
        V.varlen_attention_reference(qkv, cu.long(), 8, 2)
    with pytest.raises(ValueError, match="exceeds max_seqlen 4"):
        V.varlen_attention_reference(qkv, cu, 4, 2)
    with pytest.raises(ValueError, match="not decrease"):
        V.varlen_attention_reference(qkv, torch.tensor([0, 5, 3], dtype=torch.int32), 8, 2)
    with pytest.raises(ValueError, match="exceed"):
        V.varlen_attention_int8_reference(qkv.to(torch.int8), cu, A.MAX_INT8_LENGTH + 1, 2, SCALES)
    with pytest.raises(ValueError, match="not an FP16 configuration"):
        V.fused_varlen_attention(qkv, cu, 8, 2, config=A.AttentionConfig(16, 16, int8=True))


# ------------------------------------------------------------------------------------------------ the kernels

# The interpreter takes about a second a call here: small blocks, ragged windows (several key blocks, partial
# ones), one empty window and a graph's tail rows; BERT's shapes run in the `cuda` tests.
# TMA boxes run past their window's end into the next window's rows and past the tensor's end (zeros).
KERNEL_CASES = [(A.AttentionConfig(16, 16), 16), (A.AttentionConfig(32, 16), 32),
                (A.AttentionConfig(16, 16, tma=True), 16), (A.AttentionConfig(32, 16, tma=True), 32)]


@pytest.mark.parametrize("config,d", KERNEL_CASES, ids=["16x16-d16", "32x16-d32", "16x16-tma-d16", "32x16-tma-d32"])
def test_fp16_kernel_matches_the_reference(config, d, poison):
    heads, lengths = 2, random_lengths(4, 40, 7 + d) + [0]
    qkv, cu = windows(lengths, heads, d, d, tail=5)
    total = sum(lengths)
    qkv[total:] = float("nan")  # tail rows no window owns: blocks that read them (TMA boxes do) must not use them
    ref32 = V.varlen_attention_reference(qkv, cu, 40, heads, out_dtype=torch.float32)
    out = V.fused_varlen_attention(qkv, cu, 40, heads, config=config)
    assert out.dtype == torch.float16 and rel(out[:total], ref32[:total]) < 2e-3
    r = (127 / (0.8 * ref32[:total].float().abs().amax(0).clamp_min(1e-3))).contiguous().to(qkv.device)
    codes = V.fused_varlen_attention(qkv, cu, 40, heads, out_recip=r, config=config)
    want = V.varlen_attention_reference(qkv, cu, 40, heads, out_recip=r)
    diff = (codes[:total].int().cpu() - want[:total].int().cpu()).abs()
    assert int(codes[:total].min()) >= -127 and int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 0.02


@pytest.mark.parametrize("config,d", [(A.AttentionConfig(16, 16, int8=True), 16),
                                      (A.AttentionConfig(32, 16, int8=True), 32)], ids=["fp16dot", "int8dot"])
def test_int8_kernel_matches_the_reference(config, d, poison):
    """q.k on FP16 (D = 16) and INT8 (D = 32) tensor cores; FP16 out and codes (per channel, one scale)."""
    heads, lengths = 2, random_lengths(4, 40, 11 + d) + [0]
    codes, cu = windows(lengths, heads, d, d, int8=True, tail=5)
    total = sum(lengths)
    ref32 = V.varlen_attention_int8_reference(codes, cu, 40, heads, SCALES, out_dtype=torch.float32)
    out = V.fused_varlen_attention_int8(codes, cu, 40, heads, SCALES, config=config)
    assert out.dtype == torch.float16 and rel(out[:total], ref32[:total]) < 2e-3
    r = 127 / (0.8 * float(ref32[:total].abs().max()))
    recip = torch.full((heads * d,), r).contiguous().to(codes.device) if d == 16 else r
    got = V.fused_varlen_attention_int8(codes, cu, 40, heads, SCALES, out_recip=recip, config=config)
    want = V.varlen_attention_int8_reference(codes, cu, 40, heads, SCALES, out_recip=recip)
    assert int(got[:total].min()) >= -127
    assert agrees(got[:total].cpu(), want[:total].cpu(), max_step=A.context_code_step(SCALES, recip))


def test_families_are_registered_per_layout():
    assert backends.attention_candidates(4, 64, "fp", gpu_kernels=False, varlen=True) == [LIBRARY]
    fp = backends.attention_candidates(4, 64, "fp", gpu_kernels=True, varlen=True)
    assert fp[0] == LIBRARY and {backends.split(i)[0] for i in fp[1:]} >= {backends.VARLEN_ATTENTION}
    int8 = backends.attention_candidates(4, 64, "int8", gpu_kernels=True, varlen=True)
    assert {backends.split(i)[0] for i in int8} == {LIBRARY, backends.VARLEN_INT8_ATTENTION}
    assert not any(i.startswith("varlen") for i in backends.attention_candidates(4, 64, "fp", gpu_kernels=True))
    assert not backends.runnable("fused-attention:16x64-w4-s2", "fp", True, attention=True, varlen=True)
    assert backends.runnable("varlen-attention:16x64-w4-s2", "fp", True, attention=True, varlen=True)
    assert not backends.runnable("varlen-attention:16x64-w4-s2", "fp", False, attention=True, varlen=True)
    with pytest.raises(WorkbenchError, match="variable-length attention implementation 'x:1'"):
        backends.attention_backend("x:1", "fp", varlen=True)


# ------------------------------------------------------------------------------------------------ packing

def test_packing_is_greedy_longest_first_within_both_limits():
    lengths = np.array([5, 30, 12, 1, 30, 7, 20])
    batches = pack_windows(lengths, token_budget=40, max_windows=3)
    assert [list(b) for b in batches] == [[1], [4], [6, 2, 5], [0, 3]]
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(lengths)))
    assert all(lengths[b].sum() <= 40 and len(b) <= 3 for b in batches)
    with pytest.raises(WorkbenchError, match="exceeds the token budget"):
        pack_windows(lengths, token_budget=25, max_windows=3)


def test_packed_batches_round_trip_to_their_rows():
    rng = np.random.default_rng(0)
    lengths = np.array([3, 8, 1, 6])
    mask = (np.arange(8)[None, :] < lengths[:, None]).astype(np.int64)
    ids, types_ = rng.integers(5, 100, (4, 8)) * mask, (np.arange(8)[None, :] >= 2) * mask
    batch = packed_batch(ids, types_, window_lengths(mask), np.array([1, 3, 2]))
    assert batch.cu_seqlens.tolist() == [0, 8, 14, 15] and batch.max_seqlen == 8
    assert batch.position_ids.tolist() == [*range(8), *range(6), 0]
    assert batch.input_ids.tolist() == [*ids[1], *ids[3, :6], ids[2, 0]]
    out = np.full((4, 8), -np.inf, dtype=np.float32)
    scatter_logits(out, batch, batch.input_ids.float())
    assert np.array_equal(out[1:], np.where(mask[1:].astype(bool), ids[1:], -np.inf)) and np.isinf(out[0]).all()
    with pytest.raises(WorkbenchError, match="real tokens come first"):
        window_lengths(np.array([[1, 0, 1, 0]]))


def test_a_packed_batch_runs_in_the_smallest_token_budget():
    header = types.SimpleNamespace(profiles=tuple(length_buckets([Profile(4, 128)], 32)))
    assert pick_budget(header, 100, 4, 90) == Profile(4, 32)        # 128 tokens hold 100
    assert pick_budget(header, 300, 3, 128) == Profile(4, 96)
    with pytest.raises(WorkbenchError, match="fit no token budget"):
        pick_budget(header, 100, 5, 30)                             # 5 windows: no budget takes more than 4
    with pytest.raises(WorkbenchError, match="fit no token budget"):
        pick_budget(header, 200, 2, 129)
    cpu = torch.device("cpu")  # the build's attention layouts: spread lengths, one window empty, none past max_seqlen
    assert budget_layout(4, 96, 64, cpu).tolist() == [0, 64, 96, 96, 96]      # 64, then 34 cut to the 32 left
    assert budget_layout(2, 768, 384, cpu).tolist() == [0, 384, 384] and budget_layout(1, 8, 8, cpu).tolist() == [0, 8]
    cu = budget_layout(384, 49152, 384, cpu)  # BERT's largest packed budget: full, lengths 96 to 384, mixed
    lengths = (cu[1:] - cu[:-1]).numpy()
    real = lengths[lengths > 0]
    assert len(lengths) == 384 and int(cu[-1]) == 49152 and lengths[-1] == 0 and real.max() == 384
    assert real[:-1].min() >= 96 and 200 < real.mean() < 280 and (np.diff(real[:-1]) > 0).any()
    cu = budget_layout(128, 49152, 384, cpu)  # fewer windows than the rows hold: 127 of them, then the tail
    assert (cu[1:-1] - cu[:-2]).min() >= 96 and cu[-1] == cu[-2] < 49152


# ------------------------------------------------------------------------------------------------ engines

def features(n, s, seed, vocab):
    """Featurized-looking windows: real tokens first, lengths 1 to s (both among them)."""
    lengths = np.array(random_lengths(n, s, seed))
    rng = np.random.default_rng(seed)
    mask = (np.arange(s)[None, :] < lengths[:, None]).astype(np.int64)
    ids = rng.integers(0, vocab, (n, s)) * mask
    types_ = (np.arange(s)[None, :] >= (lengths[:, None] // 3)) * mask
    return types.SimpleNamespace(input_ids=ids, token_type_ids=types_, attention_mask=mask)


def varlen_engine(policy, seed=3, profiles=(Profile(4, 64),)):
    loaded = loaded_model(seed=seed)
    header, tensors = build_engine(loaded, policy, list(profiles), max_calibration(loaded) if policy.quantized
                                   else None, torch.device("cpu"), None, varlen=True)
    return Engine(header, tensors, torch.device("cpu")).eval()


@pytest.mark.parametrize("name,policy", [("fp32", PrecisionPolicy()), ("int8", PrecisionPolicy(int8=True)),
                                         ("int8 -iln", PrecisionPolicy(int8=True, iln=True)),
                                         ("int8 -imh", PrecisionPolicy(int8=True, imh=True)),
                                         ("int8 -iln -imh", PrecisionPolicy(int8=True, iln=True, imh=True)),
                                         ("fp8", PrecisionPolicy(fp8=True))])
def test_packed_bucketed_and_padded_logits_agree(name, policy):
    """The CPU reference path: run_logits packed (the default for a --varlen engine), bucketed and padded give
    the same logits at every real position, -inf elsewhere; windows of 1 and 64 tokens among them."""
    engine = varlen_engine(policy, profiles=length_buckets([Profile(4, 64)], 16))
    runner = GraphRunner(engine)
    feats = features(11, 64, seed=len(name), vocab=CFG.vocab_size)
    assert engine.runs_packed and runner.runs_packed
    with torch.no_grad():
        packed = run_logits(runner, feats, torch.device("cpu"), batch_size=4, progress=False)
        bucketed = run_logits(runner, feats, torch.device("cpu"), batch_size=4, progress=False, packed=False)
        padded = run_logits(runner, feats, torch.device("cpu"), batch_size=4, progress=False, pad_to=64)
    real = feats.attention_mask.astype(bool)
    for p, b, d in zip(packed, bucketed, padded):
        assert np.isinf(p[~real]).all() and np.isfinite(p[real]).all()
        np.testing.assert_allclose(p[real], b[real], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(p[real], d[real], rtol=1e-4, atol=1e-4)


def test_packed_batches_fill_the_largest_budget_with_its_most_windows():
    """A profile of more, shorter rows beside the longest (16 x 16 beside 4 x 64: 256 tokens each) lets a packed
    batch hold up to 16 short windows, not 4; the logits stay those of the padded path."""
    assert packing_budget(types.SimpleNamespace(profiles=(Profile(1, 64), Profile(4, 64), Profile(16, 16)))) \
        == (256, 16)
    assert packing_budget(types.SimpleNamespace(profiles=(Profile(8, 16), Profile(2, 64)))) == (128, 8)
    engine = varlen_engine(PrecisionPolicy(), profiles=(Profile(4, 64), Profile(16, 16)))
    runner = GraphRunner(engine)
    assert engine.packing == runner.packing == (256, 16)
    feats = features(23, 64, seed=8, vocab=CFG.vocab_size)
    _, packs = batches_of(feats.attention_mask, 4, runner.packing)
    lengths = feats.attention_mask.sum(1)
    assert max(len(b) for b in packs) > 4 and all(lengths[b].sum() <= 256 and len(b) <= 16 for b in packs)
    assert len(packs) < len(batches_of(feats.attention_mask, 4)[1])
    with torch.no_grad():
        packed = run_logits(runner, feats, torch.device("cpu"), batch_size=4, progress=False)
        padded = run_logits(runner, feats, torch.device("cpu"), batch_size=4, progress=False, pad_to=64)
    real = feats.attention_mask.astype(bool)
    for p, d in zip(packed, padded):
        assert np.isinf(p[~real]).all()
        np.testing.assert_allclose(p[real], d[real], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("imh", [False, True], ids=["int8 fp16", "int8 fp16 -imh"])
def test_triton_varlen_attention_in_the_engine(imh, monkeypatch):
    """The engine's packed path on our Triton kernel (interpreter) against its library path: the same logits
    within attention's FP16 error."""
    engine = varlen_engine(PrecisionPolicy(int8=True, fp16=True, imh=imh), seed=12)
    x = features(3, 24, seed=5, vocab=CFG.vocab_size)
    batch = pack_padded(*(torch.from_numpy(a) for a in (x.input_ids, x.token_type_ids, x.attention_mask)))
    with torch.no_grad():
        want = engine.forward_packed(*batch.tensors, batch.max_seqlen)
        config = f"{backends.VARLEN_INT8_ATTENTION if imh else backends.VARLEN_ATTENTION}:16x16-w4-s2"
        monkeypatch.setattr(engine, "varlen_attention_impl", lambda tokens: config)
        calls = []
        kernel = V.fused_varlen_attention_int8 if imh else V.fused_varlen_attention
        monkeypatch.setattr(V, kernel.__name__, lambda *a, **k: calls.append(1) or kernel(*a, **k))
        got = engine.forward_packed(*batch.tensors, batch.max_seqlen)
    assert len(calls) == CFG.num_layers
    for g, w in zip(got, want):
        assert rel(g.float(), w.float()) < 3e-3


def test_build_time_candidates_agree_with_the_library(monkeypatch, poison):
    """The CUDA build's packed attention candidates (engines/packed.py), run here in the interpreter: a layout
    with an empty window and tail rows, which the check leaves out (kernels never write them); our kernel agrees
    with the library path as the build holds it (engine.attention_agreement)."""
    kernels("quantize")  # the library path's INT8 context pass, in the interpreter
    engine = varlen_engine(PrecisionPolicy(int8=True, fp16=True), seed=4)
    monkeypatch.setattr(engine, "use_triton", True)
    problem, candidates, calls = varlen_attention_candidates(engine, 3, 56, 24)
    assert problem.gemm == "varlen-attention" and problem.epilogue == "w3-spread->int8" and calls == 1
    assert list(candidates)[0] == LIBRARY and f"{backends.VARLEN_ATTENTION}:16x64-w4-s2" in candidates
    assert f"{backends.VARLEN_ATTENTION}:64x64-w4-s2+tma" in candidates
    ref = candidates[LIBRARY]()
    assert ref.shape == (37, CFG.hidden_size)  # windows of 24 and 13 and an empty one; 19 tail rows left out
    got = candidates[f"{backends.VARLEN_ATTENTION}:16x64-w4-s2"]()
    assert engine.attention_agreement()(got, ref)
    monkeypatch.setattr(engine, "use_triton", False)
    assert varlen_attention_candidates(engine, 3, 56, 24) is None


def test_same_answers_packed_bucketed_and_padded(tmp_path):
    """A tiny fine-tuned-shaped model's SQuAD file: the three paths give the same answers."""
    from data.answers import extract_answers
    from data.features import FeatureSettings, featurize
    from data.squad import load_squad
    from data.tokenizer import load_wordpiece
    from model.checkpoint import load_model
    from tests.test_calib_calibrate import make_tiny_model, write_squad

    folder = make_tiny_model(tmp_path / "model")
    squad = write_squad(tmp_path / "squad.json", paragraphs=5, questions=2)
    loaded = load_model(folder)
    wordpiece = load_wordpiece(folder, loaded.config.vocab_size)
    header, tensors = build_engine(loaded, PrecisionPolicy(), [Profile(4, 128)], None, torch.device("cpu"),
                                   wordpiece, varlen=True)
    runner = GraphRunner(Engine(header, tensors, torch.device("cpu")).eval())
    examples = load_squad(squad).examples
    feats = featurize(examples, wordpiece, FeatureSettings(128, 32, 16), cache=False, progress=False)
    with torch.no_grad():
        runs = [run_logits(runner, feats, torch.device("cpu"), batch_size=4, progress=False, **kw)
                for kw in ({}, dict(packed=False), dict(pad_to=128))]
    answers = [{k: v.text for k, v in extract_answers(examples, feats, *logits).items()} for logits in runs]
    assert answers[0] == answers[1] == answers[2] and len(answers[0]) == len(examples)


@pytest.mark.shared
def test_same_answers_on_dev_questions_with_the_shared_minilm():
    """The shared MiniLM, FP32 on the CPU: packed and bucketed give the same answers on 20 dev questions."""
    from data.answers import extract_answers
    from data.features import FeatureSettings, featurize
    from data.squad import load_squad
    from data.tokenizer import load_wordpiece
    from model.checkpoint import load_model
    from tests.conftest import DEV, MINILM

    loaded = load_model(MINILM)
    wordpiece = load_wordpiece(MINILM, loaded.config.vocab_size)
    header, tensors = build_engine(loaded, PrecisionPolicy(), [Profile(8, 384)], None, torch.device("cpu"),
                                   wordpiece, varlen=True)
    runner = GraphRunner(Engine(header, tensors, torch.device("cpu")).eval())
    examples = load_squad(DEV, limit=20).examples
    feats = featurize(examples, wordpiece, FeatureSettings(384, 128, 64), cache=False, progress=False)
    with torch.no_grad():
        runs = [run_logits(runner, feats, torch.device("cpu"), batch_size=8, progress=False, packed=p)
                for p in (True, False)]
    real = feats.attention_mask.astype(bool)
    np.testing.assert_allclose(runs[0][0][real], runs[1][0][real], rtol=1e-3, atol=1e-3)
    answers = [{k: v.text for k, v in extract_answers(examples, feats, *logits).items()} for logits in runs]
    assert answers[0] == answers[1]


# ------------------------------------------------------------------------------------------------ build --varlen

def test_build_varlen_round_trips_through_the_engine_file(tmp_path, capsys):
    from tests.test_calib_calibrate import make_tiny_model, write_squad

    folder = make_tiny_model(tmp_path / "model")
    squad = write_squad(tmp_path / "squad.json", paragraphs=3, questions=2)
    path, plain = tmp_path / "v.engine", tmp_path / "p.engine"
    assert cli.main(["build", "--model", str(folder), "-b", "4", "-s", "128", "--buckets", "64", "--varlen",
                     "-o", str(path), "--device", "cpu"]) == 0
    assert "packed (--varlen" in capsys.readouterr().out
    assert cli.main(["build", "--model", str(folder), "-b", "4", "-s", "128", "-o", str(plain), "--device",
                     "cpu"]) == 0
    header = read_header(path)
    assert header.varlen and runs_packed(header) and not read_header(plain).varlen
    assert "packed (--varlen)" in header.kernels["layer0.attention"]
    assert kernel_choices(header) == ["path: packed (built --varlen; the paths are timed by CUDA builds)"]
    engine, _ = load_runnable(path, torch.device("cpu"))
    assert engine.runs_packed and not load_runnable(plain, torch.device("cpu"))[0].runs_packed
    # a build that timed bucketed faster runs bucketed; headers written before --varlen read as not packed
    assert not runs_packed(dataclasses.replace(header, kernels={**header.kernels, PATH_KEY: "bucketed"}))
    old = {k: v for k, v in header.to_json().items() if k != "varlen"}
    assert EngineHeader.from_json(json.loads(json.dumps(old)), "old.engine").varlen is False
    with pytest.raises(WorkbenchError, match="'varlen' must be true or false"):
        EngineHeader.from_json({**header.to_json(), "varlen": "yes"}, "bad.engine")
    save_engine(tmp_path / "again.engine", header, load_runnable(path, torch.device("cpu"))[0].t)
    assert read_header(tmp_path / "again.engine").varlen
    assert cli.main(["bench", "-e", str(path), "--squad", str(squad), "--passes", "1", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "engine, packed" in out and "x padded" in out and "runs packed in eval and infer" in out
    assert cli.main(["bench", "-e", str(path), "--device", "cpu", "--iterations", "2", "--warmup", "1",
                     "--padded", "0.5"]) == 0
    assert "packed (built --varlen): B windows of 50% of S tokens" in capsys.readouterr().out
    assert cli.main(["build", "--model", str(folder), "--varlen", "--backend", "tensorrt", "-o",
                     str(tmp_path / "x.plan")]) == 2
    assert "--varlen builds our packed engine" in capsys.readouterr().err
    # without --buckets each profile is one budget, which the build says (a ladder is what makes packing pay)
    assert cli.main(["build", "--model", str(folder), "-b", "2", "-s", "64", "--varlen", "-o",
                     str(tmp_path / "one.engine"), "--device", "cpu"]) == 0
    said = capsys.readouterr()
    assert "--varlen without --buckets" in said.out + said.err
    assert cli.main(["build", "--model", str(folder), "-b", "2", "-s", "64", "--buckets", "32", "--varlen", "-o",
                     str(tmp_path / "ladder.engine"), "--device", "cpu"]) == 0
    said = capsys.readouterr()
    assert "--varlen without --buckets" not in said.out + said.err


def test_varlen_attention_choice_follows_the_header():
    """The header's packed attention per token budget, the nearest larger budget's for others, the library where
    the choice cannot run here (a GPU kernel on the CPU)."""
    engine = varlen_engine(PrecisionPolicy(int8=True))
    kernels = {varlen_attention_key(128): "toy-varlen:a", varlen_attention_key(256): "toy-varlen:b"}
    backends.register_attention(backends.AttentionBackend("toy-varlen", "fp", lambda n, s: ["a", "b"],
                                                          backends.attention_backend(LIBRARY, "fp", True).run,
                                                          varlen=True))
    try:
        engine.kernels.update(kernels)
        assert [engine.varlen_attention_impl(t) for t in (100, 128, 200, 999)] == ["toy-varlen:a", "toy-varlen:a",
                                                                                   "toy-varlen:b", "toy-varlen:b"]
        engine.kernels[varlen_attention_key(128)] = "varlen-attention:16x64-w4-s2"
        assert engine.varlen_attention_impl(64) == LIBRARY
    finally:
        backends.unregister("toy-varlen", "fp")
    assert engine.varlen_attention_impl(64) == LIBRARY


def test_path_choice_times_both_paths_and_refuses_a_packed_path_that_disagrees(monkeypatch, caplog):
    """The CUDA build's path choice (engines/packed.py), its passes run eagerly here and timed by a stand-in:
    the faster path is recorded with both times; a packed path whose logits differ runs bucketed."""
    import engines.packed as packed
    from engines.tuning import TimingCache

    engine = varlen_engine(PrecisionPolicy(int8=True), profiles=length_buckets([Profile(4, 32)], 16))
    clock = iter([2.0, 1.0] * 2)  # bucketed, packed (the faster); then the same again
    monkeypatch.setattr(packed, "_median_ms", lambda run: (run(), next(clock))[1])
    chosen = packed._choose_path(engine, TimingCache(None), "cpu-test")
    assert chosen == {PATH_KEY: "packed", "path.times": "packed 1.000 ms, bucketed 2.000 ms over 16 synthetic windows"}
    forward_packed = engine.forward_packed
    monkeypatch.setattr(engine, "forward_packed", lambda *a: tuple(t + 1.0 for t in forward_packed(*a)))
    with caplog.at_level("WARNING"):
        assert packed._choose_path(engine, TimingCache(None), "cpu-test")[PATH_KEY] == "bucketed"
    assert "differ from the bucketed path's" in caplog.text


# ------------------------------------------------------------------------------------------------ CUDA only

@pytest.mark.cuda
@pytest.mark.parametrize("int8", [False, True], ids=["fp16", "int8"])
def test_cuda_kernels_at_bert_shapes(int8, poison):
    """BERT-large's heads (16 x 64), 24 windows of up to 384 tokens, every candidate configuration; torch's
    varlen_attn too where this torch has it (FP16)."""
    lengths = random_lengths(24, 384, 3)
    qkv, cu = windows(lengths, 16, 64, 9, int8=int8, tail=100)
    total = sum(lengths)
    if int8:
        ref32 = V.varlen_attention_int8_reference(qkv, cu, 384, 16, SCALES, out_dtype=torch.float32)
        r = 127 / (0.8 * float(ref32[:total].abs().max()))
        want = V.varlen_attention_int8_reference(qkv, cu, 384, 16, SCALES, out_recip=r)
        for c in V.INT8_CANDIDATE_CONFIGS:
            assert rel(V.fused_varlen_attention_int8(qkv, cu, 384, 16, SCALES, config=c)[:total], ref32[:total]) < 2e-3
            got = V.fused_varlen_attention_int8(qkv, cu, 384, 16, SCALES, out_recip=r, config=c)
            assert agrees(got[:total].cpu(), want[:total].cpu(), max_step=A.context_code_step(SCALES, r)), c
        return
    ref32 = V.varlen_attention_reference(qkv, cu, 384, 16, out_dtype=torch.float32)
    for c in V.CANDIDATE_CONFIGS:
        assert rel(V.fused_varlen_attention(qkv, cu, 384, 16, config=c)[:total], ref32[:total]) < 2e-3, c
    if backends.runnable(backends.TORCH_VARLEN, "fp", True, attention=True, varlen=True):
        run = backends.attention_backend(backends.TORCH_VARLEN, "fp", varlen=True).run
        assert rel(run("", qkv, cu, 384, 16)[:total], ref32[:total]) < 3e-3


@pytest.mark.cuda
def test_cuda_packed_graphs_replay_any_batch_that_fits():
    """GraphRunner.packed on CUDA: each token budget's graph (fixed-size cu_seqlens, unused windows empty)
    replayed for batches of other sizes gives the engine's eager packed logits; budgets are reused."""
    loaded = loaded_model(seed=10)
    header, tensors = build_engine(loaded, PrecisionPolicy(int8=True, fp16=True), length_buckets(
        [Profile(4, 64)], 32), max_calibration(loaded), torch.device("cuda"), None, varlen=True)
    engine = Engine(header, tensors, torch.device("cuda")).eval()
    runner = GraphRunner(engine)
    for n, seed in ((4, 1), (2, 2), (3, 3), (1, 4)):
        x = features(n, 64, seed=seed, vocab=CFG.vocab_size)
        batch = pack_padded(*(torch.from_numpy(a) for a in (x.input_ids, x.token_type_ids, x.attention_mask)))
        args = [t.cuda() for t in batch.tensors]
        with torch.no_grad():
            want = engine.forward_packed(*args, batch.max_seqlen)
            got = runner.packed(*args, batch.max_seqlen)
        for g, w in zip(got, want):
            assert g.shape == w.shape and rel(g.float(), w.float()) < 1e-3
    assert len(runner.packed_graphs) == 2  # 4 x 32 and 4 x 64 budgets
    piped = list(runner.pipelined([batch.tensors], packed=True))
    assert rel(piped[0][0].float(), got[0].float().cpu()) < 1e-6


@pytest.mark.cuda
def test_cuda_varlen_build_times_the_packed_path(tmp_path):
    from engines.tuning import TimingCache

    loaded = loaded_model(seed=11)
    header, _ = build_engine(loaded, PrecisionPolicy(int8=True, fp16=True, imh=True),
                             length_buckets([Profile(8, 64)], 32), max_calibration(loaded), torch.device("cuda"),
                             None, TimingCache(tmp_path / "t.json"), varlen=True)
    assert header.kernels[PATH_KEY] in ("packed", "bucketed") and "path.times" in header.kernels
    assert {varlen_attention_key(256), varlen_attention_key(512)} <= set(header.kernels)
    assert kernel_choices(header)[-1].startswith(f"path: {header.kernels[PATH_KEY]} (packed ")
