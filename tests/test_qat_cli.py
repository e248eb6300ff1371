"""`cli.py qat`, `cli.py finetune` and a build from the QAT folder, end to end on a tiny model (in process)."""
from __future__ import annotations

import json

import pytest
import torch

import cli
from engines.engine_file import read_header
from qat import read_qat_scales
from tests.test_qat_train import model_folder, squad_examples

SHAPE = ["-s", "32", "--doc-stride", "8", "--max-query-length", "6"]
TRAIN = ["--max-steps", "2", "--batch-size", "4", "--device", "cpu", "--no-progress", *SHAPE]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("qat-cli")
    folder = model_folder(tmp)
    squad = tmp / "train.json"
    paragraphs = [{"context": ex.context, "qas": [{"id": ex.qid, "question": ex.question, "answers": [
        {"text": a.text, "answer_start": a.start} for a in ex.answers]}]} for ex in squad_examples(10)]
    squad.write_text(json.dumps({"version": "1.1", "data": [{"title": "t", "paragraphs": paragraphs}]}))
    calib = tmp / "calib.json"
    assert cli.main(["calibrate", "--squad", str(squad), "--model", str(folder), "--calib-num", "10", "--method",
                     "max", "--device", "cpu", "-o", str(calib), "--no-progress", *SHAPE]) == 0
    return tmp, folder, squad, calib


def _qat(inputs, out, *extra):
    _, folder, squad, calib = inputs
    return cli.main(["qat", "--model", str(folder), "--squad", str(squad), "--calib-cache", str(calib), "-o", str(out),
                     *TRAIN, *extra])


def test_qat_then_build_from_the_folder_without_a_calibration_cache(inputs, capsys):
    tmp = inputs[0]
    out = tmp / "qat-iln"
    assert _qat(inputs, out, "-iln") == 0
    said = capsys.readouterr()
    assert f"qat (--int8 -iln): wrote {out} after 2 steps" in said.out
    scales = read_qat_scales(out)
    assert scales is not None and scales.policy["iln"] and not scales.policy["imh"]
    engine = tmp / "qat.engine"
    assert cli.main(["build", "--model", str(out), "--int8", "-iln", "-b", "2", "-s", "32", "--device", "cpu",
                     "-o", str(engine)]) == 0
    assert "scales: learned by QAT" in capsys.readouterr().err
    spec = read_header(engine).spec
    assert spec.sites and {str(s.source) for s in spec.sites.values()} == {"qat"}
    assert {name: s.amax for name, s in spec.sites.items()} == \
        {name: s.amax for name, s in scales.spec.sites.items() if name in spec.sites}
    assert read_header(engine).calibration == "QAT (learned)"


