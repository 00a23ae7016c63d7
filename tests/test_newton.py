"""Leave-k-out Newton step and the fold's loss change (``target="retrain"``).

Oracles: the dense Newton step ``(H - (m/N) G_S)^{-1} b`` with explicit
``G_S`` and the fold's loss at the outputs ``f + J d_N`` it predicts; a
direct dense solve of the fold's output-space system; and actual retraining
of a logistic regression by LBFGS.
"""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _models import make_mlp
from _oracles import dense_ggn, dense_hessian, dense_influence, flat_params, make_f
from sklearn.model_selection import KFold

from sklearn_cif import (
    CIFWarning,
    ClusteredInfluenceEstimator,
    InfluenceCV,
    PerQueryInfluence,
)
from sklearn_cif._newton import newton_effects
from sklearn_cif._subsets import subset_indicator

LAM = 0.05
CE = torch.nn.CrossEntropyLoss(reduction="none")
MSE = lambda out, t: ((out - t) ** 2).mean(1)  # noqa: E731
# sorted folds: answers list members in sorted order
FOLDS = [np.arange(0, 6), np.array([3, 17, 21]), np.array([11]), np.arange(12, 24)]


def _dense_newton(net, loss_fn, X, y, folds, H=None, lam=LAM):
    """Dense Newton step: the fold's loss change at its outputs, and the outputs.

    ``H``: the damped curvature (default: the Gauss-Newton matrix); the
    fold's share removed from it is its Gauss-Newton part either way.
    """
    n = len(y)
    _, g, H_ggn = dense_influence(net, loss_fn, X, y, lam, folds)
    H = H_ggn if H is None else H
    f, theta = make_f(net), flat_params(net)
    deltas, outs = [], []
    for S in folds:
        m = len(S)
        G_S = dense_ggn(net, loss_fn, X[S], y[S], 0.0)
        d_N = torch.linalg.solve(H - m / n * G_S, g[S].sum(0) / n)
        J = torch.autograd.functional.jacobian(lambda th, xs=X[S]: f(th, xs), theta)
        out = (f(theta, X[S]) + J @ d_N).detach()
        # the loss of the fold at its predicted outputs (for a quadratic loss
        # this is g_S^T d_N + d_N^T G_S d_N / 2)
        before = loss_fn(f(theta, X[S]).detach(), y[S])
        deltas.append((loss_fn(out, y[S]) - before).mean().item())
        outs.append(out.reshape(m, -1).numpy())
    return np.array(deltas), np.concatenate(outs)


@pytest.mark.parametrize("solver", ["dense", "cg"])
@pytest.mark.parametrize("task", ["classification", "regression", "five_classes"])
def test_woodbury_path_reproduces_the_dense_newton_step(
    task, solver, tiny_classification, tiny_regression, five_classes
):
    # With one cluster per example and every eigenpair kept (the dense
    # solver, or CG at full rank), the cached Woodbury path is the dense
    # Newton step and the loss at its predicted outputs (float64).
    net, X, y = {
        "classification": tiny_classification,
        "regression": tiny_regression,
        "five_classes": five_classes,
    }[task]
    loss, loss_fn = ("mse", MSE) if task == "regression" else ("cross_entropy", CE)
    p = sum(q.numel() for q in net.parameters())
    est = ClusteredInfluenceEstimator(
        len(y),
        loss=loss,
        damping=LAM,
        cg_tol=1e-13,
        correction_rank=p,
        solver=solver,
        random_state=0,
    ).fit(net, X, y)
    assert est.solver_ == solver
    ref, ref_out = _dense_newton(net, loss_fn, X, y, FOLDS)
    eff = est.fold_effects(FOLDS, target="retrain")
    np.testing.assert_allclose(eff.delta_loss, ref, rtol=1e-8)
    np.testing.assert_allclose(est.loss_change(FOLDS, target="retrain"), ref, rtol=1e-8)
    # FOLDS are sorted, so the reference lists members in CSR order
    np.testing.assert_allclose(eff.oof_outputs, ref_out, rtol=1e-8, atol=1e-10)
    # the Newton step is not the first-order effect
    assert np.all(np.abs(eff.delta_loss - eff.delta_loss_if) > 1e-4 * np.abs(ref))


