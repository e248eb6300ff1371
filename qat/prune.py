"""2:4 structured pruning of the encoder GEMMs (`cli.py prune`), and fine-tuning that keeps the pattern.

The pattern is the one sparse tensor cores run (cuSPARSELt, TensorRT `--sparse`): in every row of a GEMM weight
[out, in], each group of 4 consecutive input-dimension weights keeps at most 2 non-zeros (calib/sparsity.py checks
it). "magnitude" keeps the 2 largest |w| of each group (nvidia-modelopt's sparsity module,
`modelopt.torch.sparsity.sparsify`, exported to plain weights with zeros); "sparsegpt" (SparseGPT, Frantar &
Alistarh 2023; qat/sparsegpt.py, which says why it is ours) picks them from the activations of calibration
batches and updates the kept weights to compensate. Only the encoder GEMMs named by the policy are pruned: the QA
head and the GEMMs in `exclude` keep their weights.

Fine-tuning keeps the masks fixed by zeroing the gradient of every pruned weight (`keep_masks`). Under AdamW a
weight whose gradient is always 0 stays exactly 0: its moments stay 0, so its update is 0, and decoupled weight
decay scales 0 to 0. So the training loop of qat/train.py needs no sparsity step, and checkpoints resume as they
are (the masks are the zeros of the weights themselves).
"""
from __future__ import annotations

import contextlib
import copy
import io
import warnings
from typing import Iterable, Sequence

import torch

from common.errors import WorkbenchError
from model.bert import BertQA
from qat.sparsegpt import sparsegpt_2to4
from quant.policy import GEMMS, check_gemm_names, names_gemm

METHODS = ("magnitude", "sparsegpt")


def pruned_gemms(num_layers: int, exclude: Sequence[str] = ()) -> list[str]:
    """The weight names ("layers.I.GEMM.weight") of the GEMMs to prune: every encoder GEMM but those in `exclude`
    ("layer3.fc2" for one, "fc2" for that GEMM in every layer, as `--keep-fp16` names them)."""
    check_gemm_names(exclude, "--exclude")
    return [f"layers.{i}.{g}.weight" for i in range(num_layers) for g in GEMMS if not names_gemm(exclude, i, g)]


def prune_2to4(model: BertQA, method: str = "magnitude", exclude: Sequence[str] = (),
               calibration: Iterable[tuple[torch.Tensor, ...]] | None = None) -> dict[str, torch.Tensor]:
    """Prune `model` in place to 2:4 along the input dimension of its encoder GEMMs (not those in `exclude`);
    returns each pruned weight's mask (True: kept). "sparsegpt" needs `calibration`: batches of (input_ids,
    token_type_ids, attention_mask); it runs on the GPU where there is one."""
    if method not in METHODS:
        raise WorkbenchError(f"unknown pruning method {method!r} (one of {', '.join(METHODS)})")
    if method == "sparsegpt" and calibration is None:
        raise WorkbenchError("--method sparsegpt needs calibration questions (the training file's first ones)")
    names = pruned_gemms(model.config.num_layers, exclude)
    if method == "sparsegpt":
        device = next(model.parameters()).device
        work = torch.device("cuda") if torch.cuda.is_available() else device
        was_training = model.training
        sparsegpt_2to4(model.to(work).eval(), names, [tuple(t.to(work) for t in b) for b in calibration])
        model.to(device).train(was_training)
    else:
        _magnitude(model, names)
    state = model.state_dict()
    return {name: state[name] != 0 for name in names}


def _magnitude(model: BertQA, names: list[str]) -> None:
    """nvidia-modelopt's magnitude pruning, exported to plain weights with zeros; only the GEMMs in `names` keep
    them (the QA head and the excluded GEMMs get their original weights back)."""
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    # modelopt warns that it skips the 2-wide QA head (restored below anyway), that its transformers version check
    # fails (we do not use its Hugging Face support) and about torch.jit deprecations inside it, and prints a line
    # per module it searches: not the user's; our own line says what was pruned.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        import modelopt.torch.sparsity as mts

        sparse = mts.export(mts.sparsify(copy.deepcopy(model).eval(), "sparse_magnitude",
                                         config={"data_loader": None}))
    pruned = sparse.state_dict()
    with torch.no_grad():
        model.load_state_dict({k: (pruned[k] if k in names else v) for k, v in original.items()})


def keep_masks(model: BertQA, masks: dict[str, torch.Tensor]) -> list:
    """Zero the gradient of every pruned weight from now on, so training keeps the 2:4 pattern (module
    docstring); returns the hook handles."""
    params = dict(model.named_parameters())
    missing = [name for name in masks if name not in params]
    if missing:
        raise WorkbenchError(f"the model has no weight {missing[0]} to keep a 2:4 mask on")
    handles = []
    for name, mask in masks.items():
        # On the gradient's device, copied there once: training moves the model (a CUDA run) after the masks
        # are taken on the CPU, so the weight's device at this point says nothing.
        on_device = {mask.device: mask}

        def keep(grad, on_device=on_device, mask=mask):
            if grad.device not in on_device:
                on_device[grad.device] = mask.to(grad.device)
            return grad * on_device[grad.device]

        handles.append(params[name].register_hook(keep))
    return handles


def masks_of(model: BertQA, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """The masks of already-pruned weights: their non-zeros (a resumed or QAT run continues a pruned model)."""
    state = model.state_dict()
    return {name: state[name] != 0 for name in names}
