"""The QAT / fine-tuning loop on a tiny model and synthetic SQuAD: the loss falls, ranges learn or stay frozen,
checkpoints resume bit for bit, and run_qat / run_finetune write model folders."""
from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from calib.cache import CalibrationCache, TensorRange, save_cache
from common.errors import WorkbenchError
from data.features import FeatureSettings, featurize
from data.squad import Answer, Example
from data.tokenizer import load_wordpiece
from model.checkpoint import load_model
from qat import TrainConfig, read_qat_scales, run_finetune, run_qat, train
from qat.folder import save_model_folder
from qat.model import learned_spec, qat_model, scale_parameters
from qat.train import qa_loss
from quant.policy import PrecisionPolicy
from quant.spec import QuantSpec, ScaleSource
from tests.test_qat_model import CFG, max_ranges, smoothing_vectors, tiny_model

WORDS = [f"w{i}" for i in range(100)]
SETTINGS = FeatureSettings(max_seq_length=32, doc_stride=8, max_query_length=6)
POLICY = PrecisionPolicy(int8=True, iln=True, imh=True)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def squad_examples(n: int = 12, seed: int = 0) -> list[Example]:
    """Questions "what is wA" about a context of random words; the answer is the word after wA."""
    rng = np.random.default_rng(seed)
    examples = []
    for i in range(n):
        words = [WORDS[j] for j in rng.choice(len(WORDS), 18, replace=False)]
        k = int(rng.integers(0, len(words) - 1))
        context = " ".join(words)
        answer = words[k + 1]
        start = len(" ".join(words[:k + 1])) + 1
        examples.append(Example(f"q{i}", f"what is {words[k]}", context, (Answer(answer, start),)))
    return examples


def model_folder(tmp_path: Path, seed: int = 0) -> Path:
    folder = tmp_path / "source"
    save_model_folder(folder, tiny_model(seed), None)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "what", "is", *WORDS]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    return folder


def features_of(folder: Path, n: int = 12):
    return featurize(squad_examples(n), load_wordpiece(folder, CFG.vocab_size), SETTINGS, cache=False,
                     progress=False)


def config(tmp_path: Path, **kw) -> TrainConfig:
    base = dict(output_dir=str(tmp_path / "out"), max_steps=6, batch_size=4, lr=2e-3, scale_lr=1e-2,
                warmup_ratio=0.0, checkpoint_every=2, progress=False, device="cpu")
    return TrainConfig(**{**base, **kw})


def dataset_loss(model, feats) -> float:
    model.eval()
    device = next(model.parameters()).device
    t = lambda a: torch.from_numpy(a).long().to(device)  # noqa: E731
    with torch.no_grad():
        start, end = model(t(feats.input_ids), t(feats.token_type_ids), t(feats.attention_mask))
        return float(qa_loss(start, end, t(feats.start_positions), t(feats.end_positions)))


def qat_student(seed: int = 0, learn: bool = True, policy: PrecisionPolicy = POLICY):
    model = tiny_model(seed)
    spec = policy.spec(CFG.num_layers, max_ranges(model), ScaleSource("fixed"))
    return model, qat_model(model, policy, spec, learn_scales=learn)


def test_synthetic_features_hold_answers(tmp_path):
    feats = features_of(model_folder(tmp_path))
    assert len(feats) >= 12 and (feats.start_positions > 0).sum() >= 10
    assert (feats.end_positions >= feats.start_positions).all()


def test_qat_steps_lower_the_loss_and_learn_scales(tmp_path):
    feats = features_of(model_folder(tmp_path))
    _, student = qat_student()
    before_loss = dataset_loss(student, feats)
    before = [float(p.detach()) for p in scale_parameters(student)]
    result = train(student, feats, config(tmp_path, max_steps=12))
    assert result.step == 12 and len(result.losses) == 12
    assert dataset_loss(student, feats) < before_loss - 0.1
    after = [float(p.detach()) for p in scale_parameters(student)]
    assert sum(a != b for a, b in zip(after, before)) >= len(before) // 2, "learned ranges did not move"
    spec = learned_spec(student)
    assert [s.amax for s in spec.sites.values()] == after


def test_frozen_scales_stay_fixed(tmp_path):
    feats = features_of(model_folder(tmp_path))
    _, student = qat_student()
    before = [float(p.detach()) for p in scale_parameters(student)]
    w0 = student.layers[0].fc1.weight.detach().clone()
    train(student, feats, config(tmp_path, max_steps=4, freeze_scales=True))
    assert [float(p.detach()) for p in scale_parameters(student)] == before
    assert not torch.equal(student.layers[0].fc1.weight, w0)