def test_a_build_quantizing_sites_qat_never_trained_is_one_line_exit_2(inputs, capsys):
    tmp = inputs[0]
    out = tmp / "qat-plain"
    assert _qat(inputs, out) == 0
    capsys.readouterr()
    code = cli.main(["build", "--model", str(out), "--int8", "-imh", "-b", "1", "-s", "32", "--device", "cpu",
                     "-o", str(tmp / "x.engine")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 2 and "were trained for --int8 and have no range for" in err
    assert not (tmp / "x.engine").exists()


def test_finetune_writes_a_plain_folder(inputs, capsys):
    tmp, folder, squad, _ = inputs
    out = tmp / "ft"
    assert cli.main(["finetune", "--model", str(folder), "--squad", str(squad), "-o", str(out), *TRAIN]) == 0
    assert "finetune: wrote" in capsys.readouterr().out
    assert (out / "model.safetensors").exists() and read_qat_scales(out) is None


def test_an_unwritable_output_is_refused_before_training(inputs, capsys):
    blocker = inputs[0] / "a-file"
    blocker.write_text("x")
    assert _qat(inputs, blocker / "out") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "cannot write the QAT output folder" in err


def test_prune_then_a_sparse_build_and_a_dense_model_refused_by_sparse(inputs, capsys):
    tmp, folder, squad, _ = inputs
    out = tmp / "2to4"
    assert cli.main(["prune", "--model", str(folder), "--squad", str(squad), "-o", str(out), *TRAIN]) == 0
    out_text = capsys.readouterr().out
    assert "prune (2:4, sparsegpt): wrote" in out_text
    assert "Searching for sparse mask" not in out_text  # modelopt's per-module prints are not the user's
    build = ["build", "--fp16", "--sparse", "-b", "1", "-s", "32", "--device", "cpu", "-o"]
    assert cli.main([*build, str(tmp / "sparse.engine"), "--model", str(out)]) == 0
    assert read_header(tmp / "sparse.engine").policy["sparse"] is True
    assert "--fp16 --sparse" in capsys.readouterr().out
    assert cli.main([*build, str(tmp / "dense.engine"), "--model", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "are not 2:4" in err and "--prune-2to4" in err
    assert cli.main([*build, str(tmp / "pruned.engine"), "--model", str(folder), "--prune-2to4"]) == 0


def test_build_from_qat_scales_made_elsewhere(inputs, capsys):
    from safetensors.torch import save_file

    from model.checkpoint import load_model
    from qat.imports import to_modelopt_state

    tmp, folder, _, _ = inputs
    scales = read_qat_scales(tmp / "qat-iln") or pytest.skip("needs the QAT folder of the first test")
    loaded = load_model(folder)
    state = tmp / "modelopt.safetensors"
    save_file(to_modelopt_state(scales.spec, loaded.config), str(state))
    engine = tmp / "imported.engine"
    assert cli.main(["build", "--model", str(folder), "--int8", "-iln", "--qat-scales", str(state), "-b", "1", "-s",
                     "32", "--device", "cpu", "-o", str(engine)]) == 0
    assert "scales: QAT (imported" in capsys.readouterr().err
    spec = read_header(engine).spec
    assert {n: s.amax for n, s in spec.sites.items()} == {n: s.amax for n, s in scales.spec.sites.items()}


def test_export_onnx_then_eval_and_bench_it_in_onnxruntime(inputs, capsys):
    """Issue 22's path through the CLI: export the INT8 build, score it with ONNX Runtime beside our CPU engine."""
    tmp, folder, squad, calib = inputs
    onnx_file, engine = tmp / "export" / "int8.onnx", tmp / "int8.engine"
    flags = ["--model", str(folder), "--int8", "-iln", "--calib-cache", str(calib)]
    assert cli.main(["export-onnx", *flags, "-o", str(onnx_file), "--symmetric-clamp"]) == 0
    assert f"exported {onnx_file}" in capsys.readouterr().out and (onnx_file.parent / "vocab.txt").exists()
    assert cli.main(["build", *flags, "-b", "4", "-s", "32", "--device", "cpu", "-o", str(engine)]) == 0
    capsys.readouterr()
    metrics = tmp / "metrics.json"
    assert cli.main(["eval", "--squad", str(squad), str(onnx_file), "--device", "cpu", "--no-progress",
                     "--metrics-json", str(metrics), "-o", str(tmp / "pred.json"), *SHAPE]) == 0
    assert json.loads(metrics.read_text())["n"] == 10
    assert cli.main(["bench", "-e", str(onnx_file), "-b", "1", "-s", "32", "--iterations", "3", "--warmup", "1"]) == 0
    assert "onnxruntime" in capsys.readouterr().out
    assert cli.main(["eval", "--squad", str(squad), str(engine), "--backend", "onnxruntime", "--device", "cpu",
                     *SHAPE]) == 2
    assert "--backend onnxruntime runs ONNX files" in capsys.readouterr().err


@pytest.fixture(scope="module")
def demo_vocab(inputs):
    """A source folder with tokenizer.json and tokenizer_config.json beside its vocab.txt, and a -v file of the
    same size (named otherwise) whose ids differ: what training with -v must use and write."""
    import shutil

    from data.tokenizer import load_wordpiece

    tmp, folder, _, _ = inputs
    source = tmp / "source-tok"
    shutil.copytree(folder, source)
    (source / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}))
    load_wordpiece(source).tokenizer.save(str(source / "tokenizer.json"))
    lines = (folder / "vocab.txt").read_text().splitlines()
    i, j = lines.index("w1"), lines.index("w2")
    lines[i], lines[j] = lines[j], lines[i]
    vocab = tmp / "words.txt"
    vocab.write_text("\n".join(lines) + "\n")
    return source, vocab


@pytest.mark.parametrize("verb", ["finetune", "qat"])
def test_training_with_a_vocab_file_writes_that_vocab_and_no_tokenizer_json(inputs, demo_vocab, verb, capsys):
    """-v: the windows are tokenized with it, and the written folder holds it as vocab.txt (a stale tokenizer.json
    from an earlier run removed, tokenizer_config.json kept), so `build --model OUT` embeds the same tokenizer."""
    import torch

    from data.tokenizer import load_wordpiece
    from engines.build import load_runnable

    tmp, _, squad, calib = inputs
    source, vocab = demo_vocab
    out = tmp / f"{verb}-v"
    out.mkdir()
    (out / "tokenizer.json").write_bytes((source / "tokenizer.json").read_bytes())  # as from a run without -v
    extra = ["--calib-cache", str(calib)] if verb == "qat" else []
    assert cli.main([verb, "-c", str(source), "-v", str(vocab), "-sq", str(squad), "-o", str(out), *TRAIN,
                     *extra]) == 0
    assert f"wrote {out} after 2 steps" in capsys.readouterr().out
    assert (out / "vocab.txt").read_bytes() == vocab.read_bytes()
    assert not (out / "tokenizer.json").exists() and (out / "tokenizer_config.json").exists()
    trained = load_wordpiece(source, vocab_file=vocab).tokenizer.to_str()
    assert load_wordpiece(out).tokenizer.to_str() == trained != load_wordpiece(source).tokenizer.to_str()
    engine = tmp / f"{verb}-v.engine"
    flags = ["--int8"] if verb == "qat" else []
    assert cli.main(["build", "--model", str(out), *flags, "-b", "1", "-s", "32", "--device", "cpu",
                     "-o", str(engine)]) == 0
    assert load_runnable(engine, torch.device("cpu"))[1].tokenizer.to_str() == trained


@pytest.mark.parametrize("method", ["magnitude", "sparsegpt"])
def test_prune_with_no_steps_writes_the_pruned_model_before_fine_tuning(inputs, capsys, method):
    """`prune --max-steps 0`: the 2:4 model as pruned, not trained (what fine-tuning then recovers is measured
    against it); the same run with steps starts from exactly those weights. Magnitude pruning only zeroes
    weights; SparseGPT also updates the kept GEMM weights, and neither touches anything else."""
    from calib.sparsity import gemm_sparsity
    from model.checkpoint import load_model

    tmp, folder, squad, _ = inputs
    no_steps = [a if a != "2" else "0" for a in TRAIN]
    assert cli.main(["prune", "--model", str(folder), "--squad", str(squad), "-o", str(tmp / "p0"), *no_steps,
                     "--method", method]) == 0
    assert "after 0 steps (no steps" in capsys.readouterr().out
    pruned, dense = load_model(tmp / "p0"), load_model(folder)
    assert gemm_sparsity(pruned.model, pruned.config.num_layers).all_sparse
    for (name, p), (_, d) in zip(pruned.model.named_parameters(), dense.model.named_parameters()):
        kept = p != 0
        gemm = name.startswith("layers.") and name.endswith(("qkv.weight", "attn_out.weight", "fc1.weight",
                                                             "fc2.weight"))
        if method == "magnitude" or not gemm:
            assert torch.equal(p[kept], d[kept]), name  # nothing was trained
        else:
            assert not torch.equal(p[kept], d[kept]), name
