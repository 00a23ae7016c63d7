"""The residual self-influence correction against dense oracles (issue 5)."""

import numpy as np
import pytest
import torch.nn.functional as F
from _models import trained_mlp
from _oracles import dense_ggn, loop_grads, output_terms

from sklearn_cif import ClusteredInfluenceEstimator, PerQueryInfluence

CE = lambda z, y: F.cross_entropy(z, y, reduction="none")  # noqa: E731
LAM = 0.05
SUBSETS = [np.array([0, 4, 9]), np.arange(10, 22), np.array([29, 1, 2, 3, 17])]


@pytest.fixture
def dense(tiny_classification):
    net, X, y = tiny_classification
    g = loop_grads(net, CE, X, y).numpy()
    Hinv = np.linalg.inv(dense_ggn(net, CE, X, y, LAM).numpy())
    return net, X, y, g, Hinv


def _fit(net, X, y, correction, C=3, rank=64):
    # the CG solver's approximations (the dense one keeps every eigenpair)
    kw = dict(
        loss="cross_entropy", damping=LAM, cg_tol=1e-12, solver="cg", random_state=0
    )
    return ClusteredInfluenceEstimator(
        C, residual_correction=correction, correction_rank=rank, **kw
    ).fit(net, X, y)


def test_cross_term_is_exact(dense):
    # "cross" = a^T H^-1 a_mu + a_mu^T H^-1 b, computed densely per subset.
    net, X, y, g, Hinv = dense
    est = _fit(net, X, y, "cross")
    mu = np.stack([g[est.labels_ == c].mean(0) for c in range(est.n_clusters_)])
    N = len(y)
    for S, got in zip(SUBSETS, est.loss_change(SUBSETS, target="if"), strict=True):
        a, a_mu = g[S].sum(0), mu[est.labels_[S]].sum(0)
        b = a - a_mu
        ref = (a @ Hinv @ a_mu + a_mu @ Hinv @ b) / (N * len(S))
        assert got == pytest.approx(ref, rel=1e-7)


def test_full_correction_adds_exact_self_influence(dense):
    # With a rank >= p the kept part is all of r_i^T H^-1 r_i, so
    # self_influence_ is exact and only off-diagonal residual pairs are
    # missing from per-query IF.
    net, X, y, g, Hinv = dense
    est = _fit(net, X, y, "full", rank=64)  # p = 43
    mu = np.stack([g[est.labels_ == c].mean(0) for c in range(est.n_clusters_)])
    R = g - mu[est.labels_]
    exact_self = np.einsum("ip,pq,iq->i", R, Hinv, R)
    np.testing.assert_allclose(est.self_influence_, exact_self, rtol=1e-6)
    N = len(y)
    for S, got in zip(SUBSETS, est.loss_change(SUBSETS, target="if"), strict=True):
        a, b = g[S].sum(0), R[S].sum(0)
        off_diag = b @ Hinv @ b - est.self_influence_[S].sum()
        ref = (a @ Hinv @ a - off_diag) / (N * len(S))
        assert got == pytest.approx(ref, rel=1e-7)


def _complement_model(est, net, X, y, R, beta):
    r"""Dense oracle of the self-influence model: the kept part through the
    estimator's eigenpairs plus :math:`r_\perp^\top (\beta I + A_i^\top
    H_i A_i / N)^{-1} r_\perp` by a p x p solve per example."""
    U, theta = est.spectral_basis_, est.spectrum_
    J, H = (t.numpy() for t in output_terms(net, CE, X, y))
    N, p = R.shape
    out_proj = np.eye(p) - U.T @ U
    kept = ((R @ U.T) ** 2 / theta).sum(1)
    model = np.empty(N)
    for i in range(N):
        A = J[i] @ out_proj
        r_perp = out_proj @ R[i]
        M = beta * np.eye(p) + A.T @ H[i] @ A / N
        model[i] = r_perp @ np.linalg.solve(M, r_perp)
    return kept, model


