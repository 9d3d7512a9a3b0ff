"""What listing a dataset gives: each image to convert, a ``Source`` (a ``HeldImage`` where a
Parquet table's row holds it), and the ``Listing`` of them with the label names. ``sources``
lists folders, ``tables`` tables; ``convert`` reads the images.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from pipeline.dataset.held import HeldTable


@dataclass(frozen=True, slots=True)
class Source:
    """One image to convert: where it is and its label (no ``__dict__``: 40 bytes less per
    image, of ~200 with its URL, when a listing holds ImageNet-21k's 13M). A class archive's
    member has the URL ``tar://<member>::<archive URL>`` (as fsspec opens it) and its bytes'
    ``span``, ``(offset, size)`` in the archive, read as a range: fsspec's ``tar://`` reads
    the whole archive's index on each open."""

    url: str
    label: int
    span: tuple[int, int] | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class HeldImage(Source):
    """An image held in a Parquet table's row (``url`` is ``<table>#row=<n>``, 1-based):
    ``row`` of ``table`` (0-based), and the path its struct gives (resolved as a table's
    paths are), read where the row's bytes are null, and the key's name."""

    table: HeldTable
    row: int
    path: str | None = None


@dataclass(frozen=True)
class Listing:
    """A dataset's images and label names; ``ignored`` counts the files that are not images by
    suffix (``""`` for none), ``empty`` names the class folders without one."""

    sources: list[Source]
    classes: list[str]
    ignored: Counter[str] = field(default_factory=Counter)
    empty: list[str] = field(default_factory=list)
