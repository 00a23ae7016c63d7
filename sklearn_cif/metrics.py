"""Agreement between influence estimates, and a fidelity scorer for tuning.

Arrays in, numbers out: nothing here touches a model except
:func:`fidelity_scorer`, which compares a fitted
:class:`~sklearn_cif.ClusteredInfluenceEstimator` with the exact per-query
reference on K-fold removal queries.
"""

import warnings

import numpy as np
from scipy import stats
from sklearn.model_selection import KFold
from sklearn.utils import Bunch, check_random_state
from sklearn.utils.validation import check_is_fitted

__all__ = ["agreement", "fidelity_scorer"]


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

    Returns
    -------
    result : Bunch
        ``spearman``, ``pearson``, ``kendall``, ``median_ratio`` and, for
        each, ``<name>_ci`` = (2.5%, 97.5%) percentiles over resamples.
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


def fidelity_scorer(n_folds=20, *, effect="self", random_state=0):
    """A scorer ``(estimator, X, y) -> Spearman`` of CiF against per-query IF.

    The queries are the ``n_folds`` folds of a shuffled ``KFold`` over the
    data the estimator was fitted on (the removals ``InfluenceCV`` predicts).
    With ``effect="self"`` each fold's own loss change is compared; with
    ``effect="eval"`` the change of the mean loss on the scorer's held-out
    ``(X, y)``. The reference is a :class:`~sklearn_cif.PerQueryInfluence`
    with the estimator's model, loss, damping and solver settings, solved for
    all folds together. Use it as ``GridSearchCV(..., scoring=fidelity_scorer())``.
    """
    if effect not in ("self", "eval"):
        raise ValueError(f"effect={effect!r}; expected 'self' or 'eval'.")

    def score(estimator, X, y):
        from sklearn_cif.estimator import PerQueryInfluence

        check_is_fitted(estimator)
        X_fit, y_fit = getattr(estimator, "_X", None), getattr(estimator, "_y", None)
        if X_fit is None:
            raise ValueError(
                "fidelity_scorer needs the estimator's training data, which a "
                "loaded (unpickled) estimator does not keep; refit it first."
            )
        folds = [
            te
            for _, te in KFold(n_folds, shuffle=True, random_state=random_state).split(
                np.empty(len(y_fit))
            )
        ]
        ref = PerQueryInfluence(
            damping=estimator.damping,
            cg_tol=estimator.cg_tol,
            cg_maxiter=estimator.cg_maxiter,
            batch_size=estimator.batch_size,
            loss=estimator.loss,
            params=estimator.params,
            device=estimator.device,
            query_mode="batched",
        ).fit(estimator._get_fmodel().source_model, X_fit, y_fit)
        args = () if effect == "self" else (X, y)
        # Fidelity to per-query IF: compare like with like (first order).
        ours = estimator.loss_change(folds, *args, target="if")
        return float(stats.spearmanr(ours, ref.loss_change(folds, *args)).statistic)

    return score
