"""SQuAD calibration pipeline: question selection, real-token-only collection, one range per site."""
from __future__ import annotations

import copy
import json
import math
import random

import numpy as np
import pytest
import torch

from calib.calibrate import (
    CalibrationSpec,
    calibrate,
    collect_ranges,
    summary_lines,
    load_calibration_model,
    overlap_warning,
    real_values,
    select_questions,
)
from calib.cache import cache_key, load_cache
from calib.calibrators import METHODS
from quant.policy import calibration_sites
from common.errors import WorkbenchError
from common.version import __version__
from data.features import Features, FeatureSettings, featurize
from data.squad import load_squad
from model.bert import all_sites
from tests.conftest import MINILM, TRAIN

WORDS = ("what", "is", "the", "capital", "of", "france", "paris", "river", "city", "king", "year", "built", "by",
         "north", "south", "a", "in", "was", "who", "when")
SETTINGS = FeatureSettings(max_seq_length=96, doc_stride=32, max_query_length=16)


def make_tiny_model(folder, layers: int = 2):
    """A random Hugging Face BertForQuestionAnswering (hidden 16) with a small uncased vocabulary."""
    from transformers import BertConfig, BertForQuestionAnswering

    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *letters, *(f"##{c}" for c in letters),
             "?", ".", ","]
    torch.manual_seed(0)
    BertForQuestionAnswering(BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=layers,
                                        num_attention_heads=2, intermediate_size=32,
                                        max_position_embeddings=512)).save_pretrained(folder)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return folder


def write_squad(path, *, seed: int = 0, paragraphs: int = 4, questions: int = 3, prefix: str = "q"):
    """A valid SQuAD v1.1 file of random text; contexts of 8 to 150 words so windows and padding vary."""
    rng = random.Random(seed)

    def word() -> str:
        return rng.choice(WORDS) if rng.random() < 0.7 else "".join(rng.choices("abcdefghij", k=rng.randint(2, 6)))

    paras = []
    for p in range(paragraphs):
        context = " ".join(word() for _ in range(rng.randint(8, 150))) + "."
        qas = []
        for q in range(questions):
            start = rng.randrange(0, len(context) - 1)
            start = context.rfind(" ", 0, start) + 1
            text = context[start:].split(" ")[0]
            qas.append({"id": f"{prefix}{p}-{q}", "question": " ".join(word() for _ in range(rng.randint(2, 9))) + "?",
                        "answers": [{"text": text, "answer_start": start}]})
        paras.append({"context": context, "qas": qas})
    path.write_text(json.dumps({"version": "1.1", "data": [{"title": "t", "paragraphs": paras}]}))
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = make_tiny_model(tmp_path_factory.mktemp("model") / "tiny")
    squad = load_squad(write_squad(tmp_path_factory.mktemp("data") / "train.json"))
    loaded, wordpiece = load_calibration_model(folder)
    features = featurize(squad.examples, wordpiece, SETTINGS, cache=False, progress=False)
    return loaded, wordpiece, squad, features


CPU = torch.device("cpu")


def _ranges(loaded, features, method="max", batch_size=4):
    return collect_ranges(loaded.model.eval(), features, calibration_sites(loaded.config.num_layers), method,
                          device=CPU, batch_size=batch_size, progress=False)


# ---------------------------------------------------------------- selection

def test_select_questions_is_seeded_sample_in_file_order(tiny):
    examples = tiny[2].examples
    picked = select_questions(examples, 5, seed=0)
    positions = [examples.index(ex) for ex in picked]
    expected = sorted(np.random.default_rng(0).choice(len(examples), size=5, replace=False))
    assert positions == expected and len(set(positions)) == 5
    assert select_questions(examples, 5, seed=0) == picked
    assert select_questions(examples, 5, seed=1) != picked
    assert select_questions(examples, len(examples) + 10, seed=3) == examples
    with pytest.raises(WorkbenchError, match="at least 1"):
        select_questions(examples, 0, seed=0)


@pytest.mark.parametrize("bad, words", [(dict(method="minmax"), "unknown calibration method"),
                                        (dict(method="percentile", percentile=0.0), "percentile"),
                                        (dict(calib_num=0), "at least 1"), (dict(seed=-1), "seed")])
def test_spec_rejects_bad_settings(bad, words):
    with pytest.raises(WorkbenchError, match=words):
        CalibrationSpec(**bad)


