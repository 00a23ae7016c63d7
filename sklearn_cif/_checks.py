"""Validation of fit arguments, data and shared parameters (values in, values out)."""

import hashlib
import numbers
from collections.abc import Mapping

import numpy as np
import torch
from sklearn.utils.validation import check_array, check_scalar

from sklearn_cif.adapters import is_model
from sklearn_cif.passes import n_rows

__all__ = [
    "check_data",
    "check_inputs",
    "check_model_data",
    "check_solver_params",
    "data_fingerprint",
    "n_features",
    "n_outputs",
    "resolve_damping",
    "resolve_fit_args",
]


def resolve_fit_args(model_param, model, X, y):
    """Accept both ``fit(model, X, y)`` and, with ``model=`` set, ``fit(X, y)``."""
    if not is_model(model) and model_param is not None:
        if y is not None:
            raise TypeError(
                "fit(X, y) got three positional arguments but the first is not a "
                "model; call fit(model, X, y) or fit(X, y) with model= set."
            )
        model, X, y = model_param, model, X
    if model is None:
        raise TypeError(
            "No model given: call fit(model, X, y) or set the `model` parameter and "
            "call fit(X, y)."
        )
    if X is None:
        raise TypeError("fit needs X and y (the data the model was trained on).")
    return model, X, y


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


def _check_array(A, name, **kwargs):
    """``check_array`` with one message for non-finite values, as for tensors."""
    try:
        return check_array(A, dtype="numeric", allow_nd=True, input_name=name, **kwargs)
    except ValueError as exc:
        if "NaN" in str(exc) or "infinity" in str(exc):
            raise ValueError(f"Input {name} contains NaN or infinity.") from None
        raise


def check_inputs(X):
    """Validate X alone (see :func:`check_data`)."""
    if torch.is_tensor(X):
        return _check_tensor(X, "X", 2)
    return _check_array(X, "X")


def _is_label_array(y):
    """Whether ``y`` holds strings or other non-numeric labels."""
    kind = np.asarray(y).dtype.kind
    return kind in "OUS" and not (
        kind == "O" and all(isinstance(v, numbers.Number) for v in np.ravel(y)[:100])
    )


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
    elif _is_label_array(y):  # class labels (mapped through a model's classes_)
        y = check_array(y, dtype=None, ensure_2d=False, input_name="y")
    else:
        y = _check_array(y, "y", ensure_2d=False)
    if X.shape[0] != y.shape[0]:
        raise ValueError(
            f"X and y have inconsistent lengths: X has {X.shape[0]} rows, y has "
            f"{y.shape[0]}."
        )
    return X, y


def n_features(X):
    """Features per example: ``prod(X.shape[1:])``."""
    return int(np.prod(X.shape[1:]))


# damping="auto" for a model that declares no penalty (torch modules, skorch nets)
DEFAULT_DAMPING = 1e-3


def _check_damping(damping):
    if isinstance(damping, str):
        if damping != "auto":
            raise ValueError(
                f"damping={damping!r}; expected 'auto', a positive float or a dict "
                "{parameter name: float >= 0}."
            )
        return
    if isinstance(damping, Mapping):
        for name, value in damping.items():
            if (
                not isinstance(value, numbers.Real)
                or not np.isfinite(value)
                or value < 0
            ):
                raise ValueError(
                    f"damping[{name!r}]={value!r}; each value must be a finite "
                    "float >= 0."
                )
        return
    check_scalar(
        damping, "damping", numbers.Real, min_val=0, include_boundaries="neither"
    )
    if not np.isfinite(damping):
        raise ValueError(f"damping={damping} must be finite.")


