"""The uncertainty head of appendix A and its two training objectives (eq. 2 and eq. 3/5)."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

LossName = Literal["ranking", "l2"]


@dataclass(frozen=True)
class HeadConfig:
    """Shape of the MLP: ``embedding_dim -> hidden... -> 1``, LeakyReLU between, Softplus out."""

    embedding_dim: int
    hidden: tuple[int, ...] = (512, 512)
    negative_slope: float = 0.01
    output: Literal["softplus", "identity"] = "softplus"
    softplus_beta: float = 1.0
    softplus_threshold: float = 20.0

    def __post_init__(self) -> None:
        if self.embedding_dim < 1:
            raise ValueError(f"embedding_dim must be >= 1, got {self.embedding_dim}")
        if any(width < 1 for width in self.hidden):
            raise ValueError(f"hidden widths must be >= 1, got {self.hidden}")


class UncertaintyHead(nn.Module):
    """u(e): one non-negative uncertainty per embedding (appendix A, widths configurable)."""

    def __init__(self, config: HeadConfig) -> None:
        super().__init__()
        self.config = config
        widths = [config.embedding_dim, *config.hidden]
        layers: list[nn.Module] = []
        for width_in, width_out in itertools.pairwise(widths):
            layers += [nn.Linear(width_in, width_out), nn.LeakyReLU(config.negative_slope)]
        layers.append(nn.Linear(widths[-1], 1))
        if config.output == "softplus":
            layers.append(nn.Softplus(config.softplus_beta, config.softplus_threshold))
        self.layers = nn.Sequential(*layers)

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        """Uncertainties ``(B,)`` for embeddings ``(B, D)``."""
        return self.layers(embedding).squeeze(-1)


def create_head(config: HeadConfig, *, seed: int) -> UncertaintyHead:
    """A freshly initialised head; the initial weights depend only on ``config`` and ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UncertaintyHead(config)


def ranking_loss(
    uncertainty: torch.Tensor, loss: torch.Tensor, *, margin: float = 0.1, leeway: float = 0.0
) -> torch.Tensor:
    """Pairwise ranking objective (eq. 3 with the leeway of eq. 5), mean over pairs.

    Consecutive rows ``(0, 1), (2, 3), ...`` form the pairs (an odd last row is unused). The
    sample with the higher task loss must get the higher uncertainty by ``margin``:
    ``max(0, m - s * (u1 - u2))`` with ``s = sign`` of the loss difference, and ``s = 0`` (no
    loss, no gradient) when the losses are within ``leeway`` of each other, ties included.
    Eq. 3 as printed, ``max(0, s * (u1 - u2 + m))``, has the sign of ``s`` flipped against the
    text; this follows the text (and Yoo & Kweon, 2019). Eq. 4 gives a tie ``s = -1``, an
    order the losses do not have (exact ties are common: saturated samples' float32
    cross-entropies are all 0); here a tied pair teaches nothing, and counts in the mean.
    """
    pairs = len(uncertainty) // 2
    if pairs == 0:
        return uncertainty.sum() * 0.0
    u = uncertainty[: 2 * pairs].view(pairs, 2)
    target = loss[: 2 * pairs].view(pairs, 2).to(u.dtype)
    gap = target[:, 0] - target[:, 1]
    sign = (gap > leeway).to(u.dtype) - (gap < -leeway).to(u.dtype)
    hinge = torch.clamp(margin - sign * (u[:, 0] - u[:, 1]), min=0.0)
    return (hinge * sign.abs()).mean()


def l2_loss(uncertainty: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
    """Loss prediction (eq. 2): mean squared error between uncertainty and task loss."""
    return F.mse_loss(uncertainty, loss.to(uncertainty.dtype))


def create_objective(
    name: LossName, *, margin: float = 0.1, leeway: float = 0.0
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The training objective ``(uncertainty, loss) -> scalar`` called ``name``."""
    if name == "ranking":
        if margin < 0 or leeway < 0:
            raise ValueError(f"margin and leeway must be >= 0, got {margin}, {leeway}")
        return lambda u, target: ranking_loss(u, target, margin=margin, leeway=leeway)
    if name == "l2":
        return l2_loss
    raise ValueError(f"unknown loss {name!r}: expected 'ranking' or 'l2'")