def test_settings_hold_only_what_changes_the_result():
    assert "percentile" in CalibrationSpec("percentile").settings("t")
    assert "percentile" not in CalibrationSpec("entropy").settings("t")
    assert "num_bins" not in CalibrationSpec("max").settings("t")  # max is exact anyway
    s = CalibrationSpec("mse", 7, 3, features=SETTINGS).settings("tok")
    assert [s[k] for k in ("calib_num", "seed", "max_seq_length", "doc_stride", "max_query_length", "num_bins",
                           "tokenizer_digest")] == [7, 3, 96, 32, 16, 2048, "tok"]
    assert "batch_size" not in s  # histogram ranges are fixed by a max pass: batching does not move them
    assert {"algorithm_version", "featurizer_version"} <= set(s)


def test_overlap_warning_counts_ids_and_contexts(tiny, tmp_path):
    squad = tiny[2]
    other = load_squad(write_squad(tmp_path / "other.json", seed=9, prefix="x"))
    assert overlap_warning(squad.examples, other) is None
    line = overlap_warning(squad.examples[:5], squad)
    assert line.startswith("5 of 5 calibration questions overlap") and "5 share a question id, 5 a context" in line


# ---------------------------------------------------------------- padding

def test_real_values_keep_exactly_the_real_tokens():
    b, n, s, d = 3, 2, 8, 4
    lengths = [8, 5, 1]
    valid = torch.arange(s)[None, :] < torch.tensor(lengths)[:, None]  # [B, S]
    rows = torch.from_numpy(np.flatnonzero(valid.numpy()))
    poison = 1e6

    tokens = torch.where(valid[:, :, None], torch.randn(b, s, d), poison)
    out = real_values(tokens, "tokens", rows, lengths)
    assert out.shape == (sum(lengths), d) and torch.equal(out, tokens[valid])

    qkv = torch.where(valid[:, :, None, None], torch.randn(b, s, n, d), poison)  # written [B, S, N*D] by the GEMM
    heads = qkv.permute(0, 2, 1, 3)
    out = real_values(heads, "heads", rows, lengths)
    assert out.abs().max() < poison and torch.equal(out, qkv[valid].reshape(-1, n * d))

    pair = valid[:, :, None] & valid[:, None, :]
    probs = torch.where(pair[:, None], torch.rand(b, n, s, s), poison)
    out = real_values(probs, "pairs", rows, lengths)
    assert out.numel() == n * sum(k * k for k in lengths) and out.max() < 1.0
    assert torch.equal(out.sort().values, probs.masked_select(pair[:, None]).sort().values)


class _PoisonModel(torch.nn.Module):
    """Calls the tap at every site with |values| <= 1 at real tokens and `pad` at every padded position."""

    def __init__(self, pad: float):
        super().__init__()
        self.pad = pad
        self.tap = lambda name, x: x

    def forward(self, ids, types, mask):
        b, s = ids.shape
        m = mask.bool()
        real = torch.sin(ids.float() * 0.37)  # [B, S], depends on the token only
        hidden = torch.where(m[:, :, None], real[:, :, None] * torch.linspace(0.1, 1, 6), self.pad)
        heads = torch.where(m[:, None, :, None], real[:, None, :, None] * torch.ones(b, 2, s, 3), self.pad)
        probs = torch.where((m[:, :, None] & m[:, None, :])[:, None], real[:, None, None, :].abs().expand(b, 2, s, s),
                            self.pad)
        for site in all_sites(1):
            kind = site.rpartition(".")[2]
            self.tap(site, heads if kind in "qkv" else probs if kind == "probs" else hidden)
        return real, real


def _padded_features(seed=0):
    rng = np.random.default_rng(seed)
    n, s = 9, 24
    lengths = rng.integers(3, s + 1, size=n)
    mask = (np.arange(s)[None] < lengths[:, None]).astype(np.int32)
    ids = np.where(mask == 1, rng.integers(1, 50, size=(n, s)), 0).astype(np.int32)
    zeros = np.zeros(n, np.int32)
    return Features(ids, np.zeros_like(ids), mask, np.arange(n, dtype=np.int32), np.full((n, s, 2), -1, np.int32),
                    zeros, zeros)


@pytest.mark.parametrize("method", METHODS)
def test_huge_values_at_padded_positions_change_nothing(method):
    features = _padded_features()
    sites = all_sites(1)
    clean = collect_ranges(_PoisonModel(0.0), features, sites, method, device=CPU, batch_size=4, progress=False)
    poisoned = collect_ranges(_PoisonModel(1e6), features, sites, method, device=CPU, batch_size=4, progress=False)
    assert poisoned == clean
    assert max(poisoned.values()) <= 1.0 + 1e-6
    if method == "max":
        real = np.abs(np.sin(features.input_ids[features.attention_mask == 1] * np.float32(0.37)))
        assert poisoned["layer0.q"] == pytest.approx(real.max(), rel=1e-6)


