"""Decode: encoded image bytes to an RGB ``PIL.Image``, every bad input a counted ``BadSample``.

Conventions (those of timm and torchvision's loaders, which the backbones were trained with):

- Every mode becomes RGB with ``Image.convert("RGB")``: grayscale is replicated, palettes are
  looked up, CMYK and YCbCr are converted, and alpha is dropped (not composited), as
  ``.convert("RGB")`` does in timm's and torchvision's loaders.
- 16-bit grayscale (``I;16*`` and ``I``, as 16-bit PNG and TIFF open) is scaled to 8 bits,
  ``round(v * 255 / 65535)`` with values outside [0, 65535] clipped, where Pillow's own
  conversion would clip at 255 and turn most of the image white.
- No EXIF rotation and no JPEG draft mode: pixels are exactly what the codec decodes.
- Only common image formats are tried (``FORMATS``), never Pillow's full plugin list (which
  includes formats that call out to external programs).

Size limits are checked from the header, before any pixel is decoded. Pillow's global state
(``ImageFile.LOAD_TRUNCATED_IMAGES``, ``Image.MAX_IMAGE_PIXELS``) is read, never changed;
Pillow's own decompression-bomb error (over twice its limit) still applies on top of
``max_pixels``. Its warning (over its limit) is not shown: the images it warns of are over
``max_pixels`` too, each counted as ``too_large``, and the warning would only repeat that in
every worker's log, as an attack.
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.cache.skips import BadSample, SkipReason

#: The formats tried, in order. Names not in this Pillow build are left out.
FORMATS = ("JPEG", "PNG", "WEBP", "MPO", "GIF", "BMP", "TIFF", "PPM")
MAX_PIXELS = 89_478_485  # Pillow's default MAX_IMAGE_PIXELS: about 9459 x 9459
#: The most one side may exceed the other: an eval transform resizes the short side to the
#: backbone's input (~256-600 px), so a strip 2,000,000 x 8 px, small as decoded, would
#: become billions of pixels. Real photos and panoramas stay well under it.
MAX_ASPECT = 100
#: What to do with an image over the pixel limit (a camera's 100-megapixel photo, say).
_DOWNSCALE = "a decompression bomb by its size: downscale it to cache it"
_VIA = {"PA": "RGBA", "La": "LA", "RGBa": "RGBA"}
_SIXTEEN_BIT = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
# What Pillow raises on bad data (beyond its OSError subclasses); not TypeError or the like,
# which mean a bug in the code.
_DATA_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    IndexError,
    KeyError,
    struct.error,
    zlib.error,
    Image.DecompressionBombWarning,
)
_available_formats: tuple[str, ...] | None = None

warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def decode_image(
    data: bytes,
    *,
    key: str = "",
    min_side: int = 8,
    max_pixels: int = MAX_PIXELS,
) -> Image.Image:
    """Decode ``data`` to an RGB image, or raise ``BadSample`` naming ``key`` and the reason.

    Reasons: ``empty_image`` (no bytes), ``undecodable`` (not an image this module reads, or
    a broken one), ``truncated_image`` (the encoded data ends early), ``too_small`` (a side
    under ``min_side``), ``too_large`` (over ``max_pixels`` pixels, a decompression bomb, or
    a side over ``MAX_ASPECT`` times the other).
    """
    return load_rgb(open_image(data, key=key, min_side=min_side, max_pixels=max_pixels), key)


def open_image(
    data: bytes,
    *,
    key: str = "",
    min_side: int = 8,
    max_pixels: int = MAX_PIXELS,
) -> Image.Image:
    """``data``'s image, its header read and its size checked, no pixel decoded yet: the
    first half of :func:`decode_image`, whose ``BadSample`` reasons it raises."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"decode_image takes bytes, got {type(data).__name__}")
    if not data:
        raise BadSample(SkipReason.EMPTY_IMAGE, "no bytes", key)
    try:
        image = Image.open(io.BytesIO(data), formats=_formats())
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise BadSample(SkipReason.TOO_LARGE, f"{error} ({_DOWNSCALE})", key) from None
    except UnidentifiedImageError:
        raise BadSample(SkipReason.UNDECODABLE, "not a readable image", key) from None
    except _DATA_ERRORS as error:
        raise BadSample(_reason_for(error), _describe(error), key) from None

    width, height = image.size
    if width * height > max_pixels:
        detail = f"{width}x{height} > {max_pixels:,} pixels, {_DOWNSCALE}"
        raise BadSample(SkipReason.TOO_LARGE, detail, key)
    if min(width, height) < min_side:
        raise BadSample(SkipReason.TOO_SMALL, f"{width}x{height}, a side < {min_side}", key)
    if max(width, height) > MAX_ASPECT * min(width, height):
        detail = f"{width}x{height}, a side over {MAX_ASPECT}x the other"
        raise BadSample(SkipReason.TOO_LARGE, detail, key)
    return image


def load_rgb(image: Image.Image, key: str = "") -> Image.Image:
    """Decode an image :func:`open_image` returned, as RGB: the second half of
    :func:`decode_image`, whose ``BadSample`` reasons for broken data it raises."""
    try:
        image.load()
        return _to_rgb(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise BadSample(SkipReason.TOO_LARGE, f"{error} ({_DOWNSCALE})", key) from None
    except _DATA_ERRORS as error:
        raise BadSample(_reason_for(error), _describe(error), key) from None


def _to_rgb(image: Image.Image) -> Image.Image:
    """The loaded ``image`` in mode RGB (see the module docstring for the conventions)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _SIXTEEN_BIT:
        values = np.asarray(image).astype(np.int64)
        gray = (np.clip(values, 0, 65535) * 255 + 32767) // 65535
        return Image.fromarray(gray.astype(np.uint8), mode="L").convert("RGB")
    if mode == "P" and "transparency" in image.info:
        mode = "PA"  # Pillow warns when converting a palette with transparency straight to RGB
    if mode in _VIA:
        # Alpha modes Pillow cannot take straight to RGB: convert to a plain alpha mode first.
        return image.convert(_VIA[mode]).convert("RGB")
    if mode == "F":
        return image.convert("L").convert("RGB")
    return image.convert("RGB")


def _reason_for(error: BaseException) -> SkipReason:
    """``truncated_image`` where Pillow says the data ended early, else ``undecodable``."""
    if isinstance(error, EOFError):
        return SkipReason.TRUNCATED_IMAGE
    text = str(error).lower()
    if isinstance(error, OSError) and ("truncated" in text or "premature end" in text):
        return SkipReason.TRUNCATED_IMAGE
    return SkipReason.UNDECODABLE


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def _formats() -> tuple[str, ...]:
    """``FORMATS`` that this Pillow build can open (an unknown name would make ``open`` fail)."""
    global _available_formats
    if _available_formats is None:
        Image.init()
        _available_formats = tuple(name for name in FORMATS if name in Image.OPEN)
    return _available_formats
