"""Query kernels over a fitted :class:`~sklearn_cif._cache.CiFCache`.

Every function takes the cache and validated subsets (a CSR ``(Q, N)``
indicator or :class:`~sklearn_cif._subsets.SubsetRows`) and returns arrays:
no model, no gradient, no solve. The estimator validates, resolves the
target and delegates here. :class:`FoldEffects` is the documented result of
``fold_effects``, the interface :class:`~sklearn_cif.InfluenceCV` consumes.
"""

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.utils import Bunch

from sklearn_cif import _exact_refit, _newton
from sklearn_cif.gradients import iter_batches
from sklearn_cif.losses import get_loss

__all__ = [
    "FoldEffects",
    "error_bound",
    "eval_effects",
    "eval_newton_effects",
    "fold_effects",
    "membership",
    "param_change",
    "self_effect",
]

# Above this many clusters, evaluation-set queries go through the sparse
# membership matrix instead of dense per-block cluster counts.
DENSE_COUNTS_MAX = 4096


@dataclass(frozen=True)
class FoldEffects:
    """The predicted effect of removing each of ``Q`` subsets (CV test folds).

    Attributes
    ----------
    target : str
        What ``delta_loss`` and ``oof_outputs`` predict: ``"retrain"`` or
        ``"if"`` (the resolved ``target``).
    delta_loss : ndarray of shape (Q,)
        Predicted change of each subset's own mean loss when it is removed.
    delta_loss_if : ndarray of shape (Q,)
        Its first-order (influence-function) part.
    correction_share : ndarray of shape (Q,)
        The share of ``delta_loss`` that the residual correction adds to
        plain CiF (zeros for per-query influence).
    param_change_norm : ndarray of shape (Q,)
        First-order :math:`\\|\\widehat{\\Delta\\theta}_S\\|`.
    loss_in_sample : ndarray of shape (Q,)
        Each subset's mean loss at the fitted parameters.
    fold_bounds : ndarray of shape (Q + 1,)
        Subset ``q``'s members are ``oof_indices[fold_bounds[q]:fold_bounds[q + 1]]``.
    oof_indices : ndarray of shape (nnz,)
        Member indices, sorted within each subset.
    oof_outputs : ndarray of shape (nnz, d)
        Every member's predicted model output with its subset removed.
    leverage : ndarray of shape (Q,)
        The Newton step's leverage of each subset (top eigenvalue of
        :math:`\\tfrac1N H_S^{1/2} J_S H^{-1} J_S^\\top H_S^{1/2}`; below 1
        for the exact Gauss-Newton curvature, not guaranteed with the
        Hessian); NaN where not computed (first order).
    amplification : ndarray of shape (Q,)
        How far the Newton step goes beyond first order:
        :math:`\\|J_S d_N\\| / \\|J_S u\\|` (1 for first order).
    safeguarded : ndarray of shape (Q,)
        Subsets whose Newton step was clipped or damped (leverage above
        ``MAX_LEVERAGE``) or fell back to first order (a non-finite step).
    newton_iterations : ndarray of shape (Q,)
        Newton iterations beyond the first step on the exact removal
        objective: a model whose outputs are linear in its parameters
        (``linear_outputs_``) on the dense solver is refit exactly from the
        cache (:mod:`sklearn_cif._exact_refit`); 0 otherwise.
    """

    target: str
    delta_loss: np.ndarray
    delta_loss_if: np.ndarray
    correction_share: np.ndarray
    param_change_norm: np.ndarray
    loss_in_sample: np.ndarray
    fold_bounds: np.ndarray
    oof_indices: np.ndarray
    oof_outputs: np.ndarray
    leverage: np.ndarray = None
    amplification: np.ndarray = None
    safeguarded: np.ndarray = None
    newton_iterations: np.ndarray = None

    def __post_init__(self):
        # first-order results carry no Newton diagnostics
        q = self.delta_loss.shape[0]
        defaults = {
            "leverage": np.full(q, np.nan),
            "amplification": np.ones(q),
            "safeguarded": np.zeros(q, dtype=bool),
            "newton_iterations": np.zeros(q, dtype=int),
        }
        for name, value in defaults.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)


