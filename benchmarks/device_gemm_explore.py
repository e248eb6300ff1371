"""Every INT8 GEMM tile configuration timed at BERT's GEMM shapes against the library path:
which wins, by how much, and whether each one is right. A measuring script for the device machine, not a test.

    python3 -m benchmarks.device_gemm_explore [--shapes large-small,base-big-fc2] [--configs=-pf,+tma] [--rep 20]
                                              [--dry-run]

Shapes are MODEL-ROWS-KIND: BERT-large (hidden 1024, intermediate 4096) or -base (768, 3072); M = 128 rows
(batch 1 x 128 tokens, "small") or 128 x 384 ("big"); qkv (FP16 out), attn_out and fc2 (+ FP16 residual), fc1
(GELU, INT8 codes out), as the engine launches them. fp16-MODEL-ROWS-KIND: the same GEMM with FP16 operands,
bias (+ GELU for fc1) to FP16, as FP16 engines run them on cuBLASLt (the residual is the LayerNorm's), against
the TMA configurations of plugins.int8_linear.fp16_linear and FP16_TILES: an experiment, not an engine path.
iln-MODEL-ROWS-KIND (attn_out, fc2): the residual read as INT8 codes with their scale, as -iln engines run them.
Each candidate's output is checked against int8_linear_reference first (bit for bit without GELU; codes at most
1 apart with it; FP16 GEMMs within 2e-3 of float32 math) and again after timing.
Times are those the engine builder takes (engines.tuning.time_ms): one call captured in a CUDA graph, median
replay time of triton.testing.do_bench with L2 flushed between replays (24 layers' weights do not stay in L2), so
host launch costs are left out, as in the engine's graphs. A config that fails to compile or run is listed as
such. Kernels are compiled first, each in its own process, several at a time (Triton's disk cache passes them
on): that keeps the run within a few minutes, and a compiler that aborts (an assertion in an MLIR pass) or hangs
(Hopper's warp specialization did) costs that config only. Tables go to stdout and, when $OUT is set, to
$OUT/gemm_explore.md.
"""
from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from engines.backends import parse_triton_impl, triton_impl
from model.bert import gelu_tanh
from plugins.int8_linear import CANDIDATE_CONFIGS, GemmConfig, fp16_linear, int8_linear, int8_linear_reference

MODELS = {"large": (1024, 4096), "base": (768, 3072)}  # hidden, intermediate
ROWS = {"small": 128, "big": 128 * 384}
KINDS = ("qkv", "attn_out", "fc1", "fc2")
LIBRARY = "library: int8_linear_reference (cuBLASLt _int_mm + torch epilogue)"
FP16_LIBRARY = "library: cuBLASLt addmm (GELU epilogue for fc1), as FP16 engines run it"
INT_MM = "torch._int_mm alone (no epilogue)"


@dataclass(frozen=True)
class Shape:
    name: str
    kind: str
    m: int
    n: int
    k: int
    fp16: bool = False
    residual_codes: bool = False  # -iln: the residual is INT8 codes

    @property
    def gelu(self) -> bool:  # fc1: GELU, INT8 codes out (they are fc2's input)
        return self.kind == "fc1"

    @property
    def residual(self) -> bool:
        return self.kind in ("attn_out", "fc2") and not self.fp16

    @property
    def epilogue(self) -> str:
        if self.fp16:
            return "fp16: bias" + ("+gelu" if self.gelu else "") + "->fp16"
        residual = "+residual8->fp16" if self.residual_codes else "+residual->fp16"
        return "bias" + ("+gelu->int8" if self.gelu else residual if self.residual else "->fp16")


# FP16 operands take twice the shared memory of INT8 ones per K element: 64-deep K steps, as FP16 GEMMs on
# Hopper usually run, beside the INT8 engine's TMA candidates.
FP16_TILES = (
    GemmConfig(128, 256, 64, 8, 8, 3, "tma", tma_store=True),
    GemmConfig(128, 256, 64, 8, 8, 3, "tma-persistent", tma_store=True),
    GemmConfig(256, 128, 64, 8, 8, 3, "tma", tma_store=True),
    GemmConfig(128, 128, 64, 8, 8, 4, "tma", tma_store=True),
)


