"""Shared estimator behaviour: pinned settings, the model check, thread safety."""

import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from _oracles import dense_influence
from sklearn.model_selection import KFold

from sklearn_cif import ClusteredInfluenceEstimator, InfluenceCV, PerQueryInfluence

CE = torch.nn.CrossEntropyLoss(reduction="none")
FOLDS = [np.arange(0, 6), np.array([3, 17, 21])]


def _cif(**kw):
    return ClusteredInfluenceEstimator(
        **{"n_clusters": 4, "loss": "cross_entropy", "random_state": 0, **kw}
    )


@pytest.mark.parametrize(
    "param, value",
    [
        ("damping", 1.0),
        ("n_clusters", 3),
        ("cg_tol", 1e-5),
        ("loss", "nll"),
        ("random_state", 1),
        ("correction_rank", 7),
    ],
)
def test_a_changed_setting_makes_queries_say_so(tiny_classification, param, value):
    # After set_params on a setting the cache depends on, every query names
    # the parameter (error_bound included); setting it back restores bitwise
    # the answers; InfluenceCV refits instead of reusing the cache.
    net, X, y = tiny_classification
    est = _cif().fit(net, X, y)
    old = est.get_params()[param]
    answers = (est.loss_change(FOLDS), est.error_bound(5).total)
    est.set_params(**{param: value})
    assert not est.is_current()
    for query in (
        lambda: est.loss_change(FOLDS),
        lambda: est.param_change(FOLDS),
        lambda: est.error_bound(5),
        lambda: est.fold_effects(FOLDS),
        lambda: est.transform(X, y),
    ):
        with pytest.raises(ValueError, match=f"{param}=.*fitted with"):
            query()
    icv = InfluenceCV(est, cv=KFold(3)).fit(net, X, y)
    assert icv.estimator_ is not est and icv.fit_time_ > 0
    est.set_params(**{param: old})
    assert est.is_current(net, X, y)
    assert (est.loss_change(FOLDS), est.error_bound(5).total)[1] == answers[1]
    np.testing.assert_array_equal(est.loss_change(FOLDS), answers[0])


def test_settings_that_do_not_change_the_cache_are_free(tiny_classification):
    # batch_size, device and verbose only change how queries compute.
    net, X, y = tiny_classification
    est = _cif().fit(net, X, y)
    ref = est.transform(X, y)
    est.set_params(batch_size=3, verbose=0, device="cpu")
    np.testing.assert_allclose(est.transform(X, y), ref, rtol=1e-12)


def test_stale_model_message_and_recovery(tiny_classification):
    # A changed model is refused with a message saying what happened; once
    # the weights are restored the same estimator answers again, bitwise.
    net, X, y = tiny_classification
    est = _cif().fit(net, X, y)
    ref = est.transform(X, y)
    with torch.no_grad():
        net[0].weight.add_(1.0)
    for _ in range(2):  # the message does not change after the first failure
        with pytest.raises(ValueError, match="changed since fit.*Restore the weights"):
            est.transform(X, y)
    with torch.no_grad():
        net[0].weight.sub_(1.0)
    np.testing.assert_array_equal(est.transform(X, y), ref)


def test_set_params_model_is_checked_by_fingerprint(tiny_classification):
    # A live estimator given another model (set_params) refuses it by
    # fingerprint, as a loaded one does; an equal copy is accepted and used.
    net, X, y = tiny_classification
    est = _cif().fit(net, X, y)
    ref = est.transform(X, y)
    other = torch.nn.Sequential(
        torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)
    ).double()
    est.set_params(model=other)
    with pytest.raises(ValueError, match="fingerprint mismatch"):
        est.transform(X, y)
    other.load_state_dict(net.state_dict())  # the same weights in another module
    np.testing.assert_array_equal(est.transform(X, y), ref)
    assert est._fmodel.source is other


def test_loaded_cache_refuses_another_loss(tiny_classification, tmp_path):
    # A cache built with cross-entropy refuses loss="mse" after load, both as
    # a parameter and when the model is rebuilt for a query.
    net, X, y = tiny_classification
    est = _cif().fit(net, X, y)
    est.save(tmp_path / "c.npz")
    loaded = ClusteredInfluenceEstimator.load(tmp_path / "c.npz")
    loaded.set_params(model=net, loss="mse")
    with pytest.raises(ValueError, match="loss='mse' \\(fitted with 'cross_entropy'"):
        loaded.transform(X, y)
    loaded.set_params(loss="cross_entropy")
    np.testing.assert_array_equal(loaded.transform(X, y), est.transform(X, y))


