"""Builds to measure (eval.measure.Build): a model at a precision, an engine file, or an engine built in memory.

Each loader checks what would fail later (a random-weight preset cannot answer questions, windows longer than
the model or the engine serves) and fills in the report's columns (options, calibration, engine size, build time).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from common.errors import WorkbenchError
from eval.measure import Build

if TYPE_CHECKING:
    import torch

Runnable = Build  # the name cli.py used
EXAMPLES = """examples:
  python cli.py build --model DIR --fp16 -b 1 -s 128 -b 64 -s 384 -o engines/fp16.engine
  python cli.py build --model DIR --int8 --fp16 -iln -b 64 -s 384 --calib-cache calib.json -o engines/int8.engine
  python cli.py build --model bert-large --fp16 -b 1 -s 128 -o engines/large.engine    # random weights: timing"""


def load_builds(*, model: str | None, engines: Sequence[str] = (), device: str | None = None,
                precision: str | None = None, trust_pickle: bool = False, batch_size: int | None = None,
                max_seq_length: int = 384, fuse: bool = False) -> list[Build]:
    """The model (when given), then each engine file, on `device` (default: CUDA when present)."""
    from model.runner import pick_device

    if not model and not engines:
        raise WorkbenchError("give a model (--model DIR) or engine files to run")
    out = [model_build(model, device=device, precision=precision, trust_pickle=trust_pickle,
                       batch_size=batch_size, max_seq_length=max_seq_length)] if model else []
    dev = pick_device(device)
    out += [engine_file_build(path, dev, max_seq_length=max_seq_length, fuse=fuse) for path in engines]
    return out


def model_build(model: str, *, device: str | None = None, precision: str | None = None, trust_pickle: bool = False,
                batch_size: int | None = None, max_seq_length: int = 384) -> Build:
    """A fine-tuned model folder with its tokenizer, on the chosen device and precision."""
    import torch

    from data.tokenizer import load_wordpiece
    from model.checkpoint import load_model
    from model.runner import pick_device, pick_precision

    dev = pick_device(device)
    dtype = pick_precision(precision, dev)
    loaded = load_model(model, trust_pickle=trust_pickle)
    if loaded.model_dir is None:
        raise WorkbenchError(f"{model} is a random-weight timing preset with no vocabulary: "
                             "give a fine-tuned model folder to answer questions")
    if max_seq_length > loaded.config.max_position_embeddings:
        raise WorkbenchError(f"--max-seq-length {max_seq_length} exceeds the model's "
                             f"max_position_embeddings {loaded.config.max_position_embeddings}")
    wordpiece = load_wordpiece(loaded.model_dir, vocab_size=loaded.config.vocab_size)
    forward = loaded.model.to(device=dev, dtype=dtype).eval()
    name = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    folder = Path(loaded.source).name
    label = f"{folder} [{dev.type}, {str(dtype).removeprefix('torch.')}]"
    return Build(f"{folder}-{name}", forward, dev, batch_size or (64 if dev.type == "cuda" else 16),
                 loaded.config.vocab_size, wordpiece, label=label, kind="model", options=f"model {name}",
                 precision=name, path=str(loaded.source))


def engine_file_build(path: str | Path, device: torch.device, *, max_seq_length: int = 384,
                      fuse: bool = False) -> Build:
    """An engine file (checked, with its own tokenizer) behind a GraphRunner; it evaluates at the largest batch of
    the profiles that serve `max_seq_length`."""
    from engines.build import load_runnable
    from engines.graphs import GraphRunner
    from eval.compare import calibration_of_engine

    engine, wordpiece = load_runnable(path, device)
    if wordpiece is None:
        raise WorkbenchError(f"{path}: built from a random-weight preset, it has no tokenizer: use it with bench")
    header = engine.header
    longest = max(p.seq_len for p in header.profiles)
    if max_seq_length > longest:
        raise WorkbenchError(f"{path}: its profiles serve sequences up to {longest} tokens; pass -s {longest} "
                             f"or rebuild it with -s {max_seq_length}")
    batch = max(p.batch for p in header.profiles if p.seq_len >= max_seq_length)
    label = f"{Path(path).name} [{device.type}, {engine.policy.describe()}]"
    return Build(Path(path).name.removesuffix(".engine"), GraphRunner(engine, str(path), fuse=fuse), device, batch,
                 engine.cfg.vocab_size, wordpiece, label=label, kind="engine", options=engine.policy.describe(),
                 calibration=calibration_of_engine(header.calib_digest, header.calibration),
                 engine_bytes=Path(path).stat().st_size, build_s=header.build_seconds, engine=engine, path=str(path))


