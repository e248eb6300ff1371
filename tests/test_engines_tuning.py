"""The timing cache and the runtime's reading of kernel choices (CPU: timings are given, not measured)."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest

from engines.tuning import LIBRARY, GemmProblem, TimingCache, choose, kernel_key

PROBLEM = GemmProblem("fc1", 128, 4096, 1024, "int8", "bias+gelu->int8")


def test_choose_takes_the_fastest_and_keeps_every_timing(tmp_path):
    cache = TimingCache(tmp_path / "t.json")
    measured = {LIBRARY: 0.30, "triton:a": 0.12, "triton:b": 0.20}
    calls = []

    def candidate(impl):
        return lambda: calls.append(impl)

    # Pre-measure through the cache's own entry point, as `choose` would on a GPU.
    for impl, ms in measured.items():
        cache.get(PROBLEM.key(impl, "gpu"), lambda ms=ms: ms)
    best, times = choose(PROBLEM, {impl: candidate(impl) for impl in measured}, cache, "gpu")
    assert best == "triton:a" and times == measured and not calls
    assert cache.timed == 3 and cache.reused == 3
    cache.save()
    again = TimingCache(tmp_path / "t.json")
    assert again.times == cache.times
    best2, _ = choose(PROBLEM, {impl: candidate(impl) for impl in measured}, again, "gpu")
    assert best2 == best and again.timed == 0 and again.reused == 3 and "nothing timed" in again.summary()


def test_ties_go_to_the_library_and_failures_never_win(tmp_path):
    cache = TimingCache(None)
    for impl, ms in {LIBRARY: 0.2, "triton:x": 0.2, "triton:y": float("inf")}.items():
        cache.times[PROBLEM.key(impl, "g")] = ms
    assert choose(PROBLEM, {LIBRARY: None, "triton:x": None, "triton:y": None}, cache, "g")[0] == LIBRARY


def test_keys_separate_machines_problems_and_implementations():
    other = GemmProblem("fc1", 256, 4096, 1024, "int8", "bias+gelu->int8")
    keys = {PROBLEM.key(LIBRARY, "H100"), PROBLEM.key(LIBRARY, "A100"), other.key(LIBRARY, "H100"),
            PROBLEM.key("triton:a", "H100")}
    assert len(keys) == 4
    assert kernel_key("fc2", 49152) == "gemm.fc2.m49152"


@pytest.mark.parametrize("damage", ["truncate", "edit", "garbage"])
def test_damaged_timing_cache_is_said_and_started_afresh(tmp_path, caplog, damage):
    path = tmp_path / "t.json"
    cache = TimingCache(path)
    cache.get(PROBLEM.key(LIBRARY, "g"), lambda: 0.5)
    cache.save()
    text = path.read_text()
    if damage == "truncate":
        path.write_text(text[: len(text) // 2])
    elif damage == "edit":
        d = json.loads(text)
        d["times"][PROBLEM.key(LIBRARY, "g")] = 0.001  # a hand-made "faster" figure
        path.write_text(json.dumps(d))
    else:
        path.write_bytes(b"\x00\xff")
    with caplog.at_level("WARNING"):
        fresh = TimingCache(path)
    assert fresh.times == {} and "damaged or was modified" in caplog.text


def test_builds_saving_at_the_same_time_keep_each_others_timings(tmp_path):
    """`sweep --workers`: two builds open the cache, each times its own problem and saves; neither save drops the
    other's timing, and the later one's cache takes the earlier one's too."""
    path = tmp_path / "t.json"
    a, b = TimingCache(path), TimingCache(path)
    a.get(PROBLEM.key(LIBRARY, "g"), lambda: 0.5)
    b.get(PROBLEM.key("triton", "g"), lambda: 0.25)
    a.save()
    b.save()
    assert TimingCache(path).times == {PROBLEM.key(LIBRARY, "g"): 0.5, PROBLEM.key("triton", "g"): 0.25}
    assert b.times == TimingCache(path).times


def test_nothing_timed_writes_nothing(tmp_path):
    cache = TimingCache(tmp_path / "t.json")
    cache.save()
    assert not (tmp_path / "t.json").exists()


def test_triton_implementation_names_round_trip():
    pytest.importorskip("triton")
    from engines.backends import parse_triton_impl, triton_impl
    from plugins.int8_linear import CANDIDATE_CONFIGS

    configs = CANDIDATE_CONFIGS + tuple(replace(c, fast_accum=True) for c in CANDIDATE_CONFIGS)
    names = {triton_impl(c) for c in configs}
    assert len(names) == len(configs)
    for c in configs:
        assert parse_triton_impl(triton_impl(c)) == c


