"""SparseGPT for 2:4 (Frantar & Alistarh, 2023): which 2 of each 4 weights stay, and the kept weights updated to
make up for the pruned ones, layer by layer on the activations of calibration windows.

For each GEMM weight W [out, in] with inputs X (rows: real tokens), H = X^T X is the Hessian of the layer's
reconstruction error ||X W^T - X Q^T||^2. Going through the input columns in blocks, each group of 4 columns drops
the 2 weights per row with the least error w^2 / [H^-1]_jj^2, and the columns not yet visited absorb the error of
every pruned weight through H^-1 (the optimal brain surgeon's update), so the GEMM's output moves as little as the
pattern allows.

Why ours and not nvidia-modelopt's (which `--method magnitude` uses): modelopt 0.47's SparseGPT searcher uses the
algorithm to choose the mask only (its compensating update stays in a local copy of the weight, and the original
weights are masked), and it collects every Hessian from the dense model at once, padding positions included. Here
the kept weights get the update, each encoder layer is pruned on the outputs of the layers pruned before it, and
the Hessians count real tokens only (padding is not an input the model serves).
"""
from __future__ import annotations

from typing import Iterable

import torch

from model.bert import BertQA, attention_bias
from quant.policy import GEMMS

DAMP = 0.01      # added to H's diagonal, times its mean: the paper's default; keeps H^-1 defined for dead inputs
BLOCK = 128      # input columns updated together (a multiple of 4; the result does not depend on it)


def inverse_hessian_factor(h: torch.Tensor, damp: float = DAMP) -> torch.Tensor:
    """The upper Cholesky factor U of H^-1 (H^-1 = U^T U), after dampening: row j of U from column j on is what
    the columns after j absorb of an error at j, and U_jj^2 plays [H^-1]_jj's part in the sequential update."""
    h = h.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    h.diagonal().add_(damp * torch.diag(h).mean())
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)


def prune_weight(w: torch.Tensor, h: torch.Tensor, damp: float = DAMP, block: int = BLOCK) -> torch.Tensor:
    """`w` [out, in] pruned 2:4 along `in` by SparseGPT with Hessian `h` [in, in]; returns the new weight (float32:
    the kept weights updated, the pruned ones exactly 0)."""
    w = w.detach().float().clone()
    w[:, torch.diag(h) == 0] = 0.0  # inputs that are always 0: their weights do nothing
    u = inverse_hessian_factor(h.float(), damp)
    cols = w.shape[1]
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        wb, ub = w[:, i1:i2].clone(), u[i1:i2, i1:i2]
        errors = torch.zeros_like(wb)
        pruned = torch.zeros_like(wb, dtype=torch.bool)
        for j in range(i2 - i1):
            if j % 4 == 0:
                score = wb[:, j:j + 4] ** 2 / torch.diag(ub)[j:j + 4] ** 2
                pruned[:, j:j + 4].scatter_(1, score.topk(2, dim=1, largest=False).indices, True)
            col = wb[:, j]
            kept = torch.where(pruned[:, j], 0.0, col)
            errors[:, j] = (col - kept) / ub[j, j]
            wb[:, j:] -= errors[:, j:j + 1] * ub[j:j + 1, j:]
            wb[:, j] = kept
        w[:, i1:i2] = wb
        w[:, i2:] -= errors @ u[i1:i2, i2:]
    return w


@torch.no_grad()
def sparsegpt_2to4(model: BertQA, names: Iterable[str],
                   calibration: Iterable[tuple[torch.Tensor, ...]]) -> None:
    """Prune the GEMM weights `names` ("layers.I.GEMM.weight") of `model` in place, one encoder layer after
    another: each layer's Hessians come from its inputs given the layers already pruned; `calibration`: batches
    of (input_ids, token_type_ids, attention_mask), on the model's device."""
    names = set(names)
    batches = list(calibration)
    xs = [model.tap("embeddings.ln_out", model.embeddings(ids, types)) for ids, types, _ in batches]
    biases = [attention_bias(mask) for _, _, mask in batches]
    for i, layer in enumerate(model.layers):
        gemms = {g: getattr(layer, g) for g in GEMMS if f"layers.{i}.{g}.weight" in names}
        hessians = {g: torch.zeros(m.in_features, m.in_features, device=m.weight.device) for g, m in gemms.items()}
        real: list[torch.Tensor] = []

        def collect(g):
            def hook(module, args, output):
                x = args[0].reshape(-1, args[0].shape[-1])[real[0]].float()
                hessians[g].addmm_(x.T, x)
            return hook
        handles = [m.register_forward_hook(collect(g)) for g, m in gemms.items()]
        try:
            for x, bias, (_, _, mask) in zip(xs, biases, batches):
                real[:] = [mask.reshape(-1).bool()]
                layer(x, bias, model.tap, f"layer{i}")
        finally:
            for handle in handles:
                handle.remove()
        for g, m in gemms.items():
            m.weight.copy_(prune_weight(m.weight, hessians[g]).to(m.weight.dtype))
        xs = [layer(x, bias, model.tap, f"layer{i}") for x, bias in zip(xs, biases)]
