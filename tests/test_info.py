"""`pvu info`: a cache's provenance and contents from its manifest, or from its footers."""

from __future__ import annotations

import errno
import gc
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from rich.console import Console
from support import damage_page_header, flip_page_byte, make_runner, pvu, slow_footer_reads

from jobs.info import InfoJobConfig, run_info, verification
from pipeline.cache.index import open_cache
from pipeline.cache.info import read_cache_info
from pipeline.cache.manifest import Manifest
from pipeline.cache.unit import Unit
from pipeline.cache.verify import CacheCheck
from pipeline.demo.data import write_bad_shard, write_digit_shards
from pipeline.demo.synthetic import SyntheticCache, write_synthetic_cache
from pipeline.named import NAMED

pytestmark = pytest.mark.usefixtures("wide_console")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    """A two-epoch cache of two digit shards and one bad shard, made without Ray."""
    root = tmp_path_factory.mktemp("info")
    urls = write_digit_shards(str(root / "shards"), shards=2, per_shard=6, size=32)
    write_bad_shard(str(root / "shards" / "bad.tar"))
    urls.append(str(root / "shards" / "bad.tar"))
    output = str(root / "cache")
    runner = make_runner(output)
    manifest = Manifest.open(output, runner.settings.provenance)
    for epoch in range(2):
        for url in urls:
            name = url.rsplit("/", 1)[-1].removesuffix(".tar")
            result = runner.run(Unit(url, name, epoch))
            manifest.record(result.relpath, result.manifest_entry())
    manifest.flush(force=True)
    return output


