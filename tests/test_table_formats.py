"""`pvu shards` tables as TSV, compressed CSV/TSV and JSON Lines: each is read as a CSV is, and
gets a CSV's checks (columns, relative paths, labels, UTF-8, a table in parts)."""

from __future__ import annotations

import bz2
import gzip
import json
import logging
import tarfile
from pathlib import Path

import fsspec
import pyarrow as pa
import pytest
from PIL import Image
from support import pvu

from pipeline.dataset.sources import list_dataset

#: (path relative to the table's folder, label), as a table of an Open Images style list gives.
ROWS = [("../images/a.png", "cat"), ("./images/b.png", "dog"), ("images/c.png", "cat")]


def pack(data: bytes, suffix: str) -> bytes:
    """``data`` compressed as a file named ``*<suffix>`` is (zstd through pyarrow's writer)."""
    if suffix == ".gz":
        return gzip.compress(data)
    if suffix == ".bz2":
        return bz2.compress(data)
    if suffix == ".zst":
        sink = pa.BufferOutputStream()
        with pa.CompressedOutputStream(sink, "zstd") as stream:
            stream.write(data)
        return sink.getvalue().to_pybytes()
    return data


def text_table(rows: list[tuple[object, object]], kind: str, columns=("path", "label")) -> bytes:
    """``rows`` written as a CSV, TSV or JSON Lines table."""
    if kind == "jsonl":
        return "".join(
            json.dumps(dict(zip(columns, row, strict=True)), ensure_ascii=False) + "\n"
            for row in rows
        ).encode()
    sep = "\t" if kind == "tsv" else ","
    return "".join(sep.join(map(str, row)) + "\n" for row in [columns, *rows]).encode()


def kind_of(name: str) -> tuple[str, str]:
    """The format and compression suffix of a table named ``name`` (``list.tsv.gz``)."""
    kind, _, packed = name.split(".", 1)[1].partition(".")
    return ("jsonl" if kind == "ndjson" else kind), "." + packed if packed else ""


def write(folder: Path, name: str, rows, **kwargs) -> Path:
    """The table ``name`` (``list.tsv.gz``, ...) of ``rows`` in ``folder``."""
    kind, packed = kind_of(name)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(pack(text_table(rows, kind, **kwargs), packed))
    return folder / name


NAMES = [
    *(f"list.{kind}{packed}" for kind in ("csv", "tsv") for packed in ("", ".gz", ".bz2", ".zst")),
    *("list.jsonl", "list.ndjson", "list.jsonl.gz", "list.ndjson.zst"),
]


@pytest.mark.parametrize("name", NAMES)
def test_tsv_compressed_and_json_lines_tables_list_as_the_csv_does(tmp_path, name):
    """A .tsv, a .csv.gz/.bz2/.zst or a .jsonl/.ndjson was refused as 'neither a folder of
    class subfolders nor a .csv / .parquet table'; each lists the CSV's images and classes,
    its relative paths relative to its own folder."""
    expected = list_dataset(str(write(tmp_path / "csv" / "meta", "list.csv", ROWS)))
    listing = list_dataset(str(write(tmp_path / "t" / "meta", name, ROWS)))
    assert listing.classes == expected.classes == ["cat", "dog"]
    as_csv = [(s.url.replace("/csv/", "/t/"), s.label) for s in expected.sources]
    assert [(s.url, s.label) for s in listing.sources] == as_csv
    assert listing.sources[0].url == str(tmp_path / "t" / "images" / "a.png")
    numbers = [(path, n) for (path, _), n in zip(ROWS, (3, 0, 3), strict=True)]
    indexed = list_dataset(str(write(tmp_path / "n", name, numbers)))  # class indices kept
    assert [s.label for s in indexed.sources] == [3, 0, 3] and len(indexed.classes) == 4
    named = list_dataset(str(write(tmp_path / "n", name, numbers)), label_names=True)
    assert named.classes == ["0", "3"]


def test_a_compressed_tsv_converts_to_shards_through_the_cli(tmp_path):
    (tmp_path / "images").mkdir()
    for name, shade in (("a.png", 10), ("b.png", 200)):
        Image.new("RGB", (24, 24), (shade, 0, 0)).save(tmp_path / "images" / name)
    table = write(tmp_path, "list.tsv.gz", [("images/a.png", "cat"), ("images/b.png", "dog")])
    result = pvu("shards", "--input", str(table), "--output", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "out" / "classes.json").read_text()) == ["cat", "dog"]
    (shard,) = (tmp_path / "out").glob("*.tar")
    with tarfile.open(shard) as tar:
        assert sum(member.name.endswith(".cls") for member in tar) == 2


