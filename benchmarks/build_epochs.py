"""The cache build measured in epochs of the model's own training.

What a user would do instead of ``InfluenceCV`` is retrain K times, so the
yardstick of a build is one epoch of the model's own training, measured in
the same run. Workload (issue 14): ``make_classification(20000, 64,
n_informative=30, n_classes=10)``, a skorch ``NeuralNetClassifier`` on
Linear(64, 256)-Tanh-Linear(256, 10) with ``CrossEntropyLoss``, Adam lr 0.01,
weight decay 1e-3, batch 256, 10 epochs; then ``ClusteredInfluenceEstimator(
damping=1e-3)`` builds, per phase, and ``InfluenceCV(cv=KFold(100))`` on the
default cache, against real 10- and 100-fold CV projected from the measured
training time.

    python benchmarks/build_epochs.py [--n 20000] [--out build_epochs.json]
                                      [--configs default fast]
                                      [--baseline PATH]

``--configs`` builds once per named configuration side by side (``default``,
``fast`` = :data:`sklearn_cif.FAST_PRESET`, ``rank128``, ``tol1e-5``,
``tol1e-3`` = the default before ``cg_tol="auto"``); each reports seconds
and epochs per phase, and its KFold(100) ``delta_loss`` against the first
configuration's (Spearman, median ratio, largest relative difference), for
the Newton step (``target="retrain"``) and first order. ``--baseline PATH``
also builds the default of the package found at ``PATH`` (a checkout of an
older commit, e.g. ``git worktree add /tmp/old <commit>``) on the same net
and data, in a subprocess, for the before/after table in one run.
``--real-cv`` also runs what the user would otherwise run, real CV with
every fold's net trained from scratch by the same recipe (parameters reset,
seed 0; KFold(10) and the first 20 folds of KFold(100)), and reports each
build's default answers (``InfluenceCV``'s ``test_loss``) against it:
median ratio and Spearman of the per-fold held-out log loss.
"""

import argparse
import json
import os
import pathlib
import pickle
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from scipy.stats import spearmanr
from sklearn.datasets import make_classification
from sklearn.model_selection import KFold
from skorch import NeuralNetClassifier

RESULTS = pathlib.Path(__file__).parent / "results"


def configs():
    from sklearn_cif import FAST_PRESET

    return {
        "default": {},
        "fast": dict(FAST_PRESET),
        "rank128": {"correction_rank": 128},
        "tol1e-5": {"cg_tol": 1e-5},
        "tol1e-3": {"cg_tol": 1e-3},
        "tol1e-2": {"cg_tol": 1e-2},
    }


def real_cv_folds(n):
    """KFold(10) and the first 20 folds of KFold(100), as (train, test) pairs."""
    ten = list(KFold(10, shuffle=True, random_state=0).split(np.arange(n)))
    return ten + list(KFold(100, shuffle=True, random_state=0).split(np.arange(n)))[:20]


def folds(n):
    return [
        te for _, te in KFold(100, shuffle=True, random_state=0).split(np.arange(n))
    ]


def build(net, X, y, kwargs):
    """One build: seconds, phases, diagnostics and the KFold(100) delta_loss."""
    from sklearn_cif import ClusteredInfluenceEstimator, InfluenceCV

    est = ClusteredInfluenceEstimator(random_state=0, damping=1e-3, **kwargs)
    t0 = time.perf_counter()
    est.fit(net, X, y)
    seconds = time.perf_counter() - t0
    newton = est.fold_effects(folds(len(y)), target="retrain")
    cv = InfluenceCV(est, cv=real_cv_folds(len(y))).fit(net, X, y).cv_results_
    return est, {
        "kwargs": kwargs,
        "build_s": seconds,
        "phases_s": dict(est.timings_),
        "kept_rank": None if est.spectrum_ is None else len(est.spectrum_),
        "truncation": est.truncation_,
        "max_cg_iter": int(np.max(est.n_iter_)),
        "ggn_products": est.n_ggn_products_,
        "data_passes": est.n_data_passes_,
        # the Newton step, which every phase serves, for answers comparable
        # with older checkouts ("auto" is first order for this net now: it
        # is off its optimum)
        "delta_loss": np.asarray(newton.delta_loss).tolist(),
        "delta_loss_if": np.asarray(newton.delta_loss_if).tolist(),
        # the default answers on the folds of --real-cv
        "cv_test_loss": np.asarray(cv["test_loss"]).tolist(),
    }


def agreement(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return {
        "spearman": float(spearmanr(a, b)[0]),
        "median_ratio": float(np.median(a / b)),
        "max_rel_diff": float(np.max(np.abs(a / b - 1))),
    }


def workload(n, epochs):
    X, y = make_classification(n, 64, n_informative=30, n_classes=10, random_state=0)
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
        max_epochs=epochs,
        train_split=None,
        verbose=0,
    )
    t0 = time.perf_counter()
    net.fit(X, y)
    return X, y, net, (time.perf_counter() - t0) / epochs


def baseline(path, net, X, y):
    """The default build of the package at ``path``, in a subprocess."""
    with tempfile.TemporaryDirectory() as tmp:
        data = pathlib.Path(tmp) / "data.pkl"
        out = pathlib.Path(tmp) / "out.json"
        data.write_bytes(pickle.dumps((net, X, y)))
        env = dict(os.environ, PYTHONPATH=str(path))
        subprocess.run(
            [sys.executable, __file__, "--_child", str(data), str(out)],
            env=env,
            check=True,
            cwd=tmp,
        )
        return json.loads(out.read_text())


