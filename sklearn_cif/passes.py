"""The data-pass layer: every loop over a dataset goes through :class:`DataPasses`.

A pass reads the rows of ``(X, y)`` in batches, moves each batch to the
model's device, runs a per-batch kernel and either accumulates a sum
(:meth:`DataPasses.accumulate`, curvature products and gradient sums) or
fills per-row arrays (:meth:`DataPasses.map_rows`, sketches, influences,
output Jacobian products, Newton features). The layer owns batching, the
device transfer, the gradient-memory budget, pass counting, progress bars,
the model lock (one pass at a time per functional model, so concurrent
queries never interleave inside ``functional_call``) and two hooks:

- :meth:`DataPasses.reduce` combines a summed tensor across processes;
- :meth:`DataPasses.gather` combines per-row arrays across processes.

Both are the identity here. They are the seam of a multi-process build: a
subclass that owns a shard of the rows overrides :meth:`DataPasses.rows`,
``reduce`` (an all-reduce) and ``gather`` (an all-gather), and every
consumer above this layer stays as it is.
"""

import sys
import time
from contextlib import contextmanager

import numpy as np
import torch

from sklearn_cif.gradients import iter_batches, per_example_grads, summed_grad, take

__all__ = ["DataPasses", "GRADIENT_BUDGET", "Timer", "progress_bar", "row_sq_norms"]

# Most per-example gradient numbers held at once (batch x parameters).
GRADIENT_BUDGET = 2**26


def n_rows(A, name):
    """Number of examples of an array, tensor or sequence ``A``."""
    if torch.is_tensor(A) or isinstance(A, np.ndarray):
        return A.shape[0] if A.ndim else 0
    try:
        return len(A)
    except TypeError:
        raise TypeError(
            f"{name} must be an array or a tensor; got {type(A).__name__}."
        ) from None


def _check_finite_batch(G, losses, idx):
    # One row sum is NaN or inf whenever a row holds one (or when a finite
    # row's sum overflows): a read of G instead of an N x p boolean mask;
    # the exact elementwise test runs only on a suspect batch.
    if bool(torch.isfinite(G.sum(1)).all() & torch.isfinite(losses).all()):
        return
    bad = ~(torch.isfinite(G).all(1) & torch.isfinite(losses))
    if bool(bad.any()):
        rows = (torch.nonzero(bad).flatten().cpu().numpy() + idx.start).tolist()
        raise FloatingPointError(
            f"Non-finite per-example gradients or losses for examples {rows[:20]}"
            f"{' ...' if len(rows) > 20 else ''}; check these inputs and targets."
        )


def row_sq_norms(G):
    """``||g_i||^2`` of every row, in float64, without a float64 copy of ``G``.

    The norm is taken in ``G``'s precision and squared in float64, where
    ``||g||^2`` of a finite gradient may lie past float32's range; a row
    whose float32 norm overflows (torch's does beyond about 1.8e19) is
    recomputed in float64.
    """
    norms = torch.linalg.vector_norm(G, dim=1).double()
    big = ~torch.isfinite(norms)
    if bool(big.any()):
        norms[big] = torch.linalg.vector_norm(G[big].double(), dim=1)
    return norms * norms


class _Counter:
    """Passes run, shared by a :class:`DataPasses` and its subsets."""

    def __init__(self):
        self.n_passes = 0


