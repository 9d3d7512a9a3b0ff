"""Shard specs: brace patterns, globs, folders, prefixes and list files, local and on S3."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import braceexpand
import fsspec
import pytest

from pipeline.cache.shards import (
    brace_count,
    expand_shards,
    listed_sizes,
    refuse_rebuilt_shards,
    shard_name,
    shard_names,
    warn_of_other_sources,
)
from pipeline.demo.data import write_digit_shards, write_shard

ONE_SAMPLE = [("k0", {"cls": b"0"})]


def _make(folder: str, *names: str) -> list[str]:
    urls = []
    for name in names:
        url = f"{folder.rstrip('/')}/{name}"
        if name.endswith((".tar", ".tar.gz", ".tgz")):
            write_shard(url, ONE_SAMPLE)
        else:
            with fsspec.open(url, "wb") as file:
                file.write(b"not a shard")
        urls.append(url)
    return urls


@pytest.fixture
def local(tmp_path) -> str:
    folder = str(tmp_path / "data")
    _make(
        folder,
        "train-0002.tar",
        "train-0000.tar",
        "train-0001.tar",
        "val-0000.tar",
        "extra.tar.gz",
        "README.md",
        "._train-0000.tar",  # macOS's AppleDouble file of a copied shard: no tar
    )
    _make(folder + "/nested", "train-0009.tar")
    return folder


def test_brace_pattern_expands_in_order(local):
    urls = expand_shards(f"{local}/train-{{0000..0002}}.tar")
    assert urls == [f"{local}/train-000{i}.tar" for i in range(3)]


def test_brace_pattern_with_alternatives_and_duplicates(local):
    urls = expand_shards(f"{local}/{{val,train}}-{{0000,0000}}.tar")
    assert urls == [f"{local}/val-0000.tar", f"{local}/train-0000.tar"]
    # one shard spelled two ways is one shard (it was refused as two of the same name)
    urls = expand_shards(f"{local}/{{.,nested/..}}/val-0000.tar")
    assert urls == [f"{local}/val-0000.tar"]


def test_brace_pattern_names_missing_shards(local):
    spec = f"{local}/train-{{0000..0004}}.tar"
    with pytest.raises(FileNotFoundError) as error:
        expand_shards(spec)
    message = str(error.value)
    assert spec in message and "2 of 5" in message and "train-0004.tar" in message
    # Without verification the pattern is taken as it is.
    assert len(expand_shards(spec, verify=False)) == 5


def test_a_brace_pattern_of_too_many_urls_is_refused_before_it_is_expanded(tmp_path):
    """A range a few digits too long ({0..99999999999}) was expanded whole: pvu plan and pvu
    cache filled the memory until the kernel killed them (exit 137, no message)."""
    spec = f"{tmp_path}/train-{{0..99999999999}}-{{a,b}}.tar"
    with pytest.raises(ValueError, match=r"names 200,000,000,000 URLs, more than the 1,000,000"):
        expand_shards(spec, verify=False)


@pytest.mark.parametrize(
    "pattern",
    [
        "a{0000..2047}.tar",
        "{a,b}{1..5}",
        "python{2.{5..7},3.{2,3}}",
        "{4..1}{2..-1}{-3..3..2}{0..10..0}",
        "{a..g..2}{Z..c}{c..A}",
        r"{1\{2,3}x{}y{a}{a,}{,}",
        "{a,b{1..3},{x,y}{1..2}}s{0..2}-{a..c}{,.bak}",
    ],
)
def test_brace_count_is_the_number_braceexpand_makes(pattern):
    assert brace_count(pattern) == len(list(braceexpand.braceexpand(pattern)))


def test_brace_pattern_matching_nothing(tmp_path):
    spec = f"{tmp_path}/nothing-{{0..3}}.tar"
    with pytest.raises(FileNotFoundError, match="no shards match"):
        expand_shards(spec)


def test_directory_lists_its_own_tars_sorted(local):
    assert expand_shards(local) == [
        f"{local}/extra.tar.gz",
        f"{local}/train-0000.tar",
        f"{local}/train-0001.tar",
        f"{local}/train-0002.tar",
        f"{local}/val-0000.tar",
    ]
    assert expand_shards(local + "/") == expand_shards(local)


def test_prefix_and_glob(local):
    expected = [f"{local}/train-000{i}.tar" for i in range(3)]
    assert expand_shards(f"{local}/train-") == expected
    assert expand_shards(f"{local}/train-*.tar") == expected
    assert expand_shards(f"{local}/*-0000.tar") == [
        f"{local}/train-0000.tar",
        f"{local}/val-0000.tar",
    ]


def test_links_to_shards_are_shards(local, tmp_path):
    """A folder of symbolic links to shards (a subset picked with `ln -s`) matched "no shards"
    as a directory, glob or prefix: a local listing types a link to a file ``other``. A
    dangling link is listed, so that its unit fails naming it, rather than left out unsaid."""
    links = tmp_path / "links"
    links.mkdir()
    for name in ("train-0000.tar", "train-0001.tar"):
        (links / name).symlink_to(f"{local}/{name}")
    (links / "train-0002.tar").symlink_to(tmp_path / "gone.tar")  # dangling: its unit fails
    (links / "train-0003.tar").symlink_to(tmp_path, target_is_directory=True)  # no shard
    os.mkfifo(tmp_path / "pipe")
    (links / "train-0004.tar").symlink_to(tmp_path / "pipe")  # no shard: a read never ends
    expected = [f"{links}/train-000{i}.tar" for i in range(3)]
    assert expand_shards(str(links), verify=False) == expected
    assert expand_shards(f"{links}/*.tar", verify=False) == expected
    assert expand_shards(f"{links}/train-", verify=False) == expected


def test_a_folder_or_tar_whose_name_looks_like_a_glob_is_itself(tmp_path):
    """'run[1]' was always globbed (matching 'run1'), so an existing folder or shard with
    brackets in its name could not be given at all."""
    folder = str(tmp_path / "run[1]")
    [url] = _make(folder, "shard-0000.tar")
    assert expand_shards(folder) == [url]
    assert expand_shards(url) == [url]


def test_single_tar_and_missing_tar(local):
    assert expand_shards(f"{local}/val-0000.tar") == [f"{local}/val-0000.tar"]
    with pytest.raises(FileNotFoundError, match=r"val-0001\.tar"):
        expand_shards(f"{local}/val-0001.tar")


def test_list_file(local, tmp_path):
    listing = tmp_path / "data" / "shards.txt"
    listing.write_text(
        "# training shards\n"
        "\n"
        "train-0001.tar\n"
        f"   {local}/val-0000.tar   \n"
        "nested/train-0009.tar\n"
        "train-0001.tar\n"
        "./train-0001.tar\n"
    )
    assert expand_shards(str(listing)) == [
        f"{local}/train-0001.tar",
        f"{local}/val-0000.tar",
        f"{local}/nested/train-0009.tar",
    ]
    listing.write_text("train-0001.tar\n", encoding="utf-8-sig")  # Notepad's BOM
    assert expand_shards(str(listing)) == [f"{local}/train-0001.tar"]


def test_a_list_file_reached_through_a_link_resolves_dot_dot_as_the_os_does(tmp_path):
    """``..`` in a list file whose folder is a link is the parent of the link's target, as
    ``cat`` or ``tar`` would read it: it was resolved as text, the link's own parent, which
    named other shards (or none)."""
    real = tmp_path / "disk" / "dataset"
    shards = _make(str(real / "shards"), "train-0000.tar", "train-0001.tar")
    _make(str(tmp_path / "shards"), "train-0000.tar", "train-0001.tar")  # the text's reading
    (real / "lists").mkdir()
    (tmp_path / "lists").symlink_to(real / "lists", target_is_directory=True)
    listing = real / "lists" / "shards.txt"
    listing.write_text(f"../shards/train-0000.tar\n{tmp_path}/lists/../shards/train-0001.tar\n")
    assert expand_shards(str(tmp_path / "lists" / "shards.txt")) == shards
    assert expand_shards(str(tmp_path / "lists" / ".." / "lists" / "shards.txt")) == shards


def test_list_file_errors(tmp_path):
    listing = tmp_path / "shards.txt"
    listing.write_text("# nothing here\n\n")
    with pytest.raises(ValueError, match="lists no URLs"):
        expand_shards(str(listing))
    listing.write_text("missing.tar\n")
    with pytest.raises(FileNotFoundError, match=r"shards\.txt"):
        expand_shards(str(listing))
    binary = tmp_path / "image.bin"
    binary.write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(ValueError, match="neither a tar file"):
        expand_shards(str(binary))


def test_a_listed_folder_or_fifo_is_refused_naming_it(local, tmp_path):
    """A list file's or brace pattern's entry that is a folder, or a FIFO, is refused up front:
    it passed the existence check, and its unit failed on every try (a folder) or its read
    waited for a writer until the unit timeout, hours (a FIFO)."""
    listing = tmp_path / "data" / "shards.txt"
    listing.write_text("train-0000.tar\nnested\n")
    with pytest.raises(ValueError, match=r"nested' of .*shards\.txt' is a folder"):
        expand_shards(str(listing))
    with pytest.raises(ValueError, match="is a folder"):
        expand_shards(f"{local}/{{train-0000.tar,nested}}")
    os.mkfifo(f"{local}/pipe.tar")
    listing.write_text("train-0000.tar\npipe.tar\n")
    with pytest.raises(ValueError, match=r"pipe\.tar' of .* is no regular file"):
        expand_shards(str(listing))
    with pytest.raises(ValueError, match=r"--shards .*pipe\.tar' is no regular file"):
        expand_shards(f"{local}/pipe.tar")  # was "does not exist"
    listing.write_text("train-0000.tar\nnested/train-0009.tar\n")  # files in both: as before
    assert expand_shards(str(listing)) == [
        f"{local}/train-0000.tar",
        f"{local}/nested/train-0009.tar",
    ]


def test_a_listed_folder_is_refused_where_its_parent_cannot_be_listed(local, monkeypatch):
    """Where listing is forbidden, each shard is looked up alone: a folder is refused so too."""
    from fsspec.implementations.local import LocalFileSystem

    listed = LocalFileSystem.ls

    def ls(self, path, detail=True, **kwargs):
        if path.rstrip("/") == local:
            raise PermissionError(f"may not list {path}")
        return listed(self, path, detail=detail, **kwargs)

    monkeypatch.setattr(LocalFileSystem, "ls", ls)
    assert expand_shards(f"{local}/{{train-0000.tar,val-0000.tar}}") == [
        f"{local}/train-0000.tar",
        f"{local}/val-0000.tar",
    ]
    with pytest.raises(ValueError, match=r"nested' of .* is a folder"):
        expand_shards(f"{local}/{{train-0000.tar,nested}}")


def test_nothing_matches(tmp_path):
    (tmp_path / "empty").mkdir()
    for spec in (str(tmp_path / "empty"), str(tmp_path / "absent"), str(tmp_path / "x-")):
        with pytest.raises(FileNotFoundError, match="no shards") as error:
            expand_shards(spec)
        assert spec in str(error.value)


@pytest.mark.parametrize("spec", ["", "   ", None])
def test_empty_spec(spec):
    with pytest.raises(ValueError, match="non-empty"):
        expand_shards(spec)


def test_relative_paths_become_absolute(local, monkeypatch):
    monkeypatch.chdir(os.path.dirname(local))
    assert expand_shards("data/val-") == [f"{local}/val-0000.tar"]
    assert expand_shards("data/val-{0000..0000}.tar") == [f"{local}/val-0000.tar"]
    assert expand_shards(f"file://{local}/val-0000.tar") == [f"{local}/val-0000.tar"]


@pytest.mark.slow
def test_all_spec_kinds_on_s3(s3_bucket):
    root = f"{s3_bucket}/imagenet"
    _make(root, "train-0001.tar", "train-0000.tar", "val-0000.tar", "notes.txt")
    _make(root + "/sub", "train-0002.tar")
    with fsspec.open(f"{root}/shards.txt", "w") as file:
        file.write("# list\ntrain-0001.tar\nsub/train-0002.tar\n")
    train = [f"{root}/train-0000.tar", f"{root}/train-0001.tar"]

    assert expand_shards(f"{root}/train-{{0000..0001}}.tar") == train
    assert expand_shards(root) == [*train, f"{root}/val-0000.tar"]
    assert expand_shards(root + "/") == expand_shards(root)
    assert expand_shards(f"{root}/train-") == train
    assert expand_shards(f"{root}/train-*.tar") == train
    assert expand_shards(f"{root}/val-0000.tar") == [f"{root}/val-0000.tar"]
    assert expand_shards(f"{root}/shards.txt") == [
        f"{root}/train-0001.tar",
        f"{root}/sub/train-0002.tar",
    ]
    with pytest.raises(FileNotFoundError, match="6 of 8 shards"):
        expand_shards(f"{root}/train-{{0000..0007}}.tar")
    with pytest.raises(FileNotFoundError, match="no shards"):
        expand_shards(f"{s3_bucket}/elsewhere/")


@pytest.mark.slow
def test_list_file_on_s3_resolves_dot_steps(s3_bucket):
    """A list file's './x.tar' and '../other/x.tar' entries are relative to its folder on S3
    too, as on a local disk: they were joined as they were, keys 'lists/../other/x.tar' that
    a store does not have, and the run was refused as 'shards do not exist'."""
    root = f"{s3_bucket}/data"
    _make(root + "/a", "train-0000.tar", "train-0001.tar")
    _make(root + "/b", "train-0002.tar")
    with fsspec.open(f"{root}/a/shards.txt", "w") as file:
        file.write("./train-0000.tar\ntrain-0001.tar\n../b/train-0002.tar\n")
    assert expand_shards(f"{root}/a/shards.txt") == [
        f"{root}/a/train-0000.tar",
        f"{root}/a/train-0001.tar",
        f"{root}/b/train-0002.tar",
    ]


@pytest.mark.parametrize(
    ("url", "name"),
    [
        ("s3://bucket/in21k/train-0001.tar", "train-0001"),
        ("/data/shards/val-0000.tar.gz", "val-0000"),
        ("gs://b/x/imagenet.train.0007.tgz", "imagenet.train.0007"),
        ("https://host/shards/a-001.tar?token=abc", "a-001"),
        ("relative/shard.TAR", "shard"),
    ],
)
def test_shard_name(url, name):
    assert shard_name(url) == name


def test_shard_name_is_safe_and_keeps_urls_apart():
    odd = shard_name("s3://b/my shard=1.tar")
    assert odd.startswith("my_shard_1-") and len(odd) == len("my_shard_1-") + 8
    assert shard_name("s3://b/my shard=2.tar") != odd
    hidden = shard_name("/data/_tmp.tar")
    assert not hidden.startswith(("_", ".")) and hidden.startswith("tmp-")
    assert shard_name("s3://b/.tar").startswith("shard-")
    long = shard_name("/d/" + "x" * 300 + ".tar")
    assert len(long) <= 120
    latin1 = shard_name(b"/d/sh\xe9rd.tar".decode(errors="surrogateescape"))  # as listed
    assert latin1.startswith("sh_rd-")  # it failed the run, unable to encode the name
    for name in (odd, hidden, long, latin1):
        assert all(c.isalnum() or c in "._-" for c in name)


def test_shard_names_refuses_collisions():
    assert shard_names(["s3://b/a/x.tar", "s3://b/a/y.tar"]) == ["x", "y"]
    with pytest.raises(ValueError, match="same name 'x'"):
        shard_names(["s3://b/train/x.tar", "s3://b/val/x.tar"])


def test_a_shard_spelled_s3a_is_not_taken_for_a_moved_one(caplog):
    """Re-running with s3a:// for s3:// warned that every committed shard had moved."""
    units = [{"shard": "x", "source": "s3://b/x.tar"}, {"shard": "y", "source": "/d/./y.tar"}]
    warn_of_other_sources(units, {"x": "s3a://b/x.tar", "y": "/d/y.tar"})
    assert "other URLs" not in caplog.text
    warn_of_other_sources(units, {"x": "s3a://old/x.tar"})
    assert "other URLs" in caplog.text


