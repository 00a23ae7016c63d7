import warnings

import joblib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _oracles import dense_influence
from sklearn.exceptions import NotFittedError

from sklearn_cif import ClusteredInfluenceEstimator, PerQueryInfluence

CE = lambda z, y: F.cross_entropy(z, y, reduction="none")  # noqa: E731
SUBSETS = [np.array([0]), np.array([3, 7, 11]), np.arange(10, 20), np.array([29, 1])]


def _rel(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(b))


def _state(module):
    """Bytes of every tensor plus every flag a careless fit could flip."""
    tensors = {k: v.detach().clone() for k, v in module.state_dict().items()}
    flags = [
        (m.training, tuple(p.requires_grad for p in m.parameters(recurse=False)))
        for m in module.modules()
    ]
    return tensors, flags


def _assert_same_state(a, b):
    assert a[1] == b[1]
    assert a[0].keys() == b[0].keys()
    assert all(torch.equal(a[0][k], b[0][k]) for k in a[0])


def test_cif_with_n_clusters_n_equals_per_query_equals_dense(tiny_classification):
    # C = N: CiF == PerQueryInfluence == dense solve (param_change, loss_change).
    net, X, y = tiny_classification
    lam = 0.05
    dense, g, H = dense_influence(net, CE, X, y, lam, SUBSETS)
    cif = ClusteredInfluenceEstimator(
        30, loss="cross_entropy", damping=lam, cg_tol=1e-12, random_state=0
    )
    cif.fit(net, X, y)
    pq = PerQueryInfluence(loss="cross_entropy", damping=lam, cg_tol=1e-12).fit(
        net, X, y
    )
    dense = dense.numpy()
    assert _rel(cif.param_change(SUBSETS), dense) < 1e-6
    assert _rel(pq.param_change(SUBSETS), dense) < 1e-6
    # self effect: mean gradient over S dotted with the parameter change
    self_ref = np.array(
        [g[s].mean(0).numpy() @ d for s, d in zip(SUBSETS, dense, strict=True)]
    )
    assert _rel(cif.loss_change(SUBSETS, target="if"), self_ref) < 1e-6
    assert _rel(pq.loss_change(SUBSETS), self_ref) < 1e-6
    # effect on an evaluation set's mean loss
    Xv, yv = X[:8] + 0.1, y[:8]
    eval_grad = _mean_grad(net, Xv, yv)
    eval_ref = dense @ eval_grad
    assert _rel(cif.loss_change(SUBSETS, Xv, yv), eval_ref) < 1e-6
    assert _rel(pq.loss_change(SUBSETS, Xv, yv), eval_ref) < 1e-6
    # transform: alpha_c(x) = grad l(x)^T v_c with v_c = H^{-1} g_c (C = N)
    V = torch.linalg.solve(H, g.T).numpy()  # (p, N)
    from _oracles import loop_grads

    ref_t = loop_grads(net, CE, Xv, yv).numpy() @ V
    assert _rel(cif.transform(Xv, yv), ref_t) < 1e-6
    assert _rel(pq.transform(Xv, yv), ref_t) < 1e-6
    assert _rel(cif.train_influence_, g.numpy() @ V) < 1e-6


def _mean_grad(net, X, y):
    net.zero_grad()
    CE(net(X), y).mean().backward()
    out = np.concatenate([p.grad.reshape(-1).numpy() for p in net.parameters()])
    net.zero_grad(set_to_none=True)
    return out


def test_linearity_over_disjoint_subsets(tiny_classification):
    # param_change(S1 u S2) = param_change(S1) + param_change(S2), for CiF and IF.
    net, X, y = tiny_classification
    S1, S2 = np.array([0, 5, 9]), np.array([2, 17, 28, 13])
    for est in (
        ClusteredInfluenceEstimator(
            6, loss="cross_entropy", random_state=0, cg_tol=1e-10
        ),
        PerQueryInfluence(loss="cross_entropy", cg_tol=1e-12, query_mode="batched"),
    ):
        est.fit(net, X, y)
        d = est.param_change([S1, S2, np.concatenate([S1, S2])])
        np.testing.assert_allclose(d[2], d[0] + d[1], rtol=1e-7, atol=1e-12)


def test_random_state_determinism(digits):
    # Same random_state: identical labels_ and responses_; another: other sketches.
    X, y = digits
    X, y = X[:300], y[:300]
    net = torch.nn.Linear(64, 10)
    kw = dict(loss="cross_entropy", sketch_dim=32, random_state=3, device="cpu")
    a = ClusteredInfluenceEstimator(8, **kw).fit(net, X, y)
    b = ClusteredInfluenceEstimator(8, **kw).fit(net, X, y)
    assert np.array_equal(a.labels_, b.labels_)
    assert np.array_equal(a.responses_, b.responses_)
    assert np.array_equal(a.cluster_centers_, b.cluster_centers_)
    c = ClusteredInfluenceEstimator(8, **{**kw, "random_state": 4}).fit(net, X, y)
    assert not np.allclose(a.cluster_centers_, c.cluster_centers_)