def _hammer(calls, n_threads=8, repeats=6):
    """Run every call from many threads at a tiny switch interval."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        with ThreadPoolExecutor(n_threads) as pool:
            futures = [pool.submit(c) for c in calls * repeats]
            return [f.result() for f in futures]  # re-raises any exception
    finally:
        sys.setswitchinterval(interval)


def test_concurrent_queries_are_bitwise_serial_answers(tiny_classification):
    # transform, score and evaluation-set loss_change from 8 threads on one
    # fitted CiF: never an exception, bitwise the serial answers.
    net, X, y = tiny_classification
    est = _cif().fit(net, X, y)
    Xa, ya, Xb, yb = X[:12], y[:12], X[12:], y[12:]
    queries = [
        lambda: est.transform(Xa, ya),
        lambda: est.transform(Xb, yb),
        lambda: np.array(est.score(X, y)),
        lambda: est.loss_change(FOLDS, Xa, ya),
        lambda: est.loss_change(FOLDS, Xb, yb),
    ]
    serial = [q() for q in queries]
    est._alpha_cache = None  # the threads also race to fill the alpha cache
    got = _hammer(queries)
    for k, value in enumerate(got):
        np.testing.assert_array_equal(value, serial[k % len(queries)])


def test_concurrent_per_query_influence(tiny_classification):
    # PerQueryInfluence queries from 8 threads: bitwise the serial answers,
    # and they agree with a dense solve.
    net, X, y = tiny_classification
    pq = PerQueryInfluence(
        loss="cross_entropy", damping=0.05, cg_tol=1e-10, query_mode="batched"
    ).fit(net, X, y)
    queries = [
        lambda: pq.param_change(FOLDS),
        lambda: pq.loss_change(FOLDS),
        lambda: pq.loss_change(FOLDS, X[:10], y[:10]),
        lambda: pq.transform(X[:3], y[:3]),
    ]
    serial = [q() for q in queries]
    got = _hammer(queries, repeats=3)
    for k, value in enumerate(got):
        np.testing.assert_array_equal(value, serial[k % len(queries)])
    ref, _, _ = dense_influence(net, CE, X, y, 0.05, FOLDS)
    np.testing.assert_allclose(serial[0], ref.numpy(), rtol=1e-6, atol=1e-10)
    # one serial round and three threaded ones; no increment was lost
    assert pq.n_solves_ == 4 * (3 * len(FOLDS) + 3)


def test_another_callable_loss_or_loss_module_counts_as_changed(tiny_classification):
    # Two lambdas (or two loss modules) look alike as names; the cache was
    # built with one object and answers only for it.
    net, X, y = tiny_classification
    first = lambda z, t: CE(z, t)  # noqa: E731
    second = lambda z, t: CE(z, t) * 2.0  # noqa: E731
    est = _cif(loss=first).fit(net, X, y)
    est.set_params(loss=first)  # the same object: still current
    assert est.is_current(net, X, y)
    est.set_params(loss=second)
    assert not est.is_current()
    with pytest.raises(ValueError, match="loss=.*lambda.*fitted with"):
        est.loss_change(FOLDS)
    smooth = torch.nn.CrossEntropyLoss(reduction="none", label_smoothing=0.2)
    est = _cif(loss=smooth).fit(net, X, y)
    est.set_params(loss=torch.nn.CrossEntropyLoss(reduction="none"))
    with pytest.raises(ValueError, match="loss=.*fitted with"):
        est.loss_change(FOLDS)
    est.set_params(loss=smooth)
    assert est.is_current(net, X, y)


def test_equivalent_spellings_are_not_changes(tiny_classification):
    # "auto" is "full", cg_maxiter=None is 1000, params="w" is ["w"], an
    # array of names is its list: the cache answers for all of them.
    net, X, y = tiny_classification
    names = [n for n, _ in net.named_parameters()]
    est = _cif(params=names[0]).fit(net, X, y)
    ref = est.loss_change(FOLDS)
    est.set_params(
        residual_correction="full", cg_maxiter=1000, params=np.array(names[:1])
    )
    assert est.is_current(net, X, y)
    np.testing.assert_array_equal(est.loss_change(FOLDS), ref)
    est.set_params(residual_correction="cross")
    assert not est.is_current()


def test_a_list_edited_in_place_after_fit_counts_as_changed(tiny_classification):
    # The fit keeps a copy of a list parameter: editing the user's list in
    # place is a change, not a silent reuse.
    net, X, y = tiny_classification
    names = [n for n, _ in net.named_parameters()]
    chosen = names[:2]
    est = _cif(params=chosen).fit(net, X, y)
    chosen.pop()
    with pytest.raises(ValueError, match="params=.*fitted with"):
        est.loss_change(FOLDS)


def test_fit_model_argument_wins_over_an_unchanged_model_param(tiny_classification):
    # model=A set, fit(B, X, y): queries use B (the model the cache was
    # built from), not A; set_params(model=C) after fit uses C.
    net, X, y = tiny_classification
    other = torch.nn.Sequential(
        torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)
    ).double()
    est = _cif(model=other).fit(net, X, y)
    ref = est.transform(X, y)  # no fingerprint error: B is used
    assert est._fmodel.source is net
    copy = torch.nn.Sequential(
        torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)
    ).double()
    copy.load_state_dict(net.state_dict())
    est.set_params(model=copy)
    np.testing.assert_array_equal(est.transform(X, y), ref)
    assert est._fmodel.source is copy
