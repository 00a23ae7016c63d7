"""Nets trained for a fixed number of epochs: predicted CV against real CV.

A skorch user often trains a fixed number of epochs and stops short of the
regularized optimum (``optimality_gap_`` above 1; ``fit`` warns). What that
user would compare against is real CV with the same recipe: every fold's
net trained from scratch with the same seed, epochs and optimizer. Per
setup and scheme this prints the median ratio and Spearman of the predicted
per-fold held-out log loss against that real CV, for the leave-k-out Newton
step (``target="retrain"``) and first order (``target="if"``), beside the
mean held-out loss predicted, measured, and of the full model on the fold.

    python benchmarks/off_optimum.py [--setups NAME ...]

Setups:

- ``issue14``: ``benchmarks/build_epochs.py``'s workload (20,000 x 64,
  10 classes, 64-256-10 tanh, Adam, 10 epochs), KFold 10 and the first 20
  folds of KFold 100;
- ``digits_relu``: standardized digits, 64-128-10 ReLU, Adam lr 1e-3,
  weight decay 1e-3, batch 64, 10 epochs;
- ``bc_relu``: standardized breast cancer, 30-32-2 ReLU, Adam lr 1e-3,
  weight decay 1e-2, batch 32, 20 epochs (dense solver);
- ``mc_tanh_sgd``: ``make_classification(5000, 20, n_informative=10,
  n_classes=3)``, 20-64-64-3 tanh, SGD lr 0.05 momentum 0.9, weight decay
  1e-4, batch 128, 5 epochs;

the last three KFold 10 and the first 20 folds of KFold 50. ``damping`` is
the training weight decay. Writes benchmarks/results/off_optimum.json.
"""

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from build_epochs import workload
from scipy.stats import spearmanr
from sklearn.base import clone
from sklearn.datasets import load_breast_cancer, load_digits, make_classification
from sklearn.metrics import log_loss
from sklearn.model_selection import KFold
from sklearn.preprocessing import StandardScaler
from skorch import NeuralNetClassifier

from sklearn_cif import ClusteredInfluenceEstimator, InfluenceCV

RESULTS = Path(__file__).parent / "results"
nn = torch.nn


def _net(module, **kw):
    return NeuralNetClassifier(
        module, criterion=nn.CrossEntropyLoss, train_split=None, verbose=0, **kw
    )


def setup(name):
    """``(net, X, y, damping, schemes)``, the net trained with seed 0."""
    if name == "issue14":
        X, y, net, _ = workload(20000, 10)
        return net, X, y, 1e-3, {"KFold10": (10, None), "KFold100": (100, 20)}
    torch.manual_seed(0)  # the module's initial weights
    adam = dict(optimizer=torch.optim.Adam, lr=1e-3)
    if name == "digits_relu":
        X, y = load_digits(return_X_y=True)
        X = StandardScaler().fit_transform(X)
        module = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
        kw = dict(adam, optimizer__weight_decay=1e-3, batch_size=64, max_epochs=10)
        damping = 1e-3
    elif name == "bc_relu":
        X, y = load_breast_cancer(return_X_y=True)
        X = StandardScaler().fit_transform(X)
        module = nn.Sequential(nn.Linear(30, 32), nn.ReLU(), nn.Linear(32, 2))
        kw = dict(adam, optimizer__weight_decay=1e-2, batch_size=32, max_epochs=20)
        damping = 1e-2
    elif name == "mc_tanh_sgd":
        X, y = make_classification(
            5000, 20, n_informative=10, n_classes=3, random_state=1
        )
        module = nn.Sequential(
            nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
            nn.Linear(64, 3),
        )  # fmt: skip
        kw = dict(
            optimizer=torch.optim.SGD, lr=0.05, optimizer__momentum=0.9,
            optimizer__weight_decay=1e-4, batch_size=128, max_epochs=5,
        )  # fmt: skip
        damping = 1e-4
    else:
        raise ValueError(name)
    X, y = X.astype(np.float32), y.astype(np.int64)
    net = _net(module, **kw)
    torch.manual_seed(0)
    net.fit(X, y)
    return net, X, y, damping, {"KFold10": (10, None), "KFold50": (50, 20)}


def real_cv(net, X, y, folds):
    """Held-out log loss of every fold's net retrained from scratch (seed 0).

    skorch never re-initializes a module given as an instance, and ``clone``
    copies its trained weights: the parameters are reset here, or every
    "refit" would start from the net that has already seen the fold.
    """
    labels = np.unique(y)
    out = []
    for train, test in folds:
        torch.manual_seed(0)
        refit = clone(net)
        for layer in refit.module.modules():
            if hasattr(layer, "reset_parameters"):
                layer.reset_parameters()
        refit.fit(X[train], y[train])
        out.append(log_loss(y[test], refit.predict_proba(X[test]), labels=labels))
    return np.array(out)


def run(name):
    net, X, y, damping, schemes = setup(name)
    est = ClusteredInfluenceEstimator(random_state=0, damping=damping)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the optimality warning is expected
        est.fit(net, X, y)
    proba = net.predict_proba(X)
    labels = np.unique(y)
    rows = []
    for scheme, (k, first) in schemes.items():
        folds = list(KFold(k, shuffle=True, random_state=0).split(X))[:first]
        start = time.perf_counter()
        real = real_cv(net, X, y, folds)
        row = dict(
            setup=name, scheme=scheme, n_folds=len(folds),
            optimality_gap=float(est.optimality_gap_), solver=est.solver_,
            real_cv_s=time.perf_counter() - start,
            mean_real_loss=float(real.mean()),
            mean_full_model_loss=float(
                np.mean([log_loss(y[t], proba[t], labels=labels) for _, t in folds])
            ),
        )  # fmt: skip
        # one query gives both: the Newton step and its first-order part
        res = InfluenceCV(est, cv=folds, target="retrain").fit(net, X, y).cv_results_
        first = res["test_loss_in_sample"] + res["delta_loss_if"]
        for target, pred in (("retrain", res["test_loss"]), ("if", first)):
            row[target] = dict(
                median_ratio=float(np.median(pred / real)),
                spearman=float(spearmanr(pred, real)[0]),
                mean_pred_loss=float(pred.mean()),
            )
        row["auto_is"] = est.fold_effects(folds[0][1]).target  # the default
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main():
    names = ["issue14", "digits_relu", "bc_relu", "mc_tanh_sgd"]
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--setups", nargs="+", default=names, choices=names)
    args = parser.parse_args()
    rows = [r for name in args.setups for r in run(name)]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "off_optimum.json").write_text(json.dumps(rows, indent=1))
    print()
    print(
        "| setup (gap) | scheme | Newton step: median ratio / Spearman "
        "| first order | default answers | mean held-out loss: Newton / first "
        "order / real / full model |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        n, f = r["retrain"], r["if"]
        print(
            f"| {r['setup']} ({r['optimality_gap']:.2f}) | {r['scheme']} "
            f"| {n['median_ratio']:.2f} / {n['spearman']:.3f} "
            f"| {f['median_ratio']:.2f} / {f['spearman']:.3f} | {r['auto_is']} "
            f"| {n['mean_pred_loss']:.3f} / {f['mean_pred_loss']:.3f} / "
            f"{r['mean_real_loss']:.3f} / {r['mean_full_model_loss']:.3f} |"
        )


if __name__ == "__main__":
    main()
