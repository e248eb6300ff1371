"""Sliding-window features for extractive QA, with the semantics of Hugging Face run_qa.

The reference accuracy was measured on features built this way ([CLS] question [SEP] context window [SEP], the
question cut to `max_query_length` tokens, `doc_stride` tokens shared by consecutive windows), so any change here
changes the scores.
Featurizing the dev set takes seconds to minutes, so the arrays are cached by content.
"""
from __future__ import annotations

import hashlib
import logging
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file
from tqdm import tqdm

from common.errors import WorkbenchError
from common.files import atomic_path, cache_root
from data.squad import Example
from data.tokenizer import WordPiece

FEATURIZER_VERSION = 2   # bump whenever the arrays produced for the same inputs change
_CHUNK = 512             # examples per encode_batch call: big enough to use all cores, small for the progress bar
_SPECIALS = 3            # [CLS] question [SEP] context [SEP]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FeatureSettings:
    max_seq_length: int = 384
    doc_stride: int = 128        # tokens shared by consecutive windows of one context (Hugging Face meaning)
    max_query_length: int = 64
    # tokenizers 0.23.2 dropped context tokens past max_seq_length before making overflow windows (at most two
    # windows, long contexts lose their tail). The shared MiniLM was trained and scored on such windows; this
    # reproduces them exactly, for comparisons with that reference. Off: the documented stride semantics.
    legacy_windows: bool = False

    def __post_init__(self) -> None:
        """Reject settings that leave no room for context tokens or make windows that never advance."""
        if self.max_query_length < 1:
            raise WorkbenchError(f"max_query_length must be at least 1, got {self.max_query_length}")
        room = self.max_seq_length - self.max_query_length - _SPECIALS
        if room < 1:
            raise WorkbenchError(f"max_seq_length {self.max_seq_length} leaves no room for context tokens: it must exceed "
                                 f"max_query_length {self.max_query_length} + {_SPECIALS} special tokens")
        if not 0 <= self.doc_stride < room:
            raise WorkbenchError(f"doc_stride {self.doc_stride} must be at least 0 and below the {room} context tokens "
                                 f"per window (max_seq_length - max_query_length - {_SPECIALS})")


DEFAULT_DOC_STRIDE = 128  # Hugging Face's and the TensorRT demo's default


def fitting_stride(max_seq_length: int, max_query_length: int, doc_stride: int | None = None) -> tuple[int, str | None]:
    """--doc-stride as given; when not given, 128, or (when 128 is not below the context tokens a window holds,
    e.g. -s 128 with 64 question tokens: 61) half of those tokens, with the line that says so."""
    room = max_seq_length - max_query_length - _SPECIALS
    if doc_stride is not None or room <= 1 or DEFAULT_DOC_STRIDE < room:
        return (DEFAULT_DOC_STRIDE if doc_stride is None else doc_stride), None
    stride = room // 2
    return stride, (f"--doc-stride {DEFAULT_DOC_STRIDE} (the default) does not fit the {room} context tokens of a "
                    f"{max_seq_length}-token window (after up to {max_query_length} question tokens): using "
                    f"--doc-stride {stride}")


def default_stride(flags) -> int:
    """--doc-stride for flags that left it out (max_seq_length, max_query_length): `fitting_stride`'s, its line
    logged as a warning."""
    stride, note = fitting_stride(flags.max_seq_length, flags.max_query_length)
    if note:
        log.warning("%s", note)
    return stride


@dataclass
class Features:
    input_ids: np.ndarray        # int32 [N, S], padded with pad_id to max_seq_length
    token_type_ids: np.ndarray   # int32 [N, S]
    attention_mask: np.ndarray   # int32 [N, S]
    example_index: np.ndarray    # int32 [N], index into the examples list
    offsets: np.ndarray          # int32 [N, S, 2]: context char span of context tokens, (-1, -1) elsewhere
    start_positions: np.ndarray  # int32 [N]: first answer's start token, 0 ([CLS]) if not in this window
    end_positions: np.ndarray    # int32 [N]

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


_FIELDS = ("input_ids", "token_type_ids", "attention_mask", "example_index", "offsets",
           "start_positions", "end_positions")


