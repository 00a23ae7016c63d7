import contextlib
import warnings
from unittest import mock

import joblib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _models import trained_mlp
from _oracles import dense_influence, flat_params, make_f
from sklearn.base import clone
from sklearn.model_selection import (
    GroupKFold,
    KFold,
    LeaveOneOut,
    PredefinedSplit,
    RepeatedKFold,
    ShuffleSplit,
    StratifiedKFold,
    cross_validate,
)

import sklearn_cif._build as build_module
import sklearn_cif._per_query as per_query_module
from sklearn_cif import (
    CIFWarning,
    ClusteredInfluenceEstimator,
    InfluenceCV,
    PerQueryInfluence,
    influence_cross_validate,
)
from sklearn_cif.curvature import DampedGGNOperator
from sklearn_cif.passes import DataPasses

CE = lambda z, y: F.cross_entropy(z, y, reduction="none")  # noqa: E731
N = 30
LAM = 0.05


def _exact(net, X, y):
    """CiF with one cluster per example: first-order IF up to the solver."""
    kw = dict(loss="cross_entropy", damping=LAM, cg_tol=1e-12, random_state=0)
    return ClusteredInfluenceEstimator(N, **kw).fit(net, X, y)


SPLITTERS = {
    "kfold": (KFold(5, shuffle=True, random_state=0), None),
    "stratified": (StratifiedKFold(3, shuffle=True, random_state=0), None),
    "group": (GroupKFold(5), np.arange(N) % 7),
    "shuffle": (ShuffleSplit(8, test_size=0.3, random_state=0), None),
    "repeated": (RepeatedKFold(n_splits=3, n_repeats=2, random_state=0), None),
    "loo": (LeaveOneOut(), None),
    "predefined": (PredefinedSplit(np.arange(N) % 4 - 1), None),
    "iterable": (
        [(np.arange(10, N), np.arange(10)), (np.arange(20), np.arange(20, N))],
        None,
    ),
}


@pytest.mark.parametrize("name", list(SPLITTERS))
def test_every_splitter_matches_dense_oracle(tiny_classification, name):
    # Each splitter's folds are predicted; delta_loss, param_change_norm and
    # the out-of-fold outputs equal a dense influence computation per fold.
    net, X, y = tiny_classification
    cv, groups = SPLITTERS[name]
    icv = InfluenceCV(
        _exact(net, X, y), cv=cv, scoring=["accuracy", "neg_log_loss"], target="if"
    )
    icv.fit(net, X, y, groups=groups)
    tests = [te for _, te in icv.splits_]
    n_splits = len(list(cv)) if isinstance(cv, list) else cv.get_n_splits(X, y, groups)
    res = icv.cv_results_
    assert len(tests) == n_splits and all(len(v) == n_splits for v in res.values())
    np.testing.assert_array_equal(res["n_test"], [len(t) for t in tests])
    dtheta, g, _ = dense_influence(net, CE, X, y, LAM, tests)
    self_ref = np.array([g[t].mean(0) @ d for t, d in zip(tests, dtheta, strict=True)])
    np.testing.assert_allclose(res["delta_loss"], self_ref, rtol=1e-6)
    np.testing.assert_allclose(res["param_change_norm"], dtheta.norm(dim=1), rtol=1e-6)
    in_sample = np.array([CE(net(X[t]), y[t]).mean().item() for t in tests])
    np.testing.assert_allclose(res["test_loss_in_sample"], in_sample, rtol=1e-10)
    np.testing.assert_allclose(res["test_loss"], in_sample + self_ref, rtol=1e-6)
    # out-of-fold outputs f(x) + J(x) dtheta from an explicit Jacobian
    f, theta = make_f(net), flat_params(net)
    t0, d0 = np.sort(tests[0]), dtheta[0]  # oof_outputs_ lists members sorted
    J = torch.autograd.functional.jacobian(lambda th: f(th, X[t0]), theta)
    oof = (f(theta, X[t0]) + J @ d0).detach().numpy()
    lo = 0
    np.testing.assert_allclose(icv.oof_outputs_[lo : len(t0)], oof, rtol=1e-6)
    acc = np.mean(oof.argmax(1) == y[t0].numpy())
    assert res["test_accuracy"][0] == pytest.approx(acc)


def test_group_kfold_without_groups_raises(tiny_classification):
    # GroupKFold needs groups; the splitter's own error reaches the user.
    net, X, y = tiny_classification
    with pytest.raises(ValueError, match="groups"):
        InfluenceCV(_exact(net, X, y), cv=GroupKFold(3)).fit(net, X, y)


