import numpy as np
import pytest
from scipy import stats

from sklearn_cif.metrics import agreement


def test_agreement_matches_scipy_and_has_intervals():
    # Point estimates equal scipy's; the 95% intervals bracket them.
    rng = np.random.default_rng(0)
    b = rng.normal(size=60)
    a = 2 * b + rng.normal(scale=0.5, size=60)
    r = agreement(a, b, n_bootstrap=500, random_state=0)
    assert r.spearman == pytest.approx(stats.spearmanr(a, b).statistic)
    assert r.pearson == pytest.approx(stats.pearsonr(a, b).statistic)
    assert r.kendall == pytest.approx(stats.kendalltau(a, b).statistic)
    assert r.median_ratio == pytest.approx(np.median(a / b))
    for name in ("spearman", "pearson", "kendall"):
        lo, hi = r[f"{name}_ci"]
        assert lo <= r[name] <= hi and hi - lo < 0.3


def test_agreement_rejects_mismatched_input():
    # Different lengths are named in the error.
    with pytest.raises(ValueError, match="same length"):
        agreement([1, 2, 3], [1, 2])


def test_refit_fold_effects_and_display(digits):
    # Refitting a skorch net without a fold raises that fold's held-out loss,
    # as predicted; the net itself is untouched; the Display plots it.
    skorch = pytest.importorskip("skorch")
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import torch

    from sklearn_cif import ClusteredInfluenceEstimator, PerQueryInfluence
    from sklearn_cif.plotting import FoldEffectDisplay
    from sklearn_cif.validation import refit_fold_effects

    X, y = digits
    X, y = X[:300], y[:300]
    torch.manual_seed(0)
    net = skorch.NeuralNetClassifier(
        torch.nn.Sequential(
            torch.nn.Linear(64, 16),
            torch.nn.Tanh(),
            torch.nn.Linear(16, 10),
            torch.nn.Softmax(-1),
        ),
        max_epochs=40,
        lr=0.02,
        optimizer=torch.optim.Adam,
        optimizer__weight_decay=1e-3,
        batch_size=64,
        train_split=None,
        verbose=0,
    ).fit(X, y)
    before = {k: v.clone() for k, v in net.module_.state_dict().items()}
    folds = [np.arange(i, 300, 60) for i in range(4)]
    est = {
        "cif": ClusteredInfluenceEstimator(10, damping=1e-3, random_state=0),
        "if": PerQueryInfluence(damping=1e-3),
    }
    res = refit_fold_effects(net, X, y, folds, est, epochs=10)
    assert res.actual.shape == (4,) and np.all(res.actual > 0)
    assert np.all(res.predicted["if"] > 0) and set(res.agreement) == {"cif", "if"}
    assert all(torch.equal(before[k], v) for k, v in net.module_.state_dict().items())
    disp = FoldEffectDisplay.from_refit(res)
    assert (
        set(disp.lines_) == {"cif", "if"} and disp.ax_.get_xlabel() == "actual effect"
    )