def test_listed_sizes_come_from_one_listing_a_folder(local):
    urls = [*expand_shards(f"{local}/train-{{0000..0002}}.tar"), f"{local}/gone/x.tar"]
    assert listed_sizes(urls) == {url: os.path.getsize(url) for url in urls[:3]}


def test_units_of_a_shard_of_another_size_at_the_same_url_are_refused():
    def unit(source: str, size: int | None = None) -> dict:
        entry = {"shard": "x", "source": source}
        return entry if size is None else {**entry, "source_bytes": size}

    by_name, sizes = {"x": "s3://b/x.tar"}, {"s3://b/x.tar": 20}
    for kept in (unit("s3://b/x.tar", 20), unit("s3://b/x.tar"), unit("s3://old/x.tar", 10)):
        refuse_rebuilt_shards({"epoch=0000/x.parquet": kept}, by_name, sizes, "s3://c")
    refuse_rebuilt_shards({"epoch=0000/x.parquet": unit("s3://b/x.tar", 10)}, by_name, {}, "c")
    # s3a:// is s3://: a shard rebuilt and named the other way now is still refused (the
    # spellings counted as two URLs, a shard moved, and the size went unchecked)
    with pytest.raises(ValueError, match="another size"):
        refuse_rebuilt_shards(
            {"epoch=0000/x.parquet": unit("s3a://b/x.tar", 10)}, by_name, sizes, "c"
        )
    units = {f"epoch=000{i}/x.parquet": unit("s3://b/x.tar", 10) for i in range(5)}
    said = r"1 shard\(s\) .* s3://b/x.tar was 10 bytes, now 20.*s3://c/epoch=0000/x.parquet, "
    with pytest.raises(ValueError, match=said + ".* and 2 more"):
        refuse_rebuilt_shards(units, by_name, sizes, "s3://c")