def test_score_and_error_bound(tiny_classification):
    # score is 1 when every example is its own cluster and < 1 with few
    # clusters; the bound's terms follow their formulas from the fit.
    net, X, y = tiny_classification
    full = ClusteredInfluenceEstimator(30, loss="cross_entropy", random_state=0).fit(
        net, X, y
    )
    assert full.score(X, y) == pytest.approx(1.0)
    assert full.error_bound(5).scatter == pytest.approx(0.0, abs=1e-12)
    few = ClusteredInfluenceEstimator(
        3, loss="cross_entropy", damping=0.1, random_state=0
    ).fit(net, X, y)
    assert 0.0 <= few.score(X, y) < 1.0
    # within-cluster scatter recomputed from explicit gradients
    from _oracles import loop_grads

    g = loop_grads(net, CE, X, y).numpy()
    mu = np.stack([g[few.labels_ == c].mean(0) for c in range(few.n_clusters_)])
    scatter = np.mean(np.sum((g - mu[few.labels_]) ** 2, 1))
    assert few.within_scatter_ == pytest.approx(scatter, rel=1e-8)
    b = few.error_bound(6)
    assert b.scatter == pytest.approx(
        np.sqrt(6 * 24 / 29 * scatter) / (0.1 * 30), rel=1e-8
    )
    assert b.total == pytest.approx(b.scatter + b.solver) and b.solver >= 0


def test_model_is_never_mutated(digits):
    # fit and every query leave the user's module byte- and flag-identical,
    # even with dropout and batch-norm in training mode.
    X, y = digits
    X, y = X[:120], y[:120]
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(64, 16),
        torch.nn.BatchNorm1d(16),
        torch.nn.ReLU(),
        torch.nn.Dropout(0.5),
        torch.nn.Linear(16, 10),
    )
    net.train()
    net(torch.as_tensor(X))  # populate running statistics
    before = _state(net)
    est = ClusteredInfluenceEstimator(
        5, loss="cross_entropy", sketch_dim=16, random_state=0
    ).fit(net, X, y)
    est.loss_change([np.arange(5)], X[:10], y[:10])
    est.transform(X[:10], y[:10])
    est.score(X, y)
    _assert_same_state(before, _state(net))
    assert net.training and net[3].training


def test_inference_mode_is_used(digits):
    # Dropout is off during fit: two fits give identical responses although
    # the user's module is in training mode.
    X, y = digits
    X, y = X[:100], y[:100]
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(64, 16), torch.nn.Dropout(0.5), torch.nn.Linear(16, 10)
    ).train()
    kw = dict(loss="cross_entropy", sketch_dim=16, random_state=0)
    a = ClusteredInfluenceEstimator(4, **kw).fit(net, X, y)
    b = ClusteredInfluenceEstimator(4, **kw).fit(net, X, y)
    assert np.array_equal(a.train_influence_, b.train_influence_)


def test_queries_before_fit_raise():
    # Every query on an unfitted estimator raises NotFittedError.
    est = ClusteredInfluenceEstimator()
    for call in (
        lambda: est.param_change([0]),
        lambda: est.loss_change([0]),
        lambda: est.membership([0]),
    ):
        with pytest.raises(NotFittedError):
            call()
    with pytest.raises(NotFittedError):
        PerQueryInfluence().param_change([0])


def test_stale_model_is_detected(tiny_classification):
    # A query that needs the model refuses to answer once its weights changed.
    net, X, y = tiny_classification
    est = ClusteredInfluenceEstimator(4, loss="cross_entropy", random_state=0).fit(
        net, X, y
    )
    with torch.no_grad():
        net[0].weight.add_(1.0)
    with pytest.raises(ValueError, match="changed since fit"):
        est.transform(X, y)
    est.param_change([0])  # model-free queries still answer from the cache


def test_joblib_round_trip_without_model(tiny_classification, tmp_path):
    # A pickled estimator answers model-free queries bitwise identically and
    # asks for the model (set_params) for the rest.
    net, X, y = tiny_classification
    est = ClusteredInfluenceEstimator(4, loss="cross_entropy", random_state=0).fit(
        net, X, y
    )
    joblib.dump(est, tmp_path / "est.joblib")
    loaded = joblib.load(tmp_path / "est.joblib")
    for q in ("param_change", "loss_change", "membership"):
        a, b = getattr(est, q)(SUBSETS), getattr(loaded, q)(SUBSETS)
        a, b = (a.toarray(), b.toarray()) if hasattr(a, "toarray") else (a, b)
        assert np.array_equal(a, b)
    with pytest.raises(ValueError, match="set_params"):
        loaded.transform(X, y)
    loaded.set_params(model=net)
    assert np.array_equal(loaded.transform(X, y), est.transform(X, y))


