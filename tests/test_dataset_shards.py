"""`pvu shards`: image folders and tables -> WebDataset shards that `pvu cache` reads."""

from __future__ import annotations

import collections
import gc
import io
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.local import LocalFileSystem
from PIL import Image
from support import pvu
from torchvision.datasets.folder import find_classes, make_dataset

from pipeline.cache.distribute import start_local_ray
from pipeline.cache.samples import iter_samples
from pipeline.cache.shards import expand_shards
from pipeline.dataset.convert import key_name, write_dataset
from pipeline.dataset.sources import IMAGE_SUFFIXES, list_dataset
from pipeline.demo.data import encode_image, write_digit_shards
from pipeline.evaluate.analyses import real_ambiguous
from pipeline.named import NAMED

CLASSES = ("cat", "dog", "eel")
FORMATS = ("jpg", "png", "bmp", "webp")


def image_bytes(rng: np.random.Generator, fmt: str, size: int = 40) -> bytes:
    pixels = rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8)
    return encode_image(Image.fromarray(pixels), fmt)


def make_folder(root: Path, *, per_class: int = 6, seed: int = 0) -> dict[str, str]:
    """root/<class>/<n>.<fmt> real images, one corrupt and one truncated file; returns the
    valid images' relative paths -> class."""
    rng = np.random.default_rng(seed)
    valid = {}
    for name in CLASSES:
        for i in range(per_class):
            fmt = FORMATS[i % len(FORMATS)]
            path = root / name / f"img.{i}.{fmt}"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(image_bytes(rng, fmt))
            valid[f"{name}/{path.name}"] = name
    (root / "dog" / "corrupt.jpg").write_bytes(rng.bytes(300))
    jpeg = image_bytes(rng, "jpg", size=64)
    (root / "eel" / "nested").mkdir()
    (root / "eel" / "nested" / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "eel" / "notes.txt").write_text("not an image")
    return valid


def read_shards(output: str) -> list[tuple[str, str, int, dict]]:
    """(shard url, key, label, json) of every sample of the shards under ``output``."""
    found = []
    for url in expand_shards(output):
        counts: collections.Counter = collections.Counter()
        with fsspec.open(url, "rb") as handle:
            import tarfile

            with tarfile.open(fileobj=handle, mode="r|") as tar:
                extra = {
                    m.name.split(".")[0]: json.loads(tar.extractfile(m).read())
                    for m in tar
                    if m.name.endswith(".json")
                }
        for sample in iter_samples(url, counts=counts):
            found.append((url, sample.key, sample.label, extra[sample.key]))
        assert not counts, counts
    return found


pytestmark = pytest.mark.usefixtures("wide_console")


def run(*args: str):
    return pvu("shards", *args)


def test_folder_to_shards_keeps_every_readable_image_once_and_names_the_rest(tmp_path):
    valid = make_folder(tmp_path / "images")
    out = tmp_path / "shards"
    result = run("--input", str(tmp_path / "images"), "--output", str(out), "--shard-size", "20KB")
    assert result.exit_code == 0, result.output
    classes = json.loads((out / "classes.json").read_text())
    assert classes == list(CLASSES)
    samples = read_shards(str(out))
    assert len({url for url, *_ in samples}) > 2  # rolled over by size
    sources = {
        Path(meta["source"]).relative_to(tmp_path / "images").as_posix(): (label, meta)
        for _, _, label, meta in samples
    }
    assert len(sources) == len(samples) == len(valid)
    for path, (label, meta) in sources.items():
        assert classes[label] == meta["class"] == valid[path]
    assert all(path.stat().st_size <= 20_000 for path in out.glob("*.tar"))
    assert "corrupt.jpg" in result.text and "truncated.jpg" in result.text
    assert "undecodable=1" in result.text and "truncated_image=1" in result.text


def test_keys_end_with_the_file_name_so_imagenet_val_images_find_their_real_labels(tmp_path):
    """Keys were '<listing>-<n>' alone: ImageNet validation shards made with pvu shards lost
    the ILSVRC2012_val_<n> names that pvu evaluate's ReaL analysis reads."""
    rng = np.random.default_rng(0)
    for number, synset in ((1, "n01751748"), (2, "n09193705"), (3, "n02105855")):
        path = tmp_path / "val" / synset / f"ILSVRC2012_val_{number:08d}.JPEG"
        path.parent.mkdir(parents=True)
        path.write_bytes(image_bytes(rng, "jpg"))
    result = run("--input", str(tmp_path / "val"), "--output", str(tmp_path / "shards"))
    assert result.exit_code == 0, result.output
    keys = [key for _, key, _, _ in read_shards(str(tmp_path / "shards"))]
    assert sorted(key.split("-", 2)[2] for key in keys) == [
        f"ILSVRC2012_val_0000000{n}" for n in (1, 2, 3)
    ]
    assert real_ambiguous(keys) is not None
    # one file's name, however it is addressed: S3 keeps '#' and '?', a web URL escapes them
    spellings = ("/d/ünï#cöde?.png", "s3://b/ünï#cöde?.png",
                 "https://h/%C3%BCn%C3%AF%23c%C3%B6de%3F.png?X-Amz-Signature=0")  # fmt: skip
    assert {key_name(url) for url in spellings} == {"-n_c_de"}


def test_the_log_names_the_first_ten_images_left_out_of_each_kind_and_counts_the_rest(
    tmp_path, caplog
):
    """Each image left out was a warning line of its own: 130,000 lines at 1% of 13M images."""
    root = tmp_path / "images"
    make_folder(root, per_class=1)  # one undecodable, one truncated image
    rng = np.random.default_rng(1)
    for i in range(NAMED + 4):
        (root / "cat" / f"bad-{i}.jpg").write_bytes(rng.bytes(300))
    caplog.set_level(logging.DEBUG, logger="pipeline.dataset.convert")
    report = write_dataset(list_dataset(str(root)), str(tmp_path / "out"), max_bytes=10**9)
    assert len(report.unreadable) == NAMED + 6  # the summary counts every one
    each = [r for r in caplog.records if r.msg == "left out %s: %s (%s)"]
    named = collections.Counter(r.args[1] for r in each if r.levelno == logging.WARNING)
    assert named == {"undecodable": NAMED, "truncated_image": 1}, named
    assert sum(r.levelno == logging.DEBUG for r in each) == 5  # --verbose names each
    assert "left out 5 more image(s) than named above (undecodable=5)" in caplog.text


def test_shuffle_mixes_classes_and_is_seeded(tmp_path):
    make_folder(tmp_path / "images")
    outs = {}
    for name, flags in {"a": [], "b": [], "c": ["--seed", "1"], "d": ["--no-shuffle"]}.items():
        outs[name] = tmp_path / name
        result = run(
            "--input",
            str(tmp_path / "images"),
            "--output",
            str(outs[name]),
            "--samples-per-shard",
            "6",
            *flags,
        )
        assert result.exit_code == 0, result.output
    labels = {
        name: [label for _, _, label, _ in read_shards(str(out))] for name, out in outs.items()
    }
    assert labels["d"] == sorted(labels["d"])  # class by class
    assert len(set(labels["a"][:6])) > 1  # the first shard mixes classes
    assert labels["a"] == labels["b"] != labels["c"]
    tars = sorted(p.name for p in outs["a"].glob("*.tar"))
    assert all((outs["a"] / t).read_bytes() == (outs["b"] / t).read_bytes() for t in tars)
    keys = {name: {key for _, key, _, _ in read_shards(str(out))} for name, out in outs.items()}
    assert keys["a"] == keys["c"] == keys["d"], "a key names its image whatever the shuffle"


def test_shards_made_from_other_inputs_never_share_a_key(tmp_path):
    """Keys of two sets made apart (each numbered from 0 before) collided: cached together,
    the second set was dropped as duplicate_key."""
    keys = []
    for seed in (0, 1):
        make_folder(tmp_path / f"images{seed}", per_class=1, seed=seed)
        out = str(tmp_path / f"out{seed}")
        assert run("--input", str(tmp_path / f"images{seed}"), "--output", out).exit_code == 0
        keys.append({key for _, key, _, _ in read_shards(out)})
    assert len(keys[0]) == len(keys[1]) == 3 and not keys[0] & keys[1]
    moved = tmp_path / "elsewhere" / "images0"  # the same folder, moved: the same keys
    shutil.copytree(tmp_path / "images0", moved)
    assert run("--input", str(moved), "--output", str(tmp_path / "out-moved")).exit_code == 0
    assert {key for _, key, _, _ in read_shards(str(tmp_path / "out-moved"))} == keys[0]
    # laid out alike (one parent name, one file name per class), other images: other keys
    make_folder(tmp_path / "elsewhere" / "images1", per_class=1, seed=2)
    out = str(tmp_path / "out-alike")
    assert run("--input", str(tmp_path / "elsewhere" / "images1"), "--output", out).exit_code == 0
    alike = {key for _, key, _, _ in read_shards(out)}
    assert len(alike) == 3 and not alike & keys[1]


def test_table_with_class_names_and_relative_paths(tmp_path):
    valid = make_folder(tmp_path / "images", per_class=2)
    lines = ["path,label"] + [f"images/{path},{name}" for path, name in valid.items()]
    (tmp_path / "list.csv").write_text("\n".join(lines) + "\nimages/missing.jpg,cat\n")
    result = run("--input", str(tmp_path / "list.csv"), "--output", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    samples = read_shards(str(tmp_path / "out"))
    assert len(samples) == len(valid)
    assert "missing.jpg" in result.text and "read_error=1" in result.text
    # './' and '../' name the same image as the plain path: two labels for it are refused
    first = next(iter(valid))
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta" / "list.csv").write_text(
        f"path,label\n../images/{first},cat\n.././images/{first},dog\n"
    )
    result = run("--input", str(tmp_path / "meta" / "list.csv"), "--output", str(tmp_path / "o2"))
    assert result.exit_code == 2 and "rows 1 and 2 give" in result.text, result.output
    # a table with no row: it said "no image could be read", or failed in max()
    (tmp_path / "header.csv").write_text("path,label\n")
    pq.write_table(pa.table({"path": pa.array([], pa.string()), "label": pa.array([], pa.int64())}),
                   tmp_path / "header.parquet")  # fmt: skip
    for table in ("header.csv", "header.parquet"):
        result = run("--input", str(tmp_path / table), "--output", str(tmp_path / "o3"))
        assert result.exit_code == 2 and "has no rows, only its header" in result.text, table


