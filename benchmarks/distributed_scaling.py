"""The data-parallel build: 1, 2 (and 4, oversubscribed) gloo processes on CPU.

    python benchmarks/distributed_scaling.py [--n 8000] [--worlds 1 2 4]

Strong scaling: the same N rows built by W processes (one torch thread each).
Weak scaling: N/2 rows per process, so W processes build W * N/2 rows.
The build is also reported in epochs of the model's own training (one
full-batch loss and gradient over the N rows, the step of its LBFGS
training, timed on rank 0 with one thread). Each configuration runs in
freshly spawned processes (a file-store gloo
group, one torch thread each); the time is rank 0's ``fit`` (seconds and the
build's phases), and every configuration's ``labels_`` and ``responses_``
are checked against the one-process build of the same rows (correctness:
the oversubscribed W = 4 on 2 cores is for that only).

Workload: ``make_classification(N, 40, n_informative=20, n_classes=5)``,
an MLP 40-64-5 (tanh, float64, p = 2,949) trained by LBFGS to the optimum of
cross-entropy + 1e-3/2 ||theta||^2, ``ClusteredInfluenceEstimator(
n_clusters=50, solver="cg", random_state=0)``. Writes
benchmarks/results/distributed_scaling.json and prints a Markdown table.
"""

import argparse
import json
import multiprocessing
import tempfile
import time
import warnings
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).parent / "results"
LAM = 1e-3


def workload(n):
    from sklearn.datasets import make_classification

    X, y = make_classification(n, 40, n_informative=20, n_classes=5, random_state=0)
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(40, 64), torch.nn.Tanh(), torch.nn.Linear(64, 5)
    ).double()
    opt = torch.optim.LBFGS(
        net.parameters(), max_iter=200, line_search_fn="strong_wolfe"
    )
    xs, ys = torch.as_tensor(X), torch.as_tensor(y)

    def closure():
        opt.zero_grad()
        reg = sum((p * p).sum() for p in net.parameters())
        loss = torch.nn.functional.cross_entropy(net(xs), ys) + LAM / 2 * reg
        loss.backward()
        return loss

    opt.step(closure)
    return net, X, y


def epoch_seconds(net, X, y, repeats=5):
    """One epoch of the model's own training: a full-batch loss and gradient.

    The workload trains by full-batch LBFGS, one such evaluation per step
    (median of ``repeats``, one thread, all N rows).
    """
    xs, ys = torch.as_tensor(X), torch.as_tensor(y)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        net.zero_grad()
        reg = sum((p * p).sum() for p in net.parameters())
        loss = torch.nn.functional.cross_entropy(net(xs), ys) + LAM / 2 * reg
        loss.backward()
        times.append(time.perf_counter() - start)
    net.zero_grad()
    return float(np.median(times))


def rank_main(rank, world, store, n, queue):
    torch.set_num_threads(1)
    if world > 1:
        torch.distributed.init_process_group(
            "gloo", init_method=f"file://{store}", rank=rank, world_size=world,
            timeout=timedelta(seconds=600),
        )  # fmt: skip
    from sklearn_cif import ClusteredInfluenceEstimator

    net, X, y = workload(n)
    epoch = epoch_seconds(net, X, y) if rank == 0 else None
    est = ClusteredInfluenceEstimator(
        50, damping=LAM, loss="cross_entropy", solver="cg", random_state=0,
        device="cpu",
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        est.fit(net, X, y)
        seconds = time.perf_counter() - start
    if rank == 0:
        queue.put(
            dict(
                seconds=seconds,
                epoch_s=epoch,
                phases=dict(est.timings_),
                passes=est.n_data_passes_,
                labels=est.labels_,
                responses=est.responses_,
            )
        )
    if world > 1:
        torch.distributed.destroy_process_group()


def run(world, n):
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    store = Path(tempfile.mkdtemp()) / "store"
    procs = [
        ctx.Process(target=rank_main, args=(r, world, str(store), n, queue))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    out = queue.get(timeout=3600)
    for p in procs:
        p.join()
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=8000)
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args()
    rows, single = [], {}
    for mode in ("strong", "weak"):
        for world in args.worlds:
            n = args.n if mode == "strong" else args.n // 2 * world
            res = run(world, n)
            if n not in single:
                single[n] = res if world == 1 else run(1, n)
            ref = single[n]
            row = dict(
                mode=mode,
                world=world,
                n=n,
                seconds=res["seconds"],
                epoch_s=res["epoch_s"],
                build_epochs=res["seconds"] / res["epoch_s"],
                seconds_one_process=ref["seconds"],
                speedup=ref["seconds"] / res["seconds"],
                passes=res["passes"],
                phases=res["phases"],
                labels_equal=bool(np.array_equal(res["labels"], ref["labels"])),
                max_response_diff=float(
                    np.max(np.abs(res["responses"] - ref["responses"]))
                ),
            )
            rows.append(row)
            print(json.dumps(row), flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "distributed_scaling.json").write_text(json.dumps(rows, indent=1))
    print("\n| mode | processes | N | build s | build epochs | 1 process s | speedup "
          "| passes | labels equal | max response diff |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['mode']} | {r['world']} | {r['n']} | {r['seconds']:.1f} "
            f"| {r['build_epochs']:.0f} "
            f"| {r['seconds_one_process']:.1f} | {r['speedup']:.2f} | {r['passes']} "
            f"| {r['labels_equal']} | {r['max_response_diff']:.1e} |"
        )


if __name__ == "__main__":
    main()
