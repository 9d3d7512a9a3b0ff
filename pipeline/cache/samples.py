"""Samples: stream one WebDataset tar shard from any fsspec URL into (key, image bytes, label).

The shard is read as a stream, member by member, never downloaded whole. Files are grouped
into samples by webdataset's own ``group_by_keys`` (so keys are exactly WebDataset's
``__key__``). Bad samples are counted by ``SkipReason`` and skipped; a damaged tar yields the
samples before the damage, counts ``truncated_tar`` once and ends the shard (a zero-byte shard
counts ``empty_shard``). Member names are never used as paths: a sample whose key is absolute,
climbs out (``../../x``) or is not UTF-8 is counted ``unsafe_name`` and skipped. A sample whose
files repeat in a row (a copy of it, or one file twice) keeps the first of each file and
counts one ``duplicate_key``, however many repeats. Transient
storage errors, on open or mid-stream, are retried: the object is reopened at the byte it was
read to.
"""

from __future__ import annotations

import bz2
import collections
import json
import logging
import lzma
import math
import re
import reprlib
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import fsspec
from webdataset.tariterators import base_plus_ext, group_by_keys

from pipeline.cache.shards import TAR_FORMATS
from pipeline.cache.skips import SkipReason
from pipeline.dataset.names import readable
from pipeline.retry import retry

logger = logging.getLogger(__name__)

#: The image members tried, in order: every format the decoder reads (``pvu shards`` writes
#: jpg, png or webp; other tools also bmp, gif, tiff or netpbm's ppm, pgm, pbm and pnm).
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm", "pbm", "pnm")
MAX_MEMBER_BYTES = 256 * 2**20
#: Members no sample holds: webdataset's metadata files (``__key__`` and friends), and the
#: AppleDouble files macOS's tar adds (``._<name>`` beside each file, ``__MACOSX/``), whose keys
#: (``train/`` for ``train/._s0.jpg``) split every sample of a folder from its own files
METADATA_MEMBER = re.compile(r"__[^/]*__($|/)|__MACOSX/|(.*/)?\._[^/]*$")
# at most 19 significant digits (int64), so that no label parses thousands of digits; a whole
# number as pandas writes one (``3.0``) too, as in a JSON field, a label remap and a table
_LABEL = re.compile(rb"\s*\+?0*([0-9]{1,19})(?:\.0*)?\s*")
_INT64_MAX = 2**63 - 1
#: A label member, or a JSON member's field, that a sample does not have.
_ABSENT = object()


@dataclass(frozen=True, slots=True)
class RawSample:
    """One sample as stored: its ``__key__``, the encoded image bytes, the integer label and,
    when asked for, its ambiguity (:func:`parse_ambiguity`; None where absent or unreadable)."""

    key: str
    image: bytes
    label: int
    ambiguity: float | None = None


