"""``pvu evaluate`` end to end on real eval caches: report contract, figures, offline HTML."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import timm
from sklearn.metrics import roc_auc_score
from support import pvu
from typer.testing import CliRunner

from jobs.cli import app
from pipeline.cache.index import open_cache
from pipeline.cache.writer import PARQUET_OPTIONS, to_record_batch
from pipeline.evaluate.evalset import load_eval_set, read_eval_set
from pipeline.evaluate.runner import EvaluateOptions, evaluate
from pipeline.evaluate.sources import baseline_uncertainty
from pipeline.head.export import export_head
from pipeline.head.model import HeadConfig, create_head
from schemas import cache_schema, validate_report, with_provenance

DIM = 16
BACKBONE = {"backbone": "synthetic", "weights_digest": "sha256:eval-test"}


def write_eval_cache(
    url: str,
    embedding: np.ndarray,
    labels: np.ndarray,
    *,
    keys: list[str] | None = None,
    transform: dict[str, Any] | None = None,
    ambiguity: np.ndarray | None = None,
    epochs: int = 1,
    backbone: dict[str, str] = BACKBONE,
    shards: int = 2,
) -> str:
    """An eval cache (epoch 0, manifest-less) of ``embedding`` rows with ``labels`` at ``url``."""
    n = len(labels)
    keys = keys or [f"img-{i:06d}" for i in range(n)]
    rng = np.random.default_rng(n)
    logits = rng.standard_normal((n, 5))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    provenance = {**backbone, "transform": transform or {"is_training": False}, "seed": 0}
    schema = with_provenance(cache_schema(embedding.shape[1]), provenance)
    fs, root = fsspec.core.url_to_fs(url)
    units = [
        (e, s, rows)
        for e in range(epochs)
        for s, rows in enumerate(np.array_split(np.arange(n), shards))
    ]
    for epoch, shard, rows in units:
        fs.makedirs(f"{root}/epoch={epoch:04d}", exist_ok=True)
        batch = to_record_batch(
            schema,
            keys=[keys[i] for i in rows],
            shard=f"shard-{shard}",
            epoch=epoch,
            labels=labels[rows],
            outputs={
                "embedding": embedding[rows],
                "loss": -np.log(probs[rows, 0]),
                "pred": probs[rows].argmax(1),
                "max_prob": probs[rows].max(1),
                "entropy": -(probs[rows] * np.log(probs[rows])).sum(1),
            },
            ambiguity=None if ambiguity is None else ambiguity[rows],
        )
        table = pa.Table.from_batches([batch])
        with fs.open(f"{root}/epoch={epoch:04d}/shard-{shard}.parquet", "wb") as handle:
            pq.write_table(table, handle, **PARQUET_OPTIONS)
    return url


def clustered(n: int, classes: int, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Class clusters with per-row noise: some rows sit between clusters (1-NN errors)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    centres = rng.standard_normal((classes, DIM)) * 2
    noise = rng.uniform(0.2, 3.0, (n, 1))
    return (centres[labels] + noise * rng.standard_normal((n, DIM))).astype(np.float32), labels


@pytest.fixture(scope="module")
def head_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = str(tmp_path_factory.mktemp("head") / "head")
    head = create_head(HeadConfig(embedding_dim=DIM, hidden=(8,)), seed=0)
    export_head(head, out, loss="ranking", **BACKBONE)
    return out


class SvgPoints(HTMLParser):
    """The circles of an HTML page and their hover titles; any external reference."""

    def __init__(self) -> None:
        super().__init__()
        self.titles: list[str] = []
        self.circles = 0
        self.external: list[str] = []
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.circles += tag == "circle"
        self._in_title = tag == "title" and self.circles > 0
        self.external += [v for k, v in attrs if k in ("src", "href") and v]
        if tag == "script" or tag == "link":
            self.external.append(tag)

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.titles.append(data)
            self._in_title = False


def test_evaluate_writes_a_valid_report(tmp_path: Path, head_dir: str) -> None:
    zero_shot = write_eval_cache(str(tmp_path / "zs"), *clustered(300, 4, seed=1))
    real_keys = [f"val/ILSVRC2012_val_{i:08d}" for i in range(1, 201)]
    up = write_eval_cache(str(tmp_path / "up"), *clustered(200, 5, seed=2), keys=real_keys)
    second = str(tmp_path / "second")
    export_head(create_head(HeadConfig(DIM, hidden=(4,)), seed=1), second, loss="l2", **BACKBONE)
    report = tmp_path / "report"
    result = CliRunner().invoke(
        app,
        f"evaluate --head {head_dir} --head {second} --dataset zs={zero_shot} --upstream {up} "
        f"--report {report} --tsne-points 120 --tsne-classes 0,1,2".split(),
    )
    assert result.exit_code == 0, result.output
    document = json.loads((report / "report.json").read_text())
    validate_report(document)
    broken = json.loads((report / "report.json").read_text())
    del broken["datasets"][0]["sources"]["entropy"]["r_auroc"]
    with pytest.raises(ValueError, match=r"report\.json at datasets/0/sources/entropy"):
        validate_report(broken)  # the contract can fail
    sources = ["head:head", "head:second", "entropy", "1-max_prob", "inverse_norm", "random"]
    assert [s["name"] for s in document["sources"]] == sources
    zs, upstream = document["datasets"]
    assert (zs["name"], zs["role"], upstream["role"]) == ("zs", "downstream", "upstream")
    assert zs["n"] == 300 and zs["classes"] == 4 and set(zs["sources"]) == set(sources)
    assert all(zs["sources"][s]["id_vs_ood_auroc"] is not None for s in sources)
    assert upstream["sources"]["head:head"]["id_vs_ood_auroc"] is None
    real = json.loads(
        (Path(timm.__file__).parent / "data/_info/imagenet_real_labels.json").read_text()
    )
    ambiguous = sum(len(labels) != 1 for labels in real[:200])
    assert upstream["ambiguity"] == {
        "origin": "imagenet_real", "ambiguous": ambiguous, "clear": 200 - ambiguous, "unknown": 0
    }  # fmt: skip
    assert zs["ambiguity"] is None
    assert document["tsne"]["classes"] == [0, 1, 2] and document["tsne"]["source"] == "head:head"
    page = SvgPoints()
    page.feed((report / "tsne.html").read_text())
    assert page.circles == document["tsne"]["points"] == len(page.titles)
    assert not page.external and not re.search(r"https?://", (report / "tsne.html").read_text())
    assert all(re.match(r"key: img-\d+\nlabel: [012]\nuncertainty: ", t) for t in page.titles)
    markdown = (report / "report.md").read_text()
    for section in ("R-AUROC and Recall@1", "Classifier AUROC", "Safe retrieval", "ID vs OOD",
                    "Human ambiguity", "Uncertainty-aware t-SNE"):  # fmt: skip
        assert f"## {section}" in markdown
    for figure in [*document["figures"], "tsne.html"]:
        assert (report / figure).stat().st_size > 1000
        assert f"]({figure})" in markdown


def run(*args: str) -> Any:
    """``pvu evaluate`` with ``args``; the CliRunner result."""
    return CliRunner().invoke(app, ["evaluate", *args])


def said(result: Any) -> str:
    """The command's output with the terminal's line wrapping undone."""
    return "".join(result.output.split())


def test_ambiguity_asked_for_but_absent_is_warned_of(tmp_path: Path, head_dir: str) -> None:
    """It was an info line: a run asking for the ambiguity analysis got none, with no word."""
    x, labels = clustered(120, 4, seed=3)
    clean = write_eval_cache(str(tmp_path / "clean"), x, labels)
    result = run(
        "--head", head_dir, "--dataset", f"clean={clean}", "--report", str(tmp_path / "r"),
        "--ambiguity", "column", "--tsne-points", "60",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    expected = "clean: --ambiguity column asked for, but it has none for its rows"
    assert expected.replace(" ", "") in said(result), result.output


def test_a_dataset_whose_retrievals_are_all_right_is_warned_of(
    tmp_path: Path, head_dir: str
) -> None:
    """A one-class cache (a label column of one value, -1 say) reported Recall@1 1.000 and
    R-AUROC n/a with no word naming it."""
    x, _ = clustered(60, 3, seed=4)
    one = write_eval_cache(str(tmp_path / "one"), x, np.zeros(60, dtype=np.int64))
    result = run("--head", head_dir, "--dataset", f"one={one}", "--report", str(tmp_path / "r"))
    assert result.exit_code == 0, result.output
    expected = "one: every row's nearest neighbour has its label (1 class): R-AUROC is n/a"
    assert expected.replace(" ", "") in said(result), result.output


def test_a_dataset_name_with_dollars_is_drawn_as_written(tmp_path: Path, head_dir: str) -> None:
    """matplotlib read 'cars $5$ and $x_$' as math: the report failed after all the work."""
    x, labels = clustered(60, 3, seed=5)
    cars = write_eval_cache(str(tmp_path / "cars"), x, labels)
    name = "cars $5$ and $x_$"
    result = run("--head", head_dir, "--dataset", f"{name}={cars}", "--report", str(tmp_path / "r"))
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "r" / "report.json").read_text())["datasets"][0]["name"] == name


def test_a_cache_still_being_written_is_named_in_the_report(tmp_path: Path, head_dir: str) -> None:
    """evaluate warned of a cache still being written, but report.md and report.json did not
    say so: a saved report gave no hint that it was made on part of its cache."""
    from pipeline.cache.lock import RunLock

    x, labels = clustered(60, 3, seed=5)
    cars = write_eval_cache(str(tmp_path / "cars"), x, labels)
    with RunLock(cars, owner="pvu cache"):  # a cache run writing it now
        result = run(
            "--head", head_dir, "--dataset", f"cars={cars}", "--report", str(tmp_path / "r")
        )
    assert result.exit_code == 0, result.output
    document = json.loads((tmp_path / "r" / "report.json").read_text())
    [incomplete] = document["incomplete_caches"]
    assert incomplete["url"] == cars and "still being written, by run" in incomplete["note"]
    said = " ".join((tmp_path / "r" / "report.md").read_text().split())
    assert f"Cache `{cars}` may be incomplete**: still being written, by run" in said
    result = run("--head", head_dir, "--dataset", f"cars={cars}", "--report", str(tmp_path / "r"))
    assert "incomplete_caches" not in json.loads((tmp_path / "r" / "report.json").read_text())


def test_tsne_classes_with_no_rows_name_the_flag(tmp_path: Path, head_dir: str) -> None:
    clean = write_eval_cache(str(tmp_path / "clean"), *clustered(120, 4, seed=3))
    result = run(
        "--head", head_dir, "--dataset", f"clean={clean}", "--report", str(tmp_path / "r"),
        "--tsne-classes", "99",
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "only0rowsin--tsne-classes[99]" in said(result), result.output
    result = run(
        "--head", head_dir, "--dataset", f"clean={clean}", "--report", str(tmp_path / "r"),
        "--tsne-classes", "0,1,99", "--tsne-points", "60",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "t-SNEofclean:--tsne-classes[99]holdnorowthere" in said(result), result.output


def test_progress_covers_safe_retrieval_and_bad_tsne_classes_stop_before_the_search(
    tmp_path: Path, head_dir: str
) -> None:
    """Safe retrieval's searches (as long as the 1-NN's) ran with no progress; --tsne-classes
    holding no row were refused only after the set's whole evaluation."""
    clean = write_eval_cache(str(tmp_path / "clean"), *clustered(120, 4, seed=3))
    done: dict[str, list[int]] = {}

    def track(description: str, total: int):
        done[description] = [0, total]
        return lambda n: done[description].__setitem__(0, done[description][0] + n)

    options = EvaluateOptions(heads=(head_dir,), datasets=(("clean", clean),), tsne_points=60)
    evaluate(options, track=track)
    assert done["safe retrieval clean"] == [10, 10]  # 1 head + 4 baselines, 2 variants each
    done.clear()
    with pytest.raises(ValueError, match=r"only 0 rows in --tsne-classes \[99\]"):
        evaluate(replace(options, tsne_classes=(99,)), track=track)
    assert "read clean" in done and "1-NN clean" not in done


