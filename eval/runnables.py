"""Builds to measure (eval.measure.Build): a model at a precision, an engine file, or an engine built in memory.

Each loader checks what would fail later (a random-weight preset cannot answer questions, windows longer than
the model or the engine serves) and fills in the report's columns (options, calibration, engine size, build time).

Before an engine is built, `check_memory` compares an estimate of what one forward at its largest profile needs
(`forward_bytes`: the weights and the activations of one layer, a documented upper estimate from the model's
config) with the memory the engine will run in (the GPU's total memory; on the CPU the RAM available now), and
refuses a build that could not run with the largest batch that would fit.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from common.errors import WorkbenchError
from eval.measure import Build

if TYPE_CHECKING:
    import torch

Runnable = Build  # the name cli.py used
log = logging.getLogger("eval")
EXAMPLES = """examples:
  python cli.py build --model DIR --fp16 -b 1 -s 128 -b 64 -s 384 -o engines/fp16.engine   # profiles 1x128, 64x384
  python cli.py build --model DIR --int8 --fp16 -iln -b 64 -s 384 --calib-cache calib.json -o engines/int8.engine
  python cli.py build -c DIR -v DIR/vocab.txt --fp16 -b 1 -b 8 -s 128 -tcf timing.json -o engines/b1-b8.engine
      # the TensorRT demo's spellings; one -s goes with every -b: profiles 1x128 and 8x128
  python cli.py build --model bert-large --fp16 -b 1 -s 128 -o engines/large.engine    # random weights: timing
  python cli.py build --model DIR --int8 --fp16 -b 64 -s 384 --buckets 64 --calib-cache calib.json \\
      -o engines/buckets.engine   # + 64x64, 64x128, ..., 64x320: length-sorted batches run in the smallest
  python cli.py build --model DIR --int8 --fp16 -b 64 -s 384 --buckets 64 --varlen --calib-cache calib.json \\
      -o engines/packed.engine    # padding-free: windows packed into token budgets 64 x 64 ... 64 x 384
  python -m plugins.cutlass_int8 build   # once per H100/H200 machine (nvcc, nvidia-cutlass headers): INT8 builds
      # then time CUTLASS's Hopper GEMMs beside the Triton kernels"""
CPU_FP16 = ("FP16 on the CPU is emulated and several times slower than FP32 (about 7 questions/s for the MiniLM): "
            "use --precision fp32 (or bf16) on the CPU")


def load_builds(*, model: str | None, engines: Sequence[str] = (), device: str | None = None,
                precision: str | None = None, trust_pickle: bool = False, batch_size: int | None = None,
                max_seq_length: int = 384, fuse: bool = False, vocab_file: str | None = None,
                backend: str | None = None) -> list[Build]:
    """The model (when given), then each engine file, on `device` (default: CUDA when present). An exported
    ONNX file (`cli.py export-onnx`, `.onnx`) runs in ONNX Runtime (interop/ort_runner.py); `backend`
    "onnxruntime" insists on it, "workbench" on our engine files."""
    from model.runner import pick_device

    if not model and not engines:
        raise WorkbenchError("give a model (--model DIR) or engine files to run")
    if vocab_file and not model:
        raise WorkbenchError("-v/--vocab-file replaces a model folder's vocabulary: an engine file carries its own")
    out = [model_build(model, device=device, precision=precision, trust_pickle=trust_pickle,
                       batch_size=batch_size, max_seq_length=max_seq_length, vocab_file=vocab_file)] if model else []
    dev = pick_device(device)
    for path in engines:
        runner = file_backend(path, backend)
        if runner == "onnxruntime":
            from interop.ort_runner import ort_build

            out.append(ort_build(path, device=device, batch_size=batch_size, max_seq_length=max_seq_length))
        elif runner == "tensorrt":
            out.append(plan_build(path, device=device, batch_size=batch_size))
        else:
            out.append(engine_file_build(path, dev, max_seq_length=max_seq_length, fuse=fuse))
    return out


BACKEND_FILES = {"workbench": "engine files (cli.py build)", "onnxruntime": "ONNX files (cli.py export-onnx)",
                 "tensorrt": "TensorRT plans (cli.py build --backend tensorrt)"}


def file_backend(path, backend: str | None = None) -> str:
    """What runs an engine argument, by its suffix: ONNX Runtime a `.onnx` export, TensorRT a `.plan`, our runtime
    an engine file; a `--backend` that does not fit the file is a one-line error."""
    name = str(path)
    found = "onnxruntime" if name.endswith(".onnx") else "tensorrt" if name.endswith(".plan") else "workbench"
    if backend is not None and backend != found:
        raise WorkbenchError(f"{path}: --backend {backend} runs {BACKEND_FILES[backend]}")
    return found


def runs_in_onnxruntime(path, backend: str | None = None) -> bool:
    """Whether an engine argument is an exported ONNX file (ONNX Runtime runs it); see file_backend."""
    return file_backend(path, backend) == "onnxruntime"


