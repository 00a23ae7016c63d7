"""Block CG and batched CG for C right-hand sides vs single solves, data passes counted.

    python benchmarks/solver.py

Digits MLP (64-32-10, lambda = 1e-3). The right-hand sides are the C = 50
cluster-mean gradients of a CiF fit. Compares one block (P)CG solve and one
batched (independent-column) (P)CG solve of all 50 with one single-RHS solve
and with 50 single solves, for plain CG and for the spectral preconditioner
the residual correction builds (its build cost reported separately).
"""

import time

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from sklearn_cif import ClusteredInfluenceEstimator
from sklearn_cif.adapters import as_functional
from sklearn_cif.curvature import DampedGGNOperator
from sklearn_cif.passes import DataPasses
from sklearn_cif.solvers import batched_cg, block_cg, spectral_preconditioner


def main():
    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32)
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10)
    )
    opt = torch.optim.Adam(net.parameters(), lr=1e-2, weight_decay=1e-3)
    for _ in range(500):
        opt.zero_grad()
        F.cross_entropy(net(torch.as_tensor(X)), torch.as_tensor(y)).backward()
        opt.step()
    est = ClusteredInfluenceEstimator(
        50, loss="cross_entropy", damping=1e-3, random_state=0
    )
    est.fit(net, X, y)
    fm = as_functional(net, loss="cross_entropy", device="cpu")
    # the cluster means, recovered exactly from v_c = H^-1 mu_c
    op = DampedGGNOperator(DataPasses(fm, X, y, 256), 1e-3)
    B = op.matmat(torch.as_tensor(est.responses_))
    t0 = time.perf_counter()
    spec_op = DampedGGNOperator(DataPasses(fm, X, y, 256), 1e-3)
    precond = spectral_preconditioner(
        spec_op.matmat, spec_op.n_params, 1e-3, 64, 0, B[:0]
    )
    t_spec = time.perf_counter() - t0
    for name, P in (("plain CG", None), ("spectral PCG", precond)):
        rows = {}
        for label, rhs, solve in (
            ("1 RHS", [B[:1]], batched_cg),
            ("50 RHS block", [B], block_cg),
            ("50 RHS batched", [B], batched_cg),
            ("50 single solves", list(B[:, None]), batched_cg),
        ):
            op = DampedGGNOperator(DataPasses(fm, X, y, 256), 1e-3)
            t0 = time.perf_counter()
            sols = [solve(op.matmat, b, 1e-5, precond=P) for b in rhs]
            iters = [s.n_iter.max() for s in sols]
            worst = max(s.residuals.max() for s in sols)
            rows[label] = (
                time.perf_counter() - t0,
                op.passes.n_passes,
                op.n_products,
                max(iters),
                worst,
            )
        base = rows["1 RHS"][0]
        for label, (t, passes, prods, it, worst) in rows.items():
            print(
                f"{name:13s} {label:17s} {t:6.2f}s ({t / base:5.1f}x one RHS)  "
                f"data passes {passes:4d}  GGN products {prods:5d}  "
                f"max iterations {it:3d}  worst residual {worst:.1e}"
            )
    print(
        f"spectral preconditioner build (rank 64, block Krylov): {t_spec:.2f}s, "
        f"{spec_op.passes.n_passes} data passes, {spec_op.n_products} GGN products"
    )


if __name__ == "__main__":
    main()
