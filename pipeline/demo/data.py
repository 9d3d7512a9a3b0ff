"""Demo and test data: WebDataset shards of real images that ship with installed packages.

- ``write_digit_shards``: scikit-learn's bundled digits, upscaled and coloured to RGB (the demo).
- ``write_photo_shards``: random crops of scikit-image's sample photos at about ImageNet size,
  JPEG quality 90 (tests and benchmarks; needs the ``dev`` extra).
- ``bad_samples`` / ``write_bad_shard`` / ``truncate_shard`` / ``write_bad_shards`` /
  ``write_duplicate_key_shards``: every kind of bad or odd input, made on purpose, each with
  the skip reason it must be counted under.

Everything is deterministic in ``seed``: the same call writes the same bytes. Output may be
any fsspec URL (a local folder, ``s3://bucket/prefix``). Nothing is downloaded.
"""

from __future__ import annotations

import gzip
import io
import os
import struct
import tarfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem
from PIL import Image

from pipeline.cache.skips import SkipReason
from pipeline.dataset.tar import add_sample, write_shard

#: scikit-image's bundled colour photographs (``skimage.data.<name>()``), one class each.
PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
)
_FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}


@dataclass(frozen=True)
class DemoSample:
    """One sample to write: its key, its files (extension -> bytes) and how it must end up.

    ``expect`` is the ``SkipReason`` the sample must be counted under, or None when it is
    valid; ``rgb`` is then the expected decoded pixel colour where the image is uniform.
    """

    key: str
    files: Mapping[str, bytes]
    expect: SkipReason | None = None
    rgb: tuple[int, int, int] | None = field(default=None, compare=False)


def encode_image(image: Image.Image, fmt: str = "png", **params: object) -> bytes:
    """``image`` encoded as ``fmt`` (``png``, ``jpg``/``jpeg``, ``webp``, or a Pillow format)."""
    buffer = io.BytesIO()
    image.save(buffer, format=_FORMATS.get(fmt.lower(), fmt.upper()), **params)
    return buffer.getvalue()


def write_digit_shards(
    out_dir: str,
    *,
    shards: int = 4,
    per_shard: int = 64,
    size: int = 64,
    seed: int = 0,
    fmt: str = "png",
) -> list[str]:
    """Write ``shards`` tars ``digits-NNNN.tar`` of scikit-learn's digits as RGB images.

    Each 8x8 digit is upscaled (bicubic) to ``size`` x ``size`` and drawn in a random
    foreground colour on a random background; its class (0-9) is the ``.cls`` label. Digits
    are drawn in a seeded random order (repeating, with new colours, past the 1,797 there
    are). ``fmt`` is ``png``, ``jpg`` or ``webp``. Returns the shard URLs.
    """
    from sklearn.datasets import load_digits

    _check_counts(shards=shards, per_shard=per_shard, size=size)
    digits = load_digits()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(digits.images))
    urls = []
    for shard in range(shards):
        samples = []
        for i in range(shard * per_shard, (shard + 1) * per_shard):
            index = order[i % len(order)]
            image = coloured_digit(digits.images[index], size, rng)
            files = {fmt: encode_image(image, fmt), "cls": b"%d" % digits.target[index]}
            samples.append((f"digit-{i:06d}", files))
        urls.append(write_shard(join(out_dir, f"digits-{shard:04d}.tar"), samples))
    return urls


def coloured_digit(pixels: np.ndarray, size: int, rng: np.random.Generator) -> Image.Image:
    """An 8x8 scikit-learn digit (values 0-16) upscaled (bicubic) to ``size`` x ``size`` and
    drawn in a random foreground colour on a random, contrasting background."""
    gray = Image.fromarray((pixels * (255 / 16)).round().astype(np.uint8))
    alpha = np.asarray(gray.resize((size, size), Image.Resampling.BICUBIC)) / 255.0
    background, foreground = _contrasting_colours(rng)
    rgb = background + alpha[..., None] * (foreground - background)
    return Image.fromarray(rgb.round().clip(0, 255).astype(np.uint8), mode="RGB")


