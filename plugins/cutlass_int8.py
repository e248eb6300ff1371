"""INT8 GEMM on CUTLASS 3's Hopper kernels: the engine's "cutlass" GEMM family (engines/backends.py).

int8_linear's function (plugins/int8_linear.py; its reference, int8_linear_reference, defines the output) run by
CUTLASS's warp-specialized TMA + wgmma kernels, the whole quantized epilogue fused as an epilogue visitor tree
(plugins/cutlass_int8.cu says why this is our own CUDA source on top of the library). The build times these
kernels beside the Triton tiles and keeps, GEMM by GEMM, whichever is faster and agrees with the reference.

The kernels are compiled once per machine, not at import: nvcc and CUTLASS's headers are needed to build, not to
run. The headers come from the `nvidia-cutlass` package (`pip install --no-deps nvidia-cutlass==4.2.0.0`: only its
headers are used, so not its code generator's requirements; not in requirements.txt for that reason) or from a
CUTLASS checkout named by $CUTLASS_DIR.

    python -m plugins.cutlass_int8 build              # -> the cache folder, found there by every later run
    WORKBENCH_CUTLASS_LIB=/path/lib.so cli.py build ...  # a library built elsewhere (same source)

The library's file name carries a hash of the .cu source, so an edited source is never run from a stale build.
Until it is built the family is unavailable and builds time the other families only; an engine that chose it
runs the reference family where it is missing (engines/runtime.py). sm_90a code runs on compute capability 9.0
only (H100, H200), so the family is offered there alone.

Layout as in the other plugins: CONFIGS and EPILOGUES (what the .cu file instantiates), `build` and `available`,
`cutlass_int8_linear` (the wrapper the family runs), and the checks. Tests: tests/test_plugins_cutlass.py.
"""
from __future__ import annotations

import argparse
import ctypes
import functools
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from common.errors import WorkbenchError, exit_status
from common.files import cache_root, check_writable_dir
from plugins import common
from plugins.int8_linear import check_arguments, check_vector
from quant.formats import INT8

SOURCE = Path(__file__).with_suffix(".cu")
LIBRARY_ENV = "WORKBENCH_CUTLASS_LIB"   # a library built elsewhere from the same source
CUTLASS_ENV = "CUTLASS_DIR"             # a CUTLASS source tree (include/, tools/util/include)

# The .cu file's configurations (wb::with_config, CONFIG_NAMES), in its order: schedule (cooperative: two
# consumer warp groups on one tile; ping-pong: each on its own tile, one's epilogue under the other's GEMM), tile
# M x N x K, and a thread-block cluster that shares operand tiles through TMA multicast.
CONFIGS = ("coop-128x128x128", "coop-128x256x128", "ping-64x128x128", "coop-128x256x128-c2x1",
           "ping-128x128x128-c1x2", "ping-128x128x128-c2x1", "coop-256x128x128-c1x2")
# Its epilogues (wb::Epilogue0..5), as engines.tuning.GemmProblem.epilogue names them.
EPILOGUES = ("bias->float16", "bias+residual8->float16", "bias+residual->float16", "bias+gelu->float16",
             "bias->int8", "bias+gelu->int8")
STATUS = {1: "CUTLASS cannot implement this problem (shape or alignment)", 2: "its workspace is too small",
          3: "initialize failed", 4: "the launch failed", 5: "no such configuration", 6: "no such epilogue"}
_ALIGN_BYTES = 16   # TMA: every operand's base address and row pitch


class GemmArgs(ctypes.Structure):
    """WbGemmArgs of the .cu file, field for field (wb_cutlass_args_size checks the size)."""

    _fields_ = [("a", ctypes.c_void_p), ("w", ctypes.c_void_p), ("w_scale", ctypes.c_void_p),
                ("bias", ctypes.c_void_p), ("res", ctypes.c_void_p), ("vec", ctypes.c_void_p),
                ("out", ctypes.c_void_p), ("workspace", ctypes.c_void_p), ("stream", ctypes.c_void_p),
                ("workspace_bytes", ctypes.c_size_t), ("a_scale", ctypes.c_float), ("vec_default", ctypes.c_float),
                ("m", ctypes.c_int), ("n", ctypes.c_int), ("k", ctypes.c_int), ("sm_count", ctypes.c_int),
                ("pdl", ctypes.c_int)]


