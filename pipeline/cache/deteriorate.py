"""Deliberately deteriorated images (paper figure 6): one kind at one strength, before the
model's own transform.

Strength runs from 0 (the image untouched) to 1 (the image's content all but gone); each kind
changes the image steadily over that range, so 0.25, 0.5, 0.75 and 1 are four distinct levels:

- ``blur``: Gaussian blur with a standard deviation of ``strength`` x 10% of the shorter side;
- ``box``: a mid-grey square centred on the image, covering ``strength`` of its area;
- ``zoom``: the centre crop keeping ``1 - 0.9 x strength`` of each side (the model's transform
  then resizes it back up);
- ``noise``: additive Gaussian noise with a standard deviation of ``strength`` x 128 grey
  levels, clipped to [0, 255], drawn from torch's generator (which ``pipeline.cache.augment``
  seeds per sample, so the noise is a pure function of the seed, epoch and key).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageFilter
from pydantic import BaseModel, ConfigDict, Field

Kind = Literal["blur", "box", "zoom", "noise"]
KINDS: tuple[str, ...] = Kind.__args__


class Deterioration(BaseModel):
    """One kind of deterioration at one strength in [0, 1]."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Kind
    strength: float = Field(ge=0, le=1)

    @classmethod
    def parse(cls, text: str, flag: str = "--deteriorate") -> Deterioration:
        """``KIND:STRENGTH`` (e.g. ``blur:0.5``); raises ``ValueError`` saying what is wrong,
        naming ``flag``."""
        kind, sep, strength = text.partition(":")
        if not sep or kind not in KINDS:
            raise ValueError(
                f"{flag} {text!r}: expected KIND:STRENGTH with KIND one of "
                f"{', '.join(KINDS)} and STRENGTH in [0, 1], e.g. blur:0.5"
            )
        try:
            value = float(strength)
        except ValueError:
            raise ValueError(f"{flag} {text!r}: {strength!r} is not a number") from None
        if not 0 <= value <= 1:
            raise ValueError(f"{flag} {text!r}: strength must be in [0, 1]")
        return cls(kind=kind, strength=value)

    def __call__(self, image: Image.Image) -> Image.Image:
        """``image`` (as RGB) deteriorated: a PIL transform step."""
        image = image.convert("RGB")
        if self.strength == 0:
            return image
        width, height = image.size
        if self.kind == "blur":
            sigma = self.strength * 0.1 * min(width, height)
            return image.filter(ImageFilter.GaussianBlur(sigma))
        if self.kind == "box":
            side = self.strength**0.5
            box_w, box_h = round(width * side), round(height * side)
            left, top = (width - box_w) // 2, (height - box_h) // 2
            image = image.copy()
            image.paste((128, 128, 128), (left, top, left + box_w, top + box_h))
            return image
        if self.kind == "zoom":
            keep = 1 - 0.9 * self.strength
            crop_w, crop_h = max(1, round(width * keep)), max(1, round(height * keep))
            left, top = (width - crop_w) // 2, (height - crop_h) // 2
            return image.crop((left, top, left + crop_w, top + crop_h))
        if self.kind == "noise":
            pixels = np.asarray(image, dtype=np.float32)
            noise = torch.randn(pixels.shape).numpy() * (self.strength * 128)
            return Image.fromarray((pixels + noise).round().clip(0, 255).astype(np.uint8), "RGB")
        raise ValueError(f"unknown deterioration {self.kind!r}; one of {', '.join(KINDS)}")
