"""Helpers shared by test modules: a small real backbone and the unit settings around it."""

from __future__ import annotations

import torch

from pipeline.augment import TransformConfig, resolve_transform
from pipeline.backbone import Backbone, create_backbone_model, describe_backbone
from pipeline.unit import UnitRunner, UnitSettings

BACKBONE = "resnet10t"


def unit_settings(
    output: str, *, augment: str = "train", seed: int = 0, **overrides
) -> UnitSettings:
    """Settings for caching with random-weight ``BACKBONE`` at 32x32 into ``output``."""
    info = describe_backbone(BACKBONE, "random", input_size=(3, 32, 32))
    transform = resolve_transform(
        TransformConfig(augment=augment, input_size=(3, 32, 32)), info.data_config
    )
    provenance = {
        "schema_version": 1,
        "backbone": BACKBONE,
        "weights_digest": info.weights_digest,
        "embedding_dim": info.embedding_dim,
        "seed": seed,
        "transform": transform,
        "dtype": "float16",
    }
    return UnitSettings(
        output=output,
        seed=seed,
        batch_size=8,
        transform=transform,
        provenance=provenance,
        embedding_dim=info.embedding_dim,
        **overrides,
    )


def make_runner(output: str, *, augment: str = "train", seed: int = 0, **overrides) -> UnitRunner:
    """A ``UnitRunner`` on the CPU with :func:`unit_settings`."""
    settings = unit_settings(output, augment=augment, seed=seed, **overrides)
    model = create_backbone_model(BACKBONE, "random")
    return UnitRunner(Backbone(model, torch.device("cpu")), settings)
