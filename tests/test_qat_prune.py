"""2:4 pruning (issue 19): exact 2:4 weights that stay 2:4 through fine-tuning and QAT, written as model folders."""
from __future__ import annotations

import json

import pytest
import torch

from calib.cache import CalibrationCache, TensorRange, save_cache
from calib.sparsity import gemm_sparsity, is_2to4_sparse
from common.errors import WorkbenchError
from model.checkpoint import load_model
from qat import read_qat_scales, train
from qat.model import qat_model
from qat.prune import keep_masks, pruned_gemms, prune_2to4
from qat.run import run_prune, run_qat
from qat.sparsegpt import prune_weight
from quant.policy import PrecisionPolicy
from quant.spec import QuantSpec
from tests.test_engines import CFG, inputs, loaded_model
from tests.test_qat_model import max_ranges
from tests.test_qat_train import SETTINGS, config, features_of, model_folder, squad_examples

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def magnitude_2to4(w: torch.Tensor) -> torch.Tensor:
    """The definition: in each group of 4 consecutive input weights of a row, the 2 largest |w| stay."""
    groups = w.reshape(w.shape[0], -1, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.abs().topk(2, dim=-1).indices, True)
    return (groups * keep).reshape(w.shape)


def test_magnitude_pruning_is_exact_2to4_on_the_chosen_gemms_only():
    model = loaded_model().model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    masks = prune_2to4(model, "magnitude", exclude=("layer1.fc2", "attn_out"))
    after = model.state_dict()
    assert sorted(masks) == sorted(pruned_gemms(CFG.num_layers, ("layer1.fc2", "attn_out")))
    assert len(masks) == 4 * CFG.num_layers - 1 - CFG.num_layers
    for name, value in before.items():
        if name in masks:
            assert torch.equal(after[name], magnitude_2to4(value)), name
            assert is_2to4_sparse(after[name]) and torch.equal(masks[name], after[name] != 0)
        else:
            assert torch.equal(after[name], value), name  # excluded GEMMs, the QA head, embeddings, LayerNorms


def test_sparsegpt_prunes_to_2to4_from_calibration_batches():
    model = loaded_model().model
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [inputs(batch=4, seq=32, seed=s)[:3] for s in range(3)]
    masks = prune_2to4(model, "sparsegpt", calibration=batches)
    assert gemm_sparsity(model, CFG.num_layers).all_sparse
    after = model.state_dict()
    for name in masks:  # SparseGPT updates the weights it keeps: kept positions differ from the dense weights
        assert torch.equal(masks[name], after[name] != 0) and is_2to4_sparse(after[name])
        assert not torch.allclose(after[name][masks[name]], dense[name][masks[name]]), name
    assert torch.equal(after["qa.weight"], dense["qa.weight"])
    with pytest.raises(WorkbenchError, match="sparsegpt needs calibration"):
        prune_2to4(loaded_model().model, "sparsegpt")


def test_sparsegpt_with_uncorrelated_inputs_is_magnitude_pruning():
    """With H = c I (inputs uncorrelated, equal variance) no kept weight can make up for a pruned one, and the
    error w^2 / [H^-1]_jj^2 ranks by |w|: SparseGPT is magnitude pruning."""
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(prune_weight(w, 3.0 * torch.eye(64), block=16), magnitude_2to4(w))