def info_json(path: str) -> dict:
    result = pvu("info", path, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_info_counts_what_storage_holds(cache, tmp_path):
    summary = info_json(cache)
    table = ds.dataset(cache, format="parquet", ignore_prefixes=["_", "."]).to_table()
    assert summary["rows"] == table.num_rows
    assert summary["units"] == 6 and summary["shards"] == 3
    on_disk = sum(f.stat().st_size for f in Path(cache).rglob("*.parquet"))
    assert summary["bytes"] == on_disk
    assert summary["epochs"] == {
        str(e): {"units": 3, "rows": table.num_rows // 2} for e in range(2)
    }
    assert summary["skipped"]["undecodable"] == 2 and summary["skipped"]["no_label"] == 2
    assert summary["provenance"]["backbone"] == "resnet10t"
    assert summary["label_space"].startswith("the classifier's")

    result = pvu("info", cache)
    text = " ".join(result.stdout.split())  # on stdout: `pvu info c > file` kept nothing
    assert result.exit_code == 0
    assert f"{table.num_rows:,}" in text and "resnet10t" in text and "epoch 1" in text
    assert "compute │ cpu, autocast none" in text  # part of the identity the repair advice cites
    assert "units │ 6 (3 shards x 2 epochs)" in text  # it said "(3 shards x epochs)"
    kib = f"{summary['bytes'] / 1024:,.2f} KiB"
    assert f"bytes │ {summary['bytes']:,} ({kib}, " in text  # it said "(0.00 GiB, ", as if empty


def writing_to(stdout: str, module: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m MODULE ARGS`` as a process whose stdout is ``full`` (``/dev/full``) or
    ``closed`` (a pipe whose reader is gone), buffered as in a shell (``PYTHONUNBUFFERED``
    unset)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    command = [sys.executable, "-m", module, *args]
    if stdout == "full":
        with open("/dev/full", "w") as full:
            return subprocess.run(command, stdout=full, stderr=subprocess.PIPE, text=True, env=env)
    reader, writer = os.pipe()
    os.close(reader)
    try:
        return subprocess.run(command, stdout=writer, stderr=subprocess.PIPE, text=True, env=env)
    finally:
        os.close(writer)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize(
    "args",
    [["jobs.cli", "--help"], ["jobs.cli", "info"], ["jobs.cli", "info", "--json"], ["jobs.info"]],
    ids=" ".join,
)
def test_stdout_that_cannot_be_written_ends_in_one_line_not_a_traceback(cache, args) -> None:
    """``pvu info c > /dev/full`` ended in a traceback, ``pvu info c --json | head -1`` in
    'Exception ignored ... BrokenPipeError' and exit code 120; a closed pipe ends quietly. The
    same for a job run as ``python -m jobs.info`` (``ray job submit`` runs them so)."""
    args = [*args, cache] if args[-1] != "--help" else args
    name = "pvu" if args[0] == "jobs.cli" else "info"
    full = writing_to("full", *args)
    assert (full.returncode, full.stderr) == (
        1,
        f"{name}: cannot write to standard output: No space left on device\n",
    )
    closed = writing_to("closed", *args)
    assert (closed.returncode, closed.stderr) == (1, "")


def test_info_without_manifest_reads_the_footers(cache, tmp_path):
    import shutil

    copy = tmp_path / "run[1]"  # named like a glob: its units were not found, or another's
    shutil.copytree(cache, copy)
    (copy / "_manifest.json").unlink()
    shutil.copytree(copy / "epoch=0000", tmp_path / "run1" / "epoch=0000")
    with_manifest, from_footers = info_json(cache), info_json(str(copy))
    assert len(open_cache([str(copy)]).files) == with_manifest["units"]
    assert from_footers["source"] == "footers"
    for field in ("rows", "bytes", "units", "skipped", "epochs", "provenance"):
        assert from_footers[field] == with_manifest[field], field
    verified = pvu("info", str(copy), "--verify")  # said '0 missing' having checked nothing
    assert verified.exit_code == 0 and "not checked │ missing units" in verified.text, verified.text


def test_a_cache_of_one_epoch_says_1_epoch(cache, tmp_path):
    """It said "3 shards x 1 epochs" of the most common cache, one un-augmented epoch."""
    import shutil

    copy = tmp_path / "cache"
    shutil.copytree(cache, copy)
    (copy / "_manifest.json").unlink()
    shutil.rmtree(copy / "epoch=0001")
    result = pvu("info", str(copy))
    assert result.exit_code == 0, result.output
    assert "units │ 3 (3 shards x 1 epoch)" in result.text, result.text


def test_a_folder_named_epoch_but_no_number_is_no_epoch_of_the_cache(cache, tmp_path):
    """A bare cache's epoch=abc folder (a backup, say) was taken for an epoch: its units were
    counted as an epoch's, and read by training."""
    import shutil

    copy = tmp_path / "cache"
    shutil.copytree(cache, copy)
    (copy / "_manifest.json").unlink()
    os.rename(copy / "epoch=0001", copy / "epoch=abc")
    summary = info_json(str(copy))
    assert list(summary["epochs"]) == ["0"] and summary["units"] == 3
    assert [Path(f.url).parent.name for f in open_cache([str(copy)]).files] == ["epoch=0000"] * 3
    shutil.rmtree(copy / "epoch=0000")
    result = pvu("info", str(copy))
    assert result.exit_code == 2, result.output
    assert f"left out {copy}/epoch=abc: not an epoch folder" in result.text
    assert f"{copy} is not a pvu cache: no _manifest.json and no epoch=<number>/" in result.text


def test_info_without_manifest_reads_the_footers_in_parallel(cache, tmp_path, monkeypatch):
    """They were read one at a time: 1:43 for 14,000 units on a local S3 server, where the
    parallel --verify took 49 s (58.6 s against 12.3 s for 2,000 units at 20 ms latency)."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(cache, copy)
    (copy / "_manifest.json").unlink()
    reads = slow_footer_reads(monkeypatch)
    summary = read_cache_info(str(copy))
    assert summary.source == "footers" and reads.calls == len(summary.units) == 6
    assert reads.peak > 1, "footers read one at a time"
    assert list(summary.units) == sorted(summary.units)


def test_info_without_manifest_names_the_first_unreadable_unit_in_listing_order(
    cache, tmp_path, monkeypatch
):
    """Read in parallel, the first unit that fails in listing order is still the one named,
    however late its read ends."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(cache, copy)
    (copy / "_manifest.json").unlink()
    first, second = sorted(copy.glob("epoch=*/*.parquet"))[1:5:3]
    for unit in (first, second):
        unit.write_bytes(unit.read_bytes()[:100])
    slow_footer_reads(monkeypatch, slower={str(first.relative_to(copy)): 0.3})
    with pytest.raises(ValueError, match="not a readable Parquet file") as refused:
        read_cache_info(str(copy))
    assert str(refused.value).startswith(f"{first}: ")
    summary = read_cache_info(str(copy), keep_going=True)
    assert list(summary.unreadable) == [str(u.relative_to(copy)) for u in (first, second)]


def test_checksums_of_a_cache_without_manifest_name_a_unit_damaged_in_place(cache, tmp_path):
    """With its manifest moved aside, as its refusal advises, --checksums checked nothing,
    exited 0 and printed an empty, clean-looking "verify" document."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(cache, copy)
    (copy / "_manifest.json").unlink()
    flip_page_byte(copy / "epoch=0001" / "digits-0001.parquet", 0)
    result = pvu("info", str(copy), "--checksums")
    text = result.text
    assert result.exit_code == 1 and "Traceback" not in text, text
    assert "epoch=0001/digits-0001.parquet (row group 0: a page's bytes fail its CRC-32)" in text
    assert f"cache {copy} has no manifest" in text and "deleting the units whose pages" in text
    document = json.loads(pvu("info", str(copy), "--checksums", "--json").stdout)
    assert document["verify"]["checked"] == {"manifest": False, "pages": True}
    assert list(document["verify"]["damaged"]) == ["epoch=0001/digits-0001.parquet"]
    # a unit cut short is listed too (--verify stopped at it, exit 2, naming it alone)
    cut = copy / "epoch=0000" / "digits-0000.parquet"
    cut.write_bytes(cut.read_bytes()[:100])
    result = pvu("info", str(copy), "--checksums", "--json")
    assert result.exit_code == 1, result.output
    verified = json.loads(result.stdout)["verify"]
    damaged = verified["damaged"]
    assert sorted(damaged) == ["epoch=0000/digits-0000.parquet", "epoch=0001/digits-0001.parquet"]
    assert verified["orphans"] == {}  # not also a committed file the manifest lacks
    assert damaged["epoch=0000/digits-0000.parquet"].startswith("not a readable Parquet file")
    result = pvu("info", str(copy))  # the summary alone cannot be made: the unit is named
    assert result.exit_code == 2 and f"{cut}: not a readable Parquet file" in result.text
    for unit in copy.glob("epoch=*/*.parquet"):
        unit.write_bytes(b"")
    result = pvu("info", str(copy), "--verify")  # it named the last unit alone
    assert result.exit_code == 2 and "no unit's footer is readable (epoch=0000/" in result.text


def test_info_refuses_a_bare_cache_mixing_backbones(cache, tmp_path):
    """Without a manifest, info read the first unit's provenance and showed it for all."""
    import shutil

    import pyarrow.parquet as pq

    from schemas import PROVENANCE_KEY, read_provenance

    copy = tmp_path / "copy"
    shutil.copytree(cache, copy)
    (copy / "_manifest.json").unlink()
    unit = sorted(copy.glob("epoch=0001/*.parquet"))[0]
    table = pq.read_table(unit)
    provenance = {**read_provenance(table.schema), "backbone": "resnet14t"}
    metadata = {**table.schema.metadata, PROVENANCE_KEY: json.dumps(provenance)}
    pq.write_table(table.replace_schema_metadata(metadata), unit)
    result = pvu("info", str(copy))
    text = result.text
    assert result.exit_code == 2, text
    assert "backbone is resnet10t in" in text and f"resnet14t in {unit}" in text, text


def test_info_errors_exit_2_naming_the_path(tmp_path):
    a_file = tmp_path / "notes.txt"  # a file, not a cache folder
    a_file.write_text("x")
    for path, words in [
        (tmp_path / "nothing", "does not exist"),
        (tmp_path, "is not a pvu cache"),
        (a_file, "is a file, not a cache"),  # said "read .../_manifest.json failed: ..."
    ]:
        result = pvu("info", str(path))
        text = result.text
        assert result.exit_code == 2 and str(path) in text and words in text, text
        assert "Traceback" not in text
    result = pvu("info")  # said "give --cache", a flag pvu info does not have
    assert result.exit_code == 2 and "CACHE: required; give CACHE or set cache" in result.text


def test_info_of_a_folder_of_caches_names_them(cache, tmp_path):
    """`pvu info demo-output` (a folder holding caches) said only 'is not a pvu cache'."""
    import shutil

    held = tmp_path / "runs" / "vit" / "cache"
    shutil.copytree(cache, held)
    result = pvu("info", str(tmp_path / "runs"))
    text = result.text
    assert result.exit_code == 2, text
    assert f"it holds the cache(s) {held}: give one of those" in text, text
    # train-head and evaluate said only 'cache ... is empty: it has no committed Parquet unit'
    runs, out = str(tmp_path / "runs"), str(tmp_path / "out")
    for args in (["train-head", "--cache", runs], ["evaluate", "--dataset", f"d={runs}"]):
        result = pvu(*args, "--output" if args[0] == "train-head" else "--report", out)
        assert result.exit_code == 2, result.output
        assert f"it holds the cache(s) {held}: give one of those" in result.text, result.output


def test_verify_names_missing_and_damaged_units(cache, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(cache, copy)
    ok = pvu("info", str(copy), "--verify")
    assert ok.exit_code == 0, ok.output
    assert "units missing or damaged │ 0" in ok.text

    (copy / "epoch=0000" / "digits-0000.parquet").unlink()
    shutil.copy(copy / "epoch=0000" / "digits-0001.parquet", copy / "epoch=0001" / "bad.parquet")
    result = pvu("info", str(copy), "--verify")
    text = result.text
    assert result.exit_code == 1, text
    assert "epoch=0000/digits-0000.parquet" in text and "missing" in text
    assert "epoch=0001/bad.parquet" in text and "Traceback" not in text
    document = json.loads(pvu("info", str(copy), "--verify", "--json").stdout)
    assert sorted(document["verify"]["damaged"]) == [
        "epoch=0000/digits-0000.parquet",
        "epoch=0001/bad.parquet",
    ]


def test_verify_names_ten_damaged_units_and_counts_the_rest() -> None:
    """Every damaged unit was a row of the table: 14,000 rows when a shard set was rebuilt."""
    damaged = {f"epoch=0000/shard-{i:05d}.parquet": "missing" for i in range(NAMED + 4)}
    check = CacheCheck("s3://bucket/cache", damaged=damaged, listed=sorted(damaged))
    out = io.StringIO()
    Console(file=out, width=200).print(verification(check, pages=False))
    text = " ".join(out.getvalue().split())
    assert f"units missing or damaged │ {NAMED + 4}" in text
    assert text.count("shard-") == NAMED and "shard-00009" in text and "shard-00010" not in text
    assert "... and 4 more │ --json lists every one" in text


@pytest.mark.slow
def test_info_of_a_missing_bucket_exits_2_naming_it(s3_server):
    result = pvu("info", "s3://no-such-bucket/cache")
    assert result.exit_code == 2 and "Traceback" not in result.text, result.output
    assert "CACHE s3://no-such-bucket/cache: bucket no-such-bucket does not exist" in result.text


@pytest.mark.slow
def test_info_of_a_unit_file_on_s3_says_to_give_the_cache_folder(s3_bucket) -> None:
    """A local unit's path said so; the same unit on S3 said 'is not a pvu cache'."""
    url = f"{s3_bucket}/cache"
    write_synthetic_cache(url, SyntheticCache(dim=8, samples_per_shard=4, shards=1, epochs=1))
    unit = f"{url}/epoch=0000/shard-00000.parquet"
    result = pvu("info", unit)
    assert result.exit_code == 2, result.output
    assert f"{unit} is a file, not a cache: give the cache's folder" in result.text


def test_checksums_name_a_unit_damaged_in_place(cache, tmp_path):
    """A byte flipped inside a page, or a page header overwritten, keeps the unit's size and
    footer, so --verify passes it; --checksums reads the pages, names each unit, and says to
    delete them before re-running."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(cache, copy)
    assert pvu("info", str(copy), "--checksums").exit_code == 0
    flip_page_byte(copy / "epoch=0001" / "digits-0001.parquet", 0)
    damage_page_header(copy / "epoch=0000" / "digits-0000.parquet", 0)
    assert pvu("info", str(copy), "--verify").exit_code == 0  # sizes and footers agree

    result = pvu("info", str(copy), "--checksums")
    text = result.text
    assert result.exit_code == 1 and "Traceback" not in text, text
    assert "epoch=0001/digits-0001.parquet (row group 0: a page's bytes fail its CRC-32)" in text
    assert "epoch=0000/digits-0000.parquet (row group 0: " in text
    assert "deleting the units whose pages fail" in text
    document = json.loads(pvu("info", str(copy), "--checksums", "--json").stdout)
    assert sorted(document["verify"]["damaged"]) == [
        "epoch=0000/digits-0000.parquet",
        "epoch=0001/digits-0001.parquet",
    ]


@pytest.mark.parametrize("job", ["info", "shards"])
def test_a_config_file_that_cannot_be_read_is_named_not_taken_for_stdout(
    job, monkeypatch, capsys, tmp_path
):
    """info and shards read their --config outside their error report: a disk error there
    escaped to the stdout handler and read 'cannot write to standard output'."""
    from jobs import config as config_module
    from jobs.cli import app
    from jobs.terminal import run_cli

    def unreadable(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error", str(tmp_path / "c.yaml"))

    monkeypatch.setattr(config_module, "_build", unreadable)
    args = [str(tmp_path)] if job == "info" else ["--input", "in", "--output", "out"]
    with pytest.raises(SystemExit) as exited:
        run_cli(lambda: app([job, *args], prog_name="pvu"), "pvu")
    said = capsys.readouterr().err
    assert exited.value.code == 2 and f"{job}: [Errno 5] Input/output error" in said, said
    assert "c.yaml" in said and "standard output" not in said


def test_verify_keeps_no_footer_unless_checksums_read_the_pages(cache) -> None:
    """--verify held every unit's footer to the end (~280 KB parsed for 32 row groups),
    though only --checksums reads them again."""
    _, check = run_info(InfoJobConfig(cache=cache, verify=True))
    assert check is not None and check.ok
    held = gc.get_referents(*vars(check).values())
    assert not [footer for footer in held if isinstance(footer, pq.FileMetaData)]
    _, check = run_info(InfoJobConfig(cache=cache, checksums=True))
    assert check is not None and check.ok and len(check.footers) == 6


def test_footers_are_read_a_bounded_way_ahead(cache, monkeypatch) -> None:
    """read_footers read every footer ahead of its caller (~280 KB parsed each: +830 MB of
    RSS at 3,000 units of 32 row groups, however few the caller kept)."""
    import pipeline.cache.verify as verify

    reads: list[str] = []
    read_footer = verify.read_footer
    monkeypatch.setattr(
        verify, "read_footer", lambda *unit: reads.append(unit[1]) or read_footer(*unit)
    )
    footers = verify.read_footers(cache, verify.list_unit_files(cache), io_threads=1)
    next(footers)
    time.sleep(0.3)  # room for reads run ahead to happen
    assert len(reads) <= 3, reads  # the one yielded and two ahead, of six
    assert len(list(footers)) == 5


def test_footer_reads_not_begun_are_not_made_once_the_caller_stops(cache, monkeypatch) -> None:
    """A storage error in one unit's turn (or a caller that stops reading) waited for every
    read queued ahead, each retried against the same failing store, before the error came."""
    import pipeline.cache.verify as verify

    reads: list[str] = []
    real_read = verify.read_footer
    down = True

    def read_footer(url: str, relpath: str, size: int) -> pq.FileMetaData:
        reads.append(relpath)
        time.sleep(0.2)
        if down:
            raise OSError("the store is down")
        return real_read(url, relpath, size)

    monkeypatch.setattr(verify, "read_footer", read_footer)
    with pytest.raises(OSError, match="the store is down"):
        list(verify.read_footers(cache, verify.list_unit_files(cache), io_threads=1))
    assert len(reads) <= 2, reads  # the one that failed, and the one begun beside it
    reads.clear()
    down = False
    footers = verify.read_footers(cache, verify.list_unit_files(cache), io_threads=1)
    next(footers)
    footers.close()  # the caller stops: the one yielded, and the one begun
    assert len(reads) <= 2, reads


def test_info_of_a_cache_being_written_says_so(cache, tmp_path):
    """A live pvu cache run's cache was shown as 'its last pvu cache run did not finish
    (stopped or killed)', one that had committed nothing yet as 'not a pvu cache', and a unit
    it was rewriting as damage to delete."""
    from pipeline.cache.lock import RunLock

    fresh, copy = tmp_path / "fresh", tmp_path / "copy"
    shutil.copytree(cache, copy)
    manifest = copy / "_manifest.json"
    document = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**document, "last_run": {"units": 9, "finished": False}}))
    with RunLock(str(fresh), owner="pvu cache"), RunLock(str(copy), owner="pvu cache"):
        result = pvu("info", str(fresh))
        assert result.exit_code == 2, result.output
        assert (
            "it is being written by run" in result.text and "committed nothing yet" in result.text
        )
        result = pvu("info", str(copy))
        assert result.exit_code == 0, result.output
        assert "being written │ by run" in result.text and "did not finish" not in result.text
        assert info_json(str(copy))["being_written_by"].startswith("run ")
        next(copy.glob("epoch=*/*.parquet")).unlink()  # as its duplicate-key pass rewrites it
        result = pvu("info", str(copy), "--verify")
        assert result.exit_code == 1 and "is still being written, by run" in result.text
    assert info_json(str(copy))["being_written_by"] is None
