"""How exact is first-order influence? Derivative vs full removal, digits LR.

    python benchmarks/removal_vs_derivative.py

Multinomial logistic regression on all of digits (float64, lambda = 1e-3),
trained to its optimum (Newton polish to gradient norm < 1e-11). For one
point and for a random 2% fold S:

- derivative: retrain with S down-weighted by eps = 1e-3; compare
  (theta_eps - theta) / eps with param_change(S) (first-order exact);
- full removal: retrain without S on (1/N) sum_{i not in S} l_i + lambda/2 ||theta||^2;
  compare theta_{-S} - theta with param_change(S).

Relative errors ||pred - actual|| / ||actual|| are printed for
PerQueryInfluence (and CiF with C = N for the derivative).
"""

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from sklearn_cif import PerQueryInfluence

LAM = 1e-3


def fit_logreg(X, y, w, theta0):
    """Newton's method on (1/N) sum_i w_i l_i + lam/2 ||theta||^2 (dense Hessian)."""

    def objective(theta):
        W, b = theta[:640].reshape(10, 64), theta[640:]
        losses = F.cross_entropy(X @ W.T + b, y, reduction="none")
        return (w * losses).sum() / len(y) + 0.5 * LAM * (theta * theta).sum()

    theta = theta0.clone()
    for _ in range(50):
        g = torch.func.grad(objective)(theta)
        if torch.linalg.norm(g) < 1e-11:
            return theta
        step = torch.linalg.solve(torch.func.hessian(objective)(theta), g)
        t = 1.0  # backtracking keeps the first steps from a cold start safe
        while objective(theta - t * step) > objective(theta) and t > 1e-4:
            t /= 2
        theta = theta - t * step
    raise RuntimeError(f"Newton did not converge: |g| = {torch.linalg.norm(g):.2e}")


def main():
    X, y = load_digits(return_X_y=True)
    X, y = torch.as_tensor(X / 16.0), torch.as_tensor(y)
    N = len(y)
    theta = fit_logreg(
        X, y, torch.ones(N, dtype=torch.float64), torch.zeros(650, dtype=torch.float64)
    )
    net = torch.nn.Linear(64, 10).double()
    with torch.no_grad():
        net.weight.copy_(theta[:640].reshape(10, 64))
        net.bias.copy_(theta[640:])
    pq = PerQueryInfluence(
        loss="cross_entropy", damping=LAM, cg_tol=1e-10, cg_maxiter=5000
    ).fit(net, X, y)
    rng = np.random.default_rng(0)
    for name, S in [
        ("one point", np.array([17])),
        ("2% fold", rng.choice(N, N // 50, replace=False)),
    ]:
        pred = pq.param_change([S])[0]
        eps = 1e-3
        w = torch.ones(N, dtype=torch.float64)
        w[S] = 1 - eps
        deriv = ((fit_logreg(X, y, w, theta) - theta) / eps).numpy()
        w[S] = 0.0
        removal = (fit_logreg(X, y, w, theta) - theta).numpy()
        rel = lambda a, b: np.linalg.norm(a - b) / np.linalg.norm(b)  # noqa: E731
        print(
            f"{name:9s} |S|={len(S):3d}: derivative rel. error {rel(pred, deriv):.2e}; "
            f"full removal rel. error {rel(pred, removal):.3f} "
            f"(|pred|/|actual| = {np.linalg.norm(pred) / np.linalg.norm(removal):.3f})"
        )


if __name__ == "__main__":
    main()
