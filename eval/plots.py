"""Plots of the eval report: F1 against latency (the Pareto front) and a layer × quantization-point heat-map.

matplotlib is imported inside each function and drives an Agg canvas directly (no pyplot, no global figure state),
so importing this module or `eval.report` costs nothing and plotting works without a display. Files are written
atomically, like every other workbench output.
"""
from __future__ import annotations

import math
import os
from typing import Sequence

from common.files import atomic_path
from eval.report import DEFAULT_MAX_F1_DROP, BuildResult, Profile, pareto_front, profile_label


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")  # the temporary name ends in .tmp: say the format


def pareto_plot(rows: Sequence[BuildResult], profile: Profile, chosen: BuildResult | None,
                path: str | os.PathLike, max_f1_drop: float = DEFAULT_MAX_F1_DROP) -> None:
    """Write `pareto_figure(...)` to `path` as a PNG (atomically)."""
    _save(pareto_figure(rows, profile, chosen, max_f1_drop), path)


def pareto_figure(rows: Sequence[BuildResult], profile: Profile, chosen: BuildResult | None,
                  max_f1_drop: float = DEFAULT_MAX_F1_DROP):
    """F1 (y) against median latency at `profile` (x), to see what each millisecond costs in accuracy.

    Every build timed at `profile` is a labelled point; the Pareto front (`eval.report.pareto_front`) is a step
    line through its highlighted points; the baseline's F1 and the budget line at baseline F1 − `max_f1_drop`
    bound the shaded band of acceptable builds; the chosen build is starred. The x axis is logarithmic when the
    latencies span more than 10x.
    """
    timed = [r for r in rows if r.latency_at(profile) is not None]
    if not timed:
        raise ValueError(f"no build was timed at {profile_label(profile)}")
    ms = {r.name: r.latency_at(profile).median_ms for r in timed}
    front = pareto_front(timed, profile)
    on_front = {r.name for r in front}
    baseline = next((r for r in rows if r.is_baseline), None)

    fig = _figure(10, 5.5)
    ax = fig.add_subplot()
    lo, hi = min(ms.values()), max(ms.values())
    if hi / lo > 10:
        ax.set_xscale("log")

    if baseline is not None:
        floor = baseline.f1 - max_f1_drop
        ax.axhspan(floor, baseline.f1, color="tab:green", alpha=0.08, zorder=0)
        ax.axhline(baseline.f1, color="tab:green", lw=1, ls=":", label=f"baseline F1 ({baseline.name})")
        ax.axhline(floor, color="tab:red", lw=1.2, ls="--", label=f"budget: baseline F1 − {max_f1_drop:g}")

    # The front as a step: at any latency the best reachable F1 is that of the last front point at or before it.
    xs = [ms[r.name] for r in front]
    ys = [r.f1 for r in front]
    ax.step(xs, ys, where="post", color="tab:blue", lw=1.5, alpha=0.8, label="Pareto front", zorder=2)

    others = [r for r in timed if r.name not in on_front]
    if others:
        ax.scatter([ms[r.name] for r in others], [r.f1 for r in others], s=36, color="tab:gray", zorder=3,
                   label="dominated build")
    ax.scatter(xs, ys, s=64, color="tab:blue", edgecolor="black", zorder=4, label="on the front")
    if baseline is not None and baseline.name in ms:
        ax.scatter([ms[baseline.name]], [baseline.f1], s=110, marker="s", facecolor="none",
                   edgecolor="tab:green", lw=2, zorder=5, label="baseline")
    for r in timed:
        ax.annotate(r.name, (ms[r.name], r.f1), textcoords="offset points", xytext=(6, 5), fontsize=8)
    if chosen is not None and chosen.name in ms:
        x, y = ms[chosen.name], chosen.f1
        ax.scatter([x], [y], s=260, marker="*", color="gold", edgecolor="black", zorder=6, label="chosen")
        ax.annotate(f"chosen: {chosen.name}\n{x:.3f} ms, F1 {y:.2f}", (x, y), textcoords="offset points",
                    xytext=(12, -28), fontsize=9, fontweight="bold",
                    arrowprops={"arrowstyle": "->", "color": "black", "lw": 0.8})

    n = timed[0].n_questions
    ax.set_title(f"F1 against median latency at {profile_label(profile)} ({n:,} questions)")
    ax.set_xlabel(f"median latency at {profile_label(profile)} (ms{', log scale' if hi / lo > 10 else ''})")
    ax.set_ylabel("F1")
    ax.margins(x=0.1, y=0.1)  # room for the labels of the extreme points
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)  # off the points
    return fig


