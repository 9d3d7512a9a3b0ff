"""The demo's pretraining glyph classes: distinct, digit-free, learnable, in digits' style; and
the sets keep the zero-shot digits out of everything the backbone and head learn from."""

from __future__ import annotations

from collections import Counter

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import cross_val_score
from sklearn.neighbors import KNeighborsClassifier

from pipeline.cache.samples import iter_samples
from pipeline.demo.glyphs import LOOKALIKES, glyph_alphabet, render_glyph
from pipeline.demo.sets import GLYPH_LABEL, SetsConfig, write_demo_sets


def test_alphabet_is_deterministic_large_and_free_of_digits_and_lookalikes():
    alphabet = glyph_alphabet()
    assert alphabet == glyph_alphabet()
    assert len(alphabet) >= 100, "enough pretraining classes for the demo's default"
    assert len(set(alphabet)) == len(alphabet)
    assert not set(alphabet) & set("0123456789" + LOOKALIKES)
    assert glyph_alphabet(limit=10) == alphabet[:10]
    assert len(glyph_alphabet(max_similarity=0.7)) < len(alphabet), "the threshold bites"


def test_renderings_look_like_scikit_learn_digits_and_vary():
    rng = np.random.default_rng(0)
    images = np.stack([render_glyph(char, rng) for char in glyph_alphabet(limit=20)])
    assert images.shape == (20, 8, 8)
    assert images.min() == 0 and images.max() == 16
    assert np.array_equal(images, images.round()), "counts of a 32x32 bitmap in 4x4 blocks"
    ink = images.mean() / load_digits().images.mean()
    assert 0.5 < ink < 2, f"about as much ink as a digit ({ink:.2f}x)"
    again = [render_glyph("A", rng) for _ in range(5)]
    assert len({image.tobytes() for image in again}) == 5, "font, pose and stroke vary"
    same = np.random.default_rng(0)
    assert np.array_equal(render_glyph(glyph_alphabet()[0], same), images[0])


def test_glyph_classes_are_learnable_from_their_pixels():
    rng = np.random.default_rng(1)
    alphabet = glyph_alphabet(limit=30)
    pixels = np.stack([render_glyph(c, rng).ravel() for c in alphabet for _ in range(20)])
    labels = np.repeat(np.arange(len(alphabet)), 20)
    accuracy = cross_val_score(KNeighborsClassifier(3), pixels, labels, cv=4).mean()
    assert accuracy > 0.5, f"30 classes at chance 0.03: {accuracy:.2f}"


def test_zero_shot_digits_stay_out_of_pretraining(tmp_path):
    config = SetsConfig(glyph_classes=5, glyph_images=3, copies=1, clean_images=10)
    sets = write_demo_sets(str(tmp_path), config)
    assert sets.pretraining_classes == (0, 1, 2, 3, 4, 5, *range(GLYPH_LABEL, GLYPH_LABEL + 5))

    def labels(urls: list[str]) -> Counter[int]:
        return Counter(s.label for url in urls for s in iter_samples(url, counts=Counter()))

    train = labels(sets.train)
    assert set(train) == set(sets.pretraining_classes)
    assert all(train[GLYPH_LABEL + i] == 3 for i in range(5))
    assert set(labels(sets.upstream)) == set(range(6))
    assert set(labels(sets.zero_shot)) == {6, 7, 8, 9}
