"""Retry: errors broken off mid-answer back off and retry; every other storage error fails at
once with the URL (the errors real clients raise, through a proxy: ``test_storage_faults``)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import aiohttp
import botocore.exceptions
import fsspec
import pytest
from fsspec.implementations.local import LocalFileSystem
from support import record_fsyncs

from pipeline.retry import (
    REQUEST_ATTEMPTS,
    BucketGone,
    StorageFull,
    bucket_kept,
    make_folder,
    move_file,
    retry,
    write_bytes,
)


class Flaky:
    def __init__(self, *errors: BaseException, result: object = "done") -> None:
        self.errors = list(errors)
        self.calls = 0
        self.result = result

    def __call__(self) -> object:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return self.result


def test_transient_errors_back_off_exponentially(caplog):
    sleeps: list[float] = []
    fn = Flaky(
        ConnectionResetError("reset"),
        TimeoutError("slow"),
        aiohttp.ClientPayloadError("Response payload is not completed"),
    )
    assert retry(fn, what="read s3://b/x.tar", base_delay=1.0, sleep=sleeps.append) == "done"
    assert fn.calls == 4
    assert len(sleeps) == 3
    for attempt, delay in enumerate(sleeps):
        assert 2**attempt * 0.5 <= delay <= 2**attempt  # jittered in [half, full]
    assert caplog.text.count("read s3://b/x.tar") == 3


def test_delay_is_capped():
    sleeps: list[float] = []
    retry(
        Flaky(*[ConnectionError()] * 6),
        attempts=7,
        base_delay=10,
        max_delay=15,
        what="x",
        sleep=sleeps.append,
    )
    assert max(sleeps) <= 15


def test_gives_up_with_the_url_in_the_message():
    sleeps: list[float] = []
    fn = Flaky(*[ConnectionError("refused")] * 5)
    with pytest.raises(ConnectionError) as error:
        retry(fn, attempts=3, what="open s3://b/x.tar", sleep=sleeps.append)
    assert str(error.value) == (
        "open s3://b/x.tar failed after 3 attempts: ConnectionError: refused"
    )
    assert isinstance(error.value.__cause__, ConnectionError)
    assert fn.calls == 3 and len(sleeps) == 2


@pytest.mark.parametrize("kind", [FileNotFoundError, PermissionError, IsADirectoryError])
def test_permanent_errors_are_not_retried(kind):
    fn = Flaky(kind("b/x.tar"))
    with pytest.raises(kind, match=r"open s3://b/x\.tar failed"):
        retry(fn, what="open s3://b/x.tar", sleep=pytest.fail)
    assert fn.calls == 1


@pytest.mark.parametrize(
    "error",
    [
        OSError(121, "Internal Server Error"),  # s3fs's 5xx once botocore gave up on it
        botocore.exceptions.EndpointConnectionError(endpoint_url="http://127.0.0.1:1/b/x.tar"),
    ],
)
def test_errors_the_layer_below_retried_are_not_retried_again(error):
    fn = Flaky(error)
    with pytest.raises(OSError, match=r"^open s3://b/x\.tar failed: ") as raised:
        retry(fn, what="open s3://b/x.tar", sleep=pytest.fail)
    assert fn.calls == 1 and raised.value.__cause__ is error


def test_client_errors_that_are_not_oserror_come_out_as_oserror():
    import aiohttp

    cut = aiohttp.ClientPayloadError("Response payload is not completed")
    with pytest.raises(OSError, match=r"read s3://b/x failed after 2 attempts: ClientPayloadError"):
        retry(Flaky(cut, cut), attempts=2, what="read s3://b/x", sleep=lambda _: None)


def test_a_full_disk_is_storage_full_at_once_with_the_url(tmp_path):
    import fsspec

    full = tmp_path / "unit.parquet"
    full.symlink_to("/dev/full")  # writes to /dev/full fail with ENOSPC, as on a full disk
    with pytest.raises(StorageFull, match=r"write file://.*unit\.parquet failed: .*No space left"):
        write_bytes(fsspec.filesystem("file"), str(full), b"rows")
    fn = Flaky(OSError(122, "Disk quota exceeded"))  # EDQUOT
    with pytest.raises(StorageFull, match=r"^commit s3://b/x failed: OSError: .*quota"):
        retry(fn, what="commit s3://b/x", sleep=pytest.fail)
    assert fn.calls == 1


def test_a_read_only_output_is_a_denied_commit_that_stops_the_run(tmp_path, monkeypatch):
    """EROFS (a mount remounted read-only mid-run) is a denied write: its commit raises
    ``OutputDenied``, which stops the run, not an error each unit tries ``--max-attempts``
    times after computing it in full."""
    import errno

    import pyarrow as pa

    from pipeline.cache.writer import commit_unit
    from pipeline.retry import OutputDenied

    def read_only(self, path, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", path)

    monkeypatch.setattr(LocalFileSystem, "_open", read_only)
    schema = pa.schema([("key", pa.string())])
    with pytest.raises(OutputDenied, match=r"commit .*epoch=0000/s\.parquet failed: .*Read-only"):
        commit_unit([], schema, root=str(tmp_path), relpath="epoch=0000/s.parquet", stats={})


def test_a_write_refused_leaves_the_file_there(tmp_path):
    """A failed write removed the target, even a file it was not let to touch (a read-only
    report in a shared folder). Root may write anything: it drops that power for the write."""
    target = tmp_path / "report.md"
    target.write_text("previous export")
    target.chmod(0o444)
    write = (
        "import fsspec, sys; from pipeline.retry import write_bytes\n"
        "try: write_bytes(fsspec.filesystem('file'), sys.argv[1], b'new')\n"
        "except PermissionError as error: print(error)"
    )
    drop = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"] if os.geteuid() == 0 else []
    if drop and not shutil.which("setpriv"):
        pytest.skip("root, and no setpriv to drop its power to write any file")
    result = subprocess.run(
        [*drop, sys.executable, "-c", write, str(target)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert f"write file://{target} failed: PermissionError" in result.stdout, result
    assert target.read_text() == "previous export"


def test_code_errors_pass_through_untouched():
    original = TypeError("bug")
    with pytest.raises(TypeError) as error:
        retry(Flaky(original), what="x", sleep=pytest.fail)
    assert error.value is original


def test_unusual_exception_constructor_still_gets_the_url():
    class Odd(ConnectionError):
        def __init__(self, a, b):
            super().__init__(f"{a}{b}")

    original = Odd("x", "y")
    with pytest.raises(ConnectionError, match=r"^read s3://b/x failed after 1 attempts: Odd: xy"):
        retry(Flaky(original), attempts=1, what="read s3://b/x")


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="attempts"):
        retry(lambda: None, attempts=0, what="x")
    with pytest.raises(ValueError, match="base_delay"):
        retry(lambda: None, base_delay=-1, what="x")


def test_a_missing_path_on_a_store_without_buckets_is_no_bucket_gone() -> None:
    """Any store but local disk was taken to have buckets: a file missing on sftp or hdfs
    (here: memory) became "the bucket home is gone"."""
    fs = fsspec.filesystem("memory")
    with pytest.raises(FileNotFoundError) as raised, bucket_kept(fs, "/home/out/unit.parquet"):
        fs.cat_file("/home/out/unit.parquet")
    assert not isinstance(raised.value, BucketGone)
    make_folder(fs, "/home/out/epoch=0000")  # a store with folders still gets them
    assert fs.isdir("/home/out/epoch=0000")


class AnswerLostOnce(LocalFileSystem):
    """A filesystem whose first move is done but answers with a dropped connection, as an
    object store's copy and delete can: the delete happened, its answer did not arrive."""

    cachable = False
    moves = 0

    def mv(self, path1: str, path2: str, **kwargs: object) -> None:
        super().mv(path1, path2, **kwargs)
        self.moves += 1
        if self.moves == 1:
            raise ConnectionResetError("connection reset by peer")