# ------------------------------------------------------------------------------------------------ building

@functools.lru_cache(maxsize=None)
def source_hash() -> str:
    return hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]


def library_path() -> Path:
    """The library this process loads: $WORKBENCH_CUTLASS_LIB, else the cache folder's build of this source."""
    named = os.environ.get(LIBRARY_ENV)
    return Path(named) if named else cache_root() / "cutlass" / f"cutlass_int8-{source_hash()}.so"


def cutlass_headers() -> Path:
    """CUTLASS's source tree: $CUTLASS_DIR, else the one the nvidia-cutlass package ships (cutlass_library/source)."""
    named = os.environ.get(CUTLASS_ENV)
    if named:
        root = Path(named)
    else:
        spec = importlib.util.find_spec("cutlass_library")
        if spec is None or spec.origin is None:
            raise WorkbenchError("building the CUTLASS GEMMs needs CUTLASS's headers: pip install --no-deps "
                                 f"nvidia-cutlass==4.2.0.0, or set {CUTLASS_ENV} to a CUTLASS checkout")
        root = Path(spec.origin).parent / "source"
    if not (root / "include" / "cutlass" / "cutlass.h").is_file():
        raise WorkbenchError(f"{root}: no include/cutlass/cutlass.h there (expected a CUTLASS source tree)")
    return root


def nvcc() -> str:
    found = shutil.which("nvcc")
    if found is None:
        candidate = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc"
        found = str(candidate) if candidate.is_file() else None
    if found is None:
        raise WorkbenchError("building the CUTLASS GEMMs needs CUDA's compiler: nvcc is not on PATH (or set CUDA_HOME)")
    return found


def compile_commands(compiler: str, headers: Path, folder: Path) -> tuple[list[list[str]], list[str]]:
    """One nvcc command per translation unit (each epilogue, then the C API) writing objects into `folder`, and
    the command that links them into `folder`/lib.so. For sm_90a (wgmma and setmaxnreg need its 'a' target),
    with -DNDEBUG and programmatic dependent launch compiled in (the .cu file says why)."""
    flags = ["-std=c++17", "-O3", "-DNDEBUG", "-DCUTLASS_ENABLE_GDC_FOR_SM90", "-gencode=arch=compute_90a,code=sm_90a",
             "--expt-relaxed-constexpr", "-Xcompiler", "-fPIC", "-I", str(headers / "include"),
             "-I", str(headers / "tools" / "util" / "include")]
    units = [f"-DWB_EPILOGUE={e}" for e in range(len(EPILOGUES))] + ["-DWB_DISPATCH"]
    objects = [str(folder / f"unit{i}.o") for i in range(len(units))]
    compiles = [[compiler, *flags, unit, "-c", str(SOURCE), "-o", obj] for unit, obj in zip(units, objects)]
    return compiles, [compiler, "-shared", "-gencode=arch=compute_90a,code=sm_90a", *objects,
                      "-o", str(folder / "lib.so")]


def build(out: Path | None = None, jobs: int | None = None, log=print) -> Path:
    """Compile the .cu file into `out` (default: library_path()), its translation units in parallel; written
    under a temporary name and renamed, so a failed or interrupted build leaves nothing behind. A compiler
    warning that ptxas serialized the wgmma pipeline (C7510) fails the build: it would be a slow kernel."""
    out = Path(out) if out else library_path()
    compiler, headers = nvcc(), cutlass_headers()
    check_writable_dir(out.parent, "library's folder")
    with tempfile.TemporaryDirectory(prefix="cutlass-build-", dir=out.parent) as tmp:
        compiles, link = compile_commands(compiler, headers, Path(tmp))
        log(f"compiling {len(compiles)} units of {SOURCE.name} with {compiler} and {headers} "
            f"({len(CONFIGS) * len(EPILOGUES)} kernels; minutes)")

        def run(cmd: list[str]) -> str:
            done = subprocess.run(cmd, capture_output=True, text=True)
            text = done.stdout + done.stderr
            if done.returncode != 0:  # its error lines, on one line
                errors = [line.strip() for line in text.splitlines() if "error" in line.lower()] or \
                    text.strip().splitlines()[-3:]
                step = cmd[cmd.index("-c") - 1] if "-c" in cmd else "linking"
                raise WorkbenchError(f"{SOURCE}: nvcc failed ({step}): {' | '.join(errors[:3])[:600]}")
            if "C7510" in text:
                raise WorkbenchError(f"{SOURCE}: ptxas serialized the wgmma pipeline (C7510); built without -DNDEBUG?")
            return text
        pool = ThreadPoolExecutor(max_workers=jobs or min(len(compiles), os.cpu_count() or 1))
        try:
            for i, _ in enumerate(pool.map(run, compiles), 1):
                log(f"  unit {i}/{len(compiles)} compiled")
        finally:  # after a failure, units not yet started are not compiled for nothing
            pool.shutdown(wait=True, cancel_futures=True)
        run(link)
        os.replace(Path(tmp) / "lib.so", out)
    _load.cache_clear()
    log(f"wrote {out}")
    return out


