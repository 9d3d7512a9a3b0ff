"""Decoding: every image mode to the right RGB pixels, every bad image to its skip reason."""

from __future__ import annotations

import io
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
from PIL import Image, ImageFile

from pipeline.cache.decode import _to_rgb, decode_image
from pipeline.cache.skips import BadSample, SkipReason
from pipeline.demo.data import decompression_bomb_png, encode_image


def _gradient(width: int = 48, height: int = 40) -> np.ndarray:
    x = np.linspace(0, 255, width)[None, :, None]
    y = np.linspace(0, 255, height)[:, None, None]
    rgb = np.concatenate([x + 0 * y, y + 0 * x, (255 - x) * 0.5 + y * 0.5], axis=2)
    return rgb.round().astype(np.uint8)


def _decode(data: bytes, **kwargs) -> np.ndarray:
    image = decode_image(data, key="k", **kwargs)
    assert image.mode == "RGB"
    return np.asarray(image)


def _reason(data: bytes, **kwargs) -> SkipReason:
    with pytest.raises(BadSample) as error:
        decode_image(data, key="sample-7", **kwargs)
    assert error.value.key == "sample-7" and "sample-7" in str(error.value)
    return error.value.reason


# --- modes -----------------------------------------------------------------------------------


def test_rgb_png_is_lossless():
    rgb = _gradient()
    assert np.array_equal(_decode(encode_image(Image.fromarray(rgb), "png")), rgb)


def test_jpeg_is_decoded_at_full_size_without_draft():
    rgb = np.asarray(Image.fromarray(_gradient()).resize((800, 600)))
    data = encode_image(Image.fromarray(rgb), "jpg", quality=90)
    reference = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert np.array_equal(_decode(data), reference)
    assert reference.shape == (600, 800, 3)


def test_grayscale_and_bilevel():
    gray = _gradient()[..., 0]
    out = _decode(encode_image(Image.fromarray(gray, "L"), "png"))
    assert np.array_equal(out, np.repeat(gray[..., None], 3, axis=2))
    bits = Image.fromarray(gray > 127).convert("1")
    out = _decode(encode_image(bits, "png"))
    assert set(np.unique(out)) == {0, 255}
    assert np.array_equal(out[..., 0] == 255, gray > 127)


def test_alpha_is_dropped_like_timm():
    rgb = _gradient()
    alpha = np.zeros(rgb.shape[:2], np.uint8)
    alpha[:, ::2] = 255
    rgba = Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    assert np.array_equal(_decode(encode_image(rgba, "png")), rgb)
    la = Image.fromarray(np.dstack([rgb[..., 1], alpha]), "LA")
    assert np.array_equal(_decode(encode_image(la, "png"))[..., 2], rgb[..., 1])
    assert np.array_equal(_decode(encode_image(rgba, "webp", lossless=True, exact=True)), rgb)


def test_palette_with_and_without_transparency(recwarn):
    indices = np.arange(40 * 48).reshape(40, 48) % 3
    image = Image.fromarray(indices.astype(np.uint8), "P")
    image.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 759)
    colours = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]])
    assert np.array_equal(_decode(encode_image(image, "png")), colours[indices])
    assert np.array_equal(_decode(encode_image(image, "png", transparency=1)), colours[indices])
    assert np.array_equal(_decode(encode_image(image, "gif", transparency=2)), colours[indices])
    assert not [w for w in recwarn if "transparency" in str(w.message).lower()]


def test_cmyk_jpeg_round_trip():
    rgb = _gradient()
    data = encode_image(Image.fromarray(rgb).convert("CMYK"), "jpg", quality=98)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    error = np.abs(_decode(data).astype(int) - rgb.astype(int))
    assert error.mean() < 3 and error.max() < 40


