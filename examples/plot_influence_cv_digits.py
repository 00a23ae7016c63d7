"""
Approximate K-fold CV of a skorch net from one influence cache
==============================================================

Train a small skorch classifier on scikit-learn's digits once, build one
:class:`~sklearn_cif.ClusteredInfluenceEstimator` cache, and predict
KFold(50) *and* KFold(100) cross-validation from it, with no retraining.
Then run real ``cross_validate`` on a few of the same folds to compare.
"""

# %%
# A trained skorch net
# --------------------
# The optimizer's weight decay is the L2 coefficient of the training
# objective; the influence ``damping`` should equal it. The module is given
# as a class, so that every fit (the real CV below, through ``clone``)
# builds fresh weights: with a module *instance*, ``clone`` copies the
# trained weights and real CV would start from them.
import time

import numpy as np
import pandas as pd
import torch
from sklearn.base import clone
from sklearn.datasets import load_digits
from sklearn.metrics import log_loss, make_scorer
from sklearn.model_selection import KFold, cross_validate
from skorch import NeuralNetClassifier

from sklearn_cif import ClusteredInfluenceEstimator, InfluenceCV

LAM = 1e-3
X, y = load_digits(return_X_y=True)
X = (X / 16.0).astype(np.float32)


class MLP(torch.nn.Sequential):
    def __init__(self):
        super().__init__(
            torch.nn.Linear(64, 32),
            torch.nn.Tanh(),
            torch.nn.Linear(32, 10),
            torch.nn.Softmax(-1),
        )


torch.manual_seed(0)
net = NeuralNetClassifier(
    MLP,
    max_epochs=60,
    lr=0.01,
    optimizer=torch.optim.Adam,
    optimizer__weight_decay=LAM,
    batch_size=128,
    train_split=None,
    verbose=0,
).fit(X, y)

# %%
# One cache, two CV schemes
# -------------------------
cif = ClusteredInfluenceEstimator(50, damping=LAM, random_state=0, verbose=1)
start = time.perf_counter()
cv50 = InfluenceCV(
    cif,
    cv=KFold(50, shuffle=True, random_state=0),
    scoring=["accuracy", "neg_log_loss"],
).fit(net, X, y)
t50 = time.perf_counter() - start
start = time.perf_counter()
cv100 = InfluenceCV(
    cv50.estimator_,
    cv=KFold(100, shuffle=True, random_state=0),
    scoring=["accuracy", "neg_log_loss"],
).fit(net, X, y)
t100 = time.perf_counter() - start
print(
    f"KFold(50): {t50:.2f}s including the cache; KFold(100) on the same cache: {t100:.2f}s"
)
results = pd.DataFrame(cv50.cv_results_)
print(
    results[
        [
            "split",
            "n_test",
            "test_loss_in_sample",
            "delta_loss",
            "test_loss",
            "test_accuracy",
        ]
    ].head()
)
print(
    f"predicted CV accuracy K=50 {cv50.cv_results_['test_accuracy'].mean():.3f}, "
    f"K=100 {cv100.cv_results_['test_accuracy'].mean():.3f}"
)

# %%
# Real cross-validation on three of the same folds
# ------------------------------------------------
# ``cv50.splits_`` are the folds that were predicted; real CV refits the net
# from scratch on each training part.
few = cv50.splits_[:3]
start = time.perf_counter()
# log_loss needs the labels: a 36-example fold may miss a class
nll = make_scorer(
    log_loss,
    greater_is_better=False,
    response_method="predict_proba",
    labels=np.arange(10),
)
real = cross_validate(clone(net), X, y, cv=few, scoring=nll)
t_real = time.perf_counter() - start
table = pd.DataFrame(
    {
        "in-sample loss": cv50.cv_results_["test_loss_in_sample"][:3],
        "predicted held-out loss": cv50.cv_results_["test_loss"][:3],
        "real CV held-out loss": -real["test_score"],
    }
)
print(table)
print(
    f"real CV: {t_real / 3:.1f}s per fold; influence: {1e3 * t100 / 100:.2f}ms per fold"
)
