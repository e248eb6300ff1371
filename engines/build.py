"""Build an engine: a model plus (for --int8 or --fp8) a calibration cache, turned into one engine file.

The INT8 or FP8 weights are rounded per output channel by quant.quantizer, activation scales come from the cache for
exactly the sites the precision policy quantizes, and the engine carries its tokenizer so that `eval` and `infer`
need nothing but the engine file. `varlen` (build --varlen) makes a packed engine: its profiles are also token
budgets, and on CUDA the build times the packed path against the bucketed one (engines/packed.py).
"""
from __future__ import annotations

import copy
import functools
import itertools
import logging
import time
from dataclasses import replace
from datetime import datetime, timezone
from typing import Sequence

import torch

import common.version
from calib.cache import CalibrationCache
from calib.sparsity import gemm_sparsity
from calib.spec import spec_from_cache
from quant.policy import GEMMS, PrecisionPolicy
from quant.spec import QuantSpec
from common.errors import WorkbenchError
from data.tokenizer import WordPiece, wordpiece_from_str
from engines.engine_file import EngineHeader, Profile, load_engine, this_gpu
from engines.backends import SMALL_M_ROWS, is_sparse, unavailable_families
from engines.packed import PATH_TIMES_KEY, runs_packed, varlen_attention_key
from engines.runtime import Engine, engine_tensors, gemm_kernel_key
from engines.tuning import LIBRARY, TimingCache, attention_key, choose, machine_key, timed_rows
from model.checkpoint import LoadedModel
from qat.folder import QatScales
from qat.prune import prune_2to4

log = logging.getLogger(__name__)

TOKENIZER_TENSOR = "tokenizer.json"  # the serialized tokenizer, as UTF-8 bytes in a uint8 tensor


def build_engine(loaded: LoadedModel, policy: PrecisionPolicy, profiles: Sequence[Profile],
                 calib: CalibrationCache | QatScales | None, device: torch.device, wordpiece: WordPiece | None,
                 timing_cache: TimingCache | None = None, *, prune: bool = False,
                 varlen: bool = False) -> tuple[EngineHeader, dict[str, torch.Tensor]]:
    """The engine's header and tensors. `calib`: where the ranges come from, a calibration cache or the learned
    scales of a QAT folder (qat/folder.py). On CUDA, kernel implementations are timed per profile (`timing_cache`
    keeps those timings for later builds; None times without keeping them). `prune` (--prune-2to4): under
    --sparse, dense GEMM weights are pruned to 2:4 by magnitude here instead of refused. `varlen` (--varlen):
    the engine runs packed (engines/packed.py)."""
    t0 = time.perf_counter()
    cfg = loaded.config
    if not profiles:
        raise WorkbenchError("give at least one profile (-b BATCH -s SEQ_LEN)")
    for p in profiles:
        if p.batch < 1 or p.seq_len < 1:
            raise WorkbenchError(f"profile {p}: batch and sequence length must be at least 1")
        if p.seq_len > cfg.max_position_embeddings:
            raise WorkbenchError(f"profile {p}: sequence length exceeds the model's max_position_embeddings "
                                 f"{cfg.max_position_embeddings}")
    check_fp8_device(policy, device)
    spec, smooth = quant_spec(loaded, policy, calib)
    tensors = engine_tensors(sparse_model(loaded, policy, prune), policy, smooth)
    if wordpiece is not None:
        tensors[TOKENIZER_TENSOR] = torch.frombuffer(bytearray(wordpiece.tokenizer.to_str().encode()),
                                                     dtype=torch.uint8)
    gpu = this_gpu() if device.type == "cuda" else None
    header = EngineHeader(
        model_config=cfg.to_json(), policy=_policy_json(policy), profiles=tuple(profiles), quant=spec.to_json(),
        model_digest=loaded.digest,
        calib_digest=calib.key() if calib is not None and policy.quantized else None,
        device=device.type, gpu_name=gpu[0] if gpu else None, compute_capability=gpu[1] if gpu else None,
        versions=_versions(), kernels=_kernels(cfg.num_layers, policy, device, varlen),
        build_seconds=0.0, created=datetime.now(timezone.utc).isoformat(timespec="seconds"), source=loaded.source,
        calibration=calib.describe() if calib is not None and policy.quantized else "", varlen=varlen)
    if device.type == "cuda":
        if policy.int8:
            _cutlass_hint()
        header = replace(header, kernels={**header.kernels, **_tune(header, tensors, device, timing_cache)})
    return replace(header, build_seconds=time.perf_counter() - t0), tensors


