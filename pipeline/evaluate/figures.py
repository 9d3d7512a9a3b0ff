"""The report's PNG figures (matplotlib, no display): one function per figure."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import numpy as np
from matplotlib import pyplot as plt
from matplotlib.figure import Figure

from pipeline.evaluate.analyses import DeterioratedSet, curve_points
from pipeline.evaluate.tsne import TsnePoints, point_style


def plain_text() -> contextlib.AbstractContextManager:
    """Text made inside it is drawn as written: a ``$`` in a dataset or head name is no math
    expression (``cars $5$ and $x_$`` failed the report after all the work)."""
    return matplotlib.rc_context({"text.parse_math": False})


def png(fig: Figure, *, dpi: int = 100) -> bytes:
    """``fig`` as PNG bytes; frees it."""
    fig.tight_layout()
    data = io.BytesIO()
    fig.savefig(data, format="png", dpi=dpi)
    plt.close(fig)
    return data.getvalue()


def r_auroc_bars(datasets: Sequence[dict[str, Any]], sources: Sequence[str]) -> Figure:
    """R-AUROC per dataset (groups) and source (bars), chance at 0.5 (paper, figure 1)."""
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(datasets) * len(sources) / 4), 3.6))
    width = 0.8 / len(sources)
    for i, source in enumerate(sources):
        values = [d["sources"][source]["r_auroc"] for d in datasets]
        heights = [np.nan if v is None else v for v in values]
        ax.bar(np.arange(len(datasets)) + i * width, heights, width, label=source)
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.set_xticks(np.arange(len(datasets)) + 0.4 - width / 2, [d["name"] for d in datasets])
    ax.set_ylabel("R-AUROC")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, ncol=2)
    return fig


def _histograms(ax: Any, groups: dict[str, np.ndarray]) -> None:
    values = np.concatenate([v[np.isfinite(v)] for v in groups.values()])
    bins = np.histogram_bin_edges(values, bins=40) if len(values) else 10
    for label, v in groups.items():
        finite = v[np.isfinite(v)]
        if len(finite):  # an empty group has no density (numpy divided by zero)
            ax.hist(finite, bins=bins, density=True, histtype="step", label=label)


def distributions(groups_by_source: dict[str, dict[str, np.ndarray]], *, title: str) -> Figure:
    """Overlaid uncertainty histograms per source (figure 8: ID vs OOD; figure 7: ambiguity)."""
    fig, axes = plt.subplots(
        1, len(groups_by_source), figsize=(3.2 * len(groups_by_source), 3), squeeze=False
    )
    for ax, (source, groups) in zip(axes[0], groups_by_source.items(), strict=True):
        _histograms(ax, groups)
        ax.set_title(source, fontsize=9)
        ax.set_xlabel("uncertainty")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return fig


def deterioration(
    sets: Sequence[DeterioratedSet], curves: dict[str, Any], sources: Sequence[str]
) -> Figure:
    """Uncertainty of ``sources`` per deterioration strength: boxes and the median curve
    (figure 6); one row per source, one column per kind."""
    kinds = list(curves)
    fig, axes = plt.subplots(
        len(sources), len(kinds), figsize=(3 * len(kinds), 2.4 * len(sources)), squeeze=False
    )
    for col, kind in enumerate(kinds):
        strengths = curves[kind]["strengths"]
        points = curve_points(sets, kind)
        for row, source in enumerate(sources):
            ax = axes[row][col]
            ax.boxplot(
                [p.scores[source][np.isfinite(p.scores[source])] for p in points],
                positions=range(len(points)),
                showfliers=False,
            )
            ax.plot(range(len(points)), curves[kind]["sources"][source]["median"], "r.-")
            ax.set_xticks(range(len(points)), [f"{s:g}" for s in strengths], fontsize=7)
            rho = curves[kind]["sources"][source]["spearman"]
            ax.set_title(f"{kind} / {source} (rho {_fmt(rho)})", fontsize=8)
    return fig


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def uncertainty_map(points: TsnePoints, *, title: str) -> Figure:
    """The t-SNE map: one colour per class, size and transparency by uncertainty."""
    area, alpha = point_style(points.uncertainty)
    classes = np.unique(points.labels)
    colours = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    fig, ax = plt.subplots(figsize=(7, 6))
    for i, label in enumerate(classes):
        mine = points.labels == label
        rgba = np.tile(colours(i % colours.N), (mine.sum(), 1))
        rgba[:, 3] = alpha[mine]
        ax.scatter(*points.xy[mine].T, s=area[mine], c=rgba, label=str(label), linewidths=0)
    legend = ax.legend(title="label", fontsize=8)
    for handle in legend.legend_handles:  # not the class's first point's size and alpha
        handle.set_sizes([30])
        handle.set_alpha(1.0)
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    return fig
