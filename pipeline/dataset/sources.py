"""Where a dataset's images are: a folder of class subfolders or of class tar archives (as
ImageNet's ``n01440764.tar``), or a table of (path, label), which ``tables`` reads (a folder
of Parquet files alone is one table in parts, as the Hugging Face Hub publishes a split).

Either becomes a ``Listing``: every image's URL with its integer label, and the label names
(``classes[label]``). Listing touches no image; reading and checking them is ``convert``'s job.
A folder's class archives are read by ``archives``; the file-name conventions both follow
(image suffixes, hidden names) are ``names``'.
"""

from __future__ import annotations

import logging
import os
import posixpath
from collections import Counter, defaultdict
from collections.abc import Callable

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipeline.cache.shards import entry_name, is_file_entry, storage_url
from pipeline.dataset.archives import (
    ARCHIVE_SUFFIX,
    COMPRESSED_ARCHIVES,
    Images,
    archive_images,
    class_archives,
    refuse_compressed_archives,
)
from pipeline.dataset.listing import Listing, Source
from pipeline.dataset.names import (
    COMPRESSIONS,
    IMAGE_SUFFIXES,
    TABLE_SUFFIXES,
    TEXT_TABLES,
    file_suffix,
    is_hidden,
    readable,
)
from pipeline.dataset.tables import list_table

log = logging.getLogger(__name__)

#: The tables pvu reads, for messages.
TABLES_READ = (
    f"({', '.join(TEXT_TABLES)}, each may be compressed as {', '.join(COMPRESSIONS)}; or .parquet)"
)
#: Folder names that usually hold a split of a dataset, not a class.
SPLIT_NAMES = frozenset({"train", "training", "val", "valid", "validation", "test", "dev"})


def list_dataset(
    url: str, *, path_column: str = "path", label_column: str = "label", label_names: bool = False
) -> Listing:
    """The images of the folder or table at ``url`` (local path or any fsspec URL); see
    :func:`list_table` for the table's arguments (a folder of ``.parquet`` files alone is
    one table in parts)."""
    fs, path = fsspec.core.url_to_fs(url)
    columns = {"path_column": path_column, "label_column": label_column}
    if fs.isdir(path):
        if parts := _table_parts(url, fs, path):
            return list_table(url, **columns, label_names=label_names, parts=parts)
        if label_names:
            raise ValueError(f"--label-names reads a table's labels; {url} is a folder of classes")
        return list_folder(url)
    if not fs.exists(path):
        raise FileNotFoundError(f"input {url} does not exist")
    if path.lower().endswith(TABLE_SUFFIXES):
        return list_table(url, **columns, label_names=label_names)
    if path.lower().endswith((ARCHIVE_SUFFIX, *COMPRESSED_ARCHIVES)):
        raise ValueError(
            f"input {url} is one tar archive; pvu shards reads a tar only as one class's, in a "
            "folder of class archives (<folder>/<class>.tar). An archive of a whole dataset "
            "(class folders, or class archives as ImageNet's ILSVRC2012_img_train.tar): extract "
            f"it and give its folder, {_extract(url)}. WebDataset shards: pvu cache --shards {url}"
        )
    raise ValueError(
        f"input {url} is neither a folder of class subfolders or class .tar archives nor a "
        f"table {TABLES_READ}"
    )


def _none_read(unread: Counter[str], *, archives: bool = False) -> str:
    """What the class folders (``archives``) of a folder without images hold instead, by
    suffix, and what pvu reads: a folder of HEIC or AVIF photos was only said to hold no
    images."""
    if not unread:
        return ""
    named = ", ".join(f"{n:,} {suffix or 'without suffix'}" for suffix, n in unread.most_common(5))
    return (
        f"; its class {'archives' if archives else 'folders'}' {unread.total():,} file(s) ({named}"
        f"{', ...' if len(unread) > 5 else ''}) are "
        f"no image pvu reads ({', '.join(IMAGE_SUFFIXES)}): convert them, e.g. to .jpg or .png"
    )


