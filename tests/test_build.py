"""Cluster means by ordinary backward passes; curvature subsampling."""

import copy

import numpy as np
import pytest
import torch
from _oracles import dense_ggn, loop_grads
from sklearn.base import clone

from sklearn_cif import ClusteredInfluenceEstimator, PerQueryInfluence, _build
from sklearn_cif.adapters import as_functional
from sklearn_cif.exceptions import CIFWarning
from sklearn_cif.passes import DataPasses

LAM = 0.05
CE = torch.nn.CrossEntropyLoss(reduction="none")
FOLDS = [np.arange(0, 6), np.array([3, 17, 21]), np.array([11])]


def test_cluster_means_by_backward_match_per_example_gradients(tiny_classification):
    # mu_c from one backward per cluster batch equals the mean of loop gradients.
    net, X, y = tiny_classification
    fmodel = as_functional(net, loss="cross_entropy", device="cpu")
    labels = np.random.default_rng(0).integers(0, 4, size=len(y))
    means = _build.cluster_means(DataPasses(fmodel, X, y, 7), labels, 4)
    g = loop_grads(net, CE, X, y)
    ref = torch.stack([g[labels == c].mean(0) for c in range(4)])
    torch.testing.assert_close(means, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("n_curv", [12, 30, 100])
def test_curvature_samples_is_the_same_operator_for_cif_and_baseline(
    tiny_classification, n_curv
):
    # Both estimators solve with G averaged over curvature_indices_ only:
    # equal to a dense oracle built on exactly those examples.
    net, X, y = tiny_classification
    kw = dict(loss="cross_entropy", damping=LAM, cg_tol=1e-12, curvature_samples=n_curv)
    cif = ClusteredInfluenceEstimator(len(y), random_state=3, **kw).fit(net, X, y)
    pq = PerQueryInfluence(random_state=3, **kw).fit(net, X, y)
    g = loop_grads(net, CE, X, y)
    for est in (cif, pq):
        idx = est.curvature_indices_
        if n_curv >= len(y):
            assert idx is None
            idx = np.arange(len(y))
        assert len(idx) == min(n_curv, len(y)) and len(np.unique(idx)) == len(idx)
        H = dense_ggn(net, CE, X[idx], y[idx], LAM)
        B = torch.stack([g[S].sum(0) for S in FOLDS]) / len(y)
        ref = torch.linalg.solve(H, B.T).T.numpy()
        np.testing.assert_allclose(est.param_change(FOLDS), ref, rtol=1e-7, atol=1e-12)


def test_curvature_samples_must_be_positive(tiny_classification):
    net, X, y = tiny_classification
    with pytest.raises(ValueError, match="curvature_samples"):
        ClusteredInfluenceEstimator(4, loss="cross_entropy", curvature_samples=0).fit(
            net, X, y
        )


@pytest.mark.filterwarnings("ignore:The model is not at the optimum")
def test_verbose_shows_a_bar_per_phase(tiny_classification, capfd):
    # verbose > 0: tqdm bars for the data passes and the CG iterations.
    pytest.importorskip("tqdm")
    net, X, y = tiny_classification
    ClusteredInfluenceEstimator(4, loss="cross_entropy", solver="cg", verbose=1).fit(
        net, X, y
    )
    err = capfd.readouterr().err
    phases = ("sketch", "means", "spectrum", "CG", "influence", "calibration")
    for phase in (*phases, "outputs", "newton"):
        assert phase in err, phase
    ClusteredInfluenceEstimator(4, loss="cross_entropy", verbose=0).fit(net, X, y)
    assert capfd.readouterr().err == ""


@pytest.mark.filterwarnings("ignore:The model is not at the optimum")
def test_verbose_without_tqdm_prints_phase_lines(tiny_classification, capfd):
    # Without tqdm installed, verbose=1 still reports every phase on stderr;
    # InfluenceCV(verbose=1) shows the build of the cache it fits.
    import builtins
    from unittest import mock

    from sklearn.model_selection import KFold

    from sklearn_cif import InfluenceCV

    real_import = builtins.__import__

    def no_tqdm(name, *args, **kwargs):
        if name.startswith("tqdm"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    net, X, y = tiny_classification
    with mock.patch.object(builtins, "__import__", no_tqdm):
        InfluenceCV(
            ClusteredInfluenceEstimator(4, loss="cross_entropy"), cv=KFold(3), verbose=1
        ).fit(net, X, y)
    err = capfd.readouterr().err
    # the default solver for this small model is the dense one
    phases = ("sketch", "means", "curvature", "dense solve", "influence", "newton")
    for phase in phases:
        assert f"[sklearn_cif] {phase} done in" in err, phase
    InfluenceCV(ClusteredInfluenceEstimator(4, loss="cross_entropy"), cv=3).fit(
        net, X, y
    )
    assert capfd.readouterr().err == ""


def _optimal_logreg(X, y, lam):
    """Logistic regression at the optimum of mean CE + lam/2 ||theta||^2."""
    torch.manual_seed(0)
    return _to_optimum(torch.nn.Linear(X.shape[1], 3).double(), X, y, lam)


def _to_optimum(net, X, y, lam):
    """``net`` trained in place to the optimum of mean CE + lam/2 ||theta||^2."""
    opt = torch.optim.LBFGS(
        net.parameters(),
        max_iter=500,
        tolerance_grad=1e-12,
        tolerance_change=0,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(X), y)
        loss = loss + lam / 2 * sum((p * p).sum() for p in net.parameters())
        loss.backward()
        return loss

    opt.step(closure)
    return net


def test_optimality_gap_tells_an_optimum_from_a_mismatch(tiny_classification):
    # At the regularized optimum the gap is ~0 and fit is silent; the same
    # model with 10x the damping, or an untrained one, is flagged.
    import warnings

    from sklearn_cif.exceptions import CIFWarning

    _, X, y = tiny_classification
    net = _optimal_logreg(X, y, 0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CIFWarning)
        est = ClusteredInfluenceEstimator(4, loss="cross_entropy", damping=0.05)
        est.fit(net, X, y)
    assert est.optimality_gap_ < 1e-4 and est.gradient_norm_ < 1e-6
    with pytest.warns(CIFWarning, match="not at the optimum"):
        off = ClusteredInfluenceEstimator(4, loss="cross_entropy", damping=0.5)
        off.fit(net, X, y)
    # independent check: ||mean gradient + lambda theta|| by autograd
    net.zero_grad()
    loss = torch.nn.functional.cross_entropy(net(X), y)
    loss = loss + 0.25 * sum((p * p).sum() for p in net.parameters())
    loss.backward()
    norm = torch.cat([p.grad.reshape(-1) for p in net.parameters()]).norm()
    assert off.gradient_norm_ == pytest.approx(norm.item(), rel=1e-8)
    assert off.optimality_gap_ > 1
    with pytest.warns(CIFWarning, match="not at the optimum"):
        fresh = torch.nn.Linear(X.shape[1], 3).double()
        ClusteredInfluenceEstimator(4, loss="cross_entropy").fit(fresh, X, y)


def test_auto_target_is_first_order_off_the_optimum(tiny_classification):
    # The Newton step expands around the optimum: with the model off it
    # (optimality_gap_ > 1) target="auto" answers first order, and the step
    # is still there for who asks for it; at the optimum "auto" is the step.
    _, X, y = tiny_classification
    net = _optimal_logreg(X, y, 0.05)
    folds = [np.arange(i, len(y), 5) for i in range(5)]
    est = ClusteredInfluenceEstimator(4, loss="cross_entropy", damping=0.05)
    at = est.fit(net, X, y)
    assert at.fold_effects(folds).target == "retrain"
    with pytest.warns(CIFWarning, match="target='auto' gives first order"):
        off = clone(est).set_params(damping=0.5).fit(net, X, y)
    auto = off.fold_effects(folds)
    first = off.fold_effects(folds, target="if")
    step = off.fold_effects(folds, target="retrain")
    assert auto.target == "if" and step.target == "retrain"
    np.testing.assert_array_equal(auto.delta_loss, first.delta_loss)
    assert not np.allclose(step.delta_loss, first.delta_loss)
    np.testing.assert_array_equal(
        off.loss_change(folds), off.loss_change(folds, target="if")
    )


def test_auto_rank_stops_at_the_first_rank_with_a_small_tail(
    tiny_classification, monkeypatch
):
    # correction_rank="auto" (CG) keeps the first of AUTO_RANKS whose next
    # eigenvalue of the dense damped GGN (independent oracle) is within
    # (1 + AUTO_RANK_TAIL) * damping; truncation_ = 1 - damping / theta_{r+1}.
    # The ladder serves the Newton step, the default answer at the optimum:
    # the net is trained there.
    from _oracles import dense_ggn

    import sklearn_cif._build as build

    net, X, y = tiny_classification
    lam = 0.02
    net = _to_optimum(copy.deepcopy(net), X, y, lam)
    ce = torch.nn.CrossEntropyLoss(reduction="none")
    theta = torch.linalg.eigvalsh(dense_ggn(net, ce, X, y, lam)).flip(0).numpy()
    ranks = (2, 4, 8, 16)
    monkeypatch.setattr(build, "AUTO_RANKS", ranks)
    small = [r for r in ranks if theta[r] <= 2 * lam]
    expected = small[0] if small else ranks[-1]
    assert expected != ranks[0]  # the test exercises the growth
    est = ClusteredInfluenceEstimator(
        4, loss="cross_entropy", damping=lam, solver="cg", random_state=0
    ).fit(net, X, y)
    assert est.optimality_gap_ < 1e-3
    assert len(est.spectrum_) == expected
    np.testing.assert_allclose(est.spectrum_, theta[:expected], rtol=1e-6)
    assert est.truncation_ == pytest.approx(1 - lam / theta[expected], rel=1e-5)
    # the features budget caps the rank
    monkeypatch.setattr(build, "DENSE_MAX_FEATURES", len(y) * 3 * 4)
    est.fit(net, X, y)
    assert len(est.spectrum_) <= 4


def test_off_the_optimum_the_rank_stays_at_the_first_rung(
    tiny_classification, monkeypatch
):
    # Off its optimum "auto" answers first order, which does not need the
    # ladder: the first rung is kept, though its tail is far above 2 lambda.
    import sklearn_cif._build as build

    net, X, y = tiny_classification
    monkeypatch.setattr(build, "AUTO_RANKS", (2, 4, 8, 16))
    with pytest.warns(CIFWarning, match="not at the optimum"):
        est = ClusteredInfluenceEstimator(
            4, loss="cross_entropy", damping=0.02, solver="cg", random_state=0
        ).fit(net, X, y)
    assert est.optimality_gap_ > 1
    assert len(est.spectrum_) == 2 and est.truncation_ > 0.5
    assert est.fold_effects([np.arange(5)]).target == "if"


@pytest.mark.parametrize(
    "decay, expected",
    [
        (0.3, [2, 16]),  # flat: no middle rung can reach 2 lambda -> last rung
        (3.0, [2, 4, 8]),  # steep: every rung is within reach and tried
    ],
)
def test_auto_rank_skips_rungs_the_decay_cannot_reach(monkeypatch, decay, expected):
    # A power-law spectrum theta_k = k^-decay (lambda = 1e-3, target 2e-3): the
    # ladder skips a rung when extrapolation puts the target beyond twice it.
    import sklearn_cif._build as build
    from sklearn_cif.solvers import SpectralPreconditioner

    asked = []

    def fake(matmat, n, damping, rank, seed, like, bar=None):
        asked.append(rank)
        theta = np.arange(1, rank + 2, dtype=float) ** -decay
        U = torch.eye(n, dtype=torch.float64)[:rank]
        return SpectralPreconditioner(
            torch.as_tensor(theta[:rank]), U, max(theta[rank], damping)
        )

    monkeypatch.setattr(build, "AUTO_RANKS", (2, 4, 8, 16))
    monkeypatch.setattr(build, "spectral_preconditioner", fake)

    class Op:
        n_params = 64
        matmat = None  # the fake preconditioner never applies it

    build.spectrum(Op(), "auto", 0, torch.zeros(1), rows=1, floor=1e-3)
    assert asked == expected
    # the extrapolation is exact on a power law
    theta = np.arange(1, 18, dtype=float) ** -decay
    need = build.rank_needed(theta[:4], theta[4], 2e-3)
    assert need == pytest.approx((2e-3) ** (-1 / decay), rel=0.02)


def test_fast_preset_is_a_set_of_valid_parameters(tiny_classification):
    # FAST_PRESET spreads into the constructor, survives clone and get_params,
    # and its rank is the one kept.
    from sklearn.base import clone

    from sklearn_cif import FAST_PRESET

    net, X, y = tiny_classification
    est = ClusteredInfluenceEstimator(
        4, loss="cross_entropy", damping=0.05, solver="cg", random_state=0,
        **{**FAST_PRESET, "correction_rank": 8},
    )  # fmt: skip
    params = clone(est).get_params()
    assert params["cg_tol"] == FAST_PRESET["cg_tol"]
    assert set(FAST_PRESET) == {"cg_tol", "correction_rank"}
    assert isinstance(FAST_PRESET["correction_rank"], int)
    est.fit(net, X, y)
    assert len(est.spectrum_) == 8 and est.cg_residuals_.max() <= FAST_PRESET["cg_tol"]


def test_auto_rank_without_a_damping_floor_goes_to_the_last_rung(monkeypatch):
    # Undamped parameters (floor 0): no eigenvalue target can be reached, the
    # extrapolation says so (inf) instead of dividing by zero, and the ladder
    # ends at its last rung as it did before the skipping rule.
    import sklearn_cif._build as build
    from sklearn_cif.solvers import SpectralPreconditioner

    asked = []

    def fake(matmat, n, damping, rank, seed, like, bar=None):
        asked.append(rank)
        theta = np.arange(1, rank + 2, dtype=float) ** -1.0
        U = torch.eye(n, dtype=torch.float64)[:rank]
        return SpectralPreconditioner(torch.as_tensor(theta[:rank]), U, theta[rank])

    monkeypatch.setattr(build, "AUTO_RANKS", (2, 4, 8))
    monkeypatch.setattr(build, "spectral_preconditioner", fake)

    class Op:
        n_params = 64
        matmat = None

    assert build.rank_needed(np.array([1.0, 0.5]), 0.3, 0.0) == float("inf")
    build.spectrum(Op(), "auto", 0, torch.zeros(1), rows=1, floor=0.0)
    assert asked == [2, 8]


def test_auto_cg_tol_keeps_the_solver_term_below_the_scatter_term(
    tiny_classification,
):
    # cg_tol="auto": each cluster's residual mu_c - (G + lambda I) v_c,
    # recomputed against the dense damped GGN from autograd per-example
    # gradients (independent oracles), is at most sqrt(s / N), s the mean
    # squared within-cluster residual; so the error bound's solver term stays
    # below its scatter term for subsets up to half the data. The solves are
    # looser than the fixed floor (fewer products than cg_tol=1e-5).
    net, X, y = tiny_classification
    kw = dict(
        loss="cross_entropy", damping=LAM, solver="cg", correction_rank=2,
        random_state=0,
    )  # fmt: skip
    with pytest.warns(CIFWarning, match="not at the optimum"):
        est = ClusteredInfluenceEstimator(4, **kw).fit(net, X, y)
    with pytest.warns(CIFWarning, match="not at the optimum"):
        tight = ClusteredInfluenceEstimator(4, cg_tol=1e-5, **kw).fit(net, X, y)
    G = loop_grads(net, CE, X, y).numpy()
    labels = est.labels_
    mu = np.stack([G[labels == c].mean(0) for c in range(est.n_clusters_)])
    noise = np.sqrt(np.mean(np.sum((G - mu[labels]) ** 2, 1)) / len(y))
    A = dense_ggn(net, CE, X, y, LAM).numpy()
    resid = np.linalg.norm(mu - est.responses_.astype(np.float64) @ A, axis=1)
    assert np.all(resid <= noise * (1 + 1e-6))
    expected = np.clip(noise / np.linalg.norm(mu, axis=1), 1e-5, 0.5)
    np.testing.assert_allclose(est.cg_tol_, expected, rtol=1e-6)
    np.testing.assert_array_equal(tight.cg_tol_, 1e-5)
    assert est.n_iter_.sum() < tight.n_iter_.sum()
    bound = est.error_bound(len(y) // 2)
    assert 0 < bound.solver <= bound.scatter


def test_cg_tol_must_be_auto_or_a_fraction(tiny_classification):
    net, X, y = tiny_classification
    for bad in ("tight", 0.0, 1.5):
        with pytest.raises(ValueError, match="cg_tol"):
            ClusteredInfluenceEstimator(4, cg_tol=bad, loss="cross_entropy").fit(
                net, X, y
            )
    with pytest.raises(ValueError, match="cg_tol"):
        PerQueryInfluence(cg_tol="auto", loss="cross_entropy").fit(net, X, y)


def test_solve_tolerances_edge_cases():
    # A float passes through; with one example per cluster the scatter is 0
    # and every solve runs to the floor; a zero mean gets the cap; the rule
    # is sqrt(s / N) / ||mu_c|| in between (s from the squared norms).
    from sklearn_cif._build import AUTO_TOL_RANGE, solve_tolerances

    assert solve_tolerances(1e-3, None, None, None) == 1e-3
    g = torch.tensor([[3.0, 0.0], [0.0, 4.0], [1.0, 1.0]], dtype=torch.float64)
    sq = (g * g).sum(1).numpy()
    own = solve_tolerances("auto", sq, np.arange(3), g)
    np.testing.assert_array_equal(own, AUTO_TOL_RANGE[0])
    labels = np.array([0, 0, 1])  # cluster 0: mean (1.5, 2), cluster 1: g[2]
    means = torch.stack([g[:2].mean(0), torch.zeros(2, dtype=torch.float64)])
    sq_zero = sq.copy()
    sq_zero[2] = 0.0  # the third example's gradient is zero, as its mean
    tol = solve_tolerances("auto", sq_zero, labels, means)
    scatter = np.sum((g[:2] - means[0]).numpy() ** 2) / 3
    assert tol[0] == pytest.approx(np.sqrt(scatter / 3) / 2.5, rel=1e-12)
    assert tol[1] == AUTO_TOL_RANGE[1]


def test_dense_solver_reports_no_tolerance(tiny_classification):
    # The dense solve is exact: cg_tol_ is zero whatever cg_tol says.
    net, X, y = tiny_classification
    with pytest.warns(CIFWarning, match="not at the optimum"):
        est = ClusteredInfluenceEstimator(
            4, loss="cross_entropy", damping=LAM, random_state=0
        ).fit(net, X, y)
    assert est.solver_ == "dense"
    np.testing.assert_array_equal(est.cg_tol_, np.zeros(est.n_clusters_))
    assert np.all(est.cg_residuals_ < 1e-10)