def test_padded_and_unpadded_runs_give_the_same_ranges(tiny):
    loaded, _, _, features = tiny
    lengths = features.attention_mask.sum(1)
    assert lengths.min() < features.attention_mask.shape[1] - 8  # the fixture really pads
    one_batch = _ranges(loaded, features, "max", batch_size=len(features))  # everything padded to the longest
    alone = _ranges(loaded, features, "max", batch_size=1)
    assert alone.keys() == one_batch.keys()
    for site in alone:
        assert one_batch[site] == pytest.approx(alone[site], rel=1e-5), site


@pytest.mark.parametrize("method", ["entropy", "percentile", "mse"])
def test_histogram_ranges_do_not_depend_on_batching(tiny, method):
    """The max pass fixes each histogram's range, so one batch or one feature at a time lands within a bin."""
    loaded, _, _, features = tiny
    upper = _ranges(loaded, features, "max", batch_size=len(features))
    one_batch = _ranges(loaded, features, method, batch_size=len(features))
    alone = _ranges(loaded, features, method, batch_size=1)
    for site in alone:
        assert abs(one_batch[site] - alone[site]) <= upper[site] / 2048 * 1.001 + 1e-9, site


@pytest.mark.parametrize("method", METHODS)
def test_padding_content_does_not_matter(tiny, method):
    """Garbage token ids and segment ids at padded positions: the same ranges for every method."""
    loaded, _, _, features = tiny
    pad = features.attention_mask == 0
    rng = np.random.default_rng(1)
    garbage = Features(np.where(pad, rng.integers(5, 20, size=pad.shape), features.input_ids).astype(np.int32),
                       np.where(pad, 1, features.token_type_ids).astype(np.int32), features.attention_mask,
                       features.example_index, features.offsets, features.start_positions, features.end_positions)
    clean = _ranges(loaded, features, method, batch_size=len(features))
    dirty = _ranges(loaded, garbage, method, batch_size=len(features))
    for site in clean:
        assert dirty[site] == pytest.approx(clean[site], rel=1e-5, abs=1e-7), site


def run_each_feature_alone(model, features: Features, tap) -> None:
    """Every feature through `model` on its own, at its exact length (no padding at all), with `tap` installed."""
    model.tap = tap
    try:
        with torch.inference_mode():
            for i, n in enumerate(features.attention_mask.sum(1)):
                model(*(torch.from_numpy(a[i:i + 1, :n]).long() for a in
                        (features.input_ids, features.token_type_ids, features.attention_mask)))
    finally:
        model.tap = lambda name, x: x


def test_max_is_the_true_max_over_real_tokens(tiny):
    """Our own tap over each feature run alone at its exact length (no padding at all) agrees with method max."""
    loaded, _, _, features = tiny
    model = loaded.model.eval()
    truth: dict[str, float] = {}

    def record(name, x):
        truth[name] = max(truth.get(name, 0.0), float(x.abs().max()))
        return x

    run_each_feature_alone(model, features, record)
    ranges = _ranges(loaded, features, "max", batch_size=5)
    assert ranges.keys() == truth.keys() == set(calibration_sites(loaded.config.num_layers))
    for site, amax in truth.items():
        assert ranges[site] == pytest.approx(amax, rel=1e-5), site


@pytest.mark.parametrize("method", METHODS)
def test_every_site_gets_a_finite_range(tiny, method):
    loaded, _, _, features = tiny
    ranges = _ranges(loaded, features, method)
    assert list(ranges) == list(calibration_sites(loaded.config.num_layers))
    assert all(math.isfinite(a) and a > 0 for a in ranges.values())
    assert all(ranges[f"layer{i}.probs"] <= 1.0 for i in range(loaded.config.num_layers))


@pytest.mark.cuda
@pytest.mark.parametrize("method", METHODS)
def test_cuda_agrees_with_the_cpu(tiny, method):
    loaded, _, _, features = tiny
    cpu = _ranges(loaded, features, method)
    model = copy.deepcopy(loaded.model).cuda().eval()
    gpu = collect_ranges(model, features, calibration_sites(loaded.config.num_layers), method,
                         device=torch.device("cuda"), batch_size=4, progress=False)
    assert gpu.keys() == cpu.keys() and all(math.isfinite(a) and a > 0 for a in gpu.values())
    if method in ("max", "percentile"):  # exact / within a bin; entropy and mse may pick another local minimum
        for site in cpu:
            assert gpu[site] == pytest.approx(cpu[site], rel=2e-3), site


def test_sites_the_model_never_reaches_are_an_error(tiny):
    loaded, _, _, features = tiny
    with pytest.raises(WorkbenchError, match="never reached calibration site layer7.q"):
        collect_ranges(loaded.model, features, [*calibration_sites(2), "layer7.q"], "max", device=CPU,
                       progress=False)