@pytest.mark.parametrize("fmt", ["png", "tiff"])
def test_sixteen_bit_gray_is_scaled_not_clipped(fmt):
    values = np.array([[0, 128, 257, 32767], [32896, 49151, 65280, 65535]], np.uint16)
    image = Image.fromarray(np.kron(values, np.ones((8, 8), np.uint16)))
    assert image.mode == "I;16"
    out = _decode(encode_image(image, fmt))
    expected = np.round(values.astype(float) * 255 / 65535).astype(np.uint8)
    assert np.array_equal(out[::8, ::8, 0], expected)
    assert np.array_equal(out[::8, ::8, 0], out[::8, ::8, 2])
    assert expected.tolist() == [[0, 0, 1, 127], [128, 191, 254, 255]]


@pytest.mark.parametrize(("extension", "mode"), [("pbm", "1"), ("pgm", "L"), ("ppm", "RGB")])
def test_netpbm_images_decode(extension, mode):
    """pbm/pgm/pnm members (netpbm's tools, older datasets) are in the default image keys."""
    gray = _gradient()[:, :, 0]
    image = Image.fromarray(gray).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format="PPM")
    out = _decode(buffer.getvalue())
    assert out.shape == (40, 48, 3)
    assert np.array_equal(out[:, :, 0], np.asarray(image.convert("L")))


def test_thirty_two_bit_integer_mode_is_clipped_to_sixteen_bits():
    values = np.array([[-5, 0, 65535, 100000]], np.int32)
    image = Image.fromarray(np.kron(values, np.ones((8, 8), np.int32)), "I")
    out = _decode(encode_image(image, "tiff"))
    assert out[0, ::8, 0].tolist() == [0, 0, 255, 255]


def test_other_modes():
    rgb = _gradient()
    for mode in ("YCbCr", "HSV", "LAB", "F", "I;16B", "RGBX", "La", "RGBa"):
        try:
            image = Image.fromarray(rgb).convert(mode)
        except ValueError:
            continue  # Pillow cannot build this mode from RGB here
        out = _to_rgb(image)
        assert out.mode == "RGB" and out.size == (48, 40), mode
    ycbcr = np.asarray(_to_rgb(Image.fromarray(rgb).convert("YCbCr"))).astype(int)
    assert np.abs(ycbcr - rgb).max() <= 3


# --- bad images ------------------------------------------------------------------------------


def test_empty_and_garbage():
    assert _reason(b"") == SkipReason.EMPTY_IMAGE
    assert _reason(np.random.default_rng(0).bytes(5000)) == SkipReason.UNDECODABLE
    assert _reason(b"<html>not found</html>") == SkipReason.UNDECODABLE
    assert _reason(encode_image(Image.fromarray(_gradient())).replace(b"IDAT", b"IDAX")) in (
        SkipReason.UNDECODABLE,
        SkipReason.TRUNCATED_IMAGE,
    )


def test_formats_outside_the_list_are_not_tried():
    tga = encode_image(Image.fromarray(_gradient()), "TGA")
    assert Image.open(io.BytesIO(tga)).format == "TGA"
    assert _reason(tga) == SkipReason.UNDECODABLE


@pytest.mark.parametrize("fmt", ["jpg", "png", "webp"])
def test_truncated_images(fmt):
    rgb = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = encode_image(Image.fromarray(rgb), fmt)
    for fraction in (0.3, 0.6, 0.9):
        reason = _reason(data[: int(len(data) * fraction)])
        expected = (
            (SkipReason.TRUNCATED_IMAGE, SkipReason.UNDECODABLE)
            if fmt == "webp"
            else (SkipReason.TRUNCATED_IMAGE,)
        )
        assert reason in expected, (fmt, fraction)
    # Cut inside the header: not even the size is known.
    assert _reason(data[:20]) in (SkipReason.TRUNCATED_IMAGE, SkipReason.UNDECODABLE)


