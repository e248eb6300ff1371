"""plugins.cutlass_int8: the CUTLASS INT8 GEMM family against int8_linear_reference, which defines its output.

On the CPU: what the .cu file and the wrapper must agree on (configurations, epilogues, the argument struct's
fields), which engine epilogues have kernels, when the family is a candidate, and the build's orchestration with a
fake nvcc (parallel units, nothing left behind on failure, the C7510 guard, one-line errors). `cuda` tests, where
the library is built (python -m plugins.cutlass_int8 build), run every configuration and epilogue on random
operands, in a CUDA graph, and inside an engine.
"""
from __future__ import annotations

import dataclasses
import re
import sys

import pytest
import torch

from common.errors import WorkbenchError
from engines import backends
from engines.tuning import GemmProblem
from plugins import cutlass_int8 as C
from tests.test_plugins_common import replayed
from tests.test_plugins_int8_linear import EPILOGUES, check, kwargs_for, problem

# tests/test_plugins_int8_linear.py's epilogues the .cu file has kernels for, and its name for each
SUPPORTED = {"fp16": "bias->float16", "gelu": "bias+gelu->float16", "residual": "bias+residual->float16",
             "residual8": "bias+residual8->float16", "int8": "bias->int8", "gelu+int8": "bias+gelu->int8",
             "gelu+int8/channel": "bias+gelu->int8"}


def call_kwargs(epilogue, device="cpu", m=8, n=64, k=96):
    a, w, a_scale, w_scale, bias, res = problem(m, n, k, 1, device=device, residual=EPILOGUES[epilogue].get("residual"))
    return (a, w, a_scale, w_scale, bias), kwargs_for(epilogue, a, w, a_scale, w_scale, bias, res)


@pytest.mark.parametrize("epilogue", list(EPILOGUES))
def test_each_engine_epilogue_maps_to_its_kernel_or_to_none(epilogue):
    _, kw = call_kwargs(epilogue)
    got = C.epilogue_of(kw["residual"], kw.get("residual_scale"), kw["gelu"], kw.get("out_recip"), kw["out_dtype"])
    assert got == SUPPORTED.get(epilogue)


def test_the_source_and_the_wrapper_name_the_same_configurations_epilogues_and_fields():
    src = C.SOURCE.read_text()
    names = re.search(r"CONFIG_NAMES\[\] = \{(.*?)\};", src, re.S).group(1)
    assert tuple(re.findall(r'"([^"]+)"', names)) == C.CONFIGS
    cases = re.search(r"int with_config\(.*?\n\}", src, re.S).group(0)
    assert len(re.findall(r"case \d+: return f\(Kernel<", cases)) == len(C.CONFIGS)
    epilogues = re.findall(r"using Epilogue(\d) = .*// (.*)", src)
    assert [int(i) for i, _ in epilogues] == list(range(len(C.EPILOGUES)))
    assert re.search(r"WB_EPILOGUES\(X\) " + " ".join(f"X\\({i}\\)" for i in range(len(C.EPILOGUES))), src)
    struct = re.sub(r"//.*", "", re.search(r"struct WbGemmArgs \{(.*?)\};", src, re.S).group(1))
    fields = []
    for decl in filter(str.strip, struct.split(";")):  # "const int8_t* a" -> a; "int m, n, k" -> m, n, k
        first, *more = decl.split(",")
        fields += [re.findall(r"\w+", first)[-1]] + [name.strip() for name in more]
    assert fields == [name for name, _ in C.GemmArgs._fields_]


def test_the_family_is_a_candidate_only_where_its_library_runs(monkeypatch):
    fc1 = GemmProblem("fc1", 4096, 4096, 1024, "int8", "bias+gelu->int8")
    if not torch.cuda.is_available():
        assert C.unavailable_reason() == "no CUDA GPU"
        assert not any(i.startswith("cutlass:") for i in backends.gemm_candidates(fc1, "int8", gpu_kernels=True))
        assert not backends.runnable("cutlass:coop-128x128x128", "int8", gpu_kernels=True)
    monkeypatch.setattr(C, "available", lambda: True)
    impls = backends.gemm_candidates(fc1, "int8", gpu_kernels=True)
    assert [i for i in impls if i.startswith("cutlass:")] == [f"cutlass:{c}" for c in C.CONFIGS]
    assert not any(i.startswith("cutlass:") for i in backends.gemm_candidates(fc1, "int8", gpu_kernels=False))
    for unsupported in (dataclasses.replace(fc1, epilogue="bias+residual8->int8"),   # no such kernel
                        dataclasses.replace(fc1, n=4104),                             # N not whole 16-byte rows
                        dataclasses.replace(fc1, dtype="float16")):
        assert backends._cutlass_configs(unsupported) == []


