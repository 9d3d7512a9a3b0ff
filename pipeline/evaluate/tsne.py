"""Uncertainty-aware t-SNE (paper, section 5.1 and figure 9): a PNG and an offline HTML page.

Points of chosen classes are embedded in 2-D with scikit-learn's t-SNE on their cosine
geometry; uncertain points are drawn larger and more transparent. The HTML page is one
self-contained SVG (no script, no network): hovering a point shows its key, label and
uncertainty.
"""

from __future__ import annotations

import html
from dataclasses import dataclass

import numpy as np
from scipy.stats import rankdata
from sklearn.manifold import TSNE
from threadpoolctl import threadpool_limits


@dataclass(frozen=True)
class TsnePoints:
    """The 2-D map of the chosen rows."""

    xy: np.ndarray
    keys: np.ndarray
    labels: np.ndarray
    uncertainty: np.ndarray


def pick_rows(
    labels: np.ndarray, classes: list[int] | None, *, max_classes: int, max_points: int, seed: int
) -> np.ndarray:
    """Rows of ``classes`` (default: the ``max_classes`` most frequent), at most ``max_points``."""
    if classes is None:
        values, counts = np.unique(labels, return_counts=True)
        classes = sorted(values[np.argsort(-counts, kind="stable")][:max_classes].tolist())
    rows = np.flatnonzero(np.isin(labels, classes))
    if len(rows) > max_points:
        rows = np.sort(np.random.default_rng(seed).choice(rows, max_points, replace=False))
    return rows


def tsne_map(unit: np.ndarray, *, seed: int = 0) -> np.ndarray:
    """2-D t-SNE coordinates of unit-norm rows (cosine geometry), deterministic in ``seed``.

    Runs on one thread: a few thousand points take seconds, while the OpenMP gradient's
    barriers stall for minutes when other work shares the cores.
    """
    perplexity = float(min(30, max(2, (len(unit) - 1) // 3)))
    tsne = TSNE(2, perplexity=perplexity, init="pca", metric="cosine", random_state=seed)
    with threadpool_limits(1):
        return tsne.fit_transform(unit.astype(np.float32))


def point_style(uncertainty: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Marker area and opacity per point from its uncertainty rank: uncertain = big and faint;
    equal uncertainties share their average rank, so they look alike."""
    rank = rankdata(np.nan_to_num(uncertainty, nan=np.inf), method="average") - 1
    level = rank / max(len(rank) - 1, 1)
    return 8 + 72 * level, 0.95 - 0.8 * level


PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf")  # fmt: skip


def html_page(points: TsnePoints, *, title: str) -> str:
    """A self-contained HTML page: the map as inline SVG, a tooltip per point."""
    area, alpha = point_style(points.uncertainty)
    size, pad = 640.0, 20.0
    low, high = points.xy.min(axis=0), points.xy.max(axis=0)
    scaled = pad + (points.xy - low) / np.maximum(high - low, 1e-9) * (size - 2 * pad)
    classes = {label: i for i, label in enumerate(np.unique(points.labels))}
    circles = []
    for i in np.argsort(-points.uncertainty, kind="stable"):  # faint big points underneath
        tip = (
            f"key: {points.keys[i]}\nlabel: {points.labels[i]}\n"
            f"uncertainty: {points.uncertainty[i]:.4g}"
        )
        colour = PALETTE[classes[points.labels[i]] % len(PALETTE)]
        circles.append(
            f'<circle cx="{scaled[i, 0]:.1f}" cy="{size - scaled[i, 1]:.1f}" '
            f'r="{np.sqrt(area[i]) / 2:.1f}" fill="{colour}" fill-opacity="{alpha[i]:.2f}">'
            f"<title>{html.escape(tip)}</title></circle>"
        )
    legend = " ".join(
        f'<span style="color:{PALETTE[i % len(PALETTE)]}">&#9679; {html.escape(str(label))}</span>'
        for label, i in classes.items()
    )
    return (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif} circle:hover{stroke:#000;stroke-width:1.5}</style>"
        f"</head><body><h2>{html.escape(title)}</h2>"
        "<p>Hover a point for its key, label and uncertainty. Larger, fainter points are more "
        f"uncertain.</p><p>{legend}</p>"
        f'<svg width="{size:.0f}" height="{size:.0f}" style="border:1px solid #ccc">'
        + "".join(circles)
        + "</svg></body></html>\n"
    )
