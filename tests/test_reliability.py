"""Bad input, numerical faults, no half state, stale caches, safe persistence."""

import warnings
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.exceptions import NotFittedError

import sklearn_cif.passes as passes_module
from sklearn_cif import (
    CIFWarning,
    ClusteredInfluenceEstimator,
    InfluenceCV,
    __version__,
)
from sklearn_cif._subsets import subset_indicator

N = 30


def _est(**kw):
    return ClusteredInfluenceEstimator(
        **{"n_clusters": 4, "loss": "cross_entropy", "random_state": 0, **kw}
    )


def _nan_X(X, y):
    X = X.clone()
    X[3, 1] = float("nan")
    return X, y


def _label_7(X, y):
    y = y.clone()
    y[5] = 7
    return X, y


# description -> (estimator parameters, data transform, exception, message)
BAD_FITS = {
    "X/y length": ({}, lambda X, y: (X, y[:-1]), ValueError, "inconsistent lengths"),
    "X feature shape": (
        {},
        lambda X, y: (X[:, :3], y),
        ValueError,
        "does not fit the model",
    ),
    "NaN in X": ({}, _nan_X, ValueError, "NaN or infinity"),
    "inf in y": (
        {"loss": "mse"},
        lambda X, y: (X, torch.full((N, 3), float("inf"), dtype=torch.float64)),
        ValueError,
        "NaN or infinity",
    ),
    "label out of range": ({}, _label_7, ValueError, r"labels in \[0, 7\].*3 outputs"),
    "empty X": ({}, lambda X, y: (X[:0], y[:0]), ValueError, "empty"),
    "n_clusters < 1": ({"n_clusters": 0}, None, ValueError, "n_clusters"),
    "n_clusters > N": ({"n_clusters": N + 1}, None, ValueError, "n_clusters"),
    "sketch_dim < 1": ({"sketch_dim": 0}, None, ValueError, "sketch_dim"),
    "damping <= 0": ({"damping": 0.0}, None, ValueError, "damping"),
    "damping inf": ({"damping": float("inf")}, None, ValueError, "damping"),
    "cg_tol <= 0": ({"cg_tol": 0.0}, None, ValueError, "cg_tol"),
    "batch_size < 1": ({"batch_size": 0}, None, ValueError, "batch_size"),
    "unknown loss": ({"loss": "hinge"}, None, ValueError, "loss='hinge'"),
    "unknown device": ({"device": "tpu9"}, None, ValueError, "device='tpu9'"),
    "unknown correction": (
        {"residual_correction": "x"},
        None,
        ValueError,
        "residual_correction",
    ),
}


@pytest.mark.parametrize("desc", list(BAD_FITS))
def test_bad_fit_input_raises_before_any_pass(tiny_classification, desc):
    # Each bad input raises the named error before any gradient pass, and a
    # fitted estimator refit with it keeps answering as before.
    net, X, y = tiny_classification
    params, data, exc, match = BAD_FITS[desc]
    good = _est().fit(net, X, y)
    answer = good.loss_change([np.arange(5)])
    fitted_params = good.get_params()
    Xb, yb = data(X, y) if data else (X, y)
    with mock.patch.object(
        passes_module, "per_example_grads", side_effect=AssertionError("pass ran")
    ):
        with pytest.raises(exc, match=match):
            good.set_params(**params).fit(net, Xb, yb)
    # the cache answers for the parameters it was built with
    np.testing.assert_array_equal(
        good.set_params(**fitted_params).loss_change([np.arange(5)]), answer
    )


def test_not_a_model_raises(tiny_classification):
    # Something that is neither a torch module nor a skorch net is a TypeError.
    _, X, y = tiny_classification
    with pytest.raises(TypeError, match="model"):
        _est().fit(object(), X, y)