@functools.lru_cache(maxsize=1)
def _cutlass_hint() -> None:
    """Say once per process where this GPU could time CUTLASS's INT8 GEMMs but their library is not built: the
    build still works, with the other families only."""
    from plugins.cutlass_int8 import build_hint

    hint = build_hint()
    if hint:
        log.warning("%s", hint)


def check_fp8_device(policy: PrecisionPolicy, device: torch.device) -> None:
    """Refuse, in one line, an --fp8 build for a CUDA GPU without FP8 tensor cores (compute capability < 8.9);
    the CPU runs FP8 engines on the reference path."""
    why = fp8_unsupported(device) if policy.fp8 else None
    if why:
        raise WorkbenchError(f"--fp8 needs {why}: build --int8, or --fp8 with --device cpu")


def fp8_unsupported(device: torch.device) -> str | None:
    """What `device` lacks to run FP8 builds, in words (None: it runs them; the CPU on the reference path). The
    sweep skips FP8 rows with it, as a build refuses them."""
    if device.type != "cuda":
        return None
    from plugins.fp8_linear import MIN_CAPABILITY

    gpu = this_gpu(device)
    if gpu is None:
        return None  # no CUDA here: the build fails where it first touches the device, as any CUDA build does
    name, capability = gpu
    if tuple(int(p) for p in capability.split(".")) < MIN_CAPABILITY:
        return f"FP8 tensor cores (compute capability 8.9 or later: Ada, Hopper); {name} is {capability}"
    return None


def _tune(header: EngineHeader, tensors: dict[str, torch.Tensor], device: torch.device,
          timing_cache: TimingCache | None) -> dict[str, str]:
    """Time every implementation of each quantized (INT8 or FP8) GEMM kind (under --sparse the FP16 GEMMs too,
    whose only other candidates are sparse), and of attention at each profile's shape, with padding and without
    (each graph's case); keep the fastest. Under --sparse, 2:4 kernels are candidates like any other, so a GEMM runs
    sparse only where it measured faster; `_sparse_note` records why each GEMM runs dense. A --varlen build then
    times its packed path (engines/packed.py: tune_packed)."""
    engine = Engine(header, {k: v for k, v in tensors.items() if k != TOKENIZER_TENSOR}, device)
    policy = engine.policy
    if not engine.use_triton or not (policy.quantized or policy.sparse or header.varlen):
        return {}
    cache = timing_cache if timing_cache is not None else TimingCache(None)
    machine = machine_key()
    chosen = {**_tune_gemms(engine, cache, machine), **_tune_attention(engine, cache, machine)}
    if header.varlen:
        from engines.packed import tune_packed

        engine.kernels.update(chosen)  # the packed path's timing runs the kernels just chosen
        chosen.update(tune_packed(engine, cache, machine))
    cache.save()
    log.info("%s", cache.summary())
    del engine
    torch.cuda.empty_cache()
    return chosen


def _tune_gemms(engine: Engine, cache: TimingCache, machine: str) -> dict[str, str]:
    """The GEMM kernels of each profile's row count, timed at the row counts `timed_rows` picks (a row count
    between two timed ones runs the kernels of the next one up)."""
    policy, chosen = engine.policy, {}
    owner = timed_rows((p.batch * p.seq_len for p in engine.header.profiles), SMALL_M_ROWS)
    formats = ((policy.format.name,) if policy.quantized else ()) + (("fp",) if policy.sparse else ())
    for m, fmt, kind in itertools.product(sorted(set(owner.values())), formats, GEMMS):
        if fmt != "fp" and kind == "fc2" and policy.fc2_library_gemm:
            continue
        found = engine.gemm_candidates(kind, m, fmt)
        if found is None:
            continue
        runs = [r for r, timed in owner.items() if timed == m]
        keys = [gemm_kernel_key(kind, r, fmt != "fp") for r in runs]
        if fmt == "fp" and list(found[1]) == [LIBRARY]:  # nothing to choose: the FP GEMM stays on the library
            chosen.update({SPARSE_NOTE + key: _sparse_note({LIBRARY: 0.0}) for key in keys})
            continue
        problem, candidates, calls = found
        best, times = choose(problem, candidates, cache, machine, calls)
        chosen.update(dict.fromkeys(keys, best))
        log.info("%s %s m=%d: %s %.3f ms (library %.3f ms)%s", fmt, kind, m, best, times[best], times[LIBRARY],
                 "" if len(runs) == 1 else f"; also at m={', '.join(str(r) for r in runs if r != m)}")
        if policy.sparse and not is_sparse(best):
            chosen.update(dict.fromkeys((SPARSE_NOTE + key for key in keys), _sparse_note(times)))
            log.info("%s %s m=%d runs dense: %s", fmt, kind, m, _sparse_note(times))
    return chosen


