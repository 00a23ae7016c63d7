"""
A plain torch CNN on digit images
=================================

Influence estimates need no skorch: a plain :class:`torch.nn.Module` with a
``loss=`` works the same way. Here a small CNN sees scikit-learn's digits as
8 x 8 images; one :class:`~sklearn_cif.ClusteredInfluenceEstimator` cache
predicts 20-fold cross-validation, and three folds are checked against
actual refits warm-started from the trained weights.
"""

# %%
# A trained CNN
# -------------
# Full-batch Adam with weight decay ``LAM``: the influence ``damping`` is the
# same L2 coefficient.
import torch
import torch.nn.functional as F
from matplotlib import pyplot as plt
from sklearn.datasets import load_digits
from sklearn.model_selection import KFold

from sklearn_cif import ClusteredInfluenceEstimator, InfluenceCV

torch.set_num_threads(1)
LAM = 1e-3
X, y = load_digits(return_X_y=True)
X = torch.as_tensor((X / 16.0).reshape(-1, 1, 8, 8), dtype=torch.float32)
y = torch.as_tensor(y)


def make_cnn():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 4 * 4, 10),
    )


def train(net, X, y, steps, lr=0.02):
    opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=LAM)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(net(X), y).backward()
        opt.step()
    return net


cnn = train(make_cnn(), X, y, 300)
with torch.no_grad():
    print(f"training accuracy {(cnn(X).argmax(1) == y).float().mean():.3f}")

# %%
# Predicted 20-fold CV from one cache
# -----------------------------------
# ``delta_loss`` is each fold's predicted held-out loss change when it is
# removed from training (``target="retrain"``: one Newton step on the removal
# objective); ``delta_loss_if`` is the first-order influence-function part.
cif = ClusteredInfluenceEstimator(
    30, loss="cross_entropy", damping=LAM, random_state=0, verbose=1
)
cv = KFold(20, shuffle=True, random_state=0)
icv = InfluenceCV(cif, cv=cv).fit(cnn, X, y)
res = icv.cv_results_
print(f"cache built in {icv.fit_time_:.1f} s; p = {icv.estimator_.n_params_}")
print(f"predicted 20-fold CV accuracy {res['test_score'].mean():.3f}")

# %%
# Three folds against actual refits
# ---------------------------------
# Each refit starts from the trained weights and runs the same optimizer
# without the fold until the loss settles; the held-out loss change is what
# cross-validation measures for that fold.
splits = list(cv.split(X))
rows = []
for k in (0, 7, 14):
    train_idx, test_idx = splits[k]
    refit = make_cnn()
    refit.load_state_dict(cnn.state_dict())
    train(refit, X[train_idx], y[train_idx], 300, lr=0.005)
    with torch.no_grad():
        before = F.cross_entropy(cnn(X[test_idx]), y[test_idx]).item()
        after = F.cross_entropy(refit(X[test_idx]), y[test_idx]).item()
    rows.append((k, after - before, res["delta_loss"][k], res["delta_loss_if"][k]))
print("fold    actual   predicted (retrain)   first order (if)")
for k, actual, pred, first in rows:
    print(f"{k:4d} {actual:9.4f} {pred:14.4f} {first:18.4f}")

# %%
# Every fold's prediction
# -----------------------
fig, ax = plt.subplots()
ax.scatter(res["delta_loss_if"], res["delta_loss"], label="all 20 folds")
actual = [r[1] for r in rows]
ax.scatter(
    [r[3] for r in rows], actual, marker="x", color="k", label="actual (3 refits)"
)
lim = [0, max(max(res["delta_loss"]), max(actual)) * 1.1]
ax.plot(lim, lim, "k--", lw=1)
ax.set_xlabel("first-order delta loss (target='if')")
ax.set_ylabel("delta loss (target='retrain') / actual")
ax.legend()
