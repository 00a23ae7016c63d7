import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _oracles import dense_ggn, dense_hessian, loop_grads

from sklearn_cif import CIFWarning, ClusteredInfluenceEstimator, PerQueryInfluence
from sklearn_cif.adapters import as_functional
from sklearn_cif.curvature import (
    DampedGGNOperator,
    DampedHessianOperator,
    make_curvature,
    register_curvature,
)
from sklearn_cif.passes import DataPasses
from sklearn_cif.solvers import spectral_preconditioner

EPS64 = torch.finfo(torch.float64).eps
CASES = {"cross_entropy": lambda z, y: F.cross_entropy(z, y, reduction="none")}


@pytest.mark.parametrize("loss", ["cross_entropy", "nll_proba"])
def test_ggn_matches_dense_classification(tiny_classification, loss):
    # The operator equals explicit (1/N) sum J^T H J + lambda I with CE on
    # logits; for skorch's NLL on softmax probabilities, split at the
    # log-probabilities, it equals the same explicit matrix of the logits.
    net, X, y = tiny_classification
    model = net
    if loss == "nll_proba":
        model = torch.nn.Sequential(net, torch.nn.Softmax(-1))
    fm = as_functional(model, loss=loss, device="cpu")
    op = DampedGGNOperator(DataPasses(fm, X, y, 7), damping=0.1)
    ref = dense_ggn(net, CASES["cross_entropy"], X, y, 0.1)
    torch.testing.assert_close(op.to_dense(), ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("loss", ["cross_entropy", "nll_proba", "mse"])
def test_hessian_matches_autograd_hessian(tiny_classification, tiny_regression, loss):
    # Gauss-Newton part plus residual, by products (matmat) and by the
    # dense pass, equals the autograd Hessian of the damped objective; for
    # skorch's NLL on probabilities the split point does not matter.
    net, X, y = tiny_regression if loss == "mse" else tiny_classification
    model = net
    if loss == "nll_proba":
        model = torch.nn.Sequential(net, torch.nn.Softmax(-1))
    fm = as_functional(model, loss=loss, device="cpu")
    op = DampedHessianOperator(DataPasses(fm, X, y, 7), damping=0.1)
    if loss == "mse":
        ref_loss = {"mse": lambda z, t: ((z - t) ** 2).mean(1)}[loss]
    else:
        ref_loss = CASES["cross_entropy"]
    ref = dense_hessian(net, ref_loss, X, y, 0.1)
    ggn = dense_ggn(net, ref_loss, X, y, 0.1)
    assert (ref - ggn).abs().max() > 1e-3  # the residual is there to find
    torch.testing.assert_close(op.to_dense(), ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(op.dense(), ref, rtol=1e-10, atol=1e-12)
    A, R = DampedHessianOperator(DataPasses(fm, X, y, 7), 0.1).dense_terms()
    torch.testing.assert_close(A, ggn, rtol=1e-10, atol=1e-12)


def test_hessian_of_linear_model_is_the_ggn(tiny_classification):
    # f linear in theta: no residual, the two operators agree exactly.
    _, X, y = tiny_classification
    lin = torch.nn.Linear(4, 3).double()
    fm = as_functional(lin, loss="cross_entropy", device="cpu")
    H = DampedHessianOperator(DataPasses(fm, X, y, 7), 0.1).dense()
    G = DampedGGNOperator(DataPasses(fm, X, y, 7), 0.1).dense()
    torch.testing.assert_close(H, G, rtol=0, atol=1e-15)


def test_ggn_matches_dense_mse_and_callable(tiny_regression):
    # MSE closed form and the autograd output Hessian of a callable loss.
    net, X, y = tiny_regression
    mse = lambda z, t: ((z - t) ** 2).mean(1)  # noqa: E731
    cubic = lambda z, t: ((z - t) ** 2).sum(1) + 0.1 * (z**4).sum(1)  # noqa: E731
    for loss, ref_loss in [("mse", mse), (cubic, cubic)]:
        fm = as_functional(net, loss=loss, device="cpu")
        op = DampedGGNOperator(DataPasses(fm, X, y, 10), damping=0.01)
        ref = dense_ggn(net, ref_loss, X, y, 0.01)
        torch.testing.assert_close(op.to_dense(), ref, rtol=1e-10, atol=1e-12)


def test_bce_logits_matches_dense():
    # Binary cross-entropy on a single logit (skorch's binary classifier).
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)
    ).double()
    X = torch.randn(20, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (20, 1)).double()
    fm = as_functional(net, loss="bce_logits", device="cpu")
    op = DampedGGNOperator(DataPasses(fm, X, y, 6), damping=0.05)

    def ref_loss(z, t):
        return F.binary_cross_entropy_with_logits(z, t, reduction="none").mean(1)

    torch.testing.assert_close(op.to_dense(), dense_ggn(net, ref_loss, X, y, 0.05))


def test_callable_with_indefinite_hessian_is_clipped():
    # A loss concave in the output has its negative output-Hessian
    # eigenvalues clipped: the GGN part of the operator is then zero.
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2).double()
    X, y = (
        torch.randn(10, 3, dtype=torch.float64),
        torch.zeros(10, 2, dtype=torch.float64),
    )
    concave = lambda z, t: -(z**2).sum(1)  # noqa: E731
    fm = as_functional(net, loss=concave, device="cpu")
    op = DampedGGNOperator(DataPasses(fm, X, y, 4), damping=0.5)
    with pytest.warns(CIFWarning, match="10 of 10 examples") as record:
        dense = op.to_dense()
        op.matmat(torch.ones(8, dtype=torch.float64))  # reported once only
    assert len(record) == 1
    torch.testing.assert_close(dense, 0.5 * torch.eye(8, dtype=torch.float64))