def test_distillation_and_finetune_train(tmp_path):
    feats = features_of(model_folder(tmp_path))
    teacher, student = qat_student()
    before = dataset_loss(student, feats)
    result = train(student, feats, config(tmp_path, max_steps=8, distill=True), teacher=teacher)
    assert all(np.isfinite(result.losses)) and dataset_loss(student, feats) < before
    assert all(not p.requires_grad for p in teacher.parameters())
    plain = qat_model(tiny_model(), PrecisionPolicy(), QuantSpec())
    before = dataset_loss(plain, feats)
    train(plain, feats, config(tmp_path, max_steps=8, output_dir=str(tmp_path / "ft")))
    assert dataset_loss(plain, feats) < before


def test_the_teachers_forward_is_part_of_the_training_step(tmp_path, monkeypatch):
    """Both forwards of a distillation step run inside model.bert.training_step, so on a GPU the teacher's
    attention runs fused like the student's (fuses_attention is asked with the step's flag set, under no_grad for
    the teacher); the dataset loss read afterwards runs outside it."""
    import model.bert as bert
    feats = features_of(model_folder(tmp_path))
    teacher, student = qat_student()
    asked = []
    monkeypatch.setattr(bert, "fuses_attention", lambda x, tap, site: asked.append(
        (bert._TRAINING.get(), torch.is_grad_enabled())) or False)
    train(student, feats, config(tmp_path, max_steps=1, distill=True), teacher=teacher)
    layers = CFG.num_layers
    assert asked == [(True, True)] * layers + [(True, False)] * layers  # the student's layers, then the teacher's
    dataset_loss(student, feats)
    assert asked[-1] == (False, False)


def test_distillation_flags_reach_the_config_and_alpha_one_ignores_the_labels(tmp_path):
    import cli
    from qat.run import train_config_from_flags
    flags = cli.build_parser().parse_args(["qat", "--squad", "t.json", "--model", "m", "--calib-cache", "c.json",
                                           "-o", str(tmp_path), "--distill", "--distill-alpha", "1",
                                           "--distill-temperature", "3", "--scale-lr", "2e-3"])
    cfg = train_config_from_flags(flags)
    assert (cfg.distill, cfg.distill_alpha, cfg.distill_temperature, cfg.scale_lr) == (True, 1.0, 3.0, 2e-3)
    assert cfg.distill_hidden == 0.0 and train_config_from_flags(cli.build_parser().parse_args(
        ["prune", "--squad", "t.json", "--model", "m", "-o", str(tmp_path), "--distill", "--distill-hidden",
         "2"])).distill_hidden == 2.0
    with pytest.raises(WorkbenchError, match="add --distill"):
        train_config_from_flags(cli.build_parser().parse_args(
            ["qat", "--squad", "t.json", "--model", "m", "--calib-cache", "c.json", "-o", str(tmp_path),
             "--distill-hidden", "1"]))
    assert train_config_from_flags(cli.build_parser().parse_args(
        ["finetune", "--squad", "t.json", "--model", "m", "-o", str(tmp_path)])).scale_lr == TrainConfig.scale_lr
    with pytest.raises(WorkbenchError, match="add --distill"):  # the weight of a loss term that is not there
        train_config_from_flags(cli.build_parser().parse_args(
            ["prune", "--squad", "t.json", "--model", "m", "-o", str(tmp_path), "--distill-alpha", "1"]))
    torch.manual_seed(0)
    start, end = torch.randn(4, 16), torch.randn(4, 16)
    teacher = (torch.randn(4, 16), torch.randn(4, 16))
    labels = [torch.randint(0, 16, (4,)) for _ in range(4)]
    taught = [float(qa_loss(start, end, s, e, teacher, alpha=1.0)) for s, e in (labels[:2], labels[2:])]
    assert taught[0] == taught[1]          # the labels play no part
    mixed = [float(qa_loss(start, end, s, e, teacher, alpha=0.5)) for s, e in (labels[:2], labels[2:])]
    assert mixed[0] != mixed[1]


class Interrupt(Exception):
    pass


