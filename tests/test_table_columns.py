"""Table columns that hold no plain path or label: nested values (a Hugging Face export's
image struct, a multi-label list) and decimal labels (a SQL NUMERIC column)."""

from __future__ import annotations

import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.dataset.sources import list_dataset


def test_a_struct_column_other_than_image_bytes_is_refused_naming_it_not_read_as_paths(tmp_path):
    """A Hugging Face parquet's ``image`` column, {bytes, path}, was turned into the text of
    each dict and read as a path: every image left out as unreadable, the whole JPEG dumped
    into the summary, and a run that ended 'no image could be read'. Such a column is read
    as images now (test_dataset_shards); a struct of anything else is refused."""
    image = pa.array([{"data": b"\xff\xd8\xff", "name": "x.jpg"}])
    path = tmp_path / "hf.parquet"
    pq.write_table(pa.table({"image": image, "label": [0]}), path)
    with pytest.raises(ValueError, match=r"column 'image' holds struct<data.*not one image path"):
        list_dataset(str(path), path_column="image")


def test_a_list_label_column_is_refused_not_made_class_names(tmp_path):
    """A multi-label list column became classes named '[1, 2]' and '[3]', without a word."""
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"path": ["a.png", "b.png"], "label": [[1, 2], [3]]}), path)
    with pytest.raises(ValueError, match=r"column 'label' holds list<.*not one label"):
        list_dataset(str(path))


def test_decimal_labels_are_class_indices_as_integers_are(tmp_path):
    """Decimal labels 1 and 2 were names, numbered in sorted order: label 1 became class 0
    and 2 class 1, where an integer or text column of the same numbers keeps 1 and 2."""
    path = tmp_path / "t.parquet"
    labels = pa.array([1, 2, 10], pa.decimal128(5, 0))
    pq.write_table(pa.table({"path": ["a.png", "b.png", "c.png"], "label": labels}), path)
    listing = list_dataset(str(path))
    assert [source.label for source in listing.sources] == [1, 2, 10]
    assert listing.classes == [str(i) for i in range(11)]
    named = list_dataset(str(path), label_names=True)
    assert named.classes == ["1", "10", "2"]


def test_a_csv_in_utf16_or_with_a_header_not_in_utf8_is_refused_naming_the_table(tmp_path):
    """Excel's 'Unicode Text' (UTF-16) ended 'shards: 'utf-8' codec can't decode byte 0xff in
    position 0' naming no file, or 'CSV parse error: Expected 2 columns, got 1'; a cp1252
    header ('catégorie') the same UnicodeDecodeError: the header was decoded unguarded."""
    table = tmp_path / "list.csv"
    for text, encoding in (
        ("path\tlabel\na.png\tcat\n", "utf-16"),
        ("path,label\na.png,cat\n", "utf-16"),
        ("path,label\na.png,cat\n", "utf-16-le"),  # no byte-order mark
    ):
        table.write_bytes(text.encode(encoding))
        with pytest.raises(ValueError, match=rf"table {table} is UTF-16 text.*save it as UTF-8"):
            list_dataset(str(table))
    table.write_bytes("path,catégorie\na.png,chat\n".encode("cp1252"))
    with pytest.raises(ValueError, match=rf"table {table}: its header is not UTF-8 text"):
        list_dataset(str(table), label_column="catégorie")


def test_csv_labels_that_pyarrow_reads_as_booleans_keep_their_text(tmp_path):
    """A CSV's 'true'/'false' labels became the classes 'True' and 'False', and in a column of
    '1', '0' and 'true', '1' and 'true' became one class: pyarrow reads such a column as
    booleans. They are names, as written."""
    table = tmp_path / "list.csv"
    table.write_text("path,label\na.png,true\nb.png,false\n")
    assert list_dataset(str(table)).classes == ["false", "true"]
    table.write_text("path,label\na.png,true\nb.png,1\nc.png,0\n")
    listing = list_dataset(str(table))
    assert listing.classes == ["0", "1", "true"]
    assert [source.label for source in listing.sources] == [2, 1, 0]


def test_csv_paths_that_look_like_numbers_are_read_as_written(tmp_path):
    """A path '000123' (an image saved without an extension) was read as the number 123 and
    the image looked for at '123': left out as unreadable."""
    (tmp_path / "000123").write_bytes(b"")
    table = tmp_path / "list.csv"
    table.write_text("path,label\n000123,cat\n")
    (source,) = list_dataset(str(table)).sources
    assert source.url == str(tmp_path / "000123")
    table.write_bytes("path,label\nchèvre.png,cat\n".encode("cp1252"))
    with pytest.raises(ValueError, match=r"column 'path' is not UTF-8 text \(row 1"):
        list_dataset(str(table))


def test_windows_paths_are_warned_of_naming_the_row(tmp_path, caplog):
    """A table written on Windows (``images\\cat\\1.jpg``): every image was left out as not
    found, and nothing said that a backslash is part of a file name here."""
    table = tmp_path / "list.csv"
    table.write_text("path,label\nhttp://host/a\\b.jpg,dog\nimages\\cat\\1.jpg,cat\n")
    with caplog.at_level(logging.WARNING, logger="pipeline.dataset"):
        list_dataset(str(table))
    [warning] = [r.getMessage() for r in caplog.records if "backslash" in r.getMessage()]
    assert "row 2's path 'images\\\\cat\\\\1.jpg'" in warning and "with '/'" in warning
