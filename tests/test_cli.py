"""cli.py end to end: eval and infer on the shared MiniLM, and one-line errors (exit 2, no traceback) on bad input."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from tests.conftest import DEV, MINILM, ROOT

TRT_PASSAGE = (
    "TensorRT is a high performance deep learning inference platform that delivers low latency and high throughput "
    "for apps such as recommenders, speech and image/video on NVIDIA GPUs. It includes parsers to import models, and "
    "plugins to support novel ops and layers before applying optimizations for inference. Today NVIDIA is "
    "open-sourcing parsers and plugins in TensorRT so that the deep learning community can customize and extend "
    "these components to take advantage of powerful TensorRT optimizations for your apps.")


def run_cli(*args, stdin: str | None = None, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *map(str, args)], capture_output=True, text=True,
                          input=stdin, cwd=cwd or ROOT, timeout=600)


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


@pytest.mark.shared
def test_eval_50_dev_questions_on_cpu(tmp_path):
    """The whole path (featurize, FP32 forward, answers, official metrics, files) on the first 50 dev questions."""
    pred, metrics = tmp_path / "pred.json", tmp_path / "metrics.json"
    proc = run_cli("eval", "--squad", DEV, "--model", MINILM, "--limit", 50, "--device", "cpu",
                   "-o", pred, "--metrics-json", metrics, "--no-progress")
    assert proc.returncode == 0, proc.stderr
    m = json.loads(metrics.read_text())
    assert m["n"] == 50
    # Full-dev reference is EM 73.76 / F1 82.87; the first 50 questions (Super Bowl 50) are easier.
    assert 70.0 <= m["exact_match"] <= 100.0 and m["f1"] >= m["exact_match"]
    assert f"EM {m['exact_match']:.2f}  F1 {m['f1']:.2f}  (50 questions)" in proc.stdout
    predictions = json.loads(pred.read_text())
    dev_ids = [qa["id"] for art in json.loads(DEV.read_text())["data"] for para in art["paragraphs"]
               for qa in para["qas"]][:50]
    assert list(predictions) == dev_ids and all(isinstance(v, str) for v in predictions.values())
    nbest = json.loads((tmp_path / "pred.nbest.json").read_text())
    assert set(nbest) == set(dev_ids)
    assert all(nbest[q][0]["text"] == predictions[q] for q in dev_ids if nbest[q])
    # Independent check of the printed score: rescore the written predictions with the metrics module.
    from data.squad import load_squad
    from eval.squad_metrics import score_squad

    rescored = score_squad(load_squad(DEV, limit=50).examples, predictions)
    assert rescored.exact_match == pytest.approx(m["exact_match"]) and rescored.f1 == pytest.approx(m["f1"])


@pytest.mark.shared
def test_infer_tensorrt_demo_passage():
    proc = run_cli("infer", "--model", MINILM, "--device", "cpu", "-p", TRT_PASSAGE,
                   "-q", "What is TensorRT?", "What is included in TensorRT?")
    assert proc.returncode == 0, proc.stderr
    answers = [line for line in proc.stdout.splitlines() if line.startswith("Answer:")]
    assert len(answers) == 2
    assert "'a high performance deep learning inference platform'" in answers[0]
    assert "parsers to import models" in answers[1]


@pytest.mark.shared
def test_infer_files_and_interactive(tmp_path):
    (tmp_path / "p.txt").write_text("The Eiffel Tower is in Paris. It was finished in 1889.")
    (tmp_path / "q.txt").write_text("Where is the Eiffel Tower?\n\nWhen was it finished?\n")
    proc = run_cli("infer", "--model", MINILM, "--device", "cpu", "-pf", tmp_path / "p.txt", "-qf", tmp_path / "q.txt")
    assert proc.returncode == 0, proc.stderr
    assert "'Paris'" in proc.stdout and "'1889'" in proc.stdout
    # Interactive: the passage may span lines and ends at an empty line (issue 23, item 6); then questions.
    proc = run_cli("infer", "--model", MINILM, "--device", "cpu",
                   stdin="The Eiffel Tower is in Paris.\nIt was finished in 1889.\n\nWhere is the Eiffel Tower?\n"
                         "When was it finished?\n\n")
    assert proc.returncode == 0, proc.stderr
    assert "an empty line ends it" in proc.stderr
    assert "'Paris'" in proc.stdout and "'1889'" in proc.stdout and proc.stdout.count("Answer:") == 2


def test_help_has_examples():
    for verb in ("infer", "eval"):
        proc = run_cli(verb, "--help")
        assert proc.returncode == 0 and "examples:" in proc.stdout and "--model" in proc.stdout


# ---------------------------------------------------------------- bad input

@pytest.fixture
def tiny_model(tmp_path):
    """A tiny random QA BERT with the shared MiniLM's tokenizer files (no ../shared needed: a minimal vocab)."""
    from transformers import BertConfig, BertForQuestionAnswering

    folder = tmp_path / "tiny"
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [chr(c) for c in range(ord("a"), ord("z") + 1)] + \
        ["what", "is", "the", "capital", "of", "france", "paris", "?", "."]
    BertForQuestionAnswering(BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1,
                                        num_attention_heads=2, intermediate_size=32)).save_pretrained(folder)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return folder