def test_evaluation_runs_without_tf32(tmp_path: Path, head_dir: str, tf32_on) -> None:
    """The heads' uncertainties on a GPU ran as the process said (TF32 in NVIDIA's
    containers), unlike the CPU's. Checked by the settings the work runs under."""
    clean = write_eval_cache(str(tmp_path / "clean"), *clustered(60, 3, seed=3))
    seen = set()
    options = EvaluateOptions(heads=(head_dir,), datasets=(("clean", clean),), tsne_points=0)
    evaluate(options, track=lambda description, total: lambda n: seen.add(tf32_on()))
    assert seen == {("ieee", "ieee")} and tf32_on() == ("tf32", "tf32")


def test_a_deterioration_cache_given_twice_is_refused(tmp_path: Path, head_dir: str) -> None:
    """It was pooled twice into its strength, without a word."""
    clean = write_eval_cache(str(tmp_path / "clean"), *clustered(60, 3, seed=3))
    result = run(
        "--dataset", f"clean={clean}", "--report", str(tmp_path / "r"),
        "--deterioration", clean, "--deterioration", f"{clean}/.",
    )  # fmt: skip
    assert result.exit_code == 2 and "--deterioration:cache(s)giventwice:" in said(result)


def test_a_head_given_twice_is_refused_naming_it(tmp_path: Path, head_dir: str) -> None:
    """It was scored twice, as head:head#1 and head:head#2, two columns of the same numbers."""
    clean = write_eval_cache(str(tmp_path / "clean"), *clustered(60, 3, seed=3))
    report = tmp_path / "r"
    for twice, named in (
        (head_dir, f"head {head_dir} is given twice: give each head once"),
        (f"{head_dir}/", f"head {head_dir} is given twice (as {head_dir} and {head_dir}/)"),
    ):
        result = pvu(
            "evaluate", "--head", head_dir, "--head", twice, "--dataset", f"clean={clean}",
            "--report", str(report),
        )  # fmt: skip
        assert result.exit_code == 2 and f"--head: {named}" in result.text, result.output
    assert not report.exists()
    config = tmp_path / "evaluate.yaml"  # a config file's list, as the flags
    config.write_text(json.dumps({"head": [head_dir, head_dir], "dataset": [f"c={clean}"]}))
    result = pvu("evaluate", "--config", str(config), "--report", str(report))
    assert result.exit_code == 2 and f"head {head_dir} is given twice" in result.text, result.output