def resolve_damping(damping, fmodel, n_samples):
    r"""The damping :math:`\lambda` of every selected parameter.

    Parameters
    ----------
    damping : "auto", float or dict
        ``"auto"``: the model's own L2 penalty per parameter when it
        declares one (scikit-learn models), else :data:`DEFAULT_DAMPING`.
        A float: the same value on every parameter. A dict: one value per
        selected parameter name (every one of them, no other).
    fmodel : FunctionalModel
    n_samples : int
        Training set size (scikit-learn penalties are written for sums).

    Returns
    -------
    damping : float or ndarray of shape (p,)
        A float when every parameter has the same positive value (the
        uniform path, bitwise as before), else the float64 diagonal.
    """
    _check_damping(damping)
    if isinstance(damping, str):
        per_param = None if fmodel.penalty is None else fmodel.penalty(n_samples)
        if per_param is None:
            return DEFAULT_DAMPING
    elif isinstance(damping, Mapping):
        per_param = dict(damping)
        missing = [n for n in fmodel.names if n not in per_param]
        unknown = [n for n in per_param if n not in fmodel.names]
        if missing or unknown:
            raise ValueError(
                f"damping names {unknown} that are not selected parameters and "
                f"misses {missing}; a dict needs exactly the names "
                f"{list(fmodel.names)}."
            )
    else:
        return float(damping)
    parts = [
        np.broadcast_to(
            np.asarray(per_param[n], dtype=np.float64), tuple(shape)
        ).reshape(-1)
        for n, shape in zip(fmodel.names, fmodel.shapes, strict=True)
    ]
    vec = np.concatenate(parts)
    if vec[0] > 0 and np.all(vec == vec[0]):
        return float(vec[0])
    return vec


def check_solver_params(
    damping, cg_tol, cg_maxiter, batch_size, curvature_samples, auto_tol=False
):
    """Validate the parameters every influence estimator shares.

    ``auto_tol``: whether ``cg_tol="auto"`` is accepted.
    """
    _check_damping(damping)
    if isinstance(cg_tol, str):  # "auto" is resolved per cluster at fit
        if not (auto_tol and cg_tol == "auto"):
            expected = "'auto' or a float" if auto_tol else "a float"
            raise ValueError(f"cg_tol={cg_tol!r}; expected {expected} in (0, 1).")
    else:
        check_scalar(cg_tol, "cg_tol", numbers.Real)
        if not 0 < cg_tol < 1:  # NaN fails too; at >= 1 CG would stop at x = 0
            raise ValueError(
                f"cg_tol={cg_tol} must lie in (0, 1): it is the relative "
                "residual each solve must reach (e.g. 1e-5)."
            )
    if cg_maxiter is not None:
        check_scalar(cg_maxiter, "cg_maxiter", numbers.Integral, min_val=1)
    check_scalar(batch_size, "batch_size", numbers.Integral, min_val=1)
    if curvature_samples is not None:
        check_scalar(
            curvature_samples, "curvature_samples", numbers.Integral, min_val=1
        )


def check_model_data(fmodel, X, y):
    """Fail fast: X must fit the model and targets must fit its outputs.

    One forward pass on a few examples catches a wrong feature shape; the
    loss checks the targets against the number of outputs
    (:meth:`~sklearn_cif.losses.OutputLoss.check_targets`).
    """
    out = _probe(fmodel, X, min(n_rows(y, "y"), 8))
    y = fmodel.targets(y)  # labels -> output indices (raises if unknown)
    # a copy: y may be read-only
    yt = y if torch.is_tensor(y) else torch.from_numpy(np.array(y))
    fmodel.loss.check_targets(yt, out.shape[1] if out.dim() > 1 else 1)


def n_outputs(fmodel, X):
    """Numbers the model outputs per example (one forward pass on one row)."""
    return int(_probe(fmodel, X, 1)[0].numel())


def _probe(fmodel, X, n):
    """The model's outputs on the first ``n`` rows, or a ``ValueError``."""
    x, _ = fmodel.as_tensors(X[slice(0, n)])
    try:
        with torch.no_grad(), fmodel.lock:
            return fmodel.forward(fmodel.theta, x)
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        raise ValueError(
            f"X of shape {tuple(X.shape)} does not fit the model: the forward pass "
            f"failed with {type(exc).__name__}: {exc}"
        ) from None


def data_fingerprint(*arrays):
    """SHA-1 of the arrays' shapes, dtypes and bytes (to detect a stale cache).

    A tensor and the NumPy array of the same data share a fingerprint;
    tensors of dtypes NumPy lacks (bfloat16) are hashed through their bytes.
    """
    h = hashlib.sha1()
    for A in arrays:
        if torch.is_tensor(A):
            t = A.detach().cpu().contiguous()
            try:
                a = t.numpy()
            except TypeError:  # no NumPy dtype: hash the raw bytes
                h.update(f"{tuple(t.shape)}{t.dtype}".encode())
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
                continue
        else:
            a = np.asarray(A)
            if a.dtype.kind == "O":  # labels: hash their text, not pointers
                a = a.astype(str)
        h.update(f"{a.shape}{a.dtype}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()