def test_truncated_images_stay_detected_under_global_setting():
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    data = encode_image(Image.fromarray(_gradient()), "jpg")
    assert _reason(data[: len(data) // 2]) == SkipReason.TRUNCATED_IMAGE
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_too_small():
    assert _reason(encode_image(Image.new("RGB", (2, 2)))) == SkipReason.TOO_SMALL
    assert _reason(encode_image(Image.new("RGB", (100, 7)))) == SkipReason.TOO_SMALL
    assert _decode(encode_image(Image.new("RGB", (100, 8)))).shape == (8, 100, 3)
    assert _decode(encode_image(Image.new("RGB", (2, 2))), min_side=1).shape == (2, 2, 3)


def test_too_large_is_refused_from_the_header():
    limit = Image.MAX_IMAGE_PIXELS
    start = time.perf_counter()
    # Beyond twice Pillow's limit (Pillow's own error) and just beyond it (Pillow only warns).
    assert _reason(decompression_bomb_png()) == SkipReason.TOO_LARGE
    with warnings.catch_warnings():  # pytest restores its filters after collecting: not pvu's
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        assert _reason(decompression_bomb_png(10_000, 10_000)) == SkipReason.TOO_LARGE
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        assert _reason(decompression_bomb_png(10_000, 10_000)) == SkipReason.TOO_LARGE
    # Under Pillow's limit, but over ours: refused before any pixel is decoded.
    assert _reason(decompression_bomb_png(5_000, 5_000), max_pixels=10**6) == SkipReason.TOO_LARGE
    assert time.perf_counter() - start < 1.0
    assert _reason(encode_image(Image.new("RGB", (40, 40))), max_pixels=1000) == (
        SkipReason.TOO_LARGE
    )
    assert limit == Image.MAX_IMAGE_PIXELS


def test_a_photo_over_the_pixel_limit_is_told_to_be_downscaled():
    """A 100-megapixel camera photo was skipped as '10000x10000 > 89478485 pixels', which says
    what is wrong and not what to do; timm's loader would have read it with a warning."""
    for bomb in (decompression_bomb_png(10_000, 10_000), decompression_bomb_png()):
        with pytest.raises(BadSample) as error, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            decode_image(bomb, key="photo")
        assert error.value.reason == SkipReason.TOO_LARGE
        assert "downscale" in error.value.detail, error.value.detail


def test_an_image_over_pillows_limit_is_counted_too_large_without_pillows_warning():
    """Pillow's warning would repeat the ``too_large`` count in every worker's log, printed
    whatever the warnings filter the process starts with."""
    script = (
        "from pipeline.cache.decode import decode_image\n"
        "from pipeline.demo.data import decompression_bomb_png\n"
        "try:\n"
        "    decode_image(decompression_bomb_png(10_000, 10_000))\n"
        "except Exception as error:\n"
        "    print(error.reason.value)\n"
    )
    answer = subprocess.run(
        [sys.executable, "-W", "default", "-c", script], capture_output=True, text=True
    )
    assert answer.stdout.strip() == "too_large", answer.stdout + answer.stderr
    assert "DecompressionBombWarning" not in answer.stderr, answer.stderr


def test_a_strip_far_longer_than_wide_is_refused_before_a_transform_blows_it_up():
    """2,000,000 x 8 px decodes small, but an eval transform resizing its short side to 256
    would ask for ~16G pixels (a MemoryError that lost its whole shard); 100:1 still passes."""
    strip = encode_image(Image.new("L", (2_000_000, 8)), "png")
    assert _reason(strip) == SkipReason.TOO_LARGE
    assert _reason(encode_image(Image.new("RGB", (8, 801)), "png")) == SkipReason.TOO_LARGE
    assert _decode(encode_image(Image.new("RGB", (800, 8)), "png")).shape == (8, 800, 3)


def test_code_errors_are_not_swallowed():
    with pytest.raises(TypeError):
        decode_image("not bytes")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        decode_image(encode_image(Image.new("RGB", (9, 9))), min_side="8")  # type: ignore[arg-type]