def write_photo_shards(
    out_dir: str,
    *,
    shards: int = 2,
    per_shard: int = 16,
    size: tuple[int, int] = (400, 350),
    seed: int = 0,
    quality: int = 90,
    classes: int = len(PHOTOS),
) -> list[str]:
    """Write ``shards`` tars ``photos-NNNN.tar`` of ImageNet-like JPEGs from scikit-image.

    Each sample is a random crop (10-100% of the area) of one of the first ``classes``
    ``PHOTOS``, randomly flipped and resized to about ``size`` (width, height; each side
    varied by up to 10%), saved as JPEG at ``quality``. Its label is the photo's index.
    """
    _check_counts(shards=shards, per_shard=per_shard, size=min(size))
    if not 1 <= classes <= len(PHOTOS):
        raise ValueError(f"classes must be in [1, {len(PHOTOS)}], got {classes}")
    photos = [Image.fromarray(_skimage_photo(name)) for name in PHOTOS[:classes]]
    rng = np.random.default_rng(seed)
    urls = []
    for shard in range(shards):
        samples = []
        for i in range(shard * per_shard, (shard + 1) * per_shard):
            label = int(rng.integers(classes))
            width, height = (int(side * rng.uniform(0.9, 1.1)) for side in size)
            image = _random_crop(photos[label], rng, aspect=width / height)
            if rng.random() < 0.5:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            image = image.resize((width, height), Image.Resampling.BICUBIC)
            files = {"jpg": encode_image(image, "jpg", quality=quality), "cls": b"%d" % label}
            samples.append((f"photo-{i:06d}", files))
        urls.append(write_shard(join(out_dir, f"photos-{shard:04d}.tar"), samples))
    return urls


