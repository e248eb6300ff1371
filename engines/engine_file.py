"""The engine file: one safetensors file whose tensors are the engine's weights and whose metadata is its header.

safetensors, not pickle, so that opening an engine from elsewhere cannot run code. The header (key "engine", a
canonical JSON string) records how the engine was built: precision flags, activation scales, profiles, kernel
choices and the machine. Like a TensorRT plan, a CUDA engine runs only on the GPU model and compute capability it
was built on, since kernel choices (and any compiled kernels) were made for that hardware; a CPU engine runs
anywhere. Two sha256 checksums refuse damaged or hand-edited files instead of producing wrong answers: "checksum"
covers the header and every tensor (checked by `load_engine`); "header_checksum" covers the header alone, so
`read_header` can vouch for a header (reports, eval tables) without reading the weights.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from common.errors import WorkbenchError
from common.files import atomic_path, sha256_bytes
from quant.spec import QuantSpec

FORMAT = "bert-int8-workbench/engine"
# 2: each quantized site's format, granularity, scale source and amax (quant.spec.QuantSpec) in place of
# version 1's bare INT8 activation scales.
FORMAT_VERSION = 2

# Weights, scales and parameters; uint8 for opaque bytes stored alongside them (e.g. the embedded tokenizer).
DTYPES = (torch.int8, torch.float16, torch.float32, torch.bfloat16, torch.uint8, torch.float8_e4m3fn)


@dataclass(frozen=True)
class Profile:
    """The largest input shape a profile serves (like each -b/-s pair of the TensorRT demo)."""

    batch: int
    seq_len: int

    def __str__(self) -> str:
        return f"{self.batch}x{self.seq_len}"


@dataclass(frozen=True)
class EngineHeader:
    model_config: dict            # BertConfig.to_json()
    policy: dict                  # dataclasses.asdict(PrecisionPolicy)
    profiles: tuple[Profile, ...]
    quant: dict                   # quant.spec.QuantSpec.to_json(): each quantized site's format and amax
    model_digest: str
    calib_digest: str | None      # the key of its ranges (calibration cache or QAT scales); None without INT8
    device: str                   # "cuda" or "cpu": where it was built to run
    gpu_name: str | None          # torch.cuda.get_device_name() for cuda engines
    compute_capability: str | None  # e.g. "9.0"
    versions: dict[str, str]      # {"workbench": ..., "torch": ..., "cuda": ..., "triton": ...} as available
    kernels: dict[str, str]       # op -> implementation chosen at build time
    build_seconds: float
    created: str                  # ISO-8601 UTC
    source: str = ""              # model folder or preset name, for reports
    calibration: str = ""         # the calibration cache described ("entropy +smooth 0.8 (100 q)"), for reports
    varlen: bool = False          # build --varlen: runs packed; each profile B x S also a budget of B*S tokens

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec.from_json(self.quant)

    def to_json(self) -> dict:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls, d: dict, path: str | os.PathLike) -> EngineHeader:
        """Check every field's type (a header is the engine's contract) and rebuild the dataclass."""
        _check_format(d, path)
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in d and f.default is dataclasses.MISSING]
        if missing:
            raise WorkbenchError(f"{path}: engine header lacks {', '.join(missing)}")

        def get(name: str, ok: Callable[[Any], bool], what: str) -> Any:
            value = d.get(name, "")
            if not ok(value):
                raise WorkbenchError(f"{path}: engine header field {name!r} must be {what}, got {_short(value)}")
            return value

        device = get("device", lambda v: v in ("cuda", "cpu"), '"cuda" or "cpu"')
        gpu_ok = _is_str if device == "cuda" else _opt_str
        gpu_what = "a string for a cuda engine" if device == "cuda" else "a string or null"
        profiles = get("profiles", lambda v: isinstance(v, (list, tuple)) and v and all(_is_profile(p) for p in v),
                       "a non-empty list of {batch, seq_len} positive integers")
        return cls(
            model_config=dict(get("model_config", lambda v: _is_map(v, lambda x: True), "an object")),
            policy=dict(get("policy", lambda v: _is_map(v, lambda x: True), "an object")),
            profiles=tuple(Profile(p["batch"], p["seq_len"]) for p in profiles),
            quant=_quant(get("quant", _is_spec, "a quantization spec {weight_format, sites: {site: {format, "
                             "amax, granularity, source}}}"), path),
            model_digest=get("model_digest", _is_str, "a string"),
            calib_digest=get("calib_digest", _opt_str, "a string or null"),
            device=device,
            gpu_name=get("gpu_name", gpu_ok, gpu_what),
            compute_capability=get("compute_capability", gpu_ok, gpu_what),
            versions=dict(get("versions", lambda v: _is_map(v, _is_str), "an object of name -> string")),
            kernels=dict(get("kernels", lambda v: _is_map(v, _is_str), "an object of op -> string")),
            build_seconds=float(get("build_seconds", _is_number, "a finite number >= 0")),
            created=get("created", _is_str, "a string"),
            source=get("source", _is_str, "a string"),
            calibration=get("calibration", _is_str, "a string"),
            varlen=get("varlen", lambda v: isinstance(v, bool), "true or false") if "varlen" in d else False,
        )


def save_engine(path: str | os.PathLike, header: EngineHeader, tensors: dict[str, torch.Tensor]) -> None:
    """Write the engine atomically: an interrupted or failed save leaves the previous file (or none)."""
    path = Path(path)
    header_json = _header_bytes(header, path)
    prepared = _prepare(tensors, path)
    metadata = {
        "engine": header_json.decode("ascii"),
        "header_checksum": sha256_bytes(header_json),
        "checksum": _checksum(header_json, prepared),
    }
    try:
        with atomic_path(path) as tmp:
            save_file(prepared, tmp, metadata=metadata)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
    except (OSError, SafetensorError) as e:
        raise WorkbenchError(f"{path}: cannot write the engine: {_one_line(e)}") from None


def load_engine(path: str | os.PathLike,
                device: torch.device | str = "cpu") -> tuple[EngineHeader, dict[str, torch.Tensor]]:
    """Read, verify and place an engine; refuse one built for other hardware before reading its weights."""
    path = Path(path)
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError):
        raise WorkbenchError(f"{path}: unknown device {device!r}") from None
    with _open(path) as f:
        header, header_json, checksum = _parse_metadata(f.metadata(), path)
        _check_runs_here(header, target, path)
        try:
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        except (SafetensorError, OSError) as e:
            raise _unreadable(path, e) from None
    if checksum != _checksum(header_json, tensors):
        raise _corrupt(path)
    if target.type != "cpu":
        try:
            tensors = {name: t.to(target) for name, t in tensors.items()}
        except (RuntimeError, AssertionError) as e:
            raise WorkbenchError(f"{path}: cannot move the engine to {target}: {_one_line(e)}") from None
    return header, tensors


def read_header(path: str | os.PathLike) -> EngineHeader:
    """The verified header alone, without reading the weights (their checksum is `load_engine`'s job)."""
    path = Path(path)
    with _open(path) as f:
        return _parse_metadata(f.metadata(), path)[0]


def length_buckets(profiles: Sequence[Profile], step: int) -> list[Profile]:
    """`build --buckets STEP`: beside each profile B x S, B x s for s = STEP, 2 STEP, ... below S (a ladder of
    sequence lengths). Batches sorted by length then run in the smallest bucket that holds them (pick_profile), so
    short SQuAD windows stop paying for padding to S; each bucket is one more CUDA graph and one more timing."""
    if step < 8 or step % 8:
        raise WorkbenchError(f"--buckets {step}: the step must be a positive multiple of 8 (batches are trimmed to "
                             "multiples of 8)")
    out = {p for p in profiles}
    for p in profiles:
        out.update(Profile(p.batch, s) for s in range(step, p.seq_len, step))
    return sorted(out, key=lambda p: (p.batch, p.seq_len))


def pick_profile(header: EngineHeader, batch: int, seq_len: int, path: str | os.PathLike | None = None) -> Profile:
    """The smallest profile (by batch x length, then length: attention grows with it) that holds the input."""
    where = path if path is not None else "the engine"
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in (batch, seq_len)):
        raise WorkbenchError(f"batch {batch!r} x length {seq_len!r} for {where}: both must be positive integers")
    fits = [p for p in header.profiles if p.batch >= batch and p.seq_len >= seq_len]
    if not fits:
        raise WorkbenchError(f"batch {batch} x length {seq_len} fits no profile of {where} "
                             f"(profiles: {', '.join(map(str, header.profiles))})")
    return min(fits, key=lambda p: (p.batch * p.seq_len, p.seq_len))


