"""A table of images and labels as a ``Listing``: a CSV, TSV or JSON Lines file (each may be
compressed) or a Parquet one, or a folder's Parquet files read as one table in parts; its
images named by path or URL, or held in a Parquet column (read by ``held``). Labels become
class indices as written, or names numbered in sorted order.
"""

from __future__ import annotations

import logging
import os
import posixpath
import re

import fsspec
import pyarrow as pa
import pyarrow.compute
import pyarrow.csv
import pyarrow.json
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from pipeline.cache.shards import resolve_entry, resolve_local
from pipeline.dataset.held import (
    HeldTable,
    Kept,
    holds_text,
    is_binary,
    is_image_struct,
    is_text,
    parquet_schema,
)
from pipeline.dataset.listing import HeldImage, Listing, Source
from pipeline.dataset.names import COMPRESSIONS, TEXT_TABLES, file_suffix, readable
from pipeline.retry import read_url, retry

log = logging.getLogger(__name__)

#: The largest integer label a table may give: classes.json names every index up to it.
MAX_INTEGER_LABEL = 1_000_000


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
    named = [None if path is None else str(path).strip() or None for path in paths]
    for row, (path, label) in enumerate(zip(named, labels, strict=True)):
        if path is None and held is None:
            raise ValueError(
                f"table {url}: row {row + 1} has no {path_column}: give each row its image's "
                "path or URL, or remove the row"
            )
        if label is None or not str(label).strip():
            raise ValueError(f"table {url}: row {row + 1} has no {label_column}{_UNLABELLED}")
    folder = _folder(files[0])
    # a held image's blank path is none: not the table's folder
    urls = [None if path is None else resolve_entry(path, folder) for path in named]
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


#: Arrow's view types (polars and DuckDB export them) and the plain types they are read as.
_PLAIN_OF_VIEW = {pa.binary_view(): pa.binary(), pa.string_view(): pa.string()}


def _read_type(data_type: pa.DataType) -> pa.DataType:
    """``data_type`` as a table's column is read: a dictionary's (pandas category's) values, a
    view type as its plain type (pyarrow's ``utf8_trim_whitespace`` takes no ``string_view``)."""
    if pa.types.is_dictionary(data_type):
        data_type = data_type.value_type
    return _PLAIN_OF_VIEW.get(data_type, data_type)


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
        paths = (  # a large_string or string_view path (polars) read as a string
            pa.chunked_array(
                [batch.column(column).field("path").cast(pa.string()) for batch in batches],
                pa.string(),
            )
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
    if not is_binary(column.type):
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


#: What to do with a row whose label is missing, or a negative number (-1, as a Hugging Face
#: test split marks an image without one): ``--label-names`` would make it a class.
_UNLABELLED = (
    ": an image without a label (as a test split's, left empty or marked -1) has no class to "
    "learn or be scored by; remove the rows of such images, or give each its class"
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
        if float(label).is_integer() and label < 0:
            raise ValueError(
                f"table {url}: label {label} in row {row + 1} is no class index{_UNLABELLED}"
            )
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
        if is_text(table.schema.field(index).type) and not _valid(table.column(index)):
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
    if not label_names and is_text(table.schema.field(column).type):
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
    """``table`` with each column of its type as read (:func:`_read_type`): dictionary-encoded
    ones (a pandas category) plain, those of a view type of its plain type."""
    for index, column in enumerate(table.schema):
        read_type = _read_type(column.type)
        if read_type != column.type:
            table = table.set_column(index, column.name, table.column(index).cast(read_type))
    return table


def _is_number(data_type: pa.DataType) -> bool:
    """Integers, floats and decimals (a SQL NUMERIC column): class indices, not names."""
    return (
        pa.types.is_integer(data_type)
        or pa.types.is_floating(data_type)
        or pa.types.is_decimal(data_type)
    )


def _folder(url: str) -> str:
    """The folder a table at ``url`` sits in, as a URL (absolute for local paths)."""
    fs, path = fsspec.core.url_to_fs(url)
    if isinstance(fs, LocalFileSystem):
        return posixpath.dirname(resolve_local(path))
    return url.rsplit("/", 1)[0]