def test_resumed_run_matches_an_uninterrupted_one(tmp_path):
    feats = features_of(model_folder(tmp_path))
    cfg = config(tmp_path, max_steps=7, batch_size=5, checkpoint_every=2, warmup_ratio=0.3,
                 output_dir=str(tmp_path / "a"))
    _, whole = qat_student()
    full = train(whole, feats, cfg)

    cfg_b = config(tmp_path, max_steps=7, batch_size=5, checkpoint_every=2, warmup_ratio=0.3,
                   output_dir=str(tmp_path / "b"))

    def stop(step, loss):
        if step == 5:
            raise Interrupt

    _, first = qat_student()
    with pytest.raises(Interrupt):
        train(first, feats, cfg_b, callback=stop)
    ckpts = tmp_path / "b" / "checkpoints"
    assert json.loads((ckpts / "latest.json").read_text())["step"] == 4
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == ["step-0000004"]  # keep_checkpoints=1
    _, second = qat_student()  # a fresh process would start from the source model again
    resumed = train(second, feats, cfg_b)
    assert resumed.resumed_from == 4 and resumed.step == 7
    assert resumed.losses == full.losses  # same loss at every step, the ones before the interruption included
    a, b = whole.state_dict(), second.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # settings that change the trajectory are refused
    _, third = qat_student()
    with pytest.raises(WorkbenchError, match="other settings.*lr"):
        train(third, feats, config(tmp_path, max_steps=7, batch_size=5, lr=1e-3, output_dir=str(tmp_path / "b")))
    assert not any(p.suffix == ".tmp" for p in ckpts.iterdir())


def test_losses_read_in_batches_are_each_steps_and_a_non_finite_one_names_its_step(tmp_path, monkeypatch):
    """The loop reads its losses from the device every LOSS_READ_EVERY steps (a callback reads every step): the
    same values either way; a non-finite loss stops the run at the next read, naming the step it came from, before
    the checkpoint that read precedes."""
    feats = features_of(model_folder(tmp_path))
    per_step = []
    _, a = qat_student()
    read_each_step = train(a, feats, config(tmp_path, output_dir=str(tmp_path / "a")),
                           callback=lambda step, loss: per_step.append(loss))
    _, b = qat_student()
    batched = train(b, feats, config(tmp_path, output_dir=str(tmp_path / "b"), checkpoint_every=100))
    assert batched.losses == read_each_step.losses == per_step and len(per_step) == 6
    values = iter([1.0, 2.0, float("nan"), 4.0, 5.0, 6.0])
    monkeypatch.setattr(importlib.import_module("qat.train"), "_step", lambda *args: torch.tensor(next(values)))
    _, c = qat_student()
    with pytest.raises(WorkbenchError, match="the loss became nan at step 3"):
        train(c, feats, config(tmp_path, output_dir=str(tmp_path / "c"), checkpoint_every=100))
    assert not (tmp_path / "c" / "checkpoints").exists()


def test_checkpoints_hold_no_pickle(tmp_path):
    feats = features_of(model_folder(tmp_path))
    _, student = qat_student()
    result = train(student, feats, config(tmp_path, max_steps=2))
    files = sorted(p.name for p in result.checkpoint.iterdir())
    assert files == ["model.safetensors", "optimizer.safetensors", "rng.safetensors", "trainer_state.json"]


def test_run_qat_and_finetune_write_model_folders(tmp_path):
    source = model_folder(tmp_path)
    squad = tmp_path / "train.json"
    examples = squad_examples(10)
    squad.write_text(json.dumps({"version": "1.1", "data": [{"title": "t", "paragraphs": [
        {"context": ex.context, "qas": [{"id": ex.qid, "question": ex.question,
                                         "answers": [{"text": a.text, "answer_start": a.start}
                                                     for a in ex.answers]}]} for ex in examples]}]}))
    loaded = load_model(source)
    smooth = {k: v for k, v in smoothing_vectors().items()}
    amax = max_ranges(loaded.model, smooth)
    cache = tmp_path / "calib.json"
    save_cache(CalibrationCache({s: TensorRange(a, tuple(smooth[s].tolist()) if s in smooth else None)
                                 for s, a in amax.items()}, "max", {"smooth_alpha": 0.5}, 10, loaded.digest,
                                "d", "t"), cache)
    policy = PrecisionPolicy(int8=True, iln=True)
    out = tmp_path / "qat"
    result = run_qat(source, squad, cache, policy,
                     config(tmp_path, output_dir=str(out), max_steps=3, distill=True), settings=SETTINGS)
    scales = read_qat_scales(out)
    assert scales is not None and scales.spec == result.spec and scales.policy["iln"] is True
    assert set(scales.smooth) == {s for s in smooth if s in result.spec.sites} and scales.smooth
    for site, s in scales.smooth.items():
        assert torch.equal(s, smooth[site].float())
    trained = load_model(out)
    assert trained.digest != loaded.digest and (out / "vocab.txt").read_bytes() == (source / "vocab.txt").read_bytes()
    with pytest.raises(WorkbenchError, match="another model"):
        run_qat(out, squad, cache, policy, config(tmp_path, output_dir=str(tmp_path / "x")), settings=SETTINGS)

    ft = run_finetune(source, squad, config(tmp_path, output_dir=str(tmp_path / "ft"), max_steps=2),
                      settings=SETTINGS)
    assert ft.spec is None and read_qat_scales(ft.folder) is None
    assert load_model(ft.folder).config == CFG