def list_folder(url: str) -> Listing:
    """Images under ``url/<class>/`` (any depth, through links), or in ``url/<class>.tar``
    archives (any depth within them), classes sorted by name.

    The classes are ``url``'s subfolders (links to folders too), or its ``.tar`` files named
    without the suffix (a folder holding both is refused), numbered in sorted order as
    torchvision's ``ImageFolder`` numbers them; one with no image keeps its label, so two
    splits with the same folders agree (``Listing.empty`` names it). Hidden files and
    folders (``__MACOSX`` too), and other files directly under ``url``, are ignored.
    """
    fs, root = fsspec.core.url_to_fs(url)
    root = root.rstrip("/")
    listed = fs.ls(root, detail=True)
    entries = [e for e in listed if not is_hidden(entry_name(e))]
    folders = _class_folders(fs, entries)
    archives = class_archives(fs, entries)
    if folders and archives:
        raise ValueError(
            f"{url} holds both class folders ({len(folders):,}, e.g. {readable(folders[0])}) "
            f"and class archives ({len(archives):,}, e.g. {readable(archives[0])}): give a "
            "folder of one kind (move the archives out where they were extracted already)"
        )
    if not folders:
        refuse_compressed_archives(url, fs, root, entries)
    if archives:
        files = [entry_name(e) for e in listed if e["type"] != "directory"]
        by_class, ignored, unread = archive_images(url, fs, root, archives, files)
        expected = f"{url}/<class>.tar holding <image>.jpg"
    else:
        by_class, ignored, unread = _folder_images(fs, root, folders)
        expected = f"{url}/<class>/<image>.jpg"
    loose = _loose_images(entries)
    if not any(by_class.values()):
        _refuse_loose_images(url, loose, entries)
        _refuse_table_parts(url, ignored)
        _refuse_archived_archives(url, archives, unread)
        raise FileNotFoundError(
            f"no images in class {'archives' if archives else 'subfolders'} of {url} "
            f"(expected {expected})" + _none_read(unread, archives=bool(archives))
        )
    if loose:
        log.warning(
            "left out %d image(s) directly in %s, in no class %s (e.g. %s): only a class's "
            "images are listed",
            *(len(loose), url, "archive" if archives else "folder", readable(loose[0])),
        )
    listed = sorted(by_class)
    classes = [readable(name) for name in listed]
    if {name.lower() for name in classes} <= SPLIT_NAMES:
        _warn_of_splits(
            url, [readable(name) for name in archives] or classes, archives=bool(archives)
        )
    sources = [
        Source(u, label, span) for label, name in enumerate(listed) for u, span in by_class[name]
    ]
    empty = [readable(name) for name in listed if not by_class[name]]
    return Listing(sources, classes, ignored, empty)


def _folder_images(
    fs: fsspec.AbstractFileSystem, root: str, folders: list[str]
) -> tuple[Images, Counter[str], Counter[str]]:
    """The images of ``root``'s class ``folders``; the files ignored, by suffix (of
    ``root`` and of the class folders: ``unread``, not hidden ones)."""
    # keyed and sorted by the names as listed, as ImageFolder numbers them; text for output
    by_class: Images = {name: [] for name in folders}
    ignored: Counter[str] = Counter()
    unread: Counter[str] = Counter()  # the ignored files of class folders, not hidden
    for path in sorted(_files_below(fs, root)):
        parts = path[len(root) + 1 :].split("/")
        in_class = len(parts) >= 2 and not any(map(is_hidden, parts))
        if in_class and path.lower().endswith(IMAGE_SUFFIXES):
            by_class[parts[0]].append((storage_url(fs, path), None))
        else:
            suffix = readable(file_suffix(posixpath.basename(path)))
            ignored[suffix] += 1
            if in_class:
                unread[suffix] += 1
    return by_class, ignored, unread