def test_unfitted_skorch_net_and_queries_before_fit():
    # An uninitialized skorch net and queries before fit give NotFittedError.
    skorch = pytest.importorskip("skorch")
    net = skorch.NeuralNetClassifier(torch.nn.Linear(4, 3))
    with pytest.raises(NotFittedError, match="not initialized"):
        _est().fit(net, np.zeros((5, 4), np.float32), np.zeros(5, np.int64))
    with pytest.raises(NotFittedError):
        _est().loss_change([0])
    with pytest.raises(NotFittedError):
        InfluenceCV().predict_oof()


def test_cuda_without_gpu_falls_back_with_warning(tiny_classification):
    # device="cuda" on a CPU-only machine computes on the CPU with a CIFWarning.
    net, X, y = tiny_classification
    with mock.patch.object(torch.cuda, "is_available", return_value=False):
        with pytest.warns(CIFWarning, match="CUDA is not available"):
            est = _est(device="cuda").fit(net, X, y)
    np.testing.assert_allclose(
        est.responses_, _est(device="cpu").fit(net, X, y).responses_
    )


def test_keyboard_interrupt_leaves_previous_cache(tiny_classification):
    # An interrupt inside the gradient pass leaves a fitted estimator as it
    # was (still answering) and a new one unfitted; the model is unchanged.
    net, X, y = tiny_classification
    state = {k: v.clone() for k, v in net.state_dict().items()}
    est = _est().fit(net, X, y)
    before = est.loss_change([np.arange(6)])
    labels = est.labels_
    fresh = _est()
    for target in (est, fresh):
        with mock.patch.object(
            passes_module, "per_example_grads", side_effect=KeyboardInterrupt
        ):
            with pytest.raises(KeyboardInterrupt):
                target.set_params(n_clusters=3).fit(net, X, y)
    assert est.labels_ is labels
    est.set_params(n_clusters=4)  # the cache answers for its own parameters
    np.testing.assert_array_equal(est.loss_change([np.arange(6)]), before)
    with pytest.raises(NotFittedError):
        fresh.param_change([0])
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())


