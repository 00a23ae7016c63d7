"""Shared fitting machinery: argument resolution, validation and data passes.

The estimators in :mod:`sklearn_cif.estimator` orchestrate these helpers;
each helper does one pass over the data or one validation step.
"""

import hashlib
import numbers
import time
from contextlib import contextmanager

import numpy as np
import torch
from sklearn.utils.validation import check_array, check_scalar

from sklearn_cif.adapters import _is_skorch_net, as_functional
from sklearn_cif.gradients import (
    _take,
    batch_tensors,
    iter_batches,
    per_example_grads,
    summed_grad,
)

__all__ = [
    "is_model",
    "resolve_fit_args",
    "check_data",
    "check_common_params",
    "data_fingerprint",
    "per_example_pass",
    "mean_gradient",
    "Timer",
]


def is_model(obj):
    """Whether ``obj`` is something ``fit`` accepts as the model."""
    return isinstance(obj, torch.nn.Module) or _is_skorch_net(obj)


def resolve_fit_args(est, model, X, y):
    """Accept both ``fit(model, X, y)`` and, with ``model=`` set, ``fit(X, y)``."""
    if not is_model(model) and est.model is not None:
        if y is not None:
            raise TypeError(
                "fit(X, y) got three positional arguments but the first is not a "
                "model; call fit(model, X, y) or fit(X, y) with model= set."
            )
        model, X, y = est.model, model, X
    if model is None:
        raise TypeError(
            "No model given: call fit(model, X, y) or set the `model` parameter and "
            "call fit(X, y)."
        )
    if X is None:
        raise TypeError("fit needs X and y (the data the model was trained on).")
    return model, X, y


def _n_rows(A, name):
    if torch.is_tensor(A) or isinstance(A, np.ndarray):
        return A.shape[0] if A.ndim else 0
    try:
        return len(A)
    except TypeError:
        raise TypeError(
            f"{name} must be an array or a tensor; got {type(A).__name__}."
        ) from None


def _check_tensor(t, name, min_dim):
    if t.is_complex():
        raise ValueError(f"Complex data not supported: {name} is a complex tensor.")
    if t.dim() < min_dim:
        raise ValueError(
            f"Expected a {min_dim}-d (or higher) {name}, got a {t.dim()}-d tensor of "
            f"shape {tuple(t.shape)}; reshape it to (n_samples, ...)."
        )
    if t.shape[0] == 0 or (min_dim == 2 and t[0].numel() == 0):
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)}); need >= 1 sample.")
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"Input {name} contains NaN or infinity.")
    return t


def check_inputs(X):
    """Validate X alone (see :func:`check_data`)."""
    if torch.is_tensor(X):
        return _check_tensor(X, "X", 2)
    return check_array(X, dtype="numeric", allow_nd=True, input_name="X")


def check_data(X, y):
    """Validate X and y (arrays via ``check_array``, tensors alike), before any work.

    X must be at least 2-d (N x features, or N x C x H x W), finite, real
    and not sparse; y finite with one row per example. Integer X is kept as
    is (token indices for embeddings); the module decides what it accepts.
    """
    X = check_inputs(X)
    if y is None:
        raise ValueError(
            "This estimator requires y to be passed, but the target y is None: "
            "influence needs the targets the model was trained on."
        )
    if torch.is_tensor(y):
        y = _check_tensor(y, "y", 1)
    else:
        y = check_array(
            y, dtype="numeric", ensure_2d=False, allow_nd=True, input_name="y"
        )
    if X.shape[0] != y.shape[0]:
        raise ValueError(
            f"X and y have inconsistent lengths: X has {X.shape[0]} rows, y has "
            f"{y.shape[0]}."
        )
    return X, y


def n_features(X):
    """Features per example: ``prod(X.shape[1:])``."""
    return int(np.prod(X.shape[1:]))


def check_common_params(est):
    """Validate the parameters every influence estimator shares."""
    check_scalar(
        est.damping, "damping", numbers.Real, min_val=0, include_boundaries="neither"
    )
    if not np.isfinite(est.damping):
        raise ValueError(f"damping={est.damping} must be finite.")
    check_scalar(
        est.cg_tol, "cg_tol", numbers.Real, min_val=0, include_boundaries="neither"
    )
    if est.cg_maxiter is not None:
        check_scalar(est.cg_maxiter, "cg_maxiter", numbers.Integral, min_val=1)
    check_scalar(est.batch_size, "batch_size", numbers.Integral, min_val=1)
    if est.curvature_samples is not None:
        check_scalar(
            est.curvature_samples, "curvature_samples", numbers.Integral, min_val=1
        )


