"""Length buckets and the offline SQuAD benchmark: a ladder of profiles, the bucketed and padded paths giving the
same logits and answers on the CPU reference path, and `cli.py bench --squad` end to end."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import cli
from common.errors import WorkbenchError
from data.answers import extract_answers
from data.features import FeatureSettings, featurize
from data.squad import load_squad
from data.tokenizer import load_wordpiece
from engines.build import build_engine, load_runnable
from engines.engine_file import Profile, length_buckets, pick_profile, save_engine
from engines.graphs import GraphRunner
from eval.throughput import batch_tokens, kernel_label, offline_run
from model.checkpoint import load_model
from model.runner import batches_by_length, run_logits
from quant.policy import PrecisionPolicy
from tests.test_calib_calibrate import make_tiny_model, write_squad

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SETTINGS = FeatureSettings(max_seq_length=128, doc_stride=32, max_query_length=16)


def test_length_buckets_make_a_ladder_below_each_profile():
    ladder = length_buckets([Profile(1, 128), Profile(64, 384)], 64)
    assert ladder == [Profile(1, 64), Profile(1, 128), *(Profile(64, s) for s in (64, 128, 192, 256, 320, 384))]
    assert length_buckets([Profile(8, 100)], 48) == [Profile(8, 48), Profile(8, 96), Profile(8, 100)]
    for bad in (0, 12, -64):
        with pytest.raises(WorkbenchError, match="multiple of 8"):
            length_buckets([Profile(1, 128)], bad)


def test_a_batch_runs_in_the_smallest_bucket_that_holds_it():
    class Header:
        profiles = tuple(length_buckets([Profile(64, 384)], 64))

    assert pick_profile(Header, 64, 100) == Profile(64, 128)
    assert pick_profile(Header, 10, 384) == Profile(64, 384)
    assert pick_profile(Header, 64, 64) == Profile(64, 64)


def test_padded_batches_hold_the_whole_length():
    mask = np.zeros((5, 16), dtype=np.int64)
    for i, n in enumerate((3, 16, 9, 1, 12)):
        mask[i, :n] = 1
    assert [(list(idx), seq) for idx, seq in batches_by_length(mask, 2)] == [([1, 4], 16), ([2, 0], 16), ([3], 8)]
    assert [seq for _, seq in batches_by_length(mask, 2, pad_to=16)] == [16, 16, 16]
    assert batch_tokens(mask, 2) == 2 * 16 + 2 * 16 + 8 and batch_tokens(mask, 2, pad_to=16) == 5 * 16


def test_graph_runs_count_the_profile_each_batch_ran_in():
    """On CUDA each batch is padded into its profile's graph: the computed tokens are the profile's, rows too."""
    class Header:
        profiles = (Profile(2, 8), Profile(2, 16))

    mask = np.zeros((5, 16), dtype=np.int64)
    for i, n in enumerate((3, 16, 9, 1, 12)):
        mask[i, :n] = 1
    assert batch_tokens(mask, 2, header=Header) == 2 * 16 + 2 * 16 + 2 * 8
    assert batch_tokens(mask, 2, pad_to=16, header=Header) == 3 * 2 * 16


@pytest.fixture(scope="module")
def bucket_engine(tmp_path_factory):
    """A tiny fine-tuned-shaped model, its SQuAD file and an FP32 CPU engine with a ladder of buckets."""
    tmp = tmp_path_factory.mktemp("buckets")
    folder = make_tiny_model(tmp / "model")
    squad = write_squad(tmp / "squad.json", paragraphs=6, questions=2)
    loaded = load_model(folder)
    wordpiece = load_wordpiece(folder, loaded.config.vocab_size)
    header, tensors = build_engine(loaded, PrecisionPolicy(), length_buckets([Profile(4, 128)], 32), None,
                                   torch.device("cpu"), wordpiece)
    path = tmp / "buckets.engine"
    save_engine(path, header, tensors)
    return path, squad, wordpiece


def test_bucketed_and_padded_paths_give_the_same_logits_and_answers(bucket_engine):
    path, squad, wordpiece = bucket_engine
    engine, _ = load_runnable(path, torch.device("cpu"))
    runner = GraphRunner(engine, str(path))
    examples = load_squad(squad).examples
    features = featurize(examples, wordpiece, SETTINGS, cache=False, progress=False)
    lengths = features.attention_mask.sum(1)
    assert lengths.min() < 64 < lengths.max()  # windows of several buckets
    bucketed = run_logits(runner, features, torch.device("cpu"), batch_size=4, progress=False)
    padded = run_logits(runner, features, torch.device("cpu"), batch_size=4, progress=False, pad_to=128)
    for b, p in zip(bucketed, padded):
        real = features.attention_mask.astype(bool)
        np.testing.assert_allclose(b[real], p[real], rtol=1e-4, atol=1e-4)
    answers = [{k: v.text for k, v in extract_answers(examples, features, *logits).items()}
               for logits in (bucketed, padded)]
    assert answers[0] == answers[1]


def test_offline_run_counts_windows_and_tokens(bucket_engine):
    path, squad, wordpiece = bucket_engine
    engine, _ = load_runnable(path, torch.device("cpu"))
    features = featurize(load_squad(squad).examples, wordpiece, SETTINGS, cache=False, progress=False)
    run = offline_run("bucketed", GraphRunner(engine, str(path)), features, torch.device("cpu"), 4, passes=2)
    assert run.windows == len(features.input_ids) and len(run.seconds) == 2
    assert run.real_tokens == int(features.attention_mask.sum()) <= run.computed_tokens
    assert run.samples_per_s == pytest.approx(run.windows / run.median_s)
    with pytest.raises(WorkbenchError, match="passes"):
        offline_run("x", GraphRunner(engine, str(path)), features, torch.device("cpu"), 4, passes=0)


def test_cli_build_buckets_and_bench_squad(tmp_path, capsys):
    folder = make_tiny_model(tmp_path / "model")
    squad = write_squad(tmp_path / "squad.json", paragraphs=3, questions=2)
    engine = tmp_path / "b.engine"
    assert cli.main(["build", "--model", str(folder), "-b", "4", "-s", "128", "--buckets", "64", "-o", str(engine),
                     "--device", "cpu"]) == 0
    assert "profiles 4x64, 4x128" in capsys.readouterr().out
    assert cli.main(["bench", "-e", str(engine), "--squad", str(squad), "--passes", "1", "--single-stream", "3",
                     "--device", "cpu", "--profile"]) == 0
    out = capsys.readouterr().out
    assert "engine, bucketed" in out and "engine, padded to 128" in out and "single stream, 3 windows" in out
    # --profile: each path's ops (their CPU time here), ms a pass and ns per computed token
    blocks = re.findall(r"engine, (bucketed|padded to 128|packed[^:\n]*): where a pass's time goes\n"
                        r" +ops \(CPU time\) of one pass: ([\d.]+) ms, (\d+) ns a computed token\n"
                        r"((?: +[\d.]+ ms +\d+ ns/token +\d+ calls  \S.*\n)+)", out)
    assert [b[0].split(" (")[0] for b in blocks] == ["bucketed", "padded to 128", "packed"]
    assert all(float(ms) > 0 and int(ns) > 0 and "aten::" in ops for _, ms, ns, ops in blocks)
    assert cli.main(["bench", "-e", str(engine), "--device", "cpu", "--profile", "--hf"]) == 2  # no --squad
    assert "--hf, --profile: only with --squad FILE" in capsys.readouterr().err
    assert cli.main(["build", "--model", str(folder), "--buckets", "10", "-o", str(tmp_path / "x.engine"),
                     "--device", "cpu"]) == 2
    assert "multiple of 8" in capsys.readouterr().err
    assert not (tmp_path / "x.engine").exists()


# The first 1,100 characters of a kernel name from plugins/cutlass_int8.cu's library, as torch.profiler reports it
CUTLASS_KERNEL = (
    "_ZN7cutlass13device_kernelINS_4gemm6kernel13GemmUniversalIN4cute5tupleIJiiiiEEENS1_10collective13Col"
    "lectiveMmaINS1_34MainloopSm90TmaGmmaWarpSpecializedILi6ENS5_IJNS4_1CILi1EEENSA_ILi2EEESB_EEENS1_32Ke"
    "rnelTmaWarpSpecializedPingpongEEENS5_IJNSA_ILi128EEESG_SG_EEEaNS5_IJlSB_lEEEaSI_NS4_8TiledMMAINS4_8M"
    "MA_AtomIJNS4_4SM904GMMA27MMA_64x128x32_S32S8S8_SS_TNEEEENS4_6LayoutINS5_IJSB_SB_SB_EEENS5_IJNSA_ILi0"
    "EEESR_SR_EEEEENS5_IJNS4_10UnderscoreESU_SU_EEEEENS4_23SM90_TMA_LOAD_MULTICASTENS4_14ComposedLayoutIN"
    "S4_7SwizzleILi3ELi4ELi3EEENS4_18smem_ptr_flag_bitsILi8EEENSP_INS5_IJNSA_ILi8EEESG_EEENS5_IJSG_SB_EEE"
    "EEEEvNS4_8identityENS4_13SM90_TMA_LOADES17_vS18_EENS_8epilogue10collective18CollectiveEpilogueINS1B_"
    "22Sm90TmaWarpSpecializedILi4ELi2ELi32ELb0ELb1EEEJSH_NS5_IJNSA_ILi64EEES1G_EEEvSI_aSI_NS1B_6fusion15S"
    "m90TreeVisitorINS1I_11Sm90ComputeIN2wb9GeluCodesEafLNS_15FloatRoundStyleE2EvEEJNS1I_12Sm90AccFetchEN"
    "S1I_16Sm90RowBroadcastILi0ESH_ffNS5_IJSR_SB_SR_EEELi4ELb1EEENS1I_19Sm90ScalarBroadcastIfSS_Li1ENS_10"
    "multipliesEEES1S_S1S_EEES19_NSY_INSZ_ILi2ELi4ELi3EEES12_NSP_INS5_IJS13_S1G_EEENS5_IJS1G_SB_EEEEEEENS")


def test_a_profile_line_names_a_cutlass_gemm_by_its_schedule_tiles_and_epilogue():
    """Mangled CUTLASS names agree in their first 100 characters, where profile lines cut them."""
    assert kernel_label(CUTLASS_KERNEL) == "cutlass GEMM pingpong wgmma 64x128x32 multicast epilogue GeluCodes"
    plain = CUTLASS_KERNEL.replace("Pingpong", "Cooperative").replace("2wb9GeluCodes", "2wb5Plain")
    assert kernel_label(plain.replace("TMA_LOAD_MULTICAST", "TMA_LOAD")) == \
        "cutlass GEMM cooperative wgmma 64x128x32 epilogue Plain"
    assert kernel_label("attention_kernel") == "attention_kernel"
