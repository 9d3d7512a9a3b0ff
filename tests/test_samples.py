"""Samples: streaming real tar shards, local and on S3, with every kind of bad input."""

from __future__ import annotations

import bz2
import collections
import gzip
import io
import logging
import lzma
import os
import re
import tarfile
import time
from pathlib import Path
from typing import ClassVar

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.local import LocalFileSystem
from PIL import Image
from support import make_runner

from pipeline.cache.decode import decode_image
from pipeline.cache.plan import read_prefix
from pipeline.cache.samples import RawSample, iter_samples, parse_label
from pipeline.cache.shards import expand_shards
from pipeline.cache.skips import BadSample, SkipReason
from pipeline.cache.unit import Unit
from pipeline.demo.data import (
    bad_samples,
    write_bad_shard,
    write_bad_shards,
    write_digit_shards,
    write_photo_shards,
    write_shard,
)

SAMPLE_LEVEL = (
    SkipReason.NO_IMAGE,
    SkipReason.NO_LABEL,
    SkipReason.BAD_LABEL,
    SkipReason.EMPTY_IMAGE,
)


def _read(url: str, **kwargs) -> tuple[list[RawSample], collections.Counter]:
    counts: collections.Counter[str] = collections.Counter()
    return list(iter_samples(url, counts=counts, **kwargs)), counts


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> str:
    return write_digit_shards(str(tmp_path_factory.mktemp("digits")), shards=1, per_shard=12)[0]


def test_digit_shard_round_trip(digits):
    samples, counts = _read(digits)
    assert [s.key for s in samples] == [f"digit-{i:06d}" for i in range(12)]
    assert all(0 <= s.label <= 9 for s in samples) and len({s.label for s in samples}) > 3
    assert not counts
    image = decode_image(samples[0].image, key=samples[0].key)
    assert image.mode == "RGB" and image.size == (64, 64)


def test_digit_shards_are_deterministic(tmp_path):
    first = write_digit_shards(str(tmp_path / "a"), shards=2, per_shard=4, seed=3, fmt="jpg")
    again = write_digit_shards(str(tmp_path / "b"), shards=2, per_shard=4, seed=3, fmt="jpg")
    other = write_digit_shards(str(tmp_path / "c"), shards=2, per_shard=4, seed=4, fmt="jpg")
    assert [os.path.basename(u) for u in first] == ["digits-0000.tar", "digits-0001.tar"]
    read = [Path(u).read_bytes() for u in first]
    assert read == [Path(u).read_bytes() for u in again]
    assert read != [Path(u).read_bytes() for u in other]
    samples, _ = _read(first[1])
    assert [s.key for s in samples] == [f"digit-{i:06d}" for i in range(4, 8)]
    assert Image.open(io.BytesIO(samples[0].image)).format == "JPEG"


def test_photo_shards_look_like_imagenet(tmp_path):
    urls = write_photo_shards(str(tmp_path), shards=1, per_shard=6, seed=1)
    samples, counts = _read(urls[0])
    assert len(samples) == 6 and not counts
    for sample in samples:
        image = decode_image(sample.image, key=sample.key)
        assert 360 <= image.width <= 440 and 315 <= image.height <= 385
        assert 0 <= sample.label < 7
        assert np.asarray(image).std() > 10  # a photo, not a flat colour


def test_each_bad_sample_is_counted_by_reason(tmp_path):
    url = str(tmp_path / "bad.tar")
    expected = write_bad_shard(url)
    samples, counts = _read(url)

    decoded = collections.Counter(counts)
    pixels = {}
    for sample in samples:
        try:
            pixels[sample.key] = decode_image(sample.image, key=sample.key).getpixel((5, 5))
        except BadSample as bad:
            assert bad.key == sample.key
            decoded[bad.reason.value] += 1

    want = collections.Counter(s.expect.value for s in expected if s.expect is not None)
    assert decoded == want
    assert set(pixels) == {s.key for s in expected if s.expect is None}
    for sample in expected:
        if sample.rgb is not None:
            assert np.allclose(pixels[sample.key], sample.rgb, atol=3), sample.key
    # Every kind the design names is in the catalogue.
    assert set(want) == {
        "no_image",
        "no_label",
        "bad_label",
        "empty_image",
        "undecodable",
        "truncated_image",
        "too_small",
        "too_large",
    }