def iter_samples(
    url: str,
    *,
    image_keys: tuple[str, ...] = IMAGE_KEYS,
    label_key: str = "cls",
    ambiguity_key: str | None = None,
    counts: collections.Counter[str],
    name_skips: bool = True,
    max_member_bytes: int = MAX_MEMBER_BYTES,
    attempts: int = 5,
    base_delay: float = 0.5,
    block_size: int | None = None,
    source_bytes: int | None = None,
) -> Iterator[RawSample]:
    """Yield the valid samples of the tar shard at ``url``, in shard order.

    The image is the first of ``image_keys`` (file extensions, case-insensitive) a sample has;
    the label is the ASCII integer in its ``label_key`` file, or with ``label_key`` as
    ``EXT:FIELD`` the integer at ``FIELD`` (dots for nested objects) of its JSON member ``EXT``
    (:func:`parse_label`). Each skipped sample adds one to
    ``counts[reason.value]``: ``no_image``, ``empty_image``, ``too_large`` (a member over
    ``max_member_bytes``, not read into memory), ``no_label``, ``bad_label`` (not a
    non-negative integer); with ``name_skips``, the first of each kind and the shard's layout
    faults are logged as warnings (else at debug level: a later epoch reads the same shard).
    ``ambiguity_key`` names an optional member read with
    :func:`parse_ambiguity`; its absence never skips a sample. A truncated or corrupt tar adds
    one ``truncated_tar`` and ends the shard after its last intact sample. Storage errors are
    retried ``attempts`` times with exponential backoff from ``base_delay`` seconds; a
    permanent one raises with the URL.
    ``block_size`` is the filesystem's read-ahead (its own default when None; 50 MiB on S3).
    ``source_bytes``: the shard's size when the run listed it. A tar that ends in damage while
    the shard now has another size was rewritten as it was read (a copy over it, a rebuild):
    :class:`ShardChanged` is raised rather than its samples after the damage lost under a unit
    that records the listed size.
    """
    image_keys = _normalise_keys(image_keys, "image_keys")
    member, _, field = label_key.partition(":")
    label = (*_normalise_keys((member,), "label_key"), field)  # (member, JSON field or "")
    if ambiguity_key is not None:
        (ambiguity_key,) = _normalise_keys((ambiguity_key,), "ambiguity_key")
    if max_member_bytes <= 0:
        raise ValueError(f"max_member_bytes must be positive, got {max_member_bytes}")

    damage: list[str] = []
    repeated: set[str] = set()  # keys whose member names repeat in a row (the second copy)
    yielded = 0
    level = logging.WARNING if name_skips else logging.DEBUG
    skips = _Skips(url, image_keys, label_key, label, counts, level)
    stream = _StorageStream(url, attempts=attempts, base_delay=base_delay, block_size=block_size)
    with stream:
        unkeyed: list[str] = []  # members no sample can hold (no key by WebDataset's split)
        members = _keyed(_tar_members(stream, url, damage, max_member_bytes), unkeyed)
        sampled = False  # a sample's files were found, whatever became of them
        for group in group_by_keys(members, handler=_duplicate_handler(url, repeated)):
            sampled = True
            outcome = _to_sample(group, image_keys, label, ambiguity_key)
            if damage:
                # The sample being assembled when the damage was found: all its files were
                # read intact, but more may have followed. Keep it only if it is complete.
                if isinstance(outcome, RawSample):
                    skips.kept(outcome.key)
                    yielded += 1
                    yield outcome
                else:
                    logger.debug(
                        "%s: dropped %s, cut off by the damage", url, readable(group["__key__"])
                    )
                break
            if group["__key__"] in repeated:
                repeated.discard(group["__key__"])
                counts[SkipReason.DUPLICATE_KEY.value] += 1
            if isinstance(outcome, RawSample):
                skips.kept(outcome.key)
                yielded += 1
                yield outcome
            else:
                skips.add(group, outcome)
    if unkeyed:
        logger.log(
            level,
            "%s: left out %d member(s) that belong to no sample, e.g. %r: a WebDataset name is "
            "<key>.<extension>, with a key before the base name's first dot",
            *(url, len(unkeyed), unkeyed[0]),
        )
    if damage and stream.position == 0:
        counts[SkipReason.EMPTY_SHARD.value] += 1
        logger.warning("%s: empty shard (0 bytes)", url)
    elif not sampled and not damage:
        logger.warning("%s: a sound tar that holds no sample's files; nothing read", url)
    elif damage:
        if source_bytes is not None:
            size = retry(stream.size, attempts=attempts, base_delay=base_delay, what=f"size {url}")
            _check_unchanged(url, stream.position, damage[0], size, source_bytes)
        counts[SkipReason.TRUNCATED_TAR.value] += 1
        logger.warning(
            "%s: truncated or corrupt tar (%s); kept the %d samples before the damage",
            url,
            damage[0],
            yielded,
        )


