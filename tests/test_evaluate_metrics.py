"""Recall@1, R-AUROC and safe retrieval against scikit-learn, on random and adversarial data."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score
from sklearn.neighbors import NearestNeighbors

from pipeline.evaluate import figures, knn, sources
from pipeline.evaluate.analyses import DeterioratedSet, deterioration_curves
from pipeline.evaluate.evalset import EvalSet
from pipeline.evaluate.knn import TIE_TOLERANCE, nearest_neighbours, normalize
from pipeline.evaluate.metrics import neighbour_correct, r_auroc, recall_at_1
from pipeline.evaluate.report import _slug
from pipeline.evaluate.retrieval import most_uncertain, retrieval_errors
from pipeline.evaluate.runner import EvaluateOptions, _tsne, _tsne_rows
from pipeline.evaluate.sources import baseline_uncertainty
from pipeline.evaluate.tsne import TsnePoints, point_style


def reference_neighbours(x: np.ndarray, queries: np.ndarray, database: np.ndarray) -> np.ndarray:
    """1-NN by scikit-learn (brute cosine) with the documented rule: the query excluded by
    index, similarities within TIE_TOLERANCE tied, lowest row index wins; -1 if none."""
    rows = np.flatnonzero(database)
    out = np.full(len(queries), -1)
    if len(rows) == 0:
        return out
    k = len(rows)
    search = NearestNeighbors(n_neighbors=k, metric="cosine", algorithm="brute").fit(x[rows])
    distance, found = search.kneighbors(x[queries])
    for i, q in enumerate(queries):
        candidates = rows[found[i]]
        similarity = 1.0 - distance[i]
        other = candidates != q
        if not other.any():
            continue
        best = similarity[other].max()
        tied = other & (similarity >= best - TIE_TOLERANCE)
        out[i] = candidates[tied].min()
    return out


def datasets() -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Embeddings, labels, uncertainties: random, and each adversarial case of the issue."""
    rng = np.random.default_rng(0)
    cases = {}
    x = rng.standard_normal((400, 24)).astype(np.float32)
    labels = rng.integers(0, 6, 400)
    cases["random"] = (x, labels, rng.random(400))
    dup = x.copy()
    dup[100:150] = dup[0:50]  # exact duplicates: same label for some, another for others
    dup_labels = labels.copy()
    dup_labels[100:125] = labels[0:25]
    dup[200:210] = dup[5]  # one point repeated eleven times
    cases["duplicates"] = (dup, dup_labels, rng.random(400))
    cases["tied_uncertainties"] = (x, labels, np.round(rng.random(400), 1))
    cases["one_class"] = (x, np.zeros(400, int), rng.random(400))
    single = labels.copy()
    single[7] = 99  # a class with a single member: its 1-NN is always wrong
    cases["single_member_class"] = (x, single, rng.random(400))
    return cases


CASES = datasets()


def test_huge_embeddings_normalize_as_small_ones_do() -> None:
    """float32 squares of values over ~1e18 overflowed: every row became zeros, every query's
    neighbour row 0, and Recall@1 and R-AUROC meaningless, with no word."""
    x = np.random.default_rng(0).standard_normal((50, 96)).astype(np.float32)
    np.testing.assert_allclose(normalize(x * np.float32(3e18)), normalize(x), rtol=1e-6)
    small = nearest_neighbours(normalize(x)).index
    assert (nearest_neighbours(normalize(x * np.float32(3e18))).index == small).all()


@pytest.mark.parametrize("case", list(CASES))
def test_recall_and_r_auroc_match_scikit_learn(case: str) -> None:
    x, labels, uncertainty = CASES[case]
    every = np.arange(len(x))
    found = nearest_neighbours(normalize(x), block_bytes=4 * len(x) * 37)  # several blocks
    expected = reference_neighbours(x, every, np.ones(len(x), bool))
    np.testing.assert_array_equal(found.index, expected)
    correct = labels[expected] == labels
    assert recall_at_1(labels, found.index) == pytest.approx(correct.mean())
    got = r_auroc(uncertainty, neighbour_correct(labels, found.index))
    if correct.all():
        assert got is None  # one class of outcome: AUROC undefined, reported as null
    else:
        assert got == pytest.approx(roc_auc_score(correct, -uncertainty))