def membership(cache, ind):
    """Counts ``m_c(S)`` as a CSR ``(Q, C)`` matrix, indices sorted."""
    n, c = cache.n_samples_fit, cache.n_clusters
    onehot = sp.csr_matrix((np.ones(n), (np.arange(n), cache.labels)), shape=(n, c))
    M = ind @ onehot
    M.sort_indices()  # a fixed summation order in M @ responses
    return M


def param_change(cache, M):
    """``(1/N) sum_c m_c(S) v_c`` for every row of the counts ``M``, ``(Q, p)``."""
    return np.asarray(M @ cache.responses.astype(np.float64)) / cache.n_samples_fit


def self_effect(cache, ind, M):
    r"""Each subset's own loss change with the residual correction, and plain CiF's.

    Per-query IF is :math:`a^\top H^{-1} a / (N m)` with
    :math:`a = \sum_{i\in S} g_i = a_\mu + b` (cluster means plus
    residuals). Plain CiF keeps :math:`a^\top H^{-1} a_\mu`. ``"cross"``
    adds :math:`a_\mu^\top H^{-1} b` exactly from the cache (``A`` and
    :math:`\mu_c^\top v_{c'}`); ``"full"`` also adds the diagonal of
    :math:`b^\top H^{-1} b`, the self-influences ``self_influence_``, or
    with every eigenpair kept (the dense solver) all of
    :math:`b^\top H^{-1} b` from the residuals in the eigenbasis: the
    self effect is then per-query IF exactly, for any clustering.
    """
    N, m = cache.n_samples_fit, np.diff(ind.indptr)
    T = np.asarray(ind @ cache.train_influence)  # (Q, C): sum_{i in S} g_i^T v_c
    kept = (M * T).sum(1)
    if cache.correction == "none":
        return kept / (N * m), kept / (N * m)
    cross = kept - np.einsum("qc,cd,qd->q", M, cache.mean_response_products, M)
    if cache.complement == 0 and cache.residual_spectral is not None:
        # every eigenpair kept (dense solver): b^T H^-1 b exactly, all pairs
        Ub = np.asarray(ind @ cache.residual_spectral.astype(np.float64))
        residual = (Ub * Ub) @ (1.0 / cache.spectrum.astype(np.float64))
    else:
        residual = np.asarray(ind @ cache.self_influence).ravel()
    return (kept + cross + residual) / (N * m), kept / (N * m)


def _member_output_changes(cache, ind, M, chunk=2**16):
    """First-order output change of every member, ``(nnz, d)``, in chunks.

    ``(1/N) sum_c m_c(S) J(x_i) v_c``; chunks keep the ``(rows, C, d)``
    temporaries bounded for many large subsets.
    """
    rows = np.repeat(np.arange(ind.shape[0]), np.diff(ind.indptr))
    members = ind.indices
    out = np.empty((members.size, cache.output_responses.shape[2]))
    for sl in iter_batches(members.size, chunk):
        out[sl] = np.einsum(
            "nc,ncd->nd", M[rows[sl]], cache.output_responses[members[sl]]
        )
    return out / cache.n_samples_fit


def _newton_step(cache, ind, first, d_out):
    """Each subset's Newton step from the cached features (``NewtonEffects``)."""
    return _newton.newton_effects(
        ind,
        first,
        d_out,
        cache.n_samples_fit,
        1.0 / cache.spectrum,
        cache.complement,
        cache.newton_features(),
        indefinite=cache.curvature == "hessian",
        background=cache.complement_curvature,
    )