def _table_parts(url: str, fs: fsspec.AbstractFileSystem, root: str) -> list[str]:
    """The URLs (``url/<name>``, as the user spelled ``url``) of the files of the folder
    ``root`` (of ``url``) in sorted order if they are a table in parts: its visible entries
    are all ``.parquet`` files (the Hub's ``train-00000-of-00040.parquet``, ...); else none."""
    entries = [e for e in fs.ls(root, detail=True) if not is_hidden(entry_name(e))]
    names = sorted(entry_name(e) for e in entries if is_file_entry(fs, e))
    parquet = all(file_suffix(name) == ".parquet" for name in names)
    if not names or len(names) < len(entries) or not parquet:
        return []
    return [f"{url.rstrip('/')}/{name}" for name in names]


def _loose_images(entries: list[dict]) -> list[str]:
    """The names of the images among a folder's visible ``entries`` (directly in it), sorted."""
    names = (entry_name(e) for e in entries if e["type"] != "directory")
    return sorted(name for name in names if name.lower().endswith(IMAGE_SUFFIXES))


def _refuse_loose_images(url: str, loose: list[str], entries: list[dict]) -> None:
    """A ``ValueError`` for a folder that holds its images directly (``loose``), in no class
    folder, saying how to give their labels: in a table, such as one among its ``entries``
    (``labels.csv`` beside the images), or by class subfolders."""
    if not loose:
        return
    tables = sorted(
        name for e in entries if (name := entry_name(e)).lower().endswith(TABLE_SUFFIXES)
    )
    beside = (
        f", such as the one beside them: --input {url.rstrip('/')}/{tables[0]}" if tables else ""
    )
    raise ValueError(
        f"{url} holds {len(loose):,} image(s) directly (e.g. {readable(loose[0])}), in no class "
        "subfolder, so none has a label: give their labels in a table of path and label (paths "
        f"relative to its folder) as --input{beside}; or move each class's "
        f"images into {url.rstrip('/')}/<class>/"
    )


def _refuse_table_parts(url: str, ignored: Counter[str]) -> None:
    """A ``ValueError`` for a folder without images that holds tables, but not as a table in
    parts pvu reads (``.parquet`` files alone): text tables, or Parquet in subfolders (a
    Spark or Dask output, pandas' ``partition_cols``), which is no folder of classes."""
    tables = Counter({suffix: ignored[suffix] for suffix in TABLE_SUFFIXES if ignored[suffix]})
    if not tables:
        return
    named = ", ".join(f"{n:,} {suffix}" for suffix, n in tables.most_common())
    raise ValueError(
        f"{url} holds {tables.total():,} table file(s) ({named}), no images: a table written "
        "in parts is read as one only as a folder of .parquet files alone (no subfolders, "
        "text tables or other files beside them); merge these into one .csv or .parquet file "
        "and give that as --input (Parquet: pyarrow.parquet.write_table("
        f"pyarrow.parquet.read_table({url!r}), 'table.parquet'))"
    )


def _refuse_archived_archives(url: str, archives: list[str], unread: Counter[str]) -> None:
    """A ``ValueError`` for class ``archives`` of ``url`` that hold archives, not images (by
    their members ``unread``, by suffix): ImageNet's ``ILSVRC2012_img_train.tar`` of class
    archives, given in a folder, is no class; extracted, it is a folder of class archives."""
    if not unread or unread.most_common(1)[0][0] != ARCHIVE_SUFFIX:
        return
    raise ValueError(
        f"the class archives of {url} hold archives, not images ({unread[ARCHIVE_SUFFIX]:,} "
        ".tar): an archive of class archives (as ImageNet's ILSVRC2012_img_train.tar) is no "
        f"class: extract it and give its folder, {_extract(posixpath.join(url, archives[0]))}"
    )