def pick_budget(header: EngineHeader, tokens: int, windows: int, longest: int,
                path: str | os.PathLike | None = None) -> Profile:
    """The packed path's profile for a stream of `tokens` tokens in `windows` windows, none longer than `longest`:
    the smallest token budget B x S that holds the tokens with at most B windows (a --varlen engine's profiles
    are token budgets; a window may be as long as the engine's longest profile, in any budget)."""
    where = path if path is not None else "the engine"
    most = max(p.seq_len for p in header.profiles)
    fits = [p for p in header.profiles if p.batch * p.seq_len >= tokens and p.batch >= windows]
    if longest > most or not fits:
        raise WorkbenchError(f"{windows} windows of {tokens} tokens (the longest {longest}) fit no token budget of "
                             f"{where} (profiles: {', '.join(map(str, header.profiles))}, windows up to {most})")
    return min(fits, key=lambda p: (p.batch * p.seq_len, p.batch))


def packing_budget(header: EngineHeader) -> tuple[int, int]:
    """How the packed path fills its batches for an engine: (tokens, windows) of its largest token budget and the
    most windows a profile of that budget holds. A profile of more, shorter rows beside the longest one (-b 384
    -s 128 beside -b 128 -s 384: the same 49,152 tokens in up to 384 windows) lets batches of short windows fill
    the budget, where a 128-window batch of SQuAD's mostly short windows would leave half of it padding."""
    tokens = max(p.batch * p.seq_len for p in header.profiles)
    return tokens, max(p.batch for p in header.profiles if p.batch * p.seq_len == tokens)