def _tune_attention(engine: Engine, cache: TimingCache, machine: str) -> dict[str, str]:
    """The attention kernel of each profile's shape, in the graph with padding and in the one without (FP16:
    SDPA, untimed; the fused attention kernels pay where they write the next GEMM's codes)."""
    chosen = {}
    shapes = sorted({(p.batch, p.seq_len) for p in engine.header.profiles}) if engine.policy.quantized else []
    for (b, s), padded in itertools.product(shapes, (True, False)):
        found = engine.attention_candidates(b, s, padded)
        if found is None:
            continue
        problem, candidates, calls = found
        best, times = choose(problem, candidates, cache, machine, calls, engine.attention_agreement())
        chosen[attention_key(b, s, padded)] = best
        if len(times) > 1 and all(t == float("inf") for impl, t in times.items() if impl != LIBRARY):
            log.warning("attention %dx%d %s: every kernel candidate was left out, so this build runs the library "
                        "path there (much slower under -imh: the INT8 reference)", b, s,
                        "padded" if padded else "dense")
        log.info("attention %dx%d %s: %s %.3f ms (library %.3f ms)", b, s, "padded" if padded else "dense", best,
                 times[best], times[LIBRARY])
    return chosen


SPARSE_NOTE = "sparse."  # header entries "sparse.gemm.KIND[.fp].mM": why a --sparse build's GEMM runs dense


def _sparse_note(times: dict[str, float]) -> str:
    """Why a GEMM of a --sparse build runs a dense kernel, from its candidates' times (ms per GEMM)."""
    sparse = {impl: t for impl, t in times.items() if is_sparse(impl)}
    dense = min(t for impl, t in times.items() if impl not in sparse)
    finite = {impl: t for impl, t in sparse.items() if t != float("inf")}
    if finite:
        impl = min(finite, key=finite.get)
        return f"slower: {impl} {finite[impl]:.3f} ms against {dense:.3f} ms dense"
    return "failed: every 2:4 kernel failed or disagreed here" if sparse else "none: no 2:4 kernel for this shape here"


def kernel_choices(header: EngineHeader) -> list[str]:
    """One line per profile naming the implementation the build chose for each timed op (nothing for engines
    that time none: CPU, FP builds but --sparse ones), e.g. `1x128: qkv triton:32x64x128-g8-w4-s4-pf, ...,
    attention sdpa`; FP GEMMs as `qkv/fp16`. Under --sparse each GEMM says whether it runs 2:4-sparse, or dense
    and why (`dense (sparse slower here)`), and a last line sums it up."""
    lines = []
    for p in header.profiles:
        m = p.batch * p.seq_len
        parts = []
        for g, quantized in itertools.product(GEMMS, (True, False)):
            key = gemm_kernel_key(g, m, quantized)
            if key in header.kernels:
                parts.append(f"{g if quantized else g + '/fp16'} {header.kernels[key]}{_sparse_words(header, key)}")
        for padded, label in ((True, "attention"), (False, "dense attention")):
            attention = header.kernels.get(attention_key(p.batch, p.seq_len, padded))
            if attention is not None:
                parts.append(f"{label} {'sdpa' if attention == LIBRARY else attention}")
        packed = header.kernels.get(varlen_attention_key(m))
        if packed is not None:
            parts.append(f"packed attention {'sdpa on padded windows' if packed == LIBRARY else packed}")
        if parts:
            lines.append(f"{p}: {', '.join(parts)}")
    if header.policy.get("sparse"):
        lines.append(_sparse_summary(header))
    if header.varlen:
        lines.append(_path_summary(header))
    return lines


def _path_summary(header: EngineHeader) -> str:
    """kernel_choices' line on a --varlen engine's path: packed or bucketed, and why."""
    times = header.kernels.get(PATH_TIMES_KEY)
    if times is None:
        return "path: packed (built --varlen; the paths are timed by CUDA builds)"
    return f"path: {'packed' if runs_packed(header) else 'bucketed'} ({times})"


def _sparse_words(header: EngineHeader, key: str) -> str:
    """What kernel_choices adds to a GEMM of a --sparse build: sparse, or dense and why."""
    if not header.policy.get("sparse"):
        return ""
    if is_sparse(header.kernels[key]):
        return " (2:4 sparse)"
    note = header.kernels.get(SPARSE_NOTE + key, "")
    return {"slower": " dense (sparse slower here)", "failed": " dense (sparse failed here)",
            "none": " dense (no sparse kernel here)"}.get(note.split(":")[0], "")


