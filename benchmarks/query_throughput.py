"""Subset queries answered from one cache: queries/s against the index-read floor.

    python benchmarks/query_throughput.py [--queries 100000]

A small MLP on make_classification (N = 20,000), CiF with C = 50. Random
subsets of size 1 ... 1,000 (uniform); the floor is the time to read their
indices once (``np.concatenate``). Reports ``loss_change`` for self effects
(corrected, first order; O(|S| C) each), for a fixed evaluation set with its
cached alphas (O(|S| + C) each, the evaluation gradient computed once
beforehand; with the duplicate check and with ``assume_unique=True``), and
for the Newton-step self effects of ``target="retrain"``
(O(|S| (d^3 + d r^2) + r^3) each; ``--retrain-queries`` of them).
Every time is the median of ``--repeats`` runs (the first touch of fresh
memory is slow on some machines, the floor's included).
"""

import argparse
import time

import numpy as np
import torch
from sklearn.datasets import make_classification

from sklearn_cif import ClusteredInfluenceEstimator


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--queries", type=int, default=100_000)
    ap.add_argument("--retrain-queries", type=int, default=2_000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    def timed(fn):
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return float(np.median(times))

    X, y = make_classification(20_000, 20, random_state=0)
    X = X.astype(np.float32)
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(20, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2)
    )
    est = ClusteredInfluenceEstimator(
        50, loss="cross_entropy", damping=1e-2, random_state=0
    )
    t0 = time.perf_counter()
    est.fit(net, X, y)
    build = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 1001, args.queries)
    subsets = [rng.choice(len(y), s, replace=False) for s in sizes]
    floor = timed(lambda: np.concatenate(subsets))
    t_query = timed(lambda: est.loss_change(subsets, target="if"))
    n_rt = min(args.retrain_queries, args.queries)
    t0 = time.perf_counter()
    est.loss_change(subsets[:n_rt], target="retrain")
    t_rt = time.perf_counter() - t0
    floor_rt = floor * np.sum(sizes[:n_rt]) / np.sum(sizes)
    X_val, y_val = X[:2000], y[:2000]
    est.loss_change(subsets[:1], X_val, y_val)  # computes and caches alpha
    t_eval = timed(lambda: est.loss_change(subsets, X_val, y_val))
    t_eval_u = timed(lambda: est.loss_change(subsets, X_val, y_val, assume_unique=True))
    print(
        f"build {build:.2f}s; index-read floor for {args.queries} subsets (mean |S| "
        f"{sizes.mean():.0f}): {floor:.3f}s"
    )
    for name, t, q, fl in (
        ("self effects, target='if'", t_query, args.queries, floor),
        ("eval-set effects, cached alpha", t_eval, args.queries, floor),
        ("  the same, assume_unique=True", t_eval_u, args.queries, floor),
        ("self effects, target='retrain'", t_rt, n_rt, floor_rt),
    ):
        print(
            f"  {name:<31s} {q} queries {t:.2f}s = {q / t:,.0f} queries/s, "
            f"{t / fl:.1f}x the floor"
        )


if __name__ == "__main__":
    main()