def featurize(examples: Sequence[Example], wordpiece: WordPiece, settings: FeatureSettings = FeatureSettings(),
              *, cache: bool = True, progress: bool = True) -> Features:
    """Tokenize examples into fixed-length windows; with `cache`, reuse arrays from an identical earlier call."""
    path = cache_root() / "features" / f"{cache_key(examples, wordpiece, settings)}.safetensors" if cache else None
    if path is not None and path.exists():
        cached = _load(path, len(examples), settings.max_seq_length)
        if cached is not None:
            return cached
    features = _compute(examples, wordpiece, settings, progress)
    if path is not None:
        _store(path, features)
    return features


def cache_key(examples: Sequence[Example], wordpiece: WordPiece, settings: FeatureSettings) -> str:
    """Hash of everything the arrays depend on: the text itself (not a file path), tokenizer and settings."""
    h = hashlib.sha256()
    head = f"featurizer {FEATURIZER_VERSION}\0{wordpiece.digest}\0{sorted(asdict(settings).items())}"
    h.update(head.encode())
    for ex in examples:
        # The first answer decides start/end positions, so it is part of the key too.
        answer = ex.answers[0] if ex.answers and not ex.is_impossible else None
        parts = (ex.qid, ex.question, ex.context, "" if answer is None else f"{answer.start}:{answer.text}")
        for part in parts:
            data = part.encode("utf-8", "surrogatepass")
            h.update(len(data).to_bytes(8, "little"))
            h.update(data)
    return h.hexdigest()


def _compute(examples: Sequence[Example], wp: WordPiece, s: FeatureSettings, progress: bool) -> Features:
    """Tokenize question and context separately, then cut the context into windows ourselves.

    The windows are the ones the fast tokenizer's `only_second` truncation with `stride` is documented to make,
    but computed here: tokenizers 0.23.2 and 0.23.3 return different overflow windows for the same call (10,753
    against 10,784 features on the SQuAD dev set), and features must not change with a library's patch release.
    Contexts are shared by about five questions each in SQuAD, so each distinct context is tokenized once.
    """
    rows: list[tuple] = []
    with tqdm(total=len(examples), desc="featurize", unit="q", disable=not progress, file=sys.stderr) as bar:
        for lo in range(0, len(examples), _CHUNK):
            chunk = examples[lo:lo + _CHUNK]
            questions = wp.tokenizer.encode_batch([ex.question for ex in chunk], add_special_tokens=False)
            contexts = list(dict.fromkeys(ex.context for ex in chunk))
            encoded = dict(zip(contexts, wp.tokenizer.encode_batch(contexts, add_special_tokens=False)))
            for i, (ex, q) in enumerate(zip(chunk, questions)):
                q_ids = q.ids[:s.max_query_length]
                ctx = encoded[ex.context]
                room = s.max_seq_length - len(q_ids) - _SPECIALS
                n_ctx = min(len(ctx.ids), s.max_seq_length) if s.legacy_windows else len(ctx.ids)
                for a, b in window_spans(n_ctx, room, s.doc_stride):
                    rows.append(_window(lo + i, ex, wp, q_ids, ctx.ids[a:b], ctx.offsets[a:b]))
            bar.update(len(chunk))
    return _stack(rows, s.max_seq_length, wp.pad_id)


def window_spans(n_tokens: int, room: int, stride: int) -> list[tuple[int, int]]:
    """[start, stop) token ranges of a context: `room` tokens each, consecutive ones sharing `stride` tokens."""
    spans, start = [], 0
    while True:
        stop = min(start + room, n_tokens)
        spans.append((start, stop))
        if stop == n_tokens:
            return spans
        start += room - stride


def _window(example_index: int, ex: Example, wp: WordPiece, q_ids: list[int], c_ids: list[int],
            c_offsets: list[tuple[int, int]]) -> tuple:
    """[CLS] question [SEP] context-window [SEP], with context character offsets and the answer's tokens."""
    head = len(q_ids) + 2
    ids = np.asarray([wp.cls_id, *q_ids, wp.sep_id, *c_ids, wp.sep_id], dtype=np.int32)
    types = np.zeros(len(ids), dtype=np.int32)
    types[head:] = 1
    is_context = np.zeros(len(ids), dtype=bool)
    is_context[head:head + len(c_ids)] = True
    offsets = np.full((len(ids), 2), -1, dtype=np.int32)
    offsets[is_context] = np.asarray(c_offsets, dtype=np.int32).reshape(-1, 2)
    start, end = _answer_tokens(ex, offsets, is_context)
    return example_index, ids, types, offsets, start, end


