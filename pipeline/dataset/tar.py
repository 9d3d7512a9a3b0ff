"""WebDataset tar shards on any fsspec URL: one shard at once, or a stream rolled over by size.

Members are ``<key>.<ext>`` with fixed metadata (mtime 0, uid 0, mode 0444), so equal input
gives byte-identical shards. A rolled shard is written under a hidden name and moved into
place when complete, so a crash never leaves a shard that looks done.
"""

from __future__ import annotations

import contextlib
import io
import os
import posixpath
import tarfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import fsspec

from pipeline.cache.shards import storage_url
from pipeline.retry import make_folder, naming, place

TAR_BLOCK = 512
# the end-of-archive blocks and the padding to a whole record that closing a tar adds, at most
_END_BYTES = 2 * TAR_BLOCK + tarfile.RECORDSIZE


def write_shard(url: str, samples: Iterable[tuple[str, Mapping[str, bytes]]]) -> str:
    """Write one WebDataset tar at ``url``: for each (key, files), members ``<key>.<ext>``.

    Members are written in the given order. Returns ``url``.
    """
    fs, path = fsspec.core.url_to_fs(url)
    make_folder(fs, os.path.dirname(path))
    with fs.open(path, "wb") as file, tarfile.open(fileobj=file, mode="w|") as tar:
        for key, files in samples:
            add_sample(tar, key, files)
    return url


def add_sample(tar: tarfile.TarFile, key: str, files: Mapping[str, bytes]) -> int:
    """Append one sample's members to ``tar``; returns the bytes they take in the archive."""
    if "." in posixpath.basename(key):
        raise ValueError(f"key {key!r} has a '.', which WebDataset reads as an extension")
    size = 0
    for ext, data in files.items():
        info = tarfile.TarInfo(f"{key}.{ext}")
        info.size = len(data)
        info.mode = 0o444
        info.mtime = 0
        tar.addfile(info, io.BytesIO(data))
        size += member_bytes(len(data))
    return size


def member_bytes(size: int) -> int:
    """Bytes one member of ``size`` bytes takes in a tar: its header plus padded data."""
    return TAR_BLOCK + -(-size // TAR_BLOCK) * TAR_BLOCK


@dataclass(frozen=True)
class ShardInfo:
    """One written shard: its URL, samples and bytes."""

    url: str
    samples: int
    bytes: int


class ShardWriter:
    """Samples -> ``<output>/<prefix>-NNNNNN.tar`` shards of at most ``max_bytes`` each.

    A shard is closed before a sample would take it over ``max_bytes`` (a sample larger than
    that gets a shard of its own) or past ``max_samples``. Use as a context manager;
    ``shards`` lists the committed shards.
    """

    def __init__(
        self, output: str, *, prefix: str, max_bytes: int, max_samples: int | None = None
    ) -> None:
        if max_bytes <= 0 or (max_samples is not None and max_samples <= 0):
            raise ValueError("max_bytes and max_samples must be positive")
        self.output = output.rstrip("/")
        self.prefix = prefix
        self.max_bytes = max_bytes
        self.max_samples = max_samples
        self.shards: list[ShardInfo] = []
        self._fs, self._root = fsspec.core.url_to_fs(self.output)
        make_folder(self._fs, self._root)
        self._file: Any = None
        self._tar: tarfile.TarFile | None = None
        self._samples = 0
        self._bytes = 0

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        try:
            if exc_type is None:
                self._finish()
        finally:
            self._abandon()  # a shard still open (it failed, or the run did) is removed

    def add(self, key: str, files: Mapping[str, bytes]) -> None:
        """Append a sample, starting a new shard when the current one is full."""
        size = sum(member_bytes(len(data)) for data in files.values())
        full_bytes = self._bytes + size > self.max_bytes - _END_BYTES
        full_count = self.max_samples is not None and self._samples >= self.max_samples
        if self._tar is not None and self._samples and (full_bytes or full_count):
            self._finish()
        if self._tar is None:
            self._open()
        assert self._tar is not None
        with naming(f"write {self._url(self._name(len(self.shards)))}"):
            self._bytes += add_sample(self._tar, key, files)
        self._samples += 1

    def _name(self, index: int) -> str:
        return f"{self.prefix}-{index:06d}.tar"

    def _staging(self) -> str:
        return f"{self._root}/.{self._name(len(self.shards))}.partial"

    def _open(self) -> None:
        self._file = self._fs.open(self._staging(), "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w|")  # noqa: SIM115 (spans add calls)
        self._samples = self._bytes = 0

    def _finish(self) -> None:
        """Close the open shard and move it into place."""
        if self._tar is None:
            return
        name = self._name(len(self.shards))
        final = f"{self._root}/{name}"
        with naming(f"write {self._url(name)}"):
            self._tar.close()
            self._file.close()
            place(self._fs, self._staging(), final)
        self.shards.append(ShardInfo(self._url(name), self._samples, int(self._fs.size(final))))
        self._tar = self._file = None

    def _url(self, name: str) -> str:
        """The URL of the shard file ``name`` (a plain path for a local output)."""
        return storage_url(self._fs, f"{self._root}/{name}")

    def _abandon(self) -> None:
        if self._tar is None:
            return
        # closing may fail as the write did (a full disk); the partial shard goes all the same
        for close in (self._tar.close, self._file.close):
            with contextlib.suppress(OSError, ValueError):
                close()
        with contextlib.suppress(OSError):
            self._fs.rm(self._staging())
        self._tar = self._file = None