def test_a_table_reached_through_a_link_resolves_dot_dot_as_the_os_does(tmp_path):
    """``../images/x.jpg`` in a table whose folder is a link names the image beside the link's
    target, as the OS opens it: it was resolved as text, beside the link, and every image was
    a read error (or another dataset's)."""
    real = tmp_path / "disk" / "dataset"
    valid = make_folder(real / "images", per_class=1)
    (real / "meta").mkdir()
    (tmp_path / "meta").symlink_to(real / "meta", target_is_directory=True)
    rows = [(f"../images/{path}", name) for path, name in valid.items()]
    rows[0] = (f"{tmp_path}/meta/../images/{next(iter(valid))}", rows[0][1])  # absolute too
    columns = {"path": [path for path, _ in rows], "label": [name for _, name in rows]}
    lines = "".join(f"{path},{name}\n" for path, name in rows)
    (real / "meta" / "list.csv").write_text(f"path,label\n{lines}")
    pq.write_table(pa.table(columns), real / "meta" / "list.parquet")
    expected = sorted(str(real / "images" / path) for path in valid)
    for table in ("list.csv", "list.parquet"):
        listing = list_dataset(str(tmp_path / "meta" / table))
        assert sorted(source.url for source in listing.sources) == expected, table


def test_class_folders_are_numbered_as_image_folder_numbers_them_links_and_empty_ones_too(
    tmp_path,
):
    """A class folder that is a link, or holds no image, keeps its place: before, both were
    left out and every later class's label shifted (a train and a val split then disagreed)."""
    root = tmp_path / "images"
    make_folder(root, per_class=1)
    elsewhere = tmp_path / "elsewhere" / "fox"
    elsewhere.mkdir(parents=True)
    (elsewhere / "a.png").write_bytes(image_bytes(np.random.default_rng(0), "png"))
    (root / "fox").symlink_to(elsewhere, target_is_directory=True)
    (root / "bee").mkdir()
    more = tmp_path / "more"  # a link below a class folder was a file without suffix, ignored
    more.mkdir()
    (more / "b.png").write_bytes(image_bytes(np.random.default_rng(1), "png"))
    (elsewhere / "more").symlink_to(more, target_is_directory=True)
    (elsewhere / "up").symlink_to(root, target_is_directory=True)  # entered once: no loop
    (elsewhere / "again").symlink_to(more, target_is_directory=True)  # listed once
    (root / "cat" / "latest").symlink_to(root / "cat", target_is_directory=True)  # as above
    listing = list_dataset(str(root))
    classes, class_to_idx = find_classes(str(root))
    assert listing.classes == classes == ["bee", "cat", "dog", "eel", "fox"]
    assert listing.empty == ["bee"]
    fox = [source for source in listing.sources if "/fox/" in source.url]
    assert [Path(s.url).name for s in fox] == ["a.png", "b.png"]  # b.png by one link of two
    assert {s.label for s in fox} == {class_to_idx["fox"]}
    cat = [source for source in listing.sources if source.label == class_to_idx["cat"]]
    assert len(cat) == 1, cat  # not again through cat/latest
    result = run("--input", str(root), "--output", str(tmp_path / "out"))
    assert result.exit_code == 0 and "hold no image" in result.text, result.output


def test_a_class_folder_linked_to_another_lists_its_images_as_image_folder_does(tmp_path):
    """A class folder that is a link to another (``kitty -> cat``) was an empty class: each
    real folder was listed once across the whole walk, so the second class got none."""
    root = tmp_path / "images"
    make_folder(root, per_class=2)
    (root / "kitty").symlink_to(root / "cat", target_is_directory=True)
    (root / "pup").symlink_to("dog", target_is_directory=True)  # relative, as `ln -s` makes
    (root / "eel" / "twice").symlink_to(root / "eel" / "nested")  # in its class once
    (root / "dog" / "up").symlink_to(root, target_is_directory=True)  # a loop: not entered
    listing = list_dataset(str(root))
    assert listing.empty == []
    listed = sorted((Path(s.url).relative_to(root).as_posix(), s.label) for s in listing.sources)
    (root / "eel" / "twice").unlink()  # ImageFolder walks both, and loops on dog/up
    (root / "dog" / "up").unlink()
    classes, class_to_idx = find_classes(str(root))
    expected = make_dataset(str(root), class_to_idx, extensions=IMAGE_SUFFIXES)
    assert listing.classes == classes
    assert listed == sorted((Path(p).relative_to(root).as_posix(), i) for p, i in expected)


def test_class_names_are_their_text_in_a_c_locale(tmp_path):
    """Under ``LC_ALL=C`` (a cron job, a bare container) Python lists ``café`` as
    ``caf\\udcc3\\udca9``, and classes.json, each sample's json and the log named its classes
    so; a name that is not UTF-8 is named by its bytes, as ``\\xe8``. A table's paths name
    the files their UTF-8 text spells."""
    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    for name in ("café".encode(), "猫".encode(), b"ch\xe8vre", "vidé".encode()):
        folder = os.path.join(bytes(root), name)
        os.makedirs(folder)
        if name != "vidé".encode():
            Path(os.fsdecode(folder), "a.png").write_bytes(image_bytes(rng, "png"))
    shards = tmp_path / "out"
    pvu_shards = [sys.executable, "-c", "from jobs.cli import main; main()", "shards"]
    cwd, c_locale = Path(__file__).parents[1], {**os.environ, "PYTHONUTF8": "0", "LC_ALL": "C"}
    folder = [*pvu_shards, "--input", str(root), "--output", str(shards)]
    done = subprocess.run(folder, capture_output=True, text=True, cwd=cwd, env=c_locale)
    assert done.returncode == 0, done.stderr
    classes = ["café", "ch\\xe8vre", "vidé", "猫"]
    assert json.loads((shards / "classes.json").read_text()) == classes
    names = {
        (meta["class"], Path(meta["source"]).parent.name) for *_, meta in read_shards(str(shards))
    }
    assert names == {(name, name) for name in classes if name != "vidé"}
    assert "\\udc" not in done.stderr and "vid\\xe9" in done.stderr, done.stderr
    # a table's UTF-8 paths name those files: they could not be opened (UnicodeEncodeError)
    (tmp_path / "list.csv").write_text("path,label\nimages/猫/a.png,猫\n", encoding="utf-8")
    table = [*pvu_shards, "--input", str(tmp_path / "list.csv"), "--output", str(tmp_path / "t")]
    done = subprocess.run(table, capture_output=True, text=True, cwd=cwd, env=c_locale)
    assert done.returncode == 0, done.stderr
    assert [meta["source"] for *_, meta in read_shards(str(tmp_path / "t"))] == [
        str(root / "猫" / "a.png")
    ]


