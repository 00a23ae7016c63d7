"""Approximate cross-validation from one influence cache.

:class:`InfluenceCV` predicts, for every fold of any scikit-learn splitter,
the effect of removing its test indices from training, without retraining.
:func:`influence_cross_validate` is a drop-in for
:func:`sklearn.model_selection.cross_validate` built on it.
"""

import inspect
import numbers
import time

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin, clone
from sklearn.metrics import check_scoring, make_scorer
from sklearn.model_selection import check_cv
from sklearn.utils.validation import check_is_fitted

from sklearn_cif._base import check_target
from sklearn_cif._checks import check_data, data_fingerprint
from sklearn_cif._cif import ClusteredInfluenceEstimator
from sklearn_cif.adapters import is_model
from sklearn_cif.losses import get_loss

__all__ = ["InfluenceCV", "influence_cross_validate"]


class _HeldClassifier(ClassifierMixin, BaseEstimator):
    """Serves fixed predictions of one fold to scikit-learn scorers."""

    def __init__(self, proba=None, classes=None):
        self.proba = proba
        self.classes = classes

    def fit(self, X=None, y=None):  # pragma: no cover - never fitted
        return self

    @property
    def classes_(self):
        return self.classes

    def predict_proba(self, X):
        return self.proba

    def decision_function(self, X):
        return self.proba[:, 1] if self.proba.shape[1] == 2 else self.proba

    def predict(self, X):
        return self.classes[np.argmax(self.proba, axis=1)]


class _HeldRegressor(RegressorMixin, BaseEstimator):
    """Serves fixed regression outputs of one fold to scikit-learn scorers."""

    def __init__(self, values=None):
        self.values = values

    def fit(self, X=None, y=None):  # pragma: no cover - never fitted
        return self

    def predict(self, X):
        return self.values


def _holder(outputs, loss, classes):
    if loss.is_classifier:
        return _HeldClassifier(loss.to_proba(outputs), classes)
    return _HeldRegressor(outputs[:, 0] if outputs.shape[1] == 1 else outputs)


def _with_labels(scorer, classes):
    """Pass ``labels=classes`` to metrics that take them (e.g. ``log_loss``).

    A small fold often misses some classes; ``log_loss`` then cannot tell
    which probability column is which and raises. The model's classes are
    known, so give them.
    """
    func = getattr(scorer, "_score_func", None)
    if classes is None or func is None or "labels" in scorer._kwargs:
        return scorer
    if "labels" not in inspect.signature(func).parameters:
        return scorer
    return make_scorer(
        func,
        greater_is_better=scorer._sign > 0,
        response_method=scorer._response_method,
        **{**scorer._kwargs, "labels": classes},
    )


def _scorers(scoring, loss, classes=None):
    """``({name: scorer}, is_multimetric)`` following ``cross_validate``'s keys."""
    template = _HeldClassifier() if loss.is_classifier else _HeldRegressor()

    def get(s):
        return _with_labels(check_scoring(template, s), classes)

    if scoring is None:
        return {"score": get("accuracy" if loss.is_classifier else "r2")}, False
    if isinstance(scoring, str) or callable(scoring):
        return {"score": get(scoring)}, False
    if isinstance(scoring, (list, tuple, set)):
        return {name: get(name) for name in scoring}, True
    if isinstance(scoring, dict):
        return {name: get(s) for name, s in scoring.items()}, True
    raise ValueError(
        f"scoring={scoring!r} is not supported; pass None, a scorer name, a "
        "callable, a list of names or a dict of scorers."
    )


def _model_classes(model, n_outputs, loss):
    classes = getattr(model, "classes_", None)
    if classes is None:
        classes = np.arange(loss.n_classes(n_outputs))
    return np.asarray(classes)


def _check_target_available(estimator, target):
    """Reject, before any fitting, a target the estimator's parameters cannot give."""
    available = estimator.available_targets()
    if target == "auto" or target in available:
        return
    check_target(target)
    raise ValueError(
        f"target={target!r} is not available: {type(estimator).__name__} with "
        f"these parameters gives first-order influence only ({list(available)}). "
        "target='retrain' needs a ClusteredInfluenceEstimator with "
        "residual_correction='auto' or 'full'."
    )


