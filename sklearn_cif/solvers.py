"""Conjugate gradient for many right-hand sides sharing one operator.

:func:`batched_cg` runs one independent CG recursion per right-hand side but
applies the operator to all still-active columns in a single ``matmat``
call, so each iteration costs one pass over the data whatever the number of
columns. Converged columns are frozen (deflated) and drop out of the
products. The solver knows nothing but the ``matmat`` protocol.
"""

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning

__all__ = ["CGResult", "batched_cg", "randomized_eigh"]


@dataclass
class CGResult:
    """Solutions and per-column diagnostics of :func:`batched_cg`.

    Attributes
    ----------
    x : torch.Tensor of shape (r, p)
        Approximate solutions.
    residuals : ndarray of shape (r,)
        Final relative residuals ``||b - A x|| / ||b||`` (recomputed, not
        recursed).
    n_iter : ndarray of shape (r,)
        Iterations each column ran.
    """

    x: torch.Tensor
    residuals: np.ndarray
    n_iter: np.ndarray


def batched_cg(matmat, B, tol=1e-5, maxiter=None, verbose_name="CG"):
    """Solve ``A x_j = b_j`` for every row ``b_j`` of ``B`` by conjugate gradient.

    Parameters
    ----------
    matmat : callable
        ``V (r, p) -> A V`` for a symmetric positive definite ``A``.
    B : torch.Tensor of shape (r, p)
        Right-hand sides.
    tol : float
        Target relative residual ``||b - A x|| / ||b||``.
    maxiter : int or None
        Iteration cap per column; ``None`` means 1000.

    Notes
    -----
    A column whose residual turns non-finite or grows by more than a factor
    1e6 over the best seen is a breakdown (the operator is not SPD or the
    arithmetic overflowed) and raises :class:`FloatingPointError`. Reaching
    ``maxiter`` first gives a :class:`~sklearn.exceptions.ConvergenceWarning`.
    """
    r_cols, p = B.shape
    maxiter = 1000 if maxiter is None else int(maxiter)
    bnorm = torch.linalg.vector_norm(B, dim=1)
    safe_bnorm = torch.where(bnorm > 0, bnorm, torch.ones_like(bnorm))
    X = torch.zeros_like(B)
    R = B.clone()
    P = R.clone()
    rs = (R * R).sum(1)
    n_iter = np.zeros(r_cols, dtype=np.int64)
    rel = (rs.sqrt() / safe_bnorm).cpu().numpy()
    best = rel.copy()
    active = np.flatnonzero(rel > tol)
    for _ in range(maxiter):
        if active.size == 0:
            break
        a = torch.as_tensor(active, device=B.device)
        AP = matmat(P[a])
        pAp = (P[a] * AP).sum(1)
        alpha = rs[a] / pAp
        X[a] += alpha[:, None] * P[a]
        R[a] -= alpha[:, None] * AP
        rs_new = (R[a] * R[a]).sum(1)
        beta = rs_new / rs[a]
        P[a] = R[a] + beta[:, None] * P[a]
        rs[a] = rs_new
        n_iter[active] += 1
        rel_a = (rs_new.sqrt() / safe_bnorm[a]).cpu().numpy()
        if not np.all(np.isfinite(rel_a)) or np.any(pAp.cpu().numpy() <= 0):
            bad = active[~np.isfinite(rel_a) | (pAp.cpu().numpy() <= 0)]
            raise FloatingPointError(
                f"{verbose_name} broke down on right-hand sides {bad.tolist()[:10]} "
                "(non-finite values or a non-positive curvature p^T A p); the "
                "operator is not positive definite in this precision. Increase "
                "`damping` or use float64 parameters."
            )
        if np.any(rel_a > 1e6 * best[active]):
            raise FloatingPointError(
                f"{verbose_name} diverged: the relative residual grew above 1e6 times "
                "its best value. Increase `damping`."
            )
        rel[active] = rel_a
        best[active] = np.minimum(best[active], rel_a)
        active = active[rel_a > tol]
    # Recompute the true residual (the recursed one drifts in float32).
    true_res = torch.linalg.vector_norm(B - matmat(X), dim=1) / safe_bnorm
    residuals = true_res.cpu().numpy().astype(np.float64)
    residuals[bnorm.cpu().numpy() == 0] = 0.0
    if active.size:
        warnings.warn(
            f"{verbose_name} stopped at maxiter={maxiter} with {active.size} of "
            f"{r_cols} systems above cg_tol={tol:g} (worst relative residual "
            f"{residuals.max():.3g}). Increase `cg_maxiter`, loosen `cg_tol` or "
            "increase `damping`.",
            ConvergenceWarning,
            stacklevel=3,
        )
    return CGResult(X, residuals, n_iter)


def randomized_eigh(
    matmat, n, rank, *, n_oversamples=10, n_iter=2, generator=None, like=None
):
    """Top eigenpairs of a symmetric PSD operator by randomized subspace iteration.

    Halko, Martinsson & Tropp (2011), Algorithm 4.4 + 5.3: ``n_iter`` power
    iterations on ``rank + n_oversamples`` seeded Gaussian vectors, each one
    ``matmat`` call, then a Rayleigh-Ritz step.

    Parameters
    ----------
    matmat : callable
        ``V (r, n) -> A V`` (rows are vectors).
    n : int
        Dimension.
    rank : int
        Eigenpairs wanted (capped at ``n``).
    generator : torch.Generator
        Seeds the starting block.
    like : torch.Tensor
        Supplies dtype and device.

    Returns
    -------
    evals : torch.Tensor of shape (k,)
        Ritz values, descending; ``k = min(rank + n_oversamples, n)``.
    evecs : torch.Tensor of shape (k, n)
        Orthonormal Ritz vectors (rows), in the same order.
    """
    k = min(rank + n_oversamples, n)
    omega = torch.randn(k, n, generator=generator, dtype=torch.float64)
    Q = torch.linalg.qr(omega.to(like).T).Q.T  # (k, n) orthonormal rows
    for _ in range(n_iter):
        Q = torch.linalg.qr(matmat(Q).T).Q.T
    AQ = matmat(Q)
    B = Q @ AQ.T
    evals, W = torch.linalg.eigh((B + B.T) / 2)
    order = torch.argsort(evals, descending=True)
    return evals[order], W[:, order].T @ Q
