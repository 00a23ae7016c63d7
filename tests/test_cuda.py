"""GPU agreement (runs only where CUDA is available; CI deselects -m cuda)."""

import numpy as np
import pytest
import torch

from sklearn_cif import ClusteredInfluenceEstimator, PerQueryInfluence

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_cuda_and_cpu_agree(digits):
    # The same fit on CUDA and on the CPU gives the same per-query effects and,
    # for C = N, the same first-order CiF effects (float64 on both devices;
    # per-query IF is first order, so CiF is compared with target="if").
    X, y = digits
    X, y = X[:200].astype(np.float64), y[:200]
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(64, 8), torch.nn.Tanh(), torch.nn.Linear(8, 10)
    ).double()
    folds = np.array_split(np.arange(200), 10)
    kw = dict(loss="cross_entropy", damping=1e-2, cg_tol=1e-10)
    ref = PerQueryInfluence(device="cpu", query_mode="batched", **kw).fit(net, X, y)
    gpu = PerQueryInfluence(device="cuda", query_mode="batched", **kw).fit(net, X, y)
    np.testing.assert_allclose(
        gpu.loss_change(folds), ref.loss_change(folds), rtol=1e-6
    )
    cif = ClusteredInfluenceEstimator(200, device="cuda", random_state=0, **kw).fit(
        net, X, y
    )
    np.testing.assert_allclose(
        cif.loss_change(folds, target="if"), ref.loss_change(folds), rtol=1e-6
    )
    cpu = ClusteredInfluenceEstimator(200, device="cpu", random_state=0, **kw)
    np.testing.assert_allclose(
        cif.loss_change(folds), cpu.fit(net, X, y).loss_change(folds), rtol=1e-6
    )