def _keyed(members: Iterator[dict[str, Any]], unkeyed: list[str]) -> Iterator[dict[str, Any]]:
    """``members`` whose names WebDataset splits into a key and an extension; the names of
    the others (``README``, ``.hidden.jpg``), which ``group_by_keys`` drops without a word,
    are appended to ``unkeyed``."""
    for member in members:
        if base_plus_ext(member["fname"])[0] is None:
            unkeyed.append(member["fname"])
        else:
            yield member


#: Leading bytes of archives and compressions that are no tar and that ``tarfile`` does not
#: open (it reads gzip, bzip2 and xz), named in the damage they come out as.
_FOREIGN = {
    b"\x28\xb5\x2f\xfd": "a zstd-compressed file",
    b"\x04\x22\x4d\x18": "an LZ4-compressed file",
    b"PK\x03\x04": "a zip file",
    b"7z\xbc\xaf\x27\x1c": "a 7z file",
    b"Rar!": "a RAR file",
}


#: Leading bytes of files a shard list may name by mistake that are no archive at all.
_NOT_ARCHIVES = {
    b"\xff\xd8\xff": "a JPEG image",
    b"\x89PNG": "a PNG image",
    b"GIF8": "a GIF image",
    b"%PDF": "a PDF file",
}


#: Bytes of a file's start that :func:`not_a_tar` looks at.
FOREIGN_HEAD_BYTES = max(map(len, _FOREIGN | _NOT_ARCHIVES))


class NoTarHeader(tarfile.ReadError):
    """A file whose first 512 bytes are no tar header (:class:`EndRecordingTarInfo`): no tar
    at all, or one cut short inside its first header."""


def foreign_archive(head: bytes) -> str | None:
    """What a file that starts with ``head`` is and what to do, where it is a known archive or
    compression that no tar reader here opens; None otherwise."""
    kind = next((kind for magic, kind in _FOREIGN.items() if head.startswith(magic)), None)
    return kind and f"{kind}, which no tar reader here opens: make it {TAR_FORMATS}"


def not_a_tar(head: bytes, error: NoTarHeader) -> str:
    """The damage of a file that starts with ``head`` and raised ``error``: what it is, by its
    first :data:`FOREIGN_HEAD_BYTES`, and what to do."""
    kind = next((kind for magic, kind in _NOT_ARCHIVES.items() if head.startswith(magic)), None)
    named = foreign_archive(head) or (
        f"{kind or 'not a tar (a text file? a tar cut short in its first 512 bytes?)'}"
        f"{', not a tar' if kind else ''}: list only shards that are {TAR_FORMATS}"
    )
    return f"{named}; its first header: {error}"


def _check_unchanged(url: str, position: int, damage: str, size: int, listed: int) -> None:
    """Raise :class:`ShardChanged` when a shard that ended in ``damage`` at byte ``position``
    now holds ``size`` bytes, not the ``listed`` ones: it was rewritten as it was read."""
    if size != listed:
        raise ShardChanged(
            f"{url}: ended at byte {position:,} ({damage}), and it now holds {size:,} bytes "
            f"where {listed:,} were listed: it was rewritten while read; run the same command "
            "again once it is complete"
        )


def _normalise_keys(keys: tuple[str, ...], name: str) -> tuple[str, ...]:
    if isinstance(keys, str) or not keys:
        raise ValueError(f"{name} must be a non-empty tuple of file extensions, got {keys!r}")
    out = tuple(key.strip().lstrip(".").lower() for key in keys)
    if not all(out):
        raise ValueError(f"{name} has an empty file extension: {keys!r}")
    return out


def is_safe_name(name: str) -> bool:
    """Whether a member name (or key) stays inside a folder it is joined to: relative, never
    climbing out (``..``), UTF-8."""
    return not name.startswith("/") and ".." not in name.split("/") and _is_utf8(name)


