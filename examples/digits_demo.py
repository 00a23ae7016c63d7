"""
CiF on scikit-learn's digits with a skorch net: the short demo
==============================================================

Trains a small MLP with skorch (weight decay = the influence damping), builds
one CiF cache and answers the 50 fold queries of KFold(50) from it, next to
per-query influence on a few folds. Prints what it found and the time of
each phase. Takes 15–20 s on one CPU core.

It runs torch on one thread unless ``OMP_NUM_THREADS`` is set: the net is
tiny, so more threads gain nothing, and where the other cores are busy
torch's default of one thread per core made it several times slower.
"""

import os
import time

import numpy as np
import torch
from scipy.stats import spearmanr
from sklearn.datasets import load_digits
from sklearn.model_selection import KFold
from skorch import NeuralNetClassifier

from sklearn_cif import ClusteredInfluenceEstimator, PerQueryInfluence

if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(1)

LAM = 1e-3
X, y = load_digits(return_X_y=True)
X = (X / 16.0).astype(np.float32)
torch.manual_seed(0)
module = torch.nn.Sequential(
    torch.nn.Linear(64, 32),
    torch.nn.Tanh(),
    torch.nn.Linear(32, 10),
    torch.nn.Softmax(-1),
)
net = NeuralNetClassifier(
    module,
    max_epochs=60,
    lr=0.01,
    optimizer=torch.optim.Adam,
    optimizer__weight_decay=LAM,
    batch_size=128,
    train_split=None,
    verbose=0,
)
t0 = time.perf_counter()
net.fit(X, y)
print(
    f"trained skorch MLP on digits (N={len(y)}) in {time.perf_counter() - t0:.1f}s, "
    f"train accuracy {net.score(X, y):.3f}"
)

cif = ClusteredInfluenceEstimator(50, damping=LAM, random_state=0, verbose=1).fit(
    net, X, y
)
print(
    f"\nCiF cache: {cif.n_clusters_} clusters over {cif.n_params_} parameters, "
    f"{cif.n_data_passes_} data passes, max CG iterations {cif.n_iter_.max()}"
)
for phase, sec in cif.timings_.items():
    print(f"  {phase:<14s}{sec:7.2f}s")
print(
    f"cluster sizes: min {cif.cluster_sizes_.min()}, median "
    f"{int(np.median(cif.cluster_sizes_))}, max {cif.cluster_sizes_.max()}"
)
print(f"gradient scatter explained by the clusters (score): {cif.score(X, y):.3f}")
print(f"max CG relative residual: {cif.cg_residuals_.max():.2e}")

folds = [test for _, test in KFold(50, shuffle=True, random_state=0).split(X)]
t0 = time.perf_counter()
delta = cif.loss_change(folds)
t_cif = time.perf_counter() - t0
order = np.argsort(delta)[::-1]
print(f"\n50 fold queries answered from the cache in {1e3 * t_cif:.1f} ms")
print("folds whose removal raises their own loss most (predicted delta loss):")
for k in order[:3]:
    print(f"  fold {k:2d}: {delta[k]: .4f}")
bound = cif.error_bound(len(folds[0]))
print(
    f"paper bound on ||dtheta error|| for |S|={len(folds[0])}: scatter "
    f"{bound.scatter:.3g} + solver {bound.solver:.3g}"
)

few = [folds[k] for k in range(10)]
pq = PerQueryInfluence(damping=LAM, query_mode="sequential").fit(net, X, y)
t0 = time.perf_counter()
ref = pq.loss_change(few)
t_pq = time.perf_counter() - t0
# IF is first order: compare it with CiF's first-order effect (target="if").
first = cif.loss_change(few, target="if")
plain = cif.set_params(residual_correction="none").fit(net, X, y).loss_change(few)
print(f"\nper-query IF on 10 folds: {t_pq:.2f}s ({t_pq / 10:.2f}s per fold)")
for name, pred in (("CiF (corrected, default)", first), ("plain CiF (paper)", plain)):
    print(
        f"  {name:<25s} Spearman vs IF {spearmanr(pred, ref).statistic:.2f}, "
        f"median ratio {np.median(pred / ref):.2f}"
    )
