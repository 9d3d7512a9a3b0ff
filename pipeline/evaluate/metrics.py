"""Recall@1 and R-AUROC exactly as the report defines them (AUROC from scikit-learn)."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score


def neighbour_correct(
    labels: np.ndarray, index: np.ndarray, queries: np.ndarray | None = None
) -> np.ndarray:
    """True where a query's 1-NN exists and has the query's label.

    ``index[i]`` is the neighbour row of query row ``queries[i]`` (default: of row ``i``).
    """
    own = labels if queries is None else labels[queries]
    found = index >= 0
    correct = np.zeros(len(index), bool)
    correct[found] = labels[index[found]] == own[found]
    return correct


def recall_at_1(labels: np.ndarray, index: np.ndarray) -> float:
    """Leave-one-out 1-NN accuracy: share of queries whose neighbour has their label."""
    return float(neighbour_correct(labels, index).mean()) if len(index) else float("nan")


def auroc(positive: np.ndarray, score: np.ndarray) -> float | None:
    """AUROC of ``score`` ranking ``positive`` rows first; None unless both classes occur."""
    positive = np.asarray(positive, bool)
    if positive.all() or not positive.any():
        return None
    return float(roc_auc_score(positive, score))


def r_auroc(uncertainty: np.ndarray, correct: np.ndarray) -> float | None:
    """R-AUROC: AUROC of ``-uncertainty`` against "the 1-NN has the same label"."""
    return auroc(correct, -np.asarray(uncertainty, np.float64))
