"""The CG path's complement model against the dense solver on the same matrix.

    python benchmarks/complement_check.py [--n 4000] [--hidden 96]

Issue 13, item 3: on the CG path each example's curvature outside the kept
eigenvectors is modelled (a calibrated background plus the example's own
share, ``sklearn_cif._complement``), for the self-influences and inside the
Newton step. This setup was built after that model was chosen:
``make_classification(n, 64, n_informative=30, n_classes=10,
random_state=1)``, standardized, a float64 Linear(64, hidden)-Tanh-
Linear(hidden, 10) (p = 7,210 at hidden = 96) trained by Adam then
full-batch LBFGS to the optimum of mean cross-entropy + lambda/2
||theta||^2, lambda = 1e-3. The default estimator (CG path, rank grown to
512) is compared with ``solver="dense", curvature="ggn"`` (every eigenpair
of the same Gauss-Newton matrix: exact self-influences and Newton steps) on
60 seeded single examples and the first 10 folds of KFold(50), first order
(``target="if"``) and Newton step (``"retrain"``), and with the Newton
step's complement made uniform (the model before, ``1/theta_{r+1}``).
"""

import argparse
import json
import pathlib
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from _refit import l2, lbfgs_minimize
from scipy.stats import spearmanr
from sklearn.datasets import make_classification
from sklearn.model_selection import KFold
from sklearn.preprocessing import StandardScaler

from sklearn_cif import ClusteredInfluenceEstimator

RESULTS = pathlib.Path(__file__).parent / "results"
LAM = 1e-3


def trained(n, hidden):
    X, y = make_classification(n, 64, n_informative=30, n_classes=10, random_state=1)
    X = torch.as_tensor(StandardScaler().fit_transform(X))
    y = torch.as_tensor(y)
    torch.manual_seed(1)
    net = torch.nn.Sequential(
        torch.nn.Linear(64, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 10)
    ).double()

    def objective(Xb, yb):
        return F.cross_entropy(net(Xb), yb) + 0.5 * LAM * l2(net)

    adam = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(30):
        for idx in torch.randperm(len(y)).split(256):
            adam.zero_grad()
            objective(X[idx], y[idx]).backward()
            adam.step()
    lbfgs_minimize(
        net, lambda _: objective(X, y), steps=1, max_iter=2000,
        tolerance_grad=1e-10, tolerance_change=0,
    )  # fmt: skip
    return net, X, y


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--hidden", type=int, default=96)
    args = ap.parse_args()
    warnings.filterwarnings("ignore", message="The model is not at the optimum")
    net, X, y = trained(args.n, args.hidden)
    kw = dict(damping=LAM, loss="cross_entropy", random_state=0)
    t0 = time.perf_counter()
    cg = ClusteredInfluenceEstimator(**kw).fit(net, X, y)
    cg_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    dense = ClusteredInfluenceEstimator(solver="dense", curvature="ggn", **kw)
    dense.fit(net, X, y)
    dense_s = time.perf_counter() - t0
    rng = np.random.default_rng(1)
    sets = {
        "single": [np.array([i]) for i in np.sort(rng.choice(len(y), 60, False))],
        "KFold50[:10]": [
            np.sort(t)
            for _, t in KFold(50, shuffle=True, random_state=1).split(np.zeros(len(y)))
        ][:10],
    }
    rows = {}
    for name, folds in sets.items():
        for target in ("if", "retrain"):
            a = np.asarray(cg.fold_effects(folds, target=target).delta_loss)
            b = np.asarray(dense.fold_effects(folds, target=target).delta_loss)
            rows[f"{name} {target}"] = dict(
                median_ratio=float(np.median(a / b)), spearman=float(spearmanr(a, b)[0])
            )
    cache = cg._cache  # the step with a uniform complement (the model before)
    beta = cache.complement_curvature
    object.__setattr__(cache, "complement_curvature", None)
    for name, folds in sets.items():
        a = np.asarray(cg.fold_effects(folds, target="retrain").delta_loss)
        b = np.asarray(dense.fold_effects(folds, target="retrain").delta_loss)
        rows[f"{name} retrain, uniform complement"] = dict(
            median_ratio=float(np.median(a / b)), spearman=float(spearmanr(a, b)[0])
        )
    object.__setattr__(cache, "complement_curvature", beta)
    out = dict(
        N=len(y),
        p=sum(q.numel() for q in net.parameters()),
        optimality_gap_=float(cg.optimality_gap_),
        kept_rank=len(cg.spectrum_),
        truncation_=float(cg.truncation_),
        complement_curvature_over_damping=float(beta / LAM),
        cg_build_s=cg_s,
        dense_build_s=dense_s,
        cg_over_dense=rows,
    )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "complement_check.json").write_text(json.dumps(out, indent=2))
    print(
        f"N = {out['N']}, p = {out['p']}, gap {out['optimality_gap_']:.3g}, rank "
        f"{out['kept_rank']}, truncation {out['truncation_']:.4f}, beta / lambda "
        f"{out['complement_curvature_over_damping']:.2f}; builds CG {cg_s:.0f} s, "
        f"dense {dense_s:.0f} s\n\n| subsets, target | CG / dense median ratio | "
        "Spearman |\n|---|---|---|"
    )
    for key, row in rows.items():
        print(f"| {key} | {row['median_ratio']:.3f} | {row['spearman']:.3f} |")


if __name__ == "__main__":
    main()