class DataPasses:
    """Batched passes of a functional model over one dataset.

    Parameters
    ----------
    fmodel : FunctionalModel
        The model; its device receives every batch.
    X, y : array-like or tensors
        The dataset (``y`` may be ``None`` for passes that need no targets).
    batch_size : int
        Examples per batch (per-example gradient passes use fewer when
        ``batch x p`` would exceed ``budget``).
    budget : int, default=GRADIENT_BUDGET
        Most per-example gradient numbers held at once.

    Attributes
    ----------
    n_samples : int
        Rows of the dataset.
    n_passes : int
        Passes run so far by this object and the subsets made from it (one
        call of :meth:`accumulate` or :meth:`map_rows` is one pass).
    """

    def __init__(
        self, fmodel, X, y, batch_size, *, budget=GRADIENT_BUDGET, _counter=None
    ):
        self.fmodel = fmodel
        self.X, self.y = X, y
        self.n_samples = n_rows(X if y is None else y, "y")
        self.batch_size = int(batch_size)
        self.budget = int(budget)
        self._counter = _counter if _counter is not None else _Counter()

    @property
    def n_passes(self):
        return self._counter.n_passes

    def subset(self, indices):
        """Passes over the rows ``indices`` only, counted with this object's."""
        y = None if self.y is None else take(self.y, indices)
        return type(self)(
            self.fmodel,
            take(self.X, indices),
            y,
            self.batch_size,
            budget=self.budget,
            _counter=self._counter,
        )

    # -- hooks of a multi-process build ------------------------------------------
    def rows(self):
        """The row indices this process reads: all of them (one process)."""
        return slice(0, self.n_samples)

    def reduce(self, total):
        """Combine a tensor summed over this process's rows: the identity here."""
        return total

    def gather(self, arrays):
        """Combine per-row arrays filled on this process's rows: the identity here."""
        return arrays

    # -- the passes ---------
    def _batches(self, step, targets, progress):
        rows = self.rows()
        for idx in iter_batches(rows.stop - rows.start, step):
            idx = slice(idx.start + rows.start, idx.stop + rows.start)
            y = None if (self.y is None or not targets) else take(self.y, idx)
            x, t = self.fmodel.as_tensors(take(self.X, idx), y)
            yield idx, x, t
            if progress is not None:
                progress.update(idx.stop - idx.start)

    def accumulate(self, kernel, out, *, progress=None):
        """``out += kernel(x, y)`` over every batch, then :meth:`reduce`.

        Parameters
        ----------
        kernel : callable
            ``(x, y, out) -> None``, adding the batch's contribution into
            ``out`` in place.
        out : torch.Tensor
            The accumulator (zeros), on the model's device.
        progress : tqdm bar or None

        Returns
        -------
        out : torch.Tensor
        """
        with self.fmodel.lock:
            self._counter.n_passes += 1
            for _, x, t in self._batches(self.batch_size, True, progress):
                kernel(x, t, out)
            return self.reduce(out)

    def map_rows(
        self, kernel, *, gradients=False, targets=True, dtype=np.float64, progress=None
    ):
        """Per-row arrays from a kernel run on every batch, then :meth:`gather`.

        Parameters
        ----------
        kernel : callable
            ``(idx, x, y) -> dict`` of per-row arrays for the batch's rows
            ``idx`` (a slice); with ``gradients=True``
            ``(idx, G, losses) -> dict`` with ``G`` the batch's per-example
            gradients ``(b, p)`` (checked finite) and ``losses`` ``(b,)``.
        gradients : bool, default=False
            Hand the kernel per-example gradients (batches bounded by the
            memory budget) instead of the raw batch.
        targets : bool, default=True
            Load ``y`` (``False``: ``y`` is ``None``, for output-only passes).
        dtype : numpy dtype or None, default=np.float64
            dtype of the arrays; ``None`` keeps the kernel's.
        progress : tqdm bar or None

        Returns
        -------
        arrays : dict of ndarray
            One ``(n_samples, ...)`` array per key the kernel returned
            (empty when the dataset has no rows).
        """
        step = self.batch_size
        if gradients:
            step = max(1, min(step, self.budget // self.fmodel.n_params))
        out = {}
        with self.fmodel.lock:
            self._counter.n_passes += 1
            for idx, x, t in self._batches(step, targets or gradients, progress):
                if gradients:
                    G, losses = per_example_grads(self.fmodel, x, t)
                    _check_finite_batch(G, losses, idx)
                    parts = kernel(idx, G, losses)
                else:
                    parts = kernel(idx, x, t)
                for key, value in parts.items():
                    if torch.is_tensor(value):
                        value = value.detach().cpu().numpy()
                    if key not in out:
                        dt = value.dtype if dtype is None else dtype
                        out[key] = np.empty((self.n_samples, *value.shape[1:]), dt)
                    out[key][idx] = value
        return self.gather(out)

    def group_sums(self, groups, *, progress=None):
        """``sum_{i in group} g_i`` for each index array in ``groups``, ``(G, p)``.

        One ordinary backward pass per batch of one group's rows (no
        per-example gradients): the cluster-mean and per-query subset sums.
        """
        fm = self.fmodel
        sums = torch.zeros(len(groups), fm.n_params, dtype=fm.dtype, device=fm.device)
        own = self.rows()
        with fm.lock:
            self._counter.n_passes += 1
            for g, members in enumerate(groups):
                members = np.asarray(members)
                if own != slice(0, self.n_samples):  # a shard: its members only
                    members = members[(members >= own.start) & (members < own.stop)]
                for sl in iter_batches(members.size, self.batch_size):
                    rows = members[sl]
                    x, t = fm.as_tensors(take(self.X, rows), take(self.y, rows))
                    sums[g] += summed_grad(fm, x, t)
                    if progress is not None:
                        progress.update(sl.stop - sl.start)
        return self.reduce(sums)

    def mean_gradient(self):
        """``(1/n) sum_i g_i`` over the dataset by ordinary backward passes."""
        fm = self.fmodel
        total = torch.zeros(fm.n_params, dtype=fm.dtype, device=fm.device)

        def kernel(x, t, out):
            out += summed_grad(fm, x, t)

        total = self.accumulate(kernel, total)
        if not bool(torch.isfinite(total).all()):
            raise FloatingPointError("The mean gradient over (X, y) is not finite.")
        return total / self.n_samples


class Timer(dict):
    """Seconds per named phase (a dict), filled by ``with timer("phase"):``."""

    @contextmanager
    def __call__(self, name):
        start = time.perf_counter()
        try:
            yield
        finally:
            self[name] = self.get(name, 0.0) + time.perf_counter() - start


@contextmanager
def progress_bar(verbose, total, desc):
    """A tqdm bar when ``verbose > 0`` and tqdm is installed, else ``None``.

    Without tqdm (an optional extra), ``verbose > 0`` still prints one line
    per phase to stderr, with its duration.
    """
    bar, start = None, time.perf_counter()
    if verbose:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, desc=desc, leave=False)
        except ImportError:
            print(f"[sklearn_cif] {desc} ...", file=sys.stderr, flush=True)
    try:
        yield bar
    finally:
        if bar is not None:
            bar.close()
        elif verbose:
            seconds = time.perf_counter() - start
            print(f"[sklearn_cif] {desc} done in {seconds:.1f} s", file=sys.stderr)
