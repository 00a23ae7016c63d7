"""Fitted scikit-learn models in the package's functional form.

:func:`to_torch` converts a fitted scikit-learn model (or a ``Pipeline``
ending in one, or in a skorch net) into a torch module computing exactly
the model's decision function, the package loss its training objective
uses, and that objective's L2 penalty per parameter (intercepts and
biases unpenalized, as scikit-learn trains them). The influence is then
the one of the model's own training objective::

    (1/N) sum_i l_i(theta) + (1/2) sum_j lambda_j theta_j^2

Earlier pipeline steps are a fixed feature map applied to ``X``: the
influence is over the last step's parameters only (a real refit would
also refit the scaler; the estimate holds the map fixed).
"""

from typing import NamedTuple

import numpy as np
import torch
from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_is_fitted

__all__ = ["SUPPORTED", "TorchForm", "is_sklearn_model", "to_torch"]

SUPPORTED = (
    "LinearRegression",
    "Ridge",
    "LogisticRegression",
    "SGDClassifier",
    "SGDRegressor",
    "MLPClassifier",
    "MLPRegressor",
    "Pipeline",
)


class TorchForm(NamedTuple):
    """A fitted scikit-learn model as a torch module, loss and penalty.

    Attributes
    ----------
    module : torch.nn.Module or None
        Computes the model's decision function (logits for classifiers).
        ``None`` when the last step is a skorch net (``net`` holds it).
    loss : str or None
        The package loss of the training objective (``None`` for a net).
    penalty : dict or None
        Parameter name -> L2 coefficient (a float or an array of the
        parameter's shape).
    per_example_sum : bool
        ``True``: the penalty is written for ``sum_i l_i`` and divides by
        ``N``; ``False``: for the mean ``(1/N) sum_i l_i`` (SGD models).
    feature_map : object or None
        A fitted transformer applied to ``X`` first (earlier pipeline steps).
    classes : ndarray or None
        Class labels in the order of the outputs; targets are encoded as
        their index.
    squeeze_output : bool
        The module returns ``(n, 1)`` for a single output; use ``(n,)``.
    net : skorch.NeuralNet or None
        The pipeline's last step when it is a skorch net.
    """

    module: object
    loss: object
    penalty: object
    per_example_sum: bool
    feature_map: object
    classes: object
    squeeze_output: bool
    net: object = None

    def damping(self, n_samples):
        """The per-parameter damping ``lambda_j`` for ``N = n_samples``."""
        if self.penalty is None:
            return None
        div = float(n_samples) if self.per_example_sum else 1.0
        return {
            k: np.asarray(v, dtype=np.float64) / div for k, v in self.penalty.items()
        }


def _is_skorch_net(obj):
    try:
        from skorch import NeuralNet
    except ImportError:  # pragma: no cover - skorch is a dependency
        return False
    return isinstance(obj, NeuralNet)


def is_sklearn_model(obj):
    """Whether ``obj`` is a scikit-learn estimator (not a skorch net)."""
    return isinstance(obj, BaseEstimator) and not _is_skorch_net(obj)


def _unsupported(model, what):
    raise ValueError(
        f"{type(model).__name__} with {what} is not supported: influence needs the "
        "model to be the optimum of a smooth objective (a per-example loss plus "
        "an L2 penalty)."
    )


def _tensor(a, dtype):
    return torch.nn.Parameter(torch.as_tensor(np.array(a, dtype=dtype, copy=True)))


def _dtype(model, *arrays):
    dt = np.result_type(*[np.asarray(a).dtype for a in arrays])
    if dt not in (np.float32, np.float64):
        raise TypeError(
            f"{type(model).__name__} has {dt} coefficients; expected float."
        )
    return dt


class _Linear(torch.nn.Module):
    """``X @ weight.T + bias``: a linear model's decision function."""

    def __init__(self, coef, intercept, dtype):
        super().__init__()
        self.weight = _tensor(np.atleast_2d(coef), dtype)
        self.bias = (
            None if intercept is None else _tensor(np.atleast_1d(intercept), dtype)
        )

    def forward(self, x):
        out = x.reshape(x.shape[0], -1) @ self.weight.T
        return out if self.bias is None else out + self.bias