def _to_sample(
    group: dict[str, Any],
    image_keys: tuple[str, ...],
    label_key: tuple[str, str],
    ambiguity_key: str | None,
):
    """A ``RawSample`` from one group of files, or the ``SkipReason`` it is rejected for.
    ``label_key`` is the label's member and its JSON field ("" for a whole ``.cls`` file)."""
    key = group["__key__"]
    if not is_safe_name(key):
        return SkipReason.UNSAFE_NAME
    image_key = next((key for key in image_keys if key in group), None)
    if image_key is None:
        return SkipReason.NO_IMAGE
    image = group[image_key]
    if image is None:
        return SkipReason.TOO_LARGE
    if not image:
        return SkipReason.EMPTY_IMAGE
    member, field = label_key
    data = group.get(member, _ABSENT)
    value = _json_field(data, field) if field else data
    if value is _ABSENT:
        return SkipReason.NO_LABEL
    label = _label(value) if field else parse_label(data)
    if label is None:
        return SkipReason.BAD_LABEL
    ambiguity = parse_ambiguity(group.get(ambiguity_key)) if ambiguity_key else None
    return RawSample(key=group["__key__"], image=image, label=label, ambiguity=ambiguity)


def _one_of(names: list[str], suffix: str = "") -> str:
    """``names`` (each with ``suffix``) as one flag value to give: the name, or ``one of a, b``."""
    spelled = [f"{name}{suffix}" for name in names]
    return spelled[0] if len(spelled) == 1 else f"one of {', '.join(spelled)}"


def parse_label(data: bytes | None, field: str = "") -> int | None:
    """The non-negative integer in a ``.cls`` file (ASCII digits, whitespace around, a whole
    number's ``.0`` allowed: ``3.0`` is 3, ``3.5`` None), or None.

    With ``field``, ``data`` is a JSON object and the label is the integer at ``field``, dots
    naming nested objects (``label``, ``annotation.class_id``): a number (``3`` or ``3.0``,
    which JSON does not tell apart) or a string read as a ``.cls`` file's text (``"3.0"``).
    """
    if data is None:
        return None
    if field:
        return _label(_json_field(data, field))
    match = _LABEL.fullmatch(data)
    if match is None:
        return None
    label = int(match.group(1))
    return label if label <= _INT64_MAX else None


def _label(value: Any) -> int | None:
    """A JSON field's value as a label (see :func:`parse_label`), or None."""
    if isinstance(value, str):  # a lone surrogate ("\\ud800") is no digit either
        return parse_label(value.encode(errors="surrogatepass"))
    if isinstance(value, float) and value.is_integer():  # 3.0: pandas writes labels with gaps so
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _INT64_MAX:
        return value
    return None


def _json_field(data: Any, field: str) -> Any:
    """The value at ``field`` (dots name nested objects) of the JSON object in ``data``:
    ``_ABSENT`` where the member or an object on the way lacks it, None where ``data`` holds
    no JSON object there (not JSON, or a member too large to read)."""
    if data is _ABSENT:
        return _ABSENT
    value = _json(data) if data is not None else None
    for name in field.split("."):
        if not isinstance(value, dict):
            return value if value is _ABSENT else None
        value = value.get(name, _ABSENT)
    return value


def parse_ambiguity(data: bytes | None) -> float | None:
    """A sample's ambiguity from its ambiguity member, or None when absent or unreadable.

    - a number (plain text or JSON): that number, as is (e.g. a degradation strength, or the
      share of annotators who disagreed);
    - a soft label, as a JSON list of non-negative class weights (probabilities or annotator
      votes) or a JSON object of class -> weight: ``1 - max / sum``, 0 when every weight is on
      one class, approaching 1 as the weights spread over many.

    Anything else (other JSON, a negative weight, all-zero weights, NaN) is None.
    """
    if not data:
        return None
    value = _json(data)
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        if not value or not all(_is_number(v) and v >= 0 for v in value) or sum(value) <= 0:
            return None
        return 1.0 - max(value) / sum(value)
    return float(value) if _is_number(value) else None


