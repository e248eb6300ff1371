"""LayerNorm + INT8 codes (plugins/layernorm.py) at BERT's large-batch shapes: rows per program and warps per
program against the device's copy bandwidth. A measuring script for the device machine, not a test.

    python3 -m benchmarks.device_layernorm_explore [--shapes large-128x384 ...] [--codes-only] [--out layernorm.md]

The INT8 engines run this kernel twice per layer (the residual stream in FP16 and the next GEMM's codes from one
read); at BERT-large 128 x 384 each call moves 250 MB (read 100, write 100 + 50); with --codes-only the codes
alone, as -iln engines run it (150 MB). Timed as the engine runs it
(engines.tuning.time_ms: one call in a CUDA graph, median replay, L2 flushed); each variant's outputs are
compared with the default launch's, bit for bit and as the largest difference: the same math, but the sums' order
follows the launch layout (the plugin tests hold every launch to the float32 reference).
"""
from __future__ import annotations

import argparse
import os

import torch
import triton

from common.files import atomic_write_text
from engines.tuning import time_ms
from plugins.common import out_recip
from plugins.layernorm import default_launch, layernorm_quant

SHAPES = {"large-128x384": (128 * 384, 1024), "base-128x384": (128 * 384, 768), "large-1x128": (128, 1024)}
ROWS = (1, 2, 4, 8, 16)
WARPS = (1, 2, 4, 8, 16)


def explore(name: str, r: int, h: int, codes_only: bool = False) -> list[str]:
    g = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn(r, h, generator=g, device="cuda") * 3).half()
    w, b = torch.rand(h, generator=g, device="cuda") + 0.5, torch.randn(h, generator=g, device="cuda") * 0.1
    recip = out_recip(4.0 / 127)
    want = layernorm_quant(x, w, b, 1e-12, recip, codes_only=codes_only)
    moved = r * h * (2 + (0 if codes_only else 2) + 1)
    outputs = "INT8 codes" if codes_only else "FP16 + INT8 codes"
    copy_us = time_ms(lambda: x.clone()) * 1e3
    lines = ["", f"### {name}: {r} rows x {h}, FP16 in, {outputs} out ({moved / 1e6:.3g} MB moved)", "",
             f"Device copy of x (read + write {2 * r * h * 2 / 1e6:.0f} MB): {copy_us:.1f} us, "
             f"{2 * r * h * 2 / copy_us / 1e3:.0f} GB/s", "",
             "| rows per program | warps | us | GB/s | x default | same outputs |",
             "| --- | --- | --- | --- | --- | --- |"]
    results = []
    for rows in ROWS:
        for warps in WARPS:
            if rows * triton.next_power_of_2(h) < 32 * warps:  # fewer elements than threads
                continue

            def fn(rows=rows, warps=warps):
                return layernorm_quant(x, w, b, 1e-12, recip, rows_per_program=rows, num_warps=warps,
                                       codes_only=codes_only)
            try:
                got = fn()
                fp_same = codes_only or torch.equal(got[0], want[0])
                same = "yes" if fp_same and torch.equal(got[1], want[1]) else \
                    f"no: output {0 if codes_only else float((got[0].float() - want[0].float()).abs().max()):.1e}" \
                    f" apart, codes {int((got[1].int() - want[1].int()).abs().max())}"
                us = time_ms(fn) * 1e3
            except Exception as e:  # noqa: BLE001 (reported)
                lines.append(f"| {rows} | {warps} | failed: {type(e).__name__} | | | |")
                continue
            results.append((us, rows, warps, same))
    default = next(us for us, rows, warps, _ in results if (rows, warps) == default_launch(r, h))
    for us, rows, warps, same in sorted(results):
        lines.append(f"| {rows} | {warps} | {us:.1f} | {moved / us / 1e3:.0f} | {default / us:.2f}x | "
                     f"{same} |")
    return lines


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "layernorm.md"))
    ap.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    ap.add_argument("--codes-only", action="store_true", help="time the -iln launch: codes out, no FP16 output")
    args = ap.parse_args(argv)
    lines = [f"# LayerNorm + codes launch parameters: {torch.cuda.get_device_name()}, torch {torch.__version__}"]
    for name in args.shapes:
        r, h = SHAPES[name]
        part = explore(name, r, h, args.codes_only)
        print("\n".join(part), flush=True)
        lines += part
    atomic_write_text(args.out, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
