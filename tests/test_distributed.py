"""The cache build data-parallel on torch.distributed (gloo processes on CPU).

Each test spawns 2 or 3 processes that fit on the same data; every rank's
cache and InfluenceCV answers must equal a single-process fit (1e-6, float64).
"""

import multiprocessing
import time
import warnings

import numpy as np
import pytest
import torch
from _dist_workers import answers, fit_rank, problem

from sklearn_cif import ClusteredInfluenceEstimator
from sklearn_cif.distributed import ShardedPasses, process_group

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed unavailable"
)


def _spawn(world, tmp_path, task, solver, poison=None, timeout=240):
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    store = tmp_path / "store"
    procs = [
        ctx.Process(
            target=fit_rank,
            args=(r, world, str(store), task, solver, queue, poison),
        )
        for r in range(world)
    ]
    for p in procs:
        p.start()
    start = time.monotonic()
    results = dict(queue.get(timeout=timeout) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    return results, time.monotonic() - start


def _single(task, solver):
    net, X, y, loss = problem(task)
    est = ClusteredInfluenceEstimator(6, loss=loss, solver=solver, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est.fit(net, X, y)
    return answers(est, net, X, y)


@pytest.mark.parametrize(
    "world, task, solver",
    [(2, "regression", "dense"), (3, "regression", "cg"), (2, "classification", "cg")],
)
def test_every_rank_builds_the_single_process_cache(tmp_path, world, task, solver):
    # Rank 1.. draw other seeds (random_state=None): rank 0's are broadcast.
    results, _ = _spawn(world, tmp_path, task, solver)
    ref = _single(task, solver)
    for rank in range(world):
        got = results[rank]
        assert isinstance(got, dict), got  # not an exception report
        assert tuple(got["seeds"]) == tuple(ref["seeds"])
        np.testing.assert_array_equal(got["labels_"], ref["labels_"])
        for key in ("responses_", "train_influence_", "self_influence_",
                    "spectrum_", "delta_loss", "oof_outputs"):  # fmt: skip
            np.testing.assert_allclose(got[key], ref[key], rtol=1e-6, atol=1e-9)
        if task == "regression":
            # a non-degenerate spectrum: the eigenbasis itself is reproducible
            # (the softmax's flat directions would leave it free up to rotation)
            np.testing.assert_allclose(
                got["jacobian_spectral_"], ref["jacobian_spectral_"], rtol=1e-6,
                atol=1e-9,
            )  # fmt: skip


def test_a_failing_rank_makes_every_rank_raise_without_hanging(tmp_path):
    # Rank 1 fails in its first pass: rank 0 raises in its next collective
    # (the peer's connection closes); neither installs a cache.
    results, seconds = _spawn(2, tmp_path, "regression", "cg", poison="crash")
    assert seconds < 120
    name, message, fitted = results[1]
    assert name == "FloatingPointError" and "simulated" in message and not fitted
    name, message, fitted = results[0]
    assert name in ("RuntimeError", "DistBackendError") and not fitted


def test_ranks_with_other_data_all_refuse(tmp_path):
    results, _ = _spawn(3, tmp_path, "regression", "dense", poison="data")
    for rank in range(3):
        name, message, fitted = results[rank]
        assert name == "ValueError" and "Ranks [1]" in message and not fitted


def test_distributed_false_fits_each_rank_alone(tmp_path):
    # Inside a group, distributed=False does no collective: each rank's
    # cache is the one-process cache (its own seeds, every row read).
    results, _ = _spawn(2, tmp_path, "regression", "cg", poison="local")
    ref = _single("regression", "cg")
    for rank in range(2):
        np.testing.assert_array_equal(results[rank]["labels_"], ref["labels_"])
        np.testing.assert_allclose(
            results[rank]["responses_"], ref["responses_"], rtol=1e-10, atol=1e-12
        )


def test_sharded_passes_need_a_process_group(tiny_classification):
    from sklearn_cif.adapters import as_functional

    net, X, y = tiny_classification
    assert process_group() is None
    fm = as_functional(net, loss="cross_entropy", device="cpu")
    with pytest.raises(RuntimeError, match="process group"):
        ShardedPasses(fm, X, y, 8)


def test_distributed_parameter_outside_a_group(tiny_classification):
    # "auto" and False build in one process; True needs a group; a typo is
    # named. (Inside a group, False keeps a rank's fit to itself.)
    net, X, y = tiny_classification
    est = ClusteredInfluenceEstimator(4, loss="cross_entropy", random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = est.fit(net, X, y).responses_
        b = est.set_params(distributed=False).fit(net, X, y).responses_
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="distributed=True needs"):
        est.set_params(distributed=True).fit(net, X, y)
    with pytest.raises(ValueError, match="distributed='yes'"):
        est.set_params(distributed="yes").fit(net, X, y)