def test_nan_on_one_example_is_reported_by_index(tiny_classification):
    # A model producing NaN for one example names that example.
    net, X, y = tiny_classification

    class NaNOnRow(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            # 0 * log(0) = NaN on the row with x = 1000 only
            return self.inner(x) + 0 * torch.log(1000 - x[:, :1])

    X2 = X.clone()
    X2[17, 0] = 1000.0
    with pytest.raises(FloatingPointError, match=r"examples \[17\]"):
        _est().fit(NaNOnRow(net), X2, y)


def test_stale_model_and_data(tiny_classification):
    # Queries needing the model refuse a changed model; InfluenceCV with
    # other data or weights refits instead of reusing the stale cache.
    net, X, y = tiny_classification
    est = _est().fit(net, X, y)
    icv = InfluenceCV(est, cv=3).fit(net, X, y)
    assert icv.estimator_ is est
    with torch.no_grad():
        net[2].bias.add_(0.5)
    with pytest.raises(ValueError, match="changed since fit"):
        est.loss_change([np.arange(3)], X, y)
    assert InfluenceCV(est, cv=3).fit(net, X, y).estimator_ is not est


def test_save_load_round_trip_and_faults(tiny_classification, tmp_path):
    # save/load (npz + JSON, allow_pickle=False) answers bitwise identically;
    # another version warns; a truncated or foreign file raises clearly.
    net, X, y = tiny_classification
    est = _est().fit(net, X, y)
    path = tmp_path / "cache.npz"
    est.save(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning for the same version
        loaded = ClusteredInfluenceEstimator.load(path)
    folds = [np.arange(0, 10), np.arange(10, 30)]
    for q in ("param_change", "loss_change"):
        assert np.array_equal(getattr(loaded, q)(folds), getattr(est, q)(folds))
    loaded.set_params(model=net)
    assert np.array_equal(loaded.transform(X, y), est.transform(X, y))
    assert loaded.score(X, y) == est.score(X, y)
    with mock.patch("sklearn_cif._persistence.__version__", "0.0.0"):
        with pytest.warns(CIFWarning, match=f"saved by sklearn_cif {__version__}"):
            ClusteredInfluenceEstimator.load(path)
    blob = path.read_bytes()
    (tmp_path / "cut.npz").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        ClusteredInfluenceEstimator.load(tmp_path / "cut.npz")
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    with pytest.raises(ValueError, match="not a readable|expected a"):
        ClusteredInfluenceEstimator.load(tmp_path / "other.npz")


def test_determinism_across_runs_and_batch_sizes(tiny_classification):
    # Same random_state: bitwise-identical labels, responses and answers
    # across runs; across batch sizes the answers agree to rounding (the
    # summation order of the GGN products changes; see README).
    net, X, y = tiny_classification
    a, b = _est().fit(net, X, y), _est().fit(net, X, y)
    assert np.array_equal(a.labels_, b.labels_) and np.array_equal(
        a.responses_, b.responses_
    )
    assert np.array_equal(a.loss_change([np.arange(9)]), b.loss_change([np.arange(9)]))
    c = _est(batch_size=7).fit(net, X, y)
    assert np.array_equal(a.labels_, c.labels_)
    np.testing.assert_allclose(c.responses_, a.responses_, rtol=1e-9, atol=1e-12)


formats = st.sampled_from(["indices", "list", "mask", "dense", "sparse"])


@settings(max_examples=60, deadline=None)
@given(
    st.sets(st.integers(0, N - 1), min_size=1),
    formats,
    st.randoms(use_true_random=False),
)
def test_any_subset_format_equals_sorted_indices(members, fmt, rnd):
    # Every accepted format, in any order, parses to the same indicator.
    idx = sorted(members)
    shuffled = list(idx)
    rnd.shuffle(shuffled)
    mask = np.zeros(N, bool)
    mask[idx] = True
    given_ = {
        "indices": np.array(shuffled),
        "list": [np.array(shuffled)],
        "mask": mask,
        "dense": mask[None].astype(int),
        "sparse": __import__("scipy.sparse").sparse.csr_matrix(
            mask[None].astype(float)
        ),
    }[fmt]
    got = subset_indicator(given_, N).toarray()
    assert np.array_equal(got, subset_indicator(np.array(idx), N).toarray())


@pytest.fixture(scope="module")
def fitted_tiny():
    rng = np.random.default_rng(0)
    X = torch.as_tensor(rng.normal(size=(N, 4)))
    y = torch.as_tensor(rng.integers(0, 3, size=N))
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)
    ).double()
    return _est(cg_tol=1e-10).fit(net, X, y)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.integers(0, 2), min_size=N, max_size=N),
    st.randoms(use_true_random=False),
)
def test_param_change_is_additive_and_order_invariant(fitted_tiny, assignment, rnd):
    # Disjoint S1, S2 (from a random 3-way split): additivity, and the
    # answer does not depend on the order of the indices.
    assignment = np.array(assignment)
    S1, S2 = np.flatnonzero(assignment == 0), np.flatnonzero(assignment == 1)
    if S1.size == 0 or S2.size == 0:
        return
    union = np.concatenate([S1, S2])
    shuffled = union.copy()
    rnd.shuffle(shuffled)
    d = fitted_tiny.param_change([S1, S2, union, shuffled])
    np.testing.assert_allclose(d[2], d[0] + d[1], rtol=1e-9, atol=1e-14)
    assert np.array_equal(d[2], d[3])


# -- issue 15: one regression test per defect ---------------------------------------
def _mlp32(scale=1.0):
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)
    )
    with torch.no_grad():
        net[2].weight.mul_(scale)
        net[2].bias.mul_(scale)
    return net


def test_defect01_float32_overflow_raises(tiny_classification):
    # Outputs x 1e20 in float32: finite gradients whose squares overflow are
    # refused with FloatingPointError, not answered with NaN.
    _, X, y = tiny_classification
    X32 = X.float()
    with pytest.raises(FloatingPointError, match="non-finite|not finite|overflow"):
        _est().fit(_mlp32(1e20), X32, y)
    est = _est().fit(_mlp32(), X32, y)  # the same model unscaled is fine
    assert np.all(np.isfinite(est.loss_change([np.arange(5)])))