def _json(data: bytes) -> Any:
    """The JSON value in ``data``, or None where it is not JSON (as for JSON's own null) or
    nests deeper than Python's decoder goes (``[[[...``: a ``RecursionError``, which failed
    the unit on every try)."""
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None


def _is_number(value: object) -> bool:
    """A finite JSON number (not a bool); an integer past a float's range is none (its
    ``OverflowError`` failed the unit on every try)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _is_utf8(key: str) -> bool:
    """Whether ``key`` is valid text: a name that is not UTF-8 comes out of ``tarfile`` with
    surrogates, which no Parquet string column can hold."""
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _duplicate_handler(url: str, repeated: set[str]):
    """``group_by_keys`` error handler: a repeated file name keeps the first copy and adds the
    sample's key to ``repeated``; anything else is raised."""

    def handle(error: Exception) -> bool:
        if isinstance(error, ValueError) and "duplicate file name" in str(error):
            name = error.args[0].split(": duplicate file name")[0]
            repeated.add(base_plus_ext(name)[0])
            logger.warning("%s: %s; kept the first copy", url, readable(error.args[0]))
            return True
        raise error

    return handle


class _Skips:
    """Counts a shard's skipped samples into ``counts`` and names the first of each kind; and
    explains, once per shard, the two layouts WebDataset readers split samples wrongly for,
    and labels that are not class indices.

    - A sample's files apart (``tar -cf`` without ``--sort=name`` stores them in directory
      order): each part is a sample short of a member; the sample is counted once, by its
      first part, and not at all where a part holds it whole (its image and label) and is
      kept: the others only lack what it holds (a ``.json`` added with ``tar -rf``).
    - Dots in file names (``cat.0.jpg`` is key ``cat`` with extension ``0.jpg``): several
      images merge into one sample that has no ``jpg``.
    """

    def __init__(
        self,
        url: str,
        image_keys: tuple[str, ...],
        label_key: str,
        label: tuple[str, str],
        counts: collections.Counter[str],
        level: int,
    ) -> None:
        self.url = url
        self.image_keys = image_keys
        self.label_key = label_key  # as given, for messages
        self.label = label  # its member and JSON field ("" for a whole member)
        self.counts = counts
        self.level = level  # of the warnings, and of the first skip of each kind
        self.incomplete: dict[str, SkipReason] = {}  # key -> the skip its first part counted
        self.kept_keys: set[int] = set()  # hash() of the keys kept: 1M of them take ~60 MB
        self.warned: set[str] = set()

    def add(self, group: dict[str, Any], reason: SkipReason) -> None:
        """Count and log the skip of sample ``group`` for ``reason``, unless it is a later part
        of a sample already counted; the first of each kind is named, as the unit names its
        decode skips (a bad label by its value, :meth:`_bad_label`)."""
        if not self._counted(group, reason):
            return
        self.counts[reason.value] += 1
        if reason is SkipReason.BAD_LABEL:
            self._bad_label(group)
        first = self.counts[reason.value] == 1 and reason is not SkipReason.BAD_LABEL
        logger.log(
            self.level if first else logging.DEBUG,
            "skipping %s in %s: %s",
            readable(group["__key__"]),
            self.url,
            self._why(reason, group),
        )

    def _why(self, reason: SkipReason, group: dict[str, Any]) -> str:
        """``reason`` for the sample of files ``group``, in words that say what to change."""
        files = ", ".join(f".{name}" for name in sorted(group) if not name.startswith("__"))
        if reason is SkipReason.NO_IMAGE:
            return (
                f"no_image: none of its files ({files or 'none'}) is an image by --image-key "
                f"({'/'.join(self.image_keys)})"
            )
        member, field = self.label
        if reason is SkipReason.NO_LABEL and field and member in group:
            return f"no_label: its .{member} has no field {field} (--label-key {self.label_key})"
        if reason is SkipReason.NO_LABEL:
            dotted = self._dotted_label(group)
            return (
                f"no_label: its files ({files or 'none'}) hold no label by --label-key "
                f"({self.label_key})"
                + (f"; its label member: --label-key {dotted}" if dotted else "")
            )
        return {
            SkipReason.UNSAFE_NAME: "unsafe_name: its name is absolute, climbs out with '..' "
            "or is not UTF-8",
            SkipReason.TOO_LARGE: "too_large: its image member is too large to read",
            SkipReason.EMPTY_IMAGE: "empty_image: its image member is empty (0 bytes)",
        }.get(reason, reason.value)

    def kept(self, key: str) -> None:
        """Note that sample ``key`` is kept: a part of it counted as skipped before is
        counted no more, and a part that follows is not counted."""
        self.kept_keys.add(hash(key))
        reason = self.incomplete.pop(key, None)
        if reason is not None:
            self.counts[reason.value] -= 1
            if not self.counts[reason.value]:
                del self.counts[reason.value]
            self._warn_apart(key)

    def _counted(self, group: dict[str, Any], reason: SkipReason) -> bool:
        """Whether the skip of ``group`` for ``reason`` counts (not a later part of a sample
        already counted), warning about the layout that caused it."""
        if reason not in (SkipReason.NO_IMAGE, SkipReason.NO_LABEL):
            return True
        key = group["__key__"]
        if key in self.incomplete or hash(key) in self.kept_keys:
            self._warn_apart(key)
            return False
        self.incomplete[key] = reason
        dotted = sorted(s for s in group if s.rsplit(".", 1)[-1] in self.image_keys and "." in s)
        if reason is SkipReason.NO_IMAGE and dotted:
            label = self._dotted_label(group)
            self._warn(
                "dots",
                "%s: sample %r has files %s: a WebDataset key ends at the first dot of a file "
                "name, so several images share one sample; rename them (e.g. cat_0.jpg), or, "
                "where they are one sample's files, name its image member: --image-key %s%s",
                key,
                ", ".join(f"{key}.{suffix}" for suffix in dotted[:3]),
                _one_of(dotted),
                f", and its label member: --label-key {label}" if label else "",
            )
        return True

    def _dotted_label(self, group: dict[str, Any]) -> str | None:
        """The ``--label-key`` naming sample ``group``'s label member where it lacks the label
        key's but has members whose multi-part extension holds it (``target.cls`` or
        ``cls.txt`` for ``cls``); None otherwise."""
        member, field = self.label
        found = [] if member in group else sorted(s for s in group if member in s.split("."))
        suffix = f":{field}" if field else ""  # a json label's field stays
        return _one_of(found, suffix) if found else None

    def _warn_apart(self, key: str) -> None:
        self._warn(
            "apart",
            "%s: the files of sample %r are not next to each other in the tar; a WebDataset "
            "shard keeps each sample's files together (write it with `tar --sort=name`); "
            "each such sample is counted once, and not where one part holds it whole",
            key,
        )

    def _bad_label(self, group: dict[str, Any]) -> None:
        """Warn of a label that is no class index, with its value (names, say, where pvu
        reads integers)."""
        member, field = self.label
        data = group[member]
        value = _json_field(data, field) if field else data
        self._warn(
            "label",
            "%s: sample %r has the label %s (%s), which is not a class index (a whole number "
            "from 0); each such sample is skipped. Give the label's member (--label-key), or "
            "make the shards with `pvu shards`, which numbers class names",
            group["__key__"],
            "too large to read" if data is None else reprlib.repr(data if value is None else value),
            f"{member} member" + (f", field {field}" if field else ""),
        )

    def _warn(self, kind: str, message: str, *args: object) -> None:
        if kind not in self.warned:
            self.warned.add(kind)
            logger.log(self.level, message, self.url, *args)


