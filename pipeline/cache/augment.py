"""Augmented tensors: timm's train or eval transform, seeded per (seed, epoch, key).

Augmentation is a function, not a stream (docs/design.md 3.3).

An eval transform may start with a deterioration (``pipeline.cache.deteriorate``), recorded in
the transform config and so in the cache's provenance.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from timm.data import create_transform
from timm.data.transforms import MaybeToTensor
from torchvision import transforms

from pipeline.cache.deteriorate import Deterioration

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
    deteriorate: Deterioration | None = None
    #: ``pil``: Pillow decodes, PIL steps augment (on CPUs, in the actor or its decode pool);
    #: ``device``: JPEGs decoded and every image augmented on the backbone's device
    #: (``pipeline.cache.device_decode``), with no deterioration (a PIL step).
    decode: Literal["pil", "device"] = "pil"


def resolve_transform(config: TransformConfig, data_config: dict[str, Any]) -> dict[str, Any]:
    """``create_transform`` keyword arguments: ``config`` over the backbone's ``data_config``.

    The result is plain JSON and is what the cache's provenance records as its transform
    (``decode`` only when it is ``device``, so the PIL path's record is as it always was).
    """
    on_device = {"decode": "device"} if config.decode == "device" else {}

    def pick(name: str, fallback: Any = None) -> Any:
        value = getattr(config, name)
        return value if value is not None else data_config.get(name, fallback)

    if config.augment == "eval":
        interpolation = pick("interpolation", "bicubic")
    else:
        interpolation = config.interpolation or "random"
    if config.decode == "device":
        _refuse_on_tensors(interpolation)
    common = {
        "input_size": list(pick("input_size")),
        "mean": list(pick("mean")),
        "std": list(pick("std")),
    }
    if config.augment == "eval":
        resolved = {
            "is_training": False,
            **common,
            "interpolation": interpolation,
            "crop_pct": pick("crop_pct"),
            "crop_mode": pick("crop_mode", "center"),
            **on_device,
        }
        if config.deteriorate is not None:
            resolved["deterioration"] = config.deteriorate.model_dump()
        return resolved
    if config.deteriorate is not None:
        raise ValueError("a deterioration applies to the eval transform (--augment eval) only")
    return {
        "is_training": True,
        **common,
        "interpolation": interpolation,
        "scale": list(config.scale),
        "ratio": list(config.ratio),
        "hflip": config.hflip,
        "vflip": 0.0,
        "color_jitter": config.color_jitter,
        "color_jitter_prob": config.color_jitter_prob,
        **on_device,
    }


#: The resamplings torchvision runs on tensors (``random`` is timm's bilinear or bicubic).
_ON_TENSORS = frozenset({"nearest", "bilinear", "bicubic", "random"})


def _refuse_on_tensors(interpolation: str) -> None:
    """Refuse, before any image, a resampling ``--decode device`` cannot run: every chunk's
    resize would fail."""
    if interpolation not in _ON_TENSORS:
        raise ValueError(
            f"--decode device resizes tensors, and torchvision has no {interpolation!r} "
            "resampling for them (the backbone's data config asks for it): use --decode pil"
        )


def build_transform(resolved: dict[str, Any]) -> Transform:
    """The torchvision/timm transform described by ``resolve_transform``'s output: timm's,
    preceded by the deterioration when there is one. It takes PIL images, and tensors too
    where it has no deterioration (``pipeline.cache.device_decode``)."""
    kwargs = dict(resolved)
    deteriorate = kwargs.pop("deterioration", None)
    kwargs.pop("decode", None)  # where the transform runs, not what it does
    for name in ("input_size", "mean", "std", "scale", "ratio"):
        if name in kwargs:
            kwargs[name] = tuple(kwargs[name])
    transform = create_transform(**kwargs)
    if deteriorate is None:
        return transform
    return transforms.Compose([Deterioration(**deteriorate), *transform.transforms])


def sample_seed(seed: int, epoch: int, key: str) -> int:
    """A 63-bit seed that is a pure function of (global seed, epoch, sample key)."""
    digest = hashlib.blake2b(f"{seed}\x00{epoch}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def augment(transform: Transform, image: Image.Image, seed: int) -> torch.Tensor:
    """Apply ``transform`` with Python's and torch's RNGs seeded to ``seed``.

    Both RNGs are process-global: call this from one thread per process. Only torch's CPU
    generator is seeded (the transforms draw from no other), not CUDA's as ``torch.manual_seed``
    would, which is slower and would touch the device from the decoding thread.
    """
    seed_rngs(seed)
    return transform(image)


def seed_rngs(seed: int) -> None:
    """Seed the RNGs the transforms draw from: Python's and torch's CPU generator."""
    random.seed(seed)
    torch.default_generator.manual_seed(seed)


@dataclass(frozen=True)
class SplitTransform:
    """timm's transform cut where the PIL steps end, so the tensor steps can run per batch.

    ``pil`` holds the (random) PIL steps, applied per image; the final ``ToTensor`` and
    ``Normalize`` are deterministic elementwise maps, applied by :meth:`to_tensor` to a whole
    uint8 batch at once with the same float32 operations in the same order (``div(255)``, then
    ``sub_(mean)``, then ``div_(std)``), so the result is bit-identical to the full transform
    applied image by image.
    """

    pil: transforms.Compose
    mean: torch.Tensor
    std: torch.Tensor

    def to_tensor(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``(N, H, W, C)`` -> normalized float32 ``(N, C, H, W)``, contiguous, on the
        device of ``images`` (move uint8 batches to a GPU first: a quarter of the bytes)."""
        tensor = images.permute(0, 3, 1, 2).contiguous().to(torch.float32).div(255)
        return tensor.sub_(self.mean.to(tensor.device)).div_(self.std.to(tensor.device))


def split_transform(transform: Transform) -> SplitTransform | None:
    """``transform`` as a :class:`SplitTransform`, or None when it does not end in PIL steps
    followed by exactly ``ToTensor`` and ``Normalize`` (then use :func:`augment` per image)."""
    steps = list(getattr(transform, "transforms", ()))
    if len(steps) < 2 or torch.get_default_dtype() != torch.float32:
        return None
    to_tensor, normalize = steps[-2:]
    if type(to_tensor) not in (MaybeToTensor, transforms.ToTensor):
        return None
    if type(normalize) is not transforms.Normalize or normalize.inplace:
        return None
    if any(isinstance(step, (MaybeToTensor, transforms.ToTensor)) for step in steps[:-2]):
        return None
    mean = torch.as_tensor(normalize.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.as_tensor(normalize.std, dtype=torch.float32).view(1, -1, 1, 1)
    if (std == 0).any():
        return None
    return SplitTransform(transforms.Compose(steps[:-2]), mean, std)


def augment_pil(split: SplitTransform, image: Image.Image, seed: int) -> np.ndarray:
    """The PIL steps of ``split`` seeded like :func:`augment`: a uint8 ``(H, W, C)`` array.

    Same RNG rules as :func:`augment` (the tensor steps draw no random numbers).
    """
    seed_rngs(seed)
    result = split.pil(image)
    if result.mode != "RGB":
        raise ValueError(f"the PIL steps must return RGB images, got mode {result.mode}")
    return np.asarray(result)