def bad_samples(*, size: int = 32, seed: int = 0) -> list[DemoSample]:
    """One sample of every kind of bad or odd input, with the reason it must be skipped for.

    Skipped: no image, no label, a non-integer or negative label, an empty image, random
    bytes, a truncated JPEG and PNG, a 2x2 image, a decompression bomb (a PNG declaring
    100,000 x 100,000 pixels in under 100 bytes). Valid, in odd modes (each a uniform colour,
    ``rgb`` the expected decoded pixel): grayscale, grayscale with alpha, RGBA, palette,
    palette with transparency, 1-bit, 16-bit grayscale, CMYK JPEG, grayscale JPEG, WebP.
    """
    rng = np.random.default_rng(seed)
    photo = _noise_image(rng, size)
    png, jpeg = encode_image(photo, "png"), encode_image(photo, "jpg", quality=90)
    one = b"1"

    def solid(mode: str, value: object, fmt: str = "png", **params: object) -> bytes:
        return encode_image(Image.new(mode, (size, size), value), fmt, **params)

    palette = Image.new("P", (size, size), 1)
    palette.putpalette([0, 0, 0, 200, 40, 10] + [0, 0, 0] * 254)
    transparent = palette.copy()
    transparent.info["transparency"] = 1
    gray16 = Image.fromarray(np.full((size, size), 65535, dtype=np.uint16))
    gray16_mid = Image.fromarray(np.full((size, size), 32896, dtype=np.uint16))

    skip = SkipReason
    return [
        DemoSample("ok-rgb-png", {"png": png, "cls": b"0"}),
        DemoSample("ok-rgb-jpeg", {"jpg": jpeg, "cls": b" 7\n"}),
        DemoSample("no-image", {"cls": one, "txt": b"a caption"}, skip.NO_IMAGE),
        DemoSample("no-label", {"png": png}, skip.NO_LABEL),
        DemoSample("bad-label", {"png": png, "cls": b"cat"}, skip.BAD_LABEL),
        DemoSample("negative-label", {"png": png, "cls": b"-3"}, skip.BAD_LABEL),
        DemoSample("empty-image", {"jpg": b"", "cls": one}, skip.EMPTY_IMAGE),
        DemoSample("corrupt", {"jpg": rng.bytes(2048), "cls": one}, skip.UNDECODABLE),
        DemoSample(
            "truncated-jpeg", {"jpg": jpeg[: len(jpeg) // 2], "cls": one}, skip.TRUNCATED_IMAGE
        ),
        DemoSample(
            "truncated-png", {"png": png[: len(png) // 2], "cls": one}, skip.TRUNCATED_IMAGE
        ),
        DemoSample("tiny", {"png": _tiny_png(), "cls": one}, skip.TOO_SMALL),
        DemoSample("bomb", {"png": decompression_bomb_png(), "cls": one}, skip.TOO_LARGE),
        DemoSample("gray", {"png": solid("L", 77), "cls": one}, rgb=(77, 77, 77)),
        DemoSample("gray-alpha", {"png": solid("LA", (90, 0)), "cls": one}, rgb=(90, 90, 90)),
        DemoSample("rgba", {"png": solid("RGBA", (10, 20, 30, 0)), "cls": one}, rgb=(10, 20, 30)),
        DemoSample("palette", {"png": encode_image(palette, "png"), "cls": one}, rgb=(200, 40, 10)),
        DemoSample(
            "palette-transparent",
            {"png": encode_image(transparent, "png"), "cls": one},
            rgb=(200, 40, 10),
        ),
        DemoSample("bilevel", {"png": solid("1", 1), "cls": one}, rgb=(255, 255, 255)),
        DemoSample(
            "gray16-max", {"png": encode_image(gray16, "png"), "cls": one}, rgb=(255, 255, 255)
        ),
        DemoSample(
            "gray16-mid", {"png": encode_image(gray16_mid, "png"), "cls": one}, rgb=(128, 128, 128)
        ),
        DemoSample(
            "cmyk-jpeg",
            {"jpg": solid("CMYK", (0, 255, 255, 0), "jpg", quality=95), "cls": one},
            rgb=(255, 0, 0),
        ),
        DemoSample(
            "gray-jpeg",
            {"jpg": solid("L", 200, "jpg", quality=95), "cls": one},
            rgb=(200, 200, 200),
        ),
        DemoSample(
            "rgb-webp",
            {"webp": solid("RGB", (0, 0, 255), "webp", lossless=True), "cls": one},
            rgb=(0, 0, 255),
        ),
    ]


def write_bad_shard(url: str, *, size: int = 32, seed: int = 0) -> list[DemoSample]:
    """Write ``bad_samples(size=..., seed=...)`` as one shard at ``url``; return them."""
    samples = bad_samples(size=size, seed=seed)
    write_shard(url, ((sample.key, sample.files) for sample in samples))
    return samples


def truncate_shard(src: str, dst: str, *, keep_bytes: int) -> str:
    """Copy the first ``keep_bytes`` bytes of the shard at ``src`` to ``dst`` (a cut-off tar)."""
    with fsspec.open(src, "rb") as file:
        head = file.read(keep_bytes)
    fs, path = fsspec.core.url_to_fs(dst)
    if isinstance(fs, LocalFileSystem):
        fs.makedirs(os.path.dirname(path), exist_ok=True)
    fs.pipe_file(path, head)
    return dst


def write_bad_shards(out_dir: str, *, size: int = 32) -> dict[str, dict[str, int]]:
    """Write shards that are bad as a whole into ``out_dir``; return, per shard file name, the
    skip counts it must produce (the valid samples in them are the digits ``ok-*``).

    ``empty.tar``: zero bytes; ``cut.tar.gz``: a gzip-compressed shard cut short (its first
    samples survive); ``climb.tar``: members named ``../../x.*`` and ``/abs/y.*`` beside a valid
    sample, which must be skipped and never touch a path; ``dup-0.tar`` and ``dup-1.tar``: keys
    both hold (``write_duplicate_key_shards``).
    """
    image = encode_image(Image.new("RGB", (size, size), (30, 60, 90)), "png")
    digit = {"png": image, "cls": b"1"}
    fs, _ = fsspec.core.url_to_fs(out_dir)
    fs.pipe_file(join(out_dir, "empty.tar"), b"")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w|") as tar:
        for key in ("ok-cut-0", "ok-cut-1", "ok-cut-2", "ok-cut-3"):
            add_sample(tar, key, digit)
    packed = gzip.compress(buffer.getvalue(), mtime=0)
    fs.pipe_file(join(out_dir, "cut.tar.gz"), packed[: len(packed) * 3 // 5])
    write_shard(
        join(out_dir, "climb.tar"),
        [("../../x", digit), ("/abs/y", digit), ("ok-climb", digit)],
    )
    return {
        "empty.tar": {SkipReason.EMPTY_SHARD.value: 1},
        "cut.tar.gz": {SkipReason.TRUNCATED_TAR.value: 1},
        "climb.tar": {SkipReason.UNSAFE_NAME.value: 2},
        **write_duplicate_key_shards(out_dir, size=size),
    }


def write_duplicate_key_shards(out_dir: str, *, size: int = 32) -> dict[str, dict[str, int]]:
    """Write two shards that share keys into ``out_dir``; return the skips each must count.

    ``dup-0.tar`` holds ``ok-dup-0`` to ``ok-dup-3`` (label 1, red); ``dup-1.tar`` holds
    ``ok-dup-2`` to ``ok-dup-5`` (label 2, blue), then ``ok-dup-4`` once more, apart from its
    first copy (label 3, green). Each key must be cached once per epoch, from its first copy in
    shard order: ``dup-1.tar`` counts its three later copies as ``duplicate_key``.
    """

    def sample(label: int, colour: tuple[int, int, int]) -> dict[str, bytes]:
        image = encode_image(Image.new("RGB", (size, size), colour), "png")
        return {"png": image, "cls": b"%d" % label}

    colours = {1: (200, 30, 30), 2: (30, 30, 200), 3: (30, 200, 30)}
    first, second, again = (sample(label, colour) for label, colour in colours.items())
    write_shard(join(out_dir, "dup-0.tar"), [(f"ok-dup-{i}", first) for i in range(4)])
    later = [(f"ok-dup-{i}", second) for i in range(2, 6)] + [("ok-dup-4", again)]
    write_shard(join(out_dir, "dup-1.tar"), later)
    return {"dup-0.tar": {}, "dup-1.tar": {SkipReason.DUPLICATE_KEY.value: 3}}


def decompression_bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid PNG header declaring ``width`` x ``height`` gray pixels, with one tiny IDAT."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit gray
    body = zlib.compress(b"\0" * (width + 1))  # the first row of zeros
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")
    )


def _tiny_png() -> bytes:
    return encode_image(Image.new("RGB", (2, 2), (1, 2, 3)), "png")


def _noise_image(rng: np.random.Generator, size: int) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), mode="RGB")


def _contrasting_colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A background and a foreground colour at least 128 apart in brightness."""
    while True:
        background, foreground = rng.integers(0, 256, (2, 3)).astype(np.float64)
        if abs(foreground.mean() - background.mean()) >= 128 / 3:
            return background, foreground


def _random_crop(image: Image.Image, rng: np.random.Generator, *, aspect: float) -> Image.Image:
    """A crop of 10-100% of ``image``'s area with about the given width/height ratio."""
    width, height = image.size
    area = width * height * rng.uniform(0.1, 1.0)
    crop_w = int(min(width, round((area * aspect) ** 0.5)))
    crop_h = int(min(height, round(crop_w / aspect)))
    left = int(rng.integers(0, width - crop_w + 1))
    top = int(rng.integers(0, height - crop_h + 1))
    return image.crop((left, top, left + crop_w, top + crop_h))


def _skimage_photo(name: str) -> np.ndarray:
    try:
        import skimage.data
    except ImportError as error:  # pragma: no cover - a dev extra
        raise ImportError(
            "write_photo_shards needs scikit-image: pip install -e '.[dev]'"
        ) from error
    return getattr(skimage.data, name)()


def _check_counts(*, shards: int, per_shard: int, size: int) -> None:
    for name, value in (("shards", shards), ("per_shard", per_shard), ("size", size)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


def join(folder: str, name: str) -> str:
    """``folder/name`` for a local folder (made absolute) or any fsspec URL."""
    fs, path = fsspec.core.url_to_fs(folder)
    if isinstance(fs, LocalFileSystem):
        return os.path.join(path, name)
    return folder.rstrip("/") + "/" + name
