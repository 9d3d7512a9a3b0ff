"""A real cache is plain Parquet that DuckDB and polars read as is; the README recipes work."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.cache.index import open_cache
from pipeline.cache.manifest import Manifest
from pipeline.cache.unit import Unit
from pipeline.cache.verify import reconcile
from pipeline.demo.data import write_digit_shards
from pipeline.demo.synthetic import SyntheticCache, write_synthetic_cache
from pipeline.head.stream import read_validation
from tests.support import make_runner

README = Path(__file__).resolve().parents[1] / "README.md"
UNIT_GLOB = "epoch=*/*.parquet"


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two digit shards x two epochs through the real unit path, with its ``_manifest.json``."""
    root = tmp_path_factory.mktemp("readers")
    urls = write_digit_shards(str(root / "shards"), shards=2, per_shard=24)
    runner = make_runner(str(root / "cache"))
    try:
        for epoch in range(2):
            for index, url in enumerate(urls):
                runner.run(Unit(source=url, shard=f"digits-{index:04d}", epoch=epoch))
    finally:
        runner.close()
    reconcile(Manifest.open(str(root / "cache"), runner.settings.provenance))  # adopts the units
    assert (root / "cache" / "_manifest.json").is_file()
    return root / "cache"


def _pyarrow_rows(cache: Path) -> pa.Table:
    return ds.dataset(str(cache), format="parquet").to_table().sort_by([("epoch", "ascending")])


def _sorted(table: pa.Table) -> pa.Table:
    return table.sort_by([("epoch", "ascending"), ("shard", "ascending"), ("key", "ascending")])


def _embeddings(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return np.stack(column.to_numpy(zero_copy_only=False)).astype(np.float32)


def test_duckdb_reads_every_column_and_the_same_embeddings(cache: Path) -> None:
    reference = _sorted(_pyarrow_rows(cache))
    query = f"SELECT * FROM read_parquet('{cache}/{UNIT_GLOB}', hive_partitioning=false)"
    table = _sorted(duckdb.sql(query).arrow().read_all())
    assert table.column_names == reference.column_names
    assert table.num_rows == reference.num_rows == 2 * 2 * 24
    for name in ("key", "shard", "epoch", "label", "loss", "pred", "max_prob", "entropy"):
        assert table.column(name).to_pylist() == reference.column(name).to_pylist(), name
    np.testing.assert_array_equal(
        _embeddings(table.column("embedding")), _embeddings(reference.column("embedding"))
    )


def test_polars_reads_every_column_and_the_same_embeddings(cache: Path) -> None:
    reference = _sorted(_pyarrow_rows(cache))
    frame = pl.read_parquet(f"{cache}/{UNIT_GLOB}", hive_partitioning=False)
    frame = frame.sort(["epoch", "shard", "key"])
    assert frame.columns == reference.column_names
    assert frame.height == reference.num_rows
    for name in ("key", "shard", "epoch", "label", "loss", "pred", "max_prob", "entropy"):
        assert frame[name].to_list() == reference.column(name).to_pylist(), name
    polars_embeddings = np.stack(frame["embedding"].to_numpy()).astype(np.float32)
    np.testing.assert_array_equal(polars_embeddings, _embeddings(reference.column("embedding")))


def _readme_recipes() -> list[str]:
    text = README.read_text()
    section = text.split("## Read a cache from other tools", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)


@pytest.mark.parametrize("tool", ["pyarrow", "polars", "duckdb"])
def test_readme_recipe_runs_as_written(tool: str, cache: Path, tmp_path: Path) -> None:
    [recipe] = [code for code in _readme_recipes() if f"import {tool}" in code]
    assert len([line for line in recipe.splitlines() if line.strip()]) == 3
    (tmp_path / "demo-output" / "cache").mkdir(parents=True)
    (tmp_path / "demo-output" / "cache" / "train").symlink_to(cache)
    run = subprocess.run(
        [sys.executable, "-c", recipe], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.split()[0] == "96", run.stdout
    assert "embedding" in run.stdout and "loss" in run.stdout


def test_the_embedding_is_stored_plain_and_uncompressed_the_rest_under_zstd(cache: Path) -> None:
    metadata = pq.ParquetFile(next(cache.glob(UNIT_GLOB))).metadata
    chunks = [metadata.row_group(0).column(i) for i in range(metadata.num_columns)]
    by_path = {chunk.path_in_schema: chunk for chunk in chunks}
    embedding = by_path.pop("embedding.list.element")
    assert embedding.compression == "UNCOMPRESSED"
    assert "PLAIN" in embedding.encodings and "BYTE_STREAM_SPLIT" not in embedding.encodings
    assert {chunk.compression for chunk in by_path.values()} == {"ZSTD"}


@pytest.mark.parametrize(
    ("encoding", "compression"), [("BYTE_STREAM_SPLIT", "zstd"), ("PLAIN", "zstd")]
)
def test_pvu_still_reads_caches_written_by_earlier_versions(
    tmp_path: Path, encoding: str, compression: str
) -> None:
    spec = SyntheticCache(dim=8, samples_per_shard=40, shards=2, epochs=1, row_group_rows=20)
    url = str(tmp_path / "old")
    write_synthetic_cache(url, spec)
    before = read_validation(open_cache([url]), val_fraction=1.0, max_rows=1000)
    for path in sorted(Path(url).glob(UNIT_GLOB)):
        table = pq.read_table(path)
        pq.write_table(
            table,
            path,
            compression=compression,
            column_encoding={"embedding.list.element": encoding},
            use_dictionary=["key", "shard"],
            row_group_size=spec.row_group_rows,
        )
        chunk = pq.ParquetFile(path).metadata.row_group(0).column(4)
        assert encoding in chunk.encodings and chunk.compression == compression.upper()
    manifest = json.loads((Path(url) / "_manifest.json").read_text())
    for name, unit in manifest["units"].items():  # as the older writer would have recorded
        unit["bytes"] = (Path(url) / name).stat().st_size
    (Path(url) / "_manifest.json").write_text(json.dumps(manifest))
    after = read_validation(open_cache([url]), val_fraction=1.0, max_rows=1000)
    assert torch.equal(before.embedding, after.embedding)
    assert torch.equal(before.loss, after.loss)
