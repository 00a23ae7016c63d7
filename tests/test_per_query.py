"""PerQueryInfluence: one solve per query, checked against dense solves."""

import numpy as np
import pytest
import torch
from _oracles import dense_influence, flat_params, make_f

from sklearn_cif import ClusteredInfluenceEstimator, PerQueryInfluence

CE = torch.nn.CrossEntropyLoss(reduction="none")
LAM = 0.05
FOLDS = [np.arange(0, 6), np.array([3, 17, 21]), np.array([11])]


@pytest.mark.parametrize("mode", ["sequential", "batched"])
def test_queries_match_dense_solves(tiny_classification, mode):
    # param_change, self and evaluation-set loss_change, transform and
    # fold_effects against a dense (G + lambda I)^{-1} built with autograd.
    net, X, y = tiny_classification
    pq = PerQueryInfluence(
        loss="cross_entropy", damping=LAM, cg_tol=1e-12, query_mode=mode
    ).fit(net, X, y)
    dtheta, g, H = dense_influence(net, CE, X, y, LAM, FOLDS)
    np.testing.assert_allclose(pq.param_change(FOLDS), dtheta.numpy(), rtol=1e-8)
    own = [float(g[f].mean(0) @ d) for f, d in zip(FOLDS, dtheta, strict=True)]
    np.testing.assert_allclose(pq.loss_change(FOLDS), own, rtol=1e-8)
    g_v = g[:10].mean(0)
    np.testing.assert_allclose(
        pq.loss_change(FOLDS, X[:10], y[:10]), (dtheta @ g_v).numpy(), rtol=1e-8
    )
    T = g[:4] @ torch.linalg.solve(H, g.T)  # (4, N)
    np.testing.assert_allclose(pq.transform(X[:4], y[:4]), T.numpy(), rtol=1e-7)
    eff = pq.fold_effects(FOLDS)
    f, theta = make_f(net), flat_params(net)
    for q, fold in enumerate(FOLDS):
        lo, hi = eff.fold_bounds[q], eff.fold_bounds[q + 1]
        np.testing.assert_array_equal(eff.oof_indices[lo:hi], np.sort(fold))
        xs = X[np.sort(fold)]
        _, jvp = torch.func.jvp(lambda t: f(t, xs), (theta,), (dtheta[q],))  # noqa: B023
        np.testing.assert_allclose(
            eff.oof_outputs[lo:hi], (f(theta, xs) + jvp).detach().numpy(), rtol=1e-8
        )
        loss = float(CE(f(theta, X[fold]), y[fold]).mean())
        np.testing.assert_allclose(eff.loss_in_sample[q], loss, rtol=1e-12)
    assert eff.target == "if" and pq.n_solves_ == 3 * len(FOLDS) + 4 + len(FOLDS)


def test_first_order_only(tiny_classification):
    # target="retrain" is refused by name; "auto" is first order.
    net, X, y = tiny_classification
    pq = PerQueryInfluence(loss="cross_entropy").fit(net, X, y)
    assert pq.available_targets() == ("if",)
    assert pq.fold_effects(FOLDS, target="auto").target == "if"
    with pytest.raises(ValueError, match="first-order influence only"):
        pq.loss_change(FOLDS, target="retrain")


def test_same_random_state_same_curvature_sample(tiny_classification):
    # CiF and PerQueryInfluence draw the curvature subsample from one named seed.
    net, X, y = tiny_classification
    for seed in (0, 7):
        kw = dict(loss="cross_entropy", curvature_samples=11, random_state=seed)
        cif = ClusteredInfluenceEstimator(4, **kw).fit(net, X, y)
        pq = PerQueryInfluence(**kw).fit(net, X, y)
        assert len(cif.curvature_indices_) == 11
        np.testing.assert_array_equal(cif.curvature_indices_, pq.curvature_indices_)