def test_fp8_family_also_offers_fast_accumulation_on_wgmma_tiles():
    """FP8 builds time each wgmma tile with and without fast accumulation (GemmConfig.fast_accum); INT8's sums are
    exact int32, so its family offers no such variant."""
    pytest.importorskip("triton")
    from engines.backends import TRITON, gemm_backend, parse_triton_impl
    from engines.tuning import GemmProblem

    problem = GemmProblem("fc1", 49152, 4096, 1024, "fp8_e4m3", "bias+gelu->fp8_e4m3")
    fp8 = [parse_triton_impl(i) for i in gemm_backend(TRITON, "fp8_e4m3").impls(problem)]
    int8 = [parse_triton_impl(i) for i in gemm_backend(TRITON, "int8").impls(problem)]
    fast = [c for c in fp8 if c.fast_accum]
    assert not any(c.fast_accum for c in int8) and fast
    assert all(c.block_m >= 64 and c.split_k == 1 for c in fast)
    assert {replace(c, fast_accum=False) for c in fast} <= set(int8) == {c for c in fp8 if not c.fast_accum}


def test_a_fast_wrong_candidate_is_never_chosen(monkeypatch):
    """Timings are measured only for candidates that reproduce the library's output."""
    import torch

    import engines.tuning as tuning

    monkeypatch.setattr(tuning, "time_ms", lambda fn, calls=1: {"library": 0.3, "good": 0.2, "wrong": 0.01}[fn.__name__])
    ref = torch.randn(8, 16)

    def named(name, value):
        fn = lambda: value  # noqa: E731
        fn.__name__ = name
        return fn

    off = ref.clone()
    off[0, 0] += 10.0
    candidates = {LIBRARY: named("library", ref), "good": named("good", ref + 1e-6), "wrong": named("wrong", off)}
    cache = TimingCache(None)
    best, times = choose(PROBLEM, candidates, cache, "g")
    assert best == "good" and times["wrong"] == float("inf") and times[LIBRARY] == 0.3


def test_agreement_rules_for_codes_and_floats():
    import torch

    from engines.tuning import agrees

    codes = torch.randint(-127, 128, (100, 100), dtype=torch.int8)
    near = codes.clone()
    near[0, 0] = max(-127, int(near[0, 0]) - 1)
    far = codes.clone()
    far[0, 0] = 0 if int(far[0, 0]) > 2 or int(far[0, 0]) < -2 else 100
    assert agrees(codes, codes) and agrees(near, codes) and not agrees(far, codes)
    x = torch.randn(64, 64)
    assert agrees(x + 1e-5, x) and not agrees(x * 1.01, x) and not agrees(x.half(), x)
    assert not agrees(torch.full_like(x, float("nan")), x)


def test_a_fine_bucket_ladder_is_timed_at_fewer_row_counts():
    """--buckets 16 at batch 128: every row count runs kernels timed at itself or at a count at most BORROW_RATIO
    above it; small counts are always timed; the largest is timed; fewer counts are timed than there are."""
    from engines.tuning import BORROW_RATIO, timed_rows

    rows = [128 * s for s in range(16, 385, 16)] + [1 * 128, 8 * 128]
    owner = timed_rows(rows, always_below=2048)
    assert set(owner) == set(rows)
    timed = set(owner.values())
    assert max(rows) in timed and {128, 1024, 2048} <= timed
    for m, t in owner.items():
        assert t in timed and owner[t] == t and m <= t <= m * BORROW_RATIO
    assert len(timed) < len(rows) * 0.6


def test_build_times_each_timed_row_count_once_and_writes_every_profiles_choice(monkeypatch):
    """engines.build._tune_gemms: the GEMMs are timed only at the row counts timed_rows picks, and the header gets a
    choice for every profile's row count, the one timed at the count it borrows from."""
    from types import SimpleNamespace

    import engines.build as B
    from engines.engine_file import Profile, length_buckets
    from engines.runtime import gemm_kernel_key
    from quant.policy import GEMMS

    profiles = length_buckets([Profile(128, 384)], 16)
    timed_at = []

    def candidates(kind, m, fmt):
        timed_at.append(m)
        return (GemmProblem(kind, m, 1, 1, "int8", "bias"), {LIBRARY: None, f"triton:m{m}": None}, 1)

    monkeypatch.setattr(B, "choose", lambda problem, cands, *a, **k: (
        f"triton:m{problem.m}", {LIBRARY: 2.0, f"triton:m{problem.m}": 1.0}))
    policy = SimpleNamespace(format=SimpleNamespace(name="int8"), quantized=True, sparse=False,
                             fc2_library_gemm=False)
    engine = SimpleNamespace(policy=policy, header=SimpleNamespace(profiles=profiles), gemm_candidates=candidates)
    chosen = B._tune_gemms(engine, TimingCache(None), "machine")
    owner = B.timed_rows((p.batch * p.seq_len for p in profiles), B.SMALL_M_ROWS)
    assert sorted(timed_at) == sorted(m for m in set(owner.values()) for _ in GEMMS)
    assert len(set(timed_at)) < len(profiles)
    for p in profiles:
        m = p.batch * p.seq_len
        assert all(chosen[gemm_kernel_key(kind, m)] == f"triton:m{owner[m]}" for kind in GEMMS)