def fold_effects(cache, ind, target):
    """Self effects of CSR subsets under a resolved target, as :class:`FoldEffects`."""
    N = cache.n_samples_fit
    M = np.asarray(membership(cache, ind).todense())
    m = np.diff(ind.indptr)
    gram_quad = np.einsum("qc,cd,qd->q", M, cache.response_gram, M)
    d_out = _member_output_changes(cache, ind, M)
    first, plain = self_effect(cache, ind, M)
    delta, newton = first, {}
    if target == "retrain":
        res = _newton_step(cache, ind, first, d_out)
        d_out = res.out_change
        newton = dict(
            leverage=res.leverage,
            amplification=res.amplification,
            safeguarded=res.safeguarded,
        )
        if _exact_refit.refit_applies(cache):
            steps, _, n_iter = _exact_refit.exact_steps(cache, ind)
            d_out = _member_outputs(cache, ind, steps)
            newton.update(
                amplification=_amplification(ind, d_out, res),
                safeguarded=np.zeros(ind.shape[0], dtype=bool),
                newton_iterations=n_iter,
            )
        at_outputs = outputs_loss_change(cache, ind, d_out)
        delta = res.delta
        if at_outputs is not None:
            delta = np.where(np.isfinite(at_outputs), at_outputs, res.delta)
    with np.errstate(divide="ignore", invalid="ignore"):
        share = np.where(delta != 0, 1 - plain / delta, 0.0)
    return FoldEffects(
        target=target,
        delta_loss=delta,
        delta_loss_if=first,
        correction_share=share,
        param_change_norm=np.sqrt(np.maximum(gram_quad, 0.0)) / N,
        loss_in_sample=np.asarray(ind @ cache.train_loss).ravel() / m,
        fold_bounds=ind.indptr.copy(),
        oof_indices=ind.indices.copy(),
        oof_outputs=get_loss(cache.loss_name).linearized(
            cache.train_outputs[ind.indices], d_out
        ),
        **newton,
    )


def _member_outputs(cache, ind, steps):
    """``F_i a_q`` for every member ``i`` of subset ``q``, ``(nnz, d)``."""
    rows = np.repeat(np.arange(ind.shape[0]), np.diff(ind.indptr))
    F = cache.jacobian_spectral[ind.indices].astype(np.float64)
    return np.einsum("ndr,nr->nd", F, steps[rows])


def _amplification(ind, out, res):
    """``||J_S d|| / ||J_S u||`` per subset, from the one step's ratio."""
    rows = np.repeat(np.arange(ind.shape[0]), np.diff(ind.indptr))
    norm = np.sqrt(np.bincount(rows, np.square(out).sum(1), minlength=ind.shape[0]))
    one = np.sqrt(
        np.bincount(rows, np.square(res.out_change).sum(1), minlength=ind.shape[0])
    )
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(one > 0, norm / one, 1.0)
    return res.amplification * ratio


def outputs_loss_change(cache, ind, change):
    r"""Each fold's mean loss change at its predicted outputs, ``(Q,)``, or ``None``.

    :math:`\frac1m \sum_{i \in S} \ell(f_i + \Delta_i) - \ell(f_i)` with
    :math:`\Delta_i = J_i d_N` the fold's output change
    (:meth:`OutputLoss.predicted_value`): every number of a ``cv_results_``
    row then comes from the same step, and a log-loss scorer on the
    out-of-fold outputs equals ``test_loss``. Its second-order expansion is
    the Woodbury step's model of the change; beyond it the loss itself
    speaks (a logistic regression's logits move by :math:`J d` exactly).
    ``None`` for callables (``exact_loss_change = False``: the cache holds
    their outputs flattened); a non-finite value falls back to the
    second-order model in the caller.
    """
    loss = get_loss(cache.loss_name)
    if not loss.exact_loss_change:
        return None
    Q, m = ind.shape[0], np.diff(ind.indptr)
    out = np.zeros(ind.indices.size)
    with torch.no_grad():
        for sl in iter_batches(ind.indices.size, 2**14):
            members = ind.indices[sl]
            z = torch.as_tensor(cache.train_outputs[members], dtype=torch.float64)
            t = cache.train_targets[members]
            y = loss.prepare_target(
                torch.as_tensor(t[:, 0] if t.shape[1] == 1 else t), torch.float64
            )
            delta = torch.as_tensor(change[sl], dtype=torch.float64)
            moved = loss.predicted_value(z, delta, y)
            out[sl] = (
                moved - loss.predicted_value(z, torch.zeros_like(delta), y)
            ).numpy()
    rows = np.repeat(np.arange(Q), m)
    return np.bincount(rows, out, minlength=Q) / np.maximum(m, 1)