def curvature_data(X, y, curvature_samples, seed):
    """The examples the curvature ``G`` averages over: all, or a seeded subsample.

    Returns ``(X_c, y_c, indices)``, ``indices`` None for all examples. The
    same subsample serves every solve of one fit (CiF and baselines).
    """
    n = _n_rows(y, "y")
    if curvature_samples is None or curvature_samples >= n:
        return X, y, None
    idx = np.sort(
        np.random.RandomState(seed).choice(n, int(curvature_samples), replace=False)
    )
    return _take(X, idx), _take(y, idx), idx


def build_model(est, model, X=None, y=None):
    """The functional model, probed on the data before any expensive pass."""
    fmodel = as_functional(model, loss=est.loss, params=est.params, device=est.device)
    if X is not None:
        check_model_data(fmodel, X, y)
    return fmodel


_CLASS_LOSSES = ("cross_entropy", "nll", "nll_proba")


def check_model_data(fmodel, X, y):
    """Fail fast: X must fit the model and targets must fit its outputs.

    One forward pass on a few examples catches a wrong feature shape; the
    targets of a classification loss must be integer class indices below
    the number of outputs, those of ``bce_logits`` in [0, 1].
    """
    x, _ = batch_tensors(fmodel, X, None, slice(0, min(len(y), 8)))
    try:
        with torch.no_grad():
            out = fmodel.forward(fmodel.theta, x)
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        raise ValueError(
            f"X of shape {tuple(X.shape)} does not fit the model: the forward pass "
            f"failed with {type(exc).__name__}: {exc}"
        ) from None
    name = fmodel.loss.name
    yt = (
        y if torch.is_tensor(y) else torch.from_numpy(np.array(y))
    )  # a copy: y may be read-only
    if name in _CLASS_LOSSES:
        k = out.shape[1] if out.dim() > 1 else 1
        if yt.is_floating_point() and not bool((yt == yt.round()).all()):
            raise ValueError(f"y must hold integer class indices for loss={name!r}.")
        lo, hi = int(yt.min()), int(yt.max())
        if lo < 0 or hi >= k:
            raise ValueError(
                f"y holds labels in [{lo}, {hi}] but the model has {k} outputs; "
                f"loss={name!r} expects class indices in [0, {k - 1}]."
            )
    elif name == "bce_logits" and (float(yt.min()) < 0 or float(yt.max()) > 1):
        raise ValueError("y must lie in [0, 1] for loss='bce_logits'.")


def data_fingerprint(*arrays):
    """SHA-1 of the arrays' shapes, dtypes and bytes (to detect a stale cache)."""
    h = hashlib.sha1()
    for A in arrays:
        a = A.detach().cpu().numpy() if torch.is_tensor(A) else np.asarray(A)
        h.update(f"{a.shape}{a.dtype}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _check_finite_batch(G, losses, idx):
    bad = ~(torch.isfinite(G).all(1) & torch.isfinite(losses))
    if bool(bad.any()):
        rows = (torch.nonzero(bad).flatten().cpu().numpy() + idx.start).tolist()
        raise FloatingPointError(
            f"Non-finite per-example gradients or losses for examples {rows[:20]}"
            f"{' ...' if len(rows) > 20 else ''}; check these inputs and targets."
        )


# Most per-example gradient numbers held at once (batch x parameters).
GRADIENT_BUDGET = 2**26


def per_example_pass(
    fmodel, X, y, batch_size, consume, progress=None, budget=GRADIENT_BUDGET
):
    """One pass of per-example gradients; ``consume(idx, G, losses)`` per batch.

    Nothing of size ``N x p`` is kept: each batch's ``G`` (``b x p``) is
    handed to ``consume`` and dropped; ``b`` is ``batch_size`` or less, so
    that ``b x p <= budget`` (at least one example).
    """
    n = _n_rows(y, "y")
    step = max(1, min(int(batch_size), budget // fmodel.n_params))
    for idx in iter_batches(n, step):
        x, t = batch_tensors(fmodel, X, y, idx)
        G, losses = per_example_grads(fmodel, x, t)
        _check_finite_batch(G, losses, idx)
        consume(idx, G, losses)
        if progress is not None:
            progress.update(idx.stop - idx.start)


def mean_gradient(fmodel, X, y, batch_size):
    """``(1/n) sum_i g_i`` over (X, y) by ordinary backward passes."""
    n = _n_rows(y, "y")
    total = torch.zeros(fmodel.n_params, dtype=fmodel.dtype, device=fmodel.device)
    for idx in iter_batches(n, batch_size):
        x, t = batch_tensors(fmodel, X, y, idx)
        total += summed_grad(fmodel, x, t)
    if not bool(torch.isfinite(total).all()):
        raise FloatingPointError("The mean gradient over (X, y) is not finite.")
    return total / n


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
    """A tqdm bar when ``verbose > 0`` and tqdm is installed, else ``None``."""
    bar = None
    if verbose:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, desc=desc, leave=False)
        except ImportError:  # tqdm is an optional extra
            bar = None
    try:
        yield bar
    finally:
        if bar is not None:
            bar.close()