class InfluenceCV(BaseEstimator):
    """Approximate K-fold cross-validation of a trained model from one cache.

    For every fold of ``cv`` it predicts the effect of removing the fold's
    test indices from training: the change of the fold's own loss and its
    out-of-fold outputs ``f(x) + J(x) dtheta``, scored like
    ``cross_validate`` would. By default ``dtheta`` is what retraining
    without the fold gives (a leave-k-out Newton step from the cache, see
    ``target``), not only the first-order influence.

    It is itself a splitter: ``split`` and ``get_n_splits`` delegate to
    ``check_cv(cv)``, and splits are materialized once per dataset so that
    ``cross_validate(net, X, y, cv=icv)`` runs real CV on exactly the folds
    it predicted.

    Parameters
    ----------
    estimator : ClusteredInfluenceEstimator or PerQueryInfluence, default=None
        The influence estimator. Used as is when already fitted on the same
        model and data with its current parameters (its cache is reused),
        else a clone is fitted. ``None`` means ``ClusteredInfluenceEstimator()``.
    cv : int, splitter or iterable, default=5
        As ``cv`` in :func:`~sklearn.model_selection.cross_validate`.
    scoring : str, callable, list, dict or None, default=None
        Scorers evaluated on the predicted out-of-fold outputs. ``None``:
        accuracy for classification losses, R² for regression.
    target : {"auto", "retrain", "if"}, default="auto"
        What every fold's ``delta_loss``, out-of-fold outputs and scores
        predict. ``"retrain"``: actual retraining without the fold (a
        leave-k-out Newton step from the cache, and the fold's loss at the
        out-of-fold outputs it predicts; see
        :meth:`ClusteredInfluenceEstimator.loss_change`).
        ``"if"``: the first-order influence-function effect. ``"auto"`` is
        ``"retrain"`` whenever the estimator provides it for its loss and
        the model is at its optimum (see
        :meth:`ClusteredInfluenceEstimator.loss_change`), else ``"if"``
        (``PerQueryInfluence`` is first order).
    verbose : int, default=0
        When positive, a cache built by ``fit`` shows its phases (progress
        bars with tqdm, else one line per phase on stderr). A build longer
        than a few seconds stays silent at 0, as scikit-learn's do.

    Attributes
    ----------
    estimator_ : estimator
        The fitted influence estimator (the one given, when reused).
    target_ : str
        The resolved ``target``.
    cv_results_ : dict of ndarray
        One entry per fold: ``split``, ``n_test``, ``test_loss_in_sample``
        (ℓ_V(θ)), ``delta_loss`` (predicted Δℓ), ``delta_loss_if`` (its
        first-order part), ``test_loss``
        (ℓ_V(θ) + Δℓ), ``correction_share`` (the part of ``delta_loss`` that
        the residual correction adds to plain CiF), ``param_change_norm``,
        how far each fold's Newton step goes (``leverage``, NaN when not
        computed; ``amplification``, its output change over first order's;
        ``safeguarded``, True where the step was clipped or damped at
        leverage 0.99 or fell back to first order; ``newton_iterations``,
        the iterations of the exact refit beyond that step, for a model with
        ``linear_outputs_``), ``score_time``, ``fit_time`` (the cache
        build time shared evenly among the folds, 0 when the cache was
        reused) and
        ``test_score`` (one scorer) or ``test_<name>`` (several).
    splits_ : list of (train, test) index arrays
        The folds that were predicted.
    fit_time_ : float
        Seconds spent fitting the cache in ``fit`` (0 when reused).
    oof_indices_, oof_outputs_ : ndarray
        Every (fold, test example) pair's example index and its predicted
        out-of-fold model output, fold after fold.

    Examples
    --------
    >>> import torch
    >>> from sklearn.model_selection import KFold
    >>> from sklearn_cif import ClusteredInfluenceEstimator, InfluenceCV
    >>> X, y = torch.randn(60, 3), torch.randint(0, 2, (60,))
    >>> net = torch.nn.Linear(3, 2)
    >>> est = ClusteredInfluenceEstimator(5, loss="cross_entropy", random_state=0)
    >>> icv = InfluenceCV(est, cv=KFold(6)).fit(net, X, y)
    >>> icv.cv_results_["delta_loss"].shape
    (6,)
    """

    def __init__(self, estimator=None, cv=5, scoring=None, target="auto", verbose=0):
        self.estimator = estimator
        self.cv = cv
        self.scoring = scoring
        self.target = target
        self.verbose = verbose

    # -- splitter protocol ------------------------------------------------------
    def _check_cv(self, y=None):
        return check_cv(self.cv, y, classifier=False)

    def split(self, X, y=None, groups=None):
        """Yield the (train, test) folds of ``cv``, identical on every call.

        Parameters
        ----------
        X : array-like of shape (N, ...)
            Training data.
        y : array-like of shape (N,), default=None
            Targets (for stratified splitters).
        groups : array-like of shape (N,), default=None
            Group labels (for group splitters).

        Yields
        ------
        train, test : ndarray
            The indices of one fold.
        """
        yield from self._materialize(X, y, groups)

    def get_n_splits(self, X=None, y=None, groups=None):
        """Return the number of folds of ``cv``.

        Parameters
        ----------
        X : array-like, default=None
            Training data (for splitters that need it).
        y : array-like, default=None
            Targets.
        groups : array-like, default=None
            Group labels.

        Returns
        -------
        n_splits : int
            Number of folds.
        """
        return self._check_cv(y).get_n_splits(X, y, groups)

    def _materialize(self, X, y, groups):
        # A splitter with a RandomState yields new folds per call: materialize
        # once per (cv object, data) so that fit and split agree.
        fp = [np.asarray(a) for a in (y, groups) if a is not None]
        key = (id(self.cv), len(X), data_fingerprint(*fp))
        cache = getattr(self, "_split_cache", None)
        if cache is None or cache[0] != key:
            splits = [
                (np.asarray(tr), np.asarray(te))
                for tr, te in self._check_cv(y).split(X, y, groups)
            ]
            self._split_cache = (key, splits)
        return self._split_cache[1]

    # -- fitting ------------------------------------------------------------
    def _fit_estimator(self, base, model, X, y):
        if base.is_current(model, X, y):  # its cache answers for this model and data
            return base, 0.0
        start = time.perf_counter()
        est = clone(base)
        if self.verbose:  # show the build's phases (the cache does not depend on it)
            est.set_params(verbose=self.verbose)
        est.fit(model, X, y)
        return est, time.perf_counter() - start

    def fit(self, model, X=None, y=None, groups=None):
        """Predict the effect of removing every test fold of ``cv``.

        Parameters
        ----------
        model : skorch net or torch.nn.Module
            The trained model; may be omitted when ``estimator.model`` is set.
        X, y : array-like or tensors
            The training data.
        groups : array-like of shape (N,), default=None
            Group labels for group splitters.

        Returns
        -------
        self : InfluenceCV
            The fitted splitter, with ``cv_results_``.
        """
        if not is_model(model) and getattr(self.estimator, "model", None) is not None:
            model, X, y = self.estimator.model, model, X
        X, y = check_data(X, y)
        n = len(y)
        splits = self._materialize(X, y, groups)
        tests = []
        for k, (_, test) in enumerate(splits):
            test = np.asarray(test)
            if test.size and (test.min() < 0 or test.max() >= n):
                raise ValueError(
                    f"cv={self.cv!r} produced test indices outside [0, {n}) in split "
                    f"{k}; the splitter does not match the {n} training examples."
                )
            tests.append(test)
        base = (
            self.estimator
            if self.estimator is not None
            else ClusteredInfluenceEstimator()
        )
        _check_target_available(base, self.target)  # before any fitting
        est, fit_time = self._fit_estimator(base, model, X, y)
        eff = est.fold_effects(tests, target=self.target)
        y_np = y.detach().cpu().numpy() if torch.is_tensor(y) else np.asarray(y)
        loss = get_loss(est.loss_name_)
        classes = _model_classes(model, eff.oof_outputs.shape[1], loss)
        scorers, multi = _scorers(self.scoring, loss, classes)
        results = self._score_folds(eff, y_np, scorers, classes, loss)
        results.update(
            split=np.arange(len(tests)),
            fit_time=np.full(len(tests), fit_time / len(tests)),
            n_test=np.diff(eff.fold_bounds),
            test_loss_in_sample=eff.loss_in_sample,
            delta_loss=eff.delta_loss,
            delta_loss_if=eff.delta_loss_if,
            correction_share=eff.correction_share,
            test_loss=eff.loss_in_sample + eff.delta_loss,
            param_change_norm=eff.param_change_norm,
            leverage=eff.leverage,
            amplification=eff.amplification,
            safeguarded=eff.safeguarded,
            newton_iterations=eff.newton_iterations,
        )
        self.estimator_ = est
        self.target_ = eff.target
        self.splits_ = splits
        self.fit_time_ = fit_time
        self.multimetric_ = multi
        self.scorer_names_ = [f"test_{name}" for name in scorers]
        self.oof_indices_ = eff.oof_indices
        self.oof_outputs_ = eff.oof_outputs
        self.loss_name_ = est.loss_name_
        self.classes_ = classes if loss.is_classifier else None
        self.n_samples_fit_ = n
        self.n_features_in_ = est.n_features_in_
        self.cv_results_ = results
        return self

    def _score_folds(self, eff, y, scorers, classes, loss):
        n_folds = len(eff.fold_bounds) - 1
        scores = {name: np.empty(n_folds) for name in scorers}
        score_time = np.empty(n_folds)
        for q in range(n_folds):
            start = time.perf_counter()
            lo, hi = eff.fold_bounds[q], eff.fold_bounds[q + 1]
            members = eff.oof_indices[lo:hi]
            held = _holder(eff.oof_outputs[lo:hi], loss, classes)
            X_placeholder = members[:, None]  # scorers only pass X through
            for name, scorer in scorers.items():
                scores[name][q] = scorer(held, X_placeholder, y[members])
            score_time[q] = time.perf_counter() - start
        return {"score_time": score_time, **{f"test_{k}": v for k, v in scores.items()}}

    def predict_oof(self, method="output"):
        """Predicted out-of-fold outputs of every example (like ``cross_val_predict``).

        Parameters
        ----------
        method : {"output", "predict", "predict_proba"}, default="output"
            Raw predicted outputs ``f(x) + J(x) dtheta`` ``(N, d)`` (for a
            probability output, ``nll_proba``, the log-probabilities
            ``log f(x) + J(x) dtheta / f(x)``), labels or values, or class
            probabilities.

        Returns
        -------
        predictions : ndarray of shape (N, ...)
            One row per training example, in training order.

        Raises
        ------
        ValueError
            When the test folds do not partition the training set.
        """
        check_is_fitted(self)
        counts = np.bincount(self.oof_indices_, minlength=self.n_samples_fit_)
        if np.any(counts != 1):
            raise ValueError(
                "predict_oof needs test folds that partition the data (each example "
                "in exactly one test fold), as cross_val_predict does; this cv "
                f"covers {np.sum(counts == 0)} examples 0 times and "
                f"{np.sum(counts > 1)} more than once. Use cv_results_ instead."
            )
        out = np.empty_like(self.oof_outputs_)
        out[self.oof_indices_] = self.oof_outputs_
        if method == "output":
            return out
        if method not in ("predict", "predict_proba"):
            raise ValueError(
                f"method={method!r}; expected 'output', 'predict' or 'predict_proba'."
            )
        if self.classes_ is None:
            if method == "predict_proba":
                raise ValueError("predict_proba needs a classification loss.")
            return out[:, 0] if out.shape[1] == 1 else out
        proba = get_loss(self.loss_name_).to_proba(out)
        return proba if method == "predict_proba" else self.classes_[proba.argmax(1)]