@pytest.mark.parametrize("tol", [float("nan"), 1.0, 2.0, 0.0])
def test_defect02_cg_tol_outside_0_1(tiny_classification, tol):
    # cg_tol must lie in (0, 1) for both estimators.
    from sklearn_cif import PerQueryInfluence

    net, X, y = tiny_classification
    for est in (_est(cg_tol=tol), PerQueryInfluence(loss="cross_entropy", cg_tol=tol)):
        with pytest.raises(ValueError, match="cg_tol"):
            est.fit(net, X, y)


def test_defect03_memory_layout_does_not_change_the_fit(digits):
    # A Fortran-ordered copy of X (the same data) gives the same clusters and
    # bitwise the same answers.
    X, y = digits
    X, y = X[:300], y[:300]
    net = _digits_net()
    a = _est(n_clusters=10).fit(net, X, y)
    b = _est(n_clusters=10).fit(net, np.asfortranarray(X), y)
    np.testing.assert_array_equal(a.labels_, b.labels_)
    np.testing.assert_array_equal(
        a.param_change([np.arange(9)]), b.param_change([np.arange(9)])
    )


def _digits_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(64, 16), torch.nn.Tanh(), torch.nn.Linear(16, 10)
    )


@pytest.mark.parametrize(
    "bad, match", [(2.5, "integer class indices"), (7, r"labels in \[.*7\]")]
)
def test_defect04_evaluation_labels_are_validated(tiny_classification, bad, match):
    # Evaluation labels are checked like training labels, and a bad one does
    # not switch the model to the slow per-example loop.
    net, X, y = tiny_classification
    est = _est().fit(net, X, y)
    yb = y[:10].double().clone()
    yb[3] = bad
    for query in (
        lambda: est.loss_change([np.arange(5)], X[:10], yb),
        lambda: est.transform(X[:10], yb),
    ):
        with pytest.raises(ValueError, match=match):
            query()
    assert est._fmodel.grad_method == "auto"


def test_defect05_final_residual_above_tol_warns(digits):
    # One curvature sample on digits: the recursion calls the solves
    # converged but the recomputed residuals miss cg_tol; that now warns
    # (6.2e-5 > 1e-5 was silent before), and whenever it warns it is true.
    from _models import trained_mlp
    from sklearn.exceptions import ConvergenceWarning

    X, y = digits
    X, y = X[:300], y[:300]
    net = trained_mlp(X, y, hidden=16, weight_decay=1e-3, epochs=200)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        est = _est(n_clusters=10, curvature_samples=1, solver="cg", cg_tol=1e-5).fit(
            net, X, y
        )
    messages = [str(w.message) for w in caught if w.category is ConvergenceWarning]
    assert est.cg_residuals_.max() > 1e-5
    assert messages and "above cg_tol=1e-05" in messages[0]


def test_defect06_duplicate_params_refused(tiny_classification):
    # A parameter named twice is refused by name.
    net, X, y = tiny_classification
    with pytest.raises(ValueError, match=r"\['2.bias'\] more than once"):
        _est(params=["2.bias", "2.bias"]).fit(net, X, y)


