"""The residual self-influence correction against dense oracles (issue 5)."""

import numpy as np
import pytest
import torch.nn.functional as F
from _models import trained_mlp
from _oracles import dense_ggn, loop_grads

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
    # With a rank >= p the spectral inverse is exact: the calibration scale is
    # 1 (to the calibration solve's bound), self_influence_ = r_i^T H^-1 r_i,
    # and only off-diagonal residual pairs are missing from per-query IF.
    from sklearn_cif._build import CALIBRATION_TOL

    net, X, y, g, Hinv = dense
    est = _fit(net, X, y, "full", rank=64)  # p = 43
    mu = np.stack([g[est.labels_ == c].mean(0) for c in range(est.n_clusters_)])
    R = g - mu[est.labels_]
    exact_self = np.einsum("ip,pq,iq->i", R, Hinv, R)
    scale = est.correction_scale_
    assert 1 - CALIBRATION_TOL <= scale <= 1 + 1e-9
    np.testing.assert_allclose(est.self_influence_ / scale, exact_self, rtol=1e-6)
    N = len(y)
    for S, got in zip(SUBSETS, est.loss_change(SUBSETS, target="if"), strict=True):
        a, b = g[S].sum(0), R[S].sum(0)
        off_diag = b @ Hinv @ b - est.self_influence_[S].sum()
        ref = (a @ Hinv @ a - off_diag) / (N * len(S))
        assert got == pytest.approx(ref, rel=1e-7)


def test_low_rank_correction_is_calibrated(dense):
    # With a rank far below p the calibrated self-influences stay close to
    # the exact ones on average (the scale absorbs the truncated spectrum).
    net, X, y, g, Hinv = dense
    est = _fit(net, X, y, "full", rank=4)
    mu = np.stack([g[est.labels_ == c].mean(0) for c in range(est.n_clusters_)])
    R = g - mu[est.labels_]
    exact_self = np.einsum("ip,pq,iq->i", R, Hinv, R)
    assert est.self_influence_.sum() == pytest.approx(exact_self.sum(), rel=0.2)
    assert np.corrcoef(est.self_influence_, exact_self)[0, 1] > 0.9


def test_correction_vanishes_with_one_cluster_per_example(dense):
    # n_clusters = N: no residuals, no correction; exact IF is recovered.
    net, X, y, g, Hinv = dense
    est = _fit(net, X, y, "auto", C=len(y))
    assert np.all(est.self_influence_ == 0) and est.correction_scale_ == 0.0
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


@pytest.mark.parametrize("rank", [2, 8])
def test_calibration_solve_stops_within_its_bound(dense, rank):
    # The calibration solve stops once sum_i r_i^T x_i is within
    # CALIBRATION_TOL of sum_i r_i^T H^-1 r_i (it approaches from below), so
    # the scale lies in [(1 - tol) s*, s*] for the exact (dense) scale s* over
    # the same examples (here all of them), even with a tight cg_tol.
    from sklearn_cif._build import CALIBRATION_TOL

    net, X, y, g, Hinv = dense
    est = ClusteredInfluenceEstimator(
        3, loss="cross_entropy", damping=LAM, cg_tol=1e-12, solver="cg",
        correction_rank=rank, n_calibration=len(y), random_state=0,
    ).fit(net, X, y)  # fmt: skip
    mu = np.stack([g[est.labels_ == c].mean(0) for c in range(est.n_clusters_)])
    R = g - mu[est.labels_]
    exact_self = np.einsum("ip,pq,iq->i", R, Hinv, R)
    d_raw = est.self_influence_ / est.correction_scale_
    exact_scale = exact_self.sum() / d_raw.sum()
    assert (1 - CALIBRATION_TOL) * exact_scale <= est.correction_scale_
    assert est.correction_scale_ <= exact_scale * (1 + 1e-9)
