"""Every public answer on fixed seeds, saved to one file, to compare two versions.

Used for the structure refactor (issue 12): run it on the commit before a
change and on the change, then ``--compare`` the two files; the answers must
be bitwise equal.

    python benchmarks/answers_snapshot.py --out old.npz   # on the old commit
    python benchmarks/answers_snapshot.py --out new.npz
    python benchmarks/answers_snapshot.py --compare old.npz new.npz
"""

import argparse
import sys
import warnings

import numpy as np
import torch
from sklearn.datasets import load_digits, make_regression
from sklearn.model_selection import KFold, ShuffleSplit

from sklearn_cif import (
    ClusteredInfluenceEstimator,
    InfluenceCV,
    PerQueryInfluence,
)


def mlp(d_in, d_hidden, d_out, seed, dtype):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(d_in, d_hidden),
        torch.nn.Tanh(),
        torch.nn.Linear(d_hidden, d_out),
    ).to(dtype)


def train(net, X, y, loss_fn, epochs=60):
    opt = torch.optim.Adam(net.parameters(), lr=1e-2, weight_decay=1e-3)
    for _ in range(epochs):
        opt.zero_grad()
        loss_fn(net(X), y).backward()
        opt.step()
    return net


def answers(prefix, est_kw, net, X, y, X_ev, y_ev, loss):
    out = {}
    subsets = [np.arange(0, 10), np.arange(5, 40, 3), np.array([7])]
    est = ClusteredInfluenceEstimator(loss=loss, random_state=0, **est_kw).fit(
        net, X, y
    )
    for target in ("if", "auto"):
        out[f"{prefix}/self_{target}"] = est.loss_change(subsets, target=target)
    out[f"{prefix}/eval"] = est.loss_change(subsets, X_ev, y_ev)
    out[f"{prefix}/param_change"] = est.param_change(subsets)
    out[f"{prefix}/transform"] = est.transform(X_ev, y_ev)
    out[f"{prefix}/score"] = np.array([est.score(X_ev, y_ev)])
    b = est.error_bound(10)
    out[f"{prefix}/bound"] = np.array([b.scatter, b.solver, b.total])
    for name in ("labels_", "responses_", "train_influence_", "self_influence_"):
        out[f"{prefix}/{name}"] = np.asarray(getattr(est, name))
    for cv_name, cv in (
        ("kfold", KFold(7)),
        ("shuffle", ShuffleSplit(5, test_size=0.1, random_state=0)),
    ):
        for target in ("if", "auto"):
            icv = InfluenceCV(est, cv=cv, target=target).fit(net, X, y)
            for key, val in sorted(icv.cv_results_.items()):
                if key != "score_time":
                    out[f"{prefix}/cv_{cv_name}_{target}/{key}"] = np.asarray(val)
            out[f"{prefix}/cv_{cv_name}_{target}/oof"] = icv.oof_outputs_
    pq = PerQueryInfluence(loss=loss, random_state=0, query_mode="batched").fit(
        net, X, y
    )
    out[f"{prefix}/pqi_self"] = pq.loss_change(subsets)
    out[f"{prefix}/pqi_eval"] = pq.loss_change(subsets, X_ev, y_ev)
    out[f"{prefix}/pqi_param"] = pq.param_change(subsets)
    out[f"{prefix}/pqi_transform"] = pq.transform(X_ev[:5], y_ev[:5])
    icv = InfluenceCV(pq, cv=KFold(4)).fit(net, X, y)
    for key, val in sorted(icv.cv_results_.items()):
        if key != "score_time":
            out[f"{prefix}/pqi_cv/{key}"] = np.asarray(val)
    return out


def snapshot():
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    Xd, yd = load_digits(return_X_y=True)
    out = {}
    for dtype in (torch.float32, torch.float64):
        X = torch.as_tensor(Xd[:240] / 16.0, dtype=dtype)
        y = torch.as_tensor(yd[:240])
        net = train(mlp(64, 12, 10, 0, dtype), X, y, torch.nn.functional.cross_entropy)
        tag = str(dtype).split(".")[-1]
        out.update(
            answers(
                f"ce_{tag}",
                dict(n_clusters=12, correction_rank=24),
                net,
                X,
                y,
                torch.as_tensor(Xd[300:340] / 16.0, dtype=dtype),
                torch.as_tensor(yd[300:340]),
                "cross_entropy",
            )
        )
    Xr, yr = make_regression(200, 6, n_targets=2, noise=0.1, random_state=0)
    Xr = torch.as_tensor(Xr / Xr.std(0))
    yr = torch.as_tensor(yr / yr.std(0))
    net = train(
        mlp(6, 8, 2, 1, torch.float64), Xr[:160], yr[:160], torch.nn.functional.mse_loss
    )
    out.update(
        answers(
            "mse",
            dict(n_clusters=9, correction_rank=16, curvature_samples=100),
            net,
            Xr[:160],
            yr[:160],
            Xr[160:],
            yr[160:],
            "mse",
        )
    )
    return out


def compare(a, b):
    A, B = np.load(a), np.load(b)
    keys = sorted(set(A.files) | set(B.files))
    bad = 0
    for k in keys:
        if k not in A.files or k not in B.files:
            print(f"MISSING {k}: in {'new' if k in B.files else 'old'} only")
            bad += 1
        elif (
            A[k].shape != B[k].shape
            or A[k].dtype != B[k].dtype
            or A[k].tobytes() != B[k].tobytes()
        ):
            diff = (
                np.max(np.abs(A[k].astype(float) - B[k].astype(float)))
                if A[k].shape == B[k].shape
                else "shape"
            )
            print(f"DIFFER {k}: max abs diff {diff}")
            bad += 1
    print(f"{len(keys)} answers compared, {len(keys) - bad} bitwise equal, {bad} not")
    return bad


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out")
    ap.add_argument("--compare", nargs=2)
    args = ap.parse_args()
    if args.compare:
        sys.exit(1 if compare(*args.compare) else 0)
    np.savez(args.out, **snapshot())
    print(f"wrote {args.out}")
