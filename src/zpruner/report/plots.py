"""The report's PNG figures (matplotlib, imported when a figure is drawn): Table 1 as bars,
perplexity versus unstructured sparsity and versus calibration samples."""
from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from .grouping import Group, Setting, calibration_series, headline_settings


def _line_plot(series: dict[str, dict[float, list[float]]], dense: list[float], xlabel: str, ylabel: str,
               x_log2: bool = False):
    """Mean ± std per x, log y, dense as a dashed line; a matplotlib Figure (no pyplot, no display)."""
    import matplotlib
    from matplotlib import ticker
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.add_subplot()
    # tab20 beyond 10 lines: the default cycle repeats its 10 colours
    ax.set_prop_cycle(color=[matplotlib.colormaps["tab10" if len(series) <= 10 else "tab20"](i % 20)
                             for i in range(len(series))] or ["C0"])
    for name, points in series.items():
        xs = sorted(points)
        means = [statistics.fmean(points[x]) for x in xs]
        stds = [statistics.stdev(points[x]) if len(points[x]) > 1 else 0.0 for x in xs]
        ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=name)
    if dense:
        ax.axhline(statistics.fmean(dense), linestyle="--", color="black", label="dense")
    ax.set_yscale("log")
    # plain numbers (60, 80, 100) read better than 6 × 10^1 on perplexity axes
    for axis_formatter in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
        axis_formatter(ticker.LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
    if x_log2:
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({x for points in series.values() for x in points}))
        ax.xaxis.set_major_formatter(ticker.ScalarFormatter())
        ax.xaxis.set_minor_locator(ticker.NullLocator())
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def _finite(values: Iterable[tuple[Any, float]]) -> list[float]:
    return [v for _, v in values if v is not None and math.isfinite(v)]


def plot_ppl_by_pattern(group: Group):
    """Table 1 as grouped bars: perplexity (log) per method, one bar per 50 % / N:M setting,
    dense as a dashed line; None when the group has no pruned perplexity."""
    import matplotlib
    from matplotlib.figure import Figure

    settings = headline_settings(group)
    cells: dict[str, dict[Setting, list[float]]] = defaultdict(lambda: defaultdict(list))
    for e in sorted(group.entries, key=lambda e: e.order):
        if e.ppl is not None and math.isfinite(e.ppl) and e.setting in settings:
            cells[e.label][e.setting].append(e.ppl)
    if not cells:
        return None
    fig = Figure(figsize=(min(12.0, max(6.4, 0.3 * len(cells) * len(settings) + 1.5)), 4.4), layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / len(settings)
    colours = matplotlib.colormaps["tab10"]
    for j, setting in enumerate(settings):
        xs = [i + (j - (len(settings) - 1) / 2) * width for i in range(len(cells))]
        heights = [statistics.fmean(points[setting]) if points.get(setting) else 0.0 for points in cells.values()]
        ax.bar(xs, heights, width, label=setting.label, color=colours(j % 10))
    dense = _finite(group.dense)
    if dense:
        ax.axhline(statistics.fmean(dense), linestyle="--", color="black", label="dense")
    ax.set_yscale("log")
    ax.set_xticks(range(len(cells)), list(cells), rotation=30, ha="right")
    dataset = group.eval[0] if group.eval else ""
    ax.set_ylabel(f"{dataset} perplexity (log)")
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def plot_ppl_vs_sparsity(group: Group):
    """Perplexity versus unstructured sparsity, one line per method label; None below 2 sparsities."""
    series: dict[tuple, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for e in group.entries:
        if e.setting.nm is None and e.ppl is not None and math.isfinite(e.ppl):
            series[e.order, e.label][e.setting.sparsity * 100].append(e.ppl)
    # a method measured at one sparsity is a dot, not a curve: Table 1 has it
    series = {key: points for key, points in series.items() if len(points) >= 2}
    if not series:
        return None
    dataset = group.eval[0] if group.eval else ""
    return _line_plot({label: points for (_, label), points in sorted(series.items())}, _finite(group.dense),
                      "unstructured sparsity (%)", f"{dataset} perplexity (log)")


def plot_ppl_vs_calibration(group: Group):
    """Perplexity versus calibration samples, one line per method label and sparsity; None
    when nothing was measured with >= 2 sample counts."""
    series = {f"{label} {setting.label}": {n: _finite(values) for n, values in points.items()}
              for (_, label, setting), points in calibration_series(group).items()}
    series = {name: {n: v for n, v in points.items() if v} for name, points in series.items()}
    if not any(len(points) >= 2 for points in series.values()):
        return None
    dataset = group.eval[0] if group.eval else ""
    return _line_plot(series, _finite(group.dense), "calibration samples", f"{dataset} perplexity (log)",
                      x_log2=True)




def figures(groups: list[Group], calibration: list[Group]) -> dict[tuple[str, int], tuple[str, Any]]:
    """{(kind, group index): (file name, Figure)} of every plot the groups have data for;
    kind 'pattern' and 'sparsity' index ``groups``, 'calibration' indexes ``calibration``."""
    drawn = {}
    for kind, plot, group_list in (("pattern", plot_ppl_by_pattern, groups),
                                   ("sparsity", plot_ppl_vs_sparsity, groups),
                                   ("calibration", plot_ppl_vs_calibration, calibration)):
        for i, group in enumerate(group_list):
            figure = plot(group)
            if figure is not None:
                suffix = f"_{i + 1}" if len(group_list) > 1 else ""
                drawn[kind, i] = (f"ppl_{'by' if kind == 'pattern' else 'vs'}_{kind}{suffix}.png", figure)
    return drawn