#: How far past a tar's end-of-archive marker to look for another archive's data: the marker's
#: padding is at most one 10 KiB record.
_TRAILER_BYTES = 1 << 16


class EndRecordingTarInfo(tarfile.TarInfo):
    """A ``TarInfo`` that records on its archive the header error that ended the stream.

    In stream mode ``tarfile`` ends quietly both at the end-of-archive marker and at a header
    cut short or garbled after the first member; only this record tells a whole archive from
    a truncated one.
    """

    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tarfile_)
        except tarfile.HeaderError as error:
            tarfile_.pvu_end_error = error  # type: ignore[attr-defined]
            if tarfile_.offset == 0 and isinstance(
                error, (tarfile.InvalidHeaderError, tarfile.TruncatedHeaderError)
            ):  # no tar header where the first must be (tarfile says only "bad checksum")
                raise NoTarHeader(str(error)) from error
            raise


def _tar_members(
    stream: _StorageStream, url: str, damage: list[str], max_member_bytes: int
) -> Iterator[dict[str, Any]]:
    """Regular files of the tar stream as webdataset file samples (``fname``, ``data``).

    Stops at the first sign of damage and appends its description to ``damage``. A member over
    ``max_member_bytes`` is skipped unread and given ``data=None``.
    """
    links: list[str] = []
    try:
        # Closing the archive leaves ``stream`` (not its own) open.
        with tarfile.open(fileobj=stream, mode="r|*", tarinfo=EndRecordingTarInfo) as archive:
            for info in archive:
                if info.islnk() or info.issym():
                    links.append(info.name)
                if not info.isreg() or METADATA_MEMBER.match(info.name):
                    continue
                if info.size > max_member_bytes:
                    logger.warning(
                        "%s: %s has %d bytes; skipped", url, readable(info.name), info.size
                    )
                    data = None
                else:
                    member = archive.extractfile(info)
                    assert member is not None  # a regular file always has content
                    data = member.read()
                archive.members = []  # stream mode keeps every TarInfo otherwise
                yield {"fname": info.name, "data": data, "__url__": url}
            if why := tar_end_damage(archive):
                damage.append(why)
    except NoTarHeader as error:
        damage.append(not_a_tar(stream.head, error))
    except (tarfile.TarError, EOFError, zlib.error) as error:
        damage.append(f"{type(error).__name__}: {error}")
    if links:
        logger.warning(
            "%s: %d member(s) are links (e.g. %s), which a tar read as a stream cannot follow: "
            "their samples lack them; write the tars without links (GNU tar: --dereference "
            "for symbolic links, --hard-dereference for hard ones)",
            *(url, len(links), readable(links[0])),
        )


