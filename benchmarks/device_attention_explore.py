"""Padded-batch attention without a float bias: which fused kernels take BERT's padding mask as sequence lengths,
how fast they are against SDPA with the bias, and whether they are right. A measuring script for the device
machine, not a test.

    python3 -m benchmarks.device_attention_explore [--shapes large-128x384,...] [--configs +tma,128x] [--jobs 8]
                                                   [--out attention.md]

The engine pads every batch to its profile's shape; a key at a padded position must get no weight. SDPA takes
that as a float bias added to the scores, which keeps it off the fastest kernels. The variable-length kernels
take cumulative offsets instead; cutting each padded row of the batch into two sequences, its real tokens and its
padding (offsets 0, len0, S, S + len1, 2S, ...), gives real queries exactly the real keys, with the tensors left
where the QKV GEMM wrote them. Timed as the engine runs it (engines.tuning.time_ms: graph replay, median);
checked against float32 attention with the mask, on real query rows. Our own kernel (plugins/attention.py) runs
in each of its configurations, with the padding bias and without a mask, reading Q, K, V from the QKV output as
the engine does; its kernels are compiled first, each configuration in its own process, `--jobs` at a time
(Triton's disk cache passes them on), so the timing loop does not compile one after another. The -imh kernel's
configurations ("int8-attention:...") read Q, K and V quantized to INT8 (each section's max as its range) and
write an FP16 context, so their error column is INT8 attention's against float32, not a kernel's mistake.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

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


def our_configs(spec: str | None):
    """Our kernel's candidates whose name contains one of the comma-separated parts of `spec` (all without), and
    any part that is a whole configuration name (AttentionConfig.parse), candidate or not."""
    from plugins.attention import CANDIDATE_CONFIGS, INT8_CANDIDATE_CONFIGS, AttentionConfig

    tokens = [t.strip() for t in (spec or "").split(",") if t.strip()]
    named = [AttentionConfig.parse(t) for t in tokens if ":" in t]
    picked = [c for c in CANDIDATE_CONFIGS + INT8_CANDIDATE_CONFIGS
              if not tokens or any(t in c.name for t in tokens if ":" not in t)]
    return picked + [c for c in named if c not in picked]


def int8_inputs(qkv: torch.Tensor):
    """-imh inputs: Q, K, V codes [rows, 3 * h * D] (each section quantized with its max as range) and scales."""
    from quant.quantizer import quantize
    from plugins.attention import AttentionScales

    scales = [float(qkv[:, i].abs().max()) / 127 for i in range(3)]
    codes = torch.stack([quantize(qkv[:, i], sc) for i, sc in enumerate(scales)], 1)
    return codes.view(qkv.shape[0], -1), AttentionScales(*scales, probs=1 / 127)


def variants(qkv, lengths, b, s, h, configs):
    """name -> zero-argument call returning [b*s, h, D] (qkv: [b*s, 3, h, D], the QKV output)."""
    from plugins.attention import fused_attention, fused_attention_int8

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
    codes, scales = int8_inputs(qkv)

    def ours(c, key_bias):
        if c.int8:
            return lambda: fused_attention_int8(codes, b, h, scales, key_bias, config=c).view(b * s, h, D)
        return lambda: fused_attention(rows, b, h, key_bias, config=c).view(b * s, h, D)

    for c in configs:
        out[f"ours {c.name}, float bias"] = ours(c, key_bias)
        out[f"ours {c.name}, no mask (ignores padding)"] = ours(c, None)
    return out, mask


def reference(q, k, v, mask, b, s, h):
    qf, kf, vf = (t.float().view(b, s, h, D).transpose(1, 2) for t in (q, k, v))
    scores = qf @ kf.transpose(-1, -2) * D ** -0.5
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    return (scores.softmax(-1) @ vf).transpose(1, 2).reshape(b * s, h, D)


def explore(name: str, b: int, s: int, h: int, configs) -> list[str]:
    g = torch.Generator(device="cuda").manual_seed(0)
    qkv = torch.randn(b * s, 3, h, D, generator=g, device="cuda").half()
    q, k, v = qkv.unbind(1)
    lengths = torch.randint(s // 2, s + 1, (b,), generator=g, device="cuda")
    lengths[0] = s  # one full row, one (at least) with padding
    if b > 1:
        lengths[1] = s // 3
    calls, mask = variants(qkv, lengths, b, s, h, configs)
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


def _compile(name: str) -> None:
    """Child process: compile configuration `name` of our kernel, with and without the padding bias, into
    Triton's disk cache (every shape in SHAPES specializes alike: S, heads x D and the strides are multiples
    of 16, and S of every block size)."""
    from plugins.attention import AttentionConfig, fused_attention, fused_attention_int8

    qkv = torch.randn(128, 3, 16, D, device="cuda").half()
    codes, scales = int8_inputs(qkv)
    bias = torch.zeros(1, 128, device="cuda", dtype=torch.float16)
    config = AttentionConfig.parse(name)
    for key_bias in (None, bias):
        if config.int8:
            fused_attention_int8(codes, 1, 16, scales, key_bias, config=config)
        else:
            fused_attention(qkv.view(128, -1), 1, 16, key_bias, config=config)
    torch.cuda.synchronize()


def precompile(configs, jobs: int) -> None:
    def child(c):
        try:
            run = subprocess.run([sys.executable, "-m", "benchmarks.device_attention_explore", "--compile-one", c.name],
                                 capture_output=True, text=True, timeout=300)
            ok = run.returncode == 0 or (run.stderr.strip().splitlines() or ["failed"])[-1][:200]
        except subprocess.TimeoutExpired:
            ok = "still compiling after 300 s, stopped"
        print(f"compiled {c.name}: {'ok' if ok is True else ok}", flush=True)

    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(child, configs))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", help=f"comma-separated names from {', '.join(SHAPES)} (default: all)")
    ap.add_argument("--configs", help="comma-separated parts of our kernel's candidate names (default: all)")
    ap.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1),
                    help="processes compiling our kernels up front (0: compile as timed)")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "attention.md"))
    ap.add_argument("--compile-one", metavar="CONFIG", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.compile_one:
        return _compile(args.compile_one)
    shapes = [t.strip() for t in (args.shapes or ",".join(SHAPES)).split(",") if t.strip()]
    unknown = [t for t in shapes if t not in SHAPES]
    if unknown:
        raise SystemExit(f"--shapes: unknown {', '.join(unknown)}; known: {', '.join(SHAPES)}")
    configs = our_configs(args.configs)
    if args.jobs > 0:
        start = time.time()
        precompile(configs, args.jobs)
        print(f"compiled {len(configs)} configurations in {time.time() - start:.0f} s", flush=True)
    lines = [f"# Attention kernels with padding: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
             f"cuDNN {torch.backends.cudnn.version()}"]
    for name in shapes:
        b, s, h = SHAPES[name]
        rows = explore(name, b, s, h, configs)
        print("\n".join(rows), flush=True)
        lines += rows
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