def eval_newton_effects(cache, ind, first_eval, g_eval):
    r"""Evaluation-set loss change along each subset's Newton step, ``(Q,)``.

    :math:`\bar g_V^\top d_N = \bar g_V^\top u + \sum_{i \in S} (J_i
    \tilde H^{-1} \bar g_V)^\top z_i` (Woodbury, as the self effects), with
    :math:`J_i \tilde H^{-1} \bar g_V` read from the cached eigenbasis:
    exact with every eigenpair (dense solver); with CG only its top-``r``
    part (the complement part needs ``J_i g_V``, which the cache does not
    hold). A model with ``linear_outputs_`` on the dense solver moves by its
    exact refit (:func:`sklearn_cif._exact_refit.exact_steps`) instead:
    :math:`\bar g_V^\top u + (U \bar g_V)^\top (a^* - U u)`.
    """
    U = cache.spectral_basis.astype(np.float64)
    if _exact_refit.refit_applies(cache):
        steps, first, _ = _exact_refit.exact_steps(cache, ind)
        return first_eval + (steps - first) @ (U @ g_eval)
    M = np.asarray(membership(cache, ind).todense())
    first_self, _ = self_effect(cache, ind, M)
    res = _newton_step(cache, ind, first_self, _member_output_changes(cache, ind, M))
    coef = (U @ g_eval) / cache.spectrum.astype(np.float64)  # D U g_V
    members = ind.indices
    JHg = np.einsum(
        "ndr,r->nd", cache.jacobian_spectral[members].astype(np.float64), coef
    )
    per_member = (JHg * res.z).sum(1)
    rows = np.repeat(np.arange(ind.shape[0]), np.diff(ind.indptr))
    return first_eval + np.bincount(rows, per_member, minlength=ind.shape[0])


def eval_effects(cache, rows, alpha):
    """``(1/N) sum_c m_c(S) alpha_c`` for every subset of ``rows``, ``(Q,)``.

    Read in cache-sized blocks of integer cluster counts (no ``(Q, N)``
    matrix), or through the sparse membership for very many clusters.
    """
    if cache.n_clusters > DENSE_COUNTS_MAX:  # count blocks: mostly zeros
        M = membership(cache, rows.indicator())
        return np.asarray(M @ alpha).ravel() / cache.n_samples_fit
    out = np.empty(rows.n_rows)
    for q0, q1, counts in rows.cluster_counts(cache.labels, cache.n_clusters):
        out[q0:q1] = counts @ alpha
    return out / cache.n_samples_fit


def error_bound(cache, m):
    r"""The paper's bound terms for subsets of size ``m`` (see ``error_bound``).

    :math:`\lambda` is the smallest damping, a lower bound on the spectrum of
    the damped curvature; where it is 0 (unpenalized parameters) the dense
    solver's smallest eigenvalue takes its place, and without one the
    bound is infinite. The Hessian (``curvature_ == "hessian"``, dense) can
    lie below the damping: its smallest kept eigenvalue is used.
    """
    N = cache.n_samples_fit
    lam = cache.damping_floor
    if cache.curvature == "hessian":
        lam = 0.0
    if lam <= 0 and cache.solver == "dense" and cache.spectrum is not None:
        lam = float(cache.spectrum.min())
    if lam <= 0:
        inf = float("inf")
        return Bunch(scatter=inf, solver=inf, total=inf)
    fpc = m * (N - m) / (N - 1) if N > 1 else 0.0
    scatter = np.sqrt(fpc * cache.within_scatter) / (lam * N)
    weights = cache.cluster_sizes / N
    solver = (
        m
        / (lam * N)
        * float(np.sum(weights * cache.cg_residuals * cache.cluster_mean_norms))
    )
    return Bunch(
        scatter=float(scatter), solver=float(solver), total=float(scatter + solver)
    )
