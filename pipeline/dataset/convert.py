"""A ``Listing`` -> WebDataset shards: each image read, checked to decode, written shuffled.

Each sample is ``<key>.<jpg|png|webp>`` (the original bytes where the cache reads the format,
else the decoded image re-encoded as PNG), ``<key>.cls`` (the label) and ``<key>.json``
(source URL and class name). Keys are ``<listing>-<position>-<name>``: the image's position in
the listing, so they are unique and stable whatever the shuffle, after a digest of the whole
listing (every image's URL and label), so shards made from different inputs never share a
key and can be cached together (``pvu cache`` keeps a key's first copy only), and before the
image's file name (readable, and how ImageNet's validation images find their ReaL labels in
``pvu evaluate``). An image that
cannot be read or decoded (by the same checks ``pvu cache`` applies) is left out and
reported, never fatal. ``classes.json`` beside the shards lists the label names.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import posixpath
import re
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar
from urllib.parse import unquote, urlsplit

import fsspec
import numpy as np
from PIL import Image

from pipeline.cache.decode import decode_image
from pipeline.cache.shards import UNFINISHED_NAME
from pipeline.cache.skips import BadSample
from pipeline.dataset.archives import member_path
from pipeline.dataset.held import window_order
from pipeline.dataset.listing import HeldImage, Listing, Source
from pipeline.dataset.names import readable
from pipeline.dataset.tar import ShardInfo, ShardWriter
from pipeline.named import NAMED, named_level
from pipeline.retry import PERMANENT_ERRORS, make_folder, read_url, retry, write_bytes

log = logging.getLogger(__name__)

CLASSES_NAME = "classes.json"
#: Pillow formats stored as they are; any other is re-encoded as PNG.
KEPT_FORMATS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}
READ_ERROR = "read_error"
_UNSAFE_KEY = re.compile(r"[^A-Za-z0-9_-]+")
_KEY_NAME_CHARS = 48

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class Unreadable:
    """An image left out: its URL, why (a cache skip reason or ``read_error``) and details."""

    url: str
    reason: str
    detail: str


@dataclass
class ConvertReport:
    """What ``write_dataset`` wrote and left out."""

    shards: list[ShardInfo]
    classes: list[str]
    unreadable: list[Unreadable] = field(default_factory=list)

    @property
    def samples(self) -> int:
        """Samples written across all shards."""
        return sum(shard.samples for shard in self.shards)


def read_source(source: Source) -> bytes:
    """The bytes of ``source``'s image: its file, or its span of a class archive, read as a
    range (so each image of an archive is read alone, in any order, from any thread), or the
    bytes a table's row holds (else its path's). ``OSError`` for an archive cut short, or a
    row that holds neither."""
    if isinstance(source, HeldImage):
        data = source.table.image(source.row)
        if data is not None:
            return data
        if source.path is None:
            raise OSError(f"row {source.row + 1} of {source.table.url} holds no image bytes")
        return read_url(source.path)
    if source.span is None:
        return read_url(source.url)
    archive = source.url.split("::", 1)[1]
    fs, path = fsspec.core.url_to_fs(archive)
    start, size = source.span
    data = retry(
        lambda: fs.cat_file(path, start=start, end=start + size), what=f"read {source.url}"
    )
    if len(data) != size:
        raise OSError(f"archive {archive} is cut short: {len(data):,} of {size:,} bytes")
    return data


def load_image(source: Source, data: bytes | None = None) -> tuple[str, bytes]:
    """``(extension, bytes)`` of ``source``'s image as a shard stores it; ``data``: its stored
    bytes, if already read.

    Raises ``BadSample`` if it does not decode, ``OSError`` if it cannot be read.
    """
    url = source.url
    data = read_source(source) if data is None else data
    image = decode_image(data, key=url)
    fmt = Image.open(io.BytesIO(data)).format
    if fmt in KEPT_FORMATS:
        return KEPT_FORMATS[fmt], data
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "png", buffer.getvalue()


def write_dataset(
    listing: Listing,
    output: str,
    *,
    prefix: str = "shard",
    max_bytes: int,
    max_samples: int | None = None,
    shuffle: bool = True,
    seed: int = 0,
    threads: int = 8,
    on_image: Callable[[bool], None] = lambda ok: None,
) -> ConvertReport:
    """Write ``listing``'s images into shards under ``output``, then ``classes.json``.

    ``shuffle`` permutes the images with ``seed`` across classes (``conversion_order``);
    ``threads`` read and check images in parallel. ``on_image(ok)`` is called once per image
    (for a progress bar). The first ``NAMED`` images left out for each reason get a warning
    each, the rest one in all.
    Refuses an ``output`` that already holds shards, unless an unfinished run of this function
    wrote them (its ``UNFINISHED_NAME`` file is there): those are removed and written again.
    """
    fs, root = fsspec.core.url_to_fs(output)
    unfinished = f"{root.rstrip('/')}/{UNFINISHED_NAME}"
    _clear_unfinished(fs, root, unfinished, output)
    make_folder(fs, root)
    write_bytes(fs, unfinished, b"pvu shards is writing this folder; its shards are unfinished\n")
    count = len(listing.sources)
    order = conversion_order(listing, seed) if shuffle else np.arange(count)
    sources = [listing.sources[i] for i in order]
    width = max(8, len(str(count - 1)))
    reads = read_sampled(listing)
    tag = listing_tag(listing, reads)
    unreadable: list[Unreadable] = []
    reasons: Counter[str] = Counter()
    with (
        ThreadPoolExecutor(threads, thread_name_prefix="pvu-shards") as pool,
        ShardWriter(output, prefix=prefix, max_bytes=max_bytes, max_samples=max_samples) as writer,
    ):

        def load(index: int) -> tuple[str, bytes] | Unreadable:
            return _load(listing.sources[index], reads.get(index))

        loaded = ordered_map(pool, load, order.tolist(), window=4 * threads)
        for index, source, outcome in zip(order, sources, loaded, strict=True):
            if isinstance(outcome, Unreadable):
                unreadable.append(outcome)
                level = named_level(reasons[outcome.reason])
                reasons[outcome.reason] += 1
                log.log(level, "left out %s: %s (%s)", outcome.url, outcome.reason, outcome.detail)
                on_image(False)
                continue
            ext, data = outcome
            name = listing.classes[source.label]
            writer.add(
                f"{tag}-{index:0{width}d}{key_name(_named(source))}",
                {
                    ext: data,
                    "cls": str(source.label).encode(),
                    "json": json.dumps({"source": readable(source.url), "class": name}).encode(),
                },
            )
            on_image(True)
    write_bytes(fs, f"{root.rstrip('/')}/{CLASSES_NAME}", json.dumps(listing.classes).encode())
    fs.rm(unfinished)
    unnamed = {reason: n - NAMED for reason, n in sorted(reasons.items()) if n > NAMED}
    if unnamed:
        log.warning(
            "left out %s more image(s) than named above (%s); --verbose names each",
            f"{sum(unnamed.values()):,}",
            ", ".join(f"{reason}={n:,}" for reason, n in unnamed.items()),
        )
    return ConvertReport(writer.shards, listing.classes, unreadable)


def conversion_order(listing: Listing, seed: int) -> np.ndarray:
    """``listing``'s positions shuffled with ``seed``: uniformly, or for images held in a
    table (or its parts), by :func:`window_order` (each row group read once)."""
    rng = np.random.default_rng(seed)
    sources = listing.sources
    if not sources or not all(isinstance(source, HeldImage) for source in sources):
        return rng.permutation(len(sources))
    return window_order([(source.table, source.row) for source in sources], rng)


def _clear_unfinished(
    fs: fsspec.AbstractFileSystem, root: str, unfinished: str, output: str
) -> None:
    """Remove the shards an unfinished run left in ``root``; refuse shards of any other origin."""
    if not fs.isdir(root):
        return
    shards = [path for path in fs.ls(root, detail=False) if path.endswith(".tar")]
    if shards and not fs.exists(unfinished):
        raise FileExistsError(f"output {output} already holds .tar shards; choose an empty one")
    for path in shards:
        fs.rm(path)


def key_name(url: str) -> str:
    """The end of a sample's key: ``-`` and the image's file name without its extension, in
    ``[A-Za-z0-9_-]`` (a WebDataset key ends at the first dot), at most 48 characters; "" for
    a name with none of them. Only a web URL has a query, fragment and %-escapes: an object
    store's or a local file's name keeps its ``?`` and ``#``."""
    path = unquote(urlsplit(url).path) if url.startswith(("http://", "https://")) else url
    path = member_path(path)  # a class archive's member: its own name
    stem = readable(posixpath.splitext(posixpath.basename(path))[0])  # alike in any locale
    name = _UNSAFE_KEY.sub("_", stem).strip("_")[:_KEY_NAME_CHARS]
    return f"-{name}" if name else ""