def test_duplicates_are_neighbours_but_never_the_query_itself() -> None:
    x, _, _ = CASES["duplicates"]
    found = nearest_neighbours(normalize(x))
    assert (found.index != np.arange(len(x))).all()
    # row 5 is repeated at 105 and 200-209: each copy finds the lowest other copy
    assert found.index[5] == 105 and found.index[105] == 5 and found.index[201] == 5
    np.testing.assert_allclose(found.similarity[200:210], 1.0, atol=1e-6)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("per_class", [True, False])
def test_safe_retrieval_matches_scikit_learn(case: str, per_class: bool) -> None:
    x, labels, uncertainty = CASES[case]
    q = 0.1
    unit = normalize(x)
    full = nearest_neighbours(unit)
    rejected = most_uncertain(uncertainty, q, labels if per_class else None)
    errors = retrieval_errors(unit, labels, full, rejected, block_bytes=4 * len(x) * 7)
    kept = np.flatnonzero(~rejected)
    every = np.arange(len(x))
    all_db = reference_neighbours(x, every, np.ones(len(x), bool))
    clean_db = reference_neighbours(x, kept, ~rejected)
    assert errors["queries"] == len(kept)
    assert errors["full"] == pytest.approx(np.mean(labels[all_db] != labels))
    assert errors["clean_queries"] == pytest.approx(np.mean(labels[all_db[kept]] != labels[kept]))
    assert errors["clean_database"] == pytest.approx(np.mean(labels[clean_db] != labels[kept]))


def test_the_clean_database_search_keeps_to_the_block_budget(monkeypatch) -> None:
    """It ran with the default 256 MiB block whatever --block-mb said, on a gathered copy of
    the rows kept: a GPU short of memory ran out though the user lowered --block-mb."""
    rng = np.random.default_rng(3)
    unit = normalize(rng.normal(size=(500, 8)).astype(np.float32))
    labels = rng.integers(0, 4, 500)
    full = nearest_neighbours(unit)
    blocks, chunk = [], knn.query_chunk

    def counted(rows: int, *, block_bytes: int) -> int:
        blocks.append(4 * rows * chunk(rows, block_bytes=block_bytes))  # float32 similarities
        return blocks[-1] // (4 * rows)

    monkeypatch.setattr(knn, "query_chunk", counted)
    budget = 4 * 500 * 16
    retrieval_errors(unit, labels, full, most_uncertain(rng.random(500), 0.2), block_bytes=budget)
    assert blocks and max(blocks) <= budget


def test_rejection_counts_follow_the_protocol() -> None:
    labels = np.repeat([0, 1, 2], [20, 9, 1])
    uncertainty = np.r_[np.arange(20), np.full(9, 5.0), [100.0]]
    per_class = most_uncertain(uncertainty, 0.1, labels)
    assert per_class[:20].sum() == 2 and per_class[18:20].all()  # floor(0.1 * 20)
    assert per_class[20:29].sum() == 0 and not per_class[29]  # floor(0.9) = 0: kept
    overall = most_uncertain(uncertainty, 0.1)
    assert overall.sum() == 3 and overall[29] and overall[18:20].all()
    tied = most_uncertain(np.zeros(10), 0.3)
    assert tied.sum() == 3
    np.testing.assert_array_equal(tied, most_uncertain(np.zeros(10), 0.3))  # seeded


