"""InfluenceCV against real cross-validation of a skorch net on digits.

    python benchmarks/cv_vs_retraining.py [--folds-retrain 10]

1. Trains a skorch NeuralNetClassifier (64-32-10, softmax, Adam, weight decay
   1e-3 = the influence damping).
2. ``influence_cross_validate`` with KFold(50), building a fresh CiF cache
   (C = 50), and sklearn's ``cross_validate`` on the very same folds (50 real
   skorch refits from scratch): wall time of each, ratio.
3. For the first ``--folds-retrain`` folds, a warm-started float64 LBFGS
   retraining on the removal objective of doc/developer.rst ((1/N) sum_{i not in S}
   l_i + lambda/2 ||theta||^2): the held-out loss change that first-order
   influence targets.
4. Per fold: predicted test_loss (CiF and exact per-query IF) next to both
   actual held-out losses; Spearman and mean absolute error.

Writes benchmarks/results/cv_vs_retraining.json.
"""

import argparse
import copy
import json
import pathlib
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from _refit import l2, lbfgs_minimize
from scipy.stats import spearmanr
from sklearn.base import clone
from sklearn.datasets import load_digits
from sklearn.metrics import log_loss, make_scorer
from sklearn.model_selection import KFold, cross_validate
from skorch import NeuralNetClassifier

from sklearn_cif import (
    ClusteredInfluenceEstimator,
    InfluenceCV,
    PerQueryInfluence,
    influence_cross_validate,
)

LAM = 1e-3
EPS = torch.finfo(torch.float64).eps


def make_net():
    torch.manual_seed(0)
    module = torch.nn.Sequential(
        torch.nn.Linear(64, 32),
        torch.nn.Tanh(),
        torch.nn.Linear(32, 10),
        torch.nn.Softmax(-1),
    )
    return NeuralNetClassifier(
        module,
        max_epochs=100,
        lr=0.01,
        optimizer=torch.optim.Adam,
        optimizer__weight_decay=LAM,
        batch_size=128,
        train_split=None,
        verbose=0,
    )


def retrain_removal(module, X, y, test, n_total):
    """Warm-started LBFGS (float64) on (1/N) sum_{i not in S} l_i + lam/2 ||theta||^2."""
    m = copy.deepcopy(module).double()
    keep = np.setdiff1d(np.arange(len(y)), test)
    Xk, yk = torch.as_tensor(X[keep], dtype=torch.float64), torch.as_tensor(y[keep])
    lbfgs_minimize(
        m,
        lambda net: (
            F.nll_loss(torch.log(net(Xk) + EPS), yk, reduction="sum") / n_total
            + 0.5 * LAM * l2(net)
        ),
        steps=5,
        max_iter=1000,
        tolerance_grad=1e-10,
        tolerance_change=1e-14,
    )
    with torch.no_grad():
        Xt = torch.as_tensor(X[test], dtype=torch.float64)
        return F.nll_loss(torch.log(m(Xt) + EPS), torch.as_tensor(y[test])).item()


def compare(pred, actual):
    return {
        "spearman": float(spearmanr(pred, actual).statistic),
        "mae": float(np.mean(np.abs(pred - actual))),
        "median_ratio_delta": None,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--folds-retrain", type=int, default=10)
    args = ap.parse_args()
    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32)
    net = make_net().fit(X, y)
    cv = KFold(50, shuffle=True, random_state=0)
    # log_loss with the labels given: a 36-example fold may miss a class
    nll = make_scorer(
        log_loss,
        greater_is_better=False,
        response_method="predict_proba",
        labels=np.arange(10),
    )
    scoring = {"accuracy": "accuracy", "neg_log_loss": nll}

    t0 = time.perf_counter()
    est = ClusteredInfluenceEstimator(50, damping=LAM, random_state=0)
    fast = influence_cross_validate(net, X, y, cv=cv, scoring=scoring, estimator=est)
    t_icv = time.perf_counter() - t0
    icv = InfluenceCV(est, cv=cv, scoring=scoring).fit(net, X, y)  # per-fold details
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        real = cross_validate(clone(net), X, y, cv=icv, scoring=scoring)
    t_cv = time.perf_counter() - t0

    res = icv.cv_results_
    tests = [te for _, te in icv.splits_]
    pq = PerQueryInfluence(damping=LAM, query_mode="batched").fit(net, X, y)
    if_delta = pq.loss_change(tests)
    k = args.folds_retrain
    warm = np.array(
        [retrain_removal(net.module_, X, y, te, len(y)) for te in tests[:k]]
    )
    scratch = -real["test_neg_log_loss"]
    out = {
        "time_influence_cross_validate_s": t_icv,
        "time_cross_validate_s": t_cv,
        "speedup": t_cv / t_icv,
        "cif_vs_scratch_cv_50_folds": compare(res["test_loss"], scratch),
        "if_vs_scratch_cv_50_folds": compare(
            res["test_loss_in_sample"] + if_delta, scratch
        ),
        f"cif_vs_warm_retrain_{k}_folds": compare(res["test_loss"][:k], warm),
        f"if_vs_warm_retrain_{k}_folds": compare(
            (res["test_loss_in_sample"] + if_delta)[:k], warm
        ),
        "mean_test_accuracy": {
            "influence": float(fast["test_accuracy"].mean()),
            "real_cv": float(real["test_accuracy"].mean()),
        },
        "folds": [
            {
                "fold": int(i),
                "in_sample": float(res["test_loss_in_sample"][i]),
                "cif_test_loss": float(res["test_loss"][i]),
                "if_test_loss": float(res["test_loss_in_sample"][i] + if_delta[i]),
                "warm_retrain": float(warm[i]) if i < k else None,
                "scratch_cv": float(scratch[i]),
            }
            for i in range(len(tests))
        ],
    }
    for key in [k_ for k_ in out if k_.startswith(("cif_vs", "if_vs"))]:
        actual = scratch if "scratch" in key else warm
        pred = (
            res["test_loss"]
            if key.startswith("cif")
            else res["test_loss_in_sample"] + if_delta
        )
        pred = pred[: len(actual)]
        insample = res["test_loss_in_sample"][: len(actual)]
        out[key]["median_ratio_delta"] = float(
            np.median((pred - insample) / (actual - insample))
        )
    path = pathlib.Path(__file__).parent / "results" / "cv_vs_retraining.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    print(
        f"influence_cross_validate K=50: {t_icv:.1f}s; cross_validate K=50: {t_cv:.1f}s; "
        f"ratio {t_cv / t_icv:.1f}x"
    )
    for key, val in out.items():
        if isinstance(val, dict) and "spearman" in val:
            print(
                f"{key:<32s} Spearman {val['spearman']:.3f}  MAE {val['mae']:.4f}  "
                f"median ratio of loss changes {val['median_ratio_delta']:.2f}"
            )
    print("fold  in-sample  CiF-pred  IF-pred  warm-retrain  scratch-CV")
    for f in out["folds"][:k]:
        print(
            f"{f['fold']:4d}  {f['in_sample']:.4f}    {f['cif_test_loss']:.4f}    "
            f"{f['if_test_loss']:.4f}   {f['warm_retrain']:.4f}        {f['scratch_cv']:.4f}"
        )


if __name__ == "__main__":
    main()