def all_shapes() -> list[Shape]:
    out = []
    for model, (h, i) in MODELS.items():
        for rows, m in ROWS.items():
            nk = {"qkv": (3 * h, h), "attn_out": (h, h), "fc1": (i, h), "fc2": (h, i)}
            out += [Shape(f"{model}-{rows}-{kind}", kind, m, *nk[kind]) for kind in KINDS]
            out += [Shape(f"fp16-{model}-{rows}-{kind}", kind, m, *nk[kind], fp16=True) for kind in KINDS]
            out += [Shape(f"iln-{model}-{rows}-{kind}", kind, m, *nk[kind], residual_codes=True)
                    for kind in ("attn_out", "fc2")]
    return out


def select(shapes: list[Shape], spec: str | None) -> list[Shape]:
    """Shapes whose name is, or starts with, one of the comma-separated prefixes (`large-small`, `base-big-fc2`)."""
    if not spec:
        return shapes
    tokens = [t.strip() for t in spec.split(",") if t.strip()]
    chosen = [s for s in shapes if any(s.name == t or s.name.startswith(t + "-") for t in tokens)]
    if not chosen:
        raise SystemExit(f"--shapes {spec!r} matches none of: {', '.join(s.name for s in shapes)}")
    return chosen


def plan(shape: Shape, device: torch.device, spec: str | None = None) -> list[GemmConfig]:
    """The configs to time at this shape: the candidates whose name contains one of the comma-separated parts of
    `spec` (all of them without one)."""
    tokens = [t.strip() for t in (spec or "").split(",") if t.strip()]
    pool = [c for c in CANDIDATE_CONFIGS if c.tma] + list(FP16_TILES) if shape.fp16 else CANDIDATE_CONFIGS
    return [c for c in pool if not tokens or any(t in triton_impl(c) for t in tokens)]


def problem(shape: Shape, device: torch.device, seed: int = 0):
    """Random operands with realistic scales (|y| of a few tens) and the int8_linear (fp16_linear) arguments."""
    from plugins.common import out_recip

    g = torch.Generator(device=device).manual_seed(seed)
    if shape.fp16:
        a = torch.randn(shape.m, shape.k, generator=g, device=device).half()
        w = (torch.randn(shape.n, shape.k, generator=g, device=device) * shape.k ** -0.5).half()
        return (a, w, torch.randn(shape.n, generator=g, device=device) * 0.5), dict(gelu=shape.gelu)
    a = torch.randint(-127, 128, (shape.m, shape.k), generator=g, device=device, dtype=torch.int8)
    w = torch.randint(-127, 128, (shape.n, shape.k), generator=g, device=device, dtype=torch.int8)
    w_scale = torch.rand(shape.n, generator=g, device=device) * 0.004 + 0.001
    bias = torch.randn(shape.n, generator=g, device=device) * 0.5
    res = (torch.randn(shape.m, shape.n, generator=g, device=device) * 2).half() if shape.residual else None
    args, kw = (a, w, 0.05, w_scale, bias), dict(residual=res, gelu=shape.gelu, out_dtype=torch.float16)
    if shape.residual_codes:
        kw.update(residual=torch.randint(-127, 128, (shape.m, shape.n), generator=g, device=device,
                                         dtype=torch.int8), residual_scale=0.02)
    if shape.gelu:  # an output scale that clips the top 20% of |y|, as calibration would
        y = int8_linear_reference(*args, **{**kw, "out_dtype": torch.float32})
        kw["out_recip"] = out_recip(0.8 * float(y.abs().max()) / 127)
        del y
    return args, kw


def run(shape: Shape, args, kw, config: GemmConfig | None = None) -> torch.Tensor:
    """One call of our kernel (config) or, without one, of the library path it is timed against."""
    if shape.fp16:
        a, w, bias = args
        if config is not None:
            return fp16_linear(a, w, bias, gelu=shape.gelu, config=config)
        if shape.gelu:  # cuBLASLt's GELU epilogue, the tanh form (as FP16 engines run FC1)
            return torch._addmm_activation(bias.half(), a, w.t(), use_gelu=True)
        return torch.addmm(bias.half(), a, w.t())
    return int8_linear(*args, **kw, config=config) if config is not None else int8_linear_reference(*args, **kw)


