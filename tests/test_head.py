"""The head of appendix A, the ranking (eq. 3 + 5) and L2 (eq. 2) objectives, the schedule."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.head.model import (
    HeadConfig,
    UncertaintyHead,
    create_head,
    create_objective,
    l2_loss,
    ranking_loss,
)
from pipeline.head.train import ScheduleConfig, create_optimizer, learning_rate
from pipeline.head.validate import pair_accuracy, spearman


def test_head_is_appendix_a_mlp() -> None:
    head = UncertaintyHead(HeadConfig(embedding_dim=768))
    kinds = [type(layer) for layer in head.layers]
    assert kinds == [nn.Linear, nn.LeakyReLU, nn.Linear, nn.LeakyReLU, nn.Linear, nn.Softplus]
    shapes = [tuple(layer.weight.shape) for layer in head.layers if isinstance(layer, nn.Linear)]
    assert shapes == [(512, 768), (512, 512), (1, 512)]
    assert head.layers[1].negative_slope == 0.01
    assert (head.layers[5].beta, head.layers[5].threshold) == (1.0, 20.0)
    u = head(torch.randn(7, 768))
    assert u.shape == (7,) and (u > 0).all()


def test_head_widths_and_depth_configurable() -> None:
    head = UncertaintyHead(HeadConfig(embedding_dim=16, hidden=(8,), output="identity"))
    assert [type(layer) for layer in head.layers] == [nn.Linear, nn.LeakyReLU, nn.Linear]
    deep = UncertaintyHead(HeadConfig(embedding_dim=16, hidden=(32, 32, 32)))
    assert sum(isinstance(layer, nn.Linear) for layer in deep.layers) == 4
    with pytest.raises(ValueError, match="hidden"):
        HeadConfig(embedding_dim=16, hidden=(0,))


def test_initialisation_depends_only_on_seed() -> None:
    config = HeadConfig(embedding_dim=16, hidden=(8, 8))
    a, b, c = create_head(config, seed=1), create_head(config, seed=1), create_head(config, seed=2)
    for x, y, z in zip(a.parameters(), b.parameters(), c.parameters(), strict=True):
        assert torch.equal(x, y) and not torch.equal(x, z)


def _grad(u: list[float], loss: list[float], **kwargs: float) -> tuple[float, list[float]]:
    pred = torch.tensor(u, requires_grad=True)
    value = ranking_loss(pred, torch.tensor(loss), **kwargs)
    value.backward()
    return float(value.detach()), pred.grad.tolist()


def test_ranking_loss_pushes_the_higher_loss_up_by_the_margin() -> None:
    # sample 0 has the higher task loss: it must get the higher uncertainty
    value, grad = _grad([0.0, 0.0], [2.0, 1.0])
    assert value == pytest.approx(0.1)
    assert grad[0] < 0 < grad[1], "descent raises u of the higher-loss sample"
    value, grad = _grad([0.5, 0.3], [2.0, 1.0])  # ordered right, by more than the margin
    assert value == 0.0 and grad == [0.0, 0.0]
    value, _ = _grad([0.3, 0.5], [2.0, 1.0])  # ordered wrong
    assert value == pytest.approx(0.3)
    value, _ = _grad([0.3, 0.5], [1.0, 2.0], margin=0.5)
    assert value == pytest.approx(0.3)


def test_ranking_loss_pairs_consecutive_rows_and_averages_over_pairs() -> None:
    value, grad = _grad([0.0, 0.0, 1.0, 0.0, 7.0], [1.0, 2.0, 1.0, 0.0, 9.0])
    # pair (0,1): wrong order -> 0.1; pair (2,3): right order by 1.0 -> 0; row 4 has no partner
    assert value == pytest.approx(0.05)
    assert grad == pytest.approx([0.5, -0.5, 0.0, 0.0, 0.0])


def test_ties_and_pairs_within_leeway_give_no_gradient() -> None:
    value, grad = _grad([0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 3.0, 3.0])
    assert value == 0.0 and grad == [0.0] * 4
    value, grad = _grad([0.0, 0.0, 0.0, 0.0], [1.0, 1.05, 1.0, 1.5], leeway=0.1)
    assert grad[:2] == [0.0, 0.0] and grad[2] > 0 > grad[3]
    assert value == pytest.approx(0.05)


def test_single_row_gives_zero_loss() -> None:
    value, grad = _grad([1.0], [1.0])
    assert value == 0.0 and grad == [0.0]


def test_l2_objective_is_eq_2() -> None:
    u, target = torch.tensor([1.0, 2.0]), torch.tensor([0.0, 4.0])
    assert float(l2_loss(u, target)) == pytest.approx((1 + 4) / 2)
    assert create_objective("l2") is l2_loss
    with pytest.raises(ValueError, match="unknown loss"):
        create_objective("hinge")  # type: ignore[arg-type]


def test_schedule_is_appendix_a() -> None:
    s = ScheduleConfig()
    lrs = [learning_rate(e, s) for e in range(s.episodes)]
    assert lrs[0] == pytest.approx(1e-4)
    assert lrs[25] == pytest.approx(2.8e-3) and max(lrs) == lrs[25]
    assert lrs[12] == pytest.approx(1e-4 + 12 / 25 * (2.8e-3 - 1e-4))
    assert all(a > b for a, b in itertools.pairwise(lrs[25:]))
    assert 1e-8 < lrs[-1] < 1e-6
    assert learning_rate(25 + 435 // 2, s) == pytest.approx((2.8e-3 + 1e-8) / 2, rel=1e-2)
    with pytest.raises(ValueError, match="warmup_episodes"):
        ScheduleConfig(episodes=5, warmup_episodes=5)


def test_optimizer_is_adamw_without_decay_on_biases() -> None:
    head = UncertaintyHead(HeadConfig(embedding_dim=8))
    optimizer = create_optimizer(head, ScheduleConfig())
    assert isinstance(optimizer, torch.optim.AdamW)
    decayed, plain = optimizer.param_groups
    assert decayed["weight_decay"] == 1e-4 and plain["weight_decay"] == 0.0
    assert decayed["betas"] == (0.8, 0.95)
    assert all(p.ndim == 2 for p in decayed["params"]) and all(p.ndim == 1 for p in plain["params"])
    assert len(decayed["params"]) + len(plain["params"]) == len(list(head.parameters()))


def test_validation_metrics() -> None:
    rng = np.random.default_rng(0)
    loss = rng.random(1001)
    assert pair_accuracy(loss, loss) == 1.0
    assert pair_accuracy(-loss, loss) == 0.0
    assert pair_accuracy(np.zeros_like(loss), loss) == 0.5
    assert 0.45 < pair_accuracy(rng.random(1001), loss) < 0.55
    assert spearman(loss**3, loss) == pytest.approx(1.0)
    assert math.isnan(spearman(np.ones(5), np.arange(5.0)))
    assert math.isnan(pair_accuracy(np.arange(4.0), np.ones(4)))
