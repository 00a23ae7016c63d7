import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _oracles import loop_grads

from sklearn_cif.adapters import as_functional
from sklearn_cif.gradients import per_example_grads


def _rel(a, b):
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


@pytest.mark.parametrize(
    "loss, oracle_loss",
    [
        ("cross_entropy", lambda z, y: F.cross_entropy(z, y, reduction="none")),
        ("nll", lambda z, y: F.nll_loss(F.log_softmax(z, -1), y, reduction="none")),
    ],
)
def test_vmap_grads_match_loop_classification(tiny_classification, loss, oracle_loss):
    # vmap per-example gradients equal one backward pass per example (float64).
    net, X, y = tiny_classification
    if loss == "nll":  # nll expects log-probabilities: append a log_softmax head
        net = torch.nn.Sequential(net, torch.nn.LogSoftmax(-1))
        oracle_loss = lambda z, y: F.nll_loss(z, y, reduction="none")  # noqa: E731
    fm = as_functional(net, loss=loss, device="cpu")
    G, losses = per_example_grads(fm, X, y)
    ref = loop_grads(net, oracle_loss, X, y)
    assert G.shape == (30, fm.n_params)
    assert _rel(G, ref) < 1e-10
    assert torch.allclose(losses, oracle_loss(net(X), y))


def test_vmap_grads_match_loop_mse_and_callable(tiny_regression):
    # MSE (mean over outputs) and a callable loss both match the loop oracle.
    net, X, y = tiny_regression
    huber = lambda z, t: F.huber_loss(z, t, reduction="none").sum(1)  # noqa: E731
    for loss, ref_loss in [
        ("mse", lambda z, t: ((z - t) ** 2).mean(1)),
        (huber, huber),
    ]:
        fm = as_functional(net, loss=loss, device="cpu")
        G, _ = per_example_grads(fm, X, y)
        assert _rel(G, loop_grads(net, ref_loss, X, y)) < 1e-10


def test_loop_fallback_equals_vmap(tiny_classification):
    # The loop fallback and vmap give the same gradients.
    net, X, y = tiny_classification
    fm = as_functional(net, loss="cross_entropy", device="cpu")
    G1, l1 = per_example_grads(fm, X, y, method="vmap")
    G2, l2 = per_example_grads(fm, X, y, method="loop")
    assert _rel(G1, G2) < 1e-12 and torch.allclose(l1, l2)


def test_cnn_on_images_matches_loop(digits):
    # A small CNN on (N, 1, 8, 8) digit images: vmap equals the loop oracle.
    X, y = digits
    X = torch.as_tensor(X[:20]).reshape(-1, 1, 8, 8).double()
    y = torch.as_tensor(y[:20])
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(144, 10),
    ).double()
    fm = as_functional(net, loss="cross_entropy", device="cpu")
    G, _ = per_example_grads(fm, X, y)
    ref = loop_grads(net, lambda z, t: F.cross_entropy(z, t, reduction="none"), X, y)
    assert _rel(G, ref) < 1e-10


def test_params_restricts_to_named_parameters(tiny_classification):
    # params=[...] keeps only those columns of the full per-example gradient.
    net, X, y = tiny_classification
    full = as_functional(net, loss="cross_entropy", device="cpu")
    part = as_functional(net, loss="cross_entropy", params=["2.weight"], device="cpu")
    G_full, _ = per_example_grads(full, X, y)
    G_part, _ = per_example_grads(part, X, y)
    start = sum(p.numel() for p in list(net.parameters())[:2])
    assert part.n_params == net[2].weight.numel()
    np.testing.assert_allclose(G_part, G_full[:, start : start + part.n_params])


def test_unknown_param_name_raises(tiny_classification):
    # A params name that the module does not have is named in the error.
    net, _, _ = tiny_classification
    with pytest.raises(ValueError, match="nope"):
        as_functional(net, loss="cross_entropy", params=["nope"], device="cpu")
