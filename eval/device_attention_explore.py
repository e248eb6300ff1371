"""Padded-batch attention without a float bias: which fused kernels take BERT's padding mask as sequence lengths,
how fast they are against SDPA with the bias, and whether they are right. A measuring script for the device
machine, not a test.

    python3 -m eval.device_attention_explore [--out attention.md]

The engine pads every batch to its profile's shape; a key at a padded position must get no weight. SDPA takes
that as a float bias added to the scores, which keeps it off the fastest kernels. The variable-length kernels
take cumulative offsets instead; cutting each padded row of the batch into two sequences, its real tokens and its
padding (offsets 0, len0, S, S + len1, 2S, ...), gives real queries exactly the real keys, with the tensors left
where the QKV GEMM wrote them. Timed as the engine runs it (engines.tuning.time_ms: graph replay, median);
checked against float32 attention with the mask, on real query rows. Our own kernel (plugins/attention.py) runs
in each of its configurations, with the padding bias and without a mask, reading Q, K, V from the QKV output as
the engine does.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F

from engines.tuning import time_ms

SHAPES = {"large-1x128": (1, 128, 16), "large-128x384": (128, 384, 16), "base-1x128": (1, 128, 12),
          "base-128x384": (128, 384, 12)}
D = 64


def split_offsets(lengths: torch.Tensor, s: int) -> torch.Tensor:
    """int32 [2b + 1]: each row's real tokens, then its padding, as consecutive sequences."""
    b = lengths.numel()
    starts = torch.arange(b, device=lengths.device, dtype=torch.int32) * s
    cuts = torch.stack([starts, starts + lengths.int()], 1).view(-1)
    return torch.cat([cuts, torch.tensor([b * s], device=lengths.device, dtype=torch.int32)])


def variants(qkv, lengths, b, s, h):
    """name -> zero-argument call returning [b*s, h, D] (qkv: [b*s, 3, h, D], the QKV output)."""
    from plugins.attention import CANDIDATE_CONFIGS, fused_attention

    q, k, v = qkv.unbind(1)
    scale = D ** -0.5
    mask = torch.arange(s, device=q.device)[None, :] < lengths[:, None]
    bias = ((~mask).half() * torch.finfo(torch.float16).min)[:, None, None, :]
    as4 = lambda t: t.view(b, s, h, D).transpose(1, 2)  # noqa: E731
    back = lambda o: o.transpose(1, 2).reshape(b * s, h, D)  # noqa: E731
    cu = split_offsets(lengths, s)
    cu_rows = torch.arange(b + 1, device=q.device, dtype=torch.int32) * s
    used = lengths.int()
    out = {
        "sdpa, float bias (engine today)": lambda: back(F.scaled_dot_product_attention(as4(q), as4(k), as4(v),
                                                                                      attn_mask=bias)),
        "sdpa, no mask (floor; ignores padding)": lambda: back(F.scaled_dot_product_attention(as4(q), as4(k),
                                                                                             as4(v))),
        "cudnn varlen, split rows": lambda: torch.ops.aten._cudnn_attention_forward(
            q, k, v, None, cu, cu, s, s, False, 0.0, False, False, scale=scale)[0],
        "cudnn varlen, split rows, contiguous q k v": lambda: torch.ops.aten._cudnn_attention_forward(
            q.contiguous(), k.contiguous(), v.contiguous(), None, cu, cu, s, s, False, 0.0, False, False,
            scale=scale)[0],
        "flash varlen, split rows": lambda: torch.ops.aten._flash_attention_forward(
            q, k, v, cu, cu, s, s, 0.0, False, False, scale=scale)[0],
        "flash varlen, seqused_k": lambda: torch.ops.aten._flash_attention_forward(
            q, k, v, cu_rows, cu_rows, s, s, 0.0, False, False, scale=scale, seqused_k=used)[0],
        "efficient varlen, split rows": lambda: torch.ops.aten._efficient_attention_forward(
            q[None], k[None], v[None], None, cu, cu, s, s, 0.0, 0, False, scale=scale)[0][0],
    }
    rows = qkv.view(b * s, 3 * h * D)
    key_bias = bias.view(b, s).contiguous()
    for c in CANDIDATE_CONFIGS:
        out[f"ours {c.name}, float bias"] = lambda c=c: fused_attention(rows, b, h, key_bias, config=c).view(b * s,
                                                                                                          h, D)
        out[f"ours {c.name}, no mask (ignores padding)"] = lambda c=c: fused_attention(rows, b, h, config=c).view(
            b * s, h, D)
    return out, mask


def reference(q, k, v, mask, b, s, h):
    qf, kf, vf = (t.float().view(b, s, h, D).transpose(1, 2) for t in (q, k, v))
    scores = qf @ kf.transpose(-1, -2) * D ** -0.5
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    return (scores.softmax(-1) @ vf).transpose(1, 2).reshape(b * s, h, D)


def explore(name: str, b: int, s: int, h: int) -> list[str]:
    g = torch.Generator(device="cuda").manual_seed(0)
    qkv = torch.randn(b * s, 3, h, D, generator=g, device="cuda").half()
    q, k, v = qkv.unbind(1)
    lengths = torch.randint(s // 2, s + 1, (b,), generator=g, device="cuda")
    lengths[0] = s  # one full row, one (at least) with padding
    if b > 1:
        lengths[1] = s // 3
    calls, mask = variants(qkv, lengths, b, s, h)
    ref = reference(q, k, v, mask, b, s, h)
    real = mask.view(-1)
    flops = 4 * b * h * s * s * D
    lines = ["", f"### {name}: b={b} s={s} heads={h} d={D}, real lengths {int(lengths.min())}-{int(lengths.max())}",
             "", "| kernel | us | TFLOP/s (padded) | max abs error, real rows | x engine today |",
             "| --- | --- | --- | --- | --- |"]
    base = None
    for label, fn in calls.items():
        try:
            err = float((fn().float()[real] - ref[real]).abs().max())
            us = time_ms(fn, rep=100) * 1e3
        except Exception as e:  # noqa: BLE001 (reported: which kernels run here is the question)
            lines.append(f"| {label} | failed: {type(e).__name__}: {str(e).splitlines()[0][:90]} | | | |")
            continue
        base = base or us
        lines.append(f"| {label} | {us:.1f} | {flops / us / 1e6:.0f} | {err:.1e} | {base / us:.2f}x |")
    return lines


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "attention.md"))
    args = ap.parse_args(argv)
    lines = [f"# Attention kernels with padding: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
             f"cuDNN {torch.backends.cudnn.version()}"]
    for name, (b, s, h) in SHAPES.items():
        rows = explore(name, b, s, h)
        print("\n".join(rows), flush=True)
        lines += rows
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
