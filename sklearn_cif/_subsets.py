"""Parsing and validating subset queries.

Accepted forms (``N`` training examples, ``Q`` queries):

- one index array (``Q = 1``);
- a list/tuple of index arrays or ``(N,)`` boolean masks;
- a boolean mask of shape ``(N,)`` (``Q = 1``);
- a ``(Q, N)`` 0/1 matrix, dense or ``scipy.sparse``.

:class:`SubsetRows` holds the parsed rows without copying the index
arrays. Its :meth:`~SubsetRows.chunks` walk them in cache-sized pieces,
checking range and duplicates on the way, so a query that only needs
per-cluster counts (:meth:`~SubsetRows.cluster_counts`) reads each index
a small constant number of times and never builds an ``N``-wide or
``nnz``-long float array. :func:`subset_indicator` builds the sparse
``(Q, N)`` indicator the other queries need.
"""

import numbers

import numpy as np
import scipy.sparse as sp

__all__ = ["SubsetRows", "subset_indicator"]

# Entries of the duplicate-check stamp array: small enough to stay in cache.
_STAMP_SIZE = 1 << 20
# Indices per block when N is too large for a stamp of 16 rows.
_BLOCK_ENTRIES = 1 << 20


def _check_indices(idx, q, n_samples):
    arr = np.asarray(idx)
    if arr.ndim != 1:
        raise ValueError(
            f"subsets[{q}] must be a 1-d array of indices; got shape {arr.shape}."
        )
    if arr.dtype == bool:  # a mask in a list of subsets
        if arr.shape[0] != n_samples:
            raise ValueError(
                f"subsets[{q}] is a boolean mask of length {arr.shape[0]}; a mask "
                f"must have length N={n_samples}."
            )
        arr = np.flatnonzero(arr)
    if arr.size == 0:
        raise ValueError(
            f"subsets[{q}] is empty; every subset needs at least one index."
        )
    if arr.dtype.kind not in "iu":
        raise ValueError(
            f"subsets[{q}] must hold integer indices; got dtype {arr.dtype}."
        )
    return arr  # range and duplicates are checked chunk by chunk


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
    M.sum_duplicates()  # sorted, unique column indices per row
    return M


