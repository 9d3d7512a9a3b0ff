"""Decode and augment on the backbone's device (``--decode device``): nvJPEG on a GPU.

On a GPU node the PIL path (``pipeline.cache.decode_pool``) costs ~4.5 CPU-ms per image, so an
H200's bf16 forward would need ~40 cores to stay fed. Here the CPU only reads each image's
header and launches kernels:

- JPEGs are decoded a chunk at a time by ``torchvision.io.decode_jpeg`` on the device (nvJPEG on
  CUDA, libjpeg-turbo on a CPU). Other formats, and JPEGs the device decoder refuses or that do
  not end in an end-of-image marker (so a truncated file is judged by Pillow, as in the PIL
  path), are decoded by Pillow and copied over.
- Every image passes the header checks of :func:`pipeline.cache.decode.open_image` first, so
  the same samples are skipped for the same reasons as in the PIL path. The pixel data itself
  is judged by the device's decoder: on a CPU libjpeg-turbo, as Pillow's; on a GPU nvJPEG,
  which may keep a corrupt JPEG that Pillow refuses (``benchmarks/device_decode_check.py``
  compares the two on corrupted JPEGs; a size other than the header's goes to Pillow).
- The augmentation is timm's own transform applied to the uint8 tensor (torchvision's
  transforms take tensors), seeded per sample as in the PIL path: the same crops, flips and
  jitter factors. Pixels differ by the resampling and rounding of tensor kernels against
  Pillow's (about 0.3 of a level on average on a CPU), and the transform records
  ``decode: device`` so the two kinds of rows never share a cache.
- A trailing ``ColorJitter`` (timm's train transform; in a ``RandomApply`` under
  ``color_jitter_prob``) draws whether it applies, its factors and its order per image, in
  sequence, and is then applied to the chunk with Pillow's formulas (those the PIL path runs,
  bit for bit: torchvision's tensor formulas truncate gray a level down at each op, up to 3
  levels on gray images), each op at once to the images it is for: a few dozen launches a
  chunk rather than ~50 an image.
- A chunk's images are decoded in parts of at most ``DECODE_PIXELS``, each cut to size before
  the next, so full-size photos never fill the GPU beside the forward.
- On a GPU the chunk's kernels run on a stream of their own, so they overlap the forward of the
  previous batch; the caller's stream waits for them before it reads the images. That stream is
  idle before each chunk's JPEGs are decoded, as torchvision's nvJPEG writes on a stream that
  does not wait for it.
"""

from __future__ import annotations

import copy
import io
import logging
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cache, partial
from typing import Any

import numpy as np
import torch
from PIL import Image
from timm.data.transforms import CenterCropOrPad, center_crop_or_pad
from torchvision import io as tvio
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from pipeline.cache.augment import build_transform, seed_rngs, split_transform
from pipeline.cache.decode import load_rgb, open_image
from pipeline.cache.decode_pool import Skip, Task
from pipeline.cache.skips import BadSample

log = logging.getLogger(__name__)

_JPEG_MODES = ("RGB", "L")  # what the device decoder turns into RGB as Pillow does
_END_OF_IMAGE = b"\xff\xd9"


@dataclass(frozen=True)
class _Plan:
    """One transform on tensors: the steps run per image, and a trailing jitter run per chunk,
    applied to each image with probability ``jitter_p`` (``None``: always, no draw for it)."""

    steps: Sequence[Any]
    jitter: transforms.ColorJitter | None
    jitter_p: float | None = None


def _plan(resolved: dict[str, Any]) -> _Plan:
    """The tensor plan for the transform ``resolved`` describes (one without a deterioration,
    which ``CacheJobConfig`` refuses with ``--decode device``)."""
    split = split_transform(build_transform(resolved))
    if split is None:
        raise ValueError("--decode device needs a transform that ends in ToTensor, Normalize")
    steps = [_on_tensors(step) for step in split.pil.transforms]
    last = steps[-1] if steps else None
    if _pillow_jitter(last):
        return _Plan(steps[:-1], last)
    applied = getattr(last, "transforms", ())  # timm's ``color_jitter_prob``: a RandomApply
    if (
        isinstance(last, transforms.RandomApply)
        and len(applied) == 1
        and _pillow_jitter(applied[0])
    ):
        return _Plan(steps[:-1], applied[0], last.p)
    return _Plan(steps, None)


