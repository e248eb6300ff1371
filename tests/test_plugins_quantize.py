"""plugins.quantize: codes of strided views equal quant.quantizer's, laid out contiguously, to the last bit."""
from __future__ import annotations

import pytest
import torch

from quant.quantizer import quantize
from tests.test_plugins_common import DEVICE, gen, kernels, poison  # noqa: F401

Q = kernels("quantize")
common = kernels("common")


def views(seed, dtype):
    """The layouts the engine meets: attention context [B, heads, S, D] seen as [B, S, heads, D], Q/K/V heads
    sliced out of the fused QKV output, plain rows, and a few odd ones."""
    g = gen(seed)
    ctx = (torch.randn(2, 4, 9, 16, generator=g) * 2).to(dtype).to(DEVICE)
    qkv = (torch.randn(2, 9, 3, 4, 16, generator=g) * 2).to(dtype).to(DEVICE)
    rows = (torch.randn(37, 96, generator=g) * 2).to(dtype).to(DEVICE)
    return {
        "context": ctx.transpose(1, 2),
        "qkv-head": qkv.permute(2, 0, 3, 1, 4)[1],
        "contiguous": rows,
        "row-slice": rows[3:30:2, 8:72],
        "column-major": rows.t(),
        "expanded": rows[0].expand(5, 96),
        "5-d": qkv.permute(4, 2, 0, 3, 1),
        "1-d": rows[:, 5],
        "0-d": rows[1, 1],
    }


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_views_match_reference_exactly(dtype, poison):
    scale = 0.02
    recip = common.out_recip(scale)
    for name, x in views(seed=31 + (dtype == torch.float32), dtype=dtype).items():
        q = Q.quantize_rows(x, recip)
        assert q.shape == x.shape and q.is_contiguous() and q.dtype == torch.int8, name
        ref = Q.quantize_rows_reference(x, recip)
        assert torch.equal(q.cpu(), ref.cpu()), name
        assert torch.equal(ref, quantize(x.contiguous(), scale)), name


@pytest.mark.filterwarnings("ignore:overflow encountered")  # the interpreter's numpy: 3e38 * 2 -> inf, on purpose
def test_ties_round_half_to_even_and_clamp(poison):
    ties = torch.arange(-130, 130, dtype=torch.float32) + 0.5
    big = torch.tensor([1e10, -1e10, float("inf"), float("-inf"), 3e38, 2.0 ** 22 + 0.5, 0.0, -0.0])
    x = torch.cat([ties, big]).to(DEVICE)
    for recip in (1.0, 0.5, 2.0):  # powers of two keep x * recip exact, so the ties stay ties
        q = Q.quantize_rows(x, recip)
        assert torch.equal(q.cpu(), Q.quantize_rows_reference(x, recip).cpu())
    q = Q.quantize_rows(torch.tensor([0.5, 1.5, 2.5, -2.5, 126.5, 127.5], device=DEVICE), 1.0)
    assert q.tolist() == [0, 2, 2, -2, 126, 127]


def test_empty_and_integer_inputs():
    assert Q.quantize_rows(torch.zeros(0, 16, device=DEVICE), 1.0).shape == (0, 16)
    with pytest.raises(ValueError, match="floating"):
        Q.quantize_rows(torch.ones(3, 4, dtype=torch.int32), 1.0)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cuda_large(dtype, poison):
    g = gen(41)
    ctx = (torch.randn(32, 12, 384, 64, generator=g) * 2).to(dtype).cuda()
    rows = (torch.randn(8192, 1024, generator=g) * 2).to(dtype).cuda()
    recip = common.out_recip(0.02)
    for x in (ctx.transpose(1, 2), rows, rows[:, 256:768]):
        assert torch.equal(Q.quantize_rows(x, recip), Q.quantize_rows_reference(x, recip))