class SubsetRows:
    """Validated subset rows: each query's member indices, in the order given.

    Parameters
    ----------
    subsets : index array, list of index arrays, (N,) mask or (Q, N) 0/1 matrix
    n_samples : int
        ``N``; indices must lie in ``[0, N)``.
    assume_unique : bool, default=False
        Skip the duplicate check (as ``numpy.isin``'s ``assume_unique``):
        a repeated index is then counted twice. Range is always checked.

    Raises
    ------
    ValueError
        For empty subsets, non-integer indices, a mask of the wrong length
        or a matrix with ``N' != N`` here; out-of-range or (unless
        ``assume_unique``) duplicate indices when the rows are read.
    """

    def __init__(self, subsets, n_samples, assume_unique=False):
        self.n_samples = int(n_samples)
        self.assume_unique = bool(assume_unique)
        self._pieces, self._flat, self._matrix = None, None, None
        if sp.issparse(subsets):
            self._set_matrix(_from_matrix(subsets, n_samples))
            return
        if isinstance(subsets, (list, tuple)):
            if len(subsets) == 0:
                raise ValueError("subsets is an empty list; pass at least one subset.")
            if all(isinstance(s, numbers.Number) for s in subsets):  # one subset
                pieces = [_check_indices(subsets, 0, n_samples)]
            else:
                pieces = [
                    _check_indices(s, q, n_samples) for q, s in enumerate(subsets)
                ]
        else:
            arr = np.asarray(subsets)
            if arr.dtype == bool and arr.ndim == 1:
                if arr.shape[0] != n_samples:
                    raise ValueError(
                        f"A boolean subset mask must have length N={n_samples}; "
                        f"got {arr.shape[0]}."
                    )
                pieces = [_check_indices(arr, 0, n_samples)]
            elif arr.ndim == 2:
                if arr.dtype != bool and not np.all(np.isin(arr, (0, 1))):
                    raise ValueError(
                        "A (Q, N) subset indicator must hold only 0 and 1 entries."
                    )
                self._set_matrix(_from_matrix(arr.astype(np.float64), n_samples))
                return
            else:
                pieces = [_check_indices(arr, 0, n_samples)]
        self._pieces = pieces
        self.lengths = np.fromiter(map(len, pieces), np.int64, len(pieces))
        self.indptr = np.zeros(len(pieces) + 1, dtype=np.int64)
        np.cumsum(self.lengths, out=self.indptr[1:])

    def _set_matrix(self, M):
        # Rows of a validated CSR: in range, sorted and unique already.
        self._matrix = M
        self._flat = M.indices.astype(np.int64, copy=False)
        self.indptr = M.indptr.astype(np.int64, copy=False)
        self.lengths = np.diff(self.indptr)
        self.assume_unique = True

    @property
    def n_rows(self):
        return self.lengths.size

    def chunks(self, max_rows=None):
        """Yield ``(q0, q1, indices, rows)`` for consecutive row blocks, validated.

        ``rows`` is each index's row within the block (``0 ... q1 - q0 - 1``).
        Up to ``N`` around 65,000 a block holds ``2**20 / N`` rows and the
        duplicate check writes each index's position into a reused
        ``rows x N`` stamp array that stays in cache (one scatter and one
        gather per index, no sort); for larger ``N`` blocks hold about ``2**20``
        indices and the check sorts them. ``max_rows`` caps the rows of a
        block.
        """
        n, Q = self.n_samples, self.n_rows
        stamp_rows = _STAMP_SIZE // max(n, 1)
        stamp = None
        if not self.assume_unique and stamp_rows >= 16:
            # Positions are global, so a block's stamps never match a later
            # block's and the stamp needs no reset between blocks.
            small = self.indptr[-1] < np.iinfo(np.int32).max
            dtype = np.int32 if small else np.int64
            stamp = np.full(min(stamp_rows, Q) * n, -1, dtype=dtype)
            bounds = np.arange(0, Q, stamp_rows)
        else:
            marks = np.arange(0, self.indptr[-1], _BLOCK_ENTRIES)
            bounds = np.unique(np.searchsorted(self.indptr, marks, "right") - 1)
        if max_rows is not None:
            bounds = np.union1d(bounds, np.arange(0, Q, max(1, int(max_rows))))
        bounds = np.append(bounds, Q).tolist()
        for q0, q1 in zip(bounds[:-1], bounds[1:], strict=True):
            if self._flat is not None:
                flat = self._flat[self.indptr[q0] : self.indptr[q1]]
            elif q1 - q0 == 1:
                flat = self._pieces[q0]
            else:
                flat = np.concatenate(self._pieces[q0:q1])
            self._check_range(flat, q0)
            rows = np.repeat(np.arange(q1 - q0, dtype=np.int64), self.lengths[q0:q1])
            if not self.assume_unique:
                self._check_unique(flat, rows, q0, stamp)
            yield q0, q1, flat, rows

    def _row_of(self, position, q0):
        return int(
            np.searchsorted(self.indptr, self.indptr[q0] + position, "right") - 1
        )

    def _check_range(self, flat, q0):
        if flat.min() >= 0 and flat.max() < self.n_samples:
            return
        bad = np.flatnonzero((flat < 0) | (flat >= self.n_samples))[0]
        q = self._row_of(bad, q0)
        row = flat[
            self.indptr[q] - self.indptr[q0] : self.indptr[q + 1] - self.indptr[q0]
        ]
        raise ValueError(
            f"subsets[{q}] has indices out of range [0, {self.n_samples}): "
            f"min {row.min()}, max {row.max()}."
        )

    def _check_unique(self, flat, rows, q0, stamp):
        key = rows * self.n_samples
        key += flat
        if stamp is not None:
            # Each entry writes its position at (row, index); a later
            # duplicate overwrites it, so some entry reads another position.
            start = self.indptr[q0]
            pos = np.arange(start, start + flat.size, dtype=stamp.dtype)
            stamp[key] = pos
            clash = np.flatnonzero(stamp[key] != pos)[:1]
            local = rows[clash]
        else:
            key = np.sort(key)
            local = key[np.flatnonzero(key[1:] == key[:-1])[:1]] // self.n_samples
        if local.size:
            raise ValueError(f"subsets[{q0 + int(local[0])}] has duplicate indices.")

    def cluster_counts(self, labels, n_clusters):
        """Yield ``(q0, q1, counts)``: members per cluster, ``(q1 - q0, C)`` int64.

        Integer counts make every answer built from them independent of
        the order of the indices, bitwise. A block holds at most ``2**22``
        counts.
        """
        for q0, q1, flat, rows in self.chunks(max_rows=(1 << 22) // n_clusters):
            key = rows * n_clusters
            key += labels[flat]
            counts = np.bincount(key, minlength=(q1 - q0) * n_clusters)
            yield q0, q1, counts.reshape(q1 - q0, n_clusters)

    def indicator(self):
        """The ``(Q, N)`` CSR 0/1 indicator (float64), members sorted per row.

        Sorted (canonical) members make answers independent of the index
        order, bitwise (the summation order is fixed).
        """
        if self._matrix is not None:
            return self._matrix.astype(np.float64)
        flat = np.concatenate([c for _, _, c, _ in self.chunks()]).astype(
            np.int64, copy=False
        )
        ind = sp.csr_matrix((self.n_rows, self.n_samples))  # filled below
        ind.data, ind.indices, ind.indptr = np.ones(flat.size), flat, self.indptr
        if flat.size > 1:
            inner = np.ones(flat.size - 1, dtype=bool)
            inner[self.indptr[1:-1] - 1] = False  # pairs across a row boundary
            if not np.all(flat[1:][inner] > flat[:-1][inner]):
                ind.sort_indices()
        ind.has_sorted_indices = True
        return ind


def subset_indicator(subsets, n_samples, assume_unique=False):
    """Turn ``subsets`` into a CSR ``(Q, N)`` 0/1 indicator (float64).

    Raises
    ------
    ValueError
        For empty subsets, out-of-range, negative, non-integer or duplicate
        indices, a mask of the wrong length, or a matrix with ``N' != N``.
    """
    return SubsetRows(subsets, n_samples, assume_unique).indicator()