def test_keys_labels_and_image_choice(tmp_path, caplog):
    """Images in any format the decoder reads are found by default (a .bmp or .tif sample,
    as other tools write them, was skipped as no_image without a word), and the first
    sample skipped of each kind is named with what it holds."""
    png = bad_samples()[0].files["png"]
    url = write_shard(
        str(tmp_path / "s.tar"),
        [
            ("a", {"JPG": png, "cls": b"3"}),  # extensions are case-insensitive
            ("b", {"png": png, "jpg": b"", "cls": b"4"}),  # jpg comes first: empty
            ("c", {"webp": png, "label": b"5"}),
            ("dir/d", {"jpeg": png, "cls": b"6", "json": b"{}"}),
            ("e", {"tif": png, "cls": b"7"}),
            ("f", {"bmp": png, "cls": b"8"}),
            ("f2", {"pgm": png, "cls": b"8"}),
            ("g", {"txt": b"a caption", "cls": b"9"}),
            ("h", {"svg": b"<svg/>", "cls": b"9"}),
        ],
    )
    with caplog.at_level(logging.WARNING, logger="pipeline.cache.samples"):
        samples, counts = _read(url)
    assert [(s.key, s.label) for s in samples] == [
        ("a", 3),
        ("dir/d", 6),
        ("e", 7),
        ("f", 8),
        ("f2", 8),
    ]
    assert counts == {"empty_image": 1, "no_label": 1, "no_image": 2}
    said = caplog.text
    assert f"skipping b in {url}: empty_image" in said
    assert f"skipping c in {url}: no_label: its files (.label, .webp) hold no label" in said
    assert f"skipping g in {url}: no_image: none of its files (.cls, .txt) is an image" in said
    assert "skipping h" not in said  # the second of a kind: at debug level
    caplog.clear()  # a later epoch of the shard: the same skips, counted and not named
    with caplog.at_level(logging.WARNING, logger="pipeline.cache.samples"):
        assert len(list(iter_samples(url, counts=counts, name_skips=False))) == 5
    assert not caplog.records

    samples, counts = _read(url, image_keys=(".PNG", "webp"), label_key="label")
    assert [(s.key, s.label) for s in samples] == [("c", 5)]
    assert counts == {"no_image": 7, "no_label": 1}
    with pytest.raises(ValueError, match="image_keys"):
        _read(url, image_keys="jpg")


def test_parse_label():
    assert parse_label(b"17") == 17
    assert parse_label(b" 3\n") == 3
    assert parse_label(b"+2") == 2
    assert parse_label(b"0" * 30 + b"5") == 5
    # a label of thousands of digits raised int()'s ValueError and failed the shard's unit
    for bad in (b"", b"-1", b"1.5", b"cat", b"\xff", b"1 2", "٣".encode(), b"9" * 5000, None):
        assert parse_label(bad) is None, bad
    assert parse_label(b'{"label": 7, "name": "cat"}', "label") == 7
    assert parse_label(b'{"meta": {"class_id": " 4"}}', "meta.class_id") == 4
    assert parse_label(b'{"label": 2.0}', "label") == 2  # JSON's 2.0 is 2: was a bad label
    for bad in (b'{"label": true}', b'{"label": -1}', b'{"label": 2.5}', b'{"label": null}',
                b'{"label": -1.0}', b'{"label": 1e300}', b'{"label": NaN}',
                b'{"other": 1}', b'[1]', b'{"label": "cat"}', b"\xff", b"{", b"7",
                b'{"label": "\\ud800"}', b'{"label": 1' + b"0" * 5000 + b"}"):  # fmt: skip
        assert parse_label(bad, "label") is None, bad


def test_labels_that_are_no_class_index_are_warned_of_once_per_shard(tmp_path, caplog):
    """Class names in .cls were only counted as bad_label: nothing named a shard or a value."""
    png = bad_samples()[0].files["png"]
    names = [(f"k{i}", {"png": png, "cls": name}) for i, name in enumerate([b"tench", b"goldfish"])]
    url = write_shard(str(tmp_path / "names.tar"), names)
    with caplog.at_level(logging.WARNING, logger="pipeline.cache.samples"):
        samples, counts = _read(url)
    assert not samples and counts == {"bad_label": 2}
    [warning] = [r.getMessage() for r in caplog.records]
    assert f"{url}: sample 'k0' has the label b'tench' (cls member)" in warning
    assert "not a class index" in warning and "--label-key" in warning
    # a JSON field's own value, past the member's first bytes; a sample without it has no label
    link = "https://example.com/images/" + "x" * 40
    members = [("k0", {"png": png, "json": f'{{"url": "{link}", "label": "tench"}}'.encode()}),
               ("k1", {"png": png, "json": b'{"name": "goldfish"}'})]  # fmt: skip
    url = write_shard(str(tmp_path / "fields.tar"), members)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline.cache.samples"):
        samples, counts = _read(url, label_key="json:label")
    assert not samples and counts == {"bad_label": 1, "no_label": 1}
    [warning, missing] = [r.getMessage() for r in caplog.records]
    assert "skipping k1" in missing and "its .json has no field label" in missing
    assert f"{url}: sample 'k0' has the label 'tench' (json member, field label)" in warning
    # a member that is no JSON, or a null field, holds a bad label; one too large to read is
    # named so (it failed the unit with a TypeError on every try)
    members = [
        ("k0", {"png": png, "json": b"{not json"}),
        ("k1", {"png": png, "json": b'{"label": null}'}),
    ]
    url = write_shard(str(tmp_path / "odd.tar"), members)
    assert _read(url, label_key="json:label")[1] == {"bad_label": 2}
    nested = [("k0", {"png": png, "json": b"{}"}), ("k1", {"png": png, "json": b'{"m": {}}'})]
    url = write_shard(str(tmp_path / "nested.tar"), nested)
    assert _read(url, label_key="json:m.label")[1] == {"no_label": 2}
    url = write_shard(str(tmp_path / "large.tar"), [("k0", {"png": png, "cls": b"7" * 5000})])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline.cache.samples"):
        samples, counts = _read(url, max_member_bytes=len(png))
    assert not samples and counts == {"bad_label": 1}
    assert "sample 'k0' has the label too large to read (cls member)" in caplog.text