def test_fit_with_model_parameter(tiny_classification):
    # fit(X, y) works when the model is given to the constructor.
    net, X, y = tiny_classification
    a = ClusteredInfluenceEstimator(
        4, loss="cross_entropy", random_state=0, model=net
    ).fit(X, y)
    b = ClusteredInfluenceEstimator(4, loss="cross_entropy", random_state=0).fit(
        net, X, y
    )
    assert np.array_equal(a.responses_, b.responses_)


def test_cg_maxiter_warns(tiny_classification):
    # Not reaching cg_tol warns and keeps the residuals.
    from sklearn.exceptions import ConvergenceWarning

    net, X, y = tiny_classification
    est = ClusteredInfluenceEstimator(
        4,
        loss="cross_entropy",
        damping=1e-6,
        cg_tol=1e-14,
        cg_maxiter=2,
        random_state=0,
        solver="cg",
        residual_correction="none",  # a full-rank preconditioner would converge
    )
    with pytest.warns(ConvergenceWarning, match="cg_maxiter"):
        est.fit(net, X, y)
    assert np.all(est.cg_residuals_ > 1e-14) and np.all(est.n_iter_ == 2)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n_clusters=0), "n_clusters"),
        (dict(n_clusters=31), "n_clusters"),
        (dict(sketch_dim=0), "sketch_dim"),
        (dict(damping=0.0), "damping"),
        (dict(cg_tol=-1.0), "cg_tol"),
        (dict(batch_size=0), "batch_size"),
        (dict(loss="hinge"), "loss='hinge'"),
        (dict(solver="cholesky"), "solver='cholesky'"),
    ],
)
def test_bad_parameters_raise(tiny_classification, kwargs, match):
    # Invalid parameters are rejected at fit with the parameter's name.
    net, X, y = tiny_classification
    params = {"n_clusters": 4, "loss": "cross_entropy", **kwargs}
    with pytest.raises(ValueError, match=match):
        ClusteredInfluenceEstimator(**params).fit(net, X, y)


def test_plain_module_needs_loss_and_model_type(tiny_classification):
    # A module without loss, or a non-model, is refused with a clear message.
    net, X, y = tiny_classification
    with pytest.raises(ValueError, match="loss=None"):
        ClusteredInfluenceEstimator(4).fit(net, X, y)
    with pytest.raises(TypeError, match="model"):
        ClusteredInfluenceEstimator(4, loss="mse").fit("not a model", X, y)
    with pytest.raises(ValueError, match="inconsistent lengths"):
        ClusteredInfluenceEstimator(4, loss="cross_entropy").fit(net, X, y[:-1])


def test_nonfinite_gradients_name_examples(tiny_classification):
    # An example whose loss is not finite is reported by index.
    net, X, y = tiny_classification
    bad = lambda z, t: torch.where(t == t[0], z.sum(1) * float("inf"), z.sum(1))  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(FloatingPointError, match="examples \\[0"):
            ClusteredInfluenceEstimator(4, loss=bad).fit(net, X, y.double())


def test_eval_set_alpha_is_cached(tiny_classification):
    # A second query on the same evaluation set needs no gradient pass and
    # gives the same answer; another evaluation set is computed afresh.
    from unittest import mock

    import sklearn_cif.passes as passes_module

    net, X, y = tiny_classification
    est = ClusteredInfluenceEstimator(4, loss="cross_entropy", random_state=0)
    est.fit(net, X, y)
    first = est.loss_change(SUBSETS, X[:10], y[:10])
    with mock.patch.object(
        passes_module, "summed_grad", side_effect=AssertionError("gradient pass")
    ):
        np.testing.assert_array_equal(est.loss_change(SUBSETS, X[:10], y[:10]), first)
        with pytest.raises(AssertionError, match="gradient pass"):
            est.loss_change(SUBSETS, X[:12], y[:12])
    # a refit with other parameters drops the cached alphas
    with pytest.raises(ValueError, match=r"damping=0.1 \(fitted with 'auto'\)"):
        est.set_params(damping=1e-1).loss_change(SUBSETS, X[:10], y[:10])
    est.fit(net, X, y)
    ref = ClusteredInfluenceEstimator(
        4, loss="cross_entropy", random_state=0, damping=1e-1
    )
    np.testing.assert_array_equal(
        est.loss_change(SUBSETS, X[:10], y[:10]),
        ref.fit(net, X, y).loss_change(SUBSETS, X[:10], y[:10]),
    )