@pytest.mark.parametrize("seed", range(3))
def test_sparsegpt_reconstructs_the_gemm_better_than_its_own_mask_alone(seed):
    """On correlated inputs X, the pruned weight's output error ||X (W - Q)^T|| is below magnitude pruning's and
    below SparseGPT's own mask applied to the original weights (the mask alone is what modelopt's searcher keeps);
    the block size does not change the result."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 48, generator=gen) @ torch.randn(48, 48, generator=gen)  # correlated columns
    w = torch.randn(32, 48, generator=gen)
    q = prune_weight(w, x.T @ x, damp=1e-4, block=48)
    assert is_2to4_sparse(q)
    error = lambda p: float((x @ (w - p).T).norm())
    assert error(q) < 0.9 * error(w * (q != 0)) and error(q) < 0.9 * error(magnitude_2to4(w))
    torch.testing.assert_close(prune_weight(w, x.T @ x, damp=1e-4, block=8), q, rtol=0, atol=1e-4)


def test_bad_method_and_gemm_names_are_one_line_errors():
    with pytest.raises(WorkbenchError, match="unknown pruning method 'random'"):
        prune_2to4(loaded_model().model, "random")
    with pytest.raises(WorkbenchError, match=r"--exclude: 'layer1\.ffn' is not a GEMM"):
        pruned_gemms(2, ("layer1.ffn",))


def test_fine_tuning_keeps_the_pattern_and_trains_the_kept_weights(tmp_path):
    feats = features_of(model_folder(tmp_path))
    student = qat_model(loaded_model().model, PrecisionPolicy(), QuantSpec())
    masks = prune_2to4(student)
    keep_masks(student, masks)
    pruned = {k: student.state_dict()[k].clone() for k in masks}
    train(student, feats, config(tmp_path, max_steps=4, weight_decay=0.1))
    state = student.state_dict()
    for name, mask in masks.items():
        assert torch.equal(state[name] != 0, mask), name  # zeros stay exactly zero under AdamW + weight decay
        assert not torch.equal(state[name], pruned[name])


@pytest.mark.cuda
def test_cuda_fine_tuning_keeps_the_pattern(tmp_path):
    """Masks are taken on the CPU and training moves the model to CUDA afterwards: the hooks mask the gradients
    on their own device (a CPU mask times a CUDA gradient raised in the first GPU prune run)."""
    feats = features_of(model_folder(tmp_path))
    student = loaded_model().model
    masks = prune_2to4(student)
    keep_masks(student, masks)
    train(student, feats, config(tmp_path, max_steps=2, device="cuda"))
    state = student.state_dict()
    assert all(state[name].is_cuda and torch.equal((state[name] != 0).cpu(), mask) for name, mask in masks.items())


def _squad(tmp_path):
    squad = tmp_path / "train.json"
    squad.write_text(json.dumps({"version": "1.1", "data": [{"title": "t", "paragraphs": [
        {"context": ex.context, "qas": [{"id": ex.qid, "question": ex.question, "answers": [
            {"text": a.text, "answer_start": a.start} for a in ex.answers]}]} for ex in squad_examples(10)]}]}))
    return squad


def test_run_prune_then_sparse_qat_keep_2to4_in_the_written_folders(tmp_path):
    source, squad = model_folder(tmp_path), _squad(tmp_path)
    run = run_prune(source, squad, config(tmp_path, output_dir=str(tmp_path / "2to4"), max_steps=2),
                    settings=SETTINGS)
    pruned = load_model(run.folder)
    assert gemm_sparsity(pruned.model, CFG.num_layers).all_sparse and read_qat_scales(run.folder) is None
    cache = tmp_path / "calib.json"
    save_cache(CalibrationCache({s: TensorRange(a) for s, a in max_ranges(pruned.model).items()}, "max", {}, 10,
                                pruned.digest, "d", "t"), cache)
    policy = PrecisionPolicy(int8=True, iln=True)
    qat = run_qat(run.folder, squad, cache, policy, config(tmp_path, output_dir=str(tmp_path / "qat"), max_steps=2),
                  settings=SETTINGS, sparse=True)
    trained = load_model(qat.folder)
    assert gemm_sparsity(trained.model, CFG.num_layers).all_sparse and trained.digest != pruned.digest
    dense_cache = tmp_path / "dense-calib.json"
    dense = load_model(source)
    save_cache(CalibrationCache({s: TensorRange(a) for s, a in max_ranges(dense.model).items()}, "max", {}, 10,
                                dense.digest, "d", "t"), dense_cache)
    with pytest.raises(WorkbenchError, match="--sparse needs a 2:4-pruned model"):
        run_qat(source, squad, dense_cache, policy, config(tmp_path, output_dir=str(tmp_path / "x"), max_steps=1),
                settings=SETTINGS, sparse=True)


def test_sparse_build_refuses_dense_weights_prunes_on_request_and_matches_its_dense_reference():
    from engines.build import build_engine, kernel_choices
    from engines.engine_file import Profile
    from engines.runtime import Engine
    from tests.test_engines import max_calibration

    dense = loaded_model()
    calib = max_calibration(dense)
    sparse_policy, dense_policy = PrecisionPolicy(int8=True, iln=True, sparse=True), PrecisionPolicy(int8=True, iln=True)
    cpu = torch.device("cpu")
    with pytest.raises(WorkbenchError, match=r"^--sparse: 8 GEMM weights of tiny are not 2:4 \(layer0\.qkv, "
                                             r"layer0\.attn_out, layer0\.fc1, layer0\.fc2 and 4 more\): prune"):
        build_engine(dense, sparse_policy, [Profile(2, 32)], calib, cpu, None)
    header, tensors = build_engine(dense, sparse_policy, [Profile(2, 32)], calib, cpu, None, prune=True)
    assert header.policy["sparse"] and "--sparse" in sparse_policy.describe()
    assert any("2:4 weights: dense kernels" in line for line in kernel_choices(header))
    engine = Engine(header, tensors, cpu)
    assert all(is_2to4_sparse(g.weight) for g in engine.gemms.values())
    pruned = loaded_model()
    prune_2to4(pruned.model)  # the same magnitude pruning, then a dense build of it: the same engine function
    reference = Engine(*build_engine(pruned, dense_policy, [Profile(2, 32)], calib, cpu, None), cpu)
    x = inputs(batch=2, seq=32)
    with torch.no_grad():
        for got, want in zip(engine(*x), reference(*x)):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
