"""Leave-one-out: the Newton-step default against exact refits where it is largest.

Multinomial logistic regression on 200 standardized digits, taken to the
optimum of its regularized objective (float64 LBFGS, lambda = 1e-3); the
default ``InfluenceCV(ClusteredInfluenceEstimator(50), cv=LeaveOneOut())``;
exact LBFGS refits without the five examples whose Newton estimate is
largest relative to first order, and three typical ones; the same with every
eigenpair kept (``correction_rank=p``, one cluster per example).

    python benchmarks/loo_newton_check.py
"""

import copy
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import LeaveOneOut
from sklearn.preprocessing import StandardScaler

from sklearn_cif import ClusteredInfluenceEstimator, InfluenceCV

LAM, N = 1e-3, 200


def fit(net, X, y, n_total):
    opt = torch.optim.LBFGS(
        net.parameters(), max_iter=5000, tolerance_grad=1e-11,
        tolerance_change=1e-14, history_size=50, line_search_fn="strong_wolfe",
    )  # fmt: skip

    def closure():
        opt.zero_grad()
        reg = sum((p**2).sum() for p in net.parameters())
        loss = F.cross_entropy(net(X), y) * len(y) / n_total + LAM / 2 * reg
        loss.backward()
        return loss

    for _ in range(5):
        opt.step(closure)
    return net


def main():
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    X, y = load_digits(return_X_y=True)
    X = torch.as_tensor(StandardScaler().fit_transform(X)[:N])
    y = torch.as_tensor(y[:N])
    net = fit(torch.nn.Linear(64, 10).double(), X, y, N)
    est = ClusteredInfluenceEstimator(
        50, loss="cross_entropy", damping=LAM, random_state=0
    )
    res = InfluenceCV(est, cv=LeaveOneOut()).fit(net, X, y).cv_results_
    d, f = res["delta_loss"], res["delta_loss_if"]
    full = ClusteredInfluenceEstimator(
        N, loss="cross_entropy", damping=LAM, random_state=0,
        correction_rank=sum(p.numel() for p in net.parameters()), cg_tol=1e-10,
    )  # fmt: skip
    exact = InfluenceCV(full, cv=LeaveOneOut()).fit(net, X, y).cv_results_["delta_loss"]
    print(
        f"median Newton / first order {np.median(d / f):.2f}; mean Newton {d.mean():.4f}"
    )
    order = np.argsort(-(d / f))
    print("example      real    Newton  all-eigenpairs  first order")
    for i in [*order[:5], *order[100:103]]:
        keep = np.setdiff1d(np.arange(N), [i])
        refit = fit(copy.deepcopy(net), X[keep], y[keep], N)
        with torch.no_grad():
            real = (
                F.cross_entropy(refit(X[i : i + 1]), y[i : i + 1])
                - F.cross_entropy(net(X[i : i + 1]), y[i : i + 1])
            ).item()
        print(f"{i:7d} {real:9.4f} {d[i]:9.4f} {exact[i]:15.4f} {f[i]:12.4f}")


if __name__ == "__main__":
    main()
