"""Losses own their knowledge: a loss defined and registered here works end to end."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _oracles import dense_influence
from sklearn.metrics import accuracy_score, log_loss
from sklearn.model_selection import KFold

from sklearn_cif import ClusteredInfluenceEstimator, InfluenceCV
from sklearn_cif.losses import (
    OutputLoss,
    get_loss,
    register_loss,
    resolve_loss,
    skorch_loss,
)

T = 2.0  # temperature


def _tempered(z, y):
    return F.cross_entropy(z / T, y, reduction="none")


class TemperedCriterion(torch.nn.Module):
    """A skorch criterion (mean tempered cross-entropy) mapped to the loss below."""

    def forward(self, z, y):
        return _tempered(z, y).mean()


@register_loss
class TemperedCrossEntropy(OutputLoss):
    r"""Cross-entropy on logits divided by a temperature, a loss of this file only.

    Output Hessian: :math:`(\mathrm{diag}(p) - p p^\top) / T^2`,
    ``p = softmax(z / T)``.
    """

    name = "tempered_ce"
    is_classifier = True
    newton_default = True
    skorch_criteria = (TemperedCriterion,)

    def prepare_target(self, y, output_dtype):
        return y.long()

    def check_targets(self, y, n_outputs):
        if int(y.min()) < 0 or int(y.max()) >= n_outputs:
            raise ValueError("y must hold class indices for loss='tempered_ce'.")

    def value(self, z, y):
        return _tempered(z, y)

    def hessian_state(self, z, y):
        return torch.softmax(z.detach() / T, dim=-1)

    def hvp_from_state(self, p, z, y, u):
        return (p * u - p * (p * u).sum(-1, keepdim=True)) / T**2

    def hvp(self, z, y, u):
        return self.hvp_from_state(self.hessian_state(z, y), z, y, u)

    def to_proba(self, outputs):
        z = outputs / T
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)


def test_registered_loss_matches_a_dense_oracle(tiny_classification):
    # With one cluster per example CiF under the new loss equals a dense solve
    # built from autograd Hessians of the loss function itself.
    net, X, y = tiny_classification
    est = ClusteredInfluenceEstimator(
        len(y), loss="tempered_ce", damping=0.05, cg_tol=1e-12, random_state=0
    ).fit(net, X, y)
    folds = [np.arange(0, 6), np.array([3, 17, 21])]
    ref, _, _ = dense_influence(net, _tempered, X, y, 0.05, folds)
    np.testing.assert_allclose(est.param_change(folds), ref.numpy(), rtol=1e-7)
    assert est.loss_name_ == "tempered_ce"
    assert est.available_targets() == ("retrain", "if")


def test_registered_loss_in_influence_cv_scoring(tiny_classification):
    # InfluenceCV scores the new loss as a classifier: accuracy and log loss
    # recomputed here from the predicted out-of-fold logits.
    net, X, y = tiny_classification
    est = ClusteredInfluenceEstimator(5, loss="tempered_ce", random_state=0)
    # (the net is untrained: "auto" would answer first order off the optimum)
    assert "retrain" in est.available_targets()  # newton_default of the loss
    icv = InfluenceCV(
        est, cv=KFold(5), scoring=["accuracy", "neg_log_loss"], target="retrain"
    )
    icv.fit(net, X, y)
    assert icv.target_ == "retrain"
    res, yn = icv.cv_results_, y.numpy()
    for q, (_, test) in enumerate(KFold(5).split(X)):
        lo, hi = q * 6, (q + 1) * 6
        z = icv.oof_outputs_[lo:hi] / T
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        assert res["test_accuracy"][q] == accuracy_score(yn[test], p.argmax(1))
        np.testing.assert_allclose(
            res["test_neg_log_loss"][q], -log_loss(yn[test], p, labels=[0, 1, 2])
        )
    np.testing.assert_array_equal(
        icv.predict_oof("predict_proba").argmax(1), icv.predict_oof("predict")
    )


def test_registered_loss_from_a_skorch_criterion(tiny_classification):
    # A skorch net whose criterion the new loss declares gets that loss.
    skorch = pytest.importorskip("skorch")
    _, X, y = tiny_classification
    net = skorch.NeuralNetClassifier(
        torch.nn.Linear(4, 3).double(),
        criterion=TemperedCriterion,
        max_epochs=2,
        train_split=None,
        verbose=0,
    ).fit(X.numpy(), y.numpy())
    est = ClusteredInfluenceEstimator(3, random_state=0).fit(net, X.numpy(), y.numpy())
    assert est.loss_name_ == "tempered_ce"


def test_loss_knowledge_of_the_builtin_losses():
    # Each built-in loss declares what the rest of the package asks of it.
    facts = {
        name: (get_loss(name).is_classifier, get_loss(name).newton_default)
        for name in ("cross_entropy", "nll", "nll_proba", "mse", "bce_logits")
    }
    assert facts == {
        "cross_entropy": (True, True),
        "nll": (True, True),
        "nll_proba": (True, True),
        "mse": (False, True),
        "bce_logits": (True, True),
    }
    assert skorch_loss(torch.nn.NLLLoss(), "classifier").name == "nll_proba"
    assert skorch_loss(torch.nn.NLLLoss(), "net").name == "nll"
    assert skorch_loss(torch.nn.L1Loss(), "regressor") is None
    assert get_loss("bce_logits").n_classes(1) == 2
    np.testing.assert_allclose(
        get_loss("bce_logits").to_proba(np.array([[0.0], [100.0]])),
        [[0.5, 0.5], [0.0, 1.0]],
    )
    with pytest.raises(ValueError, match="not class scores"):
        get_loss("mse").to_proba(np.zeros((2, 1)))


def test_register_and_resolve_errors():
    # Registering something that is not a loss, or an unnamed one, is refused;
    # unknown names list the registered ones.
    with pytest.raises(TypeError, match="OutputLoss subclass"):
        register_loss(int)

    class Unnamed(OutputLoss):
        name = "callable"

    with pytest.raises(ValueError, match="name must be a new string"):
        register_loss(Unnamed)
    with pytest.raises(ValueError, match="tempered_ce"):
        resolve_loss("hinge")
    with pytest.raises(TypeError, match="loss must be"):
        resolve_loss(3)