def test_a_whole_number_label_reads_alike_from_cls_and_json(tmp_path, caplog):
    """A .cls "3.0" (pandas' text of a label) was a bad_label where a JSON 3.0 was label 3, and
    a JSON "3.0" refused again: now every spelling of a whole number is that label, and one
    that is no whole number is refused alike, naming the sample and its member."""
    png = bad_samples()[0].files["png"]
    members = [
        ("a", {"png": png, "cls": b"3.0\n", "json": b'{"label": "3.0"}'}),
        ("b", {"png": png, "cls": b"3", "json": b'{"label": 3.0}'}),
        ("c", {"png": png, "cls": b"3.5", "json": b'{"label": "3.5"}'}),
    ]
    url = write_shard(str(tmp_path / "s.tar"), members)
    for label_key, member in [("cls", "cls member"), ("json:label", "json member, field label")]:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="pipeline.cache.samples"):
            samples, counts = _read(url, label_key=label_key)
        assert [(s.key, s.label) for s in samples] == [("a", 3), ("b", 3)], label_key
        assert counts == {"bad_label": 1}
        said = f"sample 'c' has the label {b'3.5' if member == 'cls member' else '3.5'!r}"
        assert f"{said} ({member}), which is not a class index" in caplog.text


def test_a_label_read_from_a_field_of_a_json_member(tmp_path):
    png = bad_samples()[0].files["png"]
    url = write_shard(
        str(tmp_path / "s.tar"),
        [
            ("a", {"png": png, "json": b'{"label": 3, "meta": {"id": 9}}'}),
            ("b", {"png": png, "json": b'{"label": "4"}'}),
            ("c", {"png": png, "json": b'{"label": -1}'}),
            ("d", {"png": png, "cls": b"5"}),
        ],
    )
    samples, counts = _read(url, label_key="json:label")
    assert [(s.key, s.label) for s in samples] == [("a", 3), ("b", 4)]
    assert counts == {"bad_label": 1, "no_label": 1}
    samples, counts = _read(url, label_key="JSON:meta.id")
    assert [(s.key, s.label) for s in samples] == [("a", 9)]


def _write_members(path: Path, members: list[tuple[str, bytes]], encoding="utf-8") -> str:
    """A tar of ``members`` in exactly this order (as ``tar -cf`` without sorting may store)."""
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT, encoding=encoding) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def test_duplicate_member_keeps_first(tmp_path, caplog):
    png = bad_samples()[0].files["png"]
    members = [("a.png", png), ("a.cls", b"1"), ("a.cls", b"2"), ("b.png", png), ("b.cls", b"3")]
    samples, counts = _read(_write_members(tmp_path / "dup.tar", members))
    assert [(s.key, s.label) for s in samples] == [("a", 1), ("b", 3)]
    assert counts == {"duplicate_key": 1}
    assert "duplicate" in caplog.text
    # A whole sample twice in a row: the second copy is counted, as across shards.
    members = [("k.png", png), ("k.cls", b"1"), ("k.png", png), ("k.cls", b"2")]
    samples, counts = _read(_write_members(tmp_path / "twice.tar", members))
    assert [(s.key, s.label) for s in samples] == [("k", 1)] and counts == {"duplicate_key": 1}


def test_macos_appledouble_members_are_left_out_not_read_as_samples(tmp_path, caplog):
    """A tar made on macOS stores `train/._s0.jpg` before `train/s0.jpg` (extended attributes):
    its key `train/` split every sample of the folder, and all were skipped as `no_image` under
    a warning to sort the tar. `pvu plan` counted four times the samples."""
    png = bad_samples()[0].files["png"]
    apple = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + b"\x00" * 50
    members = [("__MACOSX/._train", apple)]
    for i in range(3):
        for ext, data in (("png", png), ("cls", str(i).encode())):
            members += [(f"train/._s{i}.{ext}", apple), (f"train/s{i}.{ext}", data)]
    url = _write_members(tmp_path / "mac.tar", members)
    samples, counts = _read(url)
    assert [(s.key, s.label) for s in samples] == [(f"train/s{i}", i) for i in range(3)]
    assert not counts and "next to each other" not in caplog.text
    assert len(read_prefix(url, max_samples=10, size=Path(url).stat().st_size).samples) == 3


