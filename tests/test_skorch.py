"""Every skorch net kind fits end to end and matches a dense oracle at C = N."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _oracles import dense_influence

skorch = pytest.importorskip("skorch")
from sklearn.model_selection import KFold  # noqa: E402
from skorch import NeuralNetBinaryClassifier, NeuralNetClassifier, NeuralNetRegressor  # noqa: E402

from sklearn_cif import ClusteredInfluenceEstimator, InfluenceCV  # noqa: E402

EPS = torch.finfo(torch.float64).eps
N = 40


class MLP(torch.nn.Module):
    def __init__(self, d_out=3, head=None):
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, d_out)
        )
        self.head = head

    def forward(self, X):
        z = self.body(X)
        return self.head(z) if self.head is not None else z


def _data(kind):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(N, 5)).astype(np.float32)
    if kind == "regressor":
        return X, rng.normal(size=(N, 1)).astype(np.float32)
    if kind == "binary":
        return X, rng.integers(0, 2, N).astype(np.float32)
    return X, rng.integers(0, 3, N).astype(np.int64)


def _net(kind):
    common = dict(max_epochs=3, lr=0.05, batch_size=16, train_split=None, verbose=0)
    torch.manual_seed(0)
    if kind == "nll_proba":  # skorch's default: NLLLoss on softmax probabilities
        return NeuralNetClassifier(MLP, module__head=torch.nn.Softmax(-1), **common), (
            lambda z, y: F.cross_entropy(z, y, reduction="none")  # on the logits
        )
    if kind == "cross_entropy":
        return NeuralNetClassifier(
            MLP, criterion=torch.nn.CrossEntropyLoss, **common
        ), (lambda z, y: F.cross_entropy(z, y, reduction="none"))
    if kind == "regressor":
        return NeuralNetRegressor(MLP, module__d_out=1, **common), (
            lambda z, y: ((z - y) ** 2).mean(1)
        )
    return NeuralNetBinaryClassifier(MLP, module__d_out=1, **common), (
        lambda z, y: F.binary_cross_entropy_with_logits(z[:, 0], y, reduction="none")
    )


@pytest.mark.parametrize("kind", ["nll_proba", "cross_entropy", "regressor", "binary"])
def test_skorch_net_end_to_end_matches_dense(kind):
    # The loss is derived from the criterion and CiF (C = N) equals the dense IF.
    X, y = _data(kind)
    net, oracle_loss = _net(kind)
    net.fit(X, y)
    before = {k: v.clone() for k, v in net.module_.state_dict().items()}
    # float64 copy for the exactness check; the float32 net is fitted too.
    ClusteredInfluenceEstimator(5, random_state=0, sketch_dim=8).fit(net, X, y)
    net.module_.double()
    X64, y64 = (
        X.astype(np.float64),
        y.astype(np.float64) if kind in ("regressor", "binary") else y,
    )
    subsets = [np.array([0, 1, 2]), np.arange(10, 25)]
    est = ClusteredInfluenceEstimator(
        N, damping=0.05, cg_tol=1e-12, random_state=0
    ).fit(net, X64, y64)
    # skorch's NLL on probabilities splits the curvature at the
    # log-probabilities: its oracle is the same body's logits with CE
    oracle = net.module_.body if kind == "nll_proba" else net.module_
    ref, _, _ = dense_influence(
        oracle,
        oracle_loss,
        torch.as_tensor(X64),
        torch.as_tensor(y64),
        0.05,
        subsets,
    )
    pred = est.param_change(subsets)
    assert np.linalg.norm(pred - ref.numpy()) / np.linalg.norm(ref.numpy()) < 1e-6
    # every kind's loss gives the Newton step, the default at the optimum
    assert est.available_targets() == ("retrain", "if")
    icv = InfluenceCV(est, cv=3).fit(net, X64, y64)
    assert icv.target_ == ("retrain" if est.optimality_gap_ <= 1 else "if")
    net.module_.float()
    assert all(torch.equal(before[k], v) for k, v in net.module_.state_dict().items())


def test_unfitted_skorch_net_raises():
    # An uninitialized skorch net is a NotFittedError, not a crash.
    from sklearn.exceptions import NotFittedError

    X, y = _data("cross_entropy")
    net, _ = _net("cross_entropy")
    with pytest.raises(NotFittedError, match="not initialized"):
        ClusteredInfluenceEstimator(5).fit(net, X, y)


def test_cnn_skorch_on_digit_images(digits):
    # A small CNN on 8x8 digit images (N, 1, 8, 8) fits end to end.
    X, y = digits
    X = X[:200].reshape(-1, 1, 8, 8)
    y = y[:200]
    cnn = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(144, 10),
    )
    torch.manual_seed(0)
    net = NeuralNetClassifier(
        cnn,
        criterion=torch.nn.CrossEntropyLoss,
        max_epochs=2,
        train_split=None,
        verbose=0,
    )
    net.fit(X, y)
    est = ClusteredInfluenceEstimator(10, sketch_dim=32, random_state=0).fit(net, X, y)
    assert est.responses_.shape == (
        est.n_clusters_,
        sum(p.numel() for p in cnn.parameters()),
    )
    assert np.all(np.isfinite(est.loss_change([np.arange(20)])))
    assert est.transform(X[:5], y[:5]).shape == (5, est.n_clusters_)


def test_default_classifier_agrees_with_the_logits_model():
    # skorch's softmax + NLLLoss gets the Newton step by default, and its
    # answers (delta loss, accuracy, log loss) agree with the same body
    # written with logits and cross-entropy.
    X, y = _data("nll_proba")
    net, _ = _net("nll_proba")
    net.set_params(max_epochs=30).fit(X, y)
    kw = dict(n_clusters=8, damping=1e-2, random_state=0)
    scoring = ["accuracy", "neg_log_loss"]
    cv = KFold(5)
    a = InfluenceCV(ClusteredInfluenceEstimator(**kw), cv=cv, scoring=scoring)
    a.fit(net, X, y)
    logits = ClusteredInfluenceEstimator(loss="cross_entropy", **kw)
    b = InfluenceCV(logits, cv=cv, scoring=scoring).fit(net.module_.body, X, y)
    assert a.target_ == b.target_ == "retrain"
    for key in ("delta_loss", "delta_loss_if", "test_neg_log_loss"):
        np.testing.assert_allclose(a.cv_results_[key], b.cv_results_[key], rtol=1e-3)
    np.testing.assert_array_equal(
        a.cv_results_["test_accuracy"], b.cv_results_["test_accuracy"]
    )