# ------------------------------------------------------------------------------------------------ loading

def _library() -> tuple[ctypes.CDLL | None, str]:
    """The loaded library and "", or None and why it cannot be used."""
    return _load(library_path())


@functools.lru_cache(maxsize=None)
def _load(path: Path) -> tuple[ctypes.CDLL | None, str]:
    if not path.is_file():
        return None, f"{path} is not built (python -m plugins.cutlass_int8 build)"
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        return None, f"{path} does not load: {e}"
    lib.wb_cutlass_args_size.restype = ctypes.c_int
    lib.wb_cutlass_config_name.restype = ctypes.c_char_p
    lib.wb_cutlass_config_name.argtypes = [ctypes.c_int]
    lib.wb_cutlass_gemm.restype = ctypes.c_int
    lib.wb_cutlass_gemm.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.POINTER(GemmArgs),
                                    ctypes.POINTER(ctypes.c_size_t)]
    names = tuple(lib.wb_cutlass_config_name(i).decode() for i in range(len(CONFIGS)))
    if lib.wb_cutlass_args_size() != ctypes.sizeof(GemmArgs) or names != CONFIGS:
        return None, f"{path} was built from another source than {SOURCE} (rebuild it)"
    return lib, ""


@functools.lru_cache(maxsize=None)
def _gpu_reason() -> str:
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    if torch.cuda.get_device_capability() != (9, 0):
        return f"{torch.cuda.get_device_name()} is not compute capability 9.0 (the kernels are sm_90a)"
    return ""


def unavailable_reason() -> str:
    """Why the family cannot run here ("" when it can)."""
    return _gpu_reason() or _library()[1]


def available() -> bool:
    return not unavailable_reason()


def build_hint() -> str | None:
    """One line for a build on a GPU the kernels suit (compute capability 9.0) where their library is not built
    or not loadable; None elsewhere."""
    if _gpu_reason() or available():
        return None
    return (f"CUTLASS's INT8 GEMMs cannot be timed for this build ({_library()[1]}); it times the other kernel "
            "families. `python -m plugins.cutlass_int8 build` compiles them once for this machine (nvcc and the "
            "nvidia-cutlass package; minutes), after which builds time them beside Triton's")


# ------------------------------------------------------------------------------------------------ running

def epilogue_of(residual: torch.Tensor | None, residual_scale, gelu: bool, out_recip, out_dtype: torch.dtype
                ) -> str | None:
    """The EPILOGUES name of one call's epilogue, or None where the .cu file has no kernel for it."""
    res = "" if residual is None else "+residual8" if residual.dtype == torch.int8 else "+residual"
    if res == "+residual" and residual.dtype != torch.float16:
        return None
    out = "int8" if out_recip is not None else str(out_dtype).removeprefix("torch.")
    name = "bias" + ("+gelu" if gelu else "") + res + "->" + out
    return name if name in EPILOGUES else None


def supports(epilogue: str, n: int, k: int) -> bool:
    """Whether a GEMM with weight [n, k] and this epilogue has kernels here: K and N whole 16-byte rows of int8
    (TMA's row pitch), which also aligns FP16 rows."""
    return epilogue in EPILOGUES and n % 16 == 0 and k % 16 == 0 and n > 0 and k > 0


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """t contiguous, at a 16-byte aligned address (a view into a bigger tensor may be neither)."""
    t = t.contiguous()
    return t if t.data_ptr() % _ALIGN_BYTES == 0 else t.clone()


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