class _MLP(torch.nn.Module):
    """scikit-learn's multilayer perceptron up to its output activation."""

    _ACTIVATIONS = {
        "identity": lambda z: z,
        "logistic": torch.sigmoid,
        "tanh": torch.tanh,
        "relu": torch.relu,
    }

    def __init__(self, coefs, intercepts, activation, dtype):
        super().__init__()
        self.layers = torch.nn.ModuleList()
        for W, b in zip(coefs, intercepts, strict=True):
            layer = torch.nn.Module()
            layer.weight = _tensor(np.asarray(W).T, dtype)
            layer.bias = _tensor(b, dtype)
            self.layers.append(layer)
        self.activation = activation

    def forward(self, x):
        act = self._ACTIVATIONS[self.activation]
        h = x.reshape(x.shape[0], -1)
        for i, layer in enumerate(self.layers):
            h = h @ layer.weight.T + layer.bias
            if i < len(self.layers) - 1:
                h = act(h)
        return h


def _linear_form(model, coef, intercept, loss, penalty, classes, per_sum=True):
    fit_intercept = getattr(model, "fit_intercept", True)
    dtype = _dtype(model, coef)
    module = _Linear(coef, intercept if fit_intercept else None, dtype)
    pen = {"weight": penalty[0]}
    if fit_intercept:
        pen["bias"] = penalty[1]
    single = np.ndim(coef) == 1 or np.shape(coef)[0] == 1
    return TorchForm(module, loss, pen, per_sum, None, classes, single)


def _check_no_class_weight(model):
    if getattr(model, "class_weight", None) is not None:
        _unsupported(model, f"class_weight={model.class_weight!r}")


def _linear_regression(model):
    if getattr(model, "positive", False):
        _unsupported(model, "positive=True (a constrained optimum)")
    return _linear_form(model, model.coef_, model.intercept_, "mse", (0.0, 0.0), None)


def _ridge(model):
    if getattr(model, "positive", False):
        _unsupported(model, "positive=True (a constrained optimum)")
    coef = np.asarray(model.coef_)
    n_targets = 1 if coef.ndim == 1 else coef.shape[0]
    # sum_i ||y_i - f_i||^2 + alpha ||w||^2 = sum_i d * mse_i + ...: per target
    # row t the coefficient is 2 alpha_t / d in the sum convention.
    alpha = np.broadcast_to(np.asarray(model.alpha, dtype=np.float64), (n_targets,))
    kappa = (2.0 * alpha / n_targets)[:, None] * np.ones((1, coef.shape[-1]))
    return _linear_form(model, coef, model.intercept_, "mse", (kappa, 0.0), None)


def _logistic_regression(model):
    _check_no_class_weight(model)
    penalty = getattr(model, "penalty", "deprecated")
    l1_ratio = getattr(model, "l1_ratio", None)
    if penalty in ("l1", "elasticnet") or (
        penalty != "l2" and l1_ratio not in (None, 0, 0.0)
    ):
        _unsupported(model, f"penalty={penalty!r}, l1_ratio={l1_ratio!r}")
    C = float(model.C)
    kappa = 0.0 if penalty is None or not np.isfinite(C) else 1.0 / C
    classes = np.asarray(model.classes_)
    binary = len(classes) == 2
    bias_kappa = 0.0
    if model.solver == "liblinear":
        if not binary:
            _unsupported(model, "solver='liblinear' on several classes (one-vs-rest)")
        # liblinear penalizes the intercept as a feature of value
        # intercept_scaling: b = s * w_b, (1/2) w_b^2 = (1/2) b^2 / s^2
        bias_kappa = kappa / float(model.intercept_scaling) ** 2
    return _linear_form(
        model, model.coef_, model.intercept_,
        "bce_logits" if binary else "cross_entropy",
        (kappa, bias_kappa), classes,
    )  # fmt: skip


def _sgd_penalty(model):
    l1 = getattr(model, "l1_ratio", 0.0)
    if model.penalty == "elasticnet" and l1 == 0:
        return float(model.alpha)
    if model.penalty == "l2":
        return float(model.alpha)
    if model.penalty is None:
        return 0.0
    _unsupported(model, f"penalty={model.penalty!r}")


def _sgd_classifier(model):
    _check_no_class_weight(model)
    if model.loss != "log_loss":
        _unsupported(model, f"loss={model.loss!r} (use loss='log_loss')")
    classes = np.asarray(model.classes_)
    if len(classes) != 2:
        _unsupported(model, f"{len(classes)} classes (one-vs-rest binary problems)")
    lam = _sgd_penalty(model)  # (1/N) sum_i l_i + (alpha/2) ||w||^2
    return _linear_form(
        model, model.coef_, model.intercept_, "bce_logits", (lam, 0.0), classes,
        per_sum=False,
    )  # fmt: skip


