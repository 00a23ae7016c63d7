import numpy as np
import pytest
import scipy.sparse as sp

from sklearn_cif._subsets import subset_indicator


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