def test_dot_dot_resolves_only_the_link_it_steps_out_of(tmp_path):
    """``lists/../shards`` below a linked mount (``/data -> /mnt/data``) is ``/data/shards``, as
    listing the folder spells it: every link above was resolved too, so the same shards got
    another URL from a list file than from their folder, and a resumed cache took its units
    for moved shards (a warning, and no check that a shard was rebuilt)."""
    real = tmp_path / "mnt" / "data"
    (real / "lists").mkdir(parents=True)
    (tmp_path / "data").symlink_to(real, target_is_directory=True)
    shards = _make(str(tmp_path / "data" / "shards"), "train-0000.tar")
    (real / "lists" / "shards.txt").write_text("../shards/train-0000.tar\n")
    assert expand_shards(str(tmp_path / "data" / "lists" / "shards.txt")) == shards
    assert expand_shards(str(tmp_path / "data" / "shards")) == shards


def test_a_folder_of_other_archives_names_them_and_what_pvu_reads(tmp_path):
    """A folder of .tar.xz and .tar.bz2 shards gave only 'no shards (*.tar, *.tar.gz, *.tgz)
    match the directory', as if it were empty."""
    for name, mode in [("train-0000.tar.xz", "w:xz"), ("train-0001.tar.bz2", "w:bz2")]:
        with tarfile.open(tmp_path / name, mode) as tar:
            tar.addfile(tarfile.TarInfo("a.cls"))
    (tmp_path / "notes.txt").write_text("made with tar -cJf\n")
    advice = "make each a .tar or .tar.gz (a .tar.xz, .tar.bz2 or .tar.zst decompressed"
    for spec, holds in [(tmp_path, 2), (tmp_path / "train-", 2), (tmp_path / "*.tar.xz", 1)]:
        with pytest.raises(FileNotFoundError) as error:
            expand_shards(str(spec))
        assert f"it holds {holds} archive(s) pvu does not read, e.g. 'train-0000.tar.xz': " in (
            str(error.value)
        )
        assert advice in str(error.value)
    with pytest.raises(ValueError, match=r"train-0000.tar.xz' is no shard pvu reads: make it a"):
        expand_shards(str(tmp_path / "train-0000.tar.xz"))  # was: 'neither a tar file nor ...'


