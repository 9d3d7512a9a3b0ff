"""Class archives: a folder of ``<class>.tar`` files (as ImageNet's ``n01440764.tar``) read as
class folders, without extracting them.

``sources.list_folder`` decides a folder's layout and calls on this module for an archive's
part: which files are class archives, their image members (each header read through once, a
tar having no index) with the span of each member's bytes, and the folders refused as class
archives (compressed tars, WebDataset shards). A member's URL is ``tar://<member>::<archive>``;
:func:`member_path` gives where it would lie extracted, so keys match the extracted folder's.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import posixpath
import tarfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import fsspec

from pipeline.cache.shards import entry_name, is_file_entry, storage_url
from pipeline.dataset.names import IMAGE_SUFFIXES, file_suffix, is_hidden, readable
from pipeline.retry import retry

log = logging.getLogger(__name__)

#: A class archive's suffix (case-insensitive): ``<input>/<class>.tar``.
ARCHIVE_SUFFIX = ".tar"
#: Compressed tars, refused as class archives: a member is read only by decompressing from the
#: archive's start, once per image of a shuffled listing.
COMPRESSED_ARCHIVES = (".tar.gz", ".tgz")
#: How an image's own sidecar's extension starts (``jpg.`` of ``<key>.jpg.xmp``).
_IMAGE_SIDECARS = tuple(f"{suffix[1:]}." for suffix in IMAGE_SUFFIXES)
#: The ends of the extensions of a WebDataset sample's label, metadata and caption files.
_SAMPLE_FILES = (".cls", ".json", ".txt")
#: Class archives whose member headers are read at once while listing.
_ARCHIVE_THREADS = 8


#: A class's images, in order: URL and, for an archive's member, its span.
Images = dict[str, list[tuple[str, tuple[int, int] | None]]]


def class_archives(
    fs: fsspec.AbstractFileSystem,
    entries: list[dict],
    suffix: str | tuple[str, ...] = ARCHIVE_SUFFIX,
) -> list[str]:
    """The names of the files (links to files too) among a folder's visible ``entries`` that
    end with ``suffix`` (case-insensitive; one of several), sorted."""
    return sorted(
        entry_name(e)
        for e in entries
        if entry_name(e).lower().endswith(suffix) and is_file_entry(fs, e)
    )


def archive_images(
    url: str, fs: fsspec.AbstractFileSystem, root: str, archives: list[str], files: list[str]
) -> tuple[Images, Counter[str], Counter[str]]:
    """The image members of ``root``'s class ``archives`` (``<class>.tar``) as a folder's
    images, sorted alike by path; the other ``files`` of ``root`` and members ignored, by
    suffix (``unread``: the members, not hidden ones). Each archive's headers are read
    through once (a tar has no index), ``_ARCHIVE_THREADS`` archives at a time."""
    by_class: Images = {}
    names = set(archives)
    ignored = Counter(readable(file_suffix(name)) for name in files if name not in names)
    unread: Counter[str] = Counter()
    odd: list[str] = []
    with ThreadPoolExecutor(_ARCHIVE_THREADS, thread_name_prefix="pvu-archives") as pool:
        read = pool.map(lambda name: _members(fs, f"{root}/{name}"), archives)
        for name, (members, others) in zip(archives, read, strict=True):
            archive = storage_url(fs, f"{root}/{name}")
            _refuse_shards(url, archive, members)
            images = by_class.setdefault(name[: -len(ARCHIVE_SUFFIX)], [])
            odd += (f"tar://{member}::{archive}" for member in others)
            for member, span in sorted(members.items()):
                if member.lower().endswith(IMAGE_SUFFIXES) and not any(
                    map(is_hidden, member.split("/"))
                ):
                    images.append((f"tar://{member}::{archive}", span))
                    continue
                suffix = readable(file_suffix(posixpath.basename(member)))
                ignored[suffix] += 1
                unread[suffix] += not any(map(is_hidden, member.split("/")))
    if odd:
        log.warning(
            "left out %d member(s) of class archives of %s that are no regular file (a link "
            "to no file of its archive, or a device), e.g. %s",
            *(len(odd), url, readable(odd[0])),
        )
    return by_class, ignored, +unread


def _members(fs: fsspec.AbstractFileSystem, path: str) -> tuple[dict[str, tuple[int, int]], list]:
    """The regular members of the tar ``path`` (names without ``./``) -> ``(offset, size)``
    of their bytes, links to them too (a link's span is its target's, as extracting the archive
    gives the file), and the names of its other members that are no folder (links to nothing
    in it, devices); its headers read through once, under :func:`retry`. A ``ValueError``
    names an archive that is no tar."""

    def read() -> tuple[dict[str, tuple[int, int]], list]:
        members, links, others = {}, {}, []
        with fs.open(path, "rb") as file, tarfile.open(fileobj=file, mode="r:") as tar:
            for info in tar:
                name = _normalised(info.name)
                if info.isreg():
                    members[name] = (info.offset_data, info.size)
                elif info.islnk() or info.issym():
                    links[name] = _link_target(name, info)
                elif not info.isdir():
                    others.append(name)
        for name, target in links.items():
            span = _followed(target, members, links)
            if span is None:
                others.append(name)
            else:
                members[name] = span
        return members, others

    try:
        return retry(read, what=f"read the member headers of {fs.unstrip_protocol(path)}")
    except tarfile.TarError as error:
        raise ValueError(
            f"class archive {readable(storage_url(fs, path))} is no readable tar ({error}): "
            "download it again (a compressed one, decompress it into a .tar)"
        ) from None


def _normalised(name: str) -> str:
    """A member's name as it lies extracted, below the archive's folder: no ``./``, no ``/``
    first."""
    return posixpath.normpath(name).lstrip("/")


def _link_target(name: str, info: tarfile.TarInfo) -> str | None:
    """The member that the link ``name`` (of header ``info``) names: a hard link's by its
    name in the archive, a symbolic one's relative to its folder; None for one that leaves the
    archive's folder (an absolute path, or up through ``..``)."""
    if info.islnk():
        return _normalised(info.linkname)
    if info.linkname.startswith("/"):
        return None
    target = posixpath.normpath(posixpath.join(posixpath.dirname(name), info.linkname))
    return None if target.split("/")[0] == ".." else target