def plan_build(path, *, device: str | None = None, batch_size: int | None = None) -> Build:
    """A TensorRT plan (interop/tensorrt_backend.py; only where TensorRT imports, else one line saying how to
    install it) as a Build: its tokenizer is the export's, beside the plan's .onnx."""
    from data.tokenizer import load_wordpiece
    from interop.tensorrt_backend import TrtForward

    forward = TrtForward(path, device=device)
    wordpiece = load_wordpiece(Path(path).parent)
    batch = batch_size or max(b for b, _ in forward.profiles)
    return Build(Path(path).stem, forward, forward.device, batch, wordpiece.tokenizer.get_vocab_size(), wordpiece,
                 label=f"{Path(path).name} [TensorRT]", kind="engine", options="TensorRT plan", path=str(path))


def model_build(model: str, *, device: str | None = None, precision: str | None = None, trust_pickle: bool = False,
                batch_size: int | None = None, max_seq_length: int = 384, vocab_file: str | None = None) -> Build:
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
    wordpiece = load_wordpiece(loaded.model_dir, vocab_size=loaded.config.vocab_size, vocab_file=vocab_file)
    if dev.type == "cpu" and dtype == torch.float16:
        log.warning("%s", CPU_FP16)
    forward = loaded.model.to(device=dev, dtype=dtype).eval()
    name = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    folder = Path(loaded.source).name
    label = f"{folder} [{dev.type}, {str(dtype).removeprefix('torch.')}]"
    return Build(f"{folder}-{name}", forward, dev, batch_size or (64 if dev.type == "cuda" else 16),
                 loaded.config.vocab_size, wordpiece, label=label, kind="model", options=f"model {name}",
                 precision=name, path=str(loaded.source), model_digest=loaded.digest)


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
    if device.type == "cpu" and engine.policy.fp16:
        log.warning("%s: %s", path, CPU_FP16.replace("use --precision fp32 (or bf16)", "build without --fp16"))
    return Build(Path(path).name.removesuffix(".engine"), GraphRunner(engine, str(path), fuse=fuse), device, batch,
                 engine.cfg.vocab_size, wordpiece, label=label, kind="engine", options=engine.policy.describe(),
                 calibration=calibration_of_engine(header.calib_digest, header.calibration),
                 engine_bytes=Path(path).stat().st_size, build_s=header.build_seconds, engine=engine, path=str(path),
                 model_digest=header.model_digest)


def engine_build(engine, name: str, *, batch: int, options: str | None = None, calibration: str = "-",
                 build_s: float | None = None, wordpiece=None) -> Build:
    """An engine built in memory (engines.runtime.Engine), behind a GraphRunner: no file, no size."""
    from engines.graphs import GraphRunner

    return Build(name, GraphRunner(engine, name), engine.device, batch, engine.cfg.vocab_size, wordpiece,
                 label=f"{name} [{engine.device.type}, {engine.policy.describe()}]", kind="engine",
                 options=engine.policy.describe() if options is None else options, calibration=calibration,
                 build_s=build_s, engine=engine, model_digest=engine.header.model_digest)


def build_engine_file(path: str | Path, loaded, policy, profiles, calib, device: torch.device, wordpiece, *,
                      timing_cache: str | Path | None = None, prune: bool = False, varlen: bool = False):
    """Build an engine (engines.build.build_engine; `varlen`: packed) and write it to `path`; on CUDA the kernel
    timings are kept in `timing_cache` (default: timing.json in the workbench cache directory, shared by
    `cli.py build` and the sweep). Returns the header and the timing cache (None on the CPU)."""
    from common.files import cache_root
    from engines.build import build_engine
    from engines.engine_file import Profile, save_engine
    from engines.tuning import TimingCache

    profiles = [p if isinstance(p, Profile) else Profile(*p) for p in profiles]
    check_memory(loaded.config, policy, profiles, device, loaded.model)
    timing = TimingCache(timing_cache or cache_root() / "timing.json") if device.type == "cuda" else None
    header, tensors = build_engine(loaded, policy, profiles, calib, device, wordpiece, timing, prune=prune,
                                   varlen=varlen)
    save_engine(path, header, tensors)
    return header, timing


def forward_bytes(cfg, policy, batch: int, seq_len: int, parameters: int) -> int:
    """An upper estimate of the memory one forward of an engine needs at (batch, seq_len), from the model config.

    Weights: every parameter at the build's float width (4 bytes; 2 with --fp16; INT8 weights take less, so this
    overstates them). Activations of one layer (inference frees each layer's before the next; a CUDA graph's
    pool keeps about one forward's worth): per token the residual stream and its LayerNorm output (2·H), the QKV
    output (3·H), the attention context and output (2·H), the FC1 output and FC2's input (2·I), and the attention
    scores and probabilities (2·heads·S: an S×S matrix per head, as the CPU's attention and -imh materialize
    them), all at the float width (INT8 codes counted as floats); the start and end logits are negligible."""
    width = 2 if policy.fp16 else 4
    per_token = 7 * cfg.hidden_size + 2 * cfg.intermediate_size + 2 * cfg.num_heads * seq_len
    return width * (parameters + batch * seq_len * per_token)