def test_other_archives_beside_shards_are_named(tmp_path, caplog):
    """A folder of train-0000.tar and train-0001.tar.xz read the .tar alone without a word:
    half the data went uncached."""
    [shard] = write_digit_shards(str(tmp_path), shards=1, per_shard=2, size=16)
    with tarfile.open(tmp_path / "train-0001.tar.xz", "w:xz") as tar:
        tar.addfile(tarfile.TarInfo("a.cls"))
    with caplog.at_level(logging.WARNING, logger="pipeline.cache.shards"):
        assert expand_shards(str(tmp_path)) == [shard]
    assert "read without 1 archive(s) pvu does not read, e.g. 'train-0001.tar.xz'" in caplog.text


def test_a_list_file_names_a_non_ascii_shard_in_any_locale(tmp_path):
    """A list naming shards/ü-000.tar found no shard where Python decodes file names as ASCII
    (LC_ALL=C with PYTHONUTF8=0): the list's UTF-8 'ü' is no name the folder lists then."""
    [made] = write_digit_shards(str(tmp_path / "made"), shards=1, per_shard=3, size=16)
    (tmp_path / "shards").mkdir()
    os.rename(made, os.fsencode(tmp_path / "shards") + "/ü-000.tar".encode())  # UTF-8 bytes
    (tmp_path / "list.txt").write_bytes("shards/ü-000.tar\n".encode())
    script = (
        "import collections, sys\n"
        "from pipeline.cache.samples import iter_samples\n"
        "from pipeline.cache.shards import expand_shards\n"
        "[url] = expand_shards(sys.argv[1])\n"
        "print(len(list(iter_samples(url, counts=collections.Counter()))))\n"
    )
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONPATH": root}
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "list.txt")],
        env=env,
        capture_output=True,
        check=False,
    )
    assert done.returncode == 0 and done.stdout.strip() == b"3", done.stderr.decode()[-800:]


