"""cli.py calibrate end to end on a tiny random model: cache reuse without running the model, recomputation on any
changed input or damaged cache, the TensorRT export, overlap warnings and one-line errors."""
from __future__ import annotations

import json
import re

import pytest

import cli
from calib.cache import load_cache
from calib.trt_cache import read_trt_cache
from common.files import sha256_file
from model.bert import BertQA
from tests.test_calib_calibrate import make_tiny_model, write_squad
from tests.test_cli import assert_one_line_error, run_cli


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("calib_cli")
    return {"model": make_tiny_model(root / "tiny"), "train": write_squad(root / "train.json"),
            "eval": write_squad(root / "eval.json", seed=5, prefix="dev")}


@pytest.fixture
def calib(files, tmp_path, capsys, monkeypatch):
    """Run `cli.py calibrate` in this process; returns (exit code, stdout, stderr, forward calls)."""
    calls = []
    forward = BertQA.forward

    def counting_forward(self, *args):
        calls.append(1)
        return forward(self, *args)

    monkeypatch.setattr(BertQA, "forward", counting_forward)

    def run(*extra, out=tmp_path / "calib.json", squad=None):
        calls.clear()
        args = ["calibrate", "--squad", squad or files["train"], "--model", files["model"], "--device", "cpu",
                "--no-progress", "-s", "96", "--doc-stride", "32", "--max-query-length", "16", "--calib-num", "6",
                "-o", out, *extra]
        code = cli.main([str(a) for a in args])
        stdout, stderr = capsys.readouterr()
        return code, stdout, stderr, len(calls)

    return run


def _lines_with(text: str, fragment: str) -> list[str]:
    return [line for line in text.splitlines() if fragment in line]


def test_second_run_reuses_the_cache_without_running_the_model(calib, tmp_path):
    out = tmp_path / "calib.json"
    code, stdout, stderr, calls = calib()
    assert code == 0 and calls > 0, stderr
    assert "reused" not in stderr and stdout.startswith("entropy: 6 questions, 17 sites")
    assert "widest 5" in stdout and "narrowest 5" in stdout and re.search(r"^\s+probs\s", stdout, re.M)
    first = out.read_bytes()
    code, stdout, stderr, calls = calib()
    assert code == 0 and calls == 0
    assert _lines_with(stderr, "reused calibration cache") == [f"reused calibration cache {out} (entropy, 6 questions)"]
    assert out.read_bytes() == first and "warning" not in stderr
    assert "reused cache (model not run)" in stdout


def test_force_and_changed_inputs_recompute(calib, tmp_path):
    out = tmp_path / "calib.json"
    code, _, stderr, _ = calib()
    assert code == 0 and f"wrote calibration cache {out} (entropy (6 q)" in stderr  # a first run says where
    code, _, stderr, calls = calib("--force")
    assert code == 0 and calls > 0 and "reused" not in stderr and "warning" not in stderr
    assert calib("--batch-size", "3")[3] == 0  # batching does not change the ranges, so the cache stands
    # A recompute names the input that changed, not two hashes (issue 23, item 13).
    for extra, changed in ((["--method", "max"], "method entropy -> max"), (["--calib-num", "7"], "calib_num 6 -> 7"),
                           (["--seed", "1"], "seed 0 -> 1"),
                           (["--method", "max", "-s", "80"], "max_seq_length 96 -> 80")):
        code, _, stderr, calls = calib(*extra)
        assert code == 0 and calls > 0, extra
        [line] = _lines_with(stderr, "made from other inputs")
        assert changed in line and "key " not in line, line
        assert f"wrote calibration cache {out}" in stderr
    assert load_cache(out).method == "max" and load_cache(out).settings["max_seq_length"] == 80
    assert calib("--method", "max", "-s", "80")[3] == 0
    code, _, stderr, calls = calib("--method", "percentile", "--percentile", "99.9")
    assert calls > 0 and load_cache(out).settings["percentile"] == 99.9
    assert calib("--method", "percentile", "--percentile", "99.99")[3] > 0


def _flip_an_amax_digit(text: str) -> str:
    match = re.search(r'"amax": \d+\.(\d)', text)
    digit = match.group(1)
    return text[:match.start(1)] + str((int(digit) + 1) % 10) + text[match.end(1):]