class _Branchy(torch.nn.Module):
    """Data-dependent control flow: vmap over examples cannot trace it."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(4, 3).double()

    def forward(self, x):
        if bool((x.abs() > 1e6).any()):  # never true on the data
            x = x.clamp(-1e6, 1e6)
        return self.lin(x)


def test_defect07_loop_fallback_covers_the_newton_features(tiny_classification):
    # A model vmap cannot trace still gets the default target (Newton step),
    # equal to the same linear model without the branch.
    _, X, y = tiny_classification
    branchy = _Branchy()
    plain = torch.nn.Linear(4, 3).double()
    plain.load_state_dict(branchy.lin.state_dict())
    with pytest.warns(CIFWarning, match="falling back"):
        a = _est(n_clusters=30).fit(branchy, X, y)
    b = _est(n_clusters=30).fit(plain, X, y)
    folds = [np.arange(0, 6), np.arange(6, 15)]
    np.testing.assert_allclose(a.loss_change(folds), b.loss_change(folds), rtol=1e-8)


def test_defect08_per_query_detects_changed_training_data(tiny_classification):
    # PerQueryInfluence reads X at every query: an in-place edit is refused.
    from sklearn_cif import PerQueryInfluence

    net, X, y = tiny_classification
    X = X.clone()
    pq = PerQueryInfluence(loss="cross_entropy").fit(net, X, y)
    pq.param_change([[0, 1]])
    X[0, 0] += 1.0
    with pytest.raises(ValueError, match="changed since fit"):
        pq.param_change([[0, 1]])


def test_defect09_load_contract_on_foreign_files(tiny_classification, tmp_path):
    # Foreign files raise ValueError, a missing one FileNotFoundError.
    import json

    np.save(tmp_path / "plain.npy", np.zeros(3))
    blob = np.frombuffer(json.dumps([1, 2]).encode(), np.uint8)
    np.savez(tmp_path / "list.npz", __meta__=blob)
    for name in ("plain.npy", "list.npz"):
        with pytest.raises(ValueError, match="not a readable"):
            ClusteredInfluenceEstimator.load(tmp_path / name)
    with pytest.raises(FileNotFoundError, match="No cache file"):
        ClusteredInfluenceEstimator.load(tmp_path / "missing.npz")


def test_defect11_bfloat16_data_and_half_models(tiny_classification):
    # bfloat16 X fits (cast to the model's dtype); half-precision models are
    # refused up front with the fix.
    net, X, y = tiny_classification
    est = _est().fit(net.float(), X.to(torch.bfloat16), y)
    ref = _est().fit(net.float(), X.to(torch.bfloat16).float(), y)
    np.testing.assert_array_equal(est.labels_, ref.labels_)
    net.double()
    for dtype in (torch.bfloat16, torch.float16):
        half = _mlp32().to(dtype)
        with pytest.raises(TypeError, match="float32 or float64"):
            _est().fit(half, X, y)


def test_defect12_sketch_dim_above_p_clusters_exact_gradients(tiny_classification):
    # sketch_dim >= p uses the exact gradients (k = p), not an N x k sketch.
    net, X, y = tiny_classification
    p = sum(t.numel() for t in net.parameters())
    est = _est(sketch_dim=100_000).fit(net, X, y)
    assert est.cluster_centers_.shape == (est.n_clusters_, p)


def test_defect13_no_spurious_clipping_warning(tiny_classification):
    # A callable cross-entropy (PSD output Hessian) raises no clipping warning.
    import torch.nn.functional as F

    net, X, y = tiny_classification
    with warnings.catch_warnings():
        # (this random net is far from any optimum: that warning is expected)
        warnings.filterwarnings("error", "The loss's Hessian", CIFWarning)
        _est(loss=lambda z, t: F.cross_entropy(z, t, reduction="none")).fit(net, X, y)


def test_defect14_loss_modules_masks_and_set_output(tiny_classification):
    # A torch loss module is accepted (known criteria map to the registered
    # loss; others are evaluated per example); masks inside a list of
    # subsets work; set_output gives named columns.
    net, X, y = tiny_classification
    ref = _est().fit(net, X, y)
    mod = _est(loss=torch.nn.CrossEntropyLoss()).fit(net, X, y)
    assert mod.loss_name_ == "cross_entropy"
    smooth = _est(loss=torch.nn.CrossEntropyLoss(label_smoothing=0.1)).fit(net, X, y)
    assert smooth.loss_name_ == "callable"
    mask = np.zeros(len(y), dtype=bool)
    mask[[1, 4, 9]] = True
    np.testing.assert_array_equal(
        ref.loss_change([mask, np.arange(3)]), ref.loss_change([[1, 4, 9], [0, 1, 2]])
    )
    pd = pytest.importorskip("pandas")
    out = ref.set_output(transform="pandas").transform(X, y)
    assert isinstance(out, pd.DataFrame) and list(out.columns)[0] == "cluster0"