@pytest.mark.parametrize("name", ["list.tsv", "list.csv.gz", "list.jsonl"])
def test_the_new_formats_get_the_checks_a_csv_gets(tmp_path, name):
    """Column naming, a row without a label, an image given two labels, words among whole
    numbers: each is refused naming the table, as for a CSV."""
    table = write(tmp_path, name, ROWS, columns=("image", "label"))
    with pytest.raises(ValueError, match=rf"table {table} has no column 'path'.*--path-column"):
        list_dataset(str(table))
    table = write(tmp_path, name, [("a.png", "cat"), ("b.png", None if "json" in name else " ")])
    with pytest.raises(ValueError, match=rf"table {table}: row 2 has no label"):
        list_dataset(str(table))
    table = write(tmp_path, name, [("a.png", "cat"), ("./a.png", "dog")])
    with pytest.raises(ValueError, match=r"rows 1 and 2 give .*a.png two labels"):
        list_dataset(str(table))
    table = write(tmp_path, name, [("a.png", "10"), ("b.png", "2"), ("c.png", "cat")])
    with pytest.raises(ValueError, match=r"its labels mix whole numbers"):
        list_dataset(str(table))


@pytest.mark.parametrize("name", ["list.tsv", "list.csv.bz2", "list.jsonl", "list.jsonl.gz"])
def test_text_of_the_new_formats_must_be_utf8(tmp_path, name, caplog):
    """A label not in UTF-8 is refused naming its row (a JSON Lines one was a traceback, in
    to_pylist); UTF-16 text is refused as such; zero-padded labels are names, with a warning."""
    table, (kind, packed) = tmp_path / name, kind_of(name)
    text = text_table([("a.png", "cat"), ("b.png", "chèvre")], kind).replace(
        "chèvre".encode(), "chèvre".encode("cp1252")
    )
    table.write_bytes(pack(text, packed))
    with pytest.raises(ValueError, match=r"column 'label' is not UTF-8 text \(row 2"):
        list_dataset(str(table))
    table.write_bytes(pack(text_table(ROWS, kind).decode().encode("utf-16"), packed))
    with pytest.raises(ValueError, match=rf"table {table} is UTF-16 text.*save it as UTF-8"):
        list_dataset(str(table))
    table.write_bytes(pack(text_table([("a.png", "001"), ("b.png", "010")], kind), packed))
    with caplog.at_level(logging.WARNING):
        assert list_dataset(str(table)).classes == ["001", "010"]
    assert "zero-padded numbers ('001' in row 1)" in caplog.text


def test_unreadable_tables_of_the_new_formats_are_refused_naming_them(tmp_path):
    """A .csv.gz that is no gzip (or cut short), JSON Lines whose labels change type or that
    holds no row, a TSV saved as .csv: each said what, naming the file, not a traceback."""
    table = tmp_path / "list.csv.gz"
    table.write_bytes(text_table(ROWS, "csv"))
    with pytest.raises(ValueError, match=rf"table {table} is not whole gzip-compressed data"):
        list_dataset(str(table))
    table.write_bytes(gzip.compress(text_table(ROWS, "csv") * 50)[:-20])
    with pytest.raises(ValueError, match=rf"table {table} is not whole gzip-compressed data"):
        list_dataset(str(table))
    table = write(tmp_path, "list.jsonl", [("a.png", "cat"), ("b.png", 3)])
    with pytest.raises(ValueError, match=rf"table {table} is not readable JSON Lines.*one type"):
        list_dataset(str(table))
    table.write_text("\n")
    with pytest.raises(ValueError, match=rf"table {table} has no rows"):
        list_dataset(str(table))
    table = tmp_path / "tabs.csv"
    table.write_bytes(text_table(ROWS, "tsv"))
    with pytest.raises(ValueError, match=r"header 'path\\tlabel' was read as one column.*\.tsv"):
        list_dataset(str(table))
    table = tmp_path / "list.json"  # a JSON array, or JSON Lines named so: not read as either
    table.write_text("[]")
    with pytest.raises(ValueError, match=r"nor a table \(\.csv, \.tsv, \.jsonl, \.ndjson, each"):
        list_dataset(str(table))


def test_a_compressed_or_json_lines_table_written_in_parts_is_named_as_such(tmp_path):
    """Spark writes a compressed CSV as a folder of part-*.csv.gz: it was told it held no
    images ('2 .gz' files), not that it is a table to merge."""
    for i in range(2):
        write(tmp_path / "out.csv", f"part-{i}.csv.gz", ROWS)
        write(tmp_path / "out.jsonl", f"part-{i}.jsonl", ROWS)
    with pytest.raises(ValueError, match=r"holds 2 table file\(s\) \(2 \.csv\.gz\), no images"):
        list_dataset(str(tmp_path / "out.csv"))
    with pytest.raises(ValueError, match=r"holds 2 table file\(s\) \(2 \.jsonl\), no images"):
        list_dataset(str(tmp_path / "out.jsonl"))


@pytest.mark.slow
def test_compressed_and_json_lines_tables_on_s3_resolve_relative_paths_there(s3_bucket):
    fs = fsspec.filesystem("s3")
    for name in ("list.csv.zst", "list.tsv.bz2", "list.jsonl.gz"):
        kind, packed = kind_of(name)
        fs.pipe_file(f"{s3_bucket}/meta/{name}", pack(text_table(ROWS, kind), packed))
        listing = list_dataset(f"{s3_bucket}/meta/{name}")
        assert [s.url for s in listing.sources] == [
            f"{s3_bucket}/images/a.png",
            f"{s3_bucket}/meta/images/b.png",
            f"{s3_bucket}/meta/images/c.png",
        ], name