def _sgd_regressor(model):
    if model.loss != "squared_error":
        _unsupported(model, f"loss={model.loss!r} (use loss='squared_error')")
    # (1/N) sum_i (1/2)(y - f)^2 + (alpha/2) ||w||^2 is half of
    # (1/N) sum_i mse_i + alpha ||w||^2
    lam = 2.0 * _sgd_penalty(model)
    return _linear_form(
        model, model.coef_, model.intercept_, "mse", (lam, 0.0), None, per_sum=False
    )


def _mlp(model, classifier):
    dtype = _dtype(model, *model.coefs_)
    module = _MLP(model.coefs_, model.intercepts_, model.activation, dtype)
    n_out = model.n_outputs_
    # scikit-learn: loss = data_loss + (alpha / 2N) sum ||W||^2, data_loss
    # the mean of the per-example loss below.
    if not classifier and getattr(model, "loss", "squared_error") != "squared_error":
        _unsupported(model, f"loss={model.loss!r} (use loss='squared_error')")
    if not classifier:  # (1/N) sum_i (1/2) mse_i
        loss, kappa, classes = "mse", 2.0 * model.alpha, None
    elif model.out_activation_ == "softmax":
        loss, kappa, classes = "cross_entropy", model.alpha, np.asarray(model.classes_)
    elif n_out == 1:  # binary: one logit for classes_[1]
        loss, kappa, classes = "bce_logits", model.alpha, np.asarray(model.classes_)
    else:  # multilabel: sum over the d outputs of the binary log loss
        loss, kappa, classes = "bce_logits", model.alpha / n_out, None
    pen = {}
    for i in range(len(model.coefs_)):
        pen[f"layers.{i}.weight"] = float(kappa)
        pen[f"layers.{i}.bias"] = 0.0
    return TorchForm(module, loss, pen, True, None, classes, n_out == 1)


def _pipeline(model):
    last = model.steps[-1][1]
    if last is None or last == "passthrough":
        raise ValueError("The pipeline's last step is 'passthrough'; it has no model.")
    head = model[:-1] if len(model.steps) > 1 else None
    if _is_skorch_net(last):
        # the net's module and criterion are used as they are (class indices)
        return TorchForm(None, None, None, True, head, None, False, net=last)
    inner = to_torch(last)
    if inner.feature_map is not None:
        raise ValueError("Nested pipelines are not supported; flatten the steps.")
    return inner._replace(feature_map=head)


_CONVERTERS = {
    "LinearRegression": _linear_regression,
    "Ridge": _ridge,
    "LogisticRegression": _logistic_regression,
    "SGDClassifier": _sgd_classifier,
    "SGDRegressor": _sgd_regressor,
    "MLPClassifier": lambda m: _mlp(m, True),
    "MLPRegressor": lambda m: _mlp(m, False),
    "Pipeline": _pipeline,
}


def to_torch(model):
    """Convert a fitted scikit-learn model into a :class:`TorchForm`.

    Parameters
    ----------
    model : estimator
        A fitted ``LinearRegression``, ``Ridge``, ``LogisticRegression``
        (L2 or no penalty), ``SGDClassifier`` (binary, ``log_loss``),
        ``SGDRegressor`` (``squared_error``), ``MLPClassifier``,
        ``MLPRegressor``, or a ``Pipeline`` whose last step is one of them
        or a skorch net.

    Returns
    -------
    form : TorchForm

    Raises
    ------
    TypeError
        For an estimator of another class.
    ValueError
        For a supported class with a setting that has no smooth L2 objective
        (an L1 penalty, hinge loss, class weights, one-vs-rest classes).
    NotFittedError
        When the model is not fitted.
    """
    for cls in type(model).__mro__:
        if cls.__name__ in _CONVERTERS and cls.__module__.startswith("sklearn."):
            check_is_fitted(model)
            return _CONVERTERS[cls.__name__](model)
    raise TypeError(
        f"model must be a fitted skorch NeuralNet, a torch.nn.Module or a "
        f"scikit-learn model of {list(SUPPORTED)}; got {type(model).__name__}."
    )