def test_missing_squad_file(tmp_path, tiny_model):
    assert_one_line_error(run_cli("eval", "--squad", tmp_path / "nope.json", "--model", tiny_model, "--device", "cpu"),
                          "nope.json", "not found")


def test_malformed_squad_file(tmp_path, tiny_model):
    bad = tmp_path / "bad.json"
    bad.write_text('{"data": [ {"paragraphs": ')
    assert_one_line_error(run_cli("eval", "--squad", bad, "--model", tiny_model, "--device", "cpu"),
                          "bad.json", "malformed")


def test_squad_file_with_empty_question(tmp_path, tiny_model):
    bad = tmp_path / "empty_q.json"
    bad.write_text(json.dumps({"data": [{"title": "t", "paragraphs": [{"context": "paris is the capital.", "qas": [
        {"id": "x1", "question": "   ", "answers": [{"text": "paris", "answer_start": 0}]}]}]}]}))
    assert_one_line_error(run_cli("eval", "--squad", bad, "--model", tiny_model, "--device", "cpu"),
                          "empty_q.json", "question")


def test_model_without_weights(tmp_path, tiny_model):
    (tiny_model / "model.safetensors").unlink()
    squad = tmp_path / "s.json"
    squad.write_text("{}")
    assert_one_line_error(run_cli("infer", "--model", tiny_model, "--device", "cpu", "-p", "x", "-q", "y"),
                          str(tiny_model), "no weights")


def test_weights_that_do_not_fit_config(tiny_model):
    cfg = json.loads((tiny_model / "config.json").read_text())
    cfg["intermediate_size"] = 64
    (tiny_model / "config.json").write_text(json.dumps(cfg))
    assert_one_line_error(run_cli("infer", "--model", tiny_model, "--device", "cpu", "-p", "x", "-q", "y"),
                          "weights do not fit config.json")


def test_vocabulary_of_another_model(tiny_model):
    vocab = (tiny_model / "vocab.txt").read_text()
    (tiny_model / "vocab.txt").write_text(vocab + "extra1\nextra2\n")
    assert_one_line_error(run_cli("infer", "--model", tiny_model, "--device", "cpu", "-p", "x", "-q", "y"),
                          "vocab.txt", "does not belong to this model")


def test_empty_question(tiny_model):
    assert_one_line_error(run_cli("infer", "--model", tiny_model, "--device", "cpu", "-p", "paris", "-q", ""),
                          "question 1 is empty")


def test_pickle_checkpoint_needs_trust(tiny_model):
    import torch
    from safetensors.torch import load_file

    torch.save(load_file(tiny_model / "model.safetensors"), tiny_model / "pytorch_model.bin")
    (tiny_model / "model.safetensors").unlink()
    assert_one_line_error(run_cli("infer", "--model", tiny_model, "--device", "cpu", "-p", "paris", "-q", "what"),
                          "pytorch_model.bin", "--trust-pickle")
    proc = run_cli("infer", "--model", tiny_model, "--device", "cpu", "--trust-pickle", "-p", "paris", "-q", "what")
    assert proc.returncode == 0, proc.stderr


def test_preset_cannot_answer_questions():
    assert_one_line_error(run_cli("infer", "--model", "bert-base", "--device", "cpu", "-p", "x", "-q", "y"),
                          "random-weight timing preset")


def test_cuda_requested_without_gpu(tiny_model):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert_one_line_error(run_cli("infer", "--model", tiny_model, "--device", "cuda", "-p", "x", "-q", "y"),
                          "no CUDA GPU")


def test_bad_settings(tiny_model, tmp_path):
    assert_one_line_error(run_cli("infer", "--model", tiny_model, "--device", "cpu", "-p", "x", "-q", "y",
                                  "-s", "8"), "max_seq_length 8")
    assert_one_line_error(run_cli("infer", "--model", tiny_model, "--device", "cpu", "-p", "x", "-q", "y",
                                  "--doc-stride", "400"), "doc_stride 400")


def test_no_half_written_predictions(tmp_path, tiny_model):
    """A failing run leaves no predictions file and no temporary files behind."""
    out = tmp_path / "out"
    out.mkdir()
    bad = tmp_path / "bad.json"
    bad.write_text("not json")
    run_cli("eval", "--squad", bad, "--model", tiny_model, "--device", "cpu", "-o", out / "p.json")
    assert list(out.iterdir()) == []
    shutil.rmtree(out)
