"""Process bodies for tests/test_distributed.py (importable by spawned children)."""

import warnings
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from sklearn.model_selection import KFold


def problem(task):
    """A tiny float64 net and data; regression keeps the spectrum non-degenerate."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    X = rng.normal(size=(90, 6))
    if task == "regression":
        y, d, loss = rng.normal(size=(90, 2)), 2, "mse"
    else:
        y, d, loss = rng.integers(0, 3, 90), 3, "cross_entropy"
    net = torch.nn.Sequential(
        torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, d)
    ).double()
    return net, X, y, loss


def answers(est, net, X, y):
    """What the comparison looks at: cache arrays and InfluenceCV answers."""
    from sklearn_cif import InfluenceCV

    icv = InfluenceCV(est, cv=KFold(5, shuffle=True, random_state=0)).fit(net, X, y)
    return {
        "labels_": est.labels_,
        "responses_": est.responses_,
        "train_influence_": est.train_influence_,
        "self_influence_": est.self_influence_,
        "jacobian_spectral_": est.jacobian_spectral_,
        "spectrum_": est.spectrum_,
        "delta_loss": icv.cv_results_["delta_loss"],
        "oof_outputs": icv.oof_outputs_,
        "seeds": est._cache.seeds,
    }


def fit_rank(rank, world, store, task, solver, queue, poison=None):
    """Join a gloo group, fit, and report the answers (or the exception)."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world,
        timeout=timedelta(seconds=20),
    )  # fmt: skip
    from sklearn_cif import ClusteredInfluenceEstimator

    net, X, y, loss = problem(task)
    if poison == "data" and rank == 1:
        y = y.copy()
        y[-3] += 1.0  # rank 1 was given other data
    if poison == "crash" and rank == 1:  # rank 1 fails in its first pass
        import sklearn_cif.passes as passes

        def failing(G, losses, idx):
            raise FloatingPointError("Non-finite per-example gradients (simulated)")

        passes._check_finite_batch = failing
    est = ClusteredInfluenceEstimator(
        6, loss=loss, solver=solver, random_state=None if rank else 0
    )
    if poison == "local":  # distributed=False: every rank fits on its own
        est.set_params(distributed=False, random_state=0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            est.fit(net, X, y)
        queue.put((rank, answers(est, net, X, y)))
    except Exception as exc:  # reported to the parent, then the group is torn down
        queue.put(
            (rank, (type(exc).__name__, str(exc)[:300], est.__sklearn_is_fitted__()))
        )
    finally:
        dist.destroy_process_group()