@pytest.mark.parametrize("rank", [4, 12])
def test_self_influence_is_the_calibrated_complement_model(dense, rank):
    # self_influence_ = kept part + the own-share model at the calibrated
    # beta (checked against a p x p oracle of the model), and beta makes the
    # model match the exact r_i^T H^-1 r_i of the calibration examples (all
    # of them here) in geometric mean, to the calibration solve's bound.
    from sklearn_cif._build import CALIBRATION_TOL

    net, X, y, g, Hinv = dense
    est = ClusteredInfluenceEstimator(
        3, loss="cross_entropy", damping=LAM, cg_tol=1e-12, solver="cg",
        correction_rank=rank, n_calibration=len(y), random_state=0,
    ).fit(net, X, y)  # fmt: skip
    mu = np.stack([g[est.labels_ == c].mean(0) for c in range(est.n_clusters_)])
    R = g - mu[est.labels_]
    beta = est.complement_curvature_
    assert LAM <= beta <= est.spectrum_[-1]
    kept, model = _complement_model(est, net, X, y, R, beta)
    np.testing.assert_allclose(est.self_influence_, kept + model, rtol=1e-6)
    exact_self = np.einsum("ip,pq,iq->i", R, Hinv, R)
    log_ratio = np.mean(np.log(est.self_influence_ / exact_self))
    assert abs(log_ratio) <= 2 * CALIBRATION_TOL
    if rank == 4:  # the own share matters here: the background alone differs
        U = est.spectral_basis_
        background = ((R * R).sum(1) - ((R @ U.T) ** 2).sum(1)) / beta
        assert np.max(np.abs(model / background - 1)) > 0.05


def test_low_rank_self_influence_tracks_each_example(dense):
    # With a rank far below p the self-influences stay close to the exact
    # ones example by example, not only on average.
    net, X, y, g, Hinv = dense
    est = _fit(net, X, y, "full", rank=4)
    mu = np.stack([g[est.labels_ == c].mean(0) for c in range(est.n_clusters_)])
    R = g - mu[est.labels_]
    exact_self = np.einsum("ip,pq,iq->i", R, Hinv, R)
    ratio = est.self_influence_ / exact_self
    assert 0.9 <= np.median(ratio) <= 1.1
    assert np.corrcoef(est.self_influence_, exact_self)[0, 1] > 0.9


def test_correction_vanishes_with_one_cluster_per_example(dense):
    # n_clusters = N: no residuals, no correction; exact IF is recovered.
    net, X, y, g, Hinv = dense
    est = _fit(net, X, y, "auto", C=len(y))
    assert np.all(est.self_influence_ == 0)
    N = len(y)
    ref = [g[S].sum(0) @ Hinv @ g[S].sum(0) / (N * len(S)) for S in SUBSETS]
    np.testing.assert_allclose(est.loss_change(SUBSETS, target="if"), ref, rtol=1e-7)


def test_correction_leaves_param_change_plain(dense):
    # param_change is plain CiF whatever the correction.
    net, X, y, *_ = dense
    a, b = _fit(net, X, y, "none"), _fit(net, X, y, "full")
    np.testing.assert_allclose(a.param_change(SUBSETS), b.param_change(SUBSETS))


@pytest.mark.slow
def test_plain_cif_error_stays_below_the_paper_bound(digits):
    # Mean ||dtheta_S - dtheta_hat_S|| over random subsets of several sizes,
    # against exact per-query IF, is below error_bound(m).total.
    X, y = digits
    X, y = X[:500], y[:500]
    net = trained_mlp(X, y, hidden=16, weight_decay=1e-2, epochs=200)
    kw = dict(loss="cross_entropy", damping=1e-2, cg_tol=1e-6)
    cif = ClusteredInfluenceEstimator(20, random_state=0, **kw).fit(net, X, y)
    pq = PerQueryInfluence(query_mode="batched", **kw).fit(net, X, y)
    rng = np.random.default_rng(0)
    for m in (1, 10, 100):
        subsets = [rng.choice(500, m, replace=False) for _ in range(15)]
        err = np.linalg.norm(
            cif.param_change(subsets) - pq.param_change(subsets), axis=1
        )
        bound = cif.error_bound(m)
        print(f"m={m}: mean error {err.mean():.4g}, bound {bound.total:.4g}")
        assert err.mean() < bound.total, (m, err.mean(), bound)
