"""Where a dataset's images are: a folder of class subfolders or of class tar archives (as
ImageNet's ``n01440764.tar``), or a table of (path, label): a CSV, TSV or JSON Lines file
(each may be compressed) or a Parquet one, or a folder of Parquet files read as one table (a
table in parts, as the Hugging Face Hub publishes a split).

Either becomes a ``Listing``: every image's URL with its integer label, and the label names
(``classes[label]``). Listing touches no image; reading and checking them is ``convert``'s job.
A folder's class archives are read by ``archives``; the file-name conventions both follow
(image suffixes, hidden names) are ``names``'.
"""

from __future__ import annotations

import logging
import os
import posixpath
import re
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import fsspec
import pyarrow as pa
import pyarrow.compute
import pyarrow.csv
import pyarrow.json
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from pipeline.cache.shards import (
    entry_name,
    is_file_entry,
    resolve_entry,
    resolve_local,
    storage_url,
)
from pipeline.dataset.archives import (
    ARCHIVE_SUFFIX,
    Images,
    archive_images,
    class_archives,
    refuse_compressed_archives,
)
from pipeline.dataset.held import (
    HeldTable,
    Kept,
    holds_text,
    is_binary,
    is_image_struct,
    parquet_schema,
)
from pipeline.dataset.names import (
    COMPRESSIONS,
    IMAGE_SUFFIXES,
    TABLE_SUFFIXES,
    TEXT_TABLES,
    file_suffix,
    is_hidden,
    readable,
)
from pipeline.retry import read_url, retry

log = logging.getLogger(__name__)

#: The tables pvu reads, for messages.
TABLES_READ = (
    f"({', '.join(TEXT_TABLES)}, each may be compressed as {', '.join(COMPRESSIONS)}; or .parquet)"
)
#: Folder names that usually hold a split of a dataset, not a class.
SPLIT_NAMES = frozenset({"train", "training", "val", "valid", "validation", "test", "dev"})
#: The largest integer label a table may give: classes.json names every index up to it.
MAX_INTEGER_LABEL = 1_000_000


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