def tar_end_damage(archive: tarfile.TarFile) -> str | None:
    """What is wrong with how ``archive``, read to its end with :class:`EndRecordingTarInfo`,
    ended, if anything: a header cut short or garbled, or another archive's data after it."""
    end = getattr(archive, "pvu_end_error", None)
    if not isinstance(end, tarfile.EOFHeaderError):
        return f"no end-of-archive marker: {end or 'stream ended'}"
    if _data_follows(archive):
        return (
            "data after the end-of-archive marker, which tar readers stop at: tars joined with "
            "cat? (join them with tar --concatenate)"
        )
    return None


def _data_follows(archive: tarfile.TarFile) -> bool:
    """Whether anything but zeros (the marker's padding) follows the end-of-archive marker,
    within ``_TRAILER_BYTES``: of an uncompressed tar, or after the compressed stream that holds
    the marker (``cat a.tar.gz b.tar.gz``: a gzip file of two members)."""
    stream = archive.fileobj
    if getattr(stream, "comptype", "tar") == "tar":
        return _has_data(stream.read(_TRAILER_BYTES))
    return _data_follows_compressed(stream)


def _data_follows_compressed(stream: Any) -> bool:
    """:func:`_data_follows` for tarfile's compressed stream, decompressing only to the end of
    the compressed member it is in: reading on through ``stream`` would feed what follows to a
    finished decompressor, in quadratic time (a minute for 40 MB). Relies on tarfile's
    ``_Stream`` fields (``cmp``, ``dbuf``, ``buf``); without them, nothing is looked at."""
    decompressor = getattr(stream, "cmp", None)
    if not hasattr(decompressor, "eof") or not hasattr(stream, "dbuf"):
        return False
    if _has_data(stream.dbuf):
        return True
    pending, stream.buf, seen = stream.buf, b"", 0
    while not decompressor.eof and seen <= _TRAILER_BYTES:
        compressed = pending or stream.fileobj.read(stream.bufsize)
        if not compressed:
            return False
        pending, padding = b"", decompressor.decompress(compressed)
        if _has_data(padding):
            return True
        seen += len(padding)
    trailer = 8 if stream.comptype == "gz" else 0  # gzip's CRC-32 and length, maybe unread
    rest = (decompressor.unused_data + stream.fileobj.read(_TRAILER_BYTES))[trailer:]
    if not _has_data(rest):
        return False
    decompressor_type = _DECOMPRESSORS.get(stream.comptype)
    if decompressor_type is None:  # a compression this check does not know: data, to be safe
        return True
    try:  # another compressed member: data if what it holds is (zeros are padding)
        return _has_data(decompressor_type().decompress(rest, max_length=_TRAILER_BYTES))
    except (zlib.error, OSError, lzma.LZMAError, EOFError):
        return True  # not a compressed member: bytes after the archive