def this_gpu(device: torch.device | str | int | None = None) -> tuple[str, str] | None:
    """(name, "major.minor") of the given (default: current) CUDA device; None without CUDA."""
    if not torch.cuda.is_available():
        return None
    index = torch.device(device).index if isinstance(device, (str, torch.device)) else device
    if index is None:
        index = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    return torch.cuda.get_device_name(index), f"{major}.{minor}"


# --- checks ---------------------------------------------------------------------------------------------------

def _check_format(d: Any, path: str | os.PathLike) -> None:
    if not isinstance(d, dict):
        raise WorkbenchError(f"{path}: not a {FORMAT} file (its engine header is not a JSON object)")
    if d.get("format") != FORMAT:
        raise WorkbenchError(f"{path}: not a {FORMAT} file (format {_short(d.get('format'))})")
    version = d.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise WorkbenchError(f"{path}: engine header has no valid format version (got {_short(version)})")
    if version > FORMAT_VERSION:
        raise WorkbenchError(f"{path}: built by a newer workbench: format version {version}, this one reads "
                             f"{FORMAT_VERSION}; upgrade the workbench or rebuild the engine with this one")
    if version < FORMAT_VERSION:
        raise WorkbenchError(f"{path}: built by an older workbench (engine format {version}, this one reads "
                             f"{FORMAT_VERSION}): rebuild it with `cli.py build`")


def _check_runs_here(header: EngineHeader, target: torch.device, path: Path) -> None:
    if header.device != "cuda":
        return
    gpu = None
    if target.type == "cuda" and torch.cuda.is_available():
        try:
            gpu = this_gpu(target)
        except (RuntimeError, AssertionError) as e:
            raise WorkbenchError(f"{path}: cannot use device {target}: {_one_line(e)}") from None
    if gpu is None:
        raise WorkbenchError(f"{path} was built for cuda ({header.gpu_name}, sm {header.compute_capability}): run it "
                             "with --device cuda on that GPU, or build for the CPU with --device cpu")
    if gpu != (header.gpu_name, header.compute_capability):
        raise WorkbenchError(f"{path} was built for {header.gpu_name} (compute capability "
                             f"{header.compute_capability}) but this GPU is {gpu[0]} ({gpu[1]}): rebuild it here")