def _sparse_summary(header: EngineHeader) -> str:
    gemms = [k for k in header.kernels if k.startswith("gemm.")]
    sparse = [k for k in gemms if is_sparse(header.kernels[k])]
    notes = [v.split(":")[0] for k, v in header.kernels.items() if k.startswith(SPARSE_NOTE)]
    if sparse:
        return f"2:4 weights: {len(sparse)} of {len(gemms)} GEMM choices run sparse (cuSPARSELt), the others " \
               "dense kernels on the pruned weights"
    if "slower" in notes:
        return "2:4 weights: dense kernels on the pruned weights (sparse GEMMs were slower at every GEMM timed)"
    if notes:
        return "2:4 weights: dense kernels on the pruned weights (no sparse GEMM could run here)"
    return "2:4 weights: dense kernels on the pruned weights (not timed: sparse GEMMs are chosen by CUDA builds)"


def quant_spec(loaded: LoadedModel, policy: PrecisionPolicy, calib: CalibrationCache | QatScales | None
               ) -> tuple[QuantSpec, dict[str, torch.Tensor]]:
    """The build flags compiled with the ranges of a calibration cache (calib.spec.spec_from_cache) or of a QAT
    folder (QatScales.spec_for), and the smoothing vectors of the sites it quantizes per channel."""
    if policy.format is None:
        return QuantSpec(), {}
    if calib is None:
        raise WorkbenchError(f"{'--int8' if policy.int8 else '--fp8'} needs activation scales: make a calibration "
                             "cache with `cli.py calibrate --squad train.json --model DIR -o calib.json` and pass "
                             "--calib-cache calib.json, or build from a `cli.py qat` model folder")
    if isinstance(calib, QatScales):
        return calib.spec_for(policy, loaded.config.num_layers, f"the QAT scales of {loaded.source}")
    return spec_from_cache(calib, policy, loaded.config, loaded.digest)


def policy_from_flags(flags) -> PrecisionPolicy:
    """The PrecisionPolicy of `cli.py build`'s or `cli.py export-onnx`'s flags (int8, fp8, fp16, iln, imh, strict,
    g, sparse, keep_fp16, prune_2to4). Absent attributes are off."""
    from quant.policy import parse_gemm_list

    on = {name: bool(getattr(flags, name, False)) for name in ("int8", "fp8", "fp16", "iln", "imh", "strict",
                                                               "sparse")}
    if getattr(flags, "prune_2to4", False) and not on["sparse"]:
        raise WorkbenchError("--prune-2to4 prunes for a --sparse build: add --sparse")
    return PrecisionPolicy(**on, fc2_library_gemm=bool(getattr(flags, "g", False)),
                           fp16_gemms=parse_gemm_list(getattr(flags, "keep_fp16", "") or ""))


def load_ranges(loaded: LoadedModel, policy: PrecisionPolicy, *, calib_cache: str | None = None,
                qat_scales: str | None = None, ignore_unmodelled: bool = False,
                say=print) -> CalibrationCache | QatScales | None:
    """Where a build (or an export) takes its ranges from: a calibration cache file; QAT made elsewhere
    (`qat_scales`: qat/imports.py); else, under --int8, the model folder's own quant_spec.json (a `cli.py qat`
    folder). None without --int8 or --fp8 (with a warning when ranges were given). `say` names the source."""
    if calib_cache and qat_scales:
        raise WorkbenchError("give --calib-cache or --qat-scales, not both")
    if not policy.quantized:
        if calib_cache or qat_scales:
            say(f"warning: {'--calib-cache' if calib_cache else '--qat-scales'} is not used without --int8 or "
                "--fp8")
        return None
    if calib_cache:
        from calib.cache import load_cache
        return load_cache(calib_cache)
    if qat_scales:
        from qat.imports import scales_for_build

        scales = scales_for_build(qat_scales, loaded, policy, strict=policy.strict,
                                  ignore_unmodelled=ignore_unmodelled)
        say(f"scales: {scales.describe()}")
        return scales
    if loaded.model_dir is not None:
        from qat.folder import read_qat_scales

        scales = read_qat_scales(loaded.model_dir)
        if scales is not None:
            say(f"scales: learned by QAT ({loaded.model_dir}/quant_spec.json), trained for "
                f"{scales.precision_policy().describe()}")
        return scales
    return None