def memory_available(device: torch.device) -> tuple[int, str]:
    """Bytes the engine can use and what they are: the GPU's total memory, or the RAM available now (Linux's
    MemAvailable, else free pages)."""
    import os

    import torch

    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1], f"{torch.cuda.get_device_name(device)}'s memory"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "RAM available"
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "RAM free"


def check_memory(cfg, policy, profiles, device: torch.device, model=None) -> None:
    """Refuse (one line) profiles whose forward could not fit the device's memory (`forward_bytes`), naming the
    largest batch that would fit at that sequence length."""
    parameters = sum(p.numel() for p in model.parameters()) if model is not None else 0
    available, what = memory_available(device)
    for p in profiles:
        need = forward_bytes(cfg, policy, p.batch, p.seq_len, parameters)
        if need > available:
            per_sample = forward_bytes(cfg, policy, 1, p.seq_len, 0)
            fits = (available - forward_bytes(cfg, policy, 0, p.seq_len, parameters)) // max(per_sample, 1)
            hint = f"at most -b {fits} at -s {p.seq_len}" if fits >= 1 else f"a shorter -s than {p.seq_len}"
            raise WorkbenchError(f"profile {p}: one forward needs about {need / 2**30:,.1f} GiB (an estimate from "
                                 f"the model's config: weights and one layer's activations), more than the "
                                 f"{available / 2**30:,.1f} GiB of {what} on {device.type}: use {hint}")


def engine_file_from_flags(flags, say=print) -> str:
    """`cli.py build`: the engine file its flags (argparse.Namespace: model, trust_pickle, output, device, fp16,
    int8, strict, iln, imh, g, batch_size, seq_length, buckets, varlen, calib_cache, keep_fp16, timing_cache) describe,
    built and written; `say` gets the warnings and kernel choices, the returned line says what was built."""
    import time

    from data.tokenizer import load_wordpiece
    from engines.build import kernel_choices, load_ranges, policy_from_flags
    from engines.engine_file import Profile, length_buckets
    from model.checkpoint import load_model
    from model.runner import pick_device
    from eval.sweep import pair_profiles

    profiles = [Profile(b, s) for b, s in pair_profiles(flags.batch_size, flags.seq_length, [(1, 128)], 128)]
    if getattr(flags, "buckets", None):
        profiles = length_buckets(profiles, flags.buckets)
    elif getattr(flags, "varlen", False) and getattr(flags, "backend", None) != "tensorrt":
        say("--varlen without --buckets: one token budget per profile, so a batch of short windows computes the "
            "whole budget in its GEMMs; --buckets 64 adds a ladder of smaller budgets")
    if getattr(flags, "backend", None) == "tensorrt":
        from interop.tensorrt_backend import plan_from_flags

        if getattr(flags, "varlen", False):
            raise WorkbenchError("--varlen builds our packed engine; a TensorRT plan (--backend tensorrt) runs "
                                 "padded profiles: leave one of them out")

        return plan_from_flags(flags, [(p.batch, p.seq_len) for p in profiles], say=say)
    t0, device = time.perf_counter(), pick_device(flags.device)
    policy = policy_from_flags(flags)
    loaded = load_model(flags.model, trust_pickle=flags.trust_pickle)
    calib = load_ranges(loaded, policy, calib_cache=flags.calib_cache, qat_scales=flags.qat_scales,
                        ignore_unmodelled=flags.ignore_unmodelled, say=say)
    if flags.vocab_file and loaded.model_dir is None:
        raise WorkbenchError("-v/--vocab-file: a random-weight preset has no vocabulary to replace")
    wordpiece = load_wordpiece(loaded.model_dir, vocab_size=loaded.config.vocab_size,
                               vocab_file=flags.vocab_file) if loaded.model_dir else None
    loaded_s = time.perf_counter() - t0
    varlen = bool(getattr(flags, "varlen", False))
    header, timing = build_engine_file(flags.output, loaded, policy, profiles, calib, device, wordpiece,
                                       timing_cache=flags.timing_cache, prune=flags.prune_2to4, varlen=varlen)
    if timing is not None and (policy.quantized or varlen):
        say(f"{timing.summary()} ({timing.path})")
        for line in kernel_choices(header):
            say(f"kernels {line}")
    size = Path(flags.output).stat().st_size / 2**20
    packed = ", packed (--varlen: the profiles are token budgets)" if varlen else ""
    return (f"built {flags.output}: {policy.describe()}{packed}, profiles {', '.join(map(str, profiles))}, "
            f"{device.type}"
            f"{' (' + header.gpu_name + ')' if header.gpu_name else ''}, {size:.1f} MiB; engine built in "
            f"{header.build_seconds:.2f} s (the build time reports show), model and scales loaded in {loaded_s:.1f} "
            f"s, {time.perf_counter() - t0:.1f} s in all")


def engine_profiles(build: Build) -> list[tuple[int, int]]:
    """An engine build's profiles as (batch, seq_len), sorted."""
    return sorted((p.batch, p.seq_len) for p in build.engine.header.profiles)


__all__ = ["EXAMPLES", "Runnable", "build_engine_file", "check_memory", "engine_build", "engine_file_build",
           "engine_file_from_flags", "engine_profiles", "forward_bytes", "load_builds", "memory_available",
           "model_build"]