def _pillow_jitter(step: Any) -> bool:
    """Whether ``step`` is a jitter :func:`color_jitter` runs: one without hue."""
    return isinstance(step, transforms.ColorJitter) and step.hue is None


def _on_tensors(step: Any) -> Any:
    """``step`` as it runs on a tensor: a ``CenterCropOrPad`` that pads with a colour (timm's
    ``border`` crop mode), which torchvision's tensor ``pad`` refuses, pads channel by channel;
    a nearest-neighbour resize takes each output pixel's centre, as Pillow's ``NEAREST`` does
    (torchvision's ``NEAREST`` on tensors takes its corner: ~20 levels off on photos)."""
    if isinstance(step, CenterCropOrPad) and isinstance(step.fill, (list, tuple)):
        return partial(_crop_or_pad_per_channel, step)
    if getattr(step, "interpolation", None) == InterpolationMode.NEAREST:
        step = copy.copy(step)
        step.interpolation = InterpolationMode.NEAREST_EXACT
    return step


def _crop_or_pad_per_channel(step: CenterCropOrPad, image: torch.Tensor) -> torch.Tensor:
    channels = image.split(1, dim=-3)
    return torch.cat(
        [
            center_crop_or_pad(channel, step.size, fill=fill, padding_mode=step.padding_mode)
            for channel, fill in zip(channels, step.fill, strict=True)
        ],
        dim=-3,
    )


class DeviceDecoder:
    """Decodes and augments chunks of samples on ``device`` with each transform ``resolved``.

    Same RNG rules as ``pipeline.cache.augment.augment``: call from one thread per process.
    """

    def __init__(self, resolved: list[dict[str, Any]], device: torch.device) -> None:
        self.plans = [_plan(one) for one in resolved]
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        _check_decoder(device)

    def prepare(self, tasks: list[Task]) -> list[list[torch.Tensor] | Skip]:
        """Per task, its uint8 ``(H, W, C)`` image per transform (on the device), or a
        :class:`Skip` saying why the sample was rejected. On a GPU the images are ready for
        the calling thread's current stream: it waits for the decoder's before reading them,
        and their memory is not reused until it has."""
        if self.stream is None:
            return self._prepare(tasks)
        reader = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self.stream):
            results = self._prepare(tasks)
        reader.wait_stream(self.stream)
        for images in results:
            for image in () if isinstance(images, Skip) else images:
                image.record_stream(reader)
        return results

    def _prepare(self, tasks: list[Task]) -> list[list[torch.Tensor] | Skip]:
        """:meth:`prepare` on the current stream: headers first, then the images decoded a
        part at a time (``DECODE_PIXELS``), each cut to size by every plan before the next."""
        results: list[Any] = [None] * len(tasks)
        opened: dict[int, Image.Image] = {}
        for index, (key, data, _) in enumerate(tasks):
            try:
                opened[index] = open_image(data, key=key)
            except BadSample as bad:
                results[index] = _skip(bad, key)
        kept: list[int] = []
        shaped: list[list[torch.Tensor]] = [[] for _ in self.plans]
        draws: list[list[JitterParams | None]] = [[] for _ in self.plans]
        for part in _parts(opened, DECODE_PIXELS):
            for index, image in zip(part, self._decode(tasks, opened, part), strict=True):
                if isinstance(image, Skip):
                    results[index] = image
                    continue
                kept.append(index)
                for plan, images, params in zip(self.plans, shaped, draws, strict=True):
                    _shape(plan, image, tasks[index][2], images, params)
        per_plan = [
            _jittered(plan, images, params)
            for plan, images, params in zip(self.plans, shaped, draws, strict=True)
        ]
        for position, index in enumerate(kept):
            results[index] = [augmented[position] for augmented in per_plan]
        return results

    def _decode(
        self, tasks: list[Task], opened: dict[int, Image.Image], part: list[int]
    ) -> list[torch.Tensor | Skip]:
        """The images ``part`` indexes, as uint8 ``(C, H, W)`` RGB on the device, or a
        ``Skip``: JPEGs the device takes in one call, the others (and those it refuses) by
        Pillow."""
        decoded: dict[int, torch.Tensor | Skip] = {}
        jpegs = [index for index in part if _device_takes(opened[index], tasks[index][1])]
        for index, image in zip(
            jpegs, self._decode_jpegs([tasks[i][1] for i in jpegs]), strict=True
        ):
            width, height = opened[index].size
            if image is not None and tuple(image.shape) == (3, height, width):
                decoded[index] = image
        return [
            decoded[index]
            if index in decoded
            else self._decode_with_pillow(opened[index], tasks[index][0])
            for index in part
        ]

    def _decode_jpegs(self, data: list[bytes]) -> list[torch.Tensor | None]:
        """``data`` decoded on the device in one call; where that fails, one by one, None for
        each the device decoder refuses."""
        if not data:
            return []
        encoded = [torch.frombuffer(bytearray(one), dtype=torch.uint8) for one in data]
        if self.stream is not None:
            # torchvision allocates nvJPEG's outputs on this stream but writes them on one of
            # its own that waits for nothing: a block freed here that the previous chunk's
            # queued kernels still read would be overwritten (pytorch/vision#9606).
            self.stream.synchronize()
        try:
            return list(_decode_jpeg(encoded, self.device))
        except torch.cuda.OutOfMemoryError:
            raise
        except RuntimeError:  # one image it refuses fails the call: find it
            if self.stream is not None:  # nothing of the failed call still writes
                torch.cuda.synchronize(self.device)
            return [_decode_one(one, self.device) for one in encoded]

    def _decode_with_pillow(self, image: Image.Image, key: str) -> torch.Tensor | Skip:
        try:
            rgb = np.array(load_rgb(image, key))
        except BadSample as bad:
            return _skip(bad, key)
        return torch.from_numpy(rgb).permute(2, 0, 1).to(self.device)


