"""Exact refits of models whose outputs are linear in their parameters.

Oracle: scikit-learn's own ``LogisticRegression`` (``newton-cg`` to a
tolerance of 1e-12) refit without each subset, an optimization that shares
no code with the package. Raw digits features (0..16, every other pixel)
make the removal objective badly scaled, so one Newton step is visibly off
and the exact refit has to work.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import KFold, ShuffleSplit

from sklearn_cif import ClusteredInfluenceEstimator, InfluenceCV, _exact_refit

LAM = 1e-3
# scikit-learn's newton-cg warns when its line search has nothing left to gain
pytestmark = [
    pytest.mark.filterwarnings("ignore:The line search algorithm did not converge"),
    pytest.mark.filterwarnings("ignore:Line Search failed"),
]


@pytest.fixture(scope="module")
def raw_digits():
    X, y = load_digits(return_X_y=True)
    return X[:240, ::2].astype(np.float64), y[:240]


def _sk_fit(X, y, n_total, fit_intercept):
    # (1/N) sum CE + LAM/2 ||w||^2 with the full N: scikit-learn's C = 1/(LAM N)
    return LogisticRegression(
        C=1.0 / (LAM * n_total),
        fit_intercept=fit_intercept,
        solver="newton-cg",
        tol=1e-12,
        max_iter=10_000,
    ).fit(X, y)


def _torch_logreg(sk, dtype=torch.float64, softmax=False):
    lin = torch.nn.Linear(*sk.coef_.shape[::-1], bias=False, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(torch.as_tensor(sk.coef_))
    layers = [lin, torch.nn.Softmax(dim=-1)] if softmax else [lin]
    return torch.nn.Sequential(*layers)


def _folds(n):
    kf = [t for _, t in KFold(6, shuffle=True, random_state=0).split(np.arange(n))]
    ss = [t for _, t in ShuffleSplit(2, test_size=0.1, random_state=1).split(
        np.arange(n))]  # fmt: skip
    return [np.sort(t) for t in kf[:3] + ss] + [np.array([5]), np.array([77])]


def _refits(X, y, folds, fit_intercept):
    """Each fold's actual mean cross-entropy change and out-of-fold scores."""
    full = _sk_fit(X, y, len(y), fit_intercept)
    deltas, scores = [], []
    for S in folds:
        keep = np.setdiff1d(np.arange(len(y)), S)
        refit = _sk_fit(X[keep], y[keep], len(y), fit_intercept)
        z_new = torch.as_tensor(refit.decision_function(X[S]))
        z_old = torch.as_tensor(full.decision_function(X[S]))
        t = torch.as_tensor(y[S])
        deltas.append(float(F.cross_entropy(z_new, t) - F.cross_entropy(z_old, t)))
        scores.append(refit.decision_function(X[S]))
    return full, np.array(deltas), scores


@pytest.mark.parametrize("model_kind", ["torch", "sklearn"])
def test_linear_model_refit_is_exact(raw_digits, model_kind, monkeypatch):
    X, y = raw_digits
    folds = _folds(len(y))
    fit_intercept = model_kind == "sklearn"
    full, actual, scores = _refits(X, y, folds, fit_intercept)
    if model_kind == "torch":
        model, kw = _torch_logreg(full), dict(damping=LAM, loss="cross_entropy")
    else:  # the adapter derives the damping from C; the intercept is free
        model, kw = full, {}
    est = ClusteredInfluenceEstimator(8, random_state=0, **kw).fit(model, X, y)
    assert est.solver_ == "dense" and est.linear_outputs_
    fe = est.fold_effects(folds, target="retrain")
    np.testing.assert_allclose(fe.delta_loss, actual, rtol=1e-5, atol=1e-12)
    for q in range(len(folds)):
        got = fe.oof_outputs[fe.fold_bounds[q] : fe.fold_bounds[q + 1]]
        np.testing.assert_allclose(got, scores[q], atol=1e-5)
    assert np.all(fe.newton_iterations[:5] > 0)  # the subsets of 12+ examples
    assert not fe.safeguarded.any()
    # One Newton step alone is off on this badly scaled problem: the test
    # would fail without the iteration.
    monkeypatch.setattr(_exact_refit, "refit_applies", lambda cache: False)
    one = est.fold_effects(folds, target="retrain").delta_loss
    assert np.max(np.abs(one / actual - 1)) > 0.05