def test_an_engine_that_chose_cutlass_where_it_is_not_built_is_told_so():
    impls = ["cutlass:coop-128x128x128", "triton:128x128x128-g8-w4-s3", "library", "cusparselt:alg0"]
    if not C.available():
        missing = backends.unavailable_families(impls, ["int8"], gpu_kernels=True)
        assert missing == {"cutlass": C.unavailable_reason()}
    assert backends.unavailable_families(impls, ["int8"], gpu_kernels=False) == {}  # the CPU runs the reference anyway


def test_a_build_on_a_gpu_the_kernels_suit_says_once_how_to_build_them(monkeypatch, caplog):
    assert C.build_hint() is None or torch.cuda.is_available()  # no GPU: nothing to say
    monkeypatch.setattr(C, "_gpu_reason", lambda: "")             # as on an H100 or H200 without the library
    hint = C.build_hint()
    assert "is not built" in hint and "python -m plugins.cutlass_int8 build" in hint
    from engines import build
    build._cutlass_hint.cache_clear()
    with caplog.at_level("WARNING", logger="engines.build"):
        build._cutlass_hint()
        build._cutlass_hint()
    assert [r.getMessage() for r in caplog.records] == [hint]


def test_the_library_name_follows_the_source_and_the_environment_can_name_another(monkeypatch, tmp_path):
    assert C.library_path().name == f"cutlass_int8-{C.source_hash()}.so"
    assert "is not built (python -m plugins.cutlass_int8 build)" in C._library()[1]
    junk = tmp_path / "junk.so"
    junk.write_bytes(b"not a shared object")
    monkeypatch.setenv(C.LIBRARY_ENV, str(junk))
    assert C.library_path() == junk and "does not load" in C._library()[1]


def test_the_wrapper_refuses_an_epilogue_without_a_kernel_before_touching_the_library():
    args, kw = call_kwargs("residual+int8")
    with pytest.raises(ValueError, match="no kernel 'coop-128x128x128' for epilogue None"):
        C.cutlass_int8_linear("coop-128x128x128", *args, **kw)
    args, kw = call_kwargs("fp16")
    with pytest.raises(ValueError, match="no kernel 'no-such'"):
        C.cutlass_int8_linear("no-such", *args, **kw)
    with pytest.raises(WorkbenchError, match="cannot run: .* is not built"):
        C.cutlass_int8_linear("coop-128x128x128", *args, **kw)


# ------------------------------------------------------------------------------------------------ building

FAKE_NVCC = """#!{python}
import os, sys
args = sys.argv[1:]
if os.environ.get("FAKE_NVCC_SAYS"):
    print(os.environ["FAKE_NVCC_SAYS"], file=sys.stderr)
if os.environ.get("FAKE_NVCC_FAILS") and "-c" in args:
    sys.exit(1)
open(args[args.index("-o") + 1], "w").write(" ".join(args))
"""


