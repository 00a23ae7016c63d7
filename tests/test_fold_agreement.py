"""CiF (C = 50) against per-query IF on 150 K-fold self effects (digits MLP)."""

import numpy as np
import pytest
from _models import trained_mlp
from scipy.stats import spearmanr
from sklearn.model_selection import KFold

from sklearn_cif import ClusteredInfluenceEstimator, PerQueryInfluence

LAM = 1e-3


@pytest.fixture(scope="module")
def digits_mlp(digits):
    X, y = digits
    return trained_mlp(X, y, hidden=32, weight_decay=LAM, epochs=500), X, y


@pytest.mark.slow
@pytest.mark.parametrize(
    "correction, min_rho, ratio_range",
    [
        # Plain CiF ranks folds like per-query IF but underestimates their size
        # several-fold: it drops the within-cluster self-influence terms.
        ("none", 0.6, (0.0, 0.5)),
        # The residual correction restores both (issue 5 acceptance figures).
        ("auto", 0.95, (0.8, 1.25)),
        # Only the exact cluster-mean x residual terms: better, not enough.
        ("cross", 0.6, (0.0, 0.8)),
    ],
)
def test_cif_agrees_with_per_query_on_kfold_self_effects(
    digits_mlp, correction, min_rho, ratio_range
):
    # Spearman and median ratio of CiF vs per-query self loss_change over the
    # 150 folds of KFold(50) + KFold(100).
    net, X, y = digits_mlp
    folds = {
        K: [te for _, te in KFold(K, shuffle=True, random_state=0).split(X)]
        for K in (50, 100)
    }
    kw = dict(loss="cross_entropy", damping=LAM, cg_tol=1e-5, device="cpu")
    cif = ClusteredInfluenceEstimator(
        50, random_state=0, residual_correction=correction, **kw
    ).fit(net, X, y)
    pq = PerQueryInfluence(query_mode="batched", **kw).fit(net, X, y)
    rho, ratio = {}, {}
    for K, fk in folds.items():
        a, b = cif.loss_change(fk, target="if"), pq.loss_change(fk)
        rho[K] = spearmanr(a, b).statistic
        ratio[K] = np.median(a / b)
    print(
        f"\n{correction}: Spearman K=50 {rho[50]:.3f} K=100 {rho[100]:.3f}; median "
        f"ratio CiF/IF K=50 {ratio[50]:.3f} K=100 {ratio[100]:.3f}"
    )
    assert min(rho.values()) > min_rho
    assert all(ratio_range[0] < r < ratio_range[1] for r in ratio.values())