@pytest.mark.cuda
def test_bf16_qat_on_cuda(tmp_path):
    """Mixed precision: bf16 autocast on CUDA trains (the ranges in float32), and resumes there."""
    feats = features_of(model_folder(tmp_path))
    _, student = qat_student()
    before = dataset_loss(student, feats)
    result = train(student, feats, config(tmp_path, max_steps=12, device="cuda", bf16=True))
    assert student.layers[0].fc1.weight.is_cuda and all(p.dtype == torch.float32 for p in student.parameters())
    assert all(np.isfinite(result.losses)) and dataset_loss(student, feats) < before
    _, again = qat_student()
    resumed = train(again, feats, config(tmp_path, max_steps=14, device="cuda", bf16=True,
                                         output_dir=str(tmp_path / "out2")))
    assert resumed.step == 14


def test_qat_steps_on_the_shared_minilm_stay_finite(tmp_path):
    """A real fine-tuned model (large negative FC1 outputs, a calibrated cache) trains without NaN: the tiny
    random model above never reaches the ranges where a naive GELU gradient overflows."""
    from tests.conftest import MINILM

    if not (MINILM / "model.safetensors").exists():
        pytest.skip(f"{MINILM} not present")
    loaded = load_model(MINILM)
    feats = featurize(squad_examples(4), load_wordpiece(MINILM, loaded.config.vocab_size), SETTINGS, cache=False,
                      progress=False)
    amax: dict[str, float] = {}

    def tap(name, x):
        amax[name] = max(amax.get(name, 0.0), float(x.abs().max()))
        return x

    loaded.model.tap = tap
    with torch.no_grad():
        loaded.model(*(torch.from_numpy(getattr(feats, f)).long()
                       for f in ("input_ids", "token_type_ids", "attention_mask")))
    loaded.model.tap = lambda name, x: x
    spec = POLICY.spec(loaded.config.num_layers, amax, ScaleSource("fixed"))
    student = qat_model(loaded.model, POLICY, spec)
    result = train(student, feats, config(tmp_path, max_steps=3, lr=3e-5, scale_lr=1e-3, checkpoint_every=10))
    assert len(result.losses) == 3 and all(np.isfinite(result.losses))
    assert all(torch.isfinite(p).all() for p in student.parameters())


def hidden_mse(student, teacher, feats) -> float:
    from qat.train import hidden_loss, layer_outputs

    t = lambda a: torch.from_numpy(a).long()  # noqa: E731
    x = (t(feats.input_ids), t(feats.token_type_ids), t(feats.attention_mask))
    student.eval()
    with torch.no_grad(), layer_outputs(student) as hs, layer_outputs(teacher) as ht:
        student(*x), teacher(*x)
    return float(hidden_loss(hs, ht, x[2]))


def test_hidden_state_loss_compares_real_tokens_layer_by_layer():
    from qat.train import hidden_loss

    torch.manual_seed(0)
    teacher = [torch.randn(2, 5, 4) for _ in range(3)]
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert float(hidden_loss(teacher, teacher, mask)) == 0.0
    student = [t.clone() for t in teacher]
    student[1][0, 3:] += 100.0  # padding: no part in the loss
    assert float(hidden_loss(student, teacher, mask)) == 0.0
    student[2][1, 0, 0] += 2.0  # one element of 8 real tokens x 4, in one layer of 3: 4 / 32 / 3
    assert float(hidden_loss(student, teacher, mask)) == pytest.approx(4 / 32 / 3)
    with pytest.raises(WorkbenchError, match="layer by layer"):
        hidden_loss(student[:2], teacher, mask)
    with pytest.raises(WorkbenchError, match="needs a teacher"):
        TrainConfig(output_dir="x", distill_hidden=1.0)


def test_hidden_state_distillation_brings_the_layers_toward_the_teachers(tmp_path):
    """A student that starts as another model, taught by the teacher's hidden states as well: its layers move
    toward the teacher's, and more than with the span distributions alone, from the same start and batches."""
    feats = features_of(model_folder(tmp_path))
    teacher, after = tiny_model(0), {}
    for weight in (0.0, 1.0):
        student = qat_model(tiny_model(1), PrecisionPolicy(), QuantSpec())
        before = hidden_mse(student, teacher, feats)
        train(student, feats, config(tmp_path, max_steps=8, distill=True, distill_alpha=1.0, distill_hidden=weight,
                                     output_dir=str(tmp_path / f"h{weight}")), teacher=teacher)
        after[weight] = hidden_mse(student, teacher, feats)
    assert after[1.0] < before and after[1.0] < after[0.0]