def test_a_key_that_is_not_utf8_is_skipped_as_unsafe_not_fatal(tmp_path, caplog):
    """A latin-1 name (``café``) comes out of tarfile with surrogates no Parquet string holds:
    before, the unit failed on it and lost the whole shard. The log names it in text any log
    file takes (``caf\\xe9``): a surrogate made a UTF-8 log handler drop the line."""
    png = bad_samples()[0].files["png"]
    members = [("a.png", png), ("a.cls", b"1"), ("café.png", png), ("café.cls", b"2")]
    url = _write_members(
        tmp_path / "latin1.tar", [*members, ("z.png", png), ("z.cls", b"3")], "latin-1"
    )
    samples, counts = _read(url)
    assert [(s.key, s.label) for s in samples] == [("a", 1), ("z", 3)]
    assert counts == {"unsafe_name": 1}
    assert "skipping caf\\xe9 in" in caplog.text
    caplog.text.encode()  # no surrogate left


def test_files_apart_or_dotted_names_are_counted_once_each_and_explained(tmp_path, caplog):
    """A tar written in directory order, not by name, splits each sample in two; dots in file
    names merge images into one key. Each lost sample counts once, and the log says why."""
    png = bad_samples()[0].files["png"]
    apart = [("a.png", png), ("b.cls", b"1"), ("a.cls", b"0"), ("b.png", png), ("c.png", png)]
    samples, counts = _read(_write_members(tmp_path / "apart.tar", [*apart, ("c.cls", b"2")]))
    assert [(s.key, s.label) for s in samples] == [("c", 2)]
    assert counts == {"no_label": 1, "no_image": 1}  # a and b, once each
    assert "tar --sort=name" in caplog.text
    dotted = [(f"cat.{i}.jpg", png) for i in range(3)] + [("dog.jpg", png), ("dog.cls", b"1")]
    samples, counts = _read(_write_members(tmp_path / "dotted.tar", dotted))
    assert [s.key for s in samples] == ["dog"] and counts == {"no_image": 1}
    assert "cat.0.jpg" in caplog.text and "first dot" in caplog.text


@pytest.mark.parametrize("where", ["before", "after"])
def test_a_stray_part_of_a_sample_that_is_cached_is_no_skip(tmp_path, caplog, where):
    """A sample's image and label together, its ``.json`` apart (added with ``tar -rf``, or
    stored in directory order): every sample was cached, yet each stray ``.json`` counted as a
    skipped ``no_image`` sample, named as skipped, and the tar was never said to be apart."""
    png = bad_samples()[0].files["png"]
    whole = [(f"s{i}.{ext}", data) for i in range(2) for ext, data in (("png", png), ("cls", b"1"))]
    stray = [(f"s{i}.json", b"{}") for i in range(2)]
    members = [*stray, *whole] if where == "before" else [*whole, *stray]
    samples, counts = _read(_write_members(tmp_path / "apart.tar", members))
    assert [s.key for s in samples] == ["s0", "s1"]
    assert not counts
    assert "tar --sort=name" in caplog.text


def test_oversized_member_is_skipped_unread(tmp_path):
    png = bad_samples()[0].files["png"]
    url = write_shard(
        str(tmp_path / "big.tar"),
        [("a", {"png": png + b"\0" * 5000, "cls": b"1"}), ("b", {"png": png, "cls": b"2"})],
    )
    samples, counts = _read(url, max_member_bytes=len(png) + 10)
    assert [s.key for s in samples] == ["b"] and counts == {"too_large": 1}


# --- damaged tar files --------------------------------------------------------------------


def _cut(src: str, dst: str, keep: int) -> str:
    Path(dst).write_bytes(Path(src).read_bytes()[:keep])
    return dst


def _member_offsets(url: str) -> list[tuple[str, int, int]]:
    """(name, header offset, data end) of each member."""
    with tarfile.open(url) as tar:
        return [(m.name, m.offset, m.offset_data + m.size) for m in tar.getmembers()]


def test_truncated_tar_keeps_samples_before_damage(digits, tmp_path, caplog):
    full = [s.key for s in _read(digits)[0]]
    members = _member_offsets(digits)
    end = members[-1][2]
    cut = str(tmp_path / "cut.tar")
    # Cut inside headers, inside data, and exactly at member boundaries.
    points = {100, 511, 512, 513, end - 1}  # a zero-byte shard is another kind (below)
    for _, header, data_end in members[::3]:
        points |= {header, header + 200, data_end, data_end - 1}
    caplog.set_level(logging.WARNING, logger="pipeline.cache.samples")
    for keep in sorted(points - {0}):
        caplog.clear()
        samples, counts = _read(_cut(digits, cut, keep))
        keys = [s.key for s in samples]
        assert keys == full[: len(keys)], keep
        assert counts == {"truncated_tar": 1}, keep
        assert cut in caplog.text and "truncated or corrupt tar" in caplog.text
        # Every sample whose members all lie before the cut is kept.
        whole = {name.split(".")[0] for name, _, e in members if e <= keep}
        cut_short = {name.split(".")[0] for name, _, e in members if e > keep}
        assert set(keys) == whole - cut_short, keep


