"""Many more pretraining classes than digits give: glyphs rendered offline in digits' style.

The paper's head transfers to unseen classes because it is trained on thousands of classes;
six digit classes teach it nothing class-agnostic. This module renders letters (Latin, Greek,
Cyrillic) and symbols from the TrueType fonts matplotlib ships (DejaVu and STIX, several
weights and slants) the way scikit-learn's digits were made (UCI optdigits): a 32x32 bitmap,
size-normalised into its box, counted in 4x4 blocks into an 8x8 image of values 0-16. So
glyphs and digits share one domain, and ``pipeline.demo.data.coloured_digit`` draws both.

Glyph classes are chosen once, deterministically (``glyph_alphabet``): a candidate whose
normalised rendering is too close to a digit, or to a glyph chosen before it (Latin and Greek
capital O, ``c`` and ``C`` at 8x8), is left out, so no two classes look alike and none
looks like a digit. Each sample varies font, stroke, rotation, size, aspect and position.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

#: Candidate glyphs in order of preference (earlier ones win a look-alike tie).
CANDIDATES = (
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
    "ΓΔΘΛΞΠΣΦΨΩαβγδεζηθικλμνξπρστυφχψω"
    "БДЖЗИЛУЦЧШЩЪЫЬЭЮЯбвгджзийклмнптфцчшщъыьэюя"
    "#$%&@?!+=<>{}[]()/\\|*~^§¶£¥€¢µ±×÷∞∫∑∏√∂∇∈∩∪⊂⊃∧∨¬∀∃←→↑↓↔⇒⇔△□○◇☆♠♣♥♦♪"  # noqa: RUF001
)
#: Left out whatever the similarity test says: glyphs a digit is easily read as, or read as one.
LOOKALIKES = "OoDIl|ZzSs$bGBqga"
#: matplotlib's fonts the glyphs are drawn in (file names under mpl-data/fonts/ttf).
FONTS = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSans-Oblique.ttf",
    "DejaVuSans-BoldOblique.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSerif-Italic.ttf",
    "DejaVuSerif-BoldItalic.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSansMono-Bold.ttf",
    "STIXGeneral.ttf",
    "STIXGeneralBol.ttf",
    "STIXGeneralItalic.ttf",
    "STIXGeneralBolIta.ttf",
)
_RENDER = 64  # font size in pixels of the first, sharp rendering
_BITMAP = 32  # the optdigits bitmap, counted in 4x4 blocks into 8x8


def glyph_alphabet(*, limit: int | None = None, max_similarity: float = 0.85) -> str:
    """The glyph classes, in order: each candidate whose 8x8 rendering (regular DejaVu Sans,
    upright, normalised) has cosine similarity at most ``max_similarity`` to every digit and to
    every glyph kept before it. The first ``limit`` of them (all when None)."""
    digits = [_reference(c) for c in "0123456789"]
    kept: list[str] = []
    references: list[np.ndarray] = []
    for char in CANDIDATES:
        if char in LOOKALIKES or not _covered(char, FONTS[0]):
            continue
        reference = _reference(char)
        if max(float(reference @ other) for other in digits + references) <= max_similarity:
            kept.append(char)
            references.append(reference)
        if limit is not None and len(kept) == limit:
            break
    return "".join(kept)


def render_glyph(char: str, rng: np.random.Generator) -> np.ndarray:
    """``char`` as an 8x8 float image of values 0-16 (scikit-learn digits' ``images`` style),
    in a random font that has it, with random stroke, rotation, size, aspect and position."""
    fonts = [name for name in FONTS if _covered(char, name)]
    font = _font(str(rng.choice(fonts)))
    bitmap = _draw(
        char,
        font,
        stroke=int(rng.integers(0, 4)),
        angle=float(rng.uniform(-15, 15)),
    )
    side = rng.uniform(0.75, 1.0) * _BITMAP
    aspect = rng.uniform(0.7, 1.3)
    bitmap = _fit(bitmap, side, aspect, shift=tuple(rng.uniform(-0.5, 0.5, 2)))
    return _count_blocks(bitmap)


def _reference(char: str) -> np.ndarray:
    """The unit-length 8x8 rendering of ``char`` in the first font, upright, centred."""
    image = _count_blocks(_fit(_draw(char, _font(FONTS[0]), stroke=1, angle=0.0), 30, 1.0))
    flat = image.ravel() - image.mean()
    return flat / (np.linalg.norm(flat) or 1.0)


def _draw(char: str, font: ImageFont.FreeTypeFont, *, stroke: int, angle: float) -> Image.Image:
    """A large grey rendering of ``char`` cropped to its ink, rotated by ``angle`` degrees."""
    canvas = Image.new("L", (3 * _RENDER, 3 * _RENDER), 0)
    ImageDraw.Draw(canvas).text(
        (_RENDER, _RENDER), char, fill=255, font=font, stroke_width=stroke, stroke_fill=255
    )
    canvas = canvas.rotate(angle, resample=Image.Resampling.BILINEAR)
    return canvas.crop(canvas.getbbox() or (0, 0, 1, 1))


def _fit(
    ink: Image.Image, side: float, aspect: float, shift: tuple[float, float] = (0.0, 0.0)
) -> Image.Image:
    """``ink`` scaled so its longer side is ``side`` (width stretched by ``aspect``), pasted on
    the 32x32 bitmap, centred and then moved by ``shift`` of the free room, binarised."""
    width, height = ink.size[0] * aspect, ink.size[1]
    scale = side / max(width, height)
    size = (max(1, min(_BITMAP, round(width * scale))), max(1, min(_BITMAP, round(height * scale))))
    glyph = ink.resize(size, Image.Resampling.BILINEAR)
    room = np.array([_BITMAP - size[0], _BITMAP - size[1]])
    left, top = np.round(room / 2 + np.asarray(shift) * room / 2).astype(int)
    bitmap = Image.new("L", (_BITMAP, _BITMAP), 0)
    bitmap.paste(glyph, (int(left), int(top)))
    return bitmap.point(lambda value: 255 if value >= 128 else 0)


def _count_blocks(bitmap: Image.Image) -> np.ndarray:
    """The 32x32 binary bitmap as 8x8 counts of set pixels per 4x4 block (0-16)."""
    pixels = np.asarray(bitmap, dtype=np.float64) / 255
    return pixels.reshape(8, 4, 8, 4).sum(axis=(1, 3))


@functools.cache
def _font(name: str) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(_font_dir() / name), _RENDER)


def _covered(char: str, name: str) -> bool:
    """Whether font ``name`` has a glyph of its own for ``char``."""
    return ord(char) in _charmap(name)


@functools.cache
def _charmap(name: str) -> frozenset[int]:
    """The code points font ``name`` has glyphs for."""
    from matplotlib.ft2font import FT2Font

    return frozenset(FT2Font(str(_font_dir() / name)).get_charmap())


def _font_dir() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"