@pytest.mark.parametrize("background", [None, 0.7])
@pytest.mark.parametrize("r", [4, 40])
def test_low_rank_plus_block_diagonal_solve_matches_dense_algebra(r, background):
    # newton_effects at a partial rank equals a direct dense solve of the
    # same approximate output-space system (independent linear algebra);
    # r = 4 takes the eigendirection path (m d > r), r = 40 the output-space
    # path (m d <= r). The complement within each example is uniform (c) or
    # the background-plus-own-share model, here by the push-through form
    # A (beta + A^T H A / N)^-1 = (beta + B H / N)^-1 A, B = A A^T.
    rng = np.random.default_rng(0)
    n, d, N = 7, 3, 50
    F_ = rng.normal(size=(n, d, r)) * 0.7 / np.sqrt(r)
    Jfull = rng.normal(size=(n, d, 9))
    gram = Jfull @ Jfull.transpose(0, 2, 1) + np.einsum("ndr,ner->nde", F_, F_)
    A = rng.normal(size=(n, d, d))
    hess = A @ A.transpose(0, 2, 1) / d
    feats = {
        "F": F_,
        "gram": gram,
        "hess": hess,
        "Jr": rng.normal(size=(n, d)),
        "Ur": rng.normal(size=(n, r)),
    }
    D, c = rng.uniform(0.5, 2.0, size=r), 0.3
    folds = [np.array([0, 2, 5]), np.array([1, 3, 4, 6])]
    ind = subset_indicator(folds, n)
    first = rng.normal(size=2)
    w_means = rng.normal(size=(ind.nnz, d))
    res = newton_effects(ind, first, w_means, N, D, c, feats, background=background)
    delta, out = res.delta, res.out_change
    assert not res.safeguarded.any()
    assert not np.isnan(res.leverage).any()

    def within(i, rhs):  # the complement's inverse within example i
        B = gram[i] - F_[i] @ F_[i].T
        if background is None:
            return c * rhs
        return np.linalg.solve(background * np.eye(d) + B @ hess[i] / N, rhs)

    for q, S in enumerate(folds):
        lo, hi = ind.indptr[q], ind.indptr[q + 1]
        m = len(S)
        Fs = F_[S].reshape(m * d, r)
        K = Fs @ np.diag(D) @ Fs.T
        for a, i in enumerate(S):  # complement within each example only
            K[a * d : (a + 1) * d, a * d : (a + 1) * d] += within(
                i, gram[i] - F_[i] @ F_[i].T
            )
        Hs = np.zeros((m * d, m * d))
        for a, i in enumerate(S):
            Hs[a * d : (a + 1) * d, a * d : (a + 1) * d] = hess[i]
        # J_i H^-1 r_j: through U for all pairs, complement only for j = i
        own = feats["Jr"][S] - np.einsum("mdr,mr->md", F_[S], feats["Ur"][S])
        Jr = F_[S] @ (D * feats["Ur"][S].sum(0)) + np.stack(
            [within(i, own[a]) for a, i in enumerate(S)]
        )
        w = (w_means[lo:hi] + Jr / N).reshape(-1)
        z = Hs / N @ np.linalg.solve(np.eye(m * d) - K @ Hs / N, w)
        o = w + K @ z
        ref = first[q] + N / m * w @ z + o @ Hs @ o / (2 * m)
        assert delta[q] == pytest.approx(ref, rel=1e-10)
        np.testing.assert_allclose(out[lo:hi].reshape(-1), o, rtol=1e-10)
        assert res.amplification[q] == pytest.approx(
            np.linalg.norm(o) / np.linalg.norm(w)
        )
        # leverage: top eigenvalue of the symmetric form (Lanczos at r = 4)
        ev, Qv = np.linalg.eigh(Hs)
        root = Qv @ np.diag(np.sqrt(np.clip(ev, 0, None))) @ Qv.T
        lev = np.linalg.eigvalsh(root @ K @ root / N)[-1]
        assert res.leverage[q] == pytest.approx(lev, rel=1e-10 if r == 40 else 1e-4)