def test_tar_ending_at_a_sample_boundary_keeps_that_sample(digits, tmp_path):
    members = _member_offsets(digits)
    # Members are a.png, a.cls, b.png, b.cls, ...: cut right before the 3rd sample's header.
    keep = members[4][1]
    samples, counts = _read(_cut(digits, str(tmp_path / "cut.tar"), keep))
    assert [s.key for s in samples] == ["digit-000000", "digit-000001"]
    assert counts == {"truncated_tar": 1}


def test_whole_tar_ends_cleanly_even_without_padding(digits, tmp_path):
    members = _member_offsets(digits)
    # The end-of-archive marker is two zero blocks; one is enough to know the archive ended.
    padded_end = -(-members[-1][2] // 512) * 512
    samples, counts = _read(_cut(digits, str(tmp_path / "short.tar"), padded_end + 512))
    assert len(samples) == 12 and not counts
    samples, counts = _read(_cut(digits, str(tmp_path / "short.tar"), padded_end + 511))
    assert len(samples) == 12 and counts == {"truncated_tar": 1}


def test_tars_joined_with_cat_count_what_follows_the_first_end_marker(digits, tmp_path, caplog):
    """'cat a.tar b.tar' lost b's samples with no word: every tar reader stops at a's end
    marker. The shard keeps a's samples and counts the damage, saying how to join tars."""
    joined = tmp_path / "joined.tar"
    joined.write_bytes(Path(digits).read_bytes() * 2)
    caplog.set_level(logging.WARNING, logger="pipeline.cache.samples")
    samples, counts = _read(str(joined))
    assert len(samples) == 12 and counts == {"truncated_tar": 1}
    assert "data after the end-of-archive marker" in caplog.text and "--concatenate" in caplog.text
    # compressed tars joined with cat (one gzip file of two members): b's samples were lost
    # with no word. The check stops at the first member's end: tarfile reads on past it in
    # quadratic time (a joined 40 MB gzip took a minute).
    shard = Path(digits).read_bytes()
    tail = {"gz": os.urandom(40 << 20), "bz2": b"", "xz": b""}
    for suffix, compress in (("gz", gzip.compress), ("bz2", bz2.compress), ("xz", lzma.compress)):
        caplog.clear()
        packed = tmp_path / f"joined.tar.{suffix}"
        packed.write_bytes(compress(shard) + compress(shard + tail[suffix]))
        started = time.monotonic()
        samples, counts = _read(str(packed))
        assert len(samples) == 12 and counts == {"truncated_tar": 1}, suffix
        assert "data after the end-of-archive marker" in caplog.text
        assert time.monotonic() - started < 10
        packed.write_bytes(compress(shard) + bytes(1000))  # zeros after it: padding, no data
        assert _read(str(packed))[1] == {}
        packed.write_bytes(compress(shard) + compress(bytes(1024)))  # a member of zeros: too
        assert _read(str(packed))[1] == {}, suffix


def test_a_whole_gzip_tar_is_sound_wherever_its_trailer_falls(tmp_path):
    """gzip's 8-byte trailer (CRC-32, length) split across two of tarfile's reads (10 KiB,
    after a first 512 bytes): its second part was taken for data after the archive, and a
    sound shard counted truncated (about 1 shard in 1,500)."""
    noise = np.random.default_rng(0).integers(0, 256, 30_000, dtype=np.uint8).tobytes()

    def packed(size: int) -> bytes:
        tar = io.BytesIO()
        with tarfile.open(fileobj=tar, mode="w") as archive:
            for name, data in (("a.bin", noise[:size]), ("a.cls", b"1")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
        return gzip.compress(tar.getvalue(), mtime=0)

    splits = {}  # trailer bytes in the last read -> a gzip tar split so
    for size in range(20_000, 30_000):
        data = packed(size)
        left = (len(data) - 512) % tarfile.RECORDSIZE
        if 0 < left < 8:
            splits.setdefault(left, data)
    assert len(splits) >= 4, sorted(splits)  # 1, 2, 4, 6 and 7 with this noise
    for left, data in splits.items():
        path = tmp_path / f"split-{left}.tar.gz"
        path.write_bytes(data)
        assert "truncated_tar" not in _read(str(path))[1], left


def test_linked_members_are_named_not_only_counted_as_no_image(tmp_path, caplog):
    """GNU tar stores a file hard-linked twice as a link: its sample was counted no_image, with
    no hint that a stream cannot follow links."""
    png = io.BytesIO()
    Image.new("RGB", (16, 16), (9, 90, 200)).save(png, format="PNG")
    path = tmp_path / "linked.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in [("a.png", png.getvalue()), ("a.cls", b"1"), ("b.cls", b"2")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("b.png")
        link.type, link.linkname = tarfile.LNKTYPE, "a.png"
        tar.addfile(link)
    caplog.set_level(logging.WARNING, logger="pipeline.cache.samples")
    samples, counts = _read(str(path))
    assert [sample.key for sample in samples] == ["a"] and counts == {"no_image": 1}
    assert "1 member(s) are links (e.g. b.png)" in caplog.text
    # symbolic links too; --hard-dereference alone left them links
    assert "--dereference for symbolic links, --hard-dereference for hard ones" in caplog.text


@pytest.mark.parametrize("content", [b"", b"\0" * 100, os.urandom(4096), b"GIF89a" * 200])
def test_not_a_tar(tmp_path, content):
    path = tmp_path / "junk.tar"
    path.write_bytes(content)
    samples, counts = _read(str(path))
    assert samples == [] and counts == {"empty_shard" if not content else "truncated_tar": 1}


@pytest.mark.parametrize(
    ("magic", "kind"),
    [(b"\x28\xb5\x2f\xfd", "a zstd-compressed file"), (b"PK\x03\x04", "a zip file")],
)
def test_an_archive_that_is_no_tar_is_named_as_what_it_is(tmp_path, caplog, magic, kind):
    """A .tar.zst (or a zip) listed as a shard was named only 'truncated or corrupt tar
    (ReadError: invalid header)', as if a tar had been cut short."""
    path = tmp_path / "shard.tar.zst"
    path.write_bytes(magic + os.urandom(4096))
    caplog.set_level(logging.WARNING, logger="pipeline.cache.samples")
    samples, counts = _read(str(path))
    assert samples == [] and counts == {"truncated_tar": 1}
    assert f"{path}: truncated or corrupt tar ({kind}, which no tar reader here opens" in (
        caplog.text
    )


def test_a_listed_file_that_is_no_tar_is_named(tmp_path, caplog):
    """A JPEG or a text file named in a shard list was counted 'truncated or corrupt tar
    (ReadError: bad checksum)', as if a tar had been cut short; pvu plan said the same."""
    jpeg = io.BytesIO()
    Image.new("RGB", (32, 32), (9, 90, 200)).save(jpeg, format="JPEG")
    (tmp_path / "cat.jpg").write_bytes(jpeg.getvalue())
    (tmp_path / "notes.txt").write_text("shard-000000.tar\n" * 50)
    (tmp_path / "list.txt").write_text("cat.jpg\nnotes.txt\n")
    photo, notes = expand_shards(str(tmp_path / "list.txt"))
    caplog.set_level(logging.WARNING)
    for url in (photo, notes):
        samples, counts = _read(url)
        assert samples == [] and counts == {"truncated_tar": 1}
        read_prefix(url, 8, Path(url).stat().st_size)
    assert f"{photo}: truncated or corrupt tar (a JPEG image, not a tar: list only shards " in (
        caplog.text
    )
    assert f"{photo}: a JPEG image, not a tar: list only shards that are a .tar or " in caplog.text
    assert f"{notes}: truncated or corrupt tar (not a tar (a text file? " in caplog.text
    assert f"{notes}: not a tar (a text file? a tar cut short in its first 512" in caplog.text


def test_a_sound_tar_without_samples_is_named(tmp_path, caplog):
    """An intact tar of folders alone (or none at all) gave 0 rows and no word of it."""
    folder = tarfile.TarInfo("train")
    folder.type = tarfile.DIRTYPE
    with tarfile.open(tmp_path / "folders.tar", "w") as tar:
        tar.addfile(folder)
    samples, counts = _read(str(tmp_path / "folders.tar"))
    assert samples == [] and not counts
    assert f"{tmp_path}/folders.tar: a sound tar that holds no sample's files" in caplog.text


def test_members_of_no_sample_are_named(tmp_path, caplog):
    """Members whose names WebDataset splits into no key (no extension, a leading dot) were
    dropped by group_by_keys without a word: their samples were lost unseen."""
    png = io.BytesIO()
    Image.new("RGB", (16, 16), (9, 90, 200)).save(png, format="PNG")
    members = [("a.png", png.getvalue()), ("a.cls", b"1"), (".b.png", png.getvalue()),
               (".b.cls", b"2"), ("c", png.getvalue()), ("README", b"hi")]  # fmt: skip
    url = str(tmp_path / "unkeyed.tar")
    with tarfile.open(url, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    caplog.set_level(logging.WARNING, logger="pipeline.cache.samples")
    samples, counts = _read(url)
    assert [sample.key for sample in samples] == ["a"] and not counts
    assert f"{url}: left out 4 member(s) that belong to no sample, e.g. '.b.png'" in caplog.text
    caplog.clear()
    _read(url, name_skips=False)  # a later epoch: the same, at debug level
    assert "belong to no sample" not in caplog.text


def test_corrupt_header_mid_tar(digits, tmp_path):
    members = _member_offsets(digits)
    data = bytearray(Path(digits).read_bytes())
    header = members[6][1]
    data[header : header + 100] = b"\x07" * 100  # garbles name and checksum of sample 3
    path = tmp_path / "garbled.tar"
    path.write_bytes(bytes(data))
    samples, counts = _read(str(path))
    assert [s.key for s in samples] == ["digit-000000", "digit-000001", "digit-000002"]
    assert counts == {"truncated_tar": 1}


def test_gzipped_tar_and_its_truncation(digits, tmp_path):
    packed = gzip.compress(Path(digits).read_bytes())
    whole = tmp_path / "digits.tar.gz"
    whole.write_bytes(packed)
    samples, counts = _read(str(whole))
    assert len(samples) == 12 and not counts
    half = tmp_path / "half.tar.gz"
    half.write_bytes(packed[: len(packed) // 2])
    samples, counts = _read(str(half))
    assert 0 < len(samples) < 12 and counts == {"truncated_tar": 1}


# --- storage: S3 and transient errors -----------------------------------------------------


@pytest.mark.slow
def test_reads_from_s3_like_local(s3_bucket, digits):
    (url,) = write_digit_shards(f"{s3_bucket}/shards", shards=1, per_shard=12)
    assert url == f"{s3_bucket}/shards/digits-0000.tar"
    assert fsspec.filesystem("s3").cat_file(url) == Path(digits).read_bytes()
    local = _read(digits)[0]
    remote, counts = _read(url)
    assert remote == local and not counts
    # Small read-ahead blocks: the shard streams in many ranged GETs.
    assert _read(url, block_size=4096) == (local, collections.Counter())
    bad = write_bad_shard(f"{s3_bucket}/shards/bad.tar")
    _, counts = _read(f"{s3_bucket}/shards/bad.tar")
    assert counts == collections.Counter(s.expect.value for s in bad if s.expect in SAMPLE_LEVEL)


@pytest.mark.slow
def test_missing_object_on_s3_fails_at_once_with_url(s3_bucket):
    url = f"{s3_bucket}/shards/absent.tar"
    with pytest.raises(FileNotFoundError, match=re.escape(url.removeprefix("s3://"))):
        _read(url, base_delay=10.0)  # would take minutes if it were retried


class FlakyFileSystem(LocalFileSystem):
    """Local files behind ``flaky://`` that fail the way networks do: on open and mid-read."""

    protocol = "flaky"
    root_marker = "/"
    fail_opens: ClassVar[int] = 0
    fail_reads_at: ClassVar[list[int]] = []  # byte positions where a read drops the connection
    opens: ClassVar[int] = 0

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(path.removeprefix("flaky://"))

    def _open(self, path, mode="rb", **kwargs):
        type(self).opens += 1
        if type(self).fail_opens:
            type(self).fail_opens -= 1
            raise ConnectionError(f"connection refused: {path}")
        return _FlakyFile(super()._open(path, mode, **kwargs))


class _FlakyFile:
    def __init__(self, file):
        self._file = file

    def read(self, size=-1):
        start = self._file.tell()
        end = start + (size if size >= 0 else 1 << 62)
        for position in FlakyFileSystem.fail_reads_at:
            if start <= position < end:
                FlakyFileSystem.fail_reads_at.remove(position)
                raise ConnectionResetError(f"connection reset at byte {position}")
        return self._file.read(size)

    def __getattr__(self, name):
        return getattr(self._file, name)


@pytest.fixture
def flaky():
    fsspec.register_implementation("flaky", FlakyFileSystem, clobber=True)
    FlakyFileSystem.fail_opens, FlakyFileSystem.fail_reads_at, FlakyFileSystem.opens = 0, [], 0
    yield FlakyFileSystem
    FlakyFileSystem.fail_opens, FlakyFileSystem.fail_reads_at = 0, []


def test_transient_errors_are_retried(digits, flaky, caplog):
    expected = _read(digits)[0]
    flaky.fail_opens = 2
    size = os.path.getsize(digits)
    flaky.fail_reads_at = [100, size // 2, size // 2 + 1]
    samples, counts = _read("flaky://" + digits, base_delay=0.0)
    assert samples == expected and not counts
    assert flaky.opens == 2 + 1 + 3  # two refused, the first good one, one per dropped read
    assert "retrying" in caplog.text and digits in caplog.text


def test_persistent_errors_fail_with_url(digits, flaky):
    flaky.fail_opens = 99
    with pytest.raises(ConnectionError, match=f"open flaky://{digits} failed after 3"):
        _read("flaky://" + digits, attempts=3, base_delay=0.0)
    assert flaky.opens == 3


def test_shards_bad_as_a_whole_are_counted_by_kind(tmp_path):
    expected = write_bad_shards(str(tmp_path))
    survivors = {"empty.tar": [], "cut.tar.gz": ["ok-cut-0"], "climb.tar": ["ok-climb"]}
    # dup-*.tar are bad only together: the cache job's driver counts them (test_cache_job).
    for name in survivors:
        samples, got = _read(str(tmp_path / name))
        assert dict(got) == expected[name], name
        assert [sample.key for sample in samples] == survivors[name], name


def test_a_shard_cut_short_after_it_was_listed_is_no_unit_of_fewer_samples(digits, tmp_path):
    """A shard rewritten shorter while the run reads it (a copy over it in progress) is an
    error, not a ``truncated_tar`` unit recorded with the size listed before: once the copy
    completed, that size would match again and the lost samples never be read."""
    from pipeline.cache.samples import ShardChanged

    listed = os.path.getsize(digits)
    cut = _cut(digits, str(tmp_path / "cut.tar"), listed // 3)
    with pytest.raises(ShardChanged, match=r"cut\.tar: ended at byte .* where [\d,]+ were listed"):
        list(iter_samples(cut, counts=collections.Counter(), source_bytes=listed))
    # A shard damaged at the size it was listed at is still a truncated tar.
    counts: collections.Counter[str] = collections.Counter()
    list(iter_samples(cut, counts=counts, source_bytes=os.path.getsize(cut)))
    assert counts == {"truncated_tar": 1}


def test_json_python_cannot_read_is_a_bad_member_not_a_failed_unit(tmp_path):
    """A label member nested past the JSON decoder's depth (RecursionError) and an ambiguity
    member of a 400-digit integer (OverflowError in ``math.isfinite``) raised out of the shard
    and failed its unit on every try: bad input is counted or read as absent instead."""
    png = bad_samples()[0].files["png"]
    members = [
        ("a", {"png": png, "json": b'{"label": ' * 100_000, "amb": b"0.5"}),
        ("b", {"png": png, "json": b'{"label": 2}', "amb": b"1" * 400}),
        ("c", {"png": png, "json": b'{"label": 3}', "amb": b"[" + b"9" * 400 + b", 1]"}),
        ("d", {"png": png, "json": b'{"label": 4}', "amb": b"[" * 100_000}),
    ]
    url = write_shard(str(tmp_path / "s.tar"), members)
    samples, counts = _read(url, label_key="json:label", ambiguity_key="amb")
    assert [(s.key, s.label, s.ambiguity) for s in samples] == [
        ("b", 2, None),
        ("c", 3, None),
        ("d", 4, None),
    ]
    assert counts == {"bad_label": 1}


def test_a_sample_of_dotted_member_names_is_told_how_to_name_its_image(tmp_path, caplog):
    """``n0.input.jpg`` + ``n0.target.cls`` (WebDataset's multi-part extensions) was skipped
    with the advice to rename the files, as if several images shared one key; naming the
    members reads them as they are."""
    png = bad_samples()[0].files["png"]
    members = [
        (f"n{i}.{suffix}", data)
        for i in range(2)
        for suffix, data in (("input.png", png), ("seg.png", png), ("target.cls", str(i).encode()))
    ]
    url = _write_members(tmp_path / "multi.tar", members)
    samples, counts = _read(url)
    assert not samples and counts == {"no_image": 2}
    advice = " ".join(caplog.text.split())  # it named input.png alone, and no label member
    assert (
        "--image-key one of input.png, seg.png, and its label member: --label-key target.cls"
        in (advice)
    )
    samples, counts = _read(url, image_keys=("input.png",), label_key="target.cls")
    assert [(s.key, s.label) for s in samples] == [("n0", 0), ("n1", 1)] and not counts
    image_key = re.search(r"--image-key one of (\S+),", advice)[1]  # the advice, followed
    label_key = re.search(r"--label-key (\S+)", advice)[1]
    output = tmp_path / "cache"
    runner = make_runner(str(output), image_keys=(image_key,), label_key=label_key)
    assert runner.run(Unit(url, "multi", 0)).rows == 2
    rows = pq.read_table(output / "epoch=0000" / "multi.parquet").to_pydict()
    assert rows["key"] == ["n0", "n1"] and rows["label"] == [0, 1]
    caplog.clear()  # rgb.png + depth.png: it said --image-key depth.png, the first by name
    members = [(f"n0.{suffix}", data) for suffix, data in (("rgb.png", png), ("depth.png", png))]
    _read(_write_members(tmp_path / "rgbd.tar", [*members, ("n0.cls", b"1")]))
    advice = " ".join(caplog.text.split())
    assert "--image-key one of depth.png, rgb.png" in advice and "--label-key" not in advice


@pytest.mark.parametrize(
    ("member", "text", "label_key", "advised"),
    [
        ("target.cls", b"%d", "cls", "target.cls"),
        ("cls.txt", b"%d", "cls", "cls.txt"),
        ("label.txt", b"%d", "label", "label.txt"),
        ("meta.json", b'{"label": %d}', "json:label", "meta.json:label"),
    ],
)
def test_a_plain_image_with_a_dotted_label_member_is_told_its_label_key(
    tmp_path, caplog, member, text, label_key, advised
):
    """``n0.png`` + ``n0.cls.txt``: each sample was skipped as no_label with no word of the
    --label-key that reads it, as dotted image names are told theirs."""
    png = bad_samples()[0].files["png"]
    members = [
        (f"n{i}.{name}", data)
        for i in range(2)
        for name, data in (("png", png), (member, text % i))
    ]
    url = _write_members(tmp_path / "s.tar", members)
    samples, counts = _read(url, label_key=label_key)
    assert not samples and counts == {"no_label": 2}
    advice = " ".join(caplog.text.split())
    assert f"({label_key}); its label member: --label-key {advised}" in advice, advice
    followed = re.search(r"its label member: --label-key (\S+)", advice)[1]  # the advice, followed
    samples, counts = _read(url, label_key=followed)
    assert [(s.key, s.label) for s in samples] == [("n0", 0), ("n1", 1)] and not counts