@pytest.mark.parametrize("dense_counts", [True, False])
def test_eval_set_effect_is_param_change_times_eval_gradient(
    tiny_classification, dense_counts, monkeypatch
):
    # Chunked cluster counts (loss_change) against the sparse membership path
    # (param_change) and a mean evaluation gradient from plain autograd, for
    # subsets in any order; shuffled indices give bitwise the same answer.
    import sklearn_cif._queries as queries_module

    if not dense_counts:  # the sparse membership path of very large C
        monkeypatch.setattr(queries_module, "DENSE_COUNTS_MAX", 0)
    net, X, y = tiny_classification
    est = ClusteredInfluenceEstimator(4, loss="cross_entropy", random_state=0)
    est.fit(net, X, y)
    Xv, yv = torch.as_tensor(X[:10]), torch.as_tensor(y[:10])
    net.zero_grad()
    CE(net(Xv), yv).mean().backward()
    g_v = torch.cat([p.grad.reshape(-1) for p in net.parameters()]).double()
    expected = est.param_change(SUBSETS) @ g_v.numpy()
    got = est.loss_change(SUBSETS, X[:10], y[:10])
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    shuffled = [np.random.default_rng(0).permutation(s) for s in SUBSETS]
    np.testing.assert_array_equal(est.loss_change(shuffled, X[:10], y[:10]), got)
    fast = est.loss_change(SUBSETS, X[:10], y[:10], assume_unique=True)
    np.testing.assert_array_equal(fast, got)
    with pytest.raises(ValueError, match=r"subsets\[1\] has duplicate"):
        est.loss_change([[0], [3, 3]], X[:10], y[:10])


def _phase_interrupter(at):
    """A stand-in for the build step ``_phase``: KeyboardInterrupt at call ``at``."""
    import sklearn_cif._build as build_module

    original, calls = build_module._phase, []

    def phase(*args, **kwargs):
        calls.append(args[2])
        if len(calls) == at + 1:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    return phase, calls


@pytest.mark.parametrize("solver, n_phases", [("cg", 9), ("dense", 8)])
def test_interrupt_at_every_phase_boundary_keeps_the_old_cache(
    tiny_classification, monkeypatch, solver, n_phases
):
    # A refit on other data interrupted at the start of each phase, or after
    # the whole build but before the install, leaves every answer bitwise
    # those of the previous fit and the fitted attributes the same objects.
    import sklearn_cif._build as build_module
    import sklearn_cif._cif as cif_module

    net, X, y = tiny_classification
    est = ClusteredInfluenceEstimator(
        4, loss="cross_entropy", solver=solver, random_state=0
    )
    est.fit(net, X, y)

    def answers():
        return [
            est.loss_change(SUBSETS, target="if"),
            est.loss_change(SUBSETS),
            est.loss_change(SUBSETS, X[:9], y[:9]),
            est.param_change(SUBSETS),
            est.transform(X[:5], y[:5]),
        ]

    before, labels = answers(), est.labels_
    recorder, phases = _phase_interrupter(-1)  # never interrupts: records
    monkeypatch.setattr(build_module, "_phase", recorder)
    ClusteredInfluenceEstimator(4, loss="cross_entropy", solver=solver).fit(net, X, y)
    monkeypatch.undo()
    last = "calibration" if solver == "cg" else "newton"
    assert phases[0] == "sketch" and phases[-1] == last
    assert len(phases) == n_phases
    Xo, yo = X.flip(0), y.flip(0)  # other data: a completed fit would differ
    for at in range(len(phases)):
        phase, _ = _phase_interrupter(at)
        monkeypatch.setattr(build_module, "_phase", phase)
        with pytest.raises(KeyboardInterrupt):
            est.fit(net, Xo, yo)
        monkeypatch.undo()
        for a, b in zip(answers(), before, strict=True):
            np.testing.assert_array_equal(a, b)

    def built_then_interrupted(*args, **kwargs):
        build_module.build_cache(*args, **kwargs)
        raise KeyboardInterrupt  # the last boundary: built, not installed

    monkeypatch.setattr(cif_module, "build_cache", built_then_interrupted)
    with pytest.raises(KeyboardInterrupt):
        est.fit(net, Xo, yo)
    monkeypatch.undo()
    for a, b in zip(answers(), before, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(
        ClusteredInfluenceEstimator(4, loss="cross_entropy", random_state=0)
        .fit(net, Xo, yo)
        .loss_change(SUBSETS),
        before[1],
    )
    np.testing.assert_array_equal(est.labels_, labels)
