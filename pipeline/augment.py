"""Augmented tensors: timm's train or eval transform, seeded per (seed, epoch, key) (DESIGN 3.3)."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from typing import Any, Literal

import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from timm.data import create_transform

Transform = Callable[[Image.Image], torch.Tensor]


class TransformConfig(BaseModel):
    """How images become tensors. ``None`` means "the backbone's own default" (timm data config)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    augment: Literal["train", "eval"] = "train"
    input_size: tuple[int, int, int] | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    interpolation: str | None = Field(
        default=None, description="train: 'random' (bilinear or bicubic); eval: the backbone's"
    )
    crop_pct: float | None = Field(default=None, gt=0, le=1)
    crop_mode: str | None = None
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = Field(default=0.5, ge=0, le=1)
    color_jitter: float = Field(default=0.4, ge=0)
    color_jitter_prob: float | None = Field(default=None, ge=0, le=1)


def resolve_transform(config: TransformConfig, data_config: dict[str, Any]) -> dict[str, Any]:
    """``create_transform`` keyword arguments: ``config`` over the backbone's ``data_config``.

    The result is plain JSON and is what the cache's provenance records as its transform.
    """

    def pick(name: str, fallback: Any = None) -> Any:
        value = getattr(config, name)
        return value if value is not None else data_config.get(name, fallback)

    common = {
        "input_size": list(pick("input_size")),
        "mean": list(pick("mean")),
        "std": list(pick("std")),
    }
    if config.augment == "eval":
        return {
            "is_training": False,
            **common,
            "interpolation": pick("interpolation", "bicubic"),
            "crop_pct": pick("crop_pct"),
            "crop_mode": pick("crop_mode", "center"),
        }
    return {
        "is_training": True,
        **common,
        "interpolation": config.interpolation or "random",
        "scale": list(config.scale),
        "ratio": list(config.ratio),
        "hflip": config.hflip,
        "vflip": 0.0,
        "color_jitter": config.color_jitter,
        "color_jitter_prob": config.color_jitter_prob,
    }


def build_transform(resolved: dict[str, Any]) -> Transform:
    """The torchvision/timm transform described by ``resolve_transform``'s output."""
    kwargs = dict(resolved)
    for name in ("input_size", "mean", "std", "scale", "ratio"):
        if name in kwargs:
            kwargs[name] = tuple(kwargs[name])
    return create_transform(**kwargs)


def sample_seed(seed: int, epoch: int, key: str) -> int:
    """A 63-bit seed that is a pure function of (global seed, epoch, sample key)."""
    digest = hashlib.blake2b(f"{seed}\x00{epoch}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def augment(transform: Transform, image: Image.Image, seed: int) -> torch.Tensor:
    """Apply ``transform`` with Python's and torch's RNGs seeded to ``seed``.

    Both RNGs are process-global: call this from one thread per process.
    """
    random.seed(seed)
    torch.manual_seed(seed)
    return transform(image)