def test_a_move_done_though_its_answer_was_lost_is_done(tmp_path):
    """Its retry found no source and raised FileNotFoundError with the file in place."""
    (tmp_path / "metrics.jsonl.tmp").write_text("episode 2")
    (tmp_path / "metrics.jsonl").write_text("episode 1")
    source, target = tmp_path / "metrics.jsonl.tmp", tmp_path / "metrics.jsonl"
    move_file(AnswerLostOnce(), str(source), str(target))
    assert (tmp_path / "metrics.jsonl").read_text() == "episode 2"


def test_a_move_whose_source_is_missing_from_the_start_fails(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"move file://.*x\.tmp to"):
        move_file(LocalFileSystem(), str(tmp_path / "x.tmp"), str(tmp_path / "x"))


def test_a_users_own_botocore_settings_keep_the_request_retries() -> None:
    """A user's FSSPEC_S3 with config_kwargs for another setting (an s3 addressing style)
    replaced pvu's whole config_kwargs: botocore's request retries were silently gone."""
    import json

    code = "import fsspec, pipeline, json; print(json.dumps(fsspec.config.conf['s3']))"
    mine = {"config_kwargs": {"s3": {"addressing_style": "path"}}}
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": repo, "FSSPEC_S3": json.dumps(mine)}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    config = json.loads(run.stdout)["config_kwargs"]
    assert config["s3"] == {"addressing_style": "path"}, run.stderr
    assert config["retries"]["total_max_attempts"] == REQUEST_ATTEMPTS
    own = {"config_kwargs": {"retries": {"max_attempts": 2}}}  # theirs take precedence
    env["FSSPEC_S3"] = json.dumps(own)
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert json.loads(run.stdout)["config_kwargs"] == own["config_kwargs"], run.stderr


