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
        The axes drawn on.
    figure_ : matplotlib Figure
        Their figure.
    lines_ : dict of str -> PathCollection
        One scatter per prediction.

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> from sklearn_cif.plotting import FoldEffectDisplay
    >>> disp = FoldEffectDisplay.from_predictions([0.1, 0.2, 0.4], [0.12, 0.18, 0.35])
    >>> sorted(disp.lines_)
    ['predicted']
    """

    def __init__(self, actual, predicted):
        self.actual = np.asarray(actual, dtype=float)
        self.predicted = {k: np.asarray(v, dtype=float) for k, v in predicted.items()}

    def plot(self, ax=None):
        """Scatter each prediction against ``actual`` with the ``y = x`` line.

        Parameters
        ----------
        ax : matplotlib Axes, default=None
            Where to draw; a new figure when ``None``.

        Returns
        -------
        display : FoldEffectDisplay
            ``self``, with ``ax_``, ``figure_`` and ``lines_``.
        """
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
        """Plot ``predicted`` (an array or a dict of arrays) against ``actual``.

        Parameters
        ----------
        actual : array-like of shape (Q,)
            Actual effects.
        predicted : array-like of shape (Q,) or dict of str -> array-like
            One prediction, or several by name.
        ax : matplotlib Axes, default=None
            Where to draw.

        Returns
        -------
        display : FoldEffectDisplay
            The plotted display.
        """
        if not isinstance(predicted, dict):
            predicted = {"predicted": predicted}
        return cls(actual, predicted).plot(ax=ax)

    @classmethod
    def from_refit(cls, result, *, ax=None):
        """Plot the result of :func:`~sklearn_cif.validation.refit_fold_effects`.

        Parameters
        ----------
        result : Bunch
            With ``actual`` and ``predicted``, as ``refit_fold_effects`` returns.
        ax : matplotlib Axes, default=None
            Where to draw.

        Returns
        -------
        display : FoldEffectDisplay
            The plotted display.
        """
        return cls(result.actual, result.predicted).plot(ax=ax)
