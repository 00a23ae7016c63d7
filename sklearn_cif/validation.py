"""Ground truth for fold effects: actual refits of a skorch net.

:func:`refit_fold_effects` retrains a copy of a fitted skorch net without
each chosen fold, warm-started from the fitted weights with the net's own
optimizer, criterion and weight decay (``partial_fit``), and returns the
actual change of the fold's held-out loss next to the predictions of
influence estimators, with agreement figures.
"""

import copy

import numpy as np
import torch
from sklearn.base import clone
from sklearn.utils import Bunch

from sklearn_cif._checks import check_data
from sklearn_cif.adapters import as_functional
from sklearn_cif.metrics import agreement

__all__ = ["refit_fold_effects"]


def _fold_loss(net, X, y, test):
    fm = as_functional(net, device="cpu")
    x, t = fm.as_tensors(X[test], y[test])
    with torch.no_grad():
        return fm.losses(fm.theta, x, t).mean().item()


def refit_fold_effects(net, X, y, folds, estimators, *, epochs=20, random_state=0):
    """Actual vs predicted held-out loss change for a few folds.

    Parameters
    ----------
    net : fitted skorch NeuralNet
        Never modified: each refit trains a deep copy.
    X, y : array-like
        The training data the net was fitted on.
    folds : list of index arrays
        Test folds to remove (keep it to a few: each one is a refit).
    estimators : dict of str -> influence estimator
        Fitted (or unfitted: then fitted here) estimators whose self
        ``loss_change`` is compared, e.g. ``{"cif": ..., "if": ...}``.
    epochs : int, default=20
        Epochs of ``partial_fit`` per refit, warm-started from the fitted
        weights and optimizer state.
    random_state : int, default=0
        Seeds torch during each refit (shuffling of batches).

    Returns
    -------
    result : Bunch
        ``actual`` (Q,) held-out loss change of each fold after refitting,
        ``predicted`` dict name -> (Q,), ``agreement`` dict name -> the
        :func:`~sklearn_cif.metrics.agreement` of the prediction with
        ``actual`` (with bootstrap intervals when Q >= 3).

    Examples
    --------
    >>> import numpy as np, torch
    >>> from skorch import NeuralNetClassifier
    >>> from sklearn_cif import ClusteredInfluenceEstimator
    >>> from sklearn_cif.validation import refit_fold_effects
    >>> X = np.random.default_rng(0).normal(size=(60, 3)).astype(np.float32)
    >>> y = (X[:, 0] > 0).astype(np.int64)
    >>> net = NeuralNetClassifier(
    ...     torch.nn.Linear(3, 2), criterion=torch.nn.CrossEntropyLoss,
    ...     max_epochs=5, train_split=None, verbose=0,
    ... ).fit(X, y)
    >>> est = ClusteredInfluenceEstimator(10, random_state=0)
    >>> res = refit_fold_effects(net, X, y, [np.arange(5), np.arange(5, 10)],
    ...                          {"cif": est}, epochs=2)
    >>> res.actual.shape, res.predicted["cif"].shape
    ((2,), (2,))
    """
    X, y = check_data(X, y)
    folds = [np.asarray(f) for f in folds]
    actual = np.empty(len(folds))
    for q, test in enumerate(folds):
        keep = np.setdiff1d(np.arange(len(y)), test)
        before = _fold_loss(net, X, y, test)
        refit = copy.deepcopy(net)  # warm start: weights and optimizer state
        with torch.random.fork_rng():
            torch.manual_seed(random_state + q)
            refit.partial_fit(X[keep], y[keep], epochs=epochs)
        actual[q] = _fold_loss(refit, X, y, test) - before
    predicted = {}
    for name, est in estimators.items():
        if not hasattr(est, "model_fingerprint_"):
            est = clone(est).fit(net, X, y)
        predicted[name] = np.asarray(est.loss_change(folds))
    scores = {}
    if len(folds) >= 3:
        scores = {k: agreement(v, actual, random_state=0) for k, v in predicted.items()}
    return Bunch(actual=actual, predicted=predicted, agreement=scores)