def engine_build(engine, name: str, *, batch: int, options: str | None = None, calibration: str = "-",
                 build_s: float | None = None, wordpiece=None) -> Build:
    """An engine built in memory (engines.runtime.Engine), behind a GraphRunner: no file, no size."""
    from engines.graphs import GraphRunner

    return Build(name, GraphRunner(engine, name), engine.device, batch, engine.cfg.vocab_size, wordpiece,
                 label=f"{name} [{engine.device.type}, {engine.policy.describe()}]", kind="engine",
                 options=engine.policy.describe() if options is None else options, calibration=calibration,
                 build_s=build_s, engine=engine)


def build_engine_file(path: str | Path, loaded, policy, profiles, calib, device: torch.device, wordpiece, *,
                      timing_cache: str | Path | None = None):
    """Build an engine (engines.build.build_engine) and write it to `path`; on CUDA the kernel timings are kept in
    `timing_cache` (default: timing.json in the workbench cache directory, shared by `cli.py build` and the sweep).
    Returns the header and the timing cache (None on the CPU)."""
    from common.files import cache_root
    from engines.build import build_engine
    from engines.engine_file import Profile, save_engine
    from engines.tuning import TimingCache

    timing = TimingCache(timing_cache or cache_root() / "timing.json") if device.type == "cuda" else None
    profiles = [p if isinstance(p, Profile) else Profile(*p) for p in profiles]
    header, tensors = build_engine(loaded, policy, profiles, calib, device, wordpiece, timing)
    save_engine(path, header, tensors)
    return header, timing


def engine_file_from_flags(flags, say=print) -> str:
    """`cli.py build`: the engine file its flags (argparse.Namespace: model, trust_pickle, output, device, fp16,
    int8, strict, iln, imh, g, batch_size, seq_length, calib_cache, keep_fp16, timing_cache) describe, built and
    written; `say` gets the warnings and kernel choices, the returned line says what was built."""
    import itertools
    import time

    from calib.cache import load_cache
    from data.tokenizer import load_wordpiece
    from engines.build import kernel_choices
    from engines.engine_file import Profile
    from model.checkpoint import load_model
    from model.runner import pick_device
    from quant.policy import PrecisionPolicy, parse_gemm_list

    t0, device = time.perf_counter(), pick_device(flags.device)
    policy = PrecisionPolicy(int8=flags.int8, fp16=flags.fp16, iln=flags.iln, imh=flags.imh, strict=flags.strict,
                             fc2_library_gemm=flags.g, fp16_gemms=parse_gemm_list(flags.keep_fp16))
    profiles = [Profile(b, s) for b, s in itertools.product(flags.batch_size or [1], flags.seq_length or [128])]
    calib = load_cache(flags.calib_cache) if flags.calib_cache else None
    if calib is not None and not flags.int8:
        say("warning: --calib-cache is not used without --int8")
    loaded = load_model(flags.model, trust_pickle=flags.trust_pickle)
    if calib is None and flags.int8 and loaded.model_dir is not None:
        from qat.folder import read_qat_scales

        calib = read_qat_scales(loaded.model_dir)  # a `cli.py qat` folder carries its learned scales
        if calib is not None:
            say(f"scales: learned by QAT ({loaded.model_dir}/quant_spec.json), trained for "
                f"{calib.precision_policy().describe()}")
    wordpiece = load_wordpiece(loaded.model_dir, vocab_size=loaded.config.vocab_size) if loaded.model_dir else None
    header, timing = build_engine_file(flags.output, loaded, policy, profiles, calib, device, wordpiece,
                                       timing_cache=flags.timing_cache)
    if timing is not None and policy.int8:
        say(f"{timing.summary()} ({timing.path})")
        for line in kernel_choices(header):
            say(f"kernels {line}")
    size = Path(flags.output).stat().st_size / 2**20
    return (f"built {flags.output}: {policy.describe()}, profiles {', '.join(map(str, profiles))}, {device.type}"
            f"{' (' + header.gpu_name + ')' if header.gpu_name else ''}, {size:.1f} MiB in "
            f"{time.perf_counter() - t0:.1f} s")


def engine_profiles(build: Build) -> list[tuple[int, int]]:
    """An engine build's profiles as (batch, seq_len), sorted."""
    return sorted((p.batch, p.seq_len) for p in build.engine.header.profiles)


__all__ = ["EXAMPLES", "Runnable", "build_engine_file", "engine_build", "engine_file_build", "engine_file_from_flags",
           "engine_profiles", "load_builds", "model_build"]
