import numpy as np
import pytest
import scipy.sparse as sp

import sklearn_cif._subsets as subsets_module
from sklearn_cif._subsets import SubsetRows, subset_indicator


def test_all_formats_give_the_same_indicator():
    # Index array, list of arrays, mask and dense/sparse matrices agree.
    N = 10
    a = subset_indicator(np.array([1, 4, 7]), N).toarray()
    mask = np.zeros(N, bool)
    mask[[1, 4, 7]] = True
    assert np.array_equal(subset_indicator(mask, N).toarray(), a)
    assert np.array_equal(subset_indicator([1, 4, 7], N).toarray(), a)
    two = subset_indicator([[1, 4, 7], np.array([0])], N).toarray()
    assert two.shape == (2, N) and np.array_equal(two[:1], a)
    assert np.array_equal(subset_indicator(two, N).toarray(), two)
    assert np.array_equal(subset_indicator(sp.csr_matrix(two), N).toarray(), two)


@pytest.mark.parametrize(
    "subsets, match",
    [
        ([], "empty list"),
        ([np.array([], dtype=int)], "empty"),
        ([np.array([0, 10])], "out of range"),
        ([np.array([-1, 2])], "out of range"),
        ([np.array([0.5, 1.0])], "integer"),
        ([np.array([1, 1])], "duplicate"),
        (np.zeros(9, bool), "length N=10"),
        (np.ones((2, 9)), "N=10 columns"),
        (np.full((1, 10), 2), "only 0 and 1"),
        (np.zeros((1, 10)), "empty"),
    ],
)
def test_bad_subsets_raise(subsets, match):
    # Each malformed query is rejected with a message saying what is wrong.
    with pytest.raises(ValueError, match=match):
        subset_indicator(subsets, 10)


@pytest.fixture(params=["stamp", "sort"])
def small_chunks(request, monkeypatch):
    # Tiny blocks, so every check below crosses block boundaries: a stamp of
    # 320 entries (32 rows per block at N = 10, 16 at N = 20), or blocks of
    # about 50 indices checked by sorting (the large-N path).
    if request.param == "stamp":
        monkeypatch.setattr(subsets_module, "_STAMP_SIZE", 320)
    else:
        monkeypatch.setattr(subsets_module, "_STAMP_SIZE", 64)
        monkeypatch.setattr(subsets_module, "_BLOCK_ENTRIES", 50)


@pytest.mark.parametrize("n", [10, 20])
def test_cluster_counts_equal_per_row_bincount(small_chunks, n):
    # The chunked per-cluster counts equal a plain per-row bincount, for rows
    # of any order and length, whatever the chunking.
    rng = np.random.default_rng(n)
    labels = rng.integers(0, 4, n)
    rows = [rng.choice(n, rng.integers(1, n + 1), replace=False) for _ in range(37)]
    expected = np.array([np.bincount(labels[r], minlength=4) for r in rows])
    parsed = SubsetRows(rows, n)
    got = np.zeros_like(expected)
    seen = []
    for q0, q1, counts in parsed.cluster_counts(labels, 4):
        got[q0:q1] = counts
        seen.append((q0, q1))
    assert np.array_equal(got, expected)
    assert len(seen) > 1 and seen[0][0] == 0 and seen[-1][1] == 37


@pytest.mark.parametrize("n", [10, 20])
def test_duplicates_and_range_found_in_any_chunk(small_chunks, n):
    # A repeated or out-of-range index in a late block names its own row;
    # valid rows pass.
    rng = np.random.default_rng(0)
    rows = [rng.choice(n, 3, replace=False) for _ in range(40)]
    assert sum(1 for _ in SubsetRows(rows, n).chunks()) > 1
    same = [np.array([1, 5, 7])] * 40  # one stamp slot rewritten in every block
    assert sum(1 for _ in SubsetRows(same, n).chunks()) > 1
    dup = list(rows)
    dup[37] = np.array([1, 5, 1])
    with pytest.raises(ValueError, match=r"subsets\[37\] has duplicate"):
        list(SubsetRows(dup, n).chunks())
    far = list(rows)
    far[33] = np.array([2, n])
    with pytest.raises(ValueError, match=r"subsets\[33\] has indices out of range"):
        list(SubsetRows(far, n, assume_unique=True).chunks())


def test_assume_unique_skips_only_the_duplicate_check():
    # With assume_unique a repeated index counts twice (documented); the
    # default refuses it; ranges are checked either way.
    labels = np.array([0, 1, 1, 0])
    counts = next(
        SubsetRows([[1, 1, 2]], 4, assume_unique=True).cluster_counts(labels, 2)
    )
    assert counts[2].tolist() == [[0, 3]]
    with pytest.raises(ValueError, match="duplicate"):
        list(SubsetRows([[1, 1, 2]], 4).cluster_counts(labels, 2))
    with pytest.raises(ValueError, match="out of range"):
        list(SubsetRows([[1, -1]], 4, assume_unique=True).chunks())
