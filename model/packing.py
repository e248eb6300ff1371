"""Packing windows for padding-free execution (build --varlen): the windows of a batch back to back in one token
stream, cumulative lengths marking where each starts.

A padded batch of SQuAD windows at 384 tokens is mostly padding (the official dev set's windows are far shorter
on average), and a padded forward computes every padding row of every GEMM, LayerNorm and attention. Packed, a
batch holds real tokens only: `cu_seqlens` [n + 1] (int32, cu_seqlens[0] = 0) says window w is tokens
cu_seqlens[w] to cu_seqlens[w + 1], `position_ids` restart at 0 in each window (the position embeddings a
padded row of the window would have), and the forward (engines.runtime.Engine.forward_packed) attends within
each window only.

`pack_windows` groups windows longest first, greedily, into batches of at most `token_budget` tokens and
`max_windows` windows (`batches_of`: the batch size's worth of windows, within batch size x the
longest window's tokens); an engine's CUDA graphs then run each batch in the smallest token budget that holds it
(engines/graphs.py). Windows are the prefix of their attention mask (real tokens first, then padding), as
featurization makes them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from common.errors import WorkbenchError


@dataclass(frozen=True)
class PackedBatch:
    """One packed batch on the host: which windows (feature indices, in stream order) and the stream."""

    index: np.ndarray             # [n] feature indices
    input_ids: torch.Tensor       # [T] int64
    token_type_ids: torch.Tensor  # [T] int64
    position_ids: torch.Tensor    # [T] int64: 0, 1, ... within each window
    cu_seqlens: torch.Tensor      # [n + 1] int32

    @property
    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """What the packed forward takes, but max_seqlen: (input_ids, token_type_ids, position_ids, cu_seqlens)."""
        return self.input_ids, self.token_type_ids, self.position_ids, self.cu_seqlens

    @property
    def max_seqlen(self) -> int:
        return longest_window(self.cu_seqlens)


def longest_window(cu_seqlens: torch.Tensor) -> int:
    """The longest window of a host cu_seqlens (0 when there is none)."""
    return int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.numel() > 1 else 0


def window_lengths(attention_mask: np.ndarray) -> np.ndarray:
    """Each window's length, after checking that its real tokens come first (the packed path takes the prefix)."""
    mask = np.asarray(attention_mask)
    lengths = mask.sum(1).astype(np.int64)
    if not np.array_equal(mask.astype(bool), np.arange(mask.shape[1])[None, :] < lengths[:, None]):
        raise WorkbenchError("packed execution takes windows whose real tokens come first (attention mask 1...1 "
                             "0...0); these have padding between real tokens")
    return lengths


def pack_windows(lengths: np.ndarray, token_budget: int, max_windows: int) -> list[np.ndarray]:
    """Window indices, longest first, greedily into batches of at most `token_budget` tokens and `max_windows`
    windows: a batch closes when the next window would break either limit."""
    if token_budget < 1 or max_windows < 1:
        raise WorkbenchError(f"packing needs a token budget and a window count of at least 1, got {token_budget} "
                             f"and {max_windows}")
    lengths = np.asarray(lengths)
    if len(lengths) and int(lengths.max()) > token_budget:
        raise WorkbenchError(f"a window of {int(lengths.max())} tokens exceeds the token budget {token_budget}")
    batches, current, tokens = [], [], 0
    for i in np.argsort(-lengths, kind="stable"):
        n = int(lengths[i])
        if current and (tokens + n > token_budget or len(current) == max_windows):
            batches.append(np.array(current))
            current, tokens = [], 0
        current.append(int(i))
        tokens += n
    if current:
        batches.append(np.array(current))
    return batches


def batches_of(attention_mask: np.ndarray, batch_size: int,
               budget: tuple[int, int] | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
    """The windows' lengths and the packed batches every path runs: `budget` (tokens, windows) a batch, an
    engine's (engines.engine_file.packing_budget); without one, at most `batch_size` windows and batch_size x S
    tokens a batch (S: the features' padded length), so a batch fits the profile B x S's budget."""
    lengths = window_lengths(attention_mask)
    tokens, windows = budget or (batch_size * attention_mask.shape[1], batch_size)
    return lengths, pack_windows(lengths, tokens, windows)


def packed_batch(input_ids: np.ndarray, token_type_ids: np.ndarray, lengths: np.ndarray,
                 index: np.ndarray) -> PackedBatch:
    """The stream of windows `index` (rows of the padded [N, S] arrays, real tokens first)."""
    n = lengths[index]
    rows = np.repeat(index, n)
    positions = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
    cu = np.concatenate([[0], np.cumsum(n)])
    return PackedBatch(index, torch.from_numpy(input_ids[rows, positions]).long(),
                       torch.from_numpy(token_type_ids[rows, positions]).long(), torch.from_numpy(positions).long(),
                       torch.from_numpy(cu).to(torch.int32))


def pack_padded(input_ids: torch.Tensor, token_type_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> PackedBatch:
    """A padded host batch [b, s] as one packed batch of its b windows, in order (bench's random batches)."""
    lengths = window_lengths(attention_mask.cpu().numpy())
    return packed_batch(input_ids.cpu().numpy(), token_type_ids.cpu().numpy(), lengths, np.arange(len(lengths)))


def scatter_logits(out: np.ndarray, batch: PackedBatch, logits: torch.Tensor) -> None:
    """Per-token logits [T] of a packed batch into their windows' rows of `out` [N, S] (the real positions)."""
    n = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).numpy()
    total = int(n.sum())
    out[np.repeat(batch.index, n), batch.position_ids.numpy()] = logits[:total].float().numpy()