#: Pixels decoded on the device at once (~200 MB as RGB): a chunk of large photos is decoded
#: in parts, each cut to the transforms' size before the next, so full-size images never hold
#: more than that beside the forward.
DECODE_PIXELS = 64 * 2**20


def _parts(opened: dict[int, Image.Image], budget: int) -> Iterator[list[int]]:
    """The indices of ``opened`` in order, in runs of at most ``budget`` pixels (at least one
    image a run)."""
    part: list[int] = []
    pixels = 0
    for index, image in opened.items():
        width, height = image.size
        if part and pixels + width * height > budget:
            yield part
            part, pixels = [], 0
        part.append(index)
        pixels += width * height
    if part:
        yield part


def _shape(
    plan: _Plan,
    image: torch.Tensor,
    seed: int,
    shaped: list[torch.Tensor],
    draws: list[JitterParams | None],
) -> None:
    """``image`` through ``plan``'s per-image steps, seeded by ``seed``, onto ``shaped``; the
    jitter's order and factors, drawn next as the jitter itself would, onto ``draws`` (None
    where a jitter applied at random is not)."""
    seed_rngs(seed)
    for step in plan.steps:
        image = step(image)
    shaped.append(image)
    jitter = plan.jitter
    if jitter is None:
        return
    if plan.jitter_p is not None and plan.jitter_p < torch.rand(1):  # RandomApply's draw
        draws.append(None)
    else:
        draws.append(jitter.get_params(jitter.brightness, jitter.contrast, jitter.saturation, None))


def _jittered(
    plan: _Plan, shaped: list[torch.Tensor], draws: list[JitterParams | None]
) -> list[torch.Tensor]:
    """``shaped`` with ``plan``'s jitter applied as drawn: uint8 ``(H, W, C)`` each."""
    if not shaped:
        return []
    batch = torch.stack(shaped)
    if plan.jitter is not None:
        batch = color_jitter(batch, draws)
    return list(batch.permute(0, 2, 3, 1).unbind(0))


def _skip(bad: BadSample, key: str) -> Skip:
    return Skip(bad.reason, bad.key or key, bad.detail)


def _device_takes(image: Image.Image, data: bytes) -> bool:
    """Whether the device decoder takes this image: a whole baseline or progressive JPEG whose
    pixels Pillow would return as RGB or replicate from gray."""
    return (
        image.format == "JPEG"
        and image.mode in _JPEG_MODES
        and bytes(data).rstrip(b"\0").endswith(_END_OF_IMAGE)
    )