def test_a_large_fold_past_leverage_one_takes_a_damped_step():
    # A fold larger than the kept rank (m d > r: solved through the
    # eigendirections) whose leverage exceeds MAX_LEVERAGE: its removed share
    # is scaled by MAX_LEVERAGE / leverage, so the step equals a dense solve
    # with that share and grows at most 1 / (1 - MAX_LEVERAGE)-fold.
    from sklearn_cif._newton import MAX_LEVERAGE

    N, r, m = 10, 1, 3
    F_ = np.array([[[2.0]], [[2.0]], [[1.0]]])  # (m, d=1, r=1)
    feats = {
        "F": F_,
        "gram": F_ @ F_.transpose(0, 2, 1),  # nothing outside U
        "hess": np.full((m, 1, 1), 2.0),
        "Jr": np.zeros((m, 1)),
        "Ur": np.zeros((m, r)),
    }
    ind = subset_indicator([np.arange(m)], m)
    w = np.array([[0.5], [0.2], [0.1]])
    res = newton_effects(ind, np.array([0.1]), w, N, np.ones(r), 0.0, feats)
    K = F_[:, 0] @ F_[:, 0].T  # (m, m), rank one
    lev = 2.0 * np.linalg.eigvalsh(K)[-1] / N  # 2 * 9 / 10 = 1.8
    assert res.leverage[0] == pytest.approx(lev, rel=1e-6)
    assert res.safeguarded[0]
    H = 2.0 * MAX_LEVERAGE / lev * np.eye(m)
    x = np.linalg.solve(np.eye(m) - K @ H / N, w[:, 0])
    np.testing.assert_allclose(res.out_change[:, 0], w[:, 0] + K @ H @ x / N)
    assert res.amplification[0] <= 1 / (1 - MAX_LEVERAGE) + 1e-9


def test_a_fold_past_leverage_one_is_clipped_not_flipped():
    # One example whose curvature share exceeds what the (approximate)
    # inverse allows: leverage > 1 makes the plain Newton step change sign;
    # the safeguard clips it at MAX_LEVERAGE, bounding the amplification.
    from sklearn_cif._newton import MAX_LEVERAGE

    N, r = 10, 3
    F_ = np.array([[[3.0, 0.0, 0.0]]])
    feats = {
        "F": F_,
        "gram": np.array([[[9.0]]]),
        "hess": np.array([[[2.0]]]),
        "Jr": np.zeros((1, 1)),
        "Ur": np.zeros((1, r)),
    }
    ind = subset_indicator([np.array([0])], 1)
    w = np.array([[0.5]])
    res = newton_effects(ind, np.array([0.1]), w, N, np.ones(r), 0.0, feats)
    # K H / N = 9 * 2 / 10 = 1.8: unclipped the step would be w / (1 - 1.8)
    assert res.leverage[0] == pytest.approx(1.8)
    assert res.safeguarded[0]
    assert res.out_change[0, 0] == pytest.approx(0.5 / (1 - MAX_LEVERAGE))
    assert res.amplification[0] == pytest.approx(1 / (1 - MAX_LEVERAGE))
    # With the Hessian the removal curvature may be indefinite for real: the
    # saddle-free rule amplifies by 1 / |1 - 1.8| (sign kept, not 100-fold);
    # leverage within 0.01 of 1 is still capped at 1 / (1 - MAX_LEVERAGE).
    res = newton_effects(
        ind, np.array([0.1]), w, N, np.ones(r), 0.0, feats, indefinite=True
    )
    assert res.safeguarded[0]
    assert res.out_change[0, 0] == pytest.approx(0.5 / 0.8)
    assert res.amplification[0] == pytest.approx(1 / 0.8)
    feats["gram"], feats["F"] = np.array([[[5.0]]]), np.array([[[5**0.5, 0, 0]]])
    res = newton_effects(  # K H / N = 5 * 2 / 10 = 1.0 exactly
        ind, np.array([0.1]), w, N, np.ones(r), 0.0, feats, indefinite=True
    )
    assert res.amplification[0] == pytest.approx(1 / (1 - MAX_LEVERAGE))


@pytest.mark.parametrize("n_clusters", [1, 5, None])
def test_dense_solver_is_exact_whatever_the_clustering(n_clusters, tiny_classification):
    # With every eigenpair, the residual correction and the Newton step see
    # the exact inverse: the self effects equal dense per-query IF and the
    # dense Newton step for any number of clusters (1e-8, float64).
    net, X, y = tiny_classification
    C = len(y) if n_clusters is None else n_clusters
    est = ClusteredInfluenceEstimator(
        C, loss="cross_entropy", damping=LAM, solver="dense", random_state=0
    ).fit(net, X, y)
    dtheta, g, _ = dense_influence(net, CE, X, y, LAM, FOLDS)
    exact_if = np.array(
        [(g[S].mean(0) @ d).item() for S, d in zip(FOLDS, dtheta, strict=True)]
    )
    ref, ref_out = _dense_newton(net, CE, X, y, FOLDS)
    np.testing.assert_allclose(
        est.fold_effects(FOLDS, target="if").delta_loss, exact_if, rtol=1e-8
    )
    eff = est.fold_effects(FOLDS, target="retrain")
    np.testing.assert_allclose(eff.delta_loss, ref, rtol=1e-8)
    np.testing.assert_allclose(eff.oof_outputs, ref_out, rtol=1e-8, atol=1e-10)
    assert est.complement_curvature_ is None and est.complement_ == 0.0
    assert (eff.leverage < 1).all() and not eff.safeguarded.any()


