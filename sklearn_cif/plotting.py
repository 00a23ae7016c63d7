"""Display objects in scikit-learn's style (matplotlib is an optional extra)."""

import numpy as np
from scipy import stats

__all__ = ["FoldEffectDisplay"]


class FoldEffectDisplay:
    """Predicted vs actual effect per fold, one scatter per predictor.

    Create it with :meth:`from_predictions` or :meth:`from_refit`; the
    constructor only stores arrays (scikit-learn's Display convention).

    Parameters
    ----------
    actual : ndarray of shape (Q,)
        Actual effects (e.g. held-out loss change after refitting).
    predicted : dict of str -> ndarray of shape (Q,)
        Predictions to compare with ``actual``.

    Attributes
    ----------
    ax_ : matplotlib Axes
    figure_ : matplotlib Figure
    lines_ : dict of str -> PathCollection
    """

    def __init__(self, actual, predicted):
        self.actual = np.asarray(actual, dtype=float)
        self.predicted = {k: np.asarray(v, dtype=float) for k, v in predicted.items()}

    def plot(self, ax=None):
        """Scatter each prediction against ``actual`` with the ``y = x`` line."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots()
        self.lines_ = {}
        for name, pred in self.predicted.items():
            rho = (
                stats.spearmanr(pred, self.actual).statistic
                if len(pred) > 2
                else np.nan
            )
            self.lines_[name] = ax.scatter(
                self.actual, pred, label=f"{name} (Spearman {rho:.2f})"
            )
        values = np.concatenate([self.actual, *self.predicted.values()])
        lo, hi = values.min(), values.max()
        ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="y = x")
        ax.set_xlabel("actual effect")
        ax.set_ylabel("predicted effect")
        ax.legend()
        self.ax_, self.figure_ = ax, ax.figure
        return self

    @classmethod
    def from_predictions(cls, actual, predicted, *, ax=None):
        """Plot ``predicted`` (an array or a dict of arrays) against ``actual``."""
        if not isinstance(predicted, dict):
            predicted = {"predicted": predicted}
        return cls(actual, predicted).plot(ax=ax)

    @classmethod
    def from_refit(cls, result, *, ax=None):
        """Plot the result of :func:`~sklearn_cif.validation.refit_fold_effects`."""
        return cls(result.actual, result.predicted).plot(ax=ax)
