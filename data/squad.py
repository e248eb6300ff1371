"""Read SQuAD v1.1 / v2.0 files into frozen examples, validating every field a later stage relies on.

A malformed file fails here, with the file and JSON location in one line, instead of as a KeyError deep in
featurization or scoring. A gzip-compressed file (`dev-v1.1.json.gz`, as the repository's assets/ ships them) is
read the same way; its digest is that of the JSON inside, so the compressed and plain files are the same data to
every cache key.
"""
from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from common.errors import WorkbenchError
from common.files import parse_json, read_bytes, sha256_bytes


@dataclass(frozen=True)
class Answer:
    text: str
    start: int  # char offset in the context


@dataclass(frozen=True)
class Example:
    qid: str
    question: str
    context: str
    answers: tuple[Answer, ...]
    is_impossible: bool = False
    title: str = ""


@dataclass(frozen=True)
class SquadFile:
    path: Path
    version: str            # "1.1" or "2.0"
    examples: list[Example]
    digest: str             # sha256 of the JSON bytes (after gunzip for a .gz file)


def parse_question_limit(text: str | int | None, flag: str = "--limit") -> int | None:
    """A question-count option: a number >= 1, or "all" (None), with a one-line error naming `flag`."""
    if text is None or text == "all":
        return None
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise WorkbenchError(f"{flag} {text!r}: give a number of questions >= 1, or all")
    return n


def load_squad(path: str | Path, limit: int | None = None) -> SquadFile:
    """Load and validate a whole SQuAD file; `limit` then keeps the first N questions in file order.

    The whole file is validated even with a limit, so a broken file is reported the same way every time.
    """
    if limit is not None and limit < 1:
        raise WorkbenchError(f"{path}: limit must be a positive number of questions, got {limit}")
    path = Path(path)
    raw = _gunzip(read_bytes(path, "SQuAD file"), path)
    doc = parse_json(raw, path, "SQuAD file")
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise WorkbenchError(f'{path}: top level is not a JSON object with a "data" list (not a SQuAD file?)')
    v2 = str(doc.get("version", "")).startswith("v2") or _any_impossible(doc["data"])
    examples = _parse(doc["data"], _Where(path))
    if not examples:
        raise WorkbenchError(f"{path}: the data set contains no questions")
    return SquadFile(path, "2.0" if v2 else "1.1", examples[:limit] if limit else examples, sha256_bytes(raw))


def _gunzip(raw: bytes, path: Path) -> bytes:
    """The JSON inside a gzip file (recognized by its magic bytes, whatever its name); other bytes unchanged."""
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise WorkbenchError(f"{path}: damaged gzip file ({e})") from None


def examples_from_pairs(context: str, questions: Sequence[str]) -> list[Example]:
    """Wrap an interactive context and questions as unanswered examples with ids q1, q2, ..."""
    if not isinstance(context, str) or not context.strip():
        raise WorkbenchError("the context is empty")
    if not questions:
        raise WorkbenchError("no questions given")
    examples = []
    for i, q in enumerate(questions, 1):
        if not isinstance(q, str) or not q.strip():
            raise WorkbenchError(f"question {i} is empty")
        examples.append(Example(qid=f"q{i}", question=q.lstrip(), context=context, answers=()))
    return examples


class _Where:
    """Builds one-line errors `file: data[3].paragraphs[2].qas[0]: problem`."""

    def __init__(self, path: Path):
        self.path = path

    def error(self, loc: str, problem: str) -> WorkbenchError:
        return WorkbenchError(f"{self.path}: {loc}: {problem}")

    def field(self, obj: Any, key: str, kind: type, loc: str) -> Any:
        if not isinstance(obj, dict):
            raise self.error(loc, "expected a JSON object")
        if key not in obj:
            raise self.error(loc, f'missing "{key}"')
        value = obj[key]
        # bool is an int subclass in Python but never a valid offset
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise self.error(f"{loc}.{key}", f"expected {_KIND_NAMES[kind]}, got {_json_type(value)}")
        return value


_KIND_NAMES = {str: "a string", int: "an integer", list: "a list", bool: "true or false"}


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list",
            dict: "an object"}.get(type(value), type(value).__name__)


def _any_impossible(data: list) -> bool:
    for article in data:
        for para in article.get("paragraphs", []) if isinstance(article, dict) else []:
            for qa in para.get("qas", []) if isinstance(para, dict) else []:
                if isinstance(qa, dict) and "is_impossible" in qa:
                    return True
    return False


def _parse(data: list, where: _Where) -> list[Example]:
    examples: list[Example] = []
    seen: dict[str, str] = {}
    for a, article in enumerate(data):
        aloc = f"data[{a}]"
        paragraphs = where.field(article, "paragraphs", list, aloc)
        title = article.get("title")
        title = title if isinstance(title, str) else ""
        for p, para in enumerate(paragraphs):
            ploc = f"{aloc}.paragraphs[{p}]"
            context = where.field(para, "context", str, ploc)
            for q, qa in enumerate(where.field(para, "qas", list, ploc)):
                qloc = f"{ploc}.qas[{q}]"
                example = _parse_qa(qa, context, title, qloc, where)
                if example.qid in seen:
                    raise where.error(qloc, f'duplicate question id "{example.qid}" (first at {seen[example.qid]})')
                seen[example.qid] = qloc
                examples.append(example)
    return examples


def _parse_qa(qa: Any, context: str, title: str, loc: str, where: _Where) -> Example:
    qid = where.field(qa, "id", str, loc)
    # Hugging Face run_qa strips leading whitespace: a few SQuAD questions start with many spaces that would
    # otherwise eat the question's token budget.
    question = where.field(qa, "question", str, loc).lstrip()
    if not question:
        raise where.error(f"{loc}.question", "empty question text")
    impossible = where.field(qa, "is_impossible", bool, loc) if "is_impossible" in qa else False
    answers = []
    for i, ans in enumerate(where.field(qa, "answers", list, loc)):
        aloc = f"{loc}.answers[{i}]"
        text = where.field(ans, "text", str, aloc)
        start = where.field(ans, "answer_start", int, aloc)
        if not 0 <= start <= len(context) - len(text):
            raise where.error(f"{aloc}.answer_start", f"{start} puts the answer outside the context "
                                                      f"({len(context)} characters)")
        answers.append(Answer(text, start))
    if impossible and answers:
        raise where.error(loc, "is_impossible is true but the question has answers")
    return Example(qid, question, context, tuple(answers), impossible, title)
