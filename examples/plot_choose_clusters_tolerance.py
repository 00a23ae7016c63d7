"""
Choosing n_clusters and cg_tol from the error bound
===================================================

:meth:`~sklearn_cif.ClusteredInfluenceEstimator.error_bound` returns the
paper's bound on the expected error of CiF's parameter change for a subset of
size ``m``, in two terms:

* ``scatter``, :math:`\\frac{1}{\\lambda N}\\sqrt{\\frac{m(N-m)}{N-1}
  \\operatorname{tr}\\bar\\Sigma}`: how far the gradients lie from their
  cluster means; it falls as ``n_clusters`` grows;
* ``solver``, :math:`\\frac{m}{\\lambda N}\\sum_c \\frac{n_c}{N}\\rho_c
  \\lVert\\mu_c\\rVert`: the conjugate-gradient residuals; it falls as
  ``cg_tol`` shrinks.

Both are known right after ``fit``, with no reference solve. Here we sweep
``n_clusters`` and ``cg_tol`` on a small MLP, and set the bound next to the
error measured against exact per-query influence
(:class:`~sklearn_cif.PerQueryInfluence` solved to ``cg_tol=1e-8``).
"""

# %%
# A small MLP trained by full-batch Adam
# --------------------------------------
# A plain :class:`torch.nn.Module` returning logits, with
# ``loss="cross_entropy"``. Adam's ``weight_decay`` adds
# :math:`\lambda\theta` to the gradient, i.e. :math:`\frac\lambda2
# \lVert\theta\rVert^2` to the objective, so ``damping`` equals it. The
# model is in float64 so that the reference solve can reach ``1e-8``.
import time

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from sklearn_cif import ClusteredInfluenceEstimator, PerQueryInfluence

torch.set_num_threads(1)
torch.manual_seed(0)
LAM = 1e-3

X_all, y_all = load_digits(return_X_y=True)
X, _, y, _ = train_test_split(
    X_all / 16.0, y_all, train_size=500, stratify=y_all, random_state=0
)
X = torch.as_tensor(X, dtype=torch.float64)
y = torch.as_tensor(y, dtype=torch.int64)
N = len(X)

model = torch.nn.Sequential(
    torch.nn.Linear(64, 32),
    torch.nn.Tanh(),
    torch.nn.Linear(32, 10),
).double()
opt = torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=LAM)
for _ in range(500):
    opt.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(X), y)
    loss.backward()
    opt.step()
with torch.no_grad():
    acc = (model(X).argmax(1) == y).double().mean().item()
print(f"N = {N}, final training loss {loss.item():.4f}, accuracy {acc:.3f}")

# %%
# The reference: exact per-query influence on random subsets
# ----------------------------------------------------------
# Twenty random subsets of size ``m = 25`` (the test folds of a KFold(20)
# would have that size), solved together by block CG to a relative residual
# of ``1e-8``.
m = 25
rng = np.random.default_rng(0)
subsets = [rng.choice(N, m, replace=False) for _ in range(20)]
start = time.perf_counter()
ref = PerQueryInfluence(
    damping=LAM, cg_tol=1e-8, loss="cross_entropy", query_mode="batched"
)
exact = ref.fit(model, X, y).param_change(subsets)
t_ref = time.perf_counter() - start
print(f"reference: {len(subsets)} solves in {t_ref:.2f} s")

# %%
# Random subsets are the hard case for clustering: their gradient sum is
# mostly the part of each gradient that its cluster mean does not capture.
# For contrast we also measure structured subsets, all the training examples
# of one digit (the same fitted reference answers them).
classes = [np.flatnonzero(y.numpy() == k) for k in range(10)]
exact_cls = ref.param_change(classes)

# %%
# Sweep ``n_clusters`` and ``cg_tol``
# -----------------------------------
# ``residual_correction="none"`` keeps the build to what ``param_change``
# uses (sketch, k-means, cluster means, block CG): the residual correction
# and the Newton features only serve the self effects of CV folds.
rows = []
TOLS = (1e-1, 1e-3, 1e-5)
for cg_tol in TOLS:
    for n_clusters in (5, 20, 50, 150, N):
        cif = ClusteredInfluenceEstimator(
            n_clusters,
            damping=LAM,
            cg_tol=cg_tol,
            loss="cross_entropy",
            residual_correction="none",
            random_state=0,
            verbose=1,
        )
        start = time.perf_counter()
        cif.fit(model, X, y)
        build = time.perf_counter() - start
        est = cif.param_change(subsets)
        err = np.linalg.norm(est - exact, axis=1)
        bound = cif.error_bound(m)
        rows.append(
            {
                "cg_tol": cg_tol,
                "n_clusters": cif.n_clusters_,
                "build_s": build,
                "cg_iters": int(cif.n_iter_.max()),
                "bound_scatter": bound.scatter,
                "bound_solver": bound.solver,
                "bound_total": bound.total,
                "measured_abs_err": err.mean(),
                "measured_rel_err": np.mean(err / np.linalg.norm(exact, axis=1)),
                "rel_err_classes": np.mean(
                    np.linalg.norm(cif.param_change(classes) - exact_cls, axis=1)
                    / np.linalg.norm(exact_cls, axis=1)
                ),
            }
        )
