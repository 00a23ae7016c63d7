"""Agreement between influence estimates, and a fidelity scorer for tuning.

Arrays in, numbers out: nothing here touches a model except
:func:`fidelity_scorer`, which compares a fitted
:class:`~sklearn_cif.ClusteredInfluenceEstimator` with the exact per-query
reference on K-fold removal queries, on training data given explicitly.
"""

import warnings

import numpy as np
from scipy import stats
from sklearn.model_selection import KFold, check_cv
from sklearn.utils import Bunch, check_random_state
from sklearn.utils.validation import check_is_fitted

from sklearn_cif._checks import check_data, data_fingerprint
from sklearn_cif._per_query import PerQueryInfluence
from sklearn_cif.gradients import take

__all__ = ["agreement", "fidelity_scorer"]

# Relative residual of the per-query reference solves (at most).
REFERENCE_TOL = 1e-5


def _stats(a, b):
    return (
        stats.spearmanr(a, b).statistic,
        stats.pearsonr(a, b).statistic,
        stats.kendalltau(a, b).statistic,
        float(np.median(a / b)),
    )


def agreement(estimate, reference, *, n_bootstrap=1000, random_state=None):
    """Spearman, Pearson, Kendall and median ratio, with 95% bootstrap intervals.

    Parameters
    ----------
    estimate, reference : array-like of shape (Q,)
        Two vectors of effects for the same queries.
    n_bootstrap : int, default=1000
        Bootstrap resamples of the queries (0: no intervals).
    random_state : int, RandomState instance or None, default=None
        Seeds the bootstrap resamples.

    Returns
    -------
    result : Bunch
        ``spearman``, ``pearson``, ``kendall``, ``median_ratio`` and, for
        each, ``<name>_ci`` = (2.5%, 97.5%) percentiles over resamples.

    Examples
    --------
    >>> from sklearn_cif.metrics import agreement
    >>> res = agreement([1.0, 2.0, 3.1, 4.0], [1.1, 2.0, 3.0, 4.2], n_bootstrap=0)
    >>> float(res.spearman), round(res.median_ratio, 3)
    (1.0, 0.976)
    """
    a = np.asarray(estimate, dtype=np.float64).ravel()
    b = np.asarray(reference, dtype=np.float64).ravel()
    if a.shape != b.shape or a.size < 3:
        raise ValueError(
            "estimate and reference must have the same length >= 3; got "
            f"{a.size} and {b.size}."
        )
    names = ("spearman", "pearson", "kendall", "median_ratio")
    out = Bunch(**dict(zip(names, _stats(a, b), strict=True)))
    if n_bootstrap:
        rng = check_random_state(random_state)
        with warnings.catch_warnings():
            # a resample of few queries can be constant: its NaN is skipped below
            warnings.simplefilter("ignore", stats.ConstantInputWarning)
            draws = np.array(
                [
                    _stats(a[i], b[i])
                    for i in rng.randint(0, a.size, (n_bootstrap, a.size))
                ]
            )
        for j, name in enumerate(names):
            out[f"{name}_ci"] = tuple(np.nanpercentile(draws[:, j], [2.5, 97.5]))
    return out


def _training_data(estimator, X, y, cv):
    """The rows of (X, y) the estimator was fitted on, found by data fingerprint."""
    X, y = check_data(X, y)
    if data_fingerprint(X, y) == estimator.data_fingerprint_:
        return X, y
    if cv is not None:
        for train, _ in check_cv(cv, y, classifier=False).split(X, y):
            X_fit, y_fit = take(X, train), take(y, train)
            if data_fingerprint(X_fit, y_fit) == estimator.data_fingerprint_:
                return X_fit, y_fit
    raise ValueError(
        "fidelity_scorer: the estimator was fitted neither on the scorer's X, y "
        "nor on a training split of its cv; pass the data and the cv used to fit it."
    )


def fidelity_scorer(
    X, y, n_folds=20, *, cv=None, model=None, effect="self", random_state=0
):
    """A scorer ``(estimator, X_eval, y_eval) -> Spearman`` of CiF against per-query IF.

    The queries are the ``n_folds`` folds of a shuffled ``KFold`` over the
    data the estimator was fitted on (the removals ``InfluenceCV``
    predicts). That data is given explicitly (estimators keep no reference
    to it): ``X, y`` themselves, or, inside a search, the training split of
    ``cv`` whose data fingerprint matches the estimator's. The reference is
    a :class:`~sklearn_cif.PerQueryInfluence` with the estimator's model,
    loss, damping and solver settings, solved for all folds together to a
    relative residual of at most ``1e-5`` (the estimator's ``cg_tol`` if
    a tighter float), so that tuning ``cg_tol`` is scored against a fixed
    reference.

    Parameters
    ----------
    X, y : array-like or tensors
        The data the scored estimators are fitted on, or that a search
        splits with ``cv``.
    n_folds : int, default=20
        Removal queries per score.
    cv : int, splitter or None, default=None
        The search's ``cv`` (``GridSearchCV(..., cv=cv)``), to find the
        training split of each scored estimator.
    model : skorch net or torch.nn.Module, default=None
        The trained model; ``None`` uses the estimator's ``model`` parameter.
    effect : {"self", "eval"}, default="self"
        ``"self"``: each fold's own loss change; ``"eval"``: the change of
        the mean loss on the scorer's held-out ``(X_eval, y_eval)``.
    random_state : int, default=0
        Shuffles the folds.

    Returns
    -------
    scorer : callable
        For ``GridSearchCV(est, grid, scoring=fidelity_scorer(X, y, cv=cv),
        cv=cv).fit(X, y)``.

    Examples
    --------
    >>> import torch
    >>> from sklearn_cif import ClusteredInfluenceEstimator
    >>> from sklearn_cif.metrics import fidelity_scorer
    >>> X, y = torch.randn(60, 3), torch.randint(0, 2, (60,))
    >>> net = torch.nn.Linear(3, 2)
    >>> est = ClusteredInfluenceEstimator(60, loss="cross_entropy", model=net)
    >>> score = fidelity_scorer(X, y, n_folds=6)
    >>> round(score(est.fit(X, y), X, y), 2)  # one cluster per example: exact
    1.0
    """
    if effect not in ("self", "eval"):
        raise ValueError(f"effect={effect!r}; expected 'self' or 'eval'.")

    def score(estimator, X_eval, y_eval):
        check_is_fitted(estimator)
        net = model if model is not None else estimator.model
        if net is None:
            raise ValueError(
                "fidelity_scorer needs the model: set the estimator's model= "
                "parameter or pass model= to fidelity_scorer."
            )
        X_fit, y_fit = _training_data(estimator, X, y, cv)
        splitter = KFold(n_folds, shuffle=True, random_state=random_state)
        folds = [te for _, te in splitter.split(np.empty(len(y_fit)))]
        ref = PerQueryInfluence(
            damping=estimator.damping,
            cg_tol=REFERENCE_TOL
            if estimator.cg_tol == "auto"
            else min(estimator.cg_tol, REFERENCE_TOL),
            cg_maxiter=estimator.cg_maxiter,
            batch_size=estimator.batch_size,
            loss=estimator.loss,
            params=estimator.params,
            curvature=estimator.curvature_,
            device=estimator.device,
            query_mode="batched",
        ).fit(net, X_fit, y_fit)
        args = () if effect == "self" else (X_eval, y_eval)
        # Fidelity to per-query IF: compare like with like (first order).
        ours = estimator.loss_change(folds, *args, target="if")
        return float(stats.spearmanr(ours, ref.loss_change(folds, *args)).statistic)

    return score
