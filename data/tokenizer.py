"""The fast (Rust) WordPiece tokenizer of a Hugging Face model folder, checked against the model.

A vocabulary that does not belong to the model silently produces garbage answers, so sizes and special tokens
are checked here and reported as one-line errors naming the file.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, Tokenizer, normalizers, pre_tokenizers, processors, decoders, models

from common.errors import WorkbenchError
from common.files import parse_json, read_bytes, read_json, sha256_bytes

SPECIALS = ("[CLS]", "[SEP]", "[PAD]", "[UNK]")
# A model's embedding table may have a few more rows than its vocabulary (padded to a multiple of 8 or 64 for the
# tensor cores: 30,522 tokens in 30,528 rows); a vocabulary this many tokens short is another model's, whose ids
# would index the wrong rows and answer garbage.
EMBEDDING_PADDING = 128


@dataclass(frozen=True)
class WordPiece:
    tokenizer: tokenizers.Tokenizer  # no truncation/padding configured on it
    digest: str                      # sha256 over the vocabulary/tokenizer file content + lower-casing flag
    vocab_size: int
    cls_id: int
    sep_id: int
    pad_id: int


def load_wordpiece(model_dir: str | Path, vocab_size: int | None = None,
                   vocab_file: str | Path | None = None) -> WordPiece:
    """Load tokenizer.json if present, else build the BERT tokenizer from vocab.txt; with `vocab_file` (the
    TensorRT demo's -v/--vocab-file) that vocab.txt instead of the folder's files, with the folder's
    tokenizer_config.json settings.

    `vocab_size` is the model's embedding rows: a tokenizer that can emit larger ids (or far fewer) does not
    belong to it, whichever file it came from.
    """
    folder = Path(model_dir)
    if not folder.is_dir():
        raise WorkbenchError(f"{folder}: model folder not found")
    tok_json, vocab_txt = folder / "tokenizer.json", folder / "vocab.txt"
    if vocab_file is not None:
        tok_json, vocab_txt = None, Path(vocab_file)
        if not vocab_txt.is_file():
            raise WorkbenchError(f"{vocab_txt}: vocabulary file (-v/--vocab-file) not found")
    settings = _bert_settings(folder / "tokenizer_config.json")
    vocab = _read_vocab(vocab_txt) if vocab_txt.exists() else None
    if tok_json is not None and tok_json.exists():
        source = tok_json
        tokenizer, content = _from_json(tok_json, settings)
        size = tokenizer.get_vocab_size(with_added_tokens=True)
        if vocab is not None:
            _check_same_vocab(tokenizer, size, tok_json, vocab, vocab_txt)
    elif vocab is not None:
        source = vocab_txt
        tokenizer, content = _from_vocab(vocab, settings), vocab_txt.read_bytes()
        size = _vocab_size(vocab)
    else:
        raise WorkbenchError(f"{folder}: no tokenizer.json or vocab.txt (cannot tokenize for this model)")

    ids = {name: tokenizer.token_to_id(name) for name in SPECIALS}
    missing = [name for name, i in ids.items() if i is None]
    if missing:
        raise WorkbenchError(f"{source}: vocabulary lacks {', '.join(missing)} (not a BERT WordPiece vocabulary)")
    if vocab_size is not None and (size > vocab_size or vocab_size - size >= EMBEDDING_PADDING):
        raise WorkbenchError(f"{source.name} has {size} tokens but the model's config.json says vocab_size "
                             f"{vocab_size}: the vocabulary does not belong to this model")
    flags = json.dumps(settings, sort_keys=True).encode()
    digest = sha256_bytes(source.name.encode() + b"\0" + sha256_bytes(content).encode() + b"\0" + flags)
    return WordPiece(tokenizer, digest, size, ids["[CLS]"], ids["[SEP]"], ids["[PAD]"])


def wordpiece_from_str(serialized: str, source: str) -> WordPiece:
    """Rebuild a WordPiece from `wordpiece.tokenizer.to_str()`: engines carry their tokenizer this way, so they
    answer questions without the model folder. The lower-casing and other settings are already baked in."""
    try:
        tokenizer = Tokenizer.from_str(serialized)
    except Exception as e:  # the Rust side raises plain Exception
        raise WorkbenchError(f"{source}: cannot load the embedded tokenizer: {str(e).strip()[:200]}") from None
    ids = {name: tokenizer.token_to_id(name) for name in SPECIALS}
    if any(i is None for i in ids.values()):
        raise WorkbenchError(f"{source}: the embedded tokenizer lacks BERT's special tokens")
    return WordPiece(tokenizer, sha256_bytes(serialized.encode()), tokenizer.get_vocab_size(with_added_tokens=True),
                     ids["[CLS]"], ids["[SEP]"], ids["[PAD]"])


def _bert_settings(path: Path) -> dict:
    """The normalizer flags from tokenizer_config.json, with BertTokenizer's defaults when absent."""
    cfg = read_json(path, "tokenizer config") if path.exists() else {}
    if not isinstance(cfg, dict):
        raise WorkbenchError(f"{path}: expected a JSON object")
    settings = {"lowercase": cfg.get("do_lower_case", True),
                "strip_accents": cfg.get("strip_accents"),
                "handle_chinese_chars": cfg.get("tokenize_chinese_chars", True),
                "explicit_lowercase": "do_lower_case" in cfg}
    for key, name in (("lowercase", "do_lower_case"), ("handle_chinese_chars", "tokenize_chinese_chars")):
        if not isinstance(settings[key], bool):
            raise WorkbenchError(f"{path}: {name} must be true or false")
    if settings["strip_accents"] not in (None, True, False):
        raise WorkbenchError(f"{path}: strip_accents must be null, true or false")
    return settings


def _read_vocab(path: Path) -> dict[str, int]:
    """vocab.txt: one token per line, id = line number (later duplicates win, as in BertTokenizer)."""
    raw = read_bytes(path, "vocabulary")
    try:
        lines = raw.decode("utf-8").split("\n")
    except UnicodeDecodeError as e:
        raise WorkbenchError(f"{path}: vocabulary is not UTF-8 text (byte {e.start})") from None
    if lines and lines[-1] == "":
        lines.pop()
    # Only "\n" separates tokens: vocabularies contain tokens such as "\x85" that str.splitlines would split.
    vocab = {line.rstrip("\r"): i for i, line in enumerate(lines)}
    if not vocab:
        raise WorkbenchError(f"{path}: vocabulary is empty")
    return vocab


def _vocab_size(vocab: dict[str, int]) -> int:
    """Embedding rows the vocabulary needs: ids are line numbers, so duplicates do not shrink it."""
    return max(vocab.values()) + 1


def _from_json(path: Path, settings: dict) -> tuple[Tokenizer, bytes]:
    raw = read_bytes(path, "tokenizer file")
    spec = parse_json(raw, path, "tokenizer file")
    if not isinstance(spec, dict):
        raise WorkbenchError(f"{path}: expected a JSON object")
    # Windows and padding are the featurizer's business; a tokenizer.json saved mid-pipeline often carries them.
    spec["truncation"] = None
    spec["padding"] = None
    norm = spec.get("normalizer")
    # Like transformers' BertTokenizerFast: an explicit do_lower_case in tokenizer_config.json wins.
    if settings["explicit_lowercase"] and isinstance(norm, dict) and norm.get("type") == "BertNormalizer":
        norm["lowercase"] = settings["lowercase"]
    try:
        tokenizer = Tokenizer.from_str(json.dumps(spec))
    except Exception as e:  # the Rust side raises plain Exception with a multi-line message
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WorkbenchError(f"{path}: cannot load tokenizer: {first}") from None
    return tokenizer, raw


def _from_vocab(vocab: dict[str, int], settings: dict) -> Tokenizer:
    """The tokenizer transformers' BertTokenizerFast builds from a slow BERT vocabulary."""
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tokenizer.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=settings["handle_chinese_chars"],
        strip_accents=settings["strip_accents"], lowercase=settings["lowercase"])
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    if "[CLS]" in vocab and "[SEP]" in vocab:
        cls, sep = ("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])
        tokenizer.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[cls, sep])
    # Special tokens in the text must stay whole (and un-lowercased), as with a Hugging Face fast tokenizer.
    present = [t for t in (*SPECIALS, "[MASK]") if t in vocab]
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in present])
    return tokenizer


def _check_same_vocab(tokenizer: Tokenizer, size: int, tok_json: Path, vocab: dict[str, int], vocab_txt: Path):
    if size != _vocab_size(vocab):
        raise WorkbenchError(f"{tok_json} has {size} tokens but {vocab_txt} has {_vocab_size(vocab)}: "
                             "they are not the same vocabulary (remove the stale one)")
    if tokenizer.get_vocab(with_added_tokens=True) != vocab:
        raise WorkbenchError(f"{tok_json} and {vocab_txt} assign different ids to the same tokens: "
                             "they are not the same vocabulary (remove the stale one)")
