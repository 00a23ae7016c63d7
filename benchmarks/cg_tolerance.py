"""How far the CG tolerance moves the answers: fold effects at each cg_tol vs 1e-5.

    python benchmarks/cg_tolerance.py [--setups regression mlp_wide]

The default ``cg_tol="auto"`` (each cluster's solve stops at the noise of a
mean residual gradient, so the error bound's solver term stays below its
scatter term) and the fixed 1e-3, 1e-2 and 1e-1 are checked against
``1e-5`` on CG-path models (``p > 4096``):

- ``regression``: an MLP 30-128-128-1 (ReLU, p = 20,609) on standardized
  ``make_regression(5000, 30, n_informative=20, noise=10)``, 30 epochs of
  Adam (weight decay 1e-4), ``loss="mse"``, ``damping=1e-4``; built after
  the default was chosen;
- ``mlp_wide``: the 64-64-64-10 tanh MLP of ``cv_fidelity.py`` at its
  optimum (lambda = 1e-2), trained there or read from its cache.

Folds: KFold(50) and 20 ShuffleSplit 5 % sets. Reports per tolerance the
build in seconds and in epochs of the model's own training (the
regression's Adam epoch; ``mlp_wide``'s full-batch LBFGS step), the
solve's iterations and seconds, and the largest and median relative change
of the default ``delta_loss`` and of first order (``delta_loss_if``) from
``cg_tol=1e-5``'s, and the solve's column-iterations (iterations summed
over the clusters: its matrix-vector products, up to directions block CG
drops and the final residual checks).
"""

import argparse
import time
import warnings

import numpy as np
import torch
from sklearn.datasets import make_regression
from sklearn.model_selection import KFold, ShuffleSplit

from sklearn_cif import ClusteredInfluenceEstimator

TOLS = (1e-5, "auto", 1e-3, 1e-2, 1e-1)


def regression():
    X, y = make_regression(5000, 30, n_informative=20, noise=10.0, random_state=1)
    X = ((X - X.mean(0)) / X.std(0)).astype(np.float32)
    y = ((y - y.mean()) / y.std()).astype(np.float32)[:, None]
    torch.manual_seed(1)
    nn = torch.nn
    net = nn.Sequential(
        nn.Linear(30, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 1)
    )
    opt = torch.optim.Adam(net.parameters(), lr=3e-3, weight_decay=1e-4)
    Xt, yt = torch.as_tensor(X), torch.as_tensor(y)
    start = time.perf_counter()
    for _ in range(30):
        for idx in torch.randperm(len(X)).split(128):
            opt.zero_grad()
            torch.nn.functional.mse_loss(net(Xt[idx]), yt[idx]).backward()
            opt.step()
    epoch = (time.perf_counter() - start) / 30  # one Adam epoch, batches of 128
    return net, X, y, dict(loss="mse", damping=1e-4), epoch


def mlp_wide():
    import cv_fidelity as cvf

    name = "mlp_wide_1e-2"
    cfg = cvf.SETUPS[name]
    X, y = cvf.data(cfg["data"])
    net, _ = cvf.train(name, cfg, X, y, cvf.load_cache(name))
    epoch = cvf.epoch_seconds(net, X, y, cfg["lam"])  # its LBFGS training's step
    return net, X, y, dict(loss="cross_entropy", damping=cfg["lam"]), epoch


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--setups", nargs="+", default=["regression", "mlp_wide"])
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    for setup in args.setups:
        net, X, y, kw, epoch = {"regression": regression, "mlp_wide": mlp_wide}[setup]()
        n = len(X)
        folds = [te for _, te in KFold(50, shuffle=True, random_state=0).split(X)]
        folds += [
            te for _, te in ShuffleSplit(20, test_size=0.05, random_state=0).split(X)
        ]
        effects = {}
        for tol in TOLS:
            est = ClusteredInfluenceEstimator(
                cg_tol=tol, solver="cg", random_state=0, **kw
            )
            t0 = time.perf_counter()
            est.fit(net, X, y)
            build = time.perf_counter() - t0
            res = est.fold_effects(folds)
            effects[tol] = np.asarray(res.delta_loss), np.asarray(res.delta_loss_if)
            print(
                f"{setup} (N = {n}, p = {est.n_params_}): cg_tol {tol}: build "
                f"{build:.1f} s = {build / epoch:.0f} epochs of the model's own "
                f"training ({epoch * 1e3:.1f} ms each), solve "
                f"{est.timings_['solve']:.1f} s, "
                f"{int(est.n_iter_.max())} iterations at most, "
                f"{int(est.n_iter_.sum())} column-iterations, kept rank "
                f"{len(est.spectrum_)}, default target {res.target}"
            )
        for tol in TOLS[1:]:
            for name, k in (("default", 0), ("first order", 1)):
                rel = np.abs(effects[tol][k] / effects[TOLS[0]][k] - 1)
                print(
                    f"{setup}: {len(folds)} fold effects ({name}) at cg_tol {tol} "
                    f"vs {TOLS[0]:g}: largest relative change {rel.max():.1e}, "
                    f"median {np.median(rel):.1e}"
                )


if __name__ == "__main__":
    main()