def test_a_report_url_of_no_known_protocol_names_the_flag(tmp_path: Path) -> None:
    clean = write_eval_cache(str(tmp_path / "clean"), *clustered(60, 3, seed=3))
    result = run("--dataset", f"clean={clean}", "--report", "foo://bucket/r")
    assert result.exit_code == 2, result.output
    assert "--reportfoo://bucket/r:Protocolnotknown:foo" in said(result), result.output


def test_the_random_baseline_does_not_depend_on_where_a_cache_lives(tmp_path: Path) -> None:
    """It was seeded by the set's name, a deteriorated cache's URL: moving the cache changed
    its report (and a test's median hung on pytest's temporary folder)."""
    x, labels = clustered(60, 3, seed=5)
    caches = [write_eval_cache(str(tmp_path / where), x, labels) for where in ("a", "b/c")]
    scores = [baseline_uncertainty("random", load_eval_set(url, url), seed=1) for url in caches]
    assert np.array_equal(*scores)
    other = write_eval_cache(str(tmp_path / "d"), x, labels, keys=[f"k{i}" for i in range(60)])
    moved = baseline_uncertainty("random", load_eval_set("d", other), seed=1)
    assert not np.array_equal(scores[0], moved)  # other rows, other draws


def test_deterioration_and_ambiguity_sections(tmp_path: Path, head_dir: str) -> None:
    x, labels = clustered(240, 4, seed=3)
    rng = np.random.default_rng(4)
    ambiguity = np.where(rng.random(240) < 0.3, rng.uniform(0.2, 1.0, 240), 0.0)
    ambiguity[:10] = np.nan  # unknown rows are left out, not counted as clear
    x_amb = x / (1.0 + 3.0 * np.nan_to_num(ambiguity))[:, None]  # ambiguous: smaller norm
    clean = write_eval_cache(str(tmp_path / "clean"), x_amb, labels, ambiguity=ambiguity)
    deteriorated = []
    for kind in ("blur", "noise"):
        for strength in (1.0, 2.0, 4.0):
            transform = {
                "is_training": False,
                "deterioration": {"kind": kind, "strength": strength},
            }
            url = str(tmp_path / f"{kind}-{strength}")
            write_eval_cache(url, x / (1 + strength), labels, transform=transform)
            deteriorated += ["--deterioration", url]
    result = run(
        "--head", head_dir, "--dataset", f"clean={clean}", "--report", str(tmp_path / "r"),
        "--deterioration", clean, *deteriorated, "--tsne-points", "60",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    document = json.loads((tmp_path / "r" / "report.json").read_text())
    validate_report(document)
    curves = document["deterioration"]["kinds"]
    assert sorted(curves) == ["blur", "noise"]
    for curve in curves.values():
        assert curve["strengths"] == [0.0, 1.0, 2.0, 4.0] and curve["n"] == [240] * 4
        assert len(set(curve["sources"]["random"]["median"])) == 4  # fresh draws per strength
        norm = curve["sources"]["inverse_norm"]
        assert norm["rises"] is True and norm["spearman"] == pytest.approx(1.0)
        assert curve["sources"]["random"]["median"][0] == pytest.approx(0.5, abs=0.1)
    entry = document["datasets"][0]
    flagged = ~np.isnan(ambiguity)
    assert entry["ambiguity"] == {
        "origin": "column",
        "ambiguous": int((ambiguity[flagged] > 0).sum()),
        "clear": int((ambiguity[flagged] == 0).sum()),
        "unknown": 10,
    }
    assert entry["sources"]["inverse_norm"]["ambiguity_auroc"] > 0.9
    assert "deterioration.png" in document["figures"]
    markdown = (tmp_path / "r" / "report.md").read_text()
    assert "## Deterioration" in markdown and "## Human ambiguity" in markdown


def test_every_auroc_ranks_the_uncertain_rows_first_as_scikit_learn_does(
    tmp_path: Path, head_dir: str
) -> None:
    """Each AUROC of the report, recomputed from the caches with the paper's orientation
    (higher uncertainty predicts the positive class): R-AUROC (1-NN wrong, by brute-force
    cosine search), classifier AUROC (pred != label), ID vs OOD (the downstream row) and human
    ambiguity (flag set). A sign flip anywhere would still pass the schema and the ranges."""
    x, labels = clustered(240, 4, seed=5)
    ambiguity = np.random.default_rng(6).random(240).astype(np.float32)
    ambiguity[::8] = np.nan  # unknown: left out of the ambiguity AUROC
    zs = write_eval_cache(str(tmp_path / "zs"), x, labels, ambiguity=ambiguity)
    up = write_eval_cache(str(tmp_path / "up"), *clustered(160, 4, seed=7))
    options = EvaluateOptions(
        heads=(head_dir,), datasets=(("zs", zs),), upstream=up, ambiguity_threshold=0.5
    )
    result = evaluate(options)
    entry = next(d for d in result.report["datasets"] if d["name"] == "zs")
    data = load_eval_set("zs", zs)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    wrong = labels[similarity.argmax(axis=1)] != labels
    known = ~np.isnan(ambiguity)
    for source, u in result.scores["zs"].items():
        got = entry["sources"][source]
        assert got["r_auroc"] == pytest.approx(roc_auc_score(wrong, u))
        assert got["classifier_auroc"] == pytest.approx(roc_auc_score(data.pred != labels, u))
        ood = np.r_[np.zeros(160, bool), np.ones(240, bool)]
        both = np.r_[result.scores["upstream"][source], u]
        assert got["id_vs_ood_auroc"] == pytest.approx(roc_auc_score(ood, both))
        flags = ambiguity[known] > 0.5
        assert got["ambiguity_auroc"] == pytest.approx(roc_auc_score(flags, u[known]))


def test_imagenet_validation_keys_get_real_flags() -> None:
    from pipeline.evaluate.analyses import real_ambiguous

    # ReaL labels of the first four validation images: [], [970, 795], [230, 231], [809]
    keys = [f"val/ILSVRC2012_val_{i:08d}" for i in (1, 2, 3, 4)]
    assert real_ambiguous(keys).tolist() == [True, True, True, False]
    assert real_ambiguous(["img-000001"]) is None
    assert real_ambiguous(["ILSVRC2012_val_00000000"]) is None  # read as image 50,000's


def test_refuses_inputs_naming_them(tmp_path: Path, head_dir: str) -> None:
    x, labels = clustered(50, 3, seed=5)
    train = write_eval_cache(str(tmp_path / "train"), x, labels, epochs=2)
    result = run("--head", head_dir, "--dataset", f"t={train}", "--report", str(tmp_path / "r"))
    assert result.exit_code == 2 and f"{train}holds2epochs" in said(result)
    other = str(tmp_path / "other-head")
    export_head(
        create_head(HeadConfig(embedding_dim=DIM, hidden=(4,)), seed=0),
        other, loss="ranking", backbone="vit_base_patch16_224", weights_digest="sha256:x",
    )  # fmt: skip
    ok = write_eval_cache(str(tmp_path / "ok"), x, labels)
    result = run("--head", other, "--dataset", f"ok={ok}", "--report", str(tmp_path / "r"))
    assert result.exit_code == 2 and f"head{other}wastrainedforbackbone" in said(result)
    assert "'vit_base_patch16_224',butcache" in said(result) and "Traceback" not in result.output
    moved = write_eval_cache(
        str(tmp_path / "m"), x, labels, backbone={**BACKBONE, "weights_digest": "b"}
    )
    result = run(
        "--dataset", f"ok={ok}", "--dataset", f"m={moved}", "--report", str(tmp_path / "r")
    )
    assert result.exit_code == 2 and f"m:cache{moved}hasweights_digest'b'" in said(result)
    result = run("--dataset", f"ok={ok}", "--tsne-dataset", "nosuch", "--report", "r")
    assert result.exit_code == 2 and "--tsne-dataset'nosuch'isnoneofthedatasets(ok)" in said(result)
    result = run("--dataset", "no-equals-sign", "--report", str(tmp_path / "r"))
    assert result.exit_code == 2 and "NAME=CACHE_URL" in said(result)
    result = run("--dataset", f"gone={tmp_path / 'missing'}", "--report", str(tmp_path / "r"))
    named = f"--datasetgone={tmp_path / 'missing'}doesnotexist"  # the flag and the path
    assert result.exit_code == 2 and named in said(result)


def test_a_head_of_other_images_than_the_caches_is_warned_of(tmp_path: Path) -> None:
    """A head trained at 64 px scored a 224 px cache's embeddings without a word (attach warns
    of the same)."""
    x, labels = clustered(40, 3, seed=7)
    image = {"input_size": [3, 64, 64], "mean": [0.5] * 3, "std": [0.5] * 3}
    head = str(tmp_path / "head")
    export_head(
        create_head(HeadConfig(embedding_dim=DIM, hidden=(4,)), seed=0),
        head, loss="ranking", image_input=image, **BACKBONE,
    )  # fmt: skip
    for size in (64, 224):
        transform = {"is_training": False, **image, "input_size": [3, size, size]}
        cache = write_eval_cache(str(tmp_path / f"c{size}"), x, labels, transform=transform)
        result = run("--head", head, "--dataset", f"d={cache}", "--report", str(tmp_path / "r"))
        assert result.exit_code == 0, result.output
        assert ("learnedfrom" in said(result)) == (size != 64), result.output
    assert '[3,64,64],"mean"' in said(result) and f"butcache{cache}(d)holds" in said(result)
    assert '{"input_size":[3,224,224]' in said(result)
    document = json.loads((tmp_path / "r" / "report.json").read_text())  # the 224 px run's
    validate_report(document)
    assert document["sources"][0]["input"] == image
    assert document["datasets"][0]["input"]["input_size"] == [3, 224, 224]
    markdown = (tmp_path / "r" / "report.md").read_text()
    assert "learned from 3x64x64 images (mean [0.5, 0.5, 0.5], std [0.5, 0.5, 0.5]); d" in markdown


def test_every_input_is_checked_before_any_row_is_read(tmp_path: Path, head_dir: str) -> None:
    """A cache of another backbone, or one the head does not fit, given last was found only
    after every cache before it had been read and evaluated."""
    from jobs.run.evaluate import EvaluateJobConfig
    from pipeline.evaluate.runner import evaluate

    x, labels = clustered(60, 3, seed=11)
    ok = write_eval_cache(str(tmp_path / "ok"), x, labels)
    other = write_eval_cache(
        str(tmp_path / "other"), x, labels, backbone={**BACKBONE, "weights_digest": "b"}
    )
    wide = write_eval_cache(str(tmp_path / "wide"), np.hstack([x, x]), labels)
    train = write_eval_cache(str(tmp_path / "train"), x, labels, transform={"is_training": True})
    two = write_eval_cache(str(tmp_path / "two"), x, labels, epochs=2)  # was read after ok
    read: list[str] = []
    cases = [(other, "weights_digest 'b'"), (wide, f"expects {DIM}-d embeddings")]
    cases += [(two, "holds 2 epochs")]
    for last, words in [*cases, (train, "written with the train transform")]:
        config = EvaluateJobConfig(
            dataset=[f"ok={ok}", f"last={last}"], head=[head_dir], report=str(tmp_path / "r")
        )
        with pytest.raises(ValueError, match=words):
            evaluate(config.to_options(), track=lambda what, total: read.append(what))
    assert read == []


def test_a_set_too_small_to_search_is_refused_before_any_row_is_read(
    tmp_path: Path, head_dir: str
) -> None:
    """An upstream (or later dataset) cache of one row was refused only after every dataset
    before it had been read and searched; deteriorated copies, never searched, may be that
    small."""
    from jobs.run.evaluate import EvaluateJobConfig

    x, labels = clustered(60, 3, seed=11)
    ok = write_eval_cache(str(tmp_path / "ok"), x, labels)
    one = write_eval_cache(str(tmp_path / "one"), x[:1], labels[:1], shards=1)
    read: list[str] = []
    config = EvaluateJobConfig(
        dataset=[f"ok={ok}"], upstream=one, head=[head_dir], report=str(tmp_path / "r")
    )
    with pytest.raises(ValueError, match=r"upstream: cache .*one has 1 row, Recall@1 needs 2"):
        evaluate(
            config.to_options(), track=lambda what, total: read.append(what) or (lambda n: None)
        )
    assert read == []
    config = EvaluateJobConfig(
        dataset=[f"ok={ok}"], deterioration=[ok, one], head=[head_dir], report=str(tmp_path / "r")
    )
    evaluate(config.to_options())


def test_a_deterioration_cache_of_no_finite_row_is_refused(tmp_path: Path, head_dir: str) -> None:
    """Its curve point had no rows: NaN medians, numpy's warnings, and "rises: false" for a
    curve whose Spearman's rho is undefined."""
    x, labels = clustered(60, 3, seed=3)
    clean = write_eval_cache(str(tmp_path / "clean"), x, labels)
    blur = {"is_training": False, "deterioration": {"kind": "blur", "strength": 0.5}}
    broken = write_eval_cache(str(tmp_path / "blur"), x * np.nan, labels, transform=blur)
    result = run(
        "--head", head_dir, "--dataset", f"d={clean}", "--deterioration", clean,
        "--deterioration", broken, "--report", str(tmp_path / "r"),
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert f"--deteriorationcache{broken}:everyoneofits60rowshasaNaN/inf" in said(result)


def test_a_report_that_cannot_be_written_names_its_folder(tmp_path: Path, head_dir: str) -> None:
    ok = write_eval_cache(str(tmp_path / "ok"), *clustered(60, 3, seed=7))
    report = tmp_path / "r"
    report.mkdir()
    (report / "r_auroc.png").symlink_to("/dev/full")  # its writes fail with ENOSPC
    (report / "report.json").write_text('{"figures": ["r_auroc.png"]}')  # an earlier run's
    result = run("--head", head_dir, "--dataset", f"ok={ok}", "--report", str(report))
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert f"write file://{report}/r_auroc.png failed" in " ".join(result.output.split())
    assert "Nospaceleftondevice" in said(result)
    # the earlier report.json would list the figures of two runs: it is gone
    assert not (report / "report.json").exists()


def test_a_report_folder_that_is_a_file_is_refused_before_the_work(
    tmp_path: Path, head_dir: str
) -> None:
    """It was found only when the report was written, after the whole evaluation."""
    ok = write_eval_cache(str(tmp_path / "ok"), *clustered(60, 3, seed=7))
    (tmp_path / "file").write_text("")
    for report, words in [("file", "isafile;giveafolder"), ("file/r", "cannotcreatethefolder")]:
        result = run("--dataset", f"ok={ok}", "--report", str(tmp_path / report))
        assert result.exit_code == 2 and f"--report{tmp_path / report}" in said(result)
        assert words in said(result) and "━" not in result.output  # before any progress bar


@pytest.mark.parametrize(
    ("flag", "value", "words"),
    [
        ("--ambiguity-threshold", "nan", "finitenumber"),
        ("--ambiguity-threshold", "inf", "finitenumber"),
        ("--seed", str(2**32), "lessthanorequalto4294967295"),
    ],
)
def test_settings_the_report_cannot_hold_are_refused_before_the_work(
    tmp_path: Path, flag: str, value: str, words: str
) -> None:
    """A non-finite --ambiguity-threshold was refused only when report.json was validated,
    after the whole evaluation ("invalid report.json at settings/ambiguity_threshold"), and a
    --seed over 2**32 - 1 failed in the t-SNE, naming scikit-learn's random_state."""
    ok = write_eval_cache(str(tmp_path / "ok"), *clustered(60, 3, seed=7))
    result = run("--dataset", f"ok={ok}", "--report", str(tmp_path / "r"), f"{flag}={value}")
    assert result.exit_code == 2, result.output
    assert flag in said(result) and words in said(result), result.output
    assert "━" not in result.output and not (tmp_path / "r").exists()


def test_a_unit_rewritten_after_it_was_indexed_is_named(tmp_path: Path) -> None:
    """A unit rewritten between the index and its read (a pvu cache run's duplicate-key pass)
    failed as a damaged file ('delete it'), sending the user to delete a good unit."""
    url = write_eval_cache(str(tmp_path / "c"), *clustered(60, 3, seed=7))
    other = write_eval_cache(str(tmp_path / "o"), *clustered(90, 3, seed=8))
    index = open_cache([url], need_loss=False)
    unit = Path(index.files[0].url)
    unit.write_bytes(sorted(Path(other).rglob("*.parquet"))[0].read_bytes())
    with pytest.raises(ValueError, match=f"cache unit {unit} was rewritten or removed after"):
        read_eval_set("c", url, index)


@pytest.mark.parametrize("flag", ["--report", "--upstream"])
def test_an_empty_url_is_refused(tmp_path: Path, flag: str, monkeypatch: Any) -> None:
    """``--report ""`` wrote the report into the working folder and said it was at
    "/report.md"; ``--upstream ""`` (an unset variable) silently dropped the ID vs OOD
    analysis."""
    ok = write_eval_cache(str(tmp_path / "ok"), *clustered(60, 3, seed=7))
    monkeypatch.chdir(tmp_path)
    args = {"--report": str(tmp_path / "r"), flag: ""}
    result = run("--dataset", f"ok={ok}", *(f"{k}={v}" for k, v in args.items()))
    assert result.exit_code == 2, result.output
    assert f"{flag}:''isempty" in said(result), result.output
    assert not list(tmp_path.glob("report.*")) and not (tmp_path / "r").exists()


def test_a_report_rewritten_keeps_no_figure_of_the_earlier_run(
    tmp_path: Path, head_dir: str
) -> None:
    """A second run into the same folder left the first's id_vs_ood.png beside its report."""
    ok = write_eval_cache(str(tmp_path / "ok"), *clustered(90, 3, seed=8))
    up = write_eval_cache(str(tmp_path / "up"), *clustered(90, 3, seed=9))
    report = tmp_path / "r"
    first = run("--dataset", f"ok={ok}", "--upstream", up, "--report", str(report))
    assert first.exit_code == 0 and (report / "id_vs_ood.png").exists(), first.output
    (report / "notes.txt").write_text("mine")
    second = run("--dataset", f"ok={ok}", "--report", str(report), "--tsne-points", "30")
    assert second.exit_code == 0, second.output
    figures = json.loads((report / "report.json").read_text())["figures"]
    assert "id_vs_ood.png" not in figures and not (report / "id_vs_ood.png").exists()
    assert sorted(p.name for p in report.iterdir()) == sorted(
        [*figures, "tsne.html", "report.json", "report.md", "notes.txt"]
    )
    # another tool's report.json names files pvu never wrote: none is removed, none stops it
    (report / "report.json").write_text(json.dumps({"figures": ["notes.txt", "sub.png"]}))
    (report / "sub.png").mkdir()
    third = run("--dataset", f"ok={ok}", "--report", str(report))
    assert third.exit_code == 0 and (report / "notes.txt").exists(), third.output


def test_rows_without_a_finite_baseline_are_dropped_and_counted(
    tmp_path: Path, head_dir: str
) -> None:
    """NaN in a cache's entropy (a cache from another tool) ended the run with 'Input
    contains NaN.', naming nothing; rows are now dropped as NaN embeddings are."""
    x, labels = clustered(90, 3, seed=10)
    x[0] = np.nan
    url = write_eval_cache(str(tmp_path / "nan"), x, labels, shards=1)
    unit = next((tmp_path / "nan").glob("epoch=0000/*.parquet"))
    table = pq.read_table(unit)
    entropy = table.column("entropy").to_numpy().copy()
    entropy[[3, 4]] = np.nan
    index = table.schema.get_field_index("entropy")
    table = table.set_column(index, table.schema.field("entropy"), pa.array(entropy))
    pq.write_table(table, unit, **PARQUET_OPTIONS)
    report = tmp_path / "r"
    result = run("--head", head_dir, "--dataset", f"nan|set={url}", "--report", str(report))
    assert result.exit_code == 0, result.output
    entry = json.loads((report / "report.json").read_text())["datasets"][0]
    assert entry["n"] == 87 and entry["dropped_rows"] == 3
    assert "dropped3rowswithaNaN/infembedding,max_proborentropy" in said(result)
    assert "repeatakey" not in said(result)
    markdown = (report / "report.md").read_text()
    left_out = "Rows left out of every figure below (a NaN or inf embedding, max_prob or entropy)"
    assert f"{left_out}: nan|set 3." in markdown  # report.md gave n 87 alone
    row = next(line for line in markdown.splitlines() if line.startswith("| nan"))
    assert row.startswith("| nan\\|set |")  # a '|' in a name kept the table's columns


def test_repeated_keys_are_warned_about(tmp_path: Path) -> None:
    """Rows cached twice (a cache from another tool) are each other's 1-NN: Recall@1 rose
    from 0.78 to 0.97 in the audit, with no word."""
    x, labels = clustered(60, 3, seed=12)
    keys = [f"img-{i % 50:06d}" for i in range(60)]
    url = write_eval_cache(str(tmp_path / "twice"), x, labels, keys=keys)
    result = run("--dataset", f"twice={url}", "--report", str(tmp_path / "r"))
    assert result.exit_code == 0 and "10rowsrepeatingakey" in said(result), result.output


@pytest.mark.slow
def test_reads_caches_from_s3_and_writes_the_report_there(
    s3_bucket: str, tmp_path: Path, head_dir: str
) -> None:
    """A --report URL (as the cluster README shows) was written to a local folder 's3:'."""
    x, labels = clustered(120, 3, seed=6)
    url = write_eval_cache(f"{s3_bucket}/caches/s3set", x, labels)
    report = f"{s3_bucket}/reports/r"
    result = run("--head", head_dir, "--dataset", f"s3set={url}", "--report", report)
    assert result.exit_code == 0, result.output
    fs, root = fsspec.core.url_to_fs(report)
    document = json.loads(fs.cat_file(f"{root}/report.json"))
    entry = document["datasets"][0]
    assert entry["n"] == 120 and entry["url"] == url
    assert fs.size(f"{root}/{document['figures'][0]}") > 1000 and fs.exists(f"{root}/report.md")
    assert not Path("s3:").exists()


def test_refuses_a_damaged_cache_naming_the_unit(tmp_path: Path) -> None:
    from pipeline.demo.synthetic import SyntheticCache, write_synthetic_cache

    url = str(tmp_path / "damaged")
    write_synthetic_cache(url, SyntheticCache(dim=DIM, epochs=1, shards=2, samples_per_shard=20))
    unit = tmp_path / "damaged" / "epoch=0000" / "shard-00001.parquet"
    unit.write_bytes(unit.read_bytes()[:-100])
    result = run("--dataset", f"d={url}", "--report", str(tmp_path / "r"))
    assert result.exit_code == 2 and "epoch=0000/shard-00001.parquet" in said(result)


def test_an_earlier_report_that_storage_will_not_delete_stops_the_report(
    s3_bucket: str, fault_proxy: Any, head_dir: str
) -> None:
    """A bucket that takes writes but refuses deletes kept the earlier report.json (every
    error of its removal was ignored): a run that then died part-way left it beside new
    figures, reading as complete."""
    x, labels = clustered(60, 3, seed=8)
    url = write_eval_cache(f"{s3_bucket}/caches/d", x, labels)
    report = f"{s3_bucket}/reports/kept"
    assert run("--head", head_dir, "--dataset", f"d={url}", "--report", report).exit_code == 0
    fault_proxy.deny(r"/reports/kept/report\.json|\?delete", methods=["DELETE", "POST"])
    result = run("--head", head_dir, "--dataset", f"d={url}", "--report", report)
    assert result.exit_code == 2, result.output
    assert f"write the report into {report}" in " ".join(result.output.split())


def test_deterioration_caches_of_two_decodes_are_refused(tmp_path: Path, head_dir: str) -> None:
    """A clean cache decoded on the device beside Pillow-decoded deteriorated copies (the only
    kind there is) was taken: the curve's strength 0 was other images, ~0.3 levels apart."""
    x, labels = clustered(60, 3, seed=3)
    clean = write_eval_cache(
        str(tmp_path / "clean"), x, labels, transform={"is_training": False, "decode": "device"}
    )
    noisy = {"is_training": False, "deterioration": {"kind": "noise", "strength": 1.0}}
    noise = write_eval_cache(str(tmp_path / "noise"), x, labels, transform=noisy)
    result = run(
        "--dataset", f"clean={clean}", "--report", str(tmp_path / "r"),
        "--deterioration", clean, "--deterioration", noise,
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert f"decodedtwoways(device:{clean};pil:{noise})" in said(result)


def test_a_second_run_into_the_same_report_is_refused_naming_the_first(
    tmp_path: Path, head_dir: str
) -> None:
    """evaluate took no lock: two runs into one --report both wrote, their files interleaved
    (one's report.json listing the other's figures)."""
    from pipeline.cache.lock import LOCK_NAME, RunLock

    ok = write_eval_cache(str(tmp_path / "ok"), *clustered(60, 3, seed=7))
    report = tmp_path / "r"
    args = ["--head", head_dir, "--dataset", f"ok={ok}", "--report", str(report)]
    first = run(*args, "--tsne-points", "30")
    assert first.exit_code == 0, first.output
    assert not (report / LOCK_NAME).exists(), "a finished run leaves no lock"

    def files() -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in report.iterdir()}

    with RunLock(str(report), owner="pvu evaluate --report r --seed 7"):
        before = files()
        second = run(*args)
        assert files() == before, "the refused run changed the report folder"
    assert second.exit_code == 2, second.output
    text = " ".join(second.output.split())
    assert "another pvu run is writing to" in text and "--seed 7" in text, second.output


def test_a_refused_run_leaves_no_report_folder_it_created(tmp_path: Path) -> None:
    """The lock creates --report as the run starts: a head of another backbone, refused after
    it, left an empty report folder behind."""
    x, labels = clustered(50, 3, seed=5)
    ok = write_eval_cache(str(tmp_path / "ok"), x, labels)
    other = str(tmp_path / "other-head")
    export_head(
        create_head(HeadConfig(embedding_dim=DIM, hidden=(4,)), seed=0),
        other, loss="ranking", backbone="vit_base_patch16_224", weights_digest="sha256:x",
    )  # fmt: skip
    report = tmp_path / "r"
    result = run("--head", other, "--dataset", f"ok={ok}", "--report", str(report))
    assert result.exit_code == 2 and "wastrainedforbackbone" in said(result), result.output
    assert not report.exists()
    report.mkdir()  # the user's own folder, empty: kept
    result = run("--head", other, "--dataset", f"ok={ok}", "--report", str(report))
    assert result.exit_code == 2 and report.is_dir(), result.output


def test_safe_retrieval_that_rejects_no_row_says_so(tmp_path: Path, head_dir: str) -> None:
    """Classes of fewer than 1 / --reject-fraction rows reject none per class (floor(q n_c)):
    the report gave every source a +0% reduction under '0.1 most uncertain rejected', as if
    no uncertainty helped retrieval, with no word that nothing had been rejected."""
    x, _ = clustered(60, 30, seed=13)
    pairs = write_eval_cache(str(tmp_path / "pairs"), x, np.arange(60) // 2)  # 2 rows a class
    report = tmp_path / "r"
    result = run("--head", head_dir, "--dataset", f"pairs={pairs}", "--report", str(report))
    assert result.exit_code == 0, result.output
    expected = "pairs: safe retrieval (per-class) rejects no row: --reject-fraction 0.1 of its "
    expected += "largest class's 2 rows rounds down to 0"
    assert expected.replace(" ", "") in said(result), result.output
    assert "(class-agnostic)rejectsnorow" not in said(result)
    markdown = (report / "report.md").read_text()
    per_class, agnostic = markdown.split("### per-class\n")[1].split("### class-agnostic\n")
    assert "Rows rejected: pairs 0 of 60." in per_class
    assert "Rows rejected: pairs 6 of 60." in agnostic


def test_a_unit_file_given_as_a_cache_is_named_a_file(tmp_path: Path) -> None:
    """A unit's path as --dataset (or train-head's --cache) ended in 'read .../x.parquet/
    _lock.json failed: NotADirectoryError', the readers' lock check reading under the file."""
    write_eval_cache(str(tmp_path / "ok"), *clustered(60, 3, seed=7))
    unit = str(next((tmp_path / "ok").glob("epoch=0000/*.parquet")))
    result = run("--dataset", f"ok={unit}", "--report", str(tmp_path / "r"))
    assert result.exit_code == 2, result.output
    assert f"{unit}isafile,notacache:givethecache'sfolder" in said(result), result.output
    with pytest.raises(ValueError, match="is a file, not a cache"):
        open_cache([unit], need_loss=True)  # train-head reads through it too


@pytest.mark.slow
def test_a_unit_or_manifest_url_on_s3_given_as_a_cache_is_named_a_file(s3_bucket: str) -> None:
    """On S3 (no NotADirectoryError) a unit's or the manifest's URL as --dataset or train-head's
    --cache was refused as 'cache ... is empty: it has no committed Parquet unit'."""
    write_eval_cache(f"{s3_bucket}/ok", *clustered(60, 3, seed=7))
    fs, root = fsspec.core.url_to_fs(s3_bucket)
    unit = fs.unstrip_protocol(fs.glob(f"{root}/ok/epoch=0000/*.parquet")[0])
    fs.pipe_file(f"{root}/ok/_manifest.json", b"{}")  # only its URL is given, never read
    for url in (unit, f"{s3_bucket}/ok/_manifest.json"):
        result = run("--dataset", f"ok={url}", "--report", f"{s3_bucket}/r")
        assert result.exit_code == 2, result.output
        assert f"{url}isafile,notacache:givethecache'sfolder" in said(result), result.output
        with pytest.raises(ValueError, match="is a file, not a cache"):
            open_cache([url], need_loss=True)  # train-head reads through it too
    # a key that is an object and the prefix of a cache's units too is the cache (no manifest)
    write_eval_cache(f"{s3_bucket}/both", *clustered(60, 3, seed=7))
    fs.rm(f"{root}/both/_manifest.json")
    fs.pipe_file(f"{root}/both", b"an object of the cache's name")
    assert open_cache([f"{s3_bucket}/both"]).rows == 60
