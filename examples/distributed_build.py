"""
A data-parallel cache build with torchrun
=========================================

Run it on one machine with two CPU processes (gloo) or one process per GPU
(NCCL)::

    torchrun --nproc-per-node 2 examples/distributed_build.py

Every process loads the same data and the same trained model and calls
``fit``: because a process group is initialized, the build shards the rows
over the processes (each computes per-example gradients, sketches and
curvature products on its own ``N / world_size`` rows), all-reduces the
sums and all-gathers the per-row arrays. Every rank ends with the same
fitted estimator; rank 0 saves it, and any process can then load it and
answer queries without the process group.

Without torchrun (a plain ``python examples/distributed_build.py``) the same
script builds in one process.
"""

import os
import time

import numpy as np
import torch
import torch.distributed as dist
from sklearn.datasets import load_digits
from sklearn.model_selection import KFold

from sklearn_cif import ClusteredInfluenceEstimator, InfluenceCV

if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(1)


def trained_model(X, y, lam):
    """The same model on every rank: seeded, trained to the regularized optimum."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10)
    ).double()
    opt = torch.optim.LBFGS(
        net.parameters(), max_iter=300, line_search_fn="strong_wolfe"
    )
    xs, ys = torch.as_tensor(X), torch.as_tensor(y)

    def closure():
        opt.zero_grad()
        reg = sum((p * p).sum() for p in net.parameters())
        loss = torch.nn.functional.cross_entropy(net(xs), ys) + lam / 2 * reg
        loss.backward()
        return loss

    opt.step(closure)
    return net


def main():
    if "WORLD_SIZE" in os.environ:  # started by torchrun
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1

    X, y = load_digits(return_X_y=True)
    X, lam = X / 16.0, 1e-3
    net = trained_model(X, y, lam)

    start = time.perf_counter()
    est = ClusteredInfluenceEstimator(
        n_clusters=50, damping=lam, loss="cross_entropy", solver="cg",
        random_state=0, device="cpu", verbose=int(rank == 0),
    ).fit(net, X, y)  # fmt: skip
    seconds = time.perf_counter() - start
    icv = InfluenceCV(est, cv=KFold(50, shuffle=True, random_state=0)).fit(net, X, y)
    print(
        f"rank {rank}/{world}: build {seconds:.1f} s, {est.n_data_passes_} passes; "
        f"predicted CV accuracy {icv.cv_results_['test_score'].mean():.4f}",
        flush=True,
    )
    if rank == 0:
        est.save("distributed_cache.npz")
        loaded = ClusteredInfluenceEstimator.load("distributed_cache.npz")
        assert np.array_equal(loaded.labels_, est.labels_)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