def test_a_committed_unit_and_its_folder_are_synced_around_its_rename(tmp_path, monkeypatch):
    """Units (and every file written aside) were renamed into place unsynced: after a power
    loss XFS and ext4 may show such a file empty. Power loss cannot be produced in a test, so
    the ``fsync`` calls are recorded (and made): the file before its rename, its folder after."""
    final = tmp_path / "epoch=0000" / "s.parquet"
    synced = record_fsyncs(monkeypatch, lambda path: final.exists())  # the unit in place?
    _commit(tmp_path, str(final.relative_to(tmp_path)))
    assert [seen for path, seen in synced if "/_staging/" in path] == [False], synced
    assert (str(final.parent), True) in synced, synced
    assert final.stat().st_size > 0


def test_a_caches_new_folders_are_synced_into_their_parents_once(tmp_path, monkeypatch):
    """A cache's new folders (the cache itself, ``_staging``, ``epoch=<n>``) were created and
    never synced into the folder that gained them: after a power loss such a folder could be
    gone, and with it the units renamed into it. Each new folder's parent is synced once, as
    the folder is made; a unit into a folder that is there syncs only its file and folder."""
    root = tmp_path / "cache"
    synced = record_fsyncs(monkeypatch)

    def folders_synced(relpath: str) -> list[str]:
        synced.clear()
        _commit(root, relpath)
        return sorted(path for path, _ in synced if os.path.isdir(path))

    first = folders_synced("epoch=0000/a.parquet")  # the cache, _staging, epoch=0000 are new
    assert first == sorted([str(tmp_path), str(root), str(root), str(root / "epoch=0000")])
    assert folders_synced("epoch=0000/b.parquet") == [str(root / "epoch=0000")]
    assert folders_synced("epoch=0001/c.parquet") == [str(root), str(root / "epoch=0001")]


def _commit(root, relpath: str) -> None:
    """Commit a unit of two rows to ``root/relpath``."""
    import pyarrow as pa

    from pipeline.cache.writer import commit_unit

    table = pa.table({"key": ["a", "b"]})
    commit_unit(table.to_batches(), table.schema, root=str(root), relpath=relpath, stats={})