#: The most links followed to reach a file (a link to a link ...), as a loop ends.
_MOST_LINKS = 8


def _followed(
    target: str | None, members: dict[str, tuple[int, int]], links: dict[str, str | None]
) -> tuple[int, int] | None:
    """The span of the regular member that ``target`` names, through links to links; None
    for a target outside the archive, not in it, a folder, or a loop."""
    for _ in range(_MOST_LINKS):
        if target not in links:
            break
        target = links[target]
    return members.get(target) if target is not None else None


def _refuse_shards(url: str, archive: str, members: dict | list) -> None:
    """A ``ValueError`` for WebDataset shards given as class archives (:func:`_sample_file`),
    which ``pvu cache --shards`` reads: read as class archives, each shard would be a class."""
    found = _sample_file(list(members))
    if found:
        raise ValueError(
            f"{url} holds WebDataset shards, not class archives ({readable(archive)} holds "
            f"samples' files such as {readable(found)}): give them to pvu cache --shards {url} "
            "(--label-key names the member holding the label, e.g. json:label); as class "
            "archives, each shard would be a class"
        )


def _sample_file(names: list[str]) -> str | None:
    """A member of ``names`` that marks a WebDataset shard: a label (``<key>.cls``), or,
    where most images share their WebDataset key with a sample's file (``<key>.json`` or
    ``<key>.txt`` beside ``<key>.jpg``), the first such; else None. An image's own sidecar
    (``<key>.jpg.json`` of a Google Takeout, ``<key>.jpg.xmp`` of an editor) and other
    annotations (``<key>.xml``, a VOC box) are no sample's files."""
    from webdataset.tariterators import base_plus_ext  # imports torch: not for `--help`

    labels = [name for name in names if name.lower().endswith(".cls")]
    if labels:
        return labels[0]
    images, others = set(), {}
    for name in names:
        key, extension = base_plus_ext(name)
        if key is None:
            continue
        if name.lower().endswith(IMAGE_SUFFIXES):
            images.add(key)
        elif _is_sample_file(extension.lower()):
            others.setdefault(key, name)
    paired = [others[key] for key in sorted(images) if key in others]
    return paired[0] if images and 2 * len(paired) > len(images) else None


def _is_sample_file(extension: str) -> bool:
    """Whether a member of the (lower-case) WebDataset ``extension`` is a sample's label,
    metadata or caption (``json``, ``meta.json``), not an image's own (``jpg.json``)."""
    return f".{extension}".endswith(_SAMPLE_FILES) and not extension.startswith(_IMAGE_SIDECARS)


def refuse_compressed_archives(
    url: str, fs: fsspec.AbstractFileSystem, root: str, entries: list[dict]
) -> None:
    """A ``ValueError`` for a folder of compressed tars (``.tar.gz``, ``.tgz``) and no class
    folders: as class archives, each image would decompress its archive from the start;
    WebDataset shards so compressed are named as shards."""
    names = class_archives(fs, entries, COMPRESSED_ARCHIVES)
    if not names:
        return
    first = f"{root}/{names[0]}"
    with (
        contextlib.suppress(OSError, tarfile.TarError, EOFError),
        fs.open(first, "rb") as file,
        tarfile.open(fileobj=file, mode="r|gz") as tar,
    ):
        _refuse_shards(url, storage_url(fs, first), [m.name for m in itertools.islice(tar, 8)])
    raise ValueError(
        f"{url} holds {len(names):,} compressed tar(s), e.g. {readable(names[0])}: class archives "
        "are read as plain .tar, whose images are read where they lie; decompress them "
        f"(gunzip {url.rstrip('/')}/*.tar.gz {url.rstrip('/')}/*.tgz gives .tar), or extract "
        "each into a folder named by its class"
    )


def member_path(url: str) -> str:
    """Where the image at ``url`` would lie extracted: a class archive's member
    ``tar://<member>::<folder>/<class>.tar`` as ``<folder>/<class>/<member>``; other URLs
    as they are. Keys and the listing's digest are made from it, so a folder of class
    archives and the same archives extracted into class folders make the same keys."""
    if not url.startswith("tar://"):
        return url
    member, archive = url[len("tar://") :].split("::", 1)
    return f"{archive[: -len(ARCHIVE_SUFFIX)]}/{member}"
