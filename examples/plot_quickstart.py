"""
Quickstart
==========

Train a small skorch classifier on scikit-learn's digits, build one
:class:`~sklearn_cif.ClusteredInfluenceEstimator` (CiF) cache and ask it
what removing training subsets would do: predicted K-fold cross-validation
with :class:`~sklearn_cif.InfluenceCV`, the parameter change of a subset,
its effect on a loss, and the paper's error bound.
"""

# %%
# A trained skorch net
# --------------------
# The module returns logits and the criterion is
# :class:`torch.nn.CrossEntropyLoss`, so CiF uses the ``"cross_entropy"``
# loss split at the logits. The optimizer's ``weight_decay`` is the L2
# coefficient of the training objective: the influence ``damping`` should
# equal it.
import time

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import KFold
from skorch import NeuralNetClassifier

from sklearn_cif import ClusteredInfluenceEstimator, InfluenceCV

torch.set_num_threads(1)
torch.manual_seed(0)
LAM = 1e-3

X, y = load_digits(return_X_y=True)
X = (X / 16.0).astype(np.float32)
y = y.astype(np.int64)

module = torch.nn.Sequential(
    torch.nn.Linear(64, 32),
    torch.nn.Tanh(),
    torch.nn.Linear(32, 10),
)
net = NeuralNetClassifier(
    module,
    criterion=torch.nn.CrossEntropyLoss,
    optimizer=torch.optim.Adam,
    optimizer__weight_decay=LAM,
    lr=0.01,
    max_epochs=40,
    batch_size=128,
    train_split=None,
    verbose=0,
).fit(X, y)
print(f"training accuracy {net.score(X, y):.3f} on N = {len(X)} examples")

# %%
# One cache, predicted 50-fold cross-validation
# ---------------------------------------------
# ``InfluenceCV`` fits the estimator (one gradient pass, a sketch, k-means
# and one block-CG solve for the 50 cluster means) and then answers every
# fold from the cache: no retraining.
cif = ClusteredInfluenceEstimator(n_clusters=50, damping=LAM, random_state=0, verbose=1)
start = time.perf_counter()
icv = InfluenceCV(
    cif,
    cv=KFold(50, shuffle=True, random_state=0),
    scoring=["accuracy", "neg_log_loss"],
).fit(net, X, y)
t50 = time.perf_counter() - start
print(f"KFold(50) predicted in {t50:.2f} s, the cache build included")
pd.DataFrame(icv.cv_results_).head()

# %%
# ``test_loss_in_sample`` is a fold's loss under the trained net,
# ``delta_loss`` the predicted change when the fold is left out of training,
# and ``test_loss`` their sum: the fold's predicted held-out loss.
# ``test_accuracy`` and ``test_neg_log_loss`` score the predicted
# out-of-fold outputs.
results = icv.cv_results_
print(f"mean predicted CV accuracy: {results['test_accuracy'].mean():.4f}")
print(f"mean predicted CV log-loss: {-results['test_neg_log_loss'].mean():.4f}")
print(f"training accuracy:          {net.score(X, y):.4f}")

# %%
# The same cache answers another CV scheme at once
# ------------------------------------------------
# ``icv.estimator_`` is the fitted estimator. Passing it to a new
# ``InfluenceCV`` reuses its cache: KFold(100) needs no gradient pass and
# no solve.
start = time.perf_counter()
icv100 = InfluenceCV(
    icv.estimator_,
    cv=KFold(100, shuffle=True, random_state=0),
    scoring=["accuracy", "neg_log_loss"],
).fit(net, X, y)
t100 = time.perf_counter() - start
print(
    f"KFold(100) from the same cache: {t100:.2f} s "
    f"(fit_time_ = {icv100.fit_time_:.2f} s), "
    f"predicted accuracy {icv100.cv_results_['test_accuracy'].mean():.4f}"
)

# %%
# Subset queries
# --------------
# ``cif`` was not fitted, so ``InfluenceCV`` fitted a clone of it:
# ``icv.estimator_`` holds the cache. (An estimator that is already fitted on
# the same model and data is used as is.)
cif = icv.estimator_
# Any subset of the training set can be asked about, not only CV folds.
# ``param_change`` is the predicted :math:`\theta_{-S} - \theta` (one row per
# subset), ``loss_change`` the predicted change of a mean loss: without
# evaluation data, each subset's own loss (positive: removing it raises the
# loss).
rng = np.random.default_rng(0)
fold = icv.splits_[0][1]
subsets = [
    fold,
    np.flatnonzero(y == 3),
    rng.choice(len(X), 100, replace=False),
]
names = ["CV fold 0", "all 3s", "100 random"]
dtheta = cif.param_change(subsets)
print(f"param_change: shape {dtheta.shape}, p = {cif.n_params_} parameters")
table = pd.DataFrame(
    {
        "size": [len(s) for s in subsets],
        "|dtheta|": np.linalg.norm(dtheta, axis=1),
        "own loss change (retrain)": cif.loss_change(subsets, target="retrain"),
        "own loss change (IF)": cif.loss_change(subsets, target="if"),
        "loss change on all data": cif.loss_change(subsets, X, y),
    },
    index=names,
)
table  # noqa: B018 (sphinx-gallery shows the table)

# %%
# ``target="if"`` is the paper's first-order influence; ``"retrain"`` adds
# a leave-k-out Newton step from the cache and targets what retraining to
# the new optimum measures. The default ``"auto"`` is ``"retrain"`` for
# ``cross_entropy`` when the model is at its optimum; this 40-epoch net stops
# short of it (``optimality_gap_`` above 1, and ``fit`` warned), and there
# ``"auto"`` answers first order (see the user guide, "Models off their
# optimum"). Removing all 3s
# raises their own loss a lot: the net no longer sees the class.
#
# The error bound
# ---------------
# ``error_bound(m)`` is the paper's bound on the expected error of
# ``param_change`` for a subset of size ``m``: a *scatter* term (how well the
# clusters summarize the gradients) and a *solver* term (the CG residuals).
bound = cif.error_bound(len(fold))
print(
    f"m = {len(fold)}: scatter {bound.scatter:.3g} + solver {bound.solver:.3g} "
    f"= {bound.total:.3g}; |param_change| of that fold: "
    f"{np.linalg.norm(dtheta[0]):.3g}"
)
print(f"bound / |param_change|: {bound.total / np.linalg.norm(dtheta[0]):.0f}x")

# %%
# The bound is a worst-case rubric, scaled by :math:`1/\lambda`: it is far
# above the size of the change itself here, and it is dominated by the
# scatter term (the solver converged). It is useful to compare settings
# (``n_clusters``, ``cg_tol``), not as an error bar; see
# :ref:`sphx_glr_auto_examples_plot_choose_clusters_tolerance.py`.

# %%
# Predicted vs in-sample loss per fold
# ------------------------------------
fig, ax = plt.subplots(figsize=(5, 4))
ax.scatter(results["test_loss_in_sample"], results["test_loss"], s=15)
lim = [0, max(results["test_loss"].max(), results["test_loss_in_sample"].max())]
ax.plot(lim, lim, "k--", lw=0.8, label="no change")
ax.set_xlabel("fold loss, trained on all data")
ax.set_ylabel("predicted held-out fold loss")
ax.set_title("KFold(50) from one CiF cache")
ax.legend()
fig.tight_layout()