def test_a_constant_source_gains_nothing_from_row_order() -> None:
    """Rows sorted with the wrong 1-NN last: a constant uncertainty must not reject exactly
    them (a tie rule by row did, and reported a large gain for a source that ranks nothing)."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(600, 8)).astype(np.float32)
    labels = rng.integers(0, 3, 600)
    unit = normalize(x)
    full = nearest_neighbours(unit)
    wrong_last = np.argsort(labels[full.index] != labels, kind="stable")
    unit, labels = unit[wrong_last], labels[wrong_last]
    full = nearest_neighbours(unit)
    errors = retrieval_errors(unit, labels, full, most_uncertain(np.zeros(600), 0.2))
    assert errors["full"] > 0.4
    assert errors["clean_queries"] == pytest.approx(errors["full"], abs=0.05)


def test_a_query_with_no_database_left_counts_as_wrong() -> None:
    x = np.eye(3, dtype=np.float32)
    found = nearest_neighbours(x, database=np.array([True, False, False]))
    assert found.index.tolist() == [-1, 0, 0]
    assert not neighbour_correct(np.zeros(3, int), found.index)[0]


def _eval_set(embedding: np.ndarray) -> EvalSet:
    n = len(embedding)
    zeros = np.zeros(n, np.float32)
    labels = np.arange(n) % 2
    keys = np.array([f"k{i}" for i in range(n)])
    return EvalSet("same", "c", keys, labels, embedding, zeros, labels, zeros + 1, zeros, {})


def test_identical_or_zero_embeddings_skip_the_map_and_rank_as_most_uncertain(caplog) -> None:
    """scikit-learn's t-SNE killed the process (SIGSEGV) on identical rows; a zero row's
    inverse norm was inf, which every metric refused ('Input contains infinity')."""
    same = _eval_set(np.ones((20, 8), np.float16))
    options = EvaluateOptions(heads=(), datasets=(("same", "c"),))
    rows = _tsne_rows(same, options)
    assert rows is not None and _tsne(same, rows, {"entropy": same.entropy}, [], 0) is None
    assert "hold 1 distinct non-zero embedding, too few for a t-SNE map" in caplog.text
    embedding = np.random.default_rng(0).normal(size=(20, 8)).astype(np.float16)
    embedding[3] = 0
    scores = baseline_uncertainty("inverse_norm", _eval_set(embedding))
    assert np.isfinite(scores).all() and scores.argmax() == 3


def test_figure_names_of_datasets_never_collide() -> None:
    names = ["a.b", "a_b", "a b", "plain-1"]
    assert len({_slug(name) for name in names}) == 4 and _slug("plain-1") == "plain-1"
    long = ["x" * 300, "x" * 299]  # the figure's write failed after all the work
    assert all(len(_slug(name)) < 80 for name in long) and _slug(long[0]) != _slug(long[1])


def test_deteriorated_copies_of_several_datasets_are_pooled_per_strength() -> None:
    """Blurred copies of two datasets, each rising with strength, one of higher uncertainty:
    each cache was a point of its own (strengths 0, 0, 0.5, 0.5, 1, 1), the curve a saw-tooth
    with rho 0.49 for a source that rises on both; the paper takes medians over datasets."""
    rng = np.random.default_rng(0)
    sets = [
        DeterioratedSet(kind, strength, {"head": base + strength + 0.01 * rng.random(50)})
        for base in (0.0, 3.0)
        for kind, strength in ((None, 0.0), ("blur", 0.5), ("blur", 1.0))
    ]
    [curve] = deterioration_curves(sets).values()
    assert curve["strengths"] == [0.0, 0.5, 1.0] and curve["n"] == [100, 100, 100]
    assert curve["sources"]["head"]["spearman"] == pytest.approx(1.0)
    pooled = [
        np.median(np.r_[sets[i].scores["head"], sets[i + 3].scores["head"]]) for i in range(3)
    ]
    assert curve["sources"]["head"]["median"] == pytest.approx(pooled)


def test_points_of_equal_uncertainty_look_alike_on_the_map() -> None:
    """60 saturated rows of entropy 0 were drawn in 60 sizes by row order (ranks by a stable
    sort), as if they differed; a NaN is the most uncertain."""
    uncertainty = np.r_[np.zeros(6), np.full(3, 1.5), 0.7, np.nan]
    area, alpha = point_style(uncertainty)
    assert len(set(area[:6])) == 1 and len(set(alpha[:6])) == 1 and len(set(area[6:9])) == 1
    assert area[:6].max() < area[9] < area[6] < area[10] and alpha[10] < alpha[6]


def test_the_clean_database_follows_the_tie_rule_when_a_tied_row_is_removed() -> None:
    """Rows at cosine 0.5, 0.5000008, 0.5000015 to a query: its neighbour is row 2 (tied with
    row 3, the lower index). With row 3 rejected the best is row 2's, tied with row 1: by the
    rule the neighbour is row 1, but the query kept row 2, which was not removed."""
    cosines = np.array([0.5, 0.5 + 8e-7, 0.5 + 15e-7], np.float64)
    x = np.zeros((4, 4))
    x[0, 0] = 1.0
    x[1:, 0] = cosines
    x[1:, 1:] = np.diag(np.sqrt(1 - cosines**2))
    labels = np.array([0, 0, 1, 1])
    unit = normalize(x)
    full = nearest_neighbours(unit)
    assert full.index[0] == 2 and full.tied[0]
    rejected = np.array([False, False, False, True])
    errors = retrieval_errors(unit, labels, full, rejected)
    kept = np.flatnonzero(~rejected)
    clean_db = reference_neighbours(x, kept, ~rejected)
    assert clean_db[0] == 1
    assert errors["clean_database"] == pytest.approx(np.mean(labels[clean_db] != labels[kept]))


def test_a_histogram_group_with_no_row_is_left_out_without_numpy_warnings() -> None:
    """Every known row ambiguous: numpy's "invalid value encountered in divide" reached the
    user as the empty clear group was drawn with density=True."""
    groups = {"head": {"ambiguous": np.array([0.1, 0.5, 0.9]), "clear": np.array([])}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        figure = figures.distributions(groups, title="ambiguity")
    assert [line.get_label() for line in figure.axes[0].patches] == ["ambiguous"]


def test_inverse_norm_is_the_float64_norm_a_chunk_at_a_time(monkeypatch) -> None:
    """It widened every embedding to float64 at once: 8x the cache's float16 bytes, the
    evaluation's peak memory (3.7 GiB more at 320,000 rows of D=768)."""
    embedding = np.random.default_rng(0).normal(size=(50, 8)).astype(np.float16)
    embedding[3] = 0
    whole = baseline_uncertainty("inverse_norm", _eval_set(embedding))
    monkeypatch.setattr(sources, "NORM_CHUNK_ROWS", 7)
    assert np.array_equal(baseline_uncertainty("inverse_norm", _eval_set(embedding)), whole)
    norm = np.linalg.norm(embedding.astype(np.float64), axis=1)
    np.testing.assert_array_equal(whole[norm > 0], (1 / norm[norm > 0]).astype(np.float32))


def test_the_tsne_legend_shows_each_class_at_full_colour_and_one_size():
    """Each legend marker took its class's first point's transparency and size: a class whose
    first point was certain showed a pale, tiny swatch."""
    rng = np.random.default_rng(0)
    labels = np.repeat([3, 5, 7], 20)
    uncertainty = rng.random(60)
    uncertainty[[0, 20, 40]] = [uncertainty.min() - 1, uncertainty.max() + 1, uncertainty.mean()]
    points = TsnePoints(rng.normal(size=(60, 2)), np.arange(60), labels, uncertainty)
    fig = figures.uncertainty_map(points, title="t")
    handles = fig.axes[0].get_legend().legend_handles
    assert [handle.get_facecolor()[0][3] for handle in handles] == [1.0, 1.0, 1.0]
    assert len({float(handle.get_sizes()[0]) for handle in handles}) == 1
