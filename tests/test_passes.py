"""The data-pass layer: batching, the gradient budget, counting, hooks, the lock."""

import sys
import threading

import numpy as np
import pytest
import torch
from _oracles import loop_grads

from sklearn_cif import ClusteredInfluenceEstimator
from sklearn_cif.adapters import as_functional
from sklearn_cif.passes import DataPasses

CE = torch.nn.CrossEntropyLoss(reduction="none")


def test_gradient_batches_are_bounded_by_a_memory_budget(tiny_classification):
    # A budget of 2 * p numbers means batches of 2 examples, same gradients.
    net, X, y = tiny_classification
    fmodel = as_functional(net, loss="cross_entropy", device="cpu")
    passes = DataPasses(fmodel, X, y, 256, budget=2 * fmodel.n_params)
    seen = []

    def kernel(idx, G, _):
        seen.append(idx.stop - idx.start)
        return {"G": G}

    rows = passes.map_rows(kernel, gradients=True, dtype=None)["G"]
    assert max(seen) == 2 and sum(seen) == len(y) and passes.n_passes == 1
    torch.testing.assert_close(
        torch.as_tensor(rows), loop_grads(net, CE, X, y), rtol=1e-10, atol=1e-12
    )


def test_accumulate_and_group_sums_against_a_loop(tiny_classification):
    # Sums over batches and over index groups equal sums of loop gradients;
    # a subset shares its parent's pass counter.
    net, X, y = tiny_classification
    fmodel = as_functional(net, loss="cross_entropy", device="cpu")
    passes = DataPasses(fmodel, X, y, 7)
    g = loop_grads(net, CE, X, y)
    torch.testing.assert_close(
        passes.mean_gradient(), g.mean(0), rtol=1e-10, atol=1e-12
    )
    groups = [np.array([3, 1, 20]), np.arange(10, 30)]
    sums = passes.group_sums(groups)
    ref = torch.stack([g[grp].sum(0) for grp in groups])
    torch.testing.assert_close(sums, ref, rtol=1e-10, atol=1e-12)
    sub = passes.subset(np.array([0, 5, 6]))
    torch.testing.assert_close(sub.mean_gradient(), g[[0, 5, 6]].mean(0))
    assert passes.n_passes == 3 == sub.n_passes


def test_every_fit_pass_goes_through_the_layer(tiny_classification, monkeypatch):
    # n_data_passes_ equals the passes the layer actually ran (counted by a
    # wrapper of its batch iterator, not by the build's own counter).
    net, X, y = tiny_classification
    started = []
    original = DataPasses._batches

    def counting(self, *args, **kwargs):
        started.append(self.n_samples)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DataPasses, "_batches", counting)
    est = ClusteredInfluenceEstimator(4, loss="cross_entropy", random_state=0)
    est.fit(net, X, y)
    n_group_sums = 1  # cluster means: ordinary backward per group, no iterator
    assert len(started) + n_group_sums == est.n_data_passes_


class _ShardedPasses(DataPasses):
    """A two-"process" pass layer simulated in one process: each call computes
    both shards through ``rows`` and combines them through the hooks."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.shard = None

    def rows(self):
        half = self.n_samples // 2
        return slice(0, half) if self.shard == 0 else slice(half, self.n_samples)

    def accumulate(self, kernel, out, *, progress=None):
        total = torch.zeros_like(out)
        for self.shard in (0, 1):
            total += super().accumulate(kernel, torch.zeros_like(out))
        return out.add_(total)

    def group_sums(self, groups, *, progress=None):
        parts = []
        for self.shard in (0, 1):
            parts.append(super().group_sums(groups))
        return parts[0] + parts[1]


def test_rows_and_reduce_hooks_shard_a_sum(tiny_classification):
    # Overriding rows/accumulate (the multi-process seam) gives the same sum.
    net, X, y = tiny_classification
    fmodel = as_functional(net, loss="cross_entropy", device="cpu")
    full = DataPasses(fmodel, X, y, 4).mean_gradient()
    sharded = _ShardedPasses(fmodel, X, y, 4).mean_gradient()
    torch.testing.assert_close(sharded, full, rtol=1e-12, atol=1e-14)
    groups = [np.array([0, 20, 29]), np.arange(5, 25)]  # across the shard border
    full = DataPasses(fmodel, X, y, 4).group_sums(groups)
    sharded = _ShardedPasses(fmodel, X, y, 4).group_sums(groups)
    torch.testing.assert_close(sharded, full, rtol=1e-12, atol=1e-14)


def test_passes_on_one_model_never_interleave(tiny_classification):
    # The model lock: while one pass runs, another thread's pass waits.
    net, X, y = tiny_classification
    fmodel = as_functional(net, loss="cross_entropy", device="cpu")
    passes = DataPasses(fmodel, X, y, 1)
    inside, overlaps = [0], []

    def kernel(idx, x, t):
        inside[0] += 1
        overlaps.append(inside[0])
        out = {"o": fmodel.forward(fmodel.theta, x).detach()}
        inside[0] -= 1
        return out

    threads = [
        threading.Thread(target=passes.map_rows, args=(kernel,)) for _ in range(4)
    ]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert len(overlaps) == 4 * len(y) and max(overlaps) == 1


def test_map_rows_rejects_nothing_silently(tiny_classification):
    # Non-finite per-example gradients are reported with the example index.
    net, X, y = tiny_classification
    X = X.clone()
    X[4, 0] = float("inf")
    fmodel = as_functional(net, loss="cross_entropy", device="cpu")
    with pytest.raises(FloatingPointError, match=r"examples \[4\]"):
        DataPasses(fmodel, X, y, 8).map_rows(lambda *a: {}, gradients=True)


def test_finite_check_tells_overflowing_sums_from_non_finite_rows(
    tiny_classification, monkeypatch
):
    # The fast check reads row sums; a finite row whose float32 sum overflows
    # must pass, and a NaN among large entries must still be reported.
    import sklearn_cif.passes as passes_mod

    G = torch.full((3, 4), 3e38, dtype=torch.float32)  # every row sum is inf
    losses = torch.zeros(3)
    passes_mod._check_finite_batch(G, losses, slice(10, 13))  # finite: no error
    G[1, 2] = float("nan")
    with pytest.raises(FloatingPointError, match=r"examples \[11\]"):
        passes_mod._check_finite_batch(G, losses, slice(10, 13))


def test_row_sq_norms_in_float64_past_float32_range():
    # ||g||^2 of a finite float32 row may exceed float32's range: squared in
    # float64 (and recomputed there when the float32 norm itself overflows).
    from sklearn_cif.passes import row_sq_norms

    G = torch.tensor([[1e25, 2e25], [3e38, 3e38], [1.0, -2.0]], dtype=torch.float32)
    exact = (G.double() ** 2).sum(1)
    got = row_sq_norms(G)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, exact, rtol=1e-6, atol=0)