#: A decompressor of one member of each compression tarfile reads, with its header.
_DECOMPRESSORS = {
    "gz": lambda: zlib.decompressobj(wbits=31),
    "bz2": bz2.BZ2Decompressor,
    "xz": lzma.LZMADecompressor,
}


def _has_data(chunk: bytes) -> bool:
    return chunk.count(0) != len(chunk)


class ShardChanged(OSError):
    """A shard changed size while a unit read it: the unit is not committed from it."""


class _StorageStream:
    """A forward-reading byte stream of one object that survives transient storage errors.

    A failed read is retried by reopening the object and seeking back to the byte reached,
    so a dropped connection late in a 1 GB shard costs one request, not the shard.
    """

    def __init__(
        self, url: str, *, attempts: int, base_delay: float, block_size: int | None = None
    ) -> None:
        self._url = url
        self._open_kwargs = {} if block_size is None else {"block_size": block_size}
        self._fs, self._path = fsspec.core.url_to_fs(url)
        self._attempts = attempts
        self._base_delay = base_delay
        self._file: Any = None
        self._pos = 0
        self.head = b""  # the object's first bytes, to name a file that is no tar

    def __enter__(self) -> _StorageStream:
        retry(
            self._ensure_open,
            attempts=self._attempts,
            base_delay=self._base_delay,
            what=f"open {self._url}",
        )
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def read(self, size: int = -1) -> bytes:
        data = retry(
            lambda: self._read_once(size),
            attempts=self._attempts,
            base_delay=self._base_delay,
            what=f"read {self._url} at byte {self._pos}",
        )
        if len(self.head) < FOREIGN_HEAD_BYTES:
            self.head += data[: FOREIGN_HEAD_BYTES - len(self.head)]
        self._pos += len(data)
        return data

    def size(self) -> int:
        """The object's size now."""
        self._fs.invalidate_cache(self._path)
        return int(self._fs.size(self._path))

    @property
    def position(self) -> int:
        """Bytes read so far."""
        return self._pos

    def close(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            try:
                file.close()
            except OSError as error:  # closing a read-only stream loses nothing
                logger.debug("closing %s: %r", self._url, error)

    def _ensure_open(self) -> None:
        if self._file is None:
            file = self._fs.open(self._path, "rb", **self._open_kwargs)
            try:
                if self._pos:
                    file.seek(self._pos)
            except BaseException:
                file.close()
                raise
            self._file = file

    def _read_once(self, size: int) -> bytes:
        self._ensure_open()
        try:
            return self._file.read(size)
        except BaseException:
            self.close()
            raise
