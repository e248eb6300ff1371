"""Run a QA forward over featurized data in batches: device and precision choice, padding trimming, progress.

Shared by evaluation, inference and calibration, so every path feeds the model the same way. Features are run
longest first and each batch is cut to its longest sequence (rounded up to a multiple of 8): padding tokens are
masked out of attention, so the logits of real tokens do not change, and short SQuAD windows cost less. An engine
built --varlen runs packed instead (model/packing.py): no padding at all, the windows of a batch back to back.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from common.errors import WorkbenchError

PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def pick_device(name: str | None) -> torch.device:
    """`None` means CUDA when present, else the CPU; asking for CUDA without a GPU is a user error."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise WorkbenchError(f"--device must be cpu or cuda, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise WorkbenchError("--device cuda: no CUDA GPU is visible to PyTorch on this machine")
    return torch.device(name)


def pick_precision(name: str | None, device: torch.device) -> torch.dtype:
    """Default: FP16 on CUDA (what the reference accuracy was measured in), FP32 on the CPU (FP16 is slow there)."""
    if name is None:
        name = "fp16" if device.type == "cuda" else "fp32"
    if name not in PRECISIONS:
        raise WorkbenchError(f"--precision must be one of {', '.join(PRECISIONS)}, got {name!r}")
    return PRECISIONS[name]


def batches_by_length(attention_mask: np.ndarray, batch_size: int, multiple: int = 8,
                      pad_to: int | None = None) -> list[tuple[np.ndarray, int]]:
    """Feature indices grouped longest first, each group with the sequence length it needs (or `pad_to` for every
    group: the padded path a throughput comparison times beside the trimmed one)."""
    lengths = attention_mask.sum(1)
    order = np.argsort(-lengths, kind="stable")
    out = []
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        seq = pad_to or int(min(attention_mask.shape[1], -(-int(lengths[idx].max()) // multiple) * multiple))
        out.append((idx, seq))
    return out


def run_logits(forward: Forward, features, device: torch.device, batch_size: int = 32, progress: bool = True,
               desc: str = "inference", pad_to: int | None = None,
               packed: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Start/end logits, FP32 [N, S]; every padding position holds -inf (never an answer, and so the answers do not
    depend on how far a batch was padded: to its longest window rounded up to 8, to a bucket, or to `pad_to`, the
    padded path a throughput comparison times; nor on whether it was packed). `packed`: run the windows packed
    (`forward.packed` or `forward_packed`); None: where the forward says it runs packed (`runs_packed`: an
    engine built --varlen)."""
    if batch_size < 1:
        raise WorkbenchError(f"--batch-size must be at least 1, got {batch_size}")
    n, s = features.input_ids.shape
    start = np.full((n, s), -np.inf, dtype=np.float32)
    end = np.full((n, s), -np.inf, dtype=np.float32)
    if packed or (packed is None and pad_to is None and getattr(forward, "runs_packed", False)):
        _run_packed(forward, features, device, batch_size, progress, desc, start, end)
        return start, end
    batches = batches_by_length(features.attention_mask, batch_size, pad_to=pad_to)
    host = ([torch.from_numpy(a[idx, :seq]).long() for a in (features.input_ids, features.token_type_ids,
                                                              features.attention_mask)] for idx, seq in batches)
    pipelined = getattr(forward, "pipelined", None)  # engines: copies overlap compute on a side stream
    if pipelined is None:
        outputs = ((s_logits.cpu(), e_logits.cpu()) for s_logits, e_logits in
                   (forward(*(a.to(device, non_blocking=True) for a in args)) for args in host))
    else:
        outputs = pipelined(host)
    with torch.inference_mode(), tqdm(total=n, desc=desc, unit="feat", disable=not progress, leave=False) as bar:
        for (idx, seq), (s_logits, e_logits) in zip(batches, outputs):
            start[idx, :seq] = s_logits.float().numpy()
            end[idx, :seq] = e_logits.float().numpy()
            bar.update(len(idx))
    padding = features.attention_mask == 0
    start[padding] = end[padding] = -np.inf
    return start, end


def _run_packed(forward, features, device: torch.device, batch_size: int, progress: bool, desc: str,
                start: np.ndarray, end: np.ndarray) -> None:
    """run_logits' packed path: windows packed longest first (filling the engine's largest token budget, or at
    most `batch_size` of them and batch_size x S tokens a batch), each batch's per-token logits scattered back to
    its windows' rows of start and end."""
    from model.packing import batches_of, longest_window, packed_batch, scatter_logits

    entry = getattr(forward, "packed", None) or getattr(forward, "forward_packed", None)
    if entry is None:
        raise WorkbenchError("this forward has no packed path (build the engine with --varlen)")
    lengths, packs = batches_of(features.attention_mask, batch_size, getattr(forward, "packing", None))
    batches = [packed_batch(features.input_ids, features.token_type_ids, lengths, idx) for idx in packs]
    pipelined = getattr(forward, "pipelined", None)
    if pipelined is None:
        outputs = ((a.cpu(), b.cpu()) for a, b in (entry(*(t.to(device) for t in batch.tensors),
                                                         longest_window(batch.cu_seqlens)) for batch in batches))
    else:
        outputs = pipelined((batch.tensors for batch in batches), packed=True)
    with torch.inference_mode(), tqdm(total=len(lengths), desc=desc, unit="feat", disable=not progress,
                                      leave=False) as bar:
        for batch, (s_logits, e_logits) in zip(batches, outputs):
            scatter_logits(start, batch, s_logits)
            scatter_logits(end, batch, e_logits)
            bar.update(len(batch.index))