# ---------------------------------------------------------------- the whole pipeline

def test_calibrate_saves_a_cache_keyed_by_its_inputs(tiny, tmp_path):
    loaded, wordpiece, squad, _ = tiny
    spec = CalibrationSpec("percentile", calib_num=5, seed=2, percentile=99.9, features=SETTINGS)
    out = tmp_path / "c.json"
    run = calibrate(squad, loaded, wordpiece, spec, device=CPU, batch_size=4, output=out, progress=False)
    assert not run.reused and run.num_features >= 5 and load_cache(out) == run.cache
    assert run.cache.num_samples == 5 and run.cache.data_digest == squad.digest
    assert run.cache.key() == cache_key("percentile", spec.settings(wordpiece.digest), 5, loaded.digest,
                                        squad.digest, __version__)
    again = calibrate(squad, loaded, wordpiece, spec, device=CPU, batch_size=4, output=out, progress=False)
    assert again.reused and again.cache == run.cache
    assert calibrate(squad, loaded, wordpiece, spec, device=CPU, batch_size=2, output=out, progress=False).reused
    spec = CalibrationSpec("max", calib_num=5, seed=2, features=SETTINGS)
    assert not calibrate(squad, loaded, wordpiece, spec, device=CPU, batch_size=4, output=out, progress=False).reused
    assert calibrate(squad, loaded, wordpiece, spec, device=CPU, batch_size=2, output=out, progress=False).reused


@pytest.mark.shared
def test_minilm_on_16_train_questions():
    loaded, wordpiece = load_calibration_model(MINILM)
    run = calibrate(load_squad(TRAIN), loaded, wordpiece, CalibrationSpec("entropy", calib_num=16), device=CPU,
                    batch_size=16, progress=False)
    ranges = run.cache.ranges
    assert set(ranges) == set(calibration_sites(6)) and len(ranges) == 49
    assert all(math.isfinite(r.amax) and r.amax > 0 for r in ranges.values())
    assert run.cache.num_samples == 16 and run.num_features >= 16


def test_smoothing_vectors_and_smoothed_ranges(tiny, tmp_path):
    """--smooth: s from the real tokens' per-channel maxima and the reading GEMM's weight; max method's amax is
    then exactly max |x / s| over real tokens; the other sites are untouched, and the cache keys on alpha."""
    from calib.calibrate import smoothing_vectors
    from quant.smoothing import smoothable_sites, smoothing_factors

    loaded, wordpiece, squad, features = tiny
    model = loaded.model.eval()
    sites = smoothable_sites(loaded.config.num_layers)
    chmax: dict[str, torch.Tensor] = {}
    smooth = smoothing_vectors(model, features, 0.5, device=CPU, batch_size=3, progress=False)
    assert set(smooth) == set(sites)
    ratio: dict[str, float] = {}

    def record(name, x):
        if name in sites:
            m = x.abs().reshape(-1, x.shape[-1]).amax(0)
            chmax[name] = torch.maximum(chmax.get(name, m), m)
            ratio[name] = max(ratio.get(name, 0.0), float((x / smooth[name]).abs().max()))
        return x

    run_each_feature_alone(model, features, record)
    for site, (layer, gemm) in sites.items():
        want = smoothing_factors(chmax[site], getattr(model.layers[layer], gemm).weight, 0.5)
        assert torch.allclose(smooth[site], want, rtol=1e-5), site
        assert float(smooth[site].max()) == pytest.approx(1.0)
    plain = _ranges(loaded, features, "max", batch_size=5)
    smoothed = collect_ranges(model, features, calibration_sites(loaded.config.num_layers), "max", device=CPU,
                              batch_size=5, progress=False, smooth=smooth)
    for site in plain:
        want = ratio[site] if site in sites else plain[site]
        assert smoothed[site] == pytest.approx(want, rel=1e-5), site

    spec = CalibrationSpec("entropy", calib_num=5, seed=2, features=SETTINGS, smooth=0.5)
    run = calibrate(squad, loaded, wordpiece, spec, device=CPU, batch_size=4, output=tmp_path / "s.json",
                    progress=False)
    assert {k for k, r in run.cache.ranges.items() if r.smooth is not None} == set(sites)
    assert run.cache.settings["smooth_alpha"] == 0.5 and load_cache(tmp_path / "s.json") == run.cache
    assert "smoothed" in summary_lines(run)[0]
    plain_spec = CalibrationSpec("entropy", calib_num=5, seed=2, features=SETTINGS)
    assert plain_spec.settings("t") != spec.settings("t")
    with pytest.raises(WorkbenchError, match=r"\[0, 1\]"):
        CalibrationSpec("entropy", smooth=1.5)