def verdict(out: torch.Tensor, ref: torch.Tensor, gelu: bool) -> str:
    if out.shape != ref.shape or out.dtype != ref.dtype:
        return f"WRONG ({out.dtype} {tuple(out.shape)})"
    if ref.dtype == torch.float32:  # an FP16 GEMM against its float32 definition
        err = float((out.float() - ref).abs().max() / ref.abs().max())
        return f"ok ({err:.1e} rel)" if err < 2e-3 else f"WRONG ({err:.1e} rel)"
    if not gelu:
        bad = int((out != ref).sum())
        return "exact" if bad == 0 else f"WRONG ({bad} of {ref.numel()} differ)"
    diff = (out.int() - ref.int()).abs()
    worst, ones = int(diff.max()), int((diff == 1).sum())
    if worst > 1:
        return f"WRONG (codes {worst} apart)"
    return "ok" if ones == 0 else f"ok ({ones} codes 1 apart)"


def judge(shape: Shape, out: torch.Tensor, ref: torch.Tensor) -> str:
    """FP16 GEMMs in float32 against their float32 definition (ref), INT8 ones bit for bit or code for code."""
    return verdict(out.float() if shape.fp16 else out, ref, shape.gelu)


def is_right(correct: str) -> bool:
    return "WRONG" not in correct and "failed" not in correct


def short(e: Exception) -> str:
    """An exception in one line: Triton's compilation errors start with the source position, end with the cause."""
    text = [t.strip() for t in str(e).splitlines() if t.strip()]
    what = text[0][:100] + (f" ... {text[-1][:100]}" if len(text) > 1 else "") if text else ""
    return f"{type(e).__name__}: {what}"


def _compile(shape: Shape, config: GemmConfig) -> None:
    """Child process: compile one (shape, config) kernel into Triton's disk cache; the error, if it fails, on
    stderr's last line and exit status 1."""
    try:
        args, kw = problem(shape, torch.device("cuda"))
        run(shape, args, kw, config)
        torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001 (reported by the parent)
        print(short(e), file=sys.stderr)
        raise SystemExit(1) from None


def kernel_key(shape: Shape, config: GemmConfig) -> tuple:
    """What tells compiled kernels apart here (all of M, N, K and the strides are multiples of 16)."""
    return shape.epilogue, config, shape.k % config.block_k == 0


COMPILE_TIMEOUT_S = 150