def _tanh_mlp_at_optimum(X, y):
    """A 4-5-3 tanh MLP at a strict minimum of mean CE + LAM/2 ||theta||^2."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)
    ).double()
    return _lbfgs_optimum(X, y, LAM, init=net)


def test_auto_curvature_uses_the_hessian_at_an_optimum(tiny_classification):
    # At a strict minimum the dense default inverts the damped Hessian: the
    # responses, the first-order self effects and the Newton step equal
    # dense algebra with the autograd Hessian (the fold's share removed as
    # its Gauss-Newton part), for C = 5 and C = N; the Gauss-Newton answers
    # differ.
    _, X, y = tiny_classification
    net = _tanh_mlp_at_optimum(X, y)
    H = dense_hessian(net, CE, X, y, LAM)
    assert torch.linalg.eigvalsh(H)[0] > 0  # the premise: a strict minimum
    _, g, G = dense_influence(net, CE, X, y, LAM, FOLDS)
    ref, ref_out = _dense_newton(net, CE, X, y, FOLDS, H=H)
    exact_if, dtheta = [], []
    for S in FOLDS:
        dtheta.append(torch.linalg.solve(H, g[S].sum(0) / len(y)))
        exact_if.append((g[S].mean(0) @ dtheta[-1]).item())
    # per-query IF on the same curvature, by CG on Hessian-vector products
    pq = PerQueryInfluence(
        loss="cross_entropy", damping=LAM, curvature="hessian", cg_tol=1e-12
    ).fit(net, X, y)
    np.testing.assert_allclose(
        pq.param_change(FOLDS), torch.stack(dtheta).numpy(), rtol=1e-7, atol=1e-12
    )
    for C in (5, len(y)):
        est = ClusteredInfluenceEstimator(
            C, loss="cross_entropy", damping=LAM, random_state=0
        ).fit(net, X, y)
        assert (est.solver_, est.curvature_) == ("dense", "hessian")
        means = torch.stack([g[est.labels_ == c].mean(0) for c in range(C)])
        np.testing.assert_allclose(
            est.responses_,
            torch.linalg.solve(H, means.T).T.numpy(),
            rtol=1e-7,
            atol=1e-10,
        )
        np.testing.assert_allclose(
            est.fold_effects(FOLDS, target="if").delta_loss, exact_if, rtol=1e-8
        )
        eff = est.fold_effects(FOLDS)
        np.testing.assert_allclose(eff.delta_loss, ref, rtol=1e-8)
        np.testing.assert_allclose(eff.oof_outputs, ref_out, rtol=1e-8, atol=1e-10)
    ggn = ClusteredInfluenceEstimator(
        5, loss="cross_entropy", damping=LAM, curvature="ggn", random_state=0
    ).fit(net, X, y)
    assert ggn.curvature_ == "ggn"
    ref_ggn, _ = _dense_newton(net, CE, X, y, FOLDS)
    np.testing.assert_allclose(ggn.fold_effects(FOLDS).delta_loss, ref_ggn, rtol=1e-8)
    assert np.abs(ref_ggn - ref).max() > 1e-3 * np.abs(ref).max()


def test_auto_curvature_falls_back_to_the_ggn_off_a_minimum(tiny_classification):
    # An untrained net, off its optimum: "auto" uses the Gauss-Newton
    # matrix without building the Hessian (the optimality warning says
    # why); "hessian" refuses its indefinite Hessian; "hessian" with CG is
    # refused before any work.
    net, X, y = tiny_classification
    with pytest.warns(CIFWarning, match="not at the optimum"):
        est = ClusteredInfluenceEstimator(
            5, loss="cross_entropy", damping=1e-3, random_state=0
        ).fit(net, X, y)
    assert est.curvature_ == "ggn"
    assert est.n_ggn_products_ == sum(q.numel() for q in net.parameters())
    ref, _ = _dense_newton(net, CE, X, y, FOLDS, lam=1e-3)
    eff = est.fold_effects(FOLDS, target="retrain")
    np.testing.assert_allclose(eff.delta_loss, ref, rtol=1e-8)
    with pytest.warns(CIFWarning), pytest.raises(FloatingPointError, match="positive"):
        ClusteredInfluenceEstimator(
            5, loss="cross_entropy", damping=1e-3, curvature="hessian", random_state=0
        ).fit(net, X, y)
    with pytest.raises(ValueError, match="curvature='hessian' needs solver='dense'"):
        ClusteredInfluenceEstimator(
            5, loss="cross_entropy", curvature="hessian", solver="cg", random_state=0
        ).fit(net, X, y)


def test_auto_curvature_warns_at_a_saddle(tiny_classification):
    # Zero weights and the output bias at its optimum: every gradient is 0
    # (optimality_gap_ ~ 0), but the weights' cross terms make the Hessian
    # indefinite. "auto" says so and uses the Gauss-Newton matrix.
    _, X, y = tiny_classification
    lam = 1e-3
    net = torch.nn.Sequential(
        torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)
    ).double()
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
    bias = net[2].bias
    opt = torch.optim.LBFGS([bias], max_iter=200, tolerance_grad=1e-14)

    def closure():
        opt.zero_grad()
        loss = CE(net(X), y).mean() + 0.5 * lam * (bias * bias).sum()
        loss.backward()
        return loss

    opt.step(closure)
    assert torch.linalg.eigvalsh(dense_hessian(net, CE, X, y, lam))[0] < -lam
    with pytest.warns(CIFWarning, match="Hessian .* not positive definite"):
        est = ClusteredInfluenceEstimator(
            5, loss="cross_entropy", damping=lam, random_state=0
        ).fit(net, X, y)
    assert est.optimality_gap_ < 1e-4 and est.curvature_ == "ggn"
    ref, _ = _dense_newton(net, CE, X, y, FOLDS, lam=lam)
    np.testing.assert_allclose(est.fold_effects(FOLDS).delta_loss, ref, rtol=1e-8)


def _lbfgs_optimum(X, y, lam, keep=None, init=None):
    """``init`` (default: multinomial logistic regression) at its optimum.

    The optimum of (1/N) sum_{i in keep} CE_i + lam/2 ||theta||^2 (float64,
    N = len(y): the full-data scale, as a refit without a fold).
    """
    torch.manual_seed(0)
    net = torch.nn.Linear(X.shape[1], 10).double() if init is None else init
    xs, ys = (X, y) if keep is None else (X[keep], y[keep])
    opt = torch.optim.LBFGS(
        net.parameters(),
        max_iter=500,
        tolerance_grad=1e-10,
        tolerance_change=1e-15,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(net(xs), ys, reduction="sum") / len(y)
        loss = loss + 0.5 * lam * sum((q * q).sum() for q in net.parameters())
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    return net


def test_retrain_target_predicts_actual_retraining_better(digits):
    # Against warm-started LBFGS retraining without each fold, the Newton
    # estimate's median ratio is near 1, first-order IF's is not.
    X, y = digits
    X, y = torch.as_tensor(X[:400], dtype=torch.float64), torch.as_tensor(y[:400])
    lam = 1e-3
    net = _lbfgs_optimum(X, y, lam)
    folds = [np.sort(t) for _, t in KFold(20, shuffle=True, random_state=0).split(X)]
    actual = []
    for S in folds[:8]:
        keep = np.setdiff1d(np.arange(len(y)), S)
        refit = _lbfgs_optimum(X, y, lam, keep, copy.deepcopy(net))
        with torch.no_grad():
            actual.append(
                (
                    F.cross_entropy(refit(X[S]), y[S])
                    - F.cross_entropy(net(X[S]), y[S])
                ).item()
            )
    actual = np.array(actual)
    est = ClusteredInfluenceEstimator(
        20, loss="cross_entropy", damping=lam, cg_tol=1e-10, random_state=0
    ).fit(net, X, y)
    cv = [(np.setdiff1d(np.arange(len(y)), S), S) for S in folds[:8]]
    icv = InfluenceCV(est, cv=cv).fit(net, X, y)
    assert icv.target_ == "retrain"
    ratio_newton = np.median(icv.cv_results_["delta_loss"] / actual)
    ratio_if = np.median(icv.cv_results_["delta_loss_if"] / actual)
    assert 0.85 < ratio_newton < 1.15
    assert abs(np.log(ratio_newton)) < abs(np.log(ratio_if))


@pytest.mark.parametrize("n_clusters", [3, None])
def test_evaluation_set_newton_step_matches_the_dense_one(
    n_clusters, tiny_classification
):
    # loss_change(S, X_V, y_V, target="retrain") with the dense solver is
    # g_V^T (H - (m/N) G_S)^{-1} b exactly (float64), for any clustering
    # once the clustered first-order part is replaced by its exact value;
    # with one cluster per example it is exact as a whole.
    net, X, y = tiny_classification
    C = len(y) if n_clusters is None else n_clusters
    est = ClusteredInfluenceEstimator(
        C, loss="cross_entropy", damping=LAM, solver="dense", random_state=0
    ).fit(net, X, y)
    XV, yV = X[:9] + 0.1, y[:9]
    _, g, H = dense_influence(net, CE, X, y, LAM, FOLDS)
    g_v = dense_influence(net, CE, XV, yV, LAM, [np.arange(9)])[1].mean(0)
    n = len(y)
    newton, first = [], []
    for S in FOLDS:
        G_S = dense_ggn(net, CE, X[S], y[S], 0.0)
        b = g[S].sum(0) / n
        newton.append((g_v @ torch.linalg.solve(H - len(S) / n * G_S, b)).item())
        first.append((g_v @ torch.linalg.solve(H, b)).item())
    got = est.loss_change(FOLDS, XV, yV, target="retrain")
    got_first = est.loss_change(FOLDS, XV, yV)  # auto: first order
    # the Newton correction is exact whatever the clustering
    np.testing.assert_allclose(
        got - got_first, np.array(newton) - first, rtol=1e-8, atol=1e-12
    )
    if n_clusters is None:
        np.testing.assert_allclose(got, newton, rtol=1e-8)
    assert np.all(np.abs(np.array(newton) - first) > 1e-6 * np.abs(first))


def test_target_choices_and_errors(tiny_classification):
    net, X, y = tiny_classification
    kw = dict(loss="cross_entropy", damping=LAM, random_state=0)
    est = ClusteredInfluenceEstimator(5, **kw).fit(net, X, y)
    retrain = est.loss_change(FOLDS, target="retrain")
    assert not np.allclose(est.loss_change(FOLDS, target="if"), retrain)
    # (an untrained net: "auto" is first order off the optimum, see
    # test_build.py::test_auto_target_is_first_order_off_the_optimum)
    with pytest.raises(ValueError, match="target='newton'"):
        est.loss_change(FOLDS, target="newton")
    # without the spectral features "auto" is first order and "retrain" refused
    plain = ClusteredInfluenceEstimator(5, residual_correction="none", **kw)
    with pytest.raises(ValueError, match="residual_correction='auto' or 'full'"):
        InfluenceCV(plain, cv=3, target="retrain").fit(net, X, y)
    assert not hasattr(plain, "labels_")  # refused before fitting
    plain.fit(net, X, y)
    assert InfluenceCV(plain, cv=3).fit(net, X, y).target_ == "if"
    with pytest.raises(ValueError, match="target='retrain' needs"):
        plain.loss_change(FOLDS, target="retrain")
    pq = PerQueryInfluence(loss="cross_entropy", damping=LAM)
    with pytest.raises(ValueError, match="first-order influence only"):
        InfluenceCV(pq, cv=3, target="retrain").fit(net, X, y)
    assert InfluenceCV(pq, cv=3).fit(net, X, y).target_ == "if"


def test_retrain_answers_survive_save_and_load(tiny_classification, tmp_path):
    net, X, y = tiny_classification
    est = ClusteredInfluenceEstimator(
        5, loss="cross_entropy", damping=LAM, random_state=0
    ).fit(net, X, y)
    est.save(tmp_path / "cache.npz")
    loaded = ClusteredInfluenceEstimator.load(tmp_path / "cache.npz")
    np.testing.assert_array_equal(
        loaded.loss_change(FOLDS, target="retrain"),
        est.loss_change(FOLDS, target="retrain"),
    )


def test_influence_cross_validate_follows_the_target(tiny_classification):
    # Scores come from the same outputs as InfluenceCV's for either target.
    from sklearn_cif import influence_cross_validate

    net, X, y = tiny_classification
    est = ClusteredInfluenceEstimator(
        6, loss="cross_entropy", damping=LAM, random_state=0
    ).fit(net, X, y)
    cv = KFold(5, shuffle=True, random_state=0)
    for target in ("retrain", "if"):
        icv = InfluenceCV(est, cv=cv, scoring="neg_log_loss", target=target)
        icv.fit(net, X, y)
        res = influence_cross_validate(
            net, X, y, cv=cv, scoring="neg_log_loss", estimator=est, target=target
        )
        np.testing.assert_array_equal(res["test_score"], icv.cv_results_["test_score"])
        assert icv.target_ == target
    icv_if = InfluenceCV(est, cv=cv, target="if").fit(net, X, y)
    icv_rt = InfluenceCV(est, cv=cv, target="retrain").fit(net, X, y)
    np.testing.assert_array_equal(
        icv_rt.cv_results_["delta_loss_if"], icv_if.cv_results_["delta_loss"]
    )
    assert not np.allclose(icv_rt.predict_oof(), icv_if.predict_oof())


@pytest.mark.parametrize("head", ["cross_entropy", "nll", "nll_proba", "bce_logits"])
@pytest.mark.parametrize("solver", ["dense", "cg"])
def test_one_estimate_per_row_log_loss_scorer_equals_test_loss(
    tiny_classification, head, solver
):
    # Every number of a cv_results_ row comes from the same step d: the
    # log-loss scorer on the predicted out-of-fold outputs equals test_loss
    # (to rounding), whatever the output head; with CG too, since delta_loss
    # is the loss at those outputs.
    net, X, y = tiny_classification
    if head == "bce_logits":
        y = (y > 0).long()
        body = copy.deepcopy(net)
        body[-1] = torch.nn.Linear(5, 1).double()
        module = body
    elif head == "nll":
        module = torch.nn.Sequential(net, torch.nn.LogSoftmax(dim=1))
    elif head == "nll_proba":
        module = torch.nn.Sequential(net, torch.nn.Softmax(dim=1))
    else:
        module = net
    est = ClusteredInfluenceEstimator(
        6, loss=head, damping=LAM, solver=solver, random_state=0
    )
    if head == "bce_logits":
        est.set_params(loss="bce_logits")
        yy = y.double()
    else:
        yy = y
    icv = InfluenceCV(
        est,
        cv=KFold(5, shuffle=True, random_state=0),
        scoring="neg_log_loss",
        target="retrain",
    ).fit(module, X, yy)
    res = icv.cv_results_
    assert icv.target_ == "retrain"
    np.testing.assert_allclose(-res["test_score"], res["test_loss"], rtol=1e-9)


@pytest.mark.filterwarnings("ignore:The model is not at the optimum")
@pytest.mark.parametrize("rank", [4, 8])
def test_low_rank_leave_one_out_tracks_the_dense_answers(rank):
    # On the CG path with most of the spectrum left out (p = 101), each
    # example's complement is modelled (a background curvature plus its own
    # share): leave-one-out effects, first order and Newton step, stay
    # within 10 % of the dense solver's exact ones (median). A uniform
    # complement at the first eigenvalue left out gave 0.51-0.63 here.
    rng = np.random.default_rng(1)
    X = torch.as_tensor(rng.normal(size=(40, 6)))
    y = torch.as_tensor(rng.integers(0, 5, size=40))
    net = make_mlp(6, 8, 5, seed=1)
    loo = [np.array([i]) for i in range(len(y))]
    kw = dict(loss="cross_entropy", damping=0.01, curvature="ggn", random_state=0)
    dense = ClusteredInfluenceEstimator(5, solver="dense", **kw).fit(net, X, y)
    est = ClusteredInfluenceEstimator(
        5, solver="cg", cg_tol=1e-10, correction_rank=rank, **kw
    ).fit(net, X, y)
    assert est.spectrum_.size == rank and est.complement_curvature_ > 0.01
    for target in ("if", "retrain"):
        ratio = (
            est.fold_effects(loo, target=target).delta_loss
            / dense.fold_effects(loo, target=target).delta_loss
        )
        assert 0.9 <= np.median(ratio) <= 1.1, (target, np.median(ratio))