def test_evaluation_set_change_follows_the_refit(raw_digits):
    # loss_change(S, X_V, y_V, target="retrain") is g_V^T d with d the
    # actual refit's parameter change.
    X, y = raw_digits
    folds = _folds(len(y))[:3]
    full = _sk_fit(X, y, len(y), False)
    net = _torch_logreg(full)
    est = ClusteredInfluenceEstimator(
        len(y), damping=LAM, loss="cross_entropy", random_state=0
    ).fit(net, X, y)
    XV, yV = X[200:230] + 1.0, y[200:230]
    w = net[0].weight
    w.requires_grad_(True)
    loss_v = F.cross_entropy(net(torch.as_tensor(XV)), torch.as_tensor(yV))
    (g_v,) = torch.autograd.grad(loss_v, w)
    expect = []
    for S in folds:
        keep = np.setdiff1d(np.arange(len(y)), S)
        refit = _sk_fit(X[keep], y[keep], len(y), False)
        expect.append(float((g_v * torch.as_tensor(refit.coef_ - full.coef_)).sum()))
    got = est.loss_change(folds, XV, yV, target="retrain")
    np.testing.assert_allclose(got, expect, rtol=1e-5)


def test_softmax_probabilities_refit_like_the_logits_model(raw_digits):
    # skorch's default classifier: a softmax output with NLLLoss on its log.
    # Its log-probabilities are the logits up to a shift the loss ignores,
    # so the probe finds it linear and its answers are the logits model's.
    # (Unit-range features keep every probability far above the eps that
    # skorch's loss adds; below it the loss is not linear in the logits.)
    X, y = raw_digits
    X = X / 16.0
    full = _sk_fit(X, y, len(y), False)
    folds = _folds(len(y))[:4]
    answers = {}
    for loss, softmax in [("cross_entropy", False), ("nll_proba", True)]:
        net = _torch_logreg(full, softmax=softmax)
        est = ClusteredInfluenceEstimator(
            8, damping=LAM, loss=loss, random_state=0
        ).fit(net, X, y)
        assert est.linear_outputs_
        answers[loss] = est.fold_effects(folds, target="retrain").delta_loss
    np.testing.assert_allclose(
        answers["nll_proba"], answers["cross_entropy"], rtol=1e-5
    )


def test_float32_linear_model_is_found_linear(raw_digits):
    X, y = raw_digits
    net = _torch_logreg(_sk_fit(X, y, len(y), False), dtype=torch.float32)
    est = ClusteredInfluenceEstimator(
        8, damping=LAM, loss="cross_entropy", random_state=0
    ).fit(net, X.astype(np.float32), y)
    assert est.linear_outputs_


def test_a_nonlinear_model_keeps_one_newton_step(tiny_classification):
    net, X, y = tiny_classification
    est = ClusteredInfluenceEstimator(
        5, damping=0.05, loss="cross_entropy", curvature="ggn", random_state=0
    ).fit(net, X, y)
    assert est.solver_ == "dense" and not est.linear_outputs_
    cv = InfluenceCV(est, cv=KFold(5)).fit(net, X, y)
    assert np.all(cv.cv_results_["newton_iterations"] == 0)


def test_cg_path_is_not_probed(raw_digits):
    X, y = raw_digits
    net = _torch_logreg(_sk_fit(X, y, len(y), False))
    est = ClusteredInfluenceEstimator(
        8, damping=LAM, loss="cross_entropy", solver="cg", random_state=0
    ).fit(net, X, y)
    assert not est.linear_outputs_


def test_unconverged_refit_warns(raw_digits, monkeypatch):
    X, y = raw_digits
    net = _torch_logreg(_sk_fit(X, y, len(y), False))
    est = ClusteredInfluenceEstimator(
        8, damping=LAM, loss="cross_entropy", random_state=0
    ).fit(net, X, y)
    monkeypatch.setattr(_exact_refit, "MAX_NEWTON_ITER", 1)
    with pytest.warns(ConvergenceWarning, match="did not converge in 1 Newton"):
        fe = est.fold_effects(_folds(len(y))[:3], target="retrain")
    assert np.all(np.isfinite(fe.delta_loss))
