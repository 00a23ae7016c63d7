"""The dense solver against a dense direct solve of the same folds (issue 13).

    python benchmarks/dense_path.py [--models lr mlp]

Setups: digits (all 1,797, X / 16), float64, lambda = 1e-3; multinomial
logistic regression (p = 650) and a 64-32-10 tanh MLP (p = 2,410), trained
by float64 LBFGS to the regularized optimum. Folds: KFold(50), KFold(100)
and leave-one-out on 200 examples.

Direct method (what pyDVL's ``DirectInfluence`` does, written out with
``torch.func``): per-example gradients and output Jacobians of every
training example, the dense damped GGN, one Cholesky factor; first order per
fold ``b^T H^{-1} b / (N m)`` with ``b`` the fold's gradient sum; the Newton
step per fold by a dense solve of ``(H - (m/N) G_S) d = b``.

Ours: ``ClusteredInfluenceEstimator(n_clusters=50, solver="dense")`` fit +
``fold_effects`` (target ``"if"`` and ``"retrain"``), and the same with
``solver="cg"`` (the default before the dense path) beside it. Reports
seconds, the dense build in epochs of the model's own training (minibatch
128 forward/backward/step over all N, measured in the same run) and the
largest relative difference to the direct answers.
Writes benchmarks/results/dense_path.json.
"""

import argparse
import json
import pathlib
import time

import numpy as np
import torch
import torch.nn.functional as F
from _refit import l2, lbfgs_minimize
from sklearn.datasets import load_digits
from sklearn.model_selection import KFold
from torch.func import functional_call, grad, jacrev, vmap

from sklearn_cif import ClusteredInfluenceEstimator

LAM = 1e-3
OUT = pathlib.Path(__file__).parent / "results" / "dense_path.json"


def trained(model, X, y):
    torch.manual_seed(0)
    net = (
        torch.nn.Linear(64, 10)
        if model == "lr"
        else torch.nn.Sequential(
            torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10)
        )
    ).double()

    def objective(m):
        return F.cross_entropy(m(X), y) + LAM / 2 * l2(m)

    return lbfgs_minimize(
        net, objective, steps=6, max_iter=500, tolerance_grad=1e-10,
        tolerance_change=1e-15,
    )  # fmt: skip


def direct(net, X, y, folds, newton):
    """Dense direct solves of every fold (first order and, if asked, Newton)."""
    params = {k: v.detach() for k, v in net.named_parameters()}
    names = list(params)

    def flat(d):
        return torch.cat([d[k].reshape(d[k].shape[0], -1) for k in names], 1)

    def f(p, x):
        return functional_call(net, p, (x[None],))[0]

    def loss(p, x, t):
        return F.cross_entropy(f(p, x)[None], t[None])

    t0 = time.perf_counter()
    G = flat(vmap(grad(loss), in_dims=(None, 0, 0))(params, X, y))  # (N, p)
    J = vmap(jacrev(f), in_dims=(None, 0))(params, X)
    J = torch.cat([J[k].reshape(len(y), 10, -1) for k in names], 2)  # (N, d, p)
    prob = torch.softmax(net(X), 1).detach()
    Hout = torch.diag_embed(prob) - prob[:, :, None] * prob[:, None, :]
    HJ = Hout @ J
    n, p = G.shape
    H = J.reshape(-1, p).T @ HJ.reshape(-1, p) / n + LAM * torch.eye(p).double()
    chol = torch.linalg.cholesky(H)
    first, retrain = [], []
    for S in folds:
        b = G[S].sum(0) / n
        u = torch.cholesky_solve(b[:, None], chol)[:, 0]
        first.append((G[S].mean(0) @ u).item())
        if newton:
            G_S = J[S].reshape(-1, p).T @ HJ[S].reshape(-1, p) / n
            d = torch.linalg.solve(H - G_S, b)
            # the same second-order loss model as the package
            retrain.append((G[S].mean(0) @ d + 0.5 * d @ G_S @ d * n / len(S)).item())
    return np.array(first), np.array(retrain), time.perf_counter() - t0


def ours(net, X, y, folds, solver):
    t0 = time.perf_counter()
    est = ClusteredInfluenceEstimator(
        50, loss="cross_entropy", damping=LAM, solver=solver, random_state=0
    ).fit(net, X, y)
    build = time.perf_counter() - t0
    t1 = time.perf_counter()
    first = est.fold_effects(folds, target="if").delta_loss
    t2 = time.perf_counter()
    retrain = est.fold_effects(folds).delta_loss
    t3 = time.perf_counter()
    return first, retrain, {"build": build, "if": t2 - t1, "retrain": t3 - t2}


def epoch_seconds(net, X, y, batch_size=128, repeats=3):
    """One epoch of the model's own training: minibatch forward/backward/step."""
    opt = torch.optim.SGD(net.parameters(), lr=0.0)  # lr 0: the weights stay
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(0, len(y), batch_size):
            opt.zero_grad()
            F.cross_entropy(
                net(X[i : i + batch_size]), y[i : i + batch_size]
            ).backward()
            opt.step()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def rel(a, b):
    return float(np.max(np.abs(a - b) / np.abs(b)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["lr", "mlp"])
    args = ap.parse_args()
    Xn, yn = load_digits(return_X_y=True)
    X, y = torch.as_tensor(Xn / 16.0), torch.as_tensor(yn)
    rng = np.random.RandomState(0)
    schemes = {
        "KFold(50)": [np.sort(t) for _, t in KFold(50, shuffle=True, random_state=0).split(X)],
        "KFold(100)": [np.sort(t) for _, t in KFold(100, shuffle=True, random_state=0).split(X)],
        "LOO (200)": [np.array([i]) for i in np.sort(rng.choice(len(y), 200, replace=False))],
    }  # fmt: skip
    rows = []
    for model in args.models:
        net = trained(model, X, y)
        epoch = epoch_seconds(net, X, y)
        for scheme, folds in schemes.items():
            d_first, d_retrain, t_direct = direct(net, X, y, folds, newton=True)
            row = {
                "model": model,
                "scheme": scheme,
                "direct_s": t_direct,
                "epoch_s": epoch,
            }
            for solver in ("dense", "cg"):
                first, retrain, times = ours(net, X, y, folds, solver)
                row[solver] = {
                    **times,
                    "total_s": sum(times.values()),
                    "build_epochs": times["build"] / epoch,
                    "max_rel_diff_if": rel(first, d_first),
                    "max_rel_diff_retrain": rel(retrain, d_retrain),
                }
            rows.append(row)
            print(json.dumps(row), flush=True)
    OUT.write_text(json.dumps(rows, indent=1))
    print(
        "\n| model | scheme | direct (s) | dense: build + queries (s) | dense build (epochs) | dense max rel. diff (IF / Newton) | CG total (s) | CG max rel. diff (IF / Newton) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        d, c = r["dense"], r["cg"]
        print(
            f"| {r['model']} | {r['scheme']} | {r['direct_s']:.1f} | "
            f"{d['build']:.1f} + {d['if'] + d['retrain']:.1f} | "
            f"{d['build_epochs']:.0f} | "
            f"{d['max_rel_diff_if']:.1e} / {d['max_rel_diff_retrain']:.1e} | "
            f"{c['total_s']:.1f} | {c['max_rel_diff_if']:.1e} / {c['max_rel_diff_retrain']:.1e} |"
        )


if __name__ == "__main__":
    main()