# ``n_clusters`` in the table is the fitted ``n_clusters_``: k-means may leave
# clusters empty, and those are dropped.
table = pd.DataFrame(rows)
pd.set_option("display.precision", 3)
pd.set_option("display.width", 120)
print(table.to_string(index=False))

# %%
# The bound against the measured error
# ------------------------------------
# Left: the two bound terms and the measured mean error
# :math:`\lVert\Delta\theta_S - \widehat{\Delta\theta}_S\rVert`, against
# ``n_clusters``. Right: the measured relative error.
fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10, 4))
for cg_tol, style in zip(TOLS, (":", "--", "-"), strict=True):
    sub = table[table.cg_tol == cg_tol]
    # the scatter term is exactly 0 at n_clusters = N: not drawn on a log axis
    ax0.plot(
        sub.n_clusters,
        sub.bound_scatter.replace(0, np.nan),
        "o" + style,
        color="C0",
        label=f"bound: scatter (cg_tol={cg_tol:g})",
    )
    ax0.plot(
        sub.n_clusters,
        sub.bound_solver,
        "s" + style,
        color="C1",
        label=f"bound: solver (cg_tol={cg_tol:g})",
    )
    ax0.plot(
        sub.n_clusters,
        sub.measured_abs_err,
        "^" + style,
        color="C2",
        label=f"measured error (cg_tol={cg_tol:g})",
    )
    ax1.plot(
        sub.n_clusters,
        sub.measured_rel_err,
        "^" + style,
        color="C2",
        label=f"random, cg_tol={cg_tol:g}",
    )
    ax1.plot(
        sub.n_clusters,
        sub.rel_err_classes,
        "v" + style,
        color="C3",
        label=f"one digit, cg_tol={cg_tol:g}",
    )
ax0.set_xscale("log")
ax0.set_yscale("log")
ax0.set_xlabel("n_clusters")
ax0.set_ylabel(f"error of param_change, m = {m}")
ax0.legend(fontsize=7)
ax1.set_xscale("log")
ax1.set_xlabel("n_clusters")
ax1.set_ylabel("measured relative error")
ax1.legend()
fig.tight_layout()

# %%
# Reading the table
# -----------------
# Computed from the run above:
ratio = table.bound_total / table.measured_abs_err
print(
    f"bound / measured error: from {ratio.min():.1f}x to {ratio.max():.1f}x "
    f"(bound above the measured error in {(ratio >= 1).sum()} of {len(ratio)} "
    "settings)"
)
for cg_tol in TOLS:
    sub = table[table.cg_tol == cg_tol]
    share = sub.bound_solver / sub.bound_total
    print(
        f"cg_tol={cg_tol:g}: solver share of the bound {share.min():.2g}-"
        f"{share.max():.2g}, CG iterations {sub.cg_iters.min()}-"
        f"{sub.cg_iters.max()}, build {sub.build_s.min():.2f}-"
        f"{sub.build_s.max():.2f} s"
    )
best = table[(table.cg_tol == 1e-5) & (table.n_clusters < N)].iloc[-1]
print(
    f"n_clusters={int(best.n_clusters)}, cg_tol=1e-5: relative error "
    f"{best.measured_rel_err:.3f} on random subsets, "
    f"{best.rel_err_classes:.4f} on whole digits"
)

# %%
# The scatter term is the one ``n_clusters`` buys down; the solver term is the
# one ``cg_tol`` buys down, at the price of more CG iterations (one data pass
# each, shared by all clusters; more clusters share a larger Krylov space and
# need fewer iterations). With one cluster per example (``n_clusters = N``)
# the scatter term is zero and CiF is per-query influence up to the solver.
#
# A rule of thumb from the bound: tighten ``cg_tol`` until the solver term is
# well below the scatter term (more is wasted), then raise ``n_clusters``
# until the scatter term is small enough, checking the measured error on a
# few per-query solves as here. The bound is an upper-bound-style rubric (it
# carries a :math:`1/\lambda` factor): compare it across settings rather than
# read it as an error bar. And the kind of subset matters: groups that the
# gradient clusters can represent (a whole class) are answered far more
# accurately than random subsets of the same size, whose parameter change is
# mostly within-cluster residual.