def list_dataset(
    url: str, *, path_column: str = "path", label_column: str = "label", label_names: bool = False
) -> Listing:
    """The images of the folder or table at ``url`` (local path or any fsspec URL); see
    :func:`list_table` for the table's arguments (a folder of ``.parquet`` files alone is
    one table in parts)."""
    fs, path = fsspec.core.url_to_fs(url)
    if fs.isdir(path) and (parts := _table_parts(url, fs, path)):
        return list_table(
            url,
            path_column=path_column,
            label_column=label_column,
            label_names=label_names,
            parts=parts,
        )
    if fs.isdir(path) and label_names:
        raise ValueError(f"--label-names reads a table's labels; {url} is a folder of classes")
    if fs.isdir(path):
        return list_folder(url)
    if not fs.exists(path):
        raise FileNotFoundError(f"input {url} does not exist")
    if path.lower().endswith(TABLE_SUFFIXES):
        return list_table(
            url, path_column=path_column, label_column=label_column, label_names=label_names
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
    if not any(by_class.values()):
        _refuse_table_parts(url, ignored)
        raise FileNotFoundError(
            f"no images in class {'archives' if archives else 'subfolders'} of {url} "
            f"(expected {expected})" + _none_read(unread, archives=bool(archives))
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
    folder = first[: -len(ARCHIVE_SUFFIX)]
    log.warning(
        "the class archives of %s are named like a dataset's splits (%s), not classes: if they "
        "are, extract one split's archive and give its folder as --input, e.g. mkdir %s && "
        "tar -xf %s -C %s, then --input %s",
        *(url, ", ".join(names), folder, first, folder, folder),
    )


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


def list_table(
    url: str,
    *,
    path_column: str = "path",
    label_column: str = "label",
    label_names: bool = False,
    parts: list[str] | None = None,
) -> Listing:
    """Images named in the table at ``url`` (one of ``TABLE_SUFFIXES``), one row each; or in
    the table in ``parts`` (Parquet files of one schema, in the folder ``url``), read as one:
    their rows in order, labels typed and numbered over all, rows named by their place in
    the whole in messages (a held image's source by its file's).

    Paths are URLs or paths relative to the table's folder. Integer labels (or whole-number
    floats, as pandas writes a column that once held a NaN) keep their value (``classes``
    names them ``"0"`` to ``"<max>"``, at most ``MAX_INTEGER_LABEL``); other labels are names,
    numbered in sorted order. ``label_names`` reads numbers as names too, as a CSV's
    zero-padded numbers (``001``) always are: such IDs are no class indices.
    """
    files = parts or [url]
    parquet = file_suffix(files[0]) == ".parquet"
    held = _held_column(url, files, path_column, label_column) if parquet else None
    if parts:  # messages name the folder, and rows by their place in the whole
        url = f"{url} (its {len(parts):,} .parquet parts as one table, rows counted through them)"
    if held is None and not parts:
        table = _read_table(url, path_column, label_column, label_names=label_names)
        counts = [table.num_rows]
    else:
        path_column = held or path_column
        tables = [
            _read_held(file, held, label_column) if held else _read_parquet(file) for file in files
        ]
        counts = [part.num_rows for part in tables]
        table = pa.concat_tables(tables, promote_options="default")  # nullability may differ
        table = _typed_labels(url, table, label_column, label_names=label_names)
    for column, flag in ((path_column, "--path-column"), (label_column, "--label-column")):
        _require_column(url, table.column_names, column, flag)
        _refuse_nested(url, table, column, path_column)
        table = _bytes_as_text(url, table, column)
    paths = table.column(path_column).to_pylist()
    labels = table.column(label_column).to_pylist()
    for row, (path, label) in enumerate(zip(paths, labels, strict=True)):
        unnamed = path is None or not str(path).strip()  # a held image needs no path
        if (unnamed and held is None) or label is None or not str(label).strip():
            raise ValueError(f"table {url}: row {row + 1} lacks {path_column} or {label_column}")
    folder = _folder(files[0])
    urls = [None if path is None else resolve_entry(str(path).strip(), folder) for path in paths]
    _warn_of_backslashes(url, paths)
    if not paths:
        raise ValueError(f"table {url} has no rows, only its header")
    if _is_number(table.schema.field(label_column).type):
        numbers = _integer_labels(url, labels)
        classes = [str(label) for label in range(max(numbers) + 1)]
        if 2 * len(set(numbers)) < len(classes):
            log.warning(
                "table %s: its labels are class indices 0-%d of which %d occur: if they are "
                "IDs, not indices, pass --label-names to read them as names (a subset of a "
                "classifier's classes, as ImageNet-A's 200 of 1,000, is right as it is)",
                *(url, len(classes) - 1, len(set(numbers))),
            )
    else:
        names = [str(label).strip() for label in labels]
        if not label_names:
            _refuse_mixed_labels(url, names)
        classes = sorted(set(names))
        index = {name: number for number, name in enumerate(classes)}
        numbers = [index[name] for name in names]
    if held is not None:
        kept = Kept()  # the parts' images held at once, all together
        held_tables = [HeldTable(file, held, kept) for file in files]
        rows = [
            (images, row)
            for images, count in zip(held_tables, counts, strict=True)
            for row in range(count)
        ]
        return Listing(
            [
                HeldImage(f"{images.url}#row={row + 1}", n, table=images, row=row, path=path)
                for (images, row), path, n in zip(rows, urls, numbers, strict=True)
            ],
            classes,
        )
    _check_repeats(url, urls, numbers, classes)
    return Listing([Source(u, n) for u, n in zip(urls, numbers, strict=True)], classes)


#: The column a Hugging Face dataset holds its images in, read when the table has no
#: ``--path-column`` of the default name.
IMAGE_COLUMN = "image"


def _held_column(url: str, files: list[str], path_column: str, label_column: str) -> str | None:
    """The column of the Parquet table at ``url`` (in ``files``: itself, or its parts) that
    holds images' bytes, if it is ``path_column`` (or, for the default ``path`` where there is
    none, ``image``), else ``None``; refuses a missing label column naming the table's
    columns, and parts that differ (:func:`_shared_schema`)."""
    schema = _shared_schema(files)
    column = path_column
    if path_column == "path" and "path" not in schema.names and IMAGE_COLUMN in schema.names:
        column = IMAGE_COLUMN
    if column not in schema.names:
        return None
    data_type = schema.field(column).type
    if not (
        is_image_struct(data_type) or (is_binary(data_type) and not holds_text(files[0], column))
    ):
        return None
    _require_column(url, schema.names, label_column, "--label-column")
    if column != path_column:
        log.info("table %s has no column 'path': its images are read from %r", url, column)
    return column


def _shared_schema(files: list[str]) -> pa.Schema:
    """The schema of the Parquet ``files`` (a table, or its parts), by their footers; a
    ``ValueError`` naming the first file and column that differ from the first file's (a
    column's type as read: a pandas category's values)."""
    first = parquet_schema(files[0])
    for file in files[1:]:
        schema = parquet_schema(file)
        for name in dict.fromkeys([*first.names, *schema.names]):
            if name not in schema.names or name not in first.names:
                has, lacks = (files[0], file) if name in first.names else (file, files[0])
                raise ValueError(
                    f"table part {lacks} has no column {name!r}, which {has} has ({file}'s "
                    f"columns: {', '.join(schema.names)}; {files[0]}'s: "
                    f"{', '.join(first.names)}): the parts of a table share its columns; "
                    "move the parts of other tables out of the folder"
                )
            ours, theirs = (_read_type(s.field(name).type) for s in (schema, first))
            if ours != theirs:
                raise ValueError(
                    f"table part {file}: column {name!r} holds {ours}, not {theirs} as in "
                    f"{files[0]}: the parts of a table share its column types; write them alike"
                )
    return first


def _read_type(data_type: pa.DataType) -> pa.DataType:
    """``data_type`` as a table's column is read: a dictionary's (pandas category's) values."""
    return data_type.value_type if pa.types.is_dictionary(data_type) else data_type


def _require_column(url: str, names: list[str], column: str, flag: str) -> None:
    """A ``ValueError`` for a table (of column ``names``) without ``column``."""
    if column not in names:
        raise ValueError(
            f"table {url} has no column {column!r} (it has {', '.join(names)}): name yours "
            f"with {flag}{_separator_hint(names)}"
        )


def _read_held(url: str, column: str, label_column: str) -> pa.Table:
    """The table at ``url`` without its images: ``column``'s paths (null for a binary column
    or where the struct gives none) and the labels as stored, read by batches (the images'
    bytes are read by :class:`HeldTable` as they are converted)."""

    def read() -> pa.Table:
        with fsspec.open(url, "rb") as handle:
            file = pq.ParquetFile(handle)
            struct = pa.types.is_struct(file.schema_arrow.field(column).type)
            has_path = struct and file.schema_arrow.field(column).type.get_field_index("path") >= 0
            names = [f"{column}.path"] if has_path else []
            batches = list(file.iter_batches(columns=[*names, label_column]))
        labels = [batch.column(label_column) for batch in batches]
        rows = sum(map(len, labels))
        paths = (
            pa.chunked_array([batch.column(column).field("path") for batch in batches], pa.string())
            if has_path
            else pa.nulls(rows, pa.string())
        )
        label_type = file.schema_arrow.field(label_column).type
        return pa.table({column: paths, label_column: pa.chunked_array(labels, label_type)})

    return _decoded(retry(read, what=f"read {url}"))


def _warn_of_backslashes(url: str, paths: list) -> None:
    """Warn of local paths written with Windows' ``\\`` (``images\\cat\\1.jpg``): here a
    backslash is part of a file name, so each such image would be left out as not found."""
    row = next(
        (row for row, path in enumerate(paths) if "\\" in str(path) and "://" not in str(path)),
        None,
    )
    if row is not None and os.sep == "/":
        log.warning(
            "table %s: row %d's path %r holds a backslash, which is part of a file name here, "
            "not a folder separator: if the table was written on Windows, write its paths with "
            "'/' (pandas: df[column].str.replace('\\\\', '/'))",
            *(url, row + 1, str(paths[row]).strip()),
        )


def _separator_hint(columns: list[str]) -> str:
    """A hint for a header read as one column that holds a tab or comma: a TSV named .csv, or
    a CSV named .tsv."""
    if len(columns) != 1 or not ("\t" in columns[0] or "," in columns[0]):
        return ""
    return (
        f"; its header {columns[0]!r} was read as one column: a .csv is read comma-separated, "
        "a .tsv tab-separated, so name the file by its separator"
    )


def _refuse_nested(url: str, table: pa.Table, name: str, path_column: str) -> None:
    """A ``ValueError`` for a column ``name`` of nested values (a struct, list or map), whose
    text would be read as a path or class name: a Hugging Face export's ``image`` column of
    ``{bytes, path}`` structs, a multi-label list."""
    data_type = table.schema.field(name).type
    if not pa.types.is_nested(data_type):
        return
    what = "image path or URL" if name == path_column else "label"
    hint = (
        ": images stored in a table are read from a column of struct<bytes: binary, path: "
        "string> (a Hugging Face dataset's) or of binary"
        if name == path_column
        else " (a multi-label column?): give one class name or index per row"
    )
    raise ValueError(
        f"table {url}: column {name!r} holds {data_type}, not one {what} per row{hint}"
    )


def _bytes_as_text(url: str, table: pa.Table, name: str) -> pa.Table:
    """``table`` with its column ``name`` as text if it holds bytes (pyarrow reads a CSV that is
    not UTF-8, as Excel saves one, so: its labels became names like ``b'ch\\xe9vre'``); a
    ``ValueError`` naming the first row that is not UTF-8."""
    column = table.column(name)
    if not (pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)):
        return table
    for row, value in enumerate(column.to_pylist()):
        try:
            (value or b"").decode()
        except UnicodeDecodeError:
            raise ValueError(
                f"table {url}: column {name!r} is not UTF-8 text (row {row + 1}: {value!r}); "
                "save the table in UTF-8"
            ) from None
    return table.set_column(table.column_names.index(name), name, column.cast(pa.string()))


def _check_repeats(url: str, urls: list[str], numbers: list[int], classes: list[str]) -> None:
    """Refuse an image that two rows give different labels; warn of one listed twice alike
    (it becomes two samples)."""
    first: dict[str, int] = {}
    repeated = 0
    for row, image in enumerate(urls):
        seen = first.setdefault(image, row)
        if seen == row:
            continue
        if numbers[seen] != numbers[row]:
            raise ValueError(
                f"table {url}: rows {seen + 1} and {row + 1} give {readable(image)} two labels "
                f"({classes[numbers[seen]]!r} and {classes[numbers[row]]!r}); keep one"
            )
        repeated += 1
    if repeated:
        log.warning(
            "table %s lists %d image(s) more than once: each row becomes a sample", url, repeated
        )


#: A label that is a whole number as a CSV or pandas writes one: ``7``, ``7.0``.
_WHOLE_NUMBER = re.compile(r"[0-9]+(\.0*)?")


def _refuse_mixed_labels(url: str, names: list[str]) -> None:
    """Refuse whole-number labels mixed with words (a typo, a stray header) where reading all
    as names moves class indices: sorted as names, '10' comes before '2' (single digits and
    letters, as EMNIST's classes, keep their order and pass)."""
    numbers = [name for name in names if _WHOLE_NUMBER.fullmatch(name)]
    words = [row for row, name in enumerate(names) if not _WHOLE_NUMBER.fullmatch(name)]
    if words and any(len(name) > 1 for name in numbers):
        raise ValueError(
            f"table {url}: its labels mix whole numbers ({', '.join(sorted(set(numbers))[:3])}, "
            f"...) with words ({len(words)} row(s), the first row {words[0] + 1}: "
            f"{names[words[0]]!r}); read as names, they would be numbered in sorted order ('10' "
            "before '2'), not kept as class indices: fix those rows, or pass --label-names if "
            "the labels are names"
        )


def _integer_labels(url: str, labels: list[int | float]) -> list[int]:
    """``labels`` as class indices, or a ``ValueError`` naming the first that is not one."""
    for row, label in enumerate(labels):
        if not float(label).is_integer() or not 0 <= label <= MAX_INTEGER_LABEL:
            raise ValueError(
                f"table {url}: label {label} in row {row + 1} is not a class index (a whole "
                f"number from 0 to {MAX_INTEGER_LABEL:,}); if labels are IDs, not indices, pass "
                "--label-names to read them as names"
            )
    return [int(label) for label in labels]


def _read_table(url: str, path_column: str, label_column: str, *, label_names: bool) -> pa.Table:
    """The table at ``url`` (of ``TABLE_SUFFIXES``, decompressed by its last suffix), its
    numeric ``label_column`` as text where labels are names; a CSV's or TSV's ``path_column``
    as written (``000123`` is no number; its bytes, checked as UTF-8 by the caller)."""
    stem, last = posixpath.splitext(url.lower())
    if last == ".parquet":
        return _typed_labels(url, _read_parquet(url), label_column, label_names=label_names)
    codec = COMPRESSIONS.get(last)  # list.csv.gz: a CSV in gzip
    kind = TEXT_TABLES[posixpath.splitext(stem)[1] if codec else last]
    data = _unpacked(url, read_url(url), codec)
    _refuse_utf16(url, data)
    if kind == "jsonl":
        return _read_json_lines(url, data, label_column, label_names=label_names)
    delimiter = "\t" if kind == "tsv" else ","
    return _read_csv(url, data, path_column, label_column, delimiter, label_names=label_names)


def _read_parquet(url: str) -> pa.Table:
    """The Parquet table at ``url``, whole, its labels as stored."""
    return _decoded(pq.read_table(pa.BufferReader(read_url(url))))


def _unpacked(url: str, data: bytes, codec: str | None) -> bytes:
    """``data`` (of ``url``) decompressed with pyarrow's ``codec``, if any; a ``ValueError``
    naming ``url`` for data that is not so compressed or cut short."""
    if codec is None:
        return data
    try:
        return pa.CompressedInputStream(pa.BufferReader(data), codec).read()
    except (OSError, pa.ArrowInvalid) as error:
        raise ValueError(
            f"table {url} is not whole {codec}-compressed data ({error}): compress it again, "
            "or give it a suffix without the compression's"
        ) from None


def _refuse_utf16(url: str, data: bytes) -> None:
    """A ``ValueError`` for a text table in UTF-16 (by its byte-order mark or zero bytes)."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")) or b"\x00" in data[:1024]:
        raise ValueError(
            f"table {url} is UTF-16 text (as Excel's 'Unicode Text' saves it), not UTF-8; "
            "save it as UTF-8 (Excel: 'CSV UTF-8')"
        )


def _read_json_lines(url: str, data: bytes, label_column: str, *, label_names: bool) -> pa.Table:
    """The JSON Lines table ``data`` (of ``url``, one object a line), its labels as names or
    indices as asked; a text column that is not UTF-8 as bytes, which the caller names."""
    try:
        table = pyarrow.json.read_json(pa.BufferReader(data))
    except pa.ArrowInvalid as error:
        raise ValueError(
            f"table {url} is not readable JSON Lines ({error}): write one JSON object a line, "
            "each column of one type (labels all numbers or all strings)"
        ) from None
    if not table.num_rows:
        raise ValueError(f"table {url} has no rows")
    for index, name in enumerate(table.column_names):
        if _is_text(table.schema.field(index).type) and not _valid(table.column(index)):
            table = table.set_column(index, name, table.column(index).cast(pa.binary()))
    return _typed_labels(url, table, label_column, label_names=label_names)


def _valid(column: pa.ChunkedArray) -> bool:
    """Whether the text ``column`` is UTF-8 throughout."""
    try:
        column.validate(full=True)
    except pa.ArrowInvalid:
        return False
    return True


def _typed_labels(url: str, table: pa.Table, label_column: str, *, label_names: bool) -> pa.Table:
    """``table`` (Parquet or JSON Lines, typed) with its labels as names or indices as asked."""
    column = table.schema.get_field_index(label_column)
    if column < 0:
        return table
    if label_names and _is_number(table.schema.field(column).type):
        return table.set_column(column, label_column, table[column].cast(pa.string()))
    if not label_names and _is_text(table.schema.field(column).type):
        return _indices_of_text(url, table, column)
    return table


def _read_csv(
    url: str,
    data: bytes,
    path_column: str,
    label_column: str,
    delimiter: str,
    *,
    label_names: bool,
) -> pa.Table:
    """The CSV table ``data`` (of ``url``; a TSV with ``delimiter`` tab), ``path_column`` as its
    bytes, its labels as :func:`_numbers_as_text` reads them; ``ValueError`` naming ``url`` for
    a header that is not UTF-8 or no CSV."""
    parse = pyarrow.csv.ParseOptions(delimiter=delimiter)
    paths = pyarrow.csv.ConvertOptions(column_types={path_column: pa.binary()})
    try:
        table = pyarrow.csv.read_csv(
            pa.BufferReader(data), parse_options=parse, convert_options=paths
        )
        table.column_names  # noqa: B018 - pyarrow decodes the header's bytes only here
        return _numbers_as_text(url, table, data, parse, label_column, always=label_names)
    except pa.ArrowInvalid as error:
        what = "TSV" if delimiter == "\t" else "CSV"
        raise ValueError(f"table {url} is not a readable {what}: {error}") from None
    except UnicodeDecodeError:
        header = data.removeprefix(b"\xef\xbb\xbf").splitlines()[0]
        raise ValueError(
            f"table {url}: its header is not UTF-8 text ({header!r}); save the table in UTF-8"
        ) from None


def _numbers_as_text(
    url: str,
    table: pa.Table,
    data: bytes,
    parse: pyarrow.csv.ParseOptions,
    label_column: str,
    *,
    always: bool,
) -> pa.Table:
    """``table`` with its numeric label column read again from the CSV ``data`` as text, as it
    is written, if ``always`` or a label is zero-padded (``001``: said with a warning); its
    boolean one (``true``, ``false``, ``1``, as pyarrow reads them) always."""
    column = table.schema.get_field_index(label_column)
    boolean = column >= 0 and pa.types.is_boolean(table.schema.field(column).type)
    if column < 0 or not (boolean or _is_number(table.schema.field(column).type)):
        return table
    as_text = pyarrow.csv.ConvertOptions(
        column_types={label_column: pa.string()}, include_columns=[label_column]
    )
    labels = pyarrow.csv.read_csv(
        pa.BufferReader(data), parse_options=parse, convert_options=as_text
    )[label_column]
    if always or boolean or _warn_of_padding(url, labels):  # 'true', '1': names as written
        return table.set_column(column, label_column, labels)
    return table


def _warn_of_padding(url: str, labels: pa.ChunkedArray) -> bool:
    """Whether a label of ``labels`` (whole numbers as text) is zero-padded (``001``): then
    they are IDs, read as names, which a warning says."""
    padded = pa.compute.index(pa.compute.match_substring_regex(labels, r"^\s*0\d"), True).as_py()
    if padded < 0:
        return False
    log.warning(
        "table %s: its labels are zero-padded numbers (%r in row %d), read as names, numbered "
        "in sorted order in classes.json; if they are class indices, write them without zeros",
        *(url, labels[padded].as_py(), padded + 1),
    )
    return True


def _indices_of_text(url: str, table: pa.Table, column: int) -> pa.Table:
    """``table`` with its text label ``column`` as numbers if every label is a whole number (a
    Parquet string column of ``'0'``, ``'2'``, ``'10'``): class indices, as a CSV's are, not
    names numbered in sorted order ('10' before '2'); zero-padded ones are names, with the
    CSV's warning."""
    labels = pa.compute.utf8_trim_whitespace(table[column])
    whole = pa.compute.match_substring_regex(labels, f"^{_WHOLE_NUMBER.pattern}$")
    if not pa.compute.all(whole).as_py() or _warn_of_padding(url, labels):
        return table
    return table.set_column(column, table.field(column).name, labels.cast(pa.float64()))


def _decoded(table: pa.Table) -> pa.Table:
    """``table`` with its dictionary-encoded columns (a pandas category) plain."""
    for index, column in enumerate(table.schema):
        if pa.types.is_dictionary(column.type):
            plain = table.column(index).cast(column.type.value_type)
            table = table.set_column(index, column.name, plain)
    return table


def _is_number(data_type: pa.DataType) -> bool:
    """Integers, floats and decimals (a SQL NUMERIC column): class indices, not names."""
    return (
        pa.types.is_integer(data_type)
        or pa.types.is_floating(data_type)
        or pa.types.is_decimal(data_type)
    )


def _is_text(data_type: pa.DataType) -> bool:
    return pa.types.is_string(data_type) or pa.types.is_large_string(data_type)


def _folder(url: str) -> str:
    """The folder a table at ``url`` sits in, as a URL (absolute for local paths)."""
    fs, path = fsspec.core.url_to_fs(url)
    if isinstance(fs, LocalFileSystem):
        return posixpath.dirname(resolve_local(path))
    return url.rsplit("/", 1)[0]
