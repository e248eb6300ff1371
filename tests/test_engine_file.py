"""Engine file: bit-exact round trip, refusal of damaged, foreign or newer files, hardware checks, profiles."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import pickle
import re
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import engines.engine_file as ef
from common.errors import WorkbenchError
from quant.formats import INT8
from quant.spec import QuantSpec, ScaleSource, SiteSpec
from engines.engine_file import (
    FORMAT,
    FORMAT_VERSION,
    EngineHeader,
    Profile,
    load_engine,
    pick_profile,
    read_header,
    save_engine,
    this_gpu,
)

H100 = ("NVIDIA H100 80GB HBM3", "9.0")
A100 = ("NVIDIA A100-SXM4-80GB", "8.0")


def _spec(amax: dict[str, float]) -> dict:
    return QuantSpec({site: SiteSpec(INT8, a, source=ScaleSource("calibration", "entropy")) for site, a in amax.items()}
                     ).to_json()


def _header(**over) -> EngineHeader:
    fields = dict(
        model_config={"vocab_size": 30522, "hidden_size": 384, "num_layers": 6, "num_heads": 12,
                      "intermediate_size": 1536, "layer_norm_eps": 1e-12, "hidden_act": "gelu"},
        policy={"int8": True, "fp16": True, "iln": False, "imh": True, "strict": False, "fc2_library_gemm": False},
        profiles=(Profile(1, 128), Profile(8, 384)),
        quant=_spec({"embeddings.ln_out": 3.9624, "layer0.fc2_in": 0.1 + 0.2, "layer0.probs": 1.0}),
        model_digest="a" * 64,
        calib_digest="c" * 64,
        device="cpu",
        gpu_name=None,
        compute_capability=None,
        versions={"workbench": "0.1.0", "torch": torch.__version__},
        kernels={"layer0.fc2": "torch_int8", "layer0.qkv": "torch_int8"},
        build_seconds=12.25,
        created="2024-05-01T12:00:00+00:00",
        source="minilm-l6-h384-squad11",
    )
    return EngineHeader(**{**fields, **over})


def _cuda_header(gpu=H100) -> EngineHeader:
    return _header(device="cuda", gpu_name=gpu[0], compute_capability=gpu[1])


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-40, 65504.0])
    return {
        "layer0.fc2.weight": torch.randint(-128, 128, (16, 24), dtype=torch.int8, generator=g),
        "layer0.fc2.weight_scale": torch.rand(16, generator=g),
        "layer0.fc2.bias": torch.randn(16, generator=g).half(),
        "layer0.ln.weight": torch.randn(24, generator=g).bfloat16(),
        "embeddings.word": torch.randn(24, 10, generator=g).t(),  # not contiguous
        "special.f32": special,
        "special.f16": special.half(),
        "special.bf16": special.bfloat16(),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4, dtype=torch.int8),
        "tokenizer.json": torch.frombuffer(bytearray('{"vocab": "ünïcode"}'.encode()), dtype=torch.uint8),
    }


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _assert_same_tensors(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape, name
        assert torch.equal(_bits(got[name]), _bits(t)), name


@pytest.fixture
def engine(tmp_path):
    path = tmp_path / "model.engine"
    save_engine(path, _header(), _tensors())
    return path


def _data_start(path) -> int:
    return 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]


def _rewrite(path, edit, fix_header_checksum=False) -> None:
    """Rewrite the file with safetensors itself: same tensors, edited header JSON, old checksums (optionally
    a recomputed header checksum, as a careful forger would)."""
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(str(path))
    d = json.loads(meta["engine"])
    edit(d)
    meta["engine"] = json.dumps(d, sort_keys=True, separators=(",", ":"))
    if fix_header_checksum:
        meta["header_checksum"] = hashlib.sha256(meta["engine"].encode()).hexdigest()
    save_file(tensors, str(path), metadata=meta)


# --- round trip -------------------------------------------------------------------------------------------------

def test_round_trip_is_bit_exact_with_equal_header(engine):
    header, tensors = load_engine(engine)
    assert header == _header()
    _assert_same_tensors(tensors, _tensors())
    assert all(t.device.type == "cpu" and t.is_contiguous() for t in tensors.values())
    assert header.profiles == (Profile(1, 128), Profile(8, 384)) and str(header.profiles[1]) == "8x384"


def test_read_header_equals_saved_header_without_reading_tensors(engine):
    data = bytearray(engine.read_bytes())
    data[_data_start(engine) + 5] ^= 0xFF  # damaged weights: only load_engine reads them
    engine.write_bytes(bytes(data))
    assert read_header(engine) == _header()
    with pytest.raises(WorkbenchError, match="checksum mismatch"):
        load_engine(engine)


def test_header_stored_as_canonical_json_in_metadata(engine):
    with safe_open(str(engine), framework="pt") as f:
        meta = f.metadata()
    assert set(meta) == {"engine", "checksum", "header_checksum"}
    d = json.loads(meta["engine"])
    assert d["format"] == FORMAT and d["format_version"] == FORMAT_VERSION
    assert meta["engine"] == json.dumps(d, sort_keys=True, separators=(",", ":"))
    assert d["profiles"] == [{"batch": 1, "seq_len": 128}, {"batch": 8, "seq_len": 384}]


def test_shared_and_view_tensors_are_saved_by_value(tmp_path):
    base = torch.arange(12, dtype=torch.float32)
    tensors = {"whole": base, "same": base, "view": base[4:8], "row": base.view(3, 4)[1]}
    save_engine(tmp_path / "e.engine", _header(), tensors)
    _assert_same_tensors(load_engine(tmp_path / "e.engine")[1], tensors)


def test_load_never_unpickles(engine, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("pickle used")
    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    assert load_engine(engine)[0] == _header()


def test_overwrite_replaces_the_engine(engine):
    save_engine(engine, _header(build_seconds=1.0), {"w": torch.ones(2)})
    header, tensors = load_engine(engine)
    assert header.build_seconds == 1.0 and list(tensors) == ["w"]


# --- damaged and foreign files ----------------------------------------------------------------------------------

def test_missing_file(tmp_path):
    for fn in (load_engine, read_header):
        with pytest.raises(WorkbenchError, match=r"x\.engine: engine file not found$"):
            fn(tmp_path / "x.engine")


def test_directory_is_refused(tmp_path):
    with pytest.raises(WorkbenchError, match="found a directory"):
        load_engine(tmp_path)


@pytest.mark.parametrize("where", ["empty", "in_length", "after_length", "in_header", "end_of_header",
                                   "in_data", "last_byte"])
def test_truncated_file(engine, where):
    data = engine.read_bytes()
    start = _data_start(engine)
    cut = {"empty": 0, "in_length": 5, "after_length": 8, "in_header": start // 2, "end_of_header": start,
           "in_data": start + 3, "last_byte": len(data) - 1}[where]
    engine.write_bytes(data[:cut])
    for fn in (load_engine, read_header):
        with pytest.raises(WorkbenchError, match=r"^\S*model\.engine: not an engine file or truncated \(.+\)$"):
            fn(engine)


def test_not_a_safetensors_file(tmp_path):
    path = tmp_path / "x.engine"
    path.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    with pytest.raises(WorkbenchError, match=r"x\.engine: not an engine file or truncated"):
        load_engine(path)


def test_trailing_garbage_is_refused(engine):
    engine.write_bytes(engine.read_bytes() + b"\0" * 16)
    with pytest.raises(WorkbenchError, match="not an engine file or truncated"):
        load_engine(engine)


def test_flipped_tensor_byte_is_a_checksum_mismatch(engine):
    data = bytearray(engine.read_bytes())
    data[-3] ^= 0x01
    engine.write_bytes(bytes(data))
    with pytest.raises(WorkbenchError) as e:
        load_engine(engine)
    assert str(e.value) == f"{engine}: checksum mismatch: the file is corrupt or was modified; rebuild it"


def _double_a_scale(d):
    d["quant"]["sites"]["layer0.fc2_in"]["amax"] *= 2


def test_edited_header_is_a_checksum_mismatch(engine):
    _rewrite(engine, _double_a_scale)
    for fn in (load_engine, read_header):
        with pytest.raises(WorkbenchError, match=r"model\.engine: checksum mismatch: the file is corrupt"):
            fn(engine)


def test_edited_header_with_forged_header_checksum_still_fails_to_load(engine):
    _rewrite(engine, _double_a_scale, fix_header_checksum=True)
    assert read_header(engine).spec.sites["layer0.fc2_in"].amax == 2 * (0.1 + 0.2)  # header alone looks consistent
    with pytest.raises(WorkbenchError, match="checksum mismatch"):
        load_engine(engine)


def test_header_that_is_not_json(engine):
    with safe_open(str(engine), framework="pt") as f:
        meta = dict(f.metadata())
    save_file(load_file(str(engine)), str(engine), metadata={**meta, "engine": meta["engine"][:-1]})
    with pytest.raises(WorkbenchError, match="engine header is not valid JSON .*rebuild it"):
        load_engine(engine)


def test_plain_safetensors_file_is_not_an_engine(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.ones(2)}, str(path))
    with pytest.raises(WorkbenchError, match=rf"model\.safetensors: not a {FORMAT} file \(.*without an engine header"):
        read_header(path)


def test_other_format(engine):
    _rewrite(engine, lambda d: d.update(format="bert-int8-workbench/calibration-cache"))
    with pytest.raises(WorkbenchError, match=rf"model\.engine: not a {FORMAT} file \(format 'bert-int8-workbench/"):
        load_engine(engine)


def test_missing_format(engine):
    _rewrite(engine, lambda d: d.pop("format"))
    with pytest.raises(WorkbenchError, match=rf"not a {FORMAT} file \(format None\)"):
        read_header(engine)


def test_future_version(engine):
    _rewrite(engine, lambda d: d.update(format_version=FORMAT_VERSION + 1, layout="something new"))
    with pytest.raises(WorkbenchError, match=rf"model\.engine: built by a newer workbench: format version "
                                             rf"{FORMAT_VERSION + 1}, this one reads {FORMAT_VERSION}"):
        load_engine(engine)


def test_older_version_is_refused_in_one_line_saying_to_rebuild(engine):
    _rewrite(engine, lambda d: d.update(format_version=1))
    for fn in (load_engine, read_header):
        with pytest.raises(WorkbenchError, match=rf"^{re.escape(str(engine))}: built by an older workbench \(engine "
                                                 rf"format 1, this one reads {FORMAT_VERSION}\): rebuild it"):
            fn(engine)


def test_unknown_format_or_granularity_in_the_spec_is_refused():
    for site, message in (({"format": "int3", "amax": 1.0}, "unknown quantization format 'int3'"),
                          ({"format": "int8", "amax": 1.0, "granularity": "per_row"}, "unknown granularity"),
                          ({"format": "int8", "amax": 1.0, "source": "guess"}, "unknown scale source")):
        d = {**_header().to_json(), "quant": {"sites": {"layer0.q": site}}}
        with pytest.raises(WorkbenchError, match=message):
            EngineHeader.from_json(d, "x.engine")


def test_spec_round_trips_through_the_header():
    header = _header()
    spec = EngineHeader.from_json(json.loads(json.dumps(header.to_json())), "x.engine").spec
    assert spec == header.spec and spec.sites["layer0.fc2_in"].format is INT8
    assert spec.scales()["layer0.probs"] == float(torch.tensor(1.0) / 127)


@pytest.mark.parametrize("version", [0, "1", None, True])
def test_invalid_version(engine, version):
    _rewrite(engine, lambda d: d.update(format_version=version))
    with pytest.raises(WorkbenchError, match="no valid format version"):
        read_header(engine)


@pytest.mark.parametrize("field,value,message", [
    ("profiles", [], "'profiles' must be a non-empty list"),
    ("profiles", [{"batch": 0, "seq_len": 128}], "'profiles' must be"),
    ("profiles", [[1, 128]], "'profiles' must be"),
    ("quant", {"sites": {"x": {"format": "int8", "amax": "0.5"}}}, "'quant' must be"),
    ("quant", {"sites": {"x": {"format": "int8", "amax": -1.0}}}, "'quant' must be"),
    ("quant", {"sites": {"x": {"amax": 1.0}}}, "'quant' must be"),
    ("quant", [0.5], "'quant' must be"),
    ("device", "tpu", "'device' must be"),
    ("model_config", None, "'model_config' must be an object"),
    ("calib_digest", 7, "'calib_digest' must be a string or null"),
    ("kernels", {"layer0.fc2": 1}, "'kernels' must be"),
    ("build_seconds", "fast", "'build_seconds' must be"),
    ("build_seconds", True, "'build_seconds' must be"),
    ("source", None, "'source' must be a string"),
])
def test_from_json_rejects_wrong_types(field, value, message):
    d = {**_header().to_json(), field: value}
    with pytest.raises(WorkbenchError, match=rf"^x\.engine: engine header field {message}"):
        EngineHeader.from_json(d, "x.engine")


def test_from_json_names_missing_fields():
    d = _header().to_json()
    del d["kernels"], d["created"]
    with pytest.raises(WorkbenchError, match=r"^x\.engine: engine header lacks kernels, created$"):
        EngineHeader.from_json(d, "x.engine")


def test_from_json_defaults_source_and_ignores_unknown_fields():
    d = {**_header().to_json(), "future_field": 1}
    del d["source"]
    assert EngineHeader.from_json(d, "x.engine") == _header(source="")


def test_cuda_header_needs_gpu_identity():
    d = {**_cuda_header().to_json(), "gpu_name": None}
    with pytest.raises(WorkbenchError, match="'gpu_name' must be a string for a cuda engine"):
        EngineHeader.from_json(d, "x.engine")


# --- where an engine may run ------------------------------------------------------------------------------------

def _fake_gpu(monkeypatch, gpu):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu is not None)
    monkeypatch.setattr(ef, "this_gpu", lambda device=None: gpu)


CUDA_ONLY = ("x.engine was built for cuda (NVIDIA H100 80GB HBM3, sm 9.0): run it with --device cuda on that GPU, "
             "or build for the CPU with --device cpu")


@pytest.mark.parametrize("gpu,device", [(None, "cpu"), (None, "cuda"), (H100, "cpu")])
def test_cuda_engine_without_cuda_or_on_cpu(tmp_path, monkeypatch, gpu, device):
    path = tmp_path / "x.engine"
    save_engine(path, _cuda_header(), _tensors())
    _fake_gpu(monkeypatch, gpu)
    with pytest.raises(WorkbenchError) as e:
        load_engine(path, device)
    assert str(e.value) == CUDA_ONLY.replace("x.engine", str(path))
    assert read_header(path) == _cuda_header()  # reports still read it


@pytest.mark.parametrize("other", [A100, ("NVIDIA H100 80GB HBM3", "9.1"), ("NVIDIA H100 PCIe", "9.0")])
def test_cuda_engine_on_another_gpu(tmp_path, monkeypatch, other):
    path = tmp_path / "x.engine"
    save_engine(path, _cuda_header(), _tensors())
    _fake_gpu(monkeypatch, other)
    with pytest.raises(WorkbenchError) as e:
        load_engine(path, torch.device("cuda"))
    assert str(e.value) == (f"{path} was built for NVIDIA H100 80GB HBM3 (compute capability 9.0) "
                            f"but this GPU is {other[0]} ({other[1]}): rebuild it here")


def test_cpu_engine_loads_on_a_gpu_machine(engine, monkeypatch):
    _fake_gpu(monkeypatch, A100)
    assert load_engine(engine, "cpu")[0] == _header()


def test_unknown_device(engine):
    with pytest.raises(WorkbenchError, match=r"model\.engine: unknown device 'gpu0'"):
        load_engine(engine, "gpu0")


def test_this_gpu_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert this_gpu() is None


@pytest.mark.cuda
def test_cuda_engine_round_trip_on_this_gpu(tmp_path):
    name, cc = this_gpu()
    path = tmp_path / "x.engine"
    save_engine(path, _cuda_header((name, cc)), {k: v.cuda() for k, v in _tensors().items()})
    header, tensors = load_engine(path, "cuda")
    assert header.gpu_name == name and all(t.is_cuda for t in tensors.values())
    _assert_same_tensors({k: v.cpu() for k, v in tensors.items()}, _tensors())


# --- profiles ---------------------------------------------------------------------------------------------------

PROFILES = (Profile(8, 384), Profile(1, 128), Profile(1, 384), Profile(4, 128), Profile(2, 256))


@pytest.mark.parametrize("batch,seq_len,want", [
    (1, 1, Profile(1, 128)), (1, 128, Profile(1, 128)), (1, 129, Profile(1, 384)), (2, 129, Profile(2, 256)),
    (3, 100, Profile(4, 128)), (2, 200, Profile(2, 256)), (5, 128, Profile(8, 384)), (8, 384, Profile(8, 384)),
])
def test_pick_profile_smallest_fitting(batch, seq_len, want):
    assert pick_profile(_header(profiles=PROFILES), batch, seq_len, "x.engine") == want


def test_pick_profile_tie_prefers_the_shorter_length():
    header = _header(profiles=(Profile(1, 512), Profile(4, 128)))
    assert pick_profile(header, 1, 100) == Profile(4, 128)


def test_pick_profile_none_fits():
    with pytest.raises(WorkbenchError) as e:
        pick_profile(_header(), 8, 512, "x.engine")
    assert str(e.value) == "batch 8 x length 512 fits no profile of x.engine (profiles: 1x128, 8x384)"
    with pytest.raises(WorkbenchError, match="fits no profile of the engine"):
        pick_profile(_header(), 9, 1)


@pytest.mark.parametrize("batch,seq_len", [(0, 128), (1, 0), (-1, 5), (1.5, 128), (True, 128)])
def test_pick_profile_rejects_non_positive(batch, seq_len):
    with pytest.raises(WorkbenchError, match=r"x\.engine: both must be positive integers"):
        pick_profile(_header(), batch, seq_len, "x.engine")


# --- failed saves -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tensors,message", [
    ({"w": [1.0, 2.0]}, "'w' is a list, not a dense torch.Tensor"),
    ({"w": torch.ones(2, dtype=torch.float64)}, "'w' is torch.float64"),
    ({"w": torch.ones(2, dtype=torch.int32)}, "'w' is torch.int32"),
    ({"": torch.ones(2)}, "invalid tensor name"),
    ({"__metadata__": torch.ones(2)}, "invalid tensor name"),
    ({3: torch.ones(2)}, "invalid tensor name"),
])
def test_bad_tensors_leave_nothing_behind(tmp_path, tensors, message):
    with pytest.raises(WorkbenchError, match=rf"x\.engine: cannot save: {message}"):
        save_engine(tmp_path / "x.engine", _header(), {"ok": torch.ones(1), **tensors})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("over,message", [
    ({"quant": {"sites": {"x": {"format": "int8", "amax": float("nan")}}}}, "not plain JSON"),
    ({"kernels": {"fc2": object()}}, "not plain JSON"),
    ({"profiles": ()}, "'profiles' must be"),
    ({"device": "cuda"}, "'gpu_name' must be a string for a cuda engine"),
])
def test_bad_header_leaves_nothing_behind(tmp_path, over, message):
    with pytest.raises(WorkbenchError, match=message):
        save_engine(tmp_path / "x.engine", _header(**over), _tensors())
    assert list(tmp_path.iterdir()) == []


def _failing_writer(tensors, filename, metadata=None):
    with open(filename, "wb") as f:
        f.write(b"half an engine")
    raise OSError(28, "No space left on device")


def test_failed_write_leaves_no_file_and_no_temp_file(tmp_path, monkeypatch):
    monkeypatch.setattr(ef, "save_file", _failing_writer)
    with pytest.raises(WorkbenchError, match=r"x\.engine: cannot write the engine: .*No space left on device"):
        save_engine(tmp_path / "x.engine", _header(), _tensors())
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_the_previous_engine(engine, monkeypatch):
    monkeypatch.setattr(ef, "save_file", _failing_writer)
    with pytest.raises(WorkbenchError, match="cannot write the engine"):
        save_engine(engine, _header(build_seconds=99.0), {"w": torch.ones(2)})
    assert sorted(p.name for p in engine.parent.iterdir()) == ["model.engine"]
    header, tensors = load_engine(engine)
    assert header == _header()
    _assert_same_tensors(tensors, _tensors())


def test_interrupted_write_leaves_nothing_behind(tmp_path, monkeypatch):
    def interrupted(tensors, filename, metadata=None):
        raise KeyboardInterrupt
    monkeypatch.setattr(ef, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_engine(tmp_path / "x.engine", _header(), _tensors())
    assert list(tmp_path.iterdir()) == []


def test_header_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        _header().device = "cuda"