def test_splitter_indices_beyond_n_raise(tiny_classification):
    # A plain iterable whose test indices exceed N is refused with the split named.
    net, X, y = tiny_classification
    cv = [(np.arange(5), np.arange(5, N + 3))]
    with pytest.raises(ValueError, match="outside \\[0, 30\\) in split 0"):
        InfluenceCV(_exact(net, X, y), cv=cv).fit(net, X, y)


def test_per_query_estimator_gives_the_same_results(tiny_classification):
    # InfluenceCV on PerQueryInfluence equals it on exact CiF (two engines).
    net, X, y = tiny_classification
    cv = KFold(4, shuffle=True, random_state=1)
    a = InfluenceCV(_exact(net, X, y), cv=cv, scoring="neg_log_loss", target="if")
    a.fit(net, X, y)
    pq = PerQueryInfluence(loss="cross_entropy", damping=LAM, cg_tol=1e-12)
    b = InfluenceCV(pq, cv=cv, scoring="neg_log_loss").fit(net, X, y)
    for key in ("delta_loss", "param_change_norm", "test_loss", "test_score"):
        np.testing.assert_allclose(a.cv_results_[key], b.cv_results_[key], rtol=1e-6)
    np.testing.assert_allclose(a.predict_oof(), b.predict_oof(), rtol=1e-6)


@pytest.fixture(scope="module")
def digits_model(digits):
    X, y = digits
    X, y = X[:400], y[:400]
    return trained_mlp(X, y, hidden=16, weight_decay=1e-3, epochs=200), X, y


def test_one_cache_serves_many_cv_schemes(digits_model):
    # KFold(50), KFold(100), LeaveOneOut on one cache: no gradient pass, no
    # solve, no GGN product after the cache is built (counted, not timed).
    net, X, y = digits_model
    est = ClusteredInfluenceEstimator(20, loss="cross_entropy", random_state=0).fit(
        net, X, y
    )
    # every loop over data goes through the data-pass layer (one pass: one
    # map_rows, accumulate or group_sums call); every CG solve through
    # solvers.block_cg (imported by the build and the per-query estimator)
    # or solvers.batched_cg (the build's calibration)
    passes = []

    def counting(owner, name, log):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            log.append(name)
            return original(*args, **kwargs)

        return mock.patch.object(owner, name, wrapper)

    solves = []
    patches = [
        counting(DataPasses, "map_rows", passes),
        counting(DataPasses, "accumulate", passes),
        counting(DataPasses, "group_sums", passes),
        counting(build_module, "block_cg", solves),
        counting(per_query_module, "block_cg", solves),
        counting(build_module, "batched_cg", solves),
    ]
    products = mock.patch.object(
        DampedGGNOperator, "matmat", autospec=True, side_effect=DampedGGNOperator.matmat
    )
    with products as m, contextlib.ExitStack() as stack:
        for patch in patches:
            stack.enter_context(patch)
        for cv in (KFold(50), KFold(100), LeaveOneOut()):
            icv = InfluenceCV(est, cv=cv).fit(net, X, y)
            assert icv.estimator_ is est and icv.fit_time_ == 0.0
            assert len(icv.cv_results_["delta_loss"]) == cv.get_n_splits(X)
        assert (len(passes), len(solves), m.call_count) == (0, 0, 0)
        # an unfitted estimator is cloned and fitted: the counters move, and
        # count every pass the build reports; cluster solve + calibration solve
        fresh = InfluenceCV(
            ClusteredInfluenceEstimator(5, loss="cross_entropy", solver="cg"), cv=3
        )
        fresh.fit(net, X, y)
        assert len(passes) == fresh.estimator_.n_data_passes_ and len(solves) == 2
        assert m.call_count > 0 and fresh.estimator_ is not fresh.estimator


def test_changed_model_or_data_is_not_reused(digits_model):
    # A fitted estimator is reused only for the same model weights, data and
    # parameters.
    net, X, y = digits_model
    est = ClusteredInfluenceEstimator(5, loss="cross_entropy", random_state=0).fit(
        net, X, y
    )
    icv = InfluenceCV(est, cv=3).fit(net, X[:300], y[:300])
    assert icv.estimator_ is not est and icv.estimator_.n_samples_fit_ == 300
    assert InfluenceCV(est, cv=3).fit(net, X, y).estimator_ is est
    est.set_params(damping=1e-2)  # the cache no longer matches the parameters
    icv = InfluenceCV(est, cv=3).fit(net, X, y)
    assert icv.estimator_ is not est and icv.estimator_.damping == 1e-2