def _warn_of_splits(url: str, names: list[str], *, archives: bool) -> None:
    """Warn that ``url``'s class folders (or ``archives``), by ``names``, look like a dataset's
    splits (``train``, ``val``), saying which folder to give: a split's archive is extracted
    first, its folder not there yet."""
    first = f"{url.rstrip('/')}/{min(names, key=_train_first)}"
    if not archives:
        log.warning(
            "the class folders of %s are named like splits (%s): if they are, give one split "
            "as --input, e.g. %s",
            *(url, ", ".join(names), first),
        )
        return
    log.warning(
        "the class archives of %s are named like a dataset's splits (%s), not classes: if they "
        "are, extract one split's archive and give its folder as --input, e.g. %s",
        *(url, ", ".join(names), _extract(first)),
    )


def _extract(archive: str) -> str:
    """The commands that extract ``archive`` into a folder beside it, and that folder as
    ``--input``."""
    name = archive.lower()
    suffix = next(s for s in (*COMPRESSED_ARCHIVES, ARCHIVE_SUFFIX) if name.endswith(s))
    folder = archive[: -len(suffix)]
    return f"mkdir {folder} && tar -xf {archive} -C {folder}, then --input {folder}"


def _train_first(split: str) -> tuple[bool, str]:
    return (not split.lower().startswith("train"), split)


def _class_folders(fs: fsspec.AbstractFileSystem, entries: list[dict]) -> list[str]:
    """The names of the subfolders (links to folders too) among a folder's visible
    ``entries``, as listed."""
    names = []
    for entry in entries:
        is_link = entry.get("islink", False) and fs.isdir(entry["name"])
        if entry["type"] == "directory" or is_link:
            names.append(entry_name(entry))
    return names


def _files_below(fs: fsspec.AbstractFileSystem, root: str) -> list[str]:
    """The files below ``root``, through links to folders at any depth (which ``find`` lists
    as files and does not enter): one ``find`` of ``root``, then one a link. Each class folder
    (``root``'s subfolder) lists its own files, so a link to another class gets that class's
    images; within a class each real folder is listed once, so a link to one listed already
    adds nothing and a loop ends. A link to ``root`` or a folder above it is not entered (it
    would put every class in one)."""
    real = os.path.realpath if isinstance(fs, LocalFileSystem) else str
    above = _and_above(real(root))
    walked: defaultdict[str, set[str]] = defaultdict(set)  # class -> its real folders listed
    files, links, special = [], [root], []
    while links:
        top = links.pop(0)  # after every folder the walks before it listed
        if top != root and (real(top) in above or real(top) in walked[_class_of(root, top)]):
            continue
        listing = fs.find(top, withdirs=True, detail=True)
        listed = _listed_before(root, top, listing, walked, real)
        for path, info in listing.items():
            if path == top or posixpath.dirname(path) in listed:
                continue
            if info.get("islink") and fs.isdir(path):
                links.append(path)
            elif is_file_entry(fs, info):
                files.append(path)
            elif info["type"] != "directory":  # a FIFO, socket or device (or a link to one)
                special.append(path)
    if special:
        log.warning(
            "left out %d entr(ies) below %s that are no regular file (a FIFO, socket or "
            "device), e.g. %s",
            *(len(special), root, readable(special[0])),
        )
    return files


def _listed_before(
    root: str,
    top: str,
    listing: dict[str, dict],
    walked: defaultdict[str, set[str]],
    real: Callable[[str], str],
) -> set[str]:
    """The folders of ``listing`` (a ``find`` of ``top``) whose class listed them already, by
    another path; the others are added to ``walked`` (class -> real folders)."""
    folders = [top, *(path for path, info in listing.items() if info["type"] == "directory")]
    before = set()
    for path in dict.fromkeys(folders):
        seen = walked[_class_of(root, path)]
        if real(path) in seen:
            before.add(path)
        seen.add(real(path))
    return before


def _class_of(root: str, path: str) -> str:
    """The class folder ``path`` (below ``root``) is in; ``""`` for ``root`` itself."""
    return path[len(root) + 1 :].split("/", 1)[0]


def _and_above(path: str) -> set[str]:
    """``path`` and every folder above it."""
    folders = {path}
    while (path := posixpath.dirname(path)) not in folders:
        folders.add(path)
    return folders
