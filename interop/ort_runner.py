"""An exported model (interop/onnx_export.py) run by ONNX Runtime, as a forward eval/ can run like a model.

    forward = OrtForward("int8.onnx")                      # CUDA provider where installed, else the CPU
    start, end = forward(input_ids, token_type_ids, attention_mask)   # torch tensors in, float32 tensors out
    build = ort_build("int8.onnx")                         # an eval.measure.Build: measure(), eval, bench

Graph optimizations are on (ORT_ENABLE_ALL): ONNX Runtime fuses the Q/DQ pairs around each GEMM into integer GEMMs
(MatMulIntegerToFloat, QLinearMatMul on the CPU), the erf GELU into Gelu, MatMul + scale into FusedMatMul.
Inputs are fed as int32 numpy arrays (the export's input type, TensorRT's); the logits come back as CPU tensors,
so the Build's device is the CPU whichever provider computes (ONNX Runtime copies to and from the GPU itself).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from common.errors import WorkbenchError
from interop.onnx_export import INPUTS, METADATA_PREFIX, OUTPUTS

INSTALL = "pip install onnxruntime (or onnxruntime-gpu for its CUDA provider)"


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise WorkbenchError(f"--backend onnxruntime needs ONNX Runtime: {INSTALL}") from None
    return onnxruntime


def providers(device: str | None = None) -> list[str]:
    """ONNX Runtime's execution providers for `device`: None takes CUDA where its provider is installed, else the
    CPU; "cuda" without the provider is a one-line error."""
    ort = import_onnxruntime()
    available = ort.get_available_providers()
    if device not in (None, "cpu", "cuda"):
        raise WorkbenchError(f"--device must be cpu or cuda, got {device!r}")
    if device == "cuda" and "CUDAExecutionProvider" not in available:
        raise WorkbenchError("--device cuda: this ONNX Runtime has no CUDA provider (pip install onnxruntime-gpu)")
    if device != "cpu" and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OrtForward:
    """model.runner.Forward over an ONNX Runtime session: (input_ids, token_type_ids, attention_mask) ->
    (start_logits, end_logits), float32 CPU tensors [B, S]."""

    def __init__(self, path: str | Path, *, device: str | None = None, threads: int | None = None,
                 optimization: str = "all"):
        ort = import_onnxruntime()
        self.path = Path(path)
        if not self.path.is_file():
            raise WorkbenchError(f"{self.path}: ONNX model not found")
        levels = {"none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                  "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                  "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                  "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
        if optimization not in levels:
            raise WorkbenchError(f"ONNX Runtime optimization level must be one of {', '.join(levels)}")
        chosen = providers(device)

        def session(level: str):
            options = ort.SessionOptions()
            options.graph_optimization_level = levels[level]
            if threads:
                options.intra_op_num_threads = int(threads)
            options.log_severity_level = 3  # errors only: no warnings about unused initializers and the like
            return ort.InferenceSession(str(self.path), options, providers=chosen)

        self.optimization = optimization
        try:
            try:
                self.session = session(optimization)
            except Exception as e:
                # ONNX Runtime 1.31's extended-level QDQ fusion turns FP8 Q/DQ + MatMul into MatMulIntegerToFloat,
                # which takes no float8 and fails the model: FP8 exports run with the basic optimizations.
                if "float8" not in str(e) or optimization in ("none", "basic"):
                    raise
                self.session, self.optimization = session("basic"), "basic"
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/... types
            raise WorkbenchError(f"{self.path}: ONNX Runtime cannot load it ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0] if str(e) else ''})") from None
        names = [i.name for i in self.session.get_inputs()]
        outs = [o.name for o in self.session.get_outputs()]
        if sorted(names) != sorted(INPUTS) or not set(OUTPUTS) <= set(outs):
            raise WorkbenchError(f"{self.path}: expected inputs {', '.join(INPUTS)} and outputs "
                                 f"{', '.join(OUTPUTS)} (a `cli.py export-onnx` model), found {', '.join(names)} -> "
                                 f"{', '.join(outs)}")
        self._types = {i.name: np.int64 if i.type == "tensor(int64)" else np.int32 for i in self.session.get_inputs()}
        meta = self.session.get_modelmeta().custom_metadata_map
        self.metadata = {k.removeprefix(METADATA_PREFIX): v for k, v in meta.items() if k.startswith(METADATA_PREFIX)}
        self.provider = self.session.get_providers()[0]

    def __call__(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor,
                 attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feed = {name: _host(t, self._types[name]) for name, t in zip(INPUTS, (input_ids, token_type_ids,
                                                                              attention_mask))}
        start, end = self.session.run(list(OUTPUTS), feed)
        return torch.from_numpy(start), torch.from_numpy(end)

    def config(self) -> dict[str, Any]:
        """The exported model's BertConfig fields (its metadata)."""
        try:
            return json.loads(self.metadata["model_config"])
        except (KeyError, ValueError):
            raise WorkbenchError(f"{self.path}: no workbench metadata (export it with `cli.py export-onnx`)") from None


def _host(t: torch.Tensor | np.ndarray, dtype) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        t = t.detach().cpu().numpy()
    return np.ascontiguousarray(t, dtype=dtype)


def ort_build(path: str | Path, *, device: str | None = None, batch_size: int | None = None,
              threads: int | None = None, max_seq_length: int = 384, name: str | None = None,
              optimization: str = "all"):
    """An eval.measure.Build of an exported model run by ONNX Runtime, with the tokenizer files beside it (when
    there are none, the Build has no tokenizer: `measure` then uses the questions' own, and `bench` needs none)."""
    from data.tokenizer import load_wordpiece
    from eval.measure import Build

    forward = OrtForward(path, device=device, threads=threads, optimization=optimization)
    cfg = forward.config()
    if max_seq_length > int(cfg.get("max_position_embeddings", max_seq_length)):
        raise WorkbenchError(f"--max-seq-length {max_seq_length} exceeds the model's max_position_embeddings "
                             f"{cfg['max_position_embeddings']}")
    folder = Path(path).parent
    wordpiece = load_wordpiece(folder, vocab_size=int(cfg["vocab_size"])) \
        if (folder / "tokenizer.json").exists() or (folder / "vocab.txt").exists() else None
    on_gpu = forward.provider == "CUDAExecutionProvider"
    policy = forward.metadata.get("policy", "?")
    stem = Path(path).name.removesuffix(".onnx")
    build = Build(name or f"{stem}-ort", forward, torch.device("cpu"), batch_size or (64 if on_gpu else 16),
                  int(cfg["vocab_size"]), wordpiece,
                  label=f"{Path(path).name} [onnxruntime {forward.provider.removesuffix('ExecutionProvider')}, "
                        f"{policy}]",
                  kind="model", options=f"onnxruntime {policy}",
                  calibration=forward.metadata.get("calibration") or "-",
                  engine_bytes=Path(path).stat().st_size, precision=forward.metadata.get("precision"), path=str(path))
    build.model_digest = forward.metadata.get("model_digest")  # the weights it runs, as for models and engines
    return build


def ort_builds(paths: Sequence[str | Path], **kwargs) -> list:
    """ort_build for each exported model (eval's positional arguments under --backend onnxruntime)."""
    return [ort_build(p, **kwargs) for p in paths]


__all__ = ["INSTALL", "OrtForward", "import_onnxruntime", "ort_build", "ort_builds", "providers"]
