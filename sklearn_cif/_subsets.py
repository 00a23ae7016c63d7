"""Parsing and validating subset queries into a sparse indicator matrix.

Accepted forms (``N`` training examples, ``Q`` queries):

- one index array (``Q = 1``);
- a list/tuple of index arrays;
- a boolean mask of shape ``(N,)`` (``Q = 1``);
- a ``(Q, N)`` 0/1 matrix, dense or ``scipy.sparse``.
"""

import numbers

import numpy as np
import scipy.sparse as sp

__all__ = ["subset_indicator"]


def _check_indices(idx, n_samples, q):
    arr = np.asarray(idx)
    if arr.ndim != 1:
        raise ValueError(
            f"subsets[{q}] must be a 1-d array of indices; got shape {arr.shape}."
        )
    if arr.size == 0:
        raise ValueError(
            f"subsets[{q}] is empty; every subset needs at least one index."
        )
    if arr.dtype == bool:
        raise ValueError(
            f"subsets[{q}] is a boolean array inside a list; pass masks as a (Q, N) "
            "0/1 matrix or one (N,) mask."
        )
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(
            f"subsets[{q}] must hold integer indices; got dtype {arr.dtype}."
        )
    return arr  # range and duplicates are checked for all rows at once


def _canonical_rows(ind, n_samples):
    """Sort the rows of a CSR built from index rows; check range and duplicates.

    Vectorized over all rows. Rows given strictly increasing (KFold folds,
    masks) skip the sort. In sorted rows a duplicate is two equal neighbours
    with no row boundary between them.
    """
    idx = ind.indices
    bad = np.flatnonzero((idx < 0) | (idx >= n_samples))
    starts = np.zeros(idx.size, dtype=bool)
    starts[ind.indptr[:-1][np.diff(ind.indptr) > 0]] = True
    if bad.size:
        q = np.searchsorted(ind.indptr, bad[0], side="right") - 1
        row = idx[ind.indptr[q] : ind.indptr[q + 1]]
        raise ValueError(
            f"subsets[{q}] has indices out of range [0, {n_samples}): "
            f"min {row.min()}, max {row.max()}."
        )
    within = ~starts[1:]  # neighbour pairs inside one row
    if not np.all(np.diff(idx)[within] > 0):
        ind.sort_indices()
        dup = np.flatnonzero((np.diff(ind.indices) == 0) & within)
        if dup.size:
            q = np.searchsorted(ind.indptr, dup[0], side="right") - 1
            raise ValueError(f"subsets[{q}] has duplicate indices.")
    ind.has_sorted_indices = True


def _from_matrix(M, n_samples):
    M = sp.csr_matrix(M)
    if M.shape[1] != n_samples:
        raise ValueError(
            f"A subset indicator matrix must have N={n_samples} columns; got "
            f"shape {M.shape}."
        )
    M.eliminate_zeros()
    if M.nnz and not np.all(M.data == 1):
        raise ValueError("A subset indicator matrix must hold only 0 and 1 entries.")
    empty = np.flatnonzero(np.diff(M.indptr) == 0)
    if empty.size:
        raise ValueError(f"Subsets {empty.tolist()[:10]} of the indicator are empty.")
    M = sp.csr_matrix(M, dtype=np.float64)
    M.sort_indices()
    return M


def subset_indicator(subsets, n_samples):
    """Turn ``subsets`` into a CSR ``(Q, N)`` 0/1 indicator (float64).

    Raises
    ------
    ValueError
        For empty subsets, out-of-range, negative, non-integer or duplicate
        indices, a mask of the wrong length, or a matrix with ``N' != N``.
    """
    if sp.issparse(subsets):
        return _from_matrix(subsets, n_samples)
    if isinstance(subsets, (list, tuple)):
        if len(subsets) == 0:
            raise ValueError("subsets is an empty list; pass at least one subset.")
        if all(isinstance(s, numbers.Integral) for s in subsets):
            rows = [_check_indices(subsets, n_samples, 0)]
        else:
            rows = [_check_indices(s, n_samples, q) for q, s in enumerate(subsets)]
    else:
        arr = np.asarray(subsets)
        if arr.dtype == bool and arr.ndim == 1:
            if arr.shape[0] != n_samples:
                raise ValueError(
                    f"A boolean subset mask must have length N={n_samples}; got "
                    f"{arr.shape[0]}."
                )
            rows = [_check_indices(np.flatnonzero(arr), n_samples, 0)]
        elif arr.ndim == 2:
            if arr.dtype != bool and not np.all(np.isin(arr, (0, 1))):
                raise ValueError(
                    "A (Q, N) subset indicator must hold only 0 and 1 entries."
                )
            return _from_matrix(arr.astype(np.float64), n_samples)
        else:
            rows = [_check_indices(arr, n_samples, 0)]
    indptr = np.concatenate([[0], np.cumsum([r.size for r in rows])])
    flat = np.concatenate(rows).astype(np.int64, copy=False)
    ind = sp.csr_matrix((len(rows), n_samples))  # filled below, unchecked
    ind.data, ind.indices, ind.indptr = np.ones(flat.size), flat, indptr
    # Canonical (sorted) members: answers do not depend on the index order,
    # bitwise (the summation order is fixed).
    _canonical_rows(ind, n_samples)
    return ind