_WORKSPACE: dict[tuple, tuple[int, int]] = {}


def _workspace_bytes(lib: ctypes.CDLL, epilogue: int, config: int, args: GemmArgs) -> tuple[int, int]:
    """(status, bytes) of the workspace a kernel needs for a problem shape: asked of the library once per shape,
    not before every launch (it depends on the shape and the GPU's multiprocessors, not on the operands)."""
    key = (id(lib), epilogue, config, args.m, args.n, args.k, args.sm_count)
    if key not in _WORKSPACE:
        need = ctypes.c_size_t(0)
        status = lib.wb_cutlass_gemm(epilogue, config, ctypes.byref(args), ctypes.byref(need))
        _WORKSPACE[key] = (status, need.value)
    return _WORKSPACE[key]


def cutlass_int8_linear(config: str, a_q: torch.Tensor, w_q: torch.Tensor, a_scale: float, w_scale: torch.Tensor,
                        bias: torch.Tensor, *, residual: torch.Tensor | None = None,
                        residual_scale: float | torch.Tensor | None = None, gelu: bool = False,
                        out_recip: float | torch.Tensor | None = None,
                        out_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """int8_linear's output (same arguments; `config` one of CONFIGS) from one CUTLASS kernel on the current
    stream, so a CUDA graph captures it like any launch."""
    check_arguments(INT8, a_q, w_q, w_scale, bias, residual, residual_scale, out_dtype)
    check_vector("cutlass_int8_linear", "out_recip", out_recip, w_q.shape[0], a_q.device)
    (m, k), n = a_q.shape, w_q.shape[0]
    epilogue = epilogue_of(residual, residual_scale, gelu, out_recip, out_dtype)
    if epilogue is None or not supports(epilogue, n, k) or config not in CONFIGS:
        raise ValueError(f"cutlass_int8_linear: no kernel {config!r} for epilogue {epilogue} at N={n}, K={k}")
    lib, why = _library()
    if lib is None:
        raise WorkbenchError(f"the CUTLASS GEMMs cannot run: {why}")
    out = common.empty((m, n), torch.int8 if out_recip is not None else out_dtype, a_q.device)
    if m == 0:
        return out
    vec = residual_scale if residual is not None and residual.dtype == torch.int8 else out_recip
    tensors = [_aligned(t) for t in (a_q, w_q, w_scale, bias)]
    res = _aligned(residual) if residual is not None else None
    vec_t = vec if isinstance(vec, torch.Tensor) else None
    args = GemmArgs(*(t.data_ptr() for t in tensors), res.data_ptr() if res is not None else None,
                    vec_t.data_ptr() if vec_t is not None else None, out.data_ptr(), None,
                    torch.cuda.current_stream(a_q.device).cuda_stream, 0, float(a_scale),
                    float(vec) if vec is not None and vec_t is None else 1.0, m, n, k, _sm_count(a_q.device.index),
                    int(common.pdl(a_q.device)))
    e, c = EPILOGUES.index(epilogue), CONFIGS.index(config)
    status, need = _workspace_bytes(lib, e, c, args)
    if status == 0 and need:
        workspace = torch.empty(need, dtype=torch.uint8, device=a_q.device)
        args.workspace, args.workspace_bytes = workspace.data_ptr(), need
    if status == 0:
        status = lib.wb_cutlass_gemm(e, c, ctypes.byref(args), None)
    if status:
        raise RuntimeError(f"cutlass_int8_linear {config} ({epilogue}, M={m} N={n} K={k}): "
                           f"{STATUS.get(status, f'status {status}')}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m plugins.cutlass_int8", description=__doc__.split("\n\n")[0],
                                 epilog="example: python -m plugins.cutlass_int8 build --jobs 8")
    sub = ap.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="compile the kernels (nvcc, CUTLASS headers; minutes)")
    b.add_argument("--out", type=Path, help=f"the library to write (default: {library_path()})")
    b.add_argument("--jobs", type=int, help="translation units compiled at once (default: one per CPU)")
    sub.add_parser("status", help="whether the family can run here, and why not")
    args = ap.parse_args(argv)
    if args.command == "build":
        return exit_status(lambda: build(args.out, args.jobs))
    why = unavailable_reason()
    print(f"cutlass: {'available' if not why else 'unavailable: ' + why} ({library_path()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