def _answer_tokens(ex: Example, offsets: np.ndarray, is_context: np.ndarray) -> tuple[int, int]:
    """Token span of the first answer when it lies wholly inside this window, else (0, 0) pointing at [CLS]."""
    if not ex.answers or ex.is_impossible:
        return 0, 0
    answer = ex.answers[0]
    start_char, end_char = answer.start, answer.start + len(answer.text)
    ctx = np.flatnonzero(is_context)
    if len(ctx) == 0 or offsets[ctx[0], 0] > start_char or offsets[ctx[-1], 1] < end_char:
        return 0, 0
    start = ctx[offsets[ctx, 0] <= start_char][-1]   # last token starting at or before the answer
    end = ctx[offsets[ctx, 1] >= end_char][0]        # first token ending at or after it
    return int(start), int(end)


def _stack(rows: list[tuple], seq_len: int, pad_id: int) -> Features:
    n = len(rows)
    input_ids = np.full((n, seq_len), pad_id, dtype=np.int32)
    token_type_ids = np.zeros((n, seq_len), dtype=np.int32)
    attention_mask = np.zeros((n, seq_len), dtype=np.int32)
    offsets = np.full((n, seq_len, 2), -1, dtype=np.int32)
    for r, (_, ids, types, offs, _, _) in enumerate(rows):
        k = len(ids)
        input_ids[r, :k] = ids
        token_type_ids[r, :k] = types
        attention_mask[r, :k] = 1
        offsets[r, :k] = offs
    column = lambda j: np.array([row[j] for row in rows], dtype=np.int32).reshape(n)  # noqa: E731
    return Features(input_ids, token_type_ids, attention_mask, column(0), offsets, column(4), column(5))


def _checksum(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in _FIELDS:
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}:{a.dtype.str}:{a.shape}\0".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _store(path: Path, features: Features) -> None:
    arrays = {name: np.ascontiguousarray(getattr(features, name)) for name in _FIELDS}
    meta = {"checksum": _checksum(arrays), "featurizer_version": str(FEATURIZER_VERSION)}
    try:
        with atomic_path(path) as tmp:
            save_file(arrays, tmp, metadata=meta)
    except OSError as e:  # a read-only or full cache disk costs time, not the run
        log.warning("%s: cannot write feature cache (%s); continuing without it", path, e.strerror or e)


def _load(path: Path, n_examples: int, seq_len: int) -> Features | None:
    """Cached features, or None (with a one-line warning) when the file is damaged or does not fit."""
    try:
        with safe_open(str(path), framework="np") as f:
            meta = f.metadata() or {}
            arrays = {name: f.get_tensor(name) for name in f.keys()}
        problem = _cache_problem(arrays, meta, n_examples, seq_len)
    except Exception as e:  # safetensors raises several types for truncated or garbled files
        problem = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else 'unreadable'}"
    if problem:
        log.warning("%s: feature cache is corrupt (%s); recomputing", path, problem)
        return None
    return Features(**{name: arrays[name] for name in _FIELDS})


def _cache_problem(arrays: dict, meta: dict, n_examples: int, seq_len: int) -> str | None:
    if set(arrays) != set(_FIELDS):
        return "unexpected arrays"
    if meta.get("checksum") != _checksum(arrays):
        return "checksum mismatch"
    n = len(arrays["input_ids"])
    shapes = {"input_ids": (n, seq_len), "token_type_ids": (n, seq_len), "attention_mask": (n, seq_len),
              "offsets": (n, seq_len, 2), "example_index": (n,), "start_positions": (n,), "end_positions": (n,)}
    for name, shape in shapes.items():
        if arrays[name].shape != shape or arrays[name].dtype != np.int32:
            return f"{name} has shape {arrays[name].shape} {arrays[name].dtype}"
    ei = arrays["example_index"]
    if n < n_examples or (n and (ei.min() < 0 or ei.max() >= n_examples)):
        return "example indices out of range"
    return None
