"""Plots of the eval report: what the Pareto plot and the sensitivity heat-map draw, and the PNG files."""
from __future__ import annotations

import math
import struct

import pytest

from eval.plots import heatmap_figure, pareto_figure, pareto_plot, sensitivity_heatmap
from eval.report import BuildResult, ProfileLatency, build_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def row(name: str, f1: float, ms: float, base: bool = False) -> BuildResult:
    return BuildResult(name, "fp16" if base else "int8 fp16", "-" if base else "max (100 q)", base, f1 - 9, f1, 250,
                       (ProfileLatency(64, 384, ms, ms * 1.2, 64 / (ms / 1e3)),))


ROWS = [row("fp16", 82.9, 20.0, base=True), row("int8", 82.2, 14.0), row("int8-iln", 81.0, 12.0),
        row("int8-slow", 80.0, 25.0)]


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def texts(ax) -> list[str]:
    return [t.get_text() for t in ax.texts]


def test_pareto_figure_draws_front_budget_and_choice():
    report = build_report(ROWS, 1.0)
    assert report.chosen.name == "int8"
    fig = pareto_figure(report.rows, report.profile, report.chosen, max_f1_drop=1.0)
    ax = fig.axes[0]
    assert ax.get_title() == "F1 against median latency at 64×384 (250 questions)"
    assert ax.get_xscale() == "linear"  # 12..25 ms: less than 10x
    labels = {line.get_label(): line for line in ax.get_lines()}
    step = labels["Pareto front"]
    assert list(step.get_xdata()) == [12.0, 14.0, 20.0] and list(step.get_ydata()) == [81.0, 82.2, 82.9]
    assert list(labels["budget: baseline F1 − 1"].get_ydata()) == pytest.approx([81.9, 81.9])
    assert list(labels["baseline F1 (fp16)"].get_ydata()) == pytest.approx([82.9, 82.9])
    names = texts(ax)
    assert {"fp16", "int8", "int8-iln", "int8-slow"} <= set(names)
    assert "chosen: int8\n14.000 ms, F1 82.20" in names
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert {"on the front", "dominated build", "baseline", "chosen"} <= set(legend)


def test_pareto_log_scale_when_latencies_spread_over_10x():
    rows = ROWS + [row("tiny", 70.0, 1.0)]
    fig = pareto_figure(rows, (64, 384), None)
    assert fig.axes[0].get_xscale() == "log"
    assert not any(t.startswith("chosen") for t in texts(fig.axes[0]))


def test_pareto_plot_writes_a_png(tmp_path):
    path = tmp_path / "plots" / "pareto.png"
    pareto_plot(ROWS, (64, 384), ROWS[1], path, max_f1_drop=1.0)
    assert png_size(path) == (1000, 550)
    assert path.stat().st_size > 10_000
    assert [p.name for p in path.parent.iterdir()] == ["pareto.png"]  # no temporary left


def test_pareto_plot_needs_a_timed_build(tmp_path):
    with pytest.raises(ValueError, match="no build was timed at 1×128"):
        pareto_plot(ROWS, (1, 128), None, tmp_path / "p.png")


def test_heatmap_writes_numbers_and_blanks_nan(tmp_path):
    matrix = [[0.12, -0.3, math.nan], [1.5, 0.0, 0.25]]
    fig = heatmap_figure(matrix, ["layer0", "layer1"], ["q", "probs", "fc2_in"], "F1 drop per point")
    ax, colorbar = fig.axes
    assert texts(ax) == ["0.12", "-0.30", "1.50", "0.00", "0.25"]  # the NaN cell has no number
    assert ax.get_title() == "F1 drop per point\n(grey: not quantized)"
    image = ax.get_images()[0]
    assert bool(image.get_array().mask[0, 2]) and not image.get_array().mask[0, 0]
    assert image.norm.vmin == -1.5 and image.norm.vmax == 1.5  # both signs: symmetric about 0
    assert [t.get_text() for t in ax.get_xticklabels()] == ["q", "probs", "fc2_in"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["layer0", "layer1"]

    path = tmp_path / "heat.png"
    sensitivity_heatmap(matrix, ["layer0", "layer1"], ["q", "probs", "fc2_in"], path, "F1 drop per point")
    width, height = png_size(path)
    assert width >= 500 and height >= 300 and path.stat().st_size > 5_000
    assert [p.name for p in tmp_path.iterdir()] == ["heat.png"]


def test_heatmap_colour_scale():
    fig = heatmap_figure([[0.5, 2.0]], ["layer0"], ["q", "k"], "drops", value_label="ΔF1")
    image = fig.axes[0].get_images()[0]
    assert (image.norm.vmin, image.norm.vmax) == (0.0, 2.0)  # losses only: from no loss to the largest
    assert image.cmap.name.startswith("Reds")
    assert fig.axes[0].get_title() == "drops" and fig.axes[1].get_ylabel() == "ΔF1"
    gains = heatmap_figure([[-0.5, -0.1]], ["layer0"], ["q", "k"], "gains").axes[0].get_images()[0]
    assert (gains.norm.vmin, gains.norm.vmax) == (-0.5, 0.5) and gains.cmap.name.startswith("RdBu_r")


def test_heatmap_shape_mismatch():
    with pytest.raises(ValueError, match="does not match 3 row labels x 2 column labels"):
        heatmap_figure([[1.0, 2.0]], ["a", "b", "c"], ["x", "y"], "t")
