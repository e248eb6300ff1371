"""TensorRT 10 engines (.plan files) built from our ONNX export, where `import tensorrt` works.

NOT EXERCISED HERE: TensorRT cannot be installed in this workplace (no TensorRT wheel for its machines, and the
CPU CI has no GPU), so this module has never run against a real TensorRT; the tests check only the one-line error
when TensorRT does not import, and skip the rest. It is written to the TensorRT 10 Python API as documented
(trt.Builder, trt.OnnxParser, IBuilderConfig.set_flag / add_optimization_profile / set_timing_cache,
build_serialized_network, IExecutionContext.set_tensor_address / execute_async_v3), and expects to be corrected
the first time it meets TensorRT.

    build_plan("int8.onnx", "int8.plan", profiles=[(1, 128), (64, 384)], timing_cache="trt-timing.cache")
    forward = TrtForward("int8.plan")      # CUDA tensors in, (start_logits, end_logits) out, like a model

What the build does:
  * parses the export with TensorRT's ONNX parser (inputs input_ids, segment_ids, input_mask; dynamic batch and
    sequence axes);
  * precision flags from the export's metadata (or the arguments): FP16 for --fp16 builds, INT8 when the graph
    holds Q/DQ nodes (explicit quantization: TensorRT keeps our sites and scales), FP8 for FP8 Q/DQ, and
    SPARSE_WEIGHTS for --sparse;
  * implicit quantization instead, for an FP export plus a TensorRT calibration cache (`calibration_cache`,
    calib/trt_cache.py): the cache's names are the export's tensor names, read through an
    IInt8EntropyCalibrator2 whose read_calibration_cache returns the file (TensorRT 10 deprecates implicit
    quantization but still runs it);
  * one optimization profile per (batch, seq_len): min 1 x 1, opt = max = that shape, the way our engines' -b/-s
    profiles serve every shape up to theirs;
  * a timing cache file read before and written after the build (TensorRT's own format, not ours);
  * the serialized engine written atomically to the .plan file.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

from common.errors import WorkbenchError
from common.files import atomic_write_bytes, check_writable_dir, read_bytes
from interop.onnx_export import INPUTS, OUTPUTS

INSTALL = ("pip install tensorrt (TensorRT 10 for CUDA 12; it needs an NVIDIA GPU with its driver; see "
           "https://docs.nvidia.com/deeplearning/tensorrt/latest/installing-tensorrt/installing.html)")


def import_tensorrt():
    """tensorrt, or a one-line WorkbenchError saying how to install it."""
    try:
        import tensorrt
    except Exception as e:  # ImportError, or the wheel failing to find libnvinfer / CUDA
        raise WorkbenchError(f"--backend tensorrt needs TensorRT 10, which does not import here "
                             f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'not installed'}): "
                             f"{INSTALL}") from None
    major = int(str(getattr(tensorrt, "__version__", "0")).split(".")[0] or 0)
    if major < 10:
        raise WorkbenchError(f"--backend tensorrt needs TensorRT 10 or later, found {tensorrt.__version__}: "
                             f"{INSTALL}")
    return tensorrt


def available() -> bool:
    """Whether TensorRT 10 imports here."""
    try:
        import_tensorrt()
    except WorkbenchError:
        return False
    return True


def _metadata(onnx_path: Path) -> dict[str, str]:
    import onnx

    from interop.onnx_export import metadata

    model = onnx.load(str(onnx_path), load_external_data=False)
    meta = metadata(model)
    meta["has_qdq"] = str(any(n.op_type == "QuantizeLinear" for n in model.graph.node))
    meta["has_fp8"] = str(any(t.data_type == onnx.TensorProto.FLOAT8E4M3FN for t in model.graph.initializer))
    return meta


def _calibrator(trt, cache_path: Path):
    """An IInt8EntropyCalibrator2 that never sees data: TensorRT takes every scale from the cache file."""
    data = read_bytes(cache_path, "TensorRT calibration cache")

    class CacheOnly(trt.IInt8EntropyCalibrator2):
        def __init__(self):
            super().__init__()

        def get_batch_size(self):
            return 1

        def get_batch(self, names):
            return None  # no data: TensorRT must use the cache

        def read_calibration_cache(self):
            return data

        def write_calibration_cache(self, cache):
            pass

    return CacheOnly()


def build_plan(onnx_path: str | Path, plan_path: str | Path, *, profiles: Sequence[tuple[int, int]],
               fp16: bool | None = None, int8: bool | None = None, fp8: bool | None = None, sparse: bool | None = None,
               calibration_cache: str | Path | None = None, timing_cache: str | Path | None = None,
               workspace_gib: float | None = None, say=print) -> Path:
    """Build a TensorRT engine from an exported model and write it to `plan_path` (see the module docstring).
    fp16/int8/fp8/sparse: None takes them from the export (its metadata and whether it holds Q/DQ nodes)."""
    trt = import_tensorrt()
    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    if not onnx_path.is_file():
        raise WorkbenchError(f"{onnx_path}: ONNX model not found")
    if not profiles:
        raise WorkbenchError("give at least one profile (-b BATCH -s SEQ_LEN)")
    for b, s in profiles:
        if b < 1 or s < 1:
            raise WorkbenchError(f"profile {b}x{s}: batch and sequence length must be at least 1")
    check_writable_dir(plan_path.parent if str(plan_path.parent) else Path("."))
    meta = _metadata(onnx_path)
    if fp16 is None:
        fp16 = meta.get("precision") == "fp16" or "--fp16" in meta.get("policy", "")
    if fp8 is None:
        fp8 = meta["has_fp8"] == "True"
    if sparse is None:
        sparse = "--sparse" in meta.get("policy", "")
    if int8 is None:
        int8 = (meta["has_qdq"] == "True" and not fp8) or calibration_cache is not None

    t0 = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch always
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i).desc()) for i in range(parser.num_errors)]
        raise WorkbenchError(f"{onnx_path}: TensorRT's ONNX parser refused it: {errors[0] if errors else '?'}"
                             + (f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""))
    names = [network.get_input(i).name for i in range(network.num_inputs)]
    if sorted(names) != sorted(INPUTS):
        raise WorkbenchError(f"{onnx_path}: expected inputs {', '.join(INPUTS)}, found {', '.join(names)}")
    config = builder.create_builder_config()
    if workspace_gib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
    for on, flag in ((fp16, "FP16"), (int8, "INT8"), (fp8, "FP8"), (sparse, "SPARSE_WEIGHTS")):
        if on:
            config.set_flag(getattr(trt.BuilderFlag, flag))
    if calibration_cache is not None:
        config.int8_calibrator = _calibrator(trt, Path(calibration_cache))
    for b, s in profiles:
        profile = builder.create_optimization_profile()
        for name in INPUTS:
            profile.set_shape(name, (1, 1), (b, s), (b, s))
        config.add_optimization_profile(profile)
    cache_file = Path(timing_cache) if timing_cache else None
    cache = config.create_timing_cache(cache_file.read_bytes() if cache_file and cache_file.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise WorkbenchError(f"{onnx_path}: TensorRT could not build an engine from it (see its log above)")
    atomic_write_bytes(plan_path, bytes(serialized))
    if cache_file is not None:
        atomic_write_bytes(cache_file, bytes(config.get_timing_cache().serialize()))
    flags = [f for f, on in (("fp16", fp16), ("int8", int8), ("fp8", fp8), ("sparse", sparse)) if on]
    say(f"TensorRT {trt.__version__}: {', '.join(flags) or 'fp32'}, profiles "
        f"{', '.join(f'{b}x{s}' for b, s in profiles)}, {time.perf_counter() - t0:.1f} s")
    return plan_path


def plan_from_flags(flags, profiles: Sequence[tuple[int, int]], say=print) -> str:
    """`cli.py build --backend tensorrt`: the flags of `cli.py build` (model, trust_pickle, output, fp16, int8,
    iln, imh, keep_fp16, calib_cache, qat_scales, sparse, prune_2to4, batch_size, seq_length, timing_cache; optionally
    fp8, opset, symmetric_clamp; interop.onnx_export.export_from_flags reads them), with the profiles they make
    (batch, seq_len; -b/-s paired as in every verb). The
    model is exported first (interop.onnx_export, to OUTPUT with the suffix .onnx, tokenizer beside it), then
    built into OUTPUT (a .plan file)."""
    import argparse

    from interop.onnx_export import export_from_flags

    import_tensorrt()  # before the export: the error says how to install it
    output = Path(flags.output)
    onnx_path = output.with_suffix(".onnx")
    export_flags = argparse.Namespace(**{**vars(flags), "output": str(onnx_path), "trt_cache": None})
    say(export_from_flags(export_flags, say=say))
    build_plan(onnx_path, output, profiles=profiles, fp16=bool(getattr(flags, "fp16", False)),
               timing_cache=getattr(flags, "timing_cache", None), say=say)
    return f"built {output} (TensorRT) from {onnx_path}"


class TrtForward:
    """A .plan file as model.runner.Forward: CUDA tensors in, (start_logits, end_logits) float32 CUDA tensors out.
    Picks the first profile whose shape covers the batch (build profiles smallest first)."""

    def __init__(self, plan_path: str | Path, device: str | None = None):
        import torch

        trt = import_tensorrt()
        if not torch.cuda.is_available():
            raise WorkbenchError("--backend tensorrt needs a CUDA GPU visible to PyTorch")
        self.torch, self.device = torch, torch.device(device or "cuda")
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(read_bytes(plan_path, "TensorRT plan"))
        if self.engine is None:
            raise WorkbenchError(f"{plan_path}: TensorRT cannot load this plan (built by another TensorRT version "
                                 "or for another GPU?)")
        self.context = self.engine.create_execution_context()
        self.profiles = [tuple(self.engine.get_tensor_profile_shape(INPUTS[0], p)[2])
                         for p in range(self.engine.num_optimization_profiles)]
        self.profile = 0

    def __call__(self, input_ids, token_type_ids, attention_mask):
        torch = self.torch
        b, s = input_ids.shape
        fits = [p for p, (pb, ps) in enumerate(self.profiles) if b <= pb and s <= ps]
        if not fits:
            raise WorkbenchError(f"shape {b}x{s} fits no profile of this plan "
                                 f"({', '.join(f'{pb}x{ps}' for pb, ps in self.profiles)})")
        stream = torch.cuda.current_stream(self.device)
        if fits[0] != self.profile:
            self.context.set_optimization_profile_async(fits[0], stream.cuda_stream)
            self.profile = fits[0]
        feeds = [t.to(self.device, torch.int32).contiguous() for t in (input_ids, token_type_ids, attention_mask)]
        for name, t in zip(INPUTS, feeds):
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        outs = [torch.empty((b, s), dtype=torch.float32, device=self.device) for _ in OUTPUTS]
        for name, t in zip(OUTPUTS, outs):
            self.context.set_tensor_address(name, t.data_ptr())
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise WorkbenchError("TensorRT failed to run the engine")
        return outs[0], outs[1]


__all__ = ["INSTALL", "TrtForward", "available", "build_plan", "import_tensorrt", "plan_from_flags"]