def test_clipping_counts_each_example_once_across_column_blocks():
    # A first pass split into column blocks (8 columns, 1 per block) still
    # reports each example once: "10 of 10", not "80 of 10".
    net = torch.nn.Linear(3, 2).double()
    X = torch.randn(10, 3, dtype=torch.float64)
    y = torch.zeros(10, 2, dtype=torch.float64)
    concave = lambda z, t: -(z**2).sum(1)  # noqa: E731
    fm = as_functional(net, loss=concave, device="cpu")
    op = DampedGGNOperator(DataPasses(fm, X, y, 4), damping=0.5, max_elements=1)
    with pytest.warns(CIFWarning, match="for 10 of 10 examples"):
        op.to_dense()
    # the one-pass dense build counts the same way and gives lambda I
    op = DampedGGNOperator(DataPasses(fm, X, y, 4), damping=0.5, max_elements=1)
    with pytest.warns(CIFWarning, match="for 10 of 10 examples"):
        dense = op.dense()
    torch.testing.assert_close(dense, 0.5 * torch.eye(8, dtype=torch.float64))


def test_operator_counts_products_and_passes(tiny_classification):
    # A block of r vectors costs one data pass and counts r products.
    net, X, y = tiny_classification
    fm = as_functional(net, loss="cross_entropy", device="cpu")
    op = DampedGGNOperator(DataPasses(fm, X, y, 100), damping=0.1)
    op.matmat(torch.randn(4, fm.n_params, dtype=torch.float64))
    assert (op.passes.n_passes, op.n_products) == (1, 4)


@register_curvature("test_scaled_identity")
class ScaledIdentity:
    """``lambda I``: a curvature registered by this test file only."""

    def __init__(self, passes, damping):
        fm = passes.fmodel
        self.n_params, self.dtype, self.device = fm.n_params, fm.dtype, fm.device
        self.damping, self.n_products = float(damping), 0

    def matmat(self, V):
        self.n_products += V.shape[0] if V.dim() == 2 else 1
        return self.damping * V


def test_a_registered_curvature_is_used_end_to_end(tiny_classification):
    # CiF and PerQueryInfluence solve with the operator named by curvature=:
    # with lambda I and one cluster per example, Delta theta = sum g_i / (N lambda).
    net, X, y = tiny_classification
    kw = dict(loss="cross_entropy", damping=0.5, curvature="test_scaled_identity")
    cif = ClusteredInfluenceEstimator(len(y), residual_correction="none", **kw)
    pq = PerQueryInfluence(**kw)
    folds = [np.arange(0, 6), np.array([3, 17, 21])]
    g = loop_grads(net, torch.nn.CrossEntropyLoss(reduction="none"), X, y)
    ref = torch.stack([g[f].sum(0) for f in folds]).numpy() / (len(y) * 0.5)
    for est in (cif, pq):
        np.testing.assert_allclose(
            est.fit(net, X, y).param_change(folds), ref, rtol=1e-9, atol=1e-12
        )
    # an operator without dense(): "auto" solves by CG, "dense" is refused
    assert cif.solver_ == "cg"
    with pytest.raises(ValueError, match="solver='dense' needs a curvature"):
        cif.set_params(solver="dense").fit(net, X, y)


def test_auto_solver_follows_the_documented_thresholds(
    tiny_classification, monkeypatch
):
    # p <= DENSE_MAX_PARAMS and N d p <= DENSE_MAX_FEATURES: dense; past
    # either threshold: CG.
    import sklearn_cif._build as build

    net, X, y = tiny_classification
    p = sum(q.numel() for q in net.parameters())
    est = ClusteredInfluenceEstimator(4, loss="cross_entropy", random_state=0)
    assert est.fit(net, X, y).solver_ == "dense"
    monkeypatch.setattr(build, "DENSE_MAX_PARAMS", p - 1)
    assert est.fit(net, X, y).solver_ == "cg"
    monkeypatch.setattr(build, "DENSE_MAX_PARAMS", p)
    monkeypatch.setattr(build, "DENSE_MAX_FEATURES", len(y) * 3 * p - 1)
    assert est.fit(net, X, y).solver_ == "cg"
    monkeypatch.setattr(build, "DENSE_MAX_FEATURES", len(y) * 3 * p)
    assert est.fit(net, X, y).solver_ == "dense"


def test_unknown_curvature_is_refused(tiny_classification):
    # An unregistered name is refused by make_curvature and by fit, named.
    net, X, y = tiny_classification
    fm = as_functional(net, loss="cross_entropy", device="cpu")
    with pytest.raises(ValueError, match="curvature='kfac'.*'ggn'"):
        make_curvature("kfac", DataPasses(fm, X, y, 8), 0.1)
    with pytest.raises(ValueError, match="curvature='kfac'"):
        ClusteredInfluenceEstimator(4, loss="cross_entropy", curvature="kfac").fit(
            net, X, y
        )


def test_spectral_preconditioner_takes_only_a_matmat(tiny_classification):
    # The spectrum sees a plain function: its top eigenvalues match a dense
    # eigendecomposition of the operator's matrix.
    net, X, y = tiny_classification
    fm = as_functional(net, loss="cross_entropy", device="cpu")
    A = DampedGGNOperator(DataPasses(fm, X, y, 8), damping=0.1).to_dense()
    dense = torch.linalg.eigvalsh(A).flip(0)
    like = torch.empty(0, dtype=A.dtype)
    P = spectral_preconditioner(lambda V: V @ A, A.shape[0], 0.1, 6, 0, like)
    torch.testing.assert_close(P.evals, dense[:6], rtol=1e-8, atol=1e-10)
    assert P.tail >= 0.1
