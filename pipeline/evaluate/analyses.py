"""The paper's aleatoric analyses (section 4.5): ID vs OOD (fig. 8), deterioration (fig. 6),
human ambiguity (fig. 7). Each takes uncertainties already computed per source."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import numpy as np
from scipy.stats import spearmanr

from pipeline.evaluate.metrics import auroc

REAL_LABELS = "_info/imagenet_real_labels.json"
REAL_KEY = re.compile(r"ILSVRC2012_val_(\d{8})")


def id_vs_ood(upstream: np.ndarray, downstream: np.ndarray) -> float | None:
    """AUROC of the uncertainty ranking downstream (OOD) rows above upstream (ID) rows.

    Near 0.5: the uncertainty does not react to novelty (no epistemic component).
    """
    positive = np.r_[np.zeros(len(upstream), bool), np.ones(len(downstream), bool)]
    return auroc(positive, np.r_[upstream, downstream])


@dataclass(frozen=True)
class DeterioratedSet:
    """Uncertainties of one deteriorated copy of a dataset: ``kind`` at ``strength``."""

    kind: str | None
    strength: float
    scores: dict[str, np.ndarray]


def deterioration_curves(sets: Sequence[DeterioratedSet]) -> dict[str, Any]:
    """Median uncertainty per strength and kind, and whether each curve rises.

    A set with ``kind`` None (clean images) is strength 0 of every kind; the sets at one
    strength (copies of several datasets) are pooled, as the paper's medians over datasets.
    ``rises`` is Spearman's rho of strength vs median > 0 (None with fewer than two strengths).
    """
    kinds = sorted({s.kind for s in sets if s.kind is not None})
    sources = list(sets[0].scores) if sets else []
    curves: dict[str, Any] = {}
    for kind in kinds:
        points = curve_points(sets, kind)
        entry: dict[str, Any] = {
            "strengths": [p.strength for p in points],
            "n": [len(next(iter(p.scores.values()))) for p in points],
            "sources": {},
        }
        for source in sources:
            medians = [float(np.median(p.scores[source])) for p in points]
            rho = _spearman(entry["strengths"], medians)
            entry["sources"][source] = {
                "median": medians,
                "spearman": rho,
                "rises": None if rho is None else rho > 0,
            }
        curves[kind] = entry
    return curves


def curve_points(sets: Sequence[DeterioratedSet], kind: str) -> list[DeterioratedSet]:
    """The points of ``kind``'s curve by strength, each the sets at that strength pooled; clean
    sets are strength 0."""
    groups: dict[float, list[DeterioratedSet]] = {}
    for s in sets:
        if s.kind is None or s.kind == kind:
            groups.setdefault(0.0 if s.kind is None else s.strength, []).append(s)
    return [
        DeterioratedSet(
            kind if strength else None,
            strength,
            {
                source: np.concatenate([s.scores[source] for s in group])
                for source in group[0].scores
            },
        )
        for strength, group in sorted(groups.items())
    ]


def _spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    if len(set(x)) < 2 or len(set(y)) < 2:
        return None
    return float(spearmanr(x, y).statistic)


def real_ambiguous(keys: Sequence[str]) -> np.ndarray | None:
    """ImageNet ReaL-H flags per key (True: not exactly one ReaL label), None if a key is not an
    ImageNet-1k validation file name (``ILSVRC2012_val_<8 digits>``).

    The labels are the ReaL file timm ships (``timm/data/_info/imagenet_real_labels.json``).
    """
    numbers = []
    for key in keys:
        match = REAL_KEY.search(str(key))
        if match is None:
            return None
        numbers.append(int(match.group(1)) - 1)
    real = json.loads(
        resources.files("timm.data").joinpath("_info/imagenet_real_labels.json").read_text()
    )
    if not all(0 <= number < len(real) for number in numbers):  # val_00000000 is none
        return None
    return np.array([len(real[i]) != 1 for i in numbers])
