"""GPU check: fit CiF on a small CNN with CIFAR-10-shaped random data on CUDA
and on the CPU, check that they agree, and print per-example gradient + sketch
throughput (examples/s) on each device.

    python benchmarks/gpu_check.py            # needs torch; skorch not needed

Exits with status 1 when the devices disagree, 0 otherwise (also when no GPU).
"""

import sys
import time

import numpy as np
import torch

from sklearn_cif import ClusteredInfluenceEstimator
from sklearn_cif.adapters import as_functional
from sklearn_cif.gradients import per_example_grads
from sklearn_cif.sketch import CountSketch

N, BATCH = 2048, 256
N_FIT = (
    256  # the CPU fit must stay short: a CNN GGN product costs ~4 forwards per vector
)


def make_cnn():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(32 * 8 * 8, 10),
    )


def throughput(net, X, y, device):
    fm = as_functional(net, loss="cross_entropy", device=device)
    sketch = CountSketch(fm.n_params, 256, seed=0)
    x, t = fm.as_tensors(X[:BATCH], y[:BATCH])
    sketch(per_example_grads(fm, x, t)[0])  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(0, N, BATCH):
        x, t = fm.as_tensors(X[i : i + BATCH], y[i : i + BATCH])
        sketch(per_example_grads(fm, x, t)[0])
    if device == "cuda":
        torch.cuda.synchronize()
    return N / (time.perf_counter() - start)


def main():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(N, 3, 32, 32)).astype(np.float32)
    y = rng.integers(0, 10, N)
    net = make_cnn()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    fits = {}
    for dev in devices:
        print(
            f"{dev}: per-example gradient + sketch "
            f"{throughput(net, X, y, dev):,.0f} examples/s"
        )
        est = ClusteredInfluenceEstimator(
            8, loss="cross_entropy", damping=1e-1, random_state=0, device=dev
        )
        fits[dev] = est.fit(net.to(dev), X[:N_FIT], y[:N_FIT])
        net.to("cpu")
        print(
            f"{dev}: fit timings "
            + ", ".join(f"{k} {v:.2f}s" for k, v in est.timings_.items())
        )
    if "cuda" not in fits:
        print("no CUDA device: agreement check skipped")
        return 0
    a, b = fits["cpu"], fits["cuda"]
    same = np.mean(a.labels_ == b.labels_)
    folds = np.array_split(np.random.default_rng(1).permutation(N_FIT), 16)
    da, db = a.loss_change(folds), b.loss_change(folds)
    rel = np.linalg.norm(da - db) / np.linalg.norm(da)
    print(
        f"labels equal on {100 * same:.1f}% of examples; "
        f"fold delta-loss relative difference {rel:.2e}"
    )
    return 0 if rel < 1e-2 else 1


if __name__ == "__main__":
    sys.exit(main())
