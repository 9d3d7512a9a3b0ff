"""Validation metrics of an uncertainty head: pair-ordering accuracy and Spearman correlation."""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import stats

from pipeline.head.model import UncertaintyHead

_PAIR_SEED = 0x9A1


def pair_accuracy(uncertainty: np.ndarray, loss: np.ndarray, *, seed: int = _PAIR_SEED) -> float:
    """Share of pairs whose uncertainties are ordered like their losses.

    Pairs are consecutive rows of a fixed permutation (as in training); pairs with equal loss
    are left out, equal uncertainties count half. NaN when no pair is left.
    """
    order = np.random.default_rng(seed).permutation(len(loss))
    pairs = len(order) // 2
    first, second = order[: 2 * pairs : 2], order[1 : 2 * pairs : 2]
    gap_loss = loss[first] - loss[second]
    gap_u = uncertainty[first] - uncertainty[second]
    valid = gap_loss != 0
    if not valid.any():
        return math.nan
    agree = np.sign(gap_u[valid]) * np.sign(gap_loss[valid])
    return float(np.mean((agree + 1.0) / 2.0))


def spearman(uncertainty: np.ndarray, loss: np.ndarray) -> float:
    """Spearman rank correlation between uncertainty and loss (NaN if either is constant)."""
    if len(loss) < 2 or np.ptp(uncertainty) == 0 or np.ptp(loss) == 0:
        return math.nan
    return float(stats.spearmanr(uncertainty, loss).statistic)


@torch.inference_mode()
def predict(head: UncertaintyHead, embedding: torch.Tensor, *, batch: int = 65_536) -> np.ndarray:
    """Uncertainties of ``head`` for every row of ``embedding`` as float64 numpy."""
    device = next(head.parameters()).device
    was_training = head.training
    head.eval()
    parts = [
        head(embedding[i : i + batch].to(device, torch.float32)).double().cpu()
        for i in range(0, len(embedding), batch)
    ]
    head.train(was_training)
    return torch.cat(parts).numpy() if parts else np.empty(0)


def validation_metrics(
    head: UncertaintyHead, embedding: torch.Tensor, loss: torch.Tensor
) -> dict[str, float]:
    """``val_pair_accuracy`` and ``val_spearman`` of ``head`` on held-out rows."""
    if len(loss) == 0:
        return {"val_pair_accuracy": math.nan, "val_spearman": math.nan}
    u = predict(head, embedding)
    target = loss.double().numpy()
    return {"val_pair_accuracy": pair_accuracy(u, target), "val_spearman": spearman(u, target)}