def test_a_fifo_among_the_images_is_left_out_not_read_forever(tmp_path):
    """A FIFO (or socket, device) named like an image was listed as one, and its read never
    returned: `pvu shards` sat at 0/N images until killed."""
    root = tmp_path / "images"
    make_folder(root, per_class=1)
    os.mkfifo(root / "cat" / "9.png")
    os.mkfifo(tmp_path / "pipe")
    (root / "cat" / "8.png").symlink_to(tmp_path / "pipe")  # a link to one: the same
    result = run("--input", str(root), "--output", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    assert "left out 2 entr(ies)" in result.text and "8.png" in result.text, result.output
    assert not {"8.png", "9.png"} & {Path(s.url).name for s in list_dataset(str(root)).sources}


@pytest.mark.timeout(60)
def test_a_fifo_a_table_lists_is_left_out_not_read_forever(tmp_path):
    """A table's path to a FIFO (a folder's FIFOs are never listed) was read, and the read
    waited for a writer forever: `pvu shards` hung (reading it for the listing's digest too)."""
    (tmp_path / "a.png").write_bytes(image_bytes(np.random.default_rng(0), "png"))
    os.mkfifo(tmp_path / "b.png")
    (tmp_path / "t.csv").write_text("path,label\na.png,cat\nb.png,dog\n")
    result = run("--input", str(tmp_path / "t.csv"), "--output", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    assert "b.png: read_error" in result.text and "not a regular file" in result.text
    assert [meta["source"] for *_, meta in read_shards(str(tmp_path / "out"))] == [
        str(tmp_path / "a.png")
    ]


def test_a_dead_url_the_listing_digest_samples_is_read_once(tmp_path):
    """The listing's digest reads a few images (first, middle, last); a dead URL among them was
    read there through every retry and its backoff (~6 s), then again when converted: twice
    the delay and two errors for one image."""
    with socket.socket() as probe:  # a port of 127.0.0.1 that was free a moment ago
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}/x.jpg"
    (tmp_path / "t.csv").write_text(f"path,label\n{dead},cat\n")
    result = run("--input", str(tmp_path / "t.csv"), "--output", str(tmp_path / "out"))
    assert f"left out {dead}: read_error" in result.text, result.output
    assert result.text.count(f"read {dead}: ") == 4, result.output  # retried once: 4 waits


def test_links_to_image_files_are_images(tmp_path):
    """A class folder of symbolic links to image files (a split made with `ln -s`, a DVC or
    Hugging Face cache) was listed as "no regular file (a FIFO, socket or device)": every
    linked image was left out, all of them "no images in class subfolders"."""
    elsewhere = tmp_path / "blobs"
    valid = make_folder(elsewhere, per_class=2)
    root = tmp_path / "images"
    for image in valid:
        (root / image).parent.mkdir(parents=True, exist_ok=True)
        (root / image).symlink_to(elsewhere / image)
    gone = f"{Path(next(iter(valid))).parent}/gone.png"
    (root / gone).symlink_to(elsewhere / "gone.png")  # dangling: named as unreadable
    listing = list_dataset(str(root))
    assert sorted(Path(s.url).relative_to(root).as_posix() for s in listing.sources) == sorted(
        [*valid, gone]
    )
    result = run("--input", str(root), "--output", str(tmp_path / "out"))
    assert result.exit_code == 0 and "FIFO" not in result.text, result.output
    assert "gone.png" in result.text


def test_table_labels_must_be_class_indices_or_names(tmp_path):
    """Whole-number floats (pandas' float column) are indices, not names sorted as text
    (which gave 10.0 the label 2); a fraction, a huge id or an empty name names its row; an
    unlabelled image's -1 (a test split's) is refused as such, not with the advice of
    --label-names, which would make -1 a class."""
    table = tmp_path / "list.csv"
    table.write_text("path,label\na.png,0.0\nb.png,1.0\nc.png,2.0\nd.png,10.0\n")
    listing = list_dataset(str(table))
    assert [source.label for source in listing.sources] == [0, 1, 2, 10]
    assert listing.classes == [str(i) for i in range(11)]
    for first, bad, message in (
        ("1", "0.5", "label 0.5 in row 2"),
        ("1", "4000000000", "label 4000000000 in row 2"),
        ("cat", "", "row 2 has no label: an image without a label"),
        ("1", "1\n,2", "row 3 has no path: give each row its image's path or URL"),
    ):
        table.write_text(f"path,label\na.png,{first}\nb.png,{bad}\n")
        with pytest.raises(ValueError, match=message):
            list_dataset(str(table))
    table.write_text("path,label\na.png,1\nb.png,-1\n")
    unlabelled = "label -1 in row 2 is no class index: an image without a label"
    with pytest.raises(ValueError, match=unlabelled) as refused:
        list_dataset(str(table))
    assert "--label-names" not in str(refused.value)  # it would make -1 a class
    result = run("--input", str(table), "--output", str(tmp_path / "out"))
    assert result.exit_code == 2 and "row 2" in result.text, result.output


def test_zero_padded_csv_labels_are_names_not_class_indices(tmp_path, caplog):
    """A CSV's '001', '002', '010' were read as the indices 1, 2 and 10: phantom classes 0 and
    3-9, and the IDs lost from classes.json; read as names, with a warning saying so (they
    could be indices). A Parquet table's integer labels stay indices."""
    table = tmp_path / "list.csv"
    table.write_text("path,label\na.png,10\nb.png,001\nc.png,002\nd.png,001\n")
    listing = list_dataset(str(table))
    assert listing.classes == ["001", "002", "10"]
    assert [source.label for source in listing.sources] == [2, 0, 1, 0]
    assert "zero-padded numbers ('001' in row 2), read as names" in caplog.text
    pq.write_table(pa.table({"path": ["a.png", "b.png"], "label": [2, 0]}), tmp_path / "t.parquet")
    assert list_dataset(str(tmp_path / "t.parquet")).classes == ["0", "1", "2"]


def test_parquet_text_labels_that_are_whole_numbers_are_class_indices(tmp_path, caplog):
    """A Parquet string column of class indices ('0', '2', '10') was numbered in sorted order
    without a word ('10' became class 1, '2' class 2): every loss against a classifier of
    those indices was against another class. They are indices, as a CSV's are."""
    path = tmp_path / "t.parquet"
    table = {"path": ["a.png", "b.png", "c.png", "d.png"], "label": ["0", "2", " 10", "2.0"]}
    pq.write_table(pa.table(table), path)
    listing = list_dataset(str(path))
    assert [source.label for source in listing.sources] == [0, 2, 10, 2]
    assert listing.classes == [str(i) for i in range(11)]
    named = list_dataset(str(path), label_names=True)
    assert named.classes == ["0", "10", "2", "2.0"]
    labels = ["0", "2", "10", "001"]  # zero-padded IDs: names, said as a CSV's are
    pq.write_table(pa.table({"path": ["a.png", "b.png", "c.png", "d.png"], "label": labels}), path)
    assert list_dataset(str(path)).classes == ["0", "001", "10", "2"]
    assert "zero-padded numbers ('001' in row 4), read as names" in caplog.text


def test_whole_number_labels_but_for_a_word_are_refused(tmp_path):
    """One stray word in a column of class indices made every label a name, numbered in sorted
    order ('10' before '2'): every class index moved, without a word."""
    table = tmp_path / "typo.csv"
    rows = "".join(f"{n}.png,{n}\n" for n in range(12))
    table.write_text(f"path,label\n{rows}12.png,x\n")
    with pytest.raises(ValueError, match=r"with words \(1 row\(s\), the first row 13: 'x'\)"):
        list_dataset(str(table))
    result = run("--input", str(table), "--output", str(tmp_path / "out"))
    assert result.exit_code == 2 and "pass --label-names" in result.text, result.output
    assert list_dataset(str(table), label_names=True).classes[:3] == ["0", "1", "10"]
    # the same as pandas writes it, whole numbers as floats
    table.write_text(table.read_text().replace(",1\n", ",1.0\n"))
    with pytest.raises(ValueError, match=r"mix whole numbers \(0, 1.0, 10"):
        list_dataset(str(table))
    # single digits and letters (EMNIST's classes) sort as their indices would: names
    table.write_text("path,label\na.png,0\nb.png,9\nc.png,A\nd.png,z\n")
    assert list_dataset(str(table)).classes == ["0", "9", "A", "z"]


def test_numeric_ids_are_names_with_label_names_and_sparse_indices_are_warned_of(tmp_path, caplog):
    """A CSV of taxon IDs: 1001 and 2002 gave 2,003 classes (every sample then outside a
    1,000-class head), and an ID over 1,000,000 was refused with advice a CSV cannot follow."""
    table = tmp_path / "ids.csv"
    table.write_text("path,label\na.png,1001\nb.png,2002\n")
    assert len(list_dataset(str(table)).classes) == 2003
    assert "class indices 0-2002 of which 2 occur" in caplog.text
    table.write_text("path,label\na.png,2435099\nb.png,1001\nc.png,1001\n")
    result = run("--input", str(table), "--output", str(tmp_path / "out"))
    assert result.exit_code == 2 and "pass --label-names" in result.text, result.output
    listing = list_dataset(str(table), label_names=True)
    assert listing.classes == ["1001", "2435099"]
    assert [source.label for source in listing.sources] == [1, 0, 0]
    pq.write_table(pa.table({"path": ["a.png"], "label": [2435099]}), tmp_path / "t.parquet")
    assert list_dataset(str(tmp_path / "t.parquet"), label_names=True).classes == ["2435099"]
    make_folder(tmp_path / "images", per_class=1)  # a folder's classes are names: refused
    with pytest.raises(ValueError, match="--label-names reads a table's labels"):
        list_dataset(str(tmp_path / "images"), label_names=True)


def test_a_table_not_in_utf8_is_refused_naming_its_row_and_bytes_are_read_as_text(tmp_path):
    """A CSV saved in cp1252 (Excel's) was read as bytes: its labels became names like
    "b'ch\\xe9vre'" in classes.json, its paths 'b'e.jpg'' (every image a read error)."""
    table = tmp_path / "list.csv"
    table.write_bytes("path,label\na.png,chat\nb.png,chèvre\n".encode("cp1252"))
    result = run("--input", str(table), "--output", str(tmp_path / "out"))
    assert result.exit_code == 2 and "column 'label' is not UTF-8 text (row 2" in result.text
    names = pa.array(["chèvre".encode(), b"chat"], pa.binary())
    pq.write_table(pa.table({"path": ["a.png", "b.png"], "label": names}), tmp_path / "t.parquet")
    assert list_dataset(str(tmp_path / "t.parquet")).classes == ["chat", "chèvre"]
    categories = {"path": ["a.png", "b.png"], "label": names.dictionary_encode()}  # pandas'
    pq.write_table(pa.table(categories), tmp_path / "t.parquet")
    assert list_dataset(str(tmp_path / "t.parquet")).classes == ["chat", "chèvre"]
    indices = {"path": ["a.png", "b.png"], "label": pa.array([2, 0]).dictionary_encode()}
    pq.write_table(pa.table(indices), tmp_path / "t.parquet")
    assert list_dataset(str(tmp_path / "t.parquet")).classes == ["0", "1", "2"]


def test_table_label_names_are_trimmed_and_an_image_given_two_labels_is_refused(tmp_path, caplog):
    """'cat' and 'cat ' were two classes; an image in two rows with different labels became
    two samples that contradict each other, silently."""
    table = tmp_path / "list.csv"
    table.write_text("path,label\na.png,cat\nb.png,cat \nc.png, dog\nc.png,dog\n")
    listing = list_dataset(str(table))
    assert listing.classes == ["cat", "dog"]
    assert [source.label for source in listing.sources] == [0, 0, 1, 1]
    assert "lists 1 image(s) more than once" in caplog.text
    table.write_text("path,label\na.png,cat\nb.png,dog\na.png,dog\n")
    result = run("--input", str(table), "--output", str(tmp_path / "out"))
    assert result.exit_code == 2 and "Traceback" not in result.text, result.output
    assert "rows 1 and 3 give" in result.text and "'cat' and 'dog'" in result.text


def test_split_folders_read_as_classes_are_warned_about(tmp_path, caplog):
    """data/train/<class>/ and data/val/<class>/ became the two classes 'train' and 'val'."""
    for split in ("train", "val"):
        make_folder(tmp_path / "data" / split, per_class=1)
    listing = list_dataset(str(tmp_path / "data"))
    assert listing.classes == ["train", "val"]
    assert "named like splits (train, val)" in caplog.text
    assert f"--input, e.g. {tmp_path / 'data'}/train" in caplog.text
    caplog.clear()
    list_dataset(str(tmp_path / "data" / "train"))
    assert "named like splits" not in caplog.text
    for split in ("Train", "Test"):  # as many downloads name them
        make_folder(tmp_path / "kaggle" / split, per_class=1)
    list_dataset(str(tmp_path / "kaggle"))
    assert "named like splits (Test, Train)" in caplog.text
    assert f"--input, e.g. {tmp_path / 'kaggle'}/Train" in caplog.text


def test_an_output_inside_the_input_folder_is_refused(tmp_path):
    """--output images/shards: finishing an interrupted run listed 'shards' as a class,
    shifting every label by one; through a link to the folder too."""
    make_folder(tmp_path / "images", per_class=1)
    (tmp_path / "link").symlink_to(tmp_path / "images")
    for output in ("images/shards", "images", "link/shards"):
        result = run("--input", str(tmp_path / "images"), "--output", str(tmp_path / output))
        assert result.exit_code == 2 and "is inside --input" in result.text, output
    result = run("--input", str(tmp_path / "images"), "--output", str(tmp_path / "images-shards"))
    assert result.exit_code == 0, result.output


def test_an_output_that_is_a_cache_or_inside_one_is_refused(tmp_path):
    """--output of a pvu cache's folder (or a folder in it) was taken: shard-000000.tar and
    classes.json were written among the cache's units, and pyarrow's dataset of the cache's
    folder (as the README reads one) then failed on the tar."""
    from pipeline.demo.synthetic import SyntheticCache, write_synthetic_cache

    make_folder(tmp_path / "images", per_class=1)
    cache = tmp_path / "cache"
    write_synthetic_cache(
        str(cache), SyntheticCache(dim=8, samples_per_shard=4, shards=1, epochs=1)
    )
    before = sorted(path.name for path in cache.rglob("*"))
    for output, said in ((cache, "is the cache"), (cache / "shards", "is inside the cache")):
        result = run("--input", str(tmp_path / "images"), "--output", str(output))
        assert result.exit_code == 2, result.output
        assert f"{said} {cache}" in result.text and "no Parquet" in result.text, result.output
    assert sorted(path.name for path in cache.rglob("*")) == before
    result = run("--input", str(tmp_path / "images"), "--output", f"{cache}-shards")
    assert result.exit_code == 0, result.output


def test_file_and_class_names_that_are_not_utf8_are_converted(tmp_path):
    """One file named in latin-1 (café.png) stopped the whole run, unable to encode its name."""
    root = tmp_path / "images"
    make_folder(root, per_class=2)
    goat = os.fsdecode(b"ch\xe8vre")
    (root / goat).mkdir()
    (root / goat / os.fsdecode(b"caf\xe9.png")).write_bytes(
        image_bytes(np.random.default_rng(5), "png")
    )
    result = run("--input", str(root), "--output", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    classes = json.loads((tmp_path / "out" / "classes.json").read_text())
    assert classes == sorted([*CLASSES, "ch\\xe8vre"])  # named by its bytes, in any locale
    [(_, key, _, meta)] = [
        s for s in read_shards(str(tmp_path / "out")) if s[2] == classes.index("ch\\xe8vre")
    ]
    assert key.endswith("-caf_xe9") and meta["source"] == f"{root}/ch\\xe8vre/caf\\xe9.png"


def test_a_class_not_in_utf8_is_numbered_as_image_folder_numbers_it(tmp_path):
    """Classes were numbered by their output text, where ``caf\\xe9`` (``\\`` before ``e``)
    comes before ``cafe``: ImageFolder, and pvu before, number the listed ``caf\\udce9`` after
    it, so the labels of both classes moved; a folder named ``caf\\xe9`` in ASCII merged in."""
    root = tmp_path / "images"
    rng = np.random.default_rng(7)
    for name in (b"cafe", b"caf\xe9", b"caf\\xe9"):
        folder = Path(os.fsdecode(os.path.join(bytes(root), name)))
        folder.mkdir(parents=True)
        (folder / "a.png").write_bytes(image_bytes(rng, "png"))
    listing = list_dataset(str(root))
    order, _ = find_classes(str(root))
    listed = [os.path.basename(os.path.dirname(source.url)) for source in listing.sources]
    assert listed == order and [source.label for source in listing.sources] == [0, 1, 2]
    texts = [os.fsencode(name).decode(errors="backslashreplace") for name in order]
    assert listing.classes == texts  # named by their text, still three


def test_a_folder_of_photos_pvu_cannot_read_names_what_it_holds(tmp_path):
    """A phone's export of HEIC photos (or AVIF) was refused only as 'no images in class
    subfolders', as if the folders were empty; files beside the class folders and hidden ones
    are no part of what it names."""
    root = tmp_path / "images"
    for path in ("cat/1.HEIC", "cat/2.heic", "dog/3.avif", "dog/.DS_Store", "notes.txt"):
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(b"\0\0\0\x18ftypheic")
    result = run("--input", str(root), "--output", str(tmp_path / "out"))
    said = " ".join(result.text.split())
    assert result.exit_code == 2 and "no images in class subfolders" in said, result.output
    assert "class folders' 3 file(s) (2 .heic, 1 .avif) are no image pvu reads" in said, said
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "a.png").write_bytes(image_bytes(np.random.default_rng(0), "png"))
    result = run("--input", str(flat), "--output", str(tmp_path / "out2"))
    assert result.exit_code == 2 and "no image pvu reads" not in result.text, result.output


def test_images_in_no_class_folder_are_refused_naming_the_table_beside_them(tmp_path, caplog):
    """A folder of images beside their labels.csv was told it held 'no images' and a table in
    parts to merge; images beside class folders were left out with an info line alone."""
    make_folder(tmp_path / "classes", per_class=1)
    (tmp_path / "classes" / "stray.jpg").write_bytes(image_bytes(np.random.default_rng(1), "jpg"))
    with caplog.at_level(logging.WARNING):
        listing = list_dataset(str(tmp_path / "classes"))
    assert listing.classes == list(CLASSES) and "stray" not in str(listing.sources)
    assert "left out 1 image(s) directly in" in caplog.text and "stray.jpg" in caplog.text

    flat = tmp_path / "flat"
    flat.mkdir()
    for name in ("a.png", "b.JPG"):
        (flat / name).write_bytes(image_bytes(np.random.default_rng(0), "png"))
    result = run("--input", str(flat), "--output", str(tmp_path / "out"))
    said = " ".join(result.text.split())
    assert result.exit_code == 2 and "holds 2 image(s) directly (e.g. a.png)" in said, said
    assert f"move each class's images into {flat}/<class>/" in said
    (flat / "labels.csv").write_text("path,label\na.png,cat\nb.JPG,dog\n")
    result = run("--input", str(flat), "--output", str(tmp_path / "out"))
    said = " ".join(result.text.split())
    assert result.exit_code == 2 and f"--input {flat}/labels.csv" in said, said
    assert "merge" not in said and not (tmp_path / "out").exists()
    assert (
        run("--input", str(flat / "labels.csv"), "--output", str(tmp_path / "out")).exit_code == 0
    )


def test_a_table_written_in_parts_is_named_as_such_not_as_photos_to_convert(tmp_path):
    """A Parquet table as Spark or pandas' partition_cols write it (a folder of part files,
    ``label=<class>/`` folders) was told its .parquet files were images to convert to .jpg.
    A folder of .parquet files alone is read as one table; one in subfolders is refused."""
    image = tmp_path / "cat.png"
    image.write_bytes(image_bytes(np.random.default_rng(0), "png"))
    table = pa.table({"path": [str(image)], "label": ["cat"]})
    pq.write_to_dataset(table, tmp_path / "flat.parquet")
    pq.write_to_dataset(table, tmp_path / "hive.parquet", partition_cols=["label"])
    result = run("--input", str(tmp_path / "flat.parquet"), "--output", str(tmp_path / "flat"))
    assert result.exit_code == 0 and len(samples_of(tmp_path / "flat")) == 1, result.output
    result = run("--input", str(tmp_path / "hive.parquet"), "--output", str(tmp_path / "out"))
    said = " ".join(result.text.split())
    assert result.exit_code == 2 and "convert them" not in said, said
    assert f"{tmp_path / 'hive.parquet'} holds 1 table file(s) (1 .parquet), no images" in said
    assert "merge these into one .csv or .parquet file" in said, said


def test_jfif_files_are_images_and_ignored_files_are_named_by_suffix(tmp_path):
    """A camera's .jfif (a JPEG) was ignored, and the log said only 'N other files ignored'.
    A zip made on macOS made its __MACOSX folder class 0 (the real classes moved up one); a
    Synology NAS's @eaDir thumbnails became images of their class."""
    root = tmp_path / "images"
    make_folder(root, per_class=1)
    (root / "cat" / "photo.jfif").write_bytes(image_bytes(np.random.default_rng(3), "jpg"))
    Image.new("L", (20, 20), 90).save(root / "cat" / "scan.pgm")  # netpbm's gray
    (root / "__MACOSX" / "cat").mkdir(parents=True)  # a zip made on macOS: no class
    (root / "__MACOSX" / "cat" / "._photo.jfif").write_bytes(b"\x00\x05\x16\x07")
    (root / "dog" / "@eaDir" / "0.jpg").mkdir(parents=True)  # a Synology NAS's thumbnails
    (root / "dog" / "@eaDir" / "0.jpg" / "SYNOPHOTO_THUMB_S.jpg").write_bytes(b"x")
    for name in ("a.avif", "b.avif", "Thumbs"):
        (root / "dog" / name).write_bytes(b"x")
    listing = list_dataset(str(root))
    assert any(source.url.endswith("photo.jfif") for source in listing.sources)
    assert any(source.url.endswith("scan.pgm") for source in listing.sources)
    assert "__MACOSX" not in listing.classes and not listing.empty
    assert not any("@eaDir" in source.url for source in listing.sources)
    assert listing.ignored == {".avif": 2, ".txt": 1, "": 1, ".jfif": 1, ".jpg": 1}
    result = run("--input", str(root), "--output", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    said = " ".join(result.text.split())
    assert "(6 other files ignored: 2 .avif, 1 " in said
    assert "1 .txt" in said and "1 without suffix" in said


def test_errors_name_the_input_and_exit_2(tmp_path):
    result = run("--input", str(tmp_path / "nope"), "--output", str(tmp_path / "out"))
    assert result.exit_code == 2 and "nope" in result.text and "Traceback" not in result.text
    (tmp_path / "list.csv").write_text("file,label\na.jpg,1\n")
    result = run("--input", str(tmp_path / "list.csv"), "--output", str(tmp_path / "out"))
    assert result.exit_code == 2 and "no column 'path'" in result.text
    assert "(it has file, label): name yours with --path-column" in result.text, result.output
    (tmp_path / "list.csv").write_text("path,class\na.jpg,1\n")
    result = run("--input", str(tmp_path / "list.csv"), "--output", str(tmp_path / "out"))
    assert "no column 'label'" in result.text and "--label-column" in result.text, result.output
    result = run("--input", str(tmp_path / "list.csv"), "--output", "o", "--shard-size", "10")
    assert result.exit_code == 2 and "over 16KiB (16,384 bytes), got 10 bytes" in result.text
    make_folder(tmp_path / "images", per_class=1)
    assert run("--input", str(tmp_path / "images"), "--output", str(tmp_path / "o")).exit_code == 0
    result = run("--input", str(tmp_path / "images"), "--output", str(tmp_path / "o"))
    assert result.exit_code == 2 and "already holds" in result.text


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")  # a tar left open
@pytest.mark.parametrize("failing", ["shard-000000", "shard-000001"])
def test_a_full_disk_names_the_shard_and_leaves_no_partial_one(failing, tmp_path):
    make_folder(tmp_path / "images", per_class=2)
    output = tmp_path / "out"
    output.mkdir()
    (output / f".{failing}.tar.partial").symlink_to("/dev/full")  # writes fail: ENOSPC
    result = run("--input", str(tmp_path / "images"), "--output", str(output),
                 "--samples-per-shard", "4", "--no-shuffle")  # fmt: skip
    gc.collect()  # a tar stream left open would try to write as it goes
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert f"write {output}/{failing}.tar failed" in result.text, result.output
    assert "No space left on device" in result.text
    left = sorted(path.name for path in output.iterdir())
    complete = ["shard-000000.tar"][: int(failing[-1])]
    assert left == ["_unfinished", *complete], "complete shards only, marked unfinished"


def test_an_interrupted_conversion_is_refused_by_readers_and_finished_by_a_rerun(tmp_path):
    make_folder(tmp_path / "images", per_class=4)
    args = ["--input", str(tmp_path / "images"), "--samples-per-shard", "3"]
    assert run(*args, "--output", str(tmp_path / "whole")).exit_code == 0
    listing = list_dataset(str(tmp_path / "images"))
    seen = []

    def interrupt_at_the_seventh(ok: bool) -> None:
        seen.append(ok)
        if len(seen) == 7:
            raise KeyboardInterrupt

    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        write_dataset(
            listing, str(out), max_bytes=2**30, max_samples=3, on_image=interrupt_at_the_seventh
        )
    assert list(out.glob("*.tar")) and not (out / "classes.json").exists()
    (tmp_path / "list.txt").write_text(f"{out}/shard-000000.tar\n")
    # every spec kind: a folder, a brace pattern, a list file, one tar (the last three were taken)
    for spec in (out, f"{out}/shard-{{000000..000000}}.tar", tmp_path / "list.txt",
                 out / "shard-000000.tar"):  # fmt: skip
        with pytest.raises(ValueError, match=f"shards in {out} are from a `pvu shards` run that"):
            expand_shards(str(spec))
    result = pvu("plan", "--shards", f"{out}/shard-*.tar", "--backbone", "resnet10t",
                 "--weights", "random", "--output", str(tmp_path / "cache"))  # fmt: skip
    assert result.exit_code == 2 and "did not finish" in result.text, result.output

    result = run(*args, "--output", str(out))  # the same command, again
    assert result.exit_code == 0, result.output
    names = sorted(path.name for path in out.iterdir())
    assert names == sorted(path.name for path in (tmp_path / "whole").iterdir())
    for name in names:
        assert (out / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name


@pytest.mark.slow
def test_s3_images_to_shards_on_s3_from_a_table_and_from_class_folders(s3_bucket, tmp_path):
    rng = np.random.default_rng(3)
    fs = fsspec.filesystem("s3")
    urls, labels = [], []
    for i in range(9):
        url = f"{s3_bucket}/raw/class{i % 3 * 2}/{i}.png"
        fs.pipe_file(url, image_bytes(rng, "png"))
        urls.append(url)
        labels.append(i % 3 * 2)  # integer labels 0, 2, 4 keep their values
    pq.write_table(pa.table({"url": urls, "y": labels}), tmp_path / "list.parquet")
    result = run(
        "--input",
        str(tmp_path / "list.parquet"),
        "--output",
        f"{s3_bucket}/shards",
        "--path-column",
        "url",
        "--label-column",
        "y",
        "--samples-per-shard",
        "4",
    )
    assert result.exit_code == 0, result.output
    samples = read_shards(f"{s3_bucket}/shards")
    assert len({url for url, *_ in samples}) == 3
    assert sorted((meta["source"], label) for *_, label, meta in samples) == sorted(
        zip(urls, labels, strict=True)
    )
    classes = json.loads(fs.cat_file(f"{s3_bucket}/shards/classes.json"))
    assert classes == ["0", "1", "2", "3", "4"]
    assert not [p for p in fs.ls(f"{s3_bucket}/shards") if ".partial" in p]

    # paths relative to a table on S3, through '..': all were read errors
    lines = [f"../{url.split('/', 3)[3]},{label}" for url, label in zip(urls, labels, strict=True)]
    fs.pipe_file(f"{s3_bucket}/meta/list.csv", ("url,y\n" + "\n".join(lines) + "\n").encode())
    flags = ["--path-column", "url", "--label-column", "y"]
    result = run("--input", f"{s3_bucket}/meta/list.csv", "--output", f"{s3_bucket}/rel", *flags)
    assert result.exit_code == 0 and len(read_shards(f"{s3_bucket}/rel")) == 9, result.output

    result = run("--input", f"{s3_bucket}/raw", "--output", f"{s3_bucket}/by-folder")
    assert result.exit_code == 0, result.output
    samples = read_shards(f"{s3_bucket}/by-folder")
    assert sorted((meta["source"], label) for *_, label, meta in samples) == sorted(
        (url, label // 2) for url, label in zip(urls, labels, strict=True)
    )
    assert json.loads(fs.cat_file(f"{s3_bucket}/by-folder/classes.json")) == [
        "class0",
        "class2",
        "class4",
    ]


def test_a_slow_listing_of_the_input_says_it_is_listing(fault_proxy, s3_bucket, monkeypatch):
    """Listing ImageNet-21k's 13M images on S3 takes many minutes, in which pvu shards wrote
    nothing where stderr is a log; now it writes a line every PLAIN_PROGRESS_SECONDS."""
    from jobs import terminal

    fs = fsspec.filesystem("s3")
    for i in range(2):
        fs.pipe_file(f"{s3_bucket}/raw/c{i}/{i}.png", image_bytes(np.random.default_rng(i), "png"))
    monkeypatch.setattr(terminal, "PLAIN_PROGRESS_SECONDS", 0.05)
    fault_proxy.stall_seconds = 0.5
    fault_proxy.fail_next("stall", 1, pattern=r"list-type=2.*delimiter=&")  # the find
    result = run("--input", f"{s3_bucket}/raw", "--output", f"{s3_bucket}/shards")
    assert result.exit_code == 0 and fault_proxy.counts["stall"] == 1, result.output
    assert f"shards: listing {s3_bucket}/raw; 0:00:00 elapsed" in result.output, result.output


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["folder", "hugging face parquet"])
def test_folder_to_shards_to_cache(tmp_path, kind):
    import pyarrow.dataset as ds
    import ray

    from jobs.run.cache import run_cache
    from jobs.run.cache_config import CacheJobConfig

    if kind == "folder":
        valid = make_folder(tmp_path / "images", per_class=5)
        source = tmp_path / "images"
    else:
        source, valid = write_hf_table(tmp_path, rows=17)
    result = run(
        "--input",
        str(source),
        "--output",
        str(tmp_path / "shards"),
        "--samples-per-shard",
        "4",
    )
    assert result.exit_code == 0, result.output
    start_local_ray(num_cpus=1)
    try:
        config = CacheJobConfig(
            shards=str(tmp_path / "shards"),
            output=str(tmp_path / "cache"),
            backbone="resnet10t",
            weights="random",
            input_size=32,
            batch_size=8,
            epochs=2,
        )
        report = run_cache(config)
    finally:
        ray.shutdown()
    assert not report.failed and len(report.results) == 2 * -(-len(valid) // 4)
    table = ds.dataset(str(tmp_path / "cache"), format="parquet", ignore_prefixes=["_", "."])
    rows = table.to_table(columns=["key", "epoch", "label"]).to_pylist()
    assert len({(row["key"], row["epoch"]) for row in rows}) == len(rows) == 2 * len(valid)
    by_key = {key: label for _, key, label, _ in read_shards(str(tmp_path / "shards"))}
    assert all(by_key[row["key"]] == row["label"] for row in rows)


@pytest.mark.slow
def test_output_in_a_missing_bucket_exits_2_naming_it(s3_server, tmp_path):
    make_folder(tmp_path / "images", per_class=1)
    result = run("--input", str(tmp_path / "images"), "--output", "s3://no-such-bucket/shards")
    assert result.exit_code == 2 and "Traceback" not in result.text, result.output
    assert (
        "--output s3://no-such-bucket/shards: bucket no-such-bucket does not exist" in result.text
    )


def archive_classes(folder: Path, archives: Path) -> None:
    """``archives/<class>.tar`` of each class folder of ``folder``, members named below it."""
    archives.mkdir(parents=True, exist_ok=True)
    import tarfile

    for class_folder in sorted(p for p in folder.iterdir() if p.is_dir()):
        with tarfile.open(archives / f"{class_folder.name}.tar", "w") as tar:
            for path in sorted(class_folder.rglob("*")):
                if path.is_file():
                    tar.add(path, arcname=path.relative_to(class_folder).as_posix())


def samples_of(output: Path) -> list[tuple[str, int, bytes]]:
    """(key, label, image bytes) of every sample of the shards under ``output``, in order."""
    counts: collections.Counter = collections.Counter()
    found = [
        (sample.key, sample.label, sample.image)
        for url in expand_shards(str(output))
        for sample in iter_samples(url, counts=counts)
    ]
    assert not counts, counts
    return found


def test_class_archives_make_the_shards_their_extracted_class_folders_make(tmp_path):
    """ImageNet's per-class tars (n01440764.tar of JPEGs) were refused as 'no images in class
    subfolders': 1.28M (13M for 21k) files had to be extracted first."""
    valid = make_folder(tmp_path / "extracted" / "train")
    (tmp_path / "extracted" / "train" / "cat" / ".img.9.jpg").write_bytes(b"hidden, ignored")
    for i in range(3):  # ImageNet's spelling: .JPEG
        path = tmp_path / "extracted" / "train" / "cat" / f"n0_{i}.JPEG"
        path.write_bytes(image_bytes(np.random.default_rng(i), "jpg"))
    archive_classes(tmp_path / "extracted" / "train", tmp_path / "archives" / "train")
    (tmp_path / "archives" / "train" / "README.txt").write_text("beside the archives")
    outputs = {}
    for kind in ("extracted", "archives"):
        outputs[kind] = tmp_path / f"shards-{kind}"
        result = run(
            *("--input", str(tmp_path / kind / "train"), "--output", str(outputs[kind])),
            *("--shard-size", "20KB"),
        )
        assert result.exit_code == 0, result.output
        assert "undecodable=1" in result.text and "truncated_image=1" in result.text
    from_archives = samples_of(outputs["archives"])
    assert from_archives == samples_of(outputs["extracted"])  # keys, labels, bytes, order
    assert len(from_archives) == len(valid) + 3
    classes = (outputs["archives"] / "classes.json").read_text()
    assert json.loads(classes) == list(CLASSES)
    assert classes == (outputs["extracted"] / "classes.json").read_text()
    sources = {meta["source"] for *_, meta in read_shards(str(outputs["archives"]))}
    archive = tmp_path / "archives" / "train" / "eel.tar"
    assert f"tar://img.2.bmp::{archive}" in sources  # the member, as fsspec opens it
    with fsspec.open(f"tar://img.2.bmp::{archive}", "rb") as member:
        assert member.read() == (tmp_path / "extracted/train/eel/img.2.bmp").read_bytes()
    assert f"tar://nested/truncated.jpg::{archive}" in result.text  # left out, named


def test_links_in_class_archives_are_the_images_they_are_extracted(tmp_path):
    """A class archive's hard and symbolic links to its images were left out, where the
    extracted class folder lists them: the shards differed from the extracted folder's. A link
    out of the archive, or to nothing in it, is still left out, named."""
    cat = tmp_path / "extracted" / "train" / "cat"
    cat.mkdir(parents=True)
    (cat / "a.jpg").write_bytes(image_bytes(np.random.default_rng(0), "jpg"))
    (cat / "sub").mkdir()
    (cat / "sub" / "link.jpg").symlink_to("../a.jpg")
    (cat / "sub" / "link2.jpg").symlink_to("link.jpg")
    os.link(cat / "a.jpg", cat / "hard.jpg")
    archive_classes(tmp_path / "extracted" / "train", tmp_path / "archives" / "train")
    (cat / "gone.jpg").symlink_to("../../../nowhere.jpg")  # archived alone: its target is not
    with tarfile.open(tmp_path / "archives" / "train" / "cat.tar", "a") as tar:
        tar.add(cat / "gone.jpg", arcname="gone.jpg")
    (cat / "gone.jpg").unlink()
    with tarfile.open(tmp_path / "archives" / "train" / "cat.tar") as tar:
        assert {m.name for m in tar if m.issym() or m.islnk()} == {
            "sub/link.jpg",
            "sub/link2.jpg",
            "hard.jpg",
            "gone.jpg",
        }
    outputs = {kind: tmp_path / f"shards-{kind}" for kind in ("extracted", "archives")}
    for kind, output in outputs.items():
        result = run("--input", str(tmp_path / kind / "train"), "--output", str(output))
        assert result.exit_code == 0, result.output
    from_archives = samples_of(outputs["archives"])
    assert from_archives == samples_of(outputs["extracted"])  # keys, labels, bytes, order
    assert len(from_archives) == 4
    said = " ".join(result.text.split())  # the archives' run
    assert "left out 1 member(s) of class archives" in said and "gone.jpg" in said, said


def test_a_class_archive_cut_short_is_refused_naming_it(tmp_path):
    make_folder(tmp_path / "extracted")
    archive_classes(tmp_path / "extracted", tmp_path / "in")
    import tarfile

    with tarfile.open(tmp_path / "in" / "cat.tar") as tar:
        last = tar.getmembers()[-1]
    data = (tmp_path / "in" / "cat.tar").read_bytes()
    (tmp_path / "in" / "cat.tar").write_bytes(data[: last.offset_data + last.size // 2])
    result = run("--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"))
    assert result.exit_code == 2
    assert f"class archive {tmp_path / 'in' / 'cat.tar'} is no readable tar" in result.text
    assert "download it again" in result.text and not (tmp_path / "out").exists()


def test_split_archives_read_as_classes_are_warned_to_be_extracted(tmp_path, caplog):
    """data/train.tar and data/val.tar became the classes 'train' and 'val'; the warning
    said to give data/train, a folder there only once train.tar is extracted."""
    for split in ("train", "val"):
        make_folder(tmp_path / "extracted" / split, per_class=1)
    archive_classes(tmp_path / "extracted", tmp_path / "data")
    assert list_dataset(str(tmp_path / "data")).classes == ["train", "val"]
    data = tmp_path / "data"
    assert "class archives of" in caplog.text and "splits (train.tar, val.tar)" in caplog.text
    said = (
        f"mkdir {data}/train && tar -xf {data}/train.tar -C {data}/train, then --input {data}/train"
    )
    assert said in caplog.text


def test_folders_the_layout_of_class_archives_does_not_fit_are_refused_saying_what_to_do(
    tmp_path,
):
    make_folder(tmp_path / "extracted")
    archive_classes(tmp_path / "extracted", tmp_path / "mixed")
    shutil.copytree(tmp_path / "extracted" / "cat", tmp_path / "mixed" / "cat")
    result = run("--input", str(tmp_path / "mixed"), "--output", str(tmp_path / "out"))
    assert result.exit_code == 2
    assert "both class folders (1, e.g. cat) and class archives (3, e.g. cat.tar)" in result.text

    write_digit_shards(str(tmp_path / "webdataset"), shards=2, per_shard=4)
    result = run("--input", str(tmp_path / "webdataset"), "--output", str(tmp_path / "out"))
    assert result.exit_code == 2
    assert "holds WebDataset shards, not class archives" in result.text, result.text
    assert f"pvu cache --shards {tmp_path / 'webdataset'}" in result.text

    (tmp_path / "gz").mkdir()
    archive_classes(tmp_path / "extracted", tmp_path / "plain")
    import gzip

    for path in (tmp_path / "plain").iterdir():
        (tmp_path / "gz" / f"{path.name}.gz").write_bytes(gzip.compress(path.read_bytes()))
    result = run("--input", str(tmp_path / "gz"), "--output", str(tmp_path / "out"))
    assert result.exit_code == 2
    assert "holds 3 compressed tar(s), e.g. cat.tar.gz" in result.text
    assert f"gunzip {tmp_path / 'gz'}/*.tar.gz" in result.text
    assert not (tmp_path / "out").exists()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    """A tar at ``path`` of ``members`` (name, bytes), in order."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_an_archive_of_the_whole_dataset_is_refused_saying_how_to_extract_it(tmp_path):
    """ImageNet's ILSVRC2012_img_train.tar (an archive of class archives), given as --input or
    in a folder, was refused as no table, or told to convert its .tar members to .jpg."""
    make_folder(tmp_path / "extracted", per_class=1)
    archive_classes(tmp_path / "extracted", tmp_path / "train")
    (tmp_path / "in").mkdir()
    whole = tmp_path / "in" / "ILSVRC2012_img_train.tar"
    write_tar(
        whole, [(path.name, path.read_bytes()) for path in sorted((tmp_path / "train").iterdir())]
    )
    folder = tmp_path / "in" / "ILSVRC2012_img_train"
    extract = f"mkdir {folder} && tar -xf {whole} -C {folder}, then --input {folder}"
    for given in (whole, tmp_path / "in"):
        result = run("--input", str(given), "--output", str(tmp_path / "out"))
        said = " ".join(result.text.split())
        assert result.exit_code == 2 and f"extract it and give its folder, {extract}" in said, said
        assert "convert them" not in said and not (tmp_path / "out").exists()
    assert "hold archives, not images (3 .tar)" in said


def test_webdataset_shards_with_labels_in_json_are_refused_not_read_as_classes(tmp_path):
    """Shards whose labels lie in a .json member (no .cls), as many published WebDatasets'
    do, were read as class archives: each shard became a class, every image's label lost."""
    rng = np.random.default_rng(0)
    (tmp_path / "webdataset").mkdir()
    for shard in range(2):
        samples = [
            (f"{shard}_{i}.{ext}", data)
            for i in range(3)
            for ext, data in (
                ("jpg", image_bytes(rng, "jpg")),
                ("json", json.dumps({"label": i}).encode()),
                ("txt", b"a caption"),
            )
        ]
        write_tar(tmp_path / "webdataset" / f"train-{shard:06d}.tar", samples)
    result = run("--input", str(tmp_path / "webdataset"), "--output", str(tmp_path / "out"))
    assert result.exit_code == 2, result.output
    first = tmp_path / "webdataset" / "train-000000.tar"
    assert f"holds WebDataset shards, not class archives ({first} holds" in result.text
    assert f"pvu cache --shards {tmp_path / 'webdataset'}" in result.text
    assert "--label-key" in result.text and not (tmp_path / "out").exists()

    # sidecars beside each photo (a Takeout's, an editor's, a VOC box) leave a class archive one
    (tmp_path / "photos").mkdir()
    sidecars = ("jpg", "jpg.json", "jpg.xmp", "xml")
    photos = [(f"p{i}.{ext}", image_bytes(rng, "jpg")) for i in range(2) for ext in sidecars]
    write_tar(tmp_path / "photos" / "cat.tar", photos)
    listing = list_dataset(str(tmp_path / "photos"))
    assert listing.classes == ["cat"] and len(listing.sources) == 2


@pytest.mark.slow
def test_class_archives_on_s3_make_the_shards_their_extracted_class_folders_make(
    s3_bucket, tmp_path
):
    make_folder(tmp_path / "extracted" / "train")
    archive_classes(tmp_path / "extracted" / "train", tmp_path / "archives")
    fs = fsspec.filesystem("s3")
    for path in (tmp_path / "archives").iterdir():
        fs.pipe_file(f"{s3_bucket}/in/train/{path.name}", path.read_bytes())
    for url, out in (
        (f"{s3_bucket}/in/train", f"{s3_bucket}/shards"),
        (str(tmp_path / "extracted" / "train"), str(tmp_path / "shards")),
    ):
        result = run("--input", url, "--output", out, "--shard-size", "20KB")
        assert result.exit_code == 0, result.output
    assert samples_of(f"{s3_bucket}/shards") == samples_of(tmp_path / "shards")
    sources = {meta["source"] for *_, meta in read_shards(f"{s3_bucket}/shards")}
    assert f"tar://img.0.jpg::{s3_bucket}/in/train/cat.tar" in sources


HF_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def write_hf_table(folder: Path, *, rows: int = 23) -> tuple[Path, dict[str, tuple[int, bytes]]]:
    """``folder/data/train-00000-of-00001.parquet`` as ``datasets`` writes one: an ``image``
    column of {bytes, path} (PNG and JPEG bytes; row 3's bytes null, its path a file beside the
    table; row 7's JPEG cut short) and integer labels, in row groups of 5. Returns the table
    and the readable images by their path's stem: (label, bytes)."""
    rng = np.random.default_rng(3)
    (folder / "data").mkdir(parents=True)
    images, valid = [], {}
    for row in range(rows):
        data = image_bytes(rng, ("png", "jpg")[row % 2])
        stem = f"img_{row:03d}"
        if row == 3:
            (folder / "data" / f"{stem}.png").write_bytes(data)
            images.append({"bytes": None, "path": f"{stem}.png"})
        elif row == 7:
            images.append({"bytes": data[: len(data) // 2], "path": f"{stem}.jpg"})
            continue
        else:
            images.append({"bytes": data, "path": f"{stem}.{('png', 'jpg')[row % 2]}"})
        valid[stem] = (row % 4, data)
    table = pa.table({"image": pa.array(images, HF_IMAGE), "label": [r % 4 for r in range(rows)]})
    path = folder / "data" / "train-00000-of-00001.parquet"
    pq.write_table(table, path, row_group_size=5)
    return path, valid


def test_a_hugging_face_parquet_of_image_bytes_becomes_shards(tmp_path):
    """A Hugging Face dataset's Parquet (an ``image`` column of {bytes, path}) was refused:
    "column 'image' holds struct<bytes: binary, path: string>, not one image path"."""
    table, valid = write_hf_table(tmp_path)
    out = tmp_path / "shards"
    args = ("--input", str(table), "--samples-per-shard", "4")
    result = run(*args, "--path-column", "image", "--output", str(out))
    assert result.exit_code == 0, result.output
    assert json.loads((out / "classes.json").read_text()) == ["0", "1", "2", "3"]
    samples = samples_of(out)
    assert len(samples) == len(valid) and len(list(out.glob("*.tar"))) == 6
    by_name = {key.rsplit("-", 1)[1]: (label, image) for key, label, image in samples}
    assert by_name == valid  # each image's own bytes and label, named by its path
    assert [key.split("-")[1] for key, *_ in samples] != sorted(
        k.split("-")[1] for k, *_ in samples
    )
    assert "truncated_image=1" in result.text and f"{table}#row=8" in result.text
    # no 'path' column: the 'image' column is read by default, to the same shards
    again = run(*args, "--output", str(tmp_path / "again"))
    assert again.exit_code == 0, again.output
    assert samples_of(tmp_path / "again") == samples


def test_a_parquet_binary_column_of_images_becomes_shards_keyed_by_row(tmp_path):
    """A plain binary column of images was decoded as UTF-8 paths: "column 'jpeg' is not
    UTF-8 text (row 1: b'\\xff\\xd8...')", the whole JPEG in the message."""
    rng = np.random.default_rng(5)
    images = [image_bytes(rng, "jpg") for _ in range(6)]
    column = pa.array([*images[:4], None, *images[4:]], pa.binary())
    table = tmp_path / "t.parquet"
    pq.write_table(pa.table({"jpeg": column, "y": ["cat", "dog"] * 3 + ["cat"]}), table)
    out = tmp_path / "out"
    args = ("--input", str(table), "--output", str(out), "--label-column", "y")
    result = run(*args, "--path-column", "jpeg", "--no-shuffle")
    assert result.exit_code == 0, result.output
    samples = samples_of(out)
    assert [image for _, _, image in samples] == images
    assert [label for _, label, _ in samples] == [0, 1, 0, 1, 1, 0]
    assert [key.split("-", 1)[1] for key, *_ in samples] == [
        f"0000000{i}" for i in (0, 1, 2, 3, 5, 6)
    ]
    assert f"{table}#row=5" in result.text and "holds no image bytes" in result.text
    # a column of other structs is refused naming its type
    pq.write_table(pa.table({"jpeg": [{"x": 1}], "y": ["cat"]}), table)
    result = run(*args, "--path-column", "jpeg")
    assert result.exit_code == 2 and "column 'jpeg' holds struct<x: int64>" in result.text


def test_a_held_images_blank_path_names_no_key_and_reads_no_folder(tmp_path):
    """A struct's path "" was resolved to the table's folder: the key named after the folder,
    and a row of null bytes read the folder (an error naming it, not the row's lack)."""
    rng = np.random.default_rng(15)
    images = [image_bytes(rng, "png") for _ in range(2)]
    column = [
        {"bytes": images[0], "path": "a.png"},
        {"bytes": images[1], "path": ""},
        {"bytes": None, "path": " "},
    ]
    folder = tmp_path / "hubdata"
    folder.mkdir()
    table = folder / "t.parquet"
    pq.write_table(pa.table({"image": pa.array(column, HF_IMAGE), "label": [0, 1, 0]}), table)
    report = write_dataset(
        list_dataset(str(table)), str(tmp_path / "out"), max_bytes=1 << 30, shuffle=False
    )
    samples = samples_of(tmp_path / "out")
    assert [image for *_, image in samples] == images
    assert samples[0][0].endswith("-a") and "hubdata" not in samples[1][0]
    assert [(u.url, u.reason) for u in report.unreadable] == [(f"{table}#row=3", "read_error")]
    assert "holds no image bytes" in report.unreadable[0].detail


class LocalAs(LocalFileSystem):
    """The local disk as ``<protocol>://<path>``, a store of its own to fsspec."""

    @classmethod
    def _strip_protocol(cls, path: str) -> str:
        return super()._strip_protocol(path.removeprefix(f"{cls.protocol}://"))


class RefusingFileSystem(LocalAs):
    """The local disk as ``refusing://<path>``, its first ``refusals`` opens refused as a
    store's connection is."""

    protocol = "refusing"
    refusals = 0

    def _open(self, path: str, mode: str = "rb", **kwargs):
        if RefusingFileSystem.refusals:
            RefusingFileSystem.refusals -= 1
            raise ConnectionError(f"connection refused: {path}")
        return super()._open(path, mode, **kwargs)


def test_whether_a_binary_column_holds_paths_is_read_under_retry(tmp_path):
    """Read bare: a connection dropped once as a binary column was sampled ended the listing."""
    from pipeline.dataset.held import holds_text

    fsspec.register_implementation("refusing", RefusingFileSystem, clobber=True)
    table = tmp_path / "t.parquet"
    pq.write_table(pa.table({"jpeg": pa.array([b"a/1.png"], pa.binary())}), table)
    RefusingFileSystem.refusals = 1
    assert holds_text(f"refusing://{table}", "jpeg")
    assert RefusingFileSystem.refusals == 0


class CountingFileSystem(LocalAs):
    """The local disk as ``counted://<path>``, counting the bytes read through it."""

    protocol = "counted"
    read_bytes = 0

    def _open(self, path: str, mode: str = "rb", **kwargs):
        handle = super()._open(path, mode, **kwargs)
        read = handle.read

        def counted(*args):
            data = read(*args)
            CountingFileSystem.read_bytes += len(data)
            return data

        handle.read = counted
        return handle


def test_a_shuffled_held_table_reads_each_row_group_once_and_mixes_classes(tmp_path):
    """Shuffled, each image cost a read of its row group up to it (16 rows kept a miss): a
    table of row groups of 40 images was read ~10 times over (~100x for the Hub's 100)."""
    fsspec.register_implementation("counted", CountingFileSystem, clobber=True)
    rng = np.random.default_rng(8)
    images = [image_bytes(rng, "png") for _ in range(160)]
    table = tmp_path / "train.parquet"
    rows = [{"bytes": data, "path": f"img_{row:03d}.png"} for row, data in enumerate(images)]
    labels = [row // 40 for row in range(160)]  # sorted by class, a class a row group
    pq.write_table(
        pa.table({"image": pa.array(rows, HF_IMAGE), "label": labels}), table, row_group_size=40
    )
    outs = {}
    for name, shuffle, seed in (("a", True, 0), ("b", True, 0), ("c", True, 1), ("d", False, 0)):
        listing = list_dataset(f"counted://{table}")
        CountingFileSystem.read_bytes = 0
        outs[name] = tmp_path / name
        report = write_dataset(
            listing, str(outs[name]), max_bytes=1 << 30, max_samples=20, shuffle=shuffle, seed=seed
        )
        assert report.samples == 160
        assert CountingFileSystem.read_bytes < 1.2 * sum(map(len, images)), name
    samples = {name: samples_of(out) for name, out in outs.items()}
    assert sorted(samples["a"]) == sorted(samples["c"]) == sorted(samples["d"])  # keys too
    assert [image for *_, image in samples["d"]] == images  # unshuffled: the table's order
    assert samples["a"] == samples["b"] != samples["c"]  # seeded
    assert len({label for _, label, _ in samples["a"][:20]}) > 2  # the first shard mixes classes


def test_a_held_tables_damaged_row_group_is_read_once_and_its_rows_left_out(tmp_path):
    """A row group whose read failed was read again for each of its rows: a damaged group of
    the Hub's 100 rows read in full 100 times from S3, each row then left out alike."""
    fsspec.register_implementation("counted", CountingFileSystem, clobber=True)
    rng = np.random.default_rng(14)
    images = [image_bytes(rng, "png") for _ in range(30)]
    table = tmp_path / "train.parquet"
    rows = [{"bytes": data, "path": f"{row}.png"} for row, data in enumerate(images)]
    labels = [row % 2 for row in range(30)]
    pq.write_table(pa.table({"image": pa.array(rows, HF_IMAGE), "label": labels}), table, 10)
    chunk = next(
        column
        for column in (pq.ParquetFile(table).metadata.row_group(1).column(i) for i in range(3))
        if column.path_in_schema == "image.bytes"
    )
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    data = bytearray(table.read_bytes())  # row group 1's images overwritten: it fails to decode
    data[start : start + chunk.total_compressed_size] = b"\xff" * chunk.total_compressed_size
    table.write_bytes(bytes(data))
    listing = list_dataset(f"counted://{table}")
    CountingFileSystem.read_bytes = 0
    report = write_dataset(listing, str(tmp_path / "out"), max_bytes=1 << 30, shuffle=False)
    assert CountingFileSystem.read_bytes < 1.2 * sum(map(len, images))  # each row group once
    assert report.samples == 20
    assert [image for *_, image in samples_of(tmp_path / "out")] == images[:10] + images[20:]
    assert [u.url.rsplit("#", 1)[1] for u in report.unreadable] == [
        f"row={row}" for row in range(11, 21)
    ]
    assert all(u.reason == "read_error" and "deserialize" in u.detail for u in report.unreadable)


def test_a_held_row_group_whose_dictionary_index_is_damaged_is_left_out_not_a_crash(tmp_path):
    """pyarrow raises most damaged pages as OSError, but a dictionary index past the dictionary
    as ArrowInvalid (a ValueError): that escaped the conversion and ended pvu shards with a
    traceback. Now the group's rows are left out as unreadable, like any damaged group's."""
    rng = np.random.default_rng(15)
    rows = [{"bytes": image_bytes(rng, "png", 16), "path": f"{row}.png"} for row in range(40)]
    table = tmp_path / "train.parquet"
    pq.write_table(
        pa.table({"image": pa.array(rows, HF_IMAGE), "label": [row % 2 for row in range(40)]}),
        table,
        row_group_size=20,
        compression="zstd",
    )
    chunk = pq.ParquetFile(table).metadata.row_group(1).column(0)
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    good = table.read_bytes()
    for place in range(start + chunk.total_compressed_size - 1, start, -1):  # the indices last
        damaged = bytearray(good)
        damaged[place] ^= 0xFF
        table.write_bytes(bytes(damaged))
        try:
            pq.ParquetFile(table).read_row_group(1, columns=["image.bytes"])
        except pa.ArrowInvalid:
            break
        except OSError:
            continue
    else:
        pytest.fail("no byte of the row group's indices makes pyarrow raise ArrowInvalid")
    report = write_dataset(
        list_dataset(str(table)), str(tmp_path / "out"), max_bytes=1 << 30, shuffle=False
    )
    assert report.samples == 20
    assert [u.url.rsplit("#", 1)[1] for u in report.unreadable] == [
        f"row={row}" for row in range(21, 41)
    ]
    assert all("ArrowInvalid" in u.detail for u in report.unreadable)


def test_a_held_tables_shuffle_mixes_the_rows_of_a_window_of_row_groups(tmp_path, monkeypatch):
    """Row groups in random order, the rows of each window (``WINDOW_BYTES``) shuffled together."""
    from pipeline.dataset import held

    rng = np.random.default_rng(9)
    rows = [{"bytes": image_bytes(rng, "png", 16), "path": None} for _ in range(60)]
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"image": pa.array(rows, HF_IMAGE)}), path, row_group_size=10)
    table = held.HeldTable(str(path), "image")
    monkeypatch.setattr(held, "WINDOW_BYTES", 2 * max(table.group_bytes))  # 2 groups a window
    order = held.window_order([(table, row) for row in range(60)], np.random.default_rng(0))
    assert sorted(order.tolist()) == list(range(60))
    windows = [order[i : i + 20] // 10 for i in range(0, 60, 20)]
    assert all(len(set(w.tolist())) == 2 for w in windows)  # each window: two whole groups
    assert all(len(set(w[:5].tolist())) == 2 for w in windows)  # ... mixed together
    assert sorted(g for w in windows for g in set(w.tolist())) == list(range(6))


def write_hf_parts(folder: Path) -> tuple[Path, list[tuple[int, bytes]]]:
    """``folder/data/train-0000<i>-of-00003.parquet`` as the Hub splits a dataset: an ``image``
    column of {bytes, path} whose paths repeat across parts (``0.png``, ...), labels 0-4
    (part 0 holds 0 and 1 alone, part 2 label 4 alone), row groups of 5. Returns the folder and
    each row's (label, bytes) in file order."""
    rng = np.random.default_rng(11)
    (folder / "data").mkdir(parents=True)
    rows = []
    for part, (count, labels) in enumerate(((12, (0, 1)), (10, (2, 3, 1)), (8, (4,)))):
        images = [image_bytes(rng, "png") for _ in range(count)]
        column = [{"bytes": data, "path": f"{row}.png"} for row, data in enumerate(images)]
        label = [labels[row % len(labels)] for row in range(count)]
        rows += zip(label, images, strict=True)
        table = pa.table({"image": pa.array(column, HF_IMAGE), "label": label})
        pq.write_table(table, folder / "data" / f"train-0000{part}-of-00003.parquet", 5)
    (folder / "data" / ".cache").mkdir()  # hidden: not a class folder, no part
    return folder / "data", rows


def test_a_folder_of_hugging_face_parquet_parts_is_read_as_one_table(tmp_path):
    """The Hub publishes a split as many Parquet files (train-00000-of-00040.parquet, ...):
    a folder of them was refused as 'a table written in parts', to merge by hand first."""
    fsspec.register_implementation("counted", CountingFileSystem, clobber=True)
    folder, rows = write_hf_parts(tmp_path)
    total = sum(len(image) for _, image in rows)
    outs = {}
    for name, shuffle in (("shuffled", True), ("ordered", False)):
        listing = list_dataset(f"counted://{folder}")
        assert listing.classes == ["0", "1", "2", "3", "4"]  # numbered across the parts
        CountingFileSystem.read_bytes = 0
        outs[name] = tmp_path / name
        report = write_dataset(
            listing, str(outs[name]), max_bytes=1 << 30, max_samples=10, shuffle=shuffle
        )
        assert report.samples == len(rows) and not report.unreadable
        read = CountingFileSystem.read_bytes  # through counted://: each row group once
        assert 0.8 * total < read < 1.2 * total, (name, read, total)
    ordered, shuffled = samples_of(outs["ordered"]), samples_of(outs["shuffled"])
    assert [(label, image) for _, label, image in ordered] == rows  # file order, row order
    assert sorted(shuffled) == sorted(ordered)  # every image once, its own label and key
    assert len({key for key, *_ in ordered}) == len(rows)  # 0.png in each part: unique keys
    assert [key.rsplit("-", 1)[1] for key, *_ in ordered][10:14] == ["10", "11", "0", "1"]
    index = {image: i for i, (_, image) in enumerate(rows)}
    parts = [(index[image] >= 12) + (index[image] >= 22) for *_, image in shuffled[:10]]
    assert len(set(parts)) > 1, parts  # the first shard mixes the parts' rows
    assert len({label for _, label, _ in shuffled[:10]}) > 2
    meta = {m["source"] for *_, m in read_shards(str(outs["ordered"]))}
    assert any(s.endswith("/data/train-00002-of-00003.parquet#row=8") for s in meta), meta
    # through the command line: one table, classes.json numbered across the parts
    result = run("--input", str(folder), "--output", str(tmp_path / "cli"))
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "cli" / "classes.json").read_text()) == ["0", "1", "2", "3", "4"]
    assert sorted(samples_of(tmp_path / "cli")) == sorted(ordered)  # the same keys


def test_a_folder_of_parquet_parts_of_paths_is_one_table_named_across_its_parts(tmp_path):
    """Parts of a table of paths: paths relative to the parts' folder, class names sorted over
    all parts (part 0's dog is class 1, after part 1's cat)."""
    rng = np.random.default_rng(12)
    folder = tmp_path / "table"
    folder.mkdir()
    (tmp_path / "images").mkdir()  # beside the parts: a subfolder makes a folder of classes
    names = {"a": "dog", "b": "dog", "c": "cat", "d": "bird"}
    for stem in names:
        (tmp_path / "images" / f"{stem}.png").write_bytes(image_bytes(rng, "png"))
    for part, stems in enumerate((("a", "b"), ("c",), ("d",))):
        paths = [f"../images/{stem}.png" for stem in stems]
        table = pa.table({"path": paths, "label": [names[stem] for stem in stems]})
        pq.write_table(table, folder / f"part-{part}.parquet")
    listing = list_dataset(str(folder))
    assert listing.classes == ["bird", "cat", "dog"]
    by_name = {Path(s.url).stem: listing.classes[s.label] for s in listing.sources}
    assert by_name == names and [Path(s.url).stem for s in listing.sources] == list("abcd")
    assert all(Path(s.url).is_file() for s in listing.sources)
    result = run("--input", str(folder), "--output", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    assert len(samples_of(tmp_path / "out")) == 4


def test_parquet_parts_of_different_schemas_are_refused_naming_the_file_and_column(tmp_path):
    folder = tmp_path / "parts"
    folder.mkdir()
    pq.write_table(pa.table({"path": ["a.png"], "label": [0]}), folder / "0.parquet")
    pq.write_table(pa.table({"path": ["b.png"], "label": [1]}), folder / "1.parquet")
    pq.write_table(pa.table({"path": ["c.png"], "label": ["cat"]}), folder / "2.parquet")
    with pytest.raises(ValueError, match=rf"{folder / '2.parquet'}.*column 'label' holds string"):
        list_dataset(str(folder))
    pq.write_table(pa.table({"path": ["c.png"], "class": [2]}), folder / "2.parquet")
    with pytest.raises(ValueError, match=rf"{folder / '2.parquet'} has no column 'label'.*class"):
        list_dataset(str(folder))


def test_the_parts_of_a_table_hold_at_most_held_bytes_of_images_together(tmp_path, monkeypatch):
    """Each part's HeldTable kept up to HELD_BYTES of its own: 40 parts, 40 times as much."""
    from pipeline.dataset import held

    rng = np.random.default_rng(13)
    tables = []
    kept = held.Kept()
    for part in range(3):
        rows = [{"bytes": image_bytes(rng, "png", 16), "path": None} for _ in range(4)]
        path = tmp_path / f"{part}.parquet"
        pq.write_table(pa.table({"image": pa.array(rows, HF_IMAGE)}), path, row_group_size=2)
        tables.append(held.HeldTable(str(path), "image", kept))
    monkeypatch.setattr(held, "HELD_BYTES", 2 * max(tables[0].group_bytes))  # two groups
    for table in tables:  # a row of each file's first group: each group begun, none done
        assert table.image(0) is not None
    assert len(kept.groups) == 2  # the least recently read dropped, whatever its file
    assert [table.image(1) for table in tables] == [
        pq.read_table(table.url)["image"][1]["bytes"].as_py() for table in tables
    ]  # a dropped group is read again when asked


def test_a_parquet_of_large_types_becomes_the_shards_of_its_plain_types(tmp_path):
    """A Hugging Face table as polars writes it (large_binary bytes, large_string path and
    label) ended `pvu shards` with a traceback: "ArrowTypeError: Array chunks must all be same
    type", the struct's large_string paths put in a string column."""
    table, valid = write_hf_table(tmp_path / "plain")
    large = pq.read_table(table)
    large = pa.table(
        {
            "image": large["image"].cast(
                pa.struct([("bytes", pa.large_binary()), ("path", pa.large_string())])
            ),
            "label": large["label"].cast(pa.string()).cast(pa.large_string()),
        }
    )
    pq.write_table(large, table.parent / "large.parquet", row_group_size=5)  # beside row 3's file
    for name, source in (("plain", table), ("large", table.parent / "large.parquet")):
        result = run("--input", str(source), "--output", str(tmp_path / f"{name}-out"))
        assert result.exit_code == 0, result.output
    samples = samples_of(tmp_path / "large-out")
    assert {key.rsplit("-", 1)[1]: (label, image) for key, label, image in samples} == valid
    assert [s[1:] for s in samples] == [s[1:] for s in samples_of(tmp_path / "plain-out")]


def test_a_parquet_of_view_types_becomes_the_shards_of_its_plain_types(tmp_path):
    """A table as polars or DuckDB export it, of Arrow's view types (binary_view bytes,
    string_view paths and labels), was no table of images: "has no column 'path' (it has
    image, label)"; and its string_view labels ended the run, pyarrow's utf8_trim_whitespace
    taking none."""
    table, valid = write_hf_table(tmp_path / "hf")
    hf = pq.read_table(table)
    labels = hf["label"].cast(pa.string())  # '0'-'3': class indices, as the ints were
    bytes_only = hf["image"].combine_chunks().field("bytes")
    struct = pa.table({"image": hf["image"], "label": labels})
    column = pa.table({"image": bytes_only, "label": labels})
    view_struct = pa.struct([("bytes", pa.binary_view()), ("path", pa.string_view())])
    for kind, plain, image_view in (
        ("struct", struct, view_struct),
        ("binary", column, pa.binary_view()),
    ):
        views = plain.cast(pa.schema([("image", image_view), ("label", pa.string_view())]))
        outputs = []
        for name, data in (("plain", plain), ("views", views)):
            source = table.parent / f"{kind}-{name}.parquet"  # beside row 3's file
            pq.write_table(data, source, row_group_size=5)
            assert pq.read_schema(source) == data.schema  # the views reach pvu as views
            outputs.append(tmp_path / f"{kind}-{name}-out")
            result = run("--input", str(source), "--output", str(outputs[-1]))
            assert result.exit_code == 0, result.output
        plain_out, views_out = outputs
        samples = samples_of(views_out)
        assert len(samples) == len(valid) - (kind == "binary")  # row 3's bytes: null
        assert [(key.split("-", 1)[1], *rest) for key, *rest in samples] == [
            (key.split("-", 1)[1], *rest) for key, *rest in samples_of(plain_out)
        ]
        made = sorted(path.name for path in views_out.iterdir())
        assert made == sorted(path.name for path in plain_out.iterdir()), made
        assert json.loads((views_out / "classes.json").read_text()) == ["0", "1", "2", "3"]
    by_name = {
        key.rsplit("-", 1)[1]: (label, image)
        for key, label, image in samples_of(tmp_path / "struct-views-out")
    }
    assert by_name == valid