def _parse_metadata(meta: dict[str, str] | None, path: Path) -> tuple[EngineHeader, bytes, str | None]:
    """The header, its canonical JSON and the whole-file checksum; format and version are checked first so that
    a file from a newer workbench gets that message rather than a checksum complaint."""
    if not meta or "engine" not in meta:
        raise WorkbenchError(f"{path}: not a {FORMAT} file (a safetensors file without an engine header)")
    try:
        d = json.loads(meta["engine"], parse_constant=_reject_constant)
    except ValueError as e:
        raise WorkbenchError(f"{path}: engine header is not valid JSON ({_one_line(e)}): "
                             "the file is corrupt or was modified; rebuild it") from None
    _check_format(d, path)
    header_json = _canonical(d)
    if meta.get("header_checksum") != sha256_bytes(header_json):
        raise _corrupt(path)
    return EngineHeader.from_json(d, path), header_json, meta.get("checksum")


def _header_bytes(header: EngineHeader, path: Path) -> bytes:
    """Canonical header JSON, refusing to write a header that `load_engine` would refuse."""
    try:
        header_json = _canonical(header.to_json())
    except (TypeError, ValueError) as e:
        raise WorkbenchError(f"{path}: cannot save: the engine header is not plain JSON ({_one_line(e)})") from None
    EngineHeader.from_json(json.loads(header_json), path)
    return header_json


def _prepare(tensors: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, each owning its storage (safetensors refuses tensors that share memory)."""
    if not isinstance(tensors, dict):
        raise WorkbenchError(f"{path}: cannot save: tensors must be a dict of name -> torch.Tensor")
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in tensors.items():
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise WorkbenchError(f"{path}: cannot save: invalid tensor name {name!r}")
        if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
            raise WorkbenchError(f"{path}: cannot save: {name!r} is a {type(t).__name__}, not a dense torch.Tensor")
        if t.dtype not in DTYPES:
            raise WorkbenchError(f"{path}: cannot save: {name!r} is {t.dtype}; "
                                 "engines hold int8, float8_e4m3fn, float16, float32, bfloat16 and uint8 tensors")
        t = t.detach().to("cpu").contiguous()
        storage = t.untyped_storage()
        if storage.data_ptr() in seen or t.data_ptr() != storage.data_ptr() or t.nbytes != storage.nbytes():
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def _checksum(header_json: bytes, tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the header, then each tensor by name: a JSON line with name, dtype, shape, then its bytes."""
    h = hashlib.sha256(header_json + b"\n")
    for name in sorted(tensors):
        t = tensors[name]
        dtype = str(t.dtype).removeprefix("torch.")
        h.update(_canonical({"name": name, "dtype": dtype, "shape": list(t.shape)}) + b"\n")
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # via uint8: numpy has no bfloat16; no copy
    return h.hexdigest()


# --- small helpers --------------------------------------------------------------------------------------------

def _open(path: Path):
    if not path.exists():
        raise WorkbenchError(f"{path}: engine file not found")
    if path.is_dir():
        raise WorkbenchError(f"{path}: expected an engine file, found a directory")
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise _unreadable(path, e) from None


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed")


def _unreadable(path: Path, e: Exception) -> WorkbenchError:
    return WorkbenchError(f"{path}: not an engine file or truncated ({_one_line(e)})")


def _corrupt(path: Path) -> WorkbenchError:
    return WorkbenchError(f"{path}: checksum mismatch: the file is corrupt or was modified; rebuild it")


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_str(v: Any) -> bool:
    return isinstance(v, str)


def _opt_str(v: Any) -> bool:
    return v is None or isinstance(v, str)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0


def _is_map(v: Any, ok: Callable[[Any], bool]) -> bool:
    return isinstance(v, dict) and all(isinstance(k, str) and ok(x) for k, x in v.items())


def _is_spec(v: Any) -> bool:
    return isinstance(v, dict) and _is_map(v.get("sites"), lambda site: isinstance(site, dict) and _is_number(
        site.get("amax")) and _is_str(site.get("format"))) and _is_str(v.get("weight_format", ""))


def _quant(d: dict, path: str | os.PathLike) -> dict:
    """The spec as stored, once it parses (known formats, granularities and sources)."""
    QuantSpec.from_json(d, f"{path}: engine header field 'quant'")
    return d


def _is_profile(p: Any) -> bool:
    return (isinstance(p, dict) and set(p) == {"batch", "seq_len"}
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in p.values()))
