"""Shared test fixtures: paths to ../shared and automatic skipping of CUDA tests on machines without a GPU."""
from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
MINILM = SHARED / "models" / "minilm-l6-h384-squad11"
DEV = SHARED / "data" / "squad" / "dev-v1.1.json"
TRAIN = SHARED / "data" / "squad" / "train-v1.1-explorer-reconstruction.json"


def pytest_collection_modifyitems(config, items):
    import torch

    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_shared = pytest.mark.skip(reason=f"needs {SHARED} (real SQuAD files and MiniLM model)")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)
        if "shared" in item.keywords and not MINILM.exists():
            item.add_marker(skip_shared)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own cache directory so caches never leak between tests or into ~/.cache."""
    monkeypatch.setenv("WORKBENCH_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors: one intra-op thread for the module (idle OpenMP workers spinning on a busy CPU made the QAT
    tests 3x slower); the setting is restored afterwards."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