def sensitivity_heatmap(matrix: Sequence[Sequence[float]], row_labels: Sequence[str], col_labels: Sequence[str],
                        path: str | os.PathLike, title: str, value_label: str = "F1 drop (points)",
                        worse: str = "high") -> None:
    """Write `heatmap_figure(...)` to `path` as a PNG (atomically)."""
    _save(heatmap_figure(matrix, row_labels, col_labels, title, value_label, worse), path)


def heatmap_figure(matrix: Sequence[Sequence[float]], row_labels: Sequence[str], col_labels: Sequence[str],
                   title: str, value_label: str = "F1 drop (points)", worse: str = "high"):
    """A heat-map (e.g. layers × quantization-point kinds, value = ΔF1) with each value written in its cell.

    `worse`: "high" when large values are losses (a drop), "low" when negative ones are (ΔF1). NaN cells are grey
    and empty: points that were not quantized. Any value on the better side of 0 (an accuracy gain) switches to a
    diverging map symmetric about 0 (blue gain, red loss), so a gain never looks like a small loss.
    """
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.colors import Normalize

    if worse not in ("high", "low"):
        raise ValueError(f"worse must be 'high' or 'low', got {worse!r}")
    data = np.asarray(matrix, dtype=float)
    if data.ndim != 2 or data.shape != (len(row_labels), len(col_labels)):
        raise ValueError(f"matrix of shape {data.shape} does not match {len(row_labels)} row labels "
                         f"x {len(col_labels)} column labels")
    masked = np.ma.masked_invalid(data)
    finite = data[np.isfinite(data)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if worse == "high" and lo >= 0:
        cmap, norm = colormaps["Reds"], Normalize(vmin=0.0, vmax=hi or 1.0)
    elif worse == "low" and hi <= 0:
        cmap, norm = colormaps["Reds_r"], Normalize(vmin=lo or -1.0, vmax=0.0)
    else:  # gains and losses: symmetric about 0, red for the loss side
        m = max(-lo, hi)
        cmap, norm = colormaps["RdBu_r" if worse == "high" else "RdBu"], Normalize(vmin=-m, vmax=m)
    cmap = cmap.with_extremes(bad="lightgray")  # NaN: not quantized

    rows, cols = data.shape
    fig = _figure(max(5.0, 1.0 * cols + 2.5), max(3.0, 0.42 * rows + 1.8))
    ax = fig.add_subplot()
    image = ax.imshow(masked, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
    fig.colorbar(image, ax=ax, shrink=0.9, label=value_label)
    ax.set_xticks(range(cols), labels=list(col_labels), rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(rows), labels=list(row_labels), fontsize=8)
    for i in range(rows):
        for j in range(cols):
            v = data[i, j]
            if math.isfinite(v):
                r, g, b, _ = cmap(norm(v))
                dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5
                ax.text(j, i, "0.00" if f"{v:.2f}" == "-0.00" else f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if dark else "black")
    ax.set_title(title + ("\n(grey: not quantized)" if not np.isfinite(data).all() else ""))
    return fig


__all__ = ["heatmap_figure", "pareto_figure", "pareto_plot", "sensitivity_heatmap"]