@pytest.mark.parametrize("damage, words", [(_flip_an_amax_digit, "checksum mismatch"),
                                           (lambda text: text[: len(text) // 2], "truncated")])
def test_damaged_cache_is_reported_in_one_line_and_recomputed(calib, tmp_path, damage, words):
    out = tmp_path / "calib.json"
    assert calib()[0] == 0
    good = out.read_bytes()
    out.write_text(damage(good.decode()))
    code, _, stderr, calls = calib()
    assert code == 0 and calls > 0
    [line] = _lines_with(stderr, "warning:")
    assert line.startswith(f"warning: {out}: ") and words in line and line.endswith("recomputing")
    assert out.read_bytes() == good  # deterministic: the recomputed cache is the original one


def test_trt_cache_scales_are_amax_over_127(calib, tmp_path):
    trt = tmp_path / "calib.trtcache"
    assert calib("--method", "max", "--trt-cache", trt)[0] == 0
    header, scales = read_trt_cache(trt)
    ranges = load_cache(tmp_path / "calib.json").ranges
    assert header == "TRT-8600-MinMaxCalibration" and scales.keys() == ranges.keys()
    for name, r in ranges.items():
        assert scales[name] == pytest.approx(r.amax / 127, rel=1e-6)
    trt.unlink()
    code, _, stderr, calls = calib("--method", "max", "--trt-cache", trt)  # a reused cache still exports
    assert calls == 0 and read_trt_cache(trt) == (header, scales)


def test_overlap_with_the_evaluation_file_warns(calib, files):
    code, _, stderr, _ = calib("--eval-squad", files["train"])
    [line] = _lines_with(stderr, "warning:")
    assert code == 0 and "6 of 6 calibration questions overlap" in line and "6 share a question id, 6 a context" in line
    code, _, stderr, _ = calib("--eval-squad", files["eval"])
    assert code == 0 and "warning" not in stderr


def test_official_dev_set_warns_without_eval_squad(calib, files, monkeypatch):
    monkeypatch.setattr("calib.calibrate.OFFICIAL_DEV_V11_SHA256", sha256_file(files["train"]))
    code, _, stderr, _ = calib()
    assert code == 0 and len(_lines_with(stderr, "is the official SQuAD v1.1 dev set")) == 1


def test_calib_num_beyond_the_data_warns_and_uses_all(calib, tmp_path):
    code, stdout, stderr, _ = calib("--calib-num", "1000")
    [line] = _lines_with(stderr, "warning:")
    assert code == 0 and "calib_num 1000 exceeds the 12 questions" in line and "calibrating on all of them" in line
    assert load_cache(tmp_path / "calib.json").num_samples == 12 and stdout.startswith("entropy: 12 questions")


@pytest.mark.parametrize("case, words", [
    ("empty", "empty.json"), ("malformed", "malformed"), ("no questions", "contains no questions"),
    ("calib-num 0", "--calib-num must be at least 1"), ("missing model", "model folder not found"),
    ("preset", "random-weight timing preset"), ("output dir", "is a directory"),
    ("seq too long", "exceeds the model's max_position_embeddings"), ("bad percentile", "percentile must be in"),
])
def test_bad_input_is_one_line_exit_2(calib, tmp_path, case, words):
    squad, extra, out = None, [], tmp_path / "calib.json"
    if case == "empty":
        squad = tmp_path / "empty.json"
        squad.write_text("")
    elif case == "malformed":
        squad = tmp_path / "bad.json"
        squad.write_text('{"data": [ {"paragraphs": ')
    elif case == "no questions":
        squad = tmp_path / "none.json"
        squad.write_text(json.dumps({"data": []}))
    elif case == "output dir":
        out = tmp_path
    else:
        extra = {"calib-num 0": ["--calib-num", "0"], "missing model": ["--model", tmp_path / "nope"],
                 "preset": ["--model", "bert-base"], "seq too long": ["-s", "600"],
                 "bad percentile": ["--method", "percentile", "--percentile", "0"]}[case]
    code, stdout, stderr, calls = calib(*extra, out=out, squad=squad)
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and words in errors[0], stderr
    assert calls == 0 and stdout == "" and "Traceback" not in stderr


def test_help_has_examples(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["calibrate", "--help"])
    text = capsys.readouterr().out
    assert exit_.value.code == 0 and "examples:" in text and "default_rng" in text and "--trt-cache" in text


def test_subprocess_end_to_end(files, tmp_path):
    out = tmp_path / "c.json"
    proc = run_cli("calibrate", "--squad", files["train"], "--model", files["model"], "--device", "cpu", "-o", out,
                   "--method", "mse", "--calib-num", "3", "--trt-cache", tmp_path / "c.trt")
    assert proc.returncode == 0, proc.stderr
    assert load_cache(out).num_samples == 3 and (tmp_path / "c.trt").read_text().startswith("TRT-8600-")
    assert_one_line_error(run_cli("calibrate", "--squad", tmp_path / "nope.json", "--model", files["model"],
                                  "--device", "cpu", "-o", out), "nope.json", "not found")


def test_percentile_needs_the_percentile_method(calib, capsys):
    """--percentile with another --method would be ignored: refused in one line (issue 23, item 13)."""
    code, _, stderr, calls = calib("--method", "max", "--percentile", "99.9")
    assert code == 2 and calls == 0 and "Traceback" not in stderr
    [line] = _lines_with(stderr, "error: ")
    assert "--percentile 99.9 applies to --method percentile only" in line


def test_another_vocab_file_is_checked_against_the_model(calib, files, tmp_path):
    """-v/--vocab-file (the TensorRT demo's): a vocab.txt instead of the folder's, checked like the folder's."""
    good = tmp_path / "vocab.txt"
    good.write_bytes((files["model"] / "vocab.txt").read_bytes())
    code, _, stderr, calls = calib("-v", good)
    assert code == 0 and calls > 0, stderr
    bad = tmp_path / "other-vocab.txt"
    bad.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + [f"w{i}" for i in range(400)]) + "\n")
    code, _, stderr, _ = calib("-v", bad, "--force")
    assert code == 2 and "other-vocab.txt has 404 tokens" in stderr and "does not belong to this model" in stderr
