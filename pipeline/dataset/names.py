"""How a dataset's file names are read, by ``sources``, ``tables`` and ``archives`` alike:
which suffixes are images and which tables, which names are hidden, and a name as text for
output.
"""

from __future__ import annotations

import posixpath

#: File suffixes listed as images in a class folder (case-insensitive); others are ignored.
IMAGE_SUFFIXES = (
    *(".jpg", ".jpeg", ".jpe", ".jfif"),  # JPEG's spellings
    *(".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm"),
)
#: A text table's format by its suffix; each may be compressed (``list.csv.gz``).
TEXT_TABLES = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
#: A text table's compression by its last suffix, as pyarrow names the codec.
COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".zst": "zstd"}
TABLE_SUFFIXES = (*TEXT_TABLES, ".parquet", *(t + c for t in TEXT_TABLES for c in COMPRESSIONS))


#: Folders that tools leave beside users' images, of no class: macOS's ``__MACOSX`` of a zip
#: (AppleDouble files), a Synology NAS's ``@eaDir`` (its thumbnails, ``SYNOPHOTO_THUMB_XL.jpg``).
TOOL_FOLDERS = {"__MACOSX", "@eaDir"}


def is_hidden(name: str) -> bool:
    """Whether a file or folder ``name`` is hidden: a dot file, or a tool's folder."""
    return name.startswith(".") or name in TOOL_FOLDERS


def file_suffix(name: str) -> str:
    """The suffix of the file ``name``, lower case: a table's whole one (``.csv.gz``), or the
    last (``.jpg``, ``.gz``)."""
    name = name.lower()
    return next((s for s in TABLE_SUFFIXES if name.endswith(s)), posixpath.splitext(name)[1])


def readable(name: str) -> str:
    """A listed file or folder ``name`` as text whatever the locale: its bytes decoded as UTF-8
    (under a C locale Python lists ``café`` as ``caf\\udcc3\\udca9``), those that are not UTF-8
    as ``\\xe9``. For output only: a file is opened by the name as listed."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