@cache
def _check_decoder(device: torch.device) -> None:
    """Warn where this torchvision cannot decode JPEGs on ``device`` (one built without nvJPEG):
    every JPEG would then go through Pillow on the CPU, as slowly as the PIL path. Once per
    device and process."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "JPEG")
    probe = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)
    try:
        _decode_jpeg([probe], device)
    except RuntimeError as error:
        log.warning(
            "--decode device: torchvision cannot decode JPEGs on %s (%s); Pillow decodes them "
            "on the CPU, and only the augmentation runs on the device",
            *(device, str(error).splitlines()[0]),
        )


def _decode_jpeg(encoded: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    with warnings.catch_warnings():  # torchvision 0.29 points to TorchCodec, once per call
        warnings.simplefilter("ignore", DeprecationWarning)
        return tvio.decode_jpeg(encoded, mode=tvio.ImageReadMode.RGB, device=device)


def _decode_one(encoded: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    try:
        return _decode_jpeg([encoded], device)[0]
    except torch.cuda.OutOfMemoryError:
        raise
    except RuntimeError:  # what torchvision raises for data nvJPEG refuses
        return None


#: (order of the four ops, brightness, contrast, saturation, hue) as ColorJitter draws them.
JitterParams = tuple[torch.Tensor, float | None, float | None, float | None, float | None]


def color_jitter(batch: torch.Tensor, params: list[JitterParams | None]) -> torch.Tensor:
    """torchvision's ``ColorJitter`` (brightness, contrast, saturation; no hue) on a uint8
    ``(N, 3, H, W)`` batch, image ``i`` with the order and factors ``params[i]`` (left as it is
    where that is None): the formulas
    of Pillow's ``ImageEnhance``, which it runs on PIL images, each op over the images it
    applies to at each place of their orders. The images and factors reach the device in two
    copies."""
    jittered = {image: drawn for image, drawn in enumerate(params) if drawn is not None}
    orders = {image: drawn[0].tolist() for image, drawn in jittered.items()}
    places: list[tuple[int, list[int]]] = []  # (op, the images it applies to), in order
    for position in range(4):
        for op in range(3):
            members = [
                image
                for image, factors in jittered.items()
                if orders[image][position] == op and factors[1 + op] is not None
            ]
            if members:
                places.append((op, members))
    if not places:
        return batch
    members = [image for _, images in places for image in images]
    indices = torch.tensor(members).to(batch.device)
    factors = torch.tensor(  # float32, as Pillow's C float has them
        [jittered[image][1 + op] for op, images in places for image in images], dtype=torch.float32
    ).to(batch.device)
    start = 0
    for op, images in places:
        end = start + len(images)
        index = indices[start:end]
        batch[index] = _ADJUST[op](batch[index], factors[start:end])
        start = end
    return batch


def _blend(degenerate: torch.Tensor, batch: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Pillow's ``Image.blend(degenerate, image, factor)``, as ``ImageEnhance`` calls it, with one
    float32 factor per image: ``degenerate + factor * (image - degenerate)`` in float32,
    clipped to [0, 255] and truncated."""
    base = degenerate.to(torch.float32)
    blended = base + factor.view(-1, 1, 1, 1) * (batch.to(torch.float32) - base)
    return blended.clamp(0, 255).to(batch.dtype)


def _grayscale(batch: torch.Tensor) -> torch.Tensor:
    """Pillow's RGB to ``L``, one uint8 channel: ``(19595 R + 38470 G + 7471 B + 2**15) >> 16``
    (a gray pixel keeps its value; torchvision's float weights sum to 0.9999 and truncate, and
    took a level off)."""
    red, green, blue = batch.to(torch.int32).unbind(dim=-3)
    gray = (19595 * red + 38470 * green + 7471 * blue + 0x8000) >> 16
    return gray.to(batch.dtype).unsqueeze(dim=-3)


def _brightness(batch: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(torch.zeros_like(batch[:, :1, :1, :1]), batch, factor)


def _contrast(batch: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Pillow's ``ImageEnhance.Contrast``: towards the grayscale image's mean, rounded to a
    level, from an integer sum (exact whatever order a device sums in, so an image's mean does
    not depend on the other images of its chunk)."""
    gray = _grayscale(batch)
    total = gray.sum(dim=(-3, -2, -1), keepdim=True, dtype=torch.int64)
    mean = (total.to(torch.float64) / gray[0].numel() + 0.5).floor()
    return _blend(mean, batch, factor)


def _saturation(batch: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(_grayscale(batch), batch, factor)


_ADJUST = (_brightness, _contrast, _saturation)
