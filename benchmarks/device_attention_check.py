"""Why a build leaves out every INT8 attention candidate: each candidate's context codes against the reference's,
at the builder's check (engines.tuning.agrees with plugins.attention.context_code_step), with one layer's scales
from a calibration cache. A diagnostic for the device machine, not a test.

    python -m benchmarks.device_attention_check CACHE [--shape 64x384] [--heads 12] [--layer 0]
"""
from __future__ import annotations

import argparse

import torch

from calib.cache import load_cache
from engines.tuning import agrees
from plugins.attention import (INT8_CANDIDATE_CONFIGS, AttentionScales, attention_int8_reference, context_code_step,
                               fused_attention_int8)
from quant.quantizer import scale_from_amax


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cache")
    ap.add_argument("--shape", default="64x384")
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--layer", type=int, default=0)
    args = ap.parse_args(argv)
    b, s = map(int, args.shape.split("x"))
    amax = {k: v.amax for k, v in load_cache(args.cache).ranges.items()}
    scale = {n: float(scale_from_amax(torch.tensor(amax[f"layer{args.layer}.{n}"]))) for n in
             ("q", "k", "v", "probs", "context")}
    sc = AttentionScales(scale["q"], scale["k"], scale["v"], scale["probs"])
    recip = 1.0 / scale["context"]
    step = context_code_step(sc, recip)
    print(f"scales {scale}; context code step {step}", flush=True)
    gen = torch.Generator(device="cuda").manual_seed(b * s)
    h, d = args.heads, args.hidden // args.heads
    uniform = torch.randint(-127, 128, (b * s, 3 * h * d), generator=gen, device="cuda", dtype=torch.int8)
    normal = (torch.randn(b * s, 3 * h * d, generator=gen, device="cuda") * 127 / 4).round().clamp(-127, 127)
    mask = torch.ones(b, s, device="cuda")
    mask[:, s - s // 4:] = 0.0
    bias = ((1.0 - mask) * torch.finfo(torch.float16).min).half().contiguous()
    for codes_name, codes in (("uniform", uniform), ("normal/4", normal.to(torch.int8))):
        for padded in (False, True):
            kb = bias if padded else None
            ref = attention_int8_reference(codes, b, h, sc, kb, out_recip=recip)
            for cfg in INT8_CANDIDATE_CONFIGS:
                try:
                    out = fused_attention_int8(codes, b, h, sc, kb, out_recip=recip, config=cfg)
                except Exception as e:  # noqa: BLE001 -- a diagnostic: say and go on
                    print(f"{codes_name} padded={padded} {cfg.name}: failed ({type(e).__name__}: {e})"[:200])
                    continue
                diff = (out.int() - ref.int()).abs()
                print(f"{codes_name} padded={padded} {cfg.name}: max diff {int(diff.max())}, differing "
                      f"{float((diff > 0).float().mean()):.2e}, > step {float((diff > step).float().mean()):.2e}, "
                      f"agrees {agrees(out, ref, max_step=step)}", flush=True)


if __name__ == "__main__":
    main()