def _named(source: Source) -> str:
    """What names ``source`` in its key: its URL, or the path a table's row gives with its
    image (none: the key's position alone, the row's place in the table)."""
    if isinstance(source, HeldImage):
        return source.path or ""
    return source.url


def read_sampled(listing: Listing) -> dict[int, bytes | OSError]:
    """The stored bytes of ``listing``'s first, middle and last images, by index, or the error
    that ended each read: read once, for ``listing_tag`` and as those images' shard bytes (a
    dead URL's read costs seconds of retries)."""
    count = len(listing.sources)
    reads: dict[int, bytes | OSError] = {}
    for index in dict.fromkeys((0, count // 2, count - 1)) if count else ():
        try:
            reads[index] = read_source(listing.sources[index])  # as stored, not decoded
        except OSError as error:
            reads[index] = error
    return reads


def listing_tag(listing: Listing, reads: dict[int, bytes | OSError]) -> str:
    """8 hex digits of a digest of ``listing``'s images and labels, in order, and of the bytes
    of a few of its images (``reads``, of ``read_sampled``). An image counts by its URL below
    the parent of the folder all share (``train/cat/1.jpg``) and by its label, so the same
    folder moved elsewhere keeps its keys; the sampled bytes tell apart datasets laid out
    alike (MNIST and Fashion-MNIST as ``train/<digit>/<n>.png``)."""
    urls = [member_path(source.url) for source in listing.sources]  # an archive's as extracted
    shared = os.path.commonprefix(urls)  # noqa: RUF071 - URLs; cut back to a "/" below
    shared = shared[: shared[: shared.rfind("/")].rfind("/") + 1]
    digest = hashlib.blake2b(digest_size=4)
    for url, source in zip(urls, listing.sources, strict=True):
        digest.update(f"{url[len(shared) :]}\0{source.label}\n".encode(errors="surrogateescape"))
    sampled = {urls[i]: i for i in reads}
    for url in sorted(sampled):
        data = reads[sampled[url]]
        if isinstance(data, bytes):  # unreadable: it is left out, named, anyway
            digest.update(data)
    return digest.hexdigest()


def _load(source: Source, read: bytes | OSError | None = None) -> tuple[str, bytes] | Unreadable:
    """``source``'s image as a shard stores it, or why it is left out; ``read``: the outcome
    of reading it already (``read_sampled``), not repeated."""
    try:
        if isinstance(read, OSError):
            raise read
        return load_image(source, read)
    except BadSample as bad:
        return Unreadable(readable(source.url), bad.reason.value, bad.detail)
    except (*PERMANENT_ERRORS, OSError) as error:
        return Unreadable(readable(source.url), READ_ERROR, f"{type(error).__name__}: {error}")


def ordered_map(
    pool: ThreadPoolExecutor, fn: Callable[[T], R], items: Iterable[T], *, window: int
) -> Iterator[R]:
    """``fn`` over ``items`` on ``pool``, in order, at most ``window`` items in flight."""
    pending: deque[Future[R]] = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()
