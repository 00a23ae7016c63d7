"""Per-query influence functions: one CG solve per subset query (the reference)."""

import threading

import numpy as np
import torch
from sklearn.base import TransformerMixin
from sklearn.utils import check_random_state

from sklearn_cif._base import BaseInfluence, canonical_param, fitted_views
from sklearn_cif._cache import PerQueryFit, draw_seeds, fitted_fields
from sklearn_cif._checks import (
    check_data,
    check_solver_params,
    data_fingerprint,
    n_features,
    resolve_damping,
    resolve_fit_args,
)
from sklearn_cif._queries import FoldEffects
from sklearn_cif._subsets import subset_indicator
from sklearn_cif.curvature import check_curvature, curvature_indices, make_curvature
from sklearn_cif.gradients import output_jvp
from sklearn_cif.passes import DataPasses, n_rows
from sklearn_cif.solvers import batched_cg, block_cg

__all__ = ["PerQueryInfluence"]

# n_solves_ is a counter that concurrent queries increment.
_COUNT_LOCK = threading.Lock()


@fitted_views(PerQueryFit, fitted_fields(PerQueryFit))
class PerQueryInfluence(TransformerMixin, BaseInfluence):
    r"""Per-query influence functions: one CG solve per subset query.

    The reference and the baseline for
    :class:`~sklearn_cif.ClusteredInfluenceEstimator`: for each subset ``S``
    it solves :math:`(G + \lambda I)\,x = \frac1N \sum_{i \in S} g_i` by
    conjugate gradient. It keeps references to the model and the training
    data because every query needs passes over them.

    Parameters
    ----------
    damping : "auto", float or dict, default="auto"
        :math:`\lambda`, the training L2 coefficient, as in
        :class:`~sklearn_cif.ClusteredInfluenceEstimator`.
    cg_tol : float, default=1e-5
        Target relative residual of each CG solve.
    cg_maxiter : int or None, default=None
        CG iteration cap (``None``: 1000).
    batch_size : int, default=256
        Examples per data batch in every pass.
    loss : None, str or callable, default=None
        The per-example loss, as in
        :class:`~sklearn_cif.ClusteredInfluenceEstimator` (derived from a
        skorch net's criterion when ``None``).
    params : None or list of str, default=None
        Names of the parameters that count; all trainable ones by default.
    device : str, default="auto"
        ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
    query_mode : {"sequential", "batched"}, default="sequential"
        ``"sequential"`` solves the queries one after another (the paper's
        baseline); ``"batched"`` solves all queries of a call together by
        block CG, one data pass per iteration for all of them (memory
        ``Q x p``): the strongest per-query baseline.
    curvature_samples : int or None, default=None
        Average the curvature over this many seeded random training
        examples (the same subsample for every solve, and the same as a
        :class:`~sklearn_cif.ClusteredInfluenceEstimator` with the same
        ``random_state``). ``None``: all examples.
    curvature : str, default="ggn"
        The curvature operator by its registered name (``"ggn"``: the
        damped mean generalized Gauss-Newton matrix; ``"hessian"``: the
        damped Hessian of the training objective, positive definite only at
        a strict minimum, else CG fails and says so). The paper's baseline,
        and so the default, is the Gauss-Newton matrix;
        :func:`~sklearn_cif.metrics.fidelity_scorer` compares a CiF
        estimator with this class on the CiF's own ``curvature_``.
    random_state : int, RandomState instance or None, default=None
        Seeds the curvature subsample.
    verbose : int, default=0
        Unused; kept for a parameter set parallel to CiF's.
    model : skorch net or torch.nn.Module, default=None
        The trained model, so that scikit-learn tools can call ``fit(X, y)``.

    Attributes
    ----------
    n_samples_fit_ : int
        Training examples.
    n_params_ : int
        Parameters that count.
    n_features_in_ : int
        Features per training example.
    loss_name_ : str
        The per-example loss used.
    model_fingerprint_, data_fingerprint_ : str
        SHA-1 of the model parameters and of the training data.
    n_solves_ : int
        Right-hand sides solved so far (grows with every query).
    curvature_indices_ : ndarray or None
        The examples the curvature averages over (``None``: all).

    See Also
    --------
    ClusteredInfluenceEstimator : One cache for any number of queries.

    Examples
    --------
    >>> import torch
    >>> from sklearn_cif import PerQueryInfluence
    >>> X, y = torch.randn(40, 3), torch.randint(0, 2, (40,))
    >>> net = torch.nn.Linear(3, 2)
    >>> pq = PerQueryInfluence(loss="cross_entropy").fit(net, X, y)
    >>> pq.loss_change([[0, 1, 2], [5, 6]]).shape
    (2,)
    """

    _pinned = ("loss", "params", "curvature_samples", "random_state")
    _target_hint = " PerQueryInfluence is first-order influence only."

    def __init__(
        self,
        *,
        damping="auto",
        cg_tol=1e-5,
        cg_maxiter=None,
        batch_size=256,
        loss=None,
        params=None,
        device="auto",
        query_mode="sequential",
        curvature_samples=None,
        curvature="ggn",
        random_state=None,
        verbose=0,
        model=None,
    ):
        self.damping = damping
        self.cg_tol = cg_tol
        self.cg_maxiter = cg_maxiter
        self.batch_size = batch_size
        self.loss = loss
        self.params = params
        self.device = device
        self.query_mode = query_mode
        self.curvature_samples = curvature_samples
        self.curvature = curvature
        self.random_state = random_state
        self.verbose = verbose
        self.model = model

    def fit(self, model, X=None, y=None):
        """Validate and hold the model and training data for later solves.

        Parameters
        ----------
        model : skorch net or torch.nn.Module
            The trained model (may be omitted when ``model=`` is set).
        X, y : array-like or tensors
            The training data.

        Returns
        -------
        self : PerQueryInfluence
            The fitted estimator.
        """
        model, X, y = resolve_fit_args(self.model, model, X, y)
        X, y = check_data(X, y)
        pinned = self._fit_snapshot()
        self._check_params()
        fmodel = self._new_fmodel(model, X, y)
        seeds = draw_seeds(check_random_state(self.random_state))
        n = n_rows(y, "y")
        state = PerQueryFit(
            curvature_indices=curvature_indices(
                n, self.curvature_samples, seeds.curvature
            ),
            loss_name=fmodel.loss.name,
            n_samples_fit=n,
            n_features_in=n_features(X),
            n_params=fmodel.n_params,
            model_fingerprint=fmodel.fingerprint(),
            data_fingerprint=data_fingerprint(X, y),
            settings=self._settings_now(pinned),
            seeds=tuple(seeds),
        )
        self._install(state, model, fmodel, pinned, _data=(X, y), n_solves_=0)
        return self

    def _canonical(self, name, value):
        return canonical_param(name, value)

    def _check_params(self):
        check_solver_params(
            self.damping, self.cg_tol, self.cg_maxiter, self.batch_size,
            self.curvature_samples,
        )  # fmt: skip
        if self.query_mode not in ("sequential", "batched"):
            raise ValueError(
                f"query_mode={self.query_mode!r}; expected 'sequential' or 'batched'."
            )
        check_curvature(self.curvature)

    def fit_transform(self, model, X=None, y=None):
        """Fit, then the ``(N, N)`` influence matrix of the training data.

        Parameters
        ----------
        model : skorch net or torch.nn.Module
            As in :meth:`fit`.
        X, y : array-like or tensors
            As in :meth:`fit`.

        Returns
        -------
        influence : ndarray of shape (N, N)
            As :meth:`transform` on the training data.
        """
        self.fit(model, X, y)
        return self.transform(*self._data)

    # -- solves ---------
    def _passes(self, cache):
        """Passes over the training data and over the curvature's examples."""
        X, y = self._data
        # held by reference: an in-place edit of X or y (or a concurrent
        # refit on other data) would change answers
        if data_fingerprint(X, y) != cache.data_fingerprint:
            raise ValueError(
                "The training data X or y changed since fit (data fingerprint "
                "mismatch; PerQueryInfluence reads them at every query). Restore "
                "them or refit."
            )
        passes = DataPasses(self._get_fmodel(cache), X, y, self.batch_size)
        idx = cache.curvature_indices
        return passes, passes if idx is None else passes.subset(idx)

    def _solve(self, curv_passes, B, cache):
        lam = resolve_damping(self.damping, curv_passes.fmodel, cache.n_samples_fit)
        op = make_curvature(self.curvature, curv_passes, lam)
        kw = dict(tol=self.cg_tol, maxiter=self.cg_maxiter)
        if self.query_mode == "batched":
            sol = block_cg(op.matmat, B, **kw).x
        else:
            sol = torch.cat([batched_cg(op.matmat, b[None], **kw).x for b in B])
        with _COUNT_LOCK:
            self.n_solves_ += B.shape[0]
        return sol

    def _param_change(self, ind, cache):
        """Member gradient sums ``(Q, p)`` and the solutions ``Delta theta_S``."""
        passes, curv = self._passes(cache)
        groups = [
            ind.indices[ind.indptr[q] : ind.indptr[q + 1]] for q in range(ind.shape[0])
        ]
        sums = passes.group_sums(groups)
        return passes, sums, self._solve(curv, sums / cache.n_samples_fit, cache)

    # -- queries ---------
    def param_change(self, subsets):
        r"""Predicted :math:`\theta_{-S} - \theta` for each subset, ``(Q, p)``.

        Parameters
        ----------
        subsets : index array, list of index arrays, (N,) mask or (Q, N) 0/1 matrix
            The subsets to remove.

        Returns
        -------
        delta : ndarray of shape (Q, p)
            One CG solve per subset.
        """
        cache = self._check_fitted()
        ind = subset_indicator(subsets, cache.n_samples_fit)
        _, _, dtheta = self._param_change(ind, cache)
        return dtheta.cpu().numpy().astype(np.float64)

    def loss_change(self, subsets, X=None, y=None, *, target="auto"):
        """Predicted change of each subset's own mean loss, or of the mean on (X, y).

        Parameters
        ----------
        subsets : index array, list of index arrays, (N,) mask or (Q, N) 0/1 matrix
            The subsets to remove.
        X, y : array-like, default=None
            An evaluation set; ``None`` for each subset's own loss.
        target : {"auto", "if"}, default="auto"
            First order only: ``"retrain"`` raises.

        Returns
        -------
        delta : ndarray of shape (Q,)
            Positive means removal raises the loss.
        """
        cache = self._check_fitted()
        self._resolve_target(target, cache)
        ind = subset_indicator(subsets, cache.n_samples_fit)
        if X is None and y is None:
            _, sums, dtheta = self._param_change(ind, cache)
            m = torch.as_tensor(
                np.diff(ind.indptr), dtype=sums.dtype, device=sums.device
            )
            delta = ((sums / m[:, None]) * dtheta).sum(1)
            return delta.cpu().numpy().astype(np.float64)
        g_v = self._eval_passes(X, y, cache).mean_gradient()
        _, _, dtheta = self._param_change(ind, cache)
        return (dtheta @ g_v).cpu().numpy().astype(np.float64)

    def fold_effects(self, subsets, *, target="auto"):
        """Self effects of each subset by one solve per subset.

        Parameters
        ----------
        subsets : index array, list of index arrays, (N,) mask or (Q, N) 0/1 matrix
            The subsets to remove (CV test folds).
        target : {"auto", "if"}, default="auto"
            First order only.

        Returns
        -------
        effects : FoldEffects
            As :meth:`ClusteredInfluenceEstimator.fold_effects` returns, with
            ``target="if"`` and no correction share.
        """
        cache = self._check_fitted()
        target = self._resolve_target(target, cache)
        ind = subset_indicator(subsets, cache.n_samples_fit)
        passes, sums, dtheta = self._param_change(ind, cache)
        m = np.diff(ind.indptr)
        mt = torch.as_tensor(m, dtype=sums.dtype, device=sums.device)
        fm = passes.fmodel
        outputs, losses = [], np.zeros(ind.shape[0])
        for q in range(ind.shape[0]):

            def kernel(idx, x, t, q=q):
                out, jv = output_jvp(fm, x, dtheta[q][None])
                b = x.shape[0]
                return {
                    "out": out.reshape(b, -1),
                    "jv": jv[0].reshape(b, -1),
                    "loss": fm.loss.value(out, t),
                }

            rows = passes.subset(ind.indices[ind.indptr[q] : ind.indptr[q + 1]])
            part = rows.map_rows(kernel, dtype=None)
            losses[q] = float(torch.as_tensor(part["loss"]).sum()) / m[q]
            outputs.append(fm.loss.linearized(part["out"], part["jv"]))
        delta = ((sums / mt[:, None]) * dtheta).sum(1).cpu().numpy()
        return FoldEffects(
            target=target,
            delta_loss=delta,
            delta_loss_if=delta,
            correction_share=np.zeros(ind.shape[0]),
            param_change_norm=torch.linalg.vector_norm(dtheta, dim=1).cpu().numpy(),
            loss_in_sample=losses,
            fold_bounds=ind.indptr.copy(),
            oof_indices=ind.indices.copy(),
            oof_outputs=np.concatenate(outputs),
        )

    def transform(self, X, y=None):
        r"""Influence of every training example on every example of (X, y), ``(n, N)``.

        Entry ``(j, i)`` is :math:`\nabla\ell(x_j)^\top H^{-1} g_i`, the
        coordinates :meth:`ClusteredInfluenceEstimator.transform` gives with
        one cluster per training example. Costs one block solve for the
        ``n`` evaluation gradients and one per-example pass over the training
        data; holds ``n x p`` numbers, so keep ``n`` small.

        Parameters
        ----------
        X : array-like or tensor of shape (n, ...)
            Inputs.
        y : array-like or tensor of shape (n, ...)
            Targets (required).

        Returns
        -------
        influence : ndarray of shape (n, N)
            Evaluation example by training example.
        """
        cache = self._check_fitted()
        rows = self._eval_passes(X, y, cache).map_rows(
            lambda idx, G, _: {"G": G}, gradients=True, dtype=None
        )
        passes, curv = self._passes(cache)
        G_eval = torch.as_tensor(rows["G"], device=passes.fmodel.device)
        W = self._solve(curv, G_eval, cache)  # (n, p): H^{-1} grad l(x_j)
        cols = passes.map_rows(lambda idx, G, _: {"c": (W @ G.T).T}, gradients=True)
        return np.ascontiguousarray(cols["c"].T)

    def get_feature_names_out(self, input_features=None):
        """Name :meth:`transform`'s columns: one per training example.

        Parameters
        ----------
        input_features : None
            Ignored (the columns are training examples, not input features).

        Returns
        -------
        names : ndarray of str of shape (N,)
            ``"train0"``, ``"train1"``, ...
        """
        cache = self._check_fitted()
        return np.array([f"train{i}" for i in range(cache.n_samples_fit)], dtype=object)

    def available_targets(self):
        """The concrete targets of self effects: first order only.

        Returns
        -------
        targets : tuple of str
            ``("if",)``.
        """
        return ("if",)
