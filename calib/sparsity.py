"""2:4 structured sparsity of the encoder GEMM weights: what a `--sparse` build (sparse tensor cores) needs.

A weight matrix [out, in] is 2:4 sparse when every group of 4 consecutive input-dimension weights of a row holds at
most 2 non-zeros (cuSPARSELt's and TensorRT's pattern). Sparse kernels skip the zeros, so only a model pruned to
this pattern (e.g. with ASP or modelopt's sparsity) gains from them; a dense model would first have to be pruned
and fine-tuned, which the workbench does not do.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from quant.policy import GEMMS


def is_2to4_sparse(weight: torch.Tensor) -> bool:
    """Every row's consecutive groups of 4 (along the input dimension) hold at most 2 non-zeros."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        return False
    groups = (weight.detach().reshape(weight.shape[0], -1, 4) != 0).sum(-1)
    return bool((groups <= 2).all())


@dataclass(frozen=True)
class SparsityCheck:
    sparse: tuple[str, ...]   # GEMM weights that are 2:4 sparse, e.g. "layers.0.fc1.weight"
    dense: tuple[str, ...]    # the others

    @property
    def all_sparse(self) -> bool:
        return bool(self.sparse) and not self.dense

    def summary(self) -> str:
        total = len(self.sparse) + len(self.dense)
        return f"{len(self.sparse)} of {total} GEMM weights are 2:4 sparse"


def gemm_sparsity(model: torch.nn.Module, num_layers: int) -> SparsityCheck:
    """Check each encoder GEMM weight (qkv, attn_out, fc1, fc2 of every layer) of a reference BertQA."""
    state = model.state_dict()
    names = [f"layers.{i}.{g}.weight" for i in range(num_layers) for g in GEMMS]
    flags = {name: is_2to4_sparse(state[name]) for name in names}
    return SparsityCheck(tuple(n for n in names if flags[n]), tuple(n for n in names if not flags[n]))