@pytest.fixture
def fake_toolchain(tmp_path, monkeypatch):
    """A fake nvcc on PATH (writes each output file with its command line) and a fake CUTLASS tree."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    nvcc = bin_dir / "nvcc"
    nvcc.write_text(FAKE_NVCC.format(python=sys.executable))
    nvcc.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{__import__('os').environ['PATH']}")
    tree = tmp_path / "cutlass"
    (tree / "include" / "cutlass").mkdir(parents=True)
    (tree / "include" / "cutlass" / "cutlass.h").write_text("")
    monkeypatch.setenv(C.CUTLASS_ENV, str(tree))
    return tmp_path


def test_build_compiles_every_unit_for_sm90a_with_ndebug_and_links_one_library(fake_toolchain):
    out = fake_toolchain / "lib" / "cutlass.so"
    lines = []
    assert C.build(out, jobs=2, log=lines.append) == out
    link = out.read_text().split()
    objects = [a for a in link if a.endswith(".o")]
    assert "-shared" in link and len(objects) == len(C.EPILOGUES) + 1
    compiles, _ = C.compile_commands("nvcc", fake_toolchain / "cutlass", fake_toolchain)
    units = [c[c.index("-c") - 1] for c in compiles]
    assert units == [f"-DWB_EPILOGUE={e}" for e in range(len(C.EPILOGUES))] + ["-DWB_DISPATCH"]
    assert all({"-DNDEBUG", "-DCUTLASS_ENABLE_GDC_FOR_SM90", "-gencode=arch=compute_90a,code=sm_90a"} <= set(c)
               for c in compiles)
    assert lines[-1] == f"wrote {out}" and list(out.parent.iterdir()) == [out]  # the temporary folder is gone


@pytest.mark.parametrize("env,message", [({"FAKE_NVCC_FAILS": "1"}, r"nvcc failed \(-DWB_EPILOGUE=\d\)"),
                                         ({"FAKE_NVCC_SAYS": "ptxas warning : (C7510) Potential Performance Loss"},
                                          "serialized the wgmma pipeline")])
def test_a_failed_build_says_why_in_one_line_and_leaves_nothing(fake_toolchain, monkeypatch, env, message):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    out = fake_toolchain / "lib" / "cutlass.so"
    with pytest.raises(WorkbenchError, match=message) as e:
        C.build(out, log=lambda line: None)
    assert "\n" not in str(e.value)
    assert not out.exists() and list(out.parent.iterdir()) == []


def test_build_checks_its_output_folder_before_compiling(fake_toolchain):
    blocker = fake_toolchain / "a-file"
    blocker.write_text("")
    with pytest.raises(WorkbenchError, match="is a file, expected a folder"):
        C.build(blocker / "cutlass.so", log=lambda line: pytest.fail("compiled before checking the output"))


def test_build_without_nvcc_or_headers_is_a_one_line_error_exit_2(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    assert C.main(["build", "--out", str(tmp_path / "x.so")]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
    monkeypatch.setenv(C.CUTLASS_ENV, str(tmp_path))
    with pytest.raises(WorkbenchError, match="no include/cutlass/cutlass.h"):
        C.cutlass_headers()
    assert C.main(["status"]) == 0 and "unavailable" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ CUDA

def _needs_library():
    if not C.available():
        pytest.skip(f"the CUTLASS family cannot run here: {C.unavailable_reason()}")


SHAPES = [(1, 64, 96), (37, 64, 96), (200, 1152, 384), (128, 384, 1536), (384, 1536, 384)]


@pytest.mark.cuda
@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("epilogue", list(SUPPORTED))
@pytest.mark.parametrize("config", C.CONFIGS)
def test_cuda_cutlass_matches_the_reference(m, n, k, epilogue, config):
    """The reference's float32 ops in its order: bit for bit without GELU; GELU's hardware tanh within budget."""
    from plugins.int8_linear import int8_linear_reference

    _needs_library()
    a, w, a_scale, w_scale, bias, res = problem(m, n, k, m + n + k, device="cuda",
                                                residual=EPILOGUES[epilogue].get("residual"))
    kw = kwargs_for(epilogue, a, w, a_scale, w_scale, bias, res)
    out = C.cutlass_int8_linear(config, a, w, a_scale, w_scale, bias, **kw)
    check(out, int8_linear_reference(a, w, a_scale, w_scale, bias, **kw), exact="gelu" not in epilogue)


@pytest.mark.cuda
def test_cuda_cutlass_replays_in_a_cuda_graph():
    from plugins.int8_linear import int8_linear_reference

    _needs_library()
    a, w, a_scale, w_scale, bias, res = problem(256, 1024, 1024, 3, device="cuda", residual=torch.int8)
    kw = kwargs_for("residual8", a, w, a_scale, w_scale, bias, res)

    out = replayed(lambda: C.cutlass_int8_linear("coop-128x256x128-c2x1", a, w, a_scale, w_scale, bias, **kw), a, 7)
    check(out, int8_linear_reference(a, w, a_scale, w_scale, bias, **kw), exact=True)


@pytest.mark.cuda
@pytest.mark.parametrize("iln", [False, True])
def test_cuda_an_engine_runs_the_cutlass_family_its_header_names(iln):
    """Every GEMM of an INT8 engine on one CUTLASS configuration: the forward of the library family's engine."""
    from engines.build import build_engine
    from engines.engine_file import Profile
    from engines.runtime import Engine
    from quant.policy import PrecisionPolicy
    from tests.test_engines import inputs, loaded_model, max_calibration

    _needs_library()
    loaded = loaded_model()
    policy = PrecisionPolicy(int8=True, fp16=True, iln=iln)
    header, tensors = build_engine(loaded, policy, [Profile(2, 32)], max_calibration(loaded), torch.device("cuda"),
                                   None)
    kernels = {key: ("cutlass:ping-64x128x128" if key.startswith("gemm.") else impl)
               for key, impl in header.kernels.items()}
    x = inputs(batch=2, seq=32, device="cuda")
    with torch.no_grad():
        got = Engine(dataclasses.replace(header, kernels=kernels), tensors, torch.device("cuda"))(*x)
        library = {key: ("library" if key.startswith("gemm.") else impl) for key, impl in header.kernels.items()}
        want = Engine(dataclasses.replace(header, kernels=library), tensors, torch.device("cuda"))(*x)
    for g, w_ in zip(got, want):
        assert (g.float() - w_.float()).abs().max() < 0.05 * w_.float().abs().max().clamp_min(1)