def test_shards_served_over_http_are_found_and_pass_the_storage_check(s3_bucket, s3_server):
    """WebDataset shards at HTTP URLs (here moto's public objects, on 127.0.0.1): a brace
    pattern finds them though HTTP lists no folder, each named as given (not http://http://),
    a missing one is still named, and the storage check passes them (an HTTP path is its whole
    URL: it has no bucket to probe)."""
    import boto3

    from jobs.preflight import check_storage

    bucket = s3_bucket.removeprefix("s3://")
    write_digit_shards(f"{s3_bucket}/shards", shards=2, per_shard=3, size=32)
    for n in range(2):
        boto3.client("s3").put_object_acl(
            Bucket=bucket, Key=f"shards/digits-{n:04d}.tar", ACL="public-read"
        )
    folder = f"{s3_server}/{bucket}/shards"
    urls = [f"{folder}/digits-0000.tar", f"{folder}/digits-0001.tar"]
    assert expand_shards(f"{folder}/digits-{{0000..0001}}.tar") == urls
    with pytest.raises(FileNotFoundError, match=f"1 of 3 shards .*{folder}/digits-0002.tar"):
        expand_shards(f"{folder}/digits-{{0000..0002}}.tar")
    check_storage(urls[0], flag="--shards", must_exist=True)