def precompile(work: list[tuple[Shape, GemmConfig]], jobs: int) -> tuple[list[str], set[tuple]]:
    """One child process per distinct kernel, `jobs` at a time, so that the timing loop finds them compiled.
    Returns what failed, in words, and the kernel keys whose child died (no exception: the process aborted) or
    ran past COMPILE_TIMEOUT_S, which the timing loop must not try in its own process."""
    firsts = {}
    for shape, c in work:
        firsts.setdefault(kernel_key(shape, c), (shape, c))

    def child(item):
        shape, c = item
        try:
            run = subprocess.run([sys.executable, "-m", "benchmarks.device_gemm_explore", "--compile-one", shape.name,
                                  triton_impl(c)], capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
            code, last = run.returncode, (run.stderr.strip().splitlines() or [""])[-1][:200]
        except subprocess.TimeoutExpired:  # killed; the timing loop must not try it in its own process either
            code, last = None, f"still compiling after {COMPILE_TIMEOUT_S} s, stopped"
        print(f"compiled {shape.name} {triton_impl(c)}: {'ok' if code == 0 else last}", flush=True)
        return code, last

    with ThreadPoolExecutor(jobs) as pool:
        results = list(pool.map(child, firsts.values()))
    failed, crashed = [], set()
    for key, (shape, c), (code, last) in zip(firsts, firsts.values(), results):
        if code == 1:
            failed.append(f"{shape.name} {triton_impl(c)}: {last}")
        elif code != 0:
            died = last if code is None else f"compiler process died (status {code}): {last}"
            failed.append(f"{shape.name} {triton_impl(c)}: {died}")
            crashed.add(key)
    return failed, crashed


def explore(shape: Shape, rep: int, device: torch.device = torch.device("cuda"), spec: str | None = None,
            crashed: frozenset = frozenset()) -> list[str]:
    """The Markdown table of one shape."""
    from engines.tuning import time_ms

    args, kw = problem(shape, device)
    if shape.fp16:
        a, w, bias = args
        y = a.float() @ w.float().t() + bias
        ref = gelu_tanh(y) if shape.gelu else y
        del y
    else:
        ref = int8_linear_reference(*args, **kw)
    ops = 2 * shape.m * shape.n * shape.k
    rows = []  # (name, programs, us or None, correct)

    def bench(fn) -> float:
        return time_ms(fn, rep=rep) * 1e3

    if shape.fp16:
        rows.append((FP16_LIBRARY, "", bench(lambda: run(shape, args, kw)),
                     judge(shape, run(shape, args, kw), ref)))
    else:
        rows.append((LIBRARY, "", bench(lambda: int8_linear_reference(*args, **kw)), "(reference)"))
        a, w = args[0], args[1]
        rows.append((INT_MM, "", bench(lambda: torch._int_mm(a, w.t())), "(no epilogue)"))
    for c in plan(shape, device, spec):
        tiles = -(-shape.m // c.block_m) * -(-shape.n // c.block_n)
        tiles *= c.split_k
        if c.loads.startswith("tma-persistent"):
            tiles = min(tiles, torch.cuda.get_device_properties(device).multi_processor_count)
        name = triton_impl(c)
        if kernel_key(shape, c) in crashed:
            rows.append((name, "", None, "the compiler crashed or hung"))
            continue
        try:
            first = judge(shape, run(shape, args, kw, c), ref)
        except Exception as e:  # noqa: BLE001 (reported, and the config is skipped)
            rows.append((name, "", None, f"failed to compile or run: {short(e)}"))
            continue
        last = {}
        us = bench(lambda: last.__setitem__("out", run(shape, args, kw, c)))
        after = judge(shape, last["out"], ref)
        correct = first if after == first else f"{first}; after timing: {after}"
        rows.append((name, tiles, us, correct))

    good = [us for name, _, us, correct in rows if us is not None and is_right(correct) and name != INT_MM]
    best = min(good) if good else float("nan")
    lines = ["", f"### {shape.name}: M={shape.m} N={shape.n} K={shape.k}, {shape.epilogue}", "",
             "| implementation | programs | time (us) | TOP/s | x best | correct? |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, programs, us, correct in sorted(rows, key=lambda r: (r[2] is None, r[2] or 0.0)):
        if us is None:
            lines.append(f"| {name} | {programs} | - | - | - | {correct} |")
        else:
            lines.append(f"| {name} | {programs} | {us:.1f} | {ops / us / 1e6:.0f} | {us / best:.2f} | {correct} |")
    del args, kw, ref
    torch.cuda.empty_cache()
    return lines


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", help="comma-separated name prefixes, e.g. large-small,base-big-fc2 (default: all)")
    ap.add_argument("--configs", help="comma-separated parts of candidate names, e.g. -pf,+tma (default: all)")
    ap.add_argument("--rep", type=int, default=20, help="do_bench measuring time per implementation, ms")
    ap.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1),
                    help="processes compiling kernels up front (0: compile as timed)")
    ap.add_argument("--dry-run", action="store_true", help="print the plan; needs no GPU")
    ap.add_argument("--compile-one", nargs=2, metavar=("SHAPE", "IMPL"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.compile_one:
        return _compile(select(all_shapes(), args.compile_one[0])[0], parse_triton_impl(args.compile_one[1]))
    shapes = select(all_shapes(), args.shapes)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    work = []
    for s in shapes:
        timed = plan(s, device, args.configs)
        work += [(s, c) for c in timed]
        print(f"{s.name}: M={s.m} N={s.n} K={s.k} {s.epilogue}: library{'' if s.fp16 else ', _int_mm'} and "
              f"{len(timed)} configs")
    print(f"{len(shapes)} shapes, {len(work) + 2 * len(shapes)} timings of ~{args.rep} ms, "
          f"{len({kernel_key(*w) for w in work})} kernels to compile"
          )
    if args.dry_run:
        return
    if device.type != "cuda":
        raise SystemExit("device_gemm_explore needs a CUDA GPU (or --dry-run)")

    start = time.time()
    failed, crashed = precompile(work, args.jobs) if args.jobs > 0 else ([], set())
    print(f"compiled in {time.time() - start:.0f} s", *failed, sep="\n", flush=True)
    lines = [f"# GEMM configurations: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
             f"triton {importlib.import_module('triton').__version__}"]
    lines += ["", "Failed in the parallel compilation step:", *(f"- {f}" for f in failed)] if failed else []
    for s in shapes:
        part = explore(s, args.rep, device, args.configs, frozenset(crashed))
        print("\n".join(part), flush=True)
        lines += part
        if os.environ.get("OUT"):
            from common.files import atomic_write_text
            atomic_write_text(os.path.join(os.environ["OUT"], "gemm_explore.md"), "\n".join(lines) + "\n")
    print(f"\ntotal {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