def test_influence_cv_is_a_splitter_for_cross_validate(digits_model):
    # cross_validate(cv=icv) runs on exactly the folds icv predicted, even for
    # a splitter that draws new folds on every call.
    net, X, y = digits_model
    cv = ShuffleSplit(4, test_size=0.1, random_state=np.random.RandomState(0))
    est = ClusteredInfluenceEstimator(5, loss="cross_entropy", random_state=0)
    icv = InfluenceCV(est, cv=cv).fit(net, X, y)
    assert icv.get_n_splits(X, y) == 4

    from sklearn.linear_model import LogisticRegression

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a short LogisticRegression fit suffices
        res = cross_validate(
            LogisticRegression(max_iter=50), X, y, cv=icv, return_indices=True
        )
    for (_, te), te2 in zip(icv.splits_, res["indices"]["test"], strict=True):
        np.testing.assert_array_equal(te, te2)


def test_influence_cross_validate_has_cross_validate_keys_and_shapes(digits_model):
    # Same keys and shapes as sklearn's cross_validate for the same cv/scoring.
    from sklearn.linear_model import LogisticRegression

    net, X, y = digits_model
    est = ClusteredInfluenceEstimator(5, loss="cross_entropy", random_state=0).fit(
        net, X, y
    )
    for scoring in (None, "neg_log_loss", ["accuracy", "neg_log_loss"]):
        ours = influence_cross_validate(
            net, X, y, cv=KFold(7), scoring=scoring, estimator=est, return_indices=True
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = cross_validate(
                LogisticRegression(max_iter=20),
                X,
                y,
                cv=KFold(7),
                scoring=scoring,
                return_indices=True,
            )
        assert ours.keys() == ref.keys()
        for k in ref:
            if k == "indices":
                assert [len(a) for a in ours[k]["test"]] == [
                    len(a) for a in ref[k]["test"]
                ]
            else:
                assert np.shape(ours[k]) == np.shape(ref[k])


def test_predict_oof_partitions_only(digits_model):
    # predict_oof fills every example once for a partition and refuses overlaps.
    net, X, y = digits_model
    est = ClusteredInfluenceEstimator(5, loss="cross_entropy", random_state=0)
    icv = InfluenceCV(est, cv=KFold(10)).fit(net, X, y)
    labels = icv.predict_oof("predict")
    proba = icv.predict_oof("predict_proba")
    assert labels.shape == (400,) and proba.shape == (400, 10)
    np.testing.assert_allclose(proba.sum(1), 1.0)
    assert np.mean(labels == y) == pytest.approx(
        icv.cv_results_["test_score"] @ icv.cv_results_["n_test"] / 400
    )
    overlapping = InfluenceCV(est, cv=ShuffleSplit(3, random_state=0)).fit(net, X, y)
    with pytest.raises(ValueError, match="partition"):
        overlapping.predict_oof()


def test_clone_keeps_the_same_model_object(digits_model):
    # clone shares the model (FrozenEstimator semantics) for modules and nets.
    skorch = pytest.importorskip("skorch")
    net, X, y = digits_model
    est = ClusteredInfluenceEstimator(5, loss="cross_entropy", model=net)
    assert clone(est).model is net
    icv = InfluenceCV(est, cv=3)
    assert clone(icv).estimator.model is net
    snet = skorch.NeuralNetClassifier(
        torch.nn.Linear(64, 10), max_epochs=1, train_split=None, verbose=0
    )
    snet.fit(X, y)
    c = clone(ClusteredInfluenceEstimator(model=snet))
    assert c.model is snet and c.model.initialized_
    assert "model__lr" not in ClusteredInfluenceEstimator(model=snet).get_params(
        deep=True
    )


def test_grid_search_with_fidelity_scorer(digits_model):
    # GridSearchCV tunes n_clusters/damping with fit(X, y) and a fidelity scorer.
    from sklearn.model_selection import GridSearchCV

    from sklearn_cif.metrics import fidelity_scorer

    net, X, y = digits_model
    # CG: with every eigenpair (the dense solver) self effects are exact for
    # any clustering, and there would be nothing to tune
    est = ClusteredInfluenceEstimator(
        loss="cross_entropy", model=net, random_state=0, sketch_dim=32, solver="cg"
    )
    grid = GridSearchCV(
        est,
        {"n_clusters": [2, 40], "damping": [1e-2]},
        scoring=fidelity_scorer(X, y, 10, cv=2),
        cv=2,
    )
    grid.fit(X, y)
    scores = grid.cv_results_["mean_test_score"]
    assert (
        np.all(np.isfinite(scores)) and scores[1] > scores[0]
    )  # more clusters, more faithful
    assert grid.best_estimator_.model is net
    # the default score (scatter explained on held-out data) works as well
    GridSearchCV(est, {"n_clusters": [2, 8]}, cv=2).fit(X, y)


def test_joblib_round_trip_bitwise_and_cuda_cache_on_cpu(digits_model, tmp_path):
    # A dumped InfluenceCV and estimator answer identically without the model;
    # a cache marked for CUDA loads and answers on a CPU-only machine.
    net, X, y = digits_model
    est = ClusteredInfluenceEstimator(5, loss="cross_entropy", random_state=0).fit(
        net, X, y
    )
    icv = InfluenceCV(est, cv=KFold(20)).fit(net, X, y)
    est.set_params(device="cuda")  # as if fitted on a GPU machine
    joblib.dump(icv, tmp_path / "icv.joblib")
    with mock.patch.object(torch.cuda, "is_available", return_value=False):
        loaded = joblib.load(tmp_path / "icv.joblib")
        folds = [te for _, te in KFold(20).split(X)]
        for key, val in icv.cv_results_.items():
            if key != "score_time":
                assert np.array_equal(loaded.cv_results_[key], val)
        assert np.array_equal(loaded.predict_oof(), icv.predict_oof())
        for q in ("param_change", "loss_change"):
            assert np.array_equal(
                getattr(loaded.estimator_, q)(folds), getattr(est, q)(folds)
            )
        stack = [loaded.estimator_.__dict__]
        while stack:  # nothing device-bound survives the pickle
            d = stack.pop()
            assert not any(torch.is_tensor(v) for v in d.values())
        loaded.estimator_.set_params(model=net)
        with pytest.warns(CIFWarning, match="CUDA is not available"):
            t = loaded.estimator_.transform(X[:5], y[:5])
    est.set_params(device="auto")
    np.testing.assert_array_equal(t, est.transform(X[:5], y[:5]))


def test_cv_results_fit_time_and_metrics_attribute(tiny_classification):
    # cv_results_ has fit_time like cross_validate's (the build shared evenly,
    # zero when the cache is reused), and sklearn_cif.metrics needs no import.
    import sklearn_cif

    net, X, y = tiny_classification
    est = ClusteredInfluenceEstimator(4, loss="cross_entropy", random_state=0)
    icv = InfluenceCV(est, cv=KFold(5)).fit(net, X, y)
    times = icv.cv_results_["fit_time"]
    assert (
        times.shape == (5,) and np.allclose(times.sum(), icv.fit_time_) and times[0] > 0
    )
    again = InfluenceCV(icv.estimator_, cv=KFold(3)).fit(net, X, y)
    np.testing.assert_array_equal(again.cv_results_["fit_time"], np.zeros(3))
    assert callable(sklearn_cif.metrics.fidelity_scorer)


def test_cv_results_carry_each_folds_newton_diagnostics(tiny_classification):
    # Leave-one-out with the dense solver: each fold's leverage is the
    # output-space top eigenvalue h of H_i^{1/2} J_i (G + lambda I)^{-1}
    # J_i^T H_i^{1/2} / N (computed here densely), below 1; first order
    # carries no diagnostics.
    from _oracles import dense_ggn, flat_params, make_f
    from sklearn.model_selection import LeaveOneOut

    net, X, y = tiny_classification
    est = ClusteredInfluenceEstimator(
        4, loss="cross_entropy", damping=LAM, solver="dense", random_state=0
    )
    icv = InfluenceCV(est, cv=LeaveOneOut(), target="retrain").fit(net, X, y)
    res = icv.cv_results_
    ce = torch.nn.CrossEntropyLoss(reduction="none")
    Hinv = torch.linalg.inv(dense_ggn(net, ce, X, y, LAM))
    f, theta = make_f(net), flat_params(net)
    for i in (0, 7):
        xi = X[i : i + 1]
        J = torch.autograd.functional.jacobian(lambda t, xi=xi: f(t, xi)[0], theta)
        p = torch.softmax(f(theta, xi)[0], 0).detach()
        Hout = torch.diag(p) - torch.outer(p, p)
        ev, Q = torch.linalg.eigh(Hout)
        root = Q @ torch.diag(ev.clamp_min(0).sqrt()) @ Q.T
        lev = torch.linalg.eigvalsh(root @ J @ Hinv @ J.T @ root / len(y))[-1]
        assert res["leverage"][i] == pytest.approx(lev.item(), rel=1e-8)
    assert np.all(res["leverage"] < 1) and not res["safeguarded"].any()
    assert np.all(res["amplification"] >= 1 - 1e-12)
    first = InfluenceCV(est, cv=LeaveOneOut(), target="if").fit(net, X, y)
    assert np.isnan(first.cv_results_["leverage"]).all()
    assert np.all(first.cv_results_["amplification"] == 1)
