"""skorch's default classifier (softmax + NLLLoss): predicted vs real CV.

Issue 13, item 4. Two setups: digits scaled by 1/16 with a 64-32-10 tanh MLP
(KFold 10), and standardized digits with a 64-64-10 ReLU MLP (KFold 20).
Each skorch net ends in a softmax, is trained with Adam (weight decay
1e-3, 60 epochs, batch 128); the cache is ``ClusteredInfluenceEstimator(50,
damping=1e-3)``; real CV is ``cross_validate`` with the same recipe from
scratch. Prints the model's ``optimality_gap_`` and the predicted accuracy
and log loss for the default target (first order off the optimum), the
Newton step and first order, next to the real ones.

    python benchmarks/skorch_default_cv.py
"""

import time
import warnings

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import KFold, cross_validate
from sklearn.preprocessing import StandardScaler
from skorch import NeuralNetClassifier

from sklearn_cif import ClusteredInfluenceEstimator, InfluenceCV

SETUPS = {
    "digits/16, tanh 32, KFold(10)": (
        False,
        torch.nn.Tanh,
        32,
        KFold(10, shuffle=True, random_state=0),
    ),
    "standardized, ReLU 64, KFold(20)": (
        True,
        torch.nn.ReLU,
        64,
        KFold(20, shuffle=True, random_state=1),
    ),
}


def run(standardize, act, hidden, cv):
    X, y = load_digits(return_X_y=True)
    X = StandardScaler().fit_transform(X) if standardize else X / 16
    X, y = X.astype(np.float32), y.astype(np.int64)
    torch.manual_seed(0)
    module = torch.nn.Sequential(
        torch.nn.Linear(64, hidden),
        act(),
        torch.nn.Linear(hidden, 10),
        torch.nn.Softmax(-1),
    )
    net = NeuralNetClassifier(
        module,
        optimizer=torch.optim.Adam,
        lr=0.01,
        optimizer__weight_decay=1e-3,
        max_epochs=60,
        batch_size=128,
        train_split=None,
        verbose=0,
    ).fit(X, y)
    est = ClusteredInfluenceEstimator(50, damping=1e-3, random_state=0).fit(net, X, y)
    print(f"  optimality_gap_ {est.optimality_gap_:.2f}")
    scoring = ["accuracy", "neg_log_loss"]
    for target in ("auto", "retrain", "if"):
        icv = InfluenceCV(est, cv=cv, target=target, scoring=scoring).fit(net, X, y)
        r = icv.cv_results_
        print(
            f"  predicted, target={target!r} ({icv.target_}): accuracy "
            f"{r['test_accuracy'].mean():.3f}, log loss {-r['test_neg_log_loss'].mean():.3f}, "
            f"test_loss {r['test_loss'].mean():.3f}"
        )
    t0 = time.perf_counter()
    real = cross_validate(net, X, y, cv=cv, scoring=scoring)
    print(
        f"  real CV: accuracy {real['test_accuracy'].mean():.3f}, log loss "
        f"{-real['test_neg_log_loss'].mean():.3f} ({time.perf_counter() - t0:.0f} s)"
    )


if __name__ == "__main__":
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    for name, setup in SETUPS.items():
        print(name)
        run(*setup)