def sparse_model(loaded: LoadedModel, policy: PrecisionPolicy, prune: bool = False) -> torch.nn.Module:
    """The model whose weights the engine takes. Under --sparse every encoder GEMM weight must be 2:4: a dense one
    is refused in one line naming them, or with `prune` pruned here by magnitude (with a warning: accuracy needs
    the fine-tuning of `cli.py prune`). On CUDA the build then times 2:4-sparse kernels (cuSPARSELt) against the
    dense ones per GEMM and profile; each GEMM runs whichever was faster, dense kernels on the pruned weights
    where nothing sparse won, and `kernel_choices` says which and why."""
    if not policy.sparse:
        return loaded.model
    check = gemm_sparsity(loaded.model, loaded.config.num_layers)
    if check.all_sparse:
        return loaded.model
    dense = [name.removeprefix("layers.").removesuffix(".weight") for name in check.dense]  # "3.fc2"
    named = ", ".join(f"layer{n}" for n in dense[:4]) + (f" and {len(dense) - 4} more" if len(dense) > 4 else "")
    if not prune:
        raise WorkbenchError(f"--sparse: {len(dense)} GEMM weights of {loaded.source} are not 2:4 ({named}): prune "
                             "and fine-tune the model first (`cli.py prune`), or add --prune-2to4")
    log.warning("--prune-2to4: %d GEMM weights pruned to 2:4 by magnitude at build; without fine-tuning "
                "(`cli.py prune`) this costs accuracy", len(dense))
    model = copy.deepcopy(loaded.model)
    prune_2to4(model, "magnitude")
    return model


def _policy_json(policy: PrecisionPolicy) -> dict:
    from dataclasses import asdict
    return asdict(policy)


def _kernels(num_layers: int, policy: PrecisionPolicy, device: torch.device, varlen: bool = False) -> dict[str, str]:
    """What runs each op, in words; quantized GEMMs on CUDA are then timed per profile (gemm.KIND.mROWS entries)."""
    if policy.fp8:
        int8 = ("fp8 e4m3: a timed Triton kernel (fused epilogue), cuBLASLt (torch._scaled_mm) or the reference"
                if device.type == "cuda" else "cpu fp8 e4m3 (reference: float32 accumulation of the codes)") + \
            ", fp32 epilogue"
    else:
        int8 = ("cuBLASLt int8 (torch._int_mm) or a timed Triton kernel" if device.type == "cuda"
                else "cpu int8 (torch._int_mm)") + ", fused epilogue"
    fp = f"{'fp16' if policy.fp16 else 'fp32'} library gemm (F.linear)"
    attention = ("int8 attention (reference ops, or the timed fused kernel)" if policy.imh
                 else "sdpa (F.scaled_dot_product_attention)" + (" or the timed fused kernel" if device.type == "cuda"
                                                                  and policy.quantized and policy.fp16 else ""))
    kernels = {f"layer{i}.{g}": int8 if policy.quantizes_gemm(i, g) else fp for i in range(num_layers) for g in GEMMS}
    if policy.fc2_library_gemm:
        kernels.update({f"layer{i}.fc2": "cuBLASLt int8 (torch._int_mm), -g" for i in range(num_layers)
                        if policy.quantizes_gemm(i, "fc2") and device.type == "cuda"})
    if varlen:
        attention += "; packed (--varlen): variable-length attention (the library path on windows padded per " \
                     "batch" + (", or a timed kernel)" if device.type == "cuda" else ")")
    kernels.update({f"layer{i}.attention": attention for i in range(num_layers)})
    return kernels


def _versions() -> dict[str, str]:
    versions = {"workbench": common.version.__version__, "torch": torch.__version__}
    if torch.version.cuda:
        versions["cuda"] = torch.version.cuda
    from plugins import cutlass_int8
    if cutlass_int8.available():  # present at build (INT8 GEMMs time its kernels): which source built it
        versions["cutlass_int8"] = cutlass_int8.source_hash()
    return versions


def load_runnable(path, device: torch.device) -> tuple[Engine, WordPiece | None]:
    """An engine file, checked (checksum, GPU, format) and ready to run, with its embedded tokenizer."""
    header, tensors = load_engine(path, device)
    raw = tensors.pop(TOKENIZER_TENSOR, None)
    wordpiece = wordpiece_from_str(bytes(raw.cpu().numpy()).decode(), str(path)) if raw is not None else None
    engine = Engine(header, tensors, device).eval()
    missing = unavailable_families(list(header.kernels.values()), {g.backend_format for g in engine.gemms.values()},
                                   engine.use_triton)
    if missing:
        log.warning("%s: its build chose %s kernels, which cannot run here (%s); those GEMMs run the reference "
                    "instead, slower", path, ", ".join(missing), "; ".join(missing.values()))
    return engine, wordpiece
