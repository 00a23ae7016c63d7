"""param_change is the derivative of actual retraining (independent oracle)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sklearn_cif import ClusteredInfluenceEstimator, PerQueryInfluence

LAM = 1e-3


def _objective(net, X, y, weights):
    # (1/N) sum_i w_i l_i + (lambda/2) ||theta||^2  (doc/developer.rst)
    losses = F.cross_entropy(net(X), y, reduction="none")
    reg = sum((p * p).sum() for p in net.parameters())
    return (weights * losses).sum() / len(y) + 0.5 * LAM * reg


def _train(net, X, y, weights, gtol):
    opt = torch.optim.LBFGS(
        net.parameters(),
        lr=1,
        max_iter=500,
        tolerance_grad=1e-300,
        tolerance_change=1e-300,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        loss = _objective(net, X, y, weights)
        loss.backward()
        return loss

    for _ in range(5):
        opt.step(closure)
    # LBFGS stalls near 1e-9 in float64; finish with exact Newton steps on the
    # dense Hessian of the objective (quadratic convergence).
    shapes = [p.shape for p in net.parameters()]

    def flat_objective(theta):
        w, b = theta[: shapes[0].numel()].reshape(shapes[0]), theta[shapes[0].numel() :]
        z = X @ w.T + b
        losses = F.cross_entropy(z, y, reduction="none")
        return (weights * losses).sum() / len(y) + 0.5 * LAM * (theta * theta).sum()

    theta = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    for _ in range(10):
        g = torch.func.grad(flat_objective)(theta)
        if torch.linalg.norm(g) < gtol:
            break
        theta = theta - torch.linalg.solve(torch.func.hessian(flat_objective)(theta), g)
    gnorm = float(torch.linalg.norm(torch.func.grad(flat_objective)(theta)))
    assert gnorm < gtol, f"retraining did not reach gradient norm {gtol}: {gnorm:.3g}"
    with torch.no_grad():
        net.weight.copy_(theta[: shapes[0].numel()].reshape(shapes[0]))
        net.bias.copy_(theta[shapes[0].numel() :])
    return gnorm


def _flat(net):
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()]).numpy()


@pytest.fixture(scope="module")
def logreg(digits):
    X, y = digits
    # 600 examples keep CiF with one cluster per example (C = N) cheap.
    X, y = torch.as_tensor(X[:600], dtype=torch.float64), torch.as_tensor(y[:600])
    torch.manual_seed(0)
    net = torch.nn.Linear(64, 10).double()
    gnorm = _train(net, X, y, torch.ones(len(y), dtype=torch.float64), gtol=1e-11)
    assert gnorm < 1e-8
    return net, X, y


@pytest.mark.slow
@pytest.mark.parametrize("subset", ["one_point", "two_percent_fold"])
def test_param_change_is_derivative_of_retraining(logreg, subset):
    # Down-weighting S by eps and retraining moves theta by eps * param_change(S).
    net, X, y = logreg
    N = len(y)
    S = (
        np.array([17])
        if subset == "one_point"
        else np.random.default_rng(0).choice(N, N // 50, replace=False)
    )
    eps = 1e-3
    w = torch.ones(N, dtype=torch.float64)
    w[S] = 1 - eps
    retrained = torch.nn.Linear(64, 10).double()
    retrained.load_state_dict(net.state_dict())  # warm start
    _train(retrained, X, y, w, gtol=1e-12)
    finite_diff = (_flat(retrained) - _flat(net)) / eps
    kw = dict(
        loss="cross_entropy", damping=LAM, cg_tol=1e-10, cg_maxiter=5000, device="cpu"
    )
    pq = PerQueryInfluence(**kw).fit(net, X, y).param_change([S])[0]
    cif = (
        ClusteredInfluenceEstimator(N, random_state=0, **kw)
        .fit(net, X, y)
        .param_change([S])[0]
    )
    for pred in (pq, cif):
        rel = np.linalg.norm(pred - finite_diff) / np.linalg.norm(finite_diff)
        assert rel < 0.01, rel