def influence_cross_validate(
    model,
    X,
    y,
    *,
    groups=None,
    cv=5,
    scoring=None,
    estimator=None,
    return_indices=False,
    target="auto",
    verbose=0,
):
    """Drop-in for :func:`sklearn.model_selection.cross_validate`, without retraining.

    Builds (or reuses) one influence cache and predicts every fold's held-out
    score from predicted out-of-fold outputs.

    Parameters
    ----------
    model : skorch net or torch.nn.Module
        The trained model.
    X, y : array-like or tensors
        The training data.
    groups : array-like, default=None
        Group labels for group splitters.
    cv : int, splitter or iterable, default=5
        As ``cv`` in :func:`~sklearn.model_selection.cross_validate`.
    scoring : str, callable, list, dict or None, default=None
        Scorers of the predicted out-of-fold outputs, as in
        :class:`InfluenceCV`.
    estimator : influence estimator, default=None
        ``None`` means ``ClusteredInfluenceEstimator()``.
    return_indices : bool, default=False
        Add ``indices`` = ``{"train": [...], "test": [...]}``.
    target : {"auto", "retrain", "if"}, default="auto"
        What the scores predict, as in :class:`InfluenceCV`.
    verbose : int, default=0
        Show the cache build's phases, as in :class:`InfluenceCV`.

    Returns
    -------
    scores : dict of ndarray
        ``test_score`` (or ``test_<name>``), ``fit_time`` (the cache build
        time shared evenly among the folds), ``score_time`` and optionally
        ``indices``, shaped like ``cross_validate``'s.

    Examples
    --------
    >>> import torch
    >>> from sklearn_cif import ClusteredInfluenceEstimator, influence_cross_validate
    >>> X, y = torch.randn(60, 3), torch.randint(0, 2, (60,))
    >>> net = torch.nn.Linear(3, 2)
    >>> est = ClusteredInfluenceEstimator(6, loss="cross_entropy", random_state=0)
    >>> res = influence_cross_validate(net, X, y, cv=5, estimator=est)
    >>> sorted(res)
    ['fit_time', 'score_time', 'test_score']
    """
    if not isinstance(return_indices, (bool, np.bool_, numbers.Integral)):
        raise TypeError(f"return_indices must be a bool; got {return_indices!r}.")
    icv = InfluenceCV(
        estimator=estimator, cv=cv, scoring=scoring, target=target, verbose=verbose
    ).fit(model, X, y, groups)
    res = icv.cv_results_
    out = {"fit_time": res["fit_time"], "score_time": res["score_time"]}
    out.update({key: res[key] for key in icv.scorer_names_})
    if return_indices:
        out["indices"] = {
            "train": [tr for tr, _ in icv.splits_],
            "test": [te for _, te in icv.splits_],
        }
    return out
