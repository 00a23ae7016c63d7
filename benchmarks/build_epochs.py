"""The cache build measured in epochs of the model's own training.

What a user would do instead of ``InfluenceCV`` is retrain K times, so the
yardstick of a build is one epoch of the model's own training, measured in
the same run. Workload (issue 14): ``make_classification(20000, 64,
n_informative=30, n_classes=10)``, a skorch ``NeuralNetClassifier`` on
Linear(64, 256)-Tanh-Linear(256, 10) with ``CrossEntropyLoss``, Adam lr 0.01,
weight decay 1e-3, batch 256, 10 epochs; then a default
``ClusteredInfluenceEstimator(damping=1e-3)`` build, per phase, and
``InfluenceCV(cv=KFold(100))`` on that cache, against real 10- and 100-fold
CV projected from the measured training time.

    python benchmarks/build_epochs.py [--n 20000] [--out build_epochs.json]
                                      [--ranks auto 128]

``--ranks`` builds once per ``correction_rank`` side by side (the first is
the one reported in full; the others print their build time, kept rank and
ratio to the first).
"""

import argparse
import json
import pathlib
import time

import numpy as np
import torch
from sklearn.datasets import make_classification
from sklearn.model_selection import KFold
from skorch import NeuralNetClassifier

from sklearn_cif import ClusteredInfluenceEstimator, InfluenceCV

RESULTS = pathlib.Path(__file__).parent / "results"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--out", default="build_epochs.json")
    ap.add_argument("--ranks", nargs="+", default=["auto"])
    args = ap.parse_args()
    X, y = make_classification(
        args.n, 64, n_informative=30, n_classes=10, random_state=0
    )
    X, y = X.astype(np.float32), y.astype(np.int64)
    torch.manual_seed(0)
    net = NeuralNetClassifier(
        torch.nn.Sequential(
            torch.nn.Linear(64, 256), torch.nn.Tanh(), torch.nn.Linear(256, 10)
        ),
        criterion=torch.nn.CrossEntropyLoss,
        optimizer=torch.optim.Adam,
        lr=0.01,
        optimizer__weight_decay=1e-3,
        batch_size=256,
        max_epochs=args.epochs,
        train_split=None,
        verbose=0,
    )
    t0 = time.perf_counter()
    net.fit(X, y)
    train = time.perf_counter() - t0
    epoch = train / args.epochs
    ranks = [r if r == "auto" else int(r) for r in args.ranks]
    builds, fitted = {}, []
    for rank in ranks:
        other = ClusteredInfluenceEstimator(
            random_state=0, damping=1e-3, correction_rank=rank
        )
        t0 = time.perf_counter()
        other.fit(net, X, y)
        builds[str(rank)] = {
            "build_s": time.perf_counter() - t0,
            "kept_rank": len(other.spectrum_),
            "truncation": other.truncation_,
            "solver": other.solver_,
        }
        fitted.append(other)
    est = fitted[0]
    build = builds[str(ranks[0])]["build_s"]
    t0 = time.perf_counter()
    InfluenceCV(est, cv=KFold(100)).fit(net, X, y)
    cv100 = time.perf_counter() - t0
    res = {
        "N": args.n,
        "p": est.n_params_,
        "train_s": train,
        "epoch_s": epoch,
        "build_s": build,
        "build_epochs": build / epoch,
        "data_passes": est.n_data_passes_,
        "ggn_products": est.n_ggn_products_,
        "phases_s": est.timings_,
        "phases_epochs": {k: v / epoch for k, v in est.timings_.items()},
        "influence_cv_kfold100_s": cv100,
        "builds_by_rank": builds,
        "real_cv_10_fold_s": 10 * train,
        "real_cv_100_fold_s": 100 * train,
    }
    print(
        f"training: {args.epochs} epochs in {train:.1f} s ({epoch:.2f} s/epoch); "
        f"p = {res['p']:,}, N = {args.n:,}"
    )
    print(
        f"CiF build: {build:.1f} s = {res['build_epochs']:.0f} epochs, "
        f"{res['data_passes']} data passes, {res['ggn_products']} GGN products"
    )
    for k, v in est.timings_.items():
        print(f"  {k:14s} {v:7.1f} s  {v / epoch:7.1f} epochs")
    for rank, b in builds.items():
        print(
            f"correction_rank={rank}: {b['build_s']:.1f} s "
            f"({b['build_s'] / epoch:.0f} epochs, {b['build_s'] / build:.2f}x the "
            f"first), kept rank {b['kept_rank']}, truncation {b['truncation']:.3f}"
        )
    print(
        f"InfluenceCV(KFold(100)) on the cache: {cv100:.1f} s; real 10-fold CV "
        f"~ {10 * train:.0f} s, real 100-fold ~ {100 * train:.0f} s "
        f"(CiF build + queries: {(build + cv100) / (10 * train):.1f}x real 10-fold, "
        f"{(build + cv100) / (100 * train):.2f}x real 100-fold)"
    )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / args.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