def child(data, out):
    net, X, y = pickle.loads(pathlib.Path(data).read_bytes())
    _, res = build(net, X, y, {})
    import sklearn_cif

    res["package"] = str(pathlib.Path(sklearn_cif.__file__).parent)
    pathlib.Path(out).write_text(json.dumps(res))


def product_cost(net, X, y, block=50):
    """Seconds of one damped-GGN product of ``block`` vectors over all of X."""
    from sklearn_cif.adapters import as_functional
    from sklearn_cif.curvature import DampedGGNOperator
    from sklearn_cif.passes import DataPasses

    fm = as_functional(net)
    op = DampedGGNOperator(DataPasses(fm, X, y, 256), 1e-3)
    V = torch.randn(block, fm.n_params, generator=torch.Generator().manual_seed(0))
    op.matmat(V[:2])  # warm-up
    t0 = time.perf_counter()
    op.matmat(V)
    return time.perf_counter() - t0


def print_build(name, res, epoch):
    b = res["build_s"]
    print(
        f"{name}: {b:.1f} s = {b / epoch:.0f} epochs; kept rank {res['kept_rank']}, "
        f"max CG iterations {res['max_cg_iter']}, {res['ggn_products']} GGN "
        f"products, {res['data_passes']} data passes"
    )
    for k, v in res["phases_s"].items():
        print(f"  {k:14s} {v:7.1f} s  {v / epoch:7.1f} epochs")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--out", default="build_epochs.json")
    ap.add_argument(
        "--configs",
        nargs="+",
        default=["default", "fast"],
        choices=["default", "fast", "rank128", "tol1e-5", "tol1e-3", "tol1e-2"],
    )
    ap.add_argument("--baseline", default=None)
    ap.add_argument("--real-cv", action="store_true")
    ap.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        return child(*args._child)
    X, y, net, epoch = workload(args.n, args.epochs)
    product = product_cost(net, X, y)
    steps_per_epoch = -(-args.n // 256)
    known = configs()
    runs, first = {}, None
    for name in args.configs:
        est, runs[name] = build(net, X, y, known[name])
        first = first or (name, est)
    if args.baseline:
        runs["baseline"] = baseline(args.baseline, net, X, y)
    from sklearn_cif import InfluenceCV

    t0 = time.perf_counter()
    InfluenceCV(first[1], cv=KFold(100)).fit(net, X, y)
    cv100 = time.perf_counter() - t0
    real = None
    if args.real_cv:
        from off_optimum import real_cv

        start = time.perf_counter()
        real = real_cv(net, X, y, real_cv_folds(args.n))
        print(f"real CV from scratch, 30 folds: {time.perf_counter() - start:.0f} s")
    ref = runs[first[0]]
    for res in runs.values():
        res["build_epochs"] = res["build_s"] / epoch
        res["phases_epochs"] = {k: v / epoch for k, v in res["phases_s"].items()}
        res["vs_first"] = agreement(res["delta_loss"], ref["delta_loss"])
        res["vs_first_if"] = agreement(res["delta_loss_if"], ref["delta_loss_if"])
        if real is not None:
            pred = np.asarray(res["cv_test_loss"])
            res["vs_real_cv"] = {
                "KFold10": agreement(pred[:10], real[:10]),
                "KFold100[:20]": agreement(pred[10:], real[10:]),
            }
    print(
        f"training: {args.epochs} epochs in {epoch * args.epochs:.1f} s "
        f"({epoch:.3f} s/epoch); N = {args.n:,}"
    )
    print(
        f"one GGN product of 50 vectors over N: {product:.2f} s = "
        f"{product / epoch:.1f} epochs; per vector and batch of 256: "
        f"{product / 50 / steps_per_epoch * 1e3:.2f} ms = "
        f"{product / 50 / epoch:.3f} training steps' time"
    )
    for name, res in runs.items():
        print_build(name, res, epoch)
        for key, what in (("vs_first", "Newton step"), ("vs_first_if", "first order")):
            a = res[key]
            print(
                f"  KFold(100) delta_loss ({what}) vs {first[0]}: Spearman "
                f"{a['spearman']:.4f}, median ratio {a['median_ratio']:.4f}, max "
                f"rel diff {a['max_rel_diff']:.1e}"
            )
        for scheme, a in res.get("vs_real_cv", {}).items():
            print(
                f"  default answers vs real CV from scratch, {scheme}: median "
                f"ratio {a['median_ratio']:.3f}, Spearman {a['spearman']:.3f}"
            )
    build_s = runs[first[0]]["build_s"]
    print(
        f"InfluenceCV(KFold(100)) on the {first[0]} cache: {cv100:.1f} s; real "
        f"10-fold CV ~ {10 * args.epochs * epoch:.0f} s, real 100-fold "
        f"~ {100 * args.epochs * epoch:.0f} s (build + queries: "
        f"{(build_s + cv100) / (10 * args.epochs * epoch):.1f}x real 10-fold)"
    )
    res = {
        "N": args.n,
        "epoch_s": epoch,
        "train_epochs": args.epochs,
        "influence_cv_kfold100_s": cv100,
        "ggn_product_50_vectors_s": product,
        "builds": runs,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / args.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
