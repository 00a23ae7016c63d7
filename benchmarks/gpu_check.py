"""GPU check: fit CiF on a small CNN with CIFAR-10-shaped random data on CUDA
and on the CPU, check that they agree, and print per-example gradient + sketch
throughput (examples/s) on each device. Then two build workloads on the GPU,
each in seconds, in epochs of the model's own training (timed in the same
run, on the same device) and in peak GPU memory:

- the paper's shape: a LeNet-sized CNN, N = 50,000 CIFAR-10-shaped synthetic
  examples, C = 50: build per phase and the 150 KFold(50) + KFold(100)
  self-effect queries (first order and Newton step);
- issue 14's workload: ``make_classification(20000, 64, n_informative=30,
  n_classes=10)``, Linear(64, 256)-Tanh-Linear(256, 10), Adam lr 0.01, weight
  decay 1e-3, batch 256, 10 epochs (the skorch net of
  ``build_epochs.py`` as a plain training loop: the GPU machine has no
  skorch), then the default build with ``damping=1e-3``.

    python benchmarks/gpu_check.py            # needs torch; skorch not needed
    python benchmarks/gpu_check.py --paper-n 2000 --mlp-n 2000 --paper-device cpu  # dry run

Exits with status 1 when the devices disagree, 0 otherwise (also when no GPU).
"""

import argparse
import json
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


def lenet():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 5),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(6, 16, 5),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(16 * 5 * 5, 120),
        torch.nn.ReLU(),
        torch.nn.Linear(120, 84),
        torch.nn.ReLU(),
        torch.nn.Linear(84, 10),
    )


def train(net, X, y, device, epochs, batch, lr, weight_decay):
    """Adam on cross-entropy; returns seconds per epoch (synchronized)."""
    opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=weight_decay)
    Xt, yt = torch.as_tensor(X, device=device), torch.as_tensor(y, device=device)
    warm = torch.arange(min(batch, len(yt)), device=device)
    torch.nn.functional.cross_entropy(net(Xt[warm]), yt[warm]).backward()  # untimed
    opt.zero_grad()
    _sync(device)
    start = time.perf_counter()
    for _ in range(epochs):
        for idx in torch.randperm(len(yt), device=device).split(batch):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(Xt[idx]), yt[idx]).backward()
            opt.step()
    _sync(device)
    return (time.perf_counter() - start) / epochs


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def build(est, net, X, y, device, epoch_s, name):
    """Fit ``est``; print and return the build in seconds, epochs and memory."""
    if str(device).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    est.fit(net, X, y)
    _sync(device)
    seconds = time.perf_counter() - start
    res = {
        "workload": name,
        "device": str(device),
        "N": len(y),
        "p": est.n_params_,
        "epoch_s": epoch_s,
        "build_s": seconds,
        "build_epochs": seconds / epoch_s,
        "phases_s": est.timings_,
        "phases_epochs": {k: v / epoch_s for k, v in est.timings_.items()},
        "peak_gpu_memory_gb": torch.cuda.max_memory_allocated() / 2**30
        if str(device).startswith("cuda")
        else None,
        "data_passes": est.n_data_passes_,
        "ggn_products": est.n_ggn_products_,
        "max_cg_iter": int(est.n_iter_.max()),
        "kept_rank": None if est.spectrum_ is None else len(est.spectrum_),
    }
    print(json.dumps(res, indent=1))
    return res


def paper_workload(n, device):
    """LeNet on n CIFAR-shaped examples: build phases and 150 fold queries."""
    from sklearn.model_selection import KFold

    rng = np.random.default_rng(0)
    X = rng.normal(size=(n, 3, 32, 32)).astype(np.float32)
    y = rng.integers(0, 10, n)
    net = lenet().to(device)
    epoch = train(net, X, y, device, 1, 512, 1e-3, 1e-3)
    est = ClusteredInfluenceEstimator(
        50,
        loss="cross_entropy",
        damping=1e-2,
        batch_size=512,
        random_state=0,
        device=device,
    )
    res = build(est, net, X, y, device, epoch, "lenet")
    folds = [
        te
        for K in (50, 100)
        for _, te in KFold(K, shuffle=True, random_state=0).split(X)
    ]
    t0 = time.perf_counter()
    est.loss_change(folds, target="if")
    res["queries_if_150_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    est.loss_change(folds, target="retrain")
    res["queries_retrain_150_s"] = time.perf_counter() - t0
    print(
        f"150 fold queries: first order {res['queries_if_150_s']:.2f} s, "
        f"Newton {res['queries_retrain_150_s']:.2f} s"
    )
    return res


def mlp_workload(n, device):
    """Issue 14's workload: the skorch MLP of build_epochs.py as a torch loop."""
    from sklearn.datasets import make_classification

    X, y = make_classification(n, 64, n_informative=30, n_classes=10, random_state=0)
    X, y = X.astype(np.float32), y.astype(np.int64)
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(64, 256), torch.nn.Tanh(), torch.nn.Linear(256, 10)
    ).to(device)
    epoch = train(net, X, y, device, 10, 256, 0.01, 1e-3)
    est = ClusteredInfluenceEstimator(
        loss="cross_entropy", damping=1e-3, random_state=0, device=device
    )
    return build(est, net, X, y, device, epoch, "mlp_20000")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--paper-n", type=int, default=50_000)
    ap.add_argument("--mlp-n", type=int, default=20_000)
    ap.add_argument("--paper-device", default=None)
    ap.add_argument("--out", default=None, help="write the workloads' JSON here")
    args = ap.parse_args()
    device = args.paper_device or ("cuda" if torch.cuda.is_available() else None)
    if device is not None:
        results = [
            paper_workload(args.paper_n, device),
            mlp_workload(args.mlp_n, device),
        ]
        if args.out:
            with open(args.out, "w") as fh:
                json.dump(results, fh, indent=1)
    else:
        print("no CUDA device: build workloads skipped (use --paper-device cpu)")
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
