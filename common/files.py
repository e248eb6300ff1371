"""Atomic writes, content digests and JSON reading with clear errors.

Every file the workbench writes (predictions, caches, engines) goes through `atomic_path`, so an interrupted
run never leaves a half-written file behind: data goes to a temporary file beside the target and is renamed
over it only when complete.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

from common.errors import WorkbenchError

CACHE_ENV = "WORKBENCH_CACHE_DIR"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the mode a plain open() would give
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_bytes(path: str | os.PathLike, what: str = "file") -> bytes:
    """Read a file or raise a one-line WorkbenchError naming it."""
    path = Path(path)
    if not path.exists():
        raise WorkbenchError(f"{path}: {what} not found")
    if path.is_dir():
        raise WorkbenchError(f"{path}: expected a {what}, found a directory")
    try:
        return path.read_bytes()
    except OSError as e:
        raise WorkbenchError(f"{path}: cannot read {what}: {e.strerror}") from None


def parse_json(data: bytes, path: str | os.PathLike, what: str = "JSON file") -> Any:
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise WorkbenchError(f"{path}: {what} is not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise WorkbenchError(f"{path}: malformed {what} at line {e.lineno} column {e.colno}: {e.msg}") from None


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    return parse_json(read_bytes(path, what), path, what)


def cache_root() -> Path:
    """Where reusable caches live: $WORKBENCH_CACHE_DIR, else ~/.cache/bert-int8-workbench."""
    root = os.environ.get(CACHE_ENV)
    return Path(root) if root else Path.home() / ".cache" / "bert-int8-workbench"


def check_writable_dir(path: str | os.PathLike, what: str = "output folder") -> Path:
    """Make the folder (and its parents) and prove a file can be created in it, before any long work: an
    unwritable output is a one-line error up front rather than a failure at the end."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise WorkbenchError(f"{folder}: the {what} is a file, expected a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as e:
        raise WorkbenchError(f"{folder}: cannot write the {what} there ({e.strerror or e})") from None
    return folder


def check_writable_file(path: str | os.PathLike, what: str = "output file") -> Path:
    """Prove a file can be written at `path` (its folder made if missing, a file created there; the file itself is
    replaced atomically later, so its folder's permissions are what count), before any long work."""
    target = Path(path)
    if target.is_dir():
        raise WorkbenchError(f"{target}: the {what} is a folder, expected a file name")
    check_writable_dir(target.parent if str(target.parent) else Path("."), f"folder of the {what}")
    return target
