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

__all__ = ["CGResult", "SpectralPreconditioner", "batched_cg", "randomized_eigh"]


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


def batched_cg(
    matmat, B, tol=1e-5, maxiter=None, precond=None, verbose_name="CG", progress=None
):
    """Solve ``A x_j = b_j`` for every row ``b_j`` of ``B`` by (preconditioned) CG.

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
    precond : callable or None
        ``R (r, p) -> M^{-1} R`` for a symmetric positive definite
        ``M ~ A`` (e.g. :class:`SpectralPreconditioner`); ``None`` is plain CG.
    progress : tqdm bar or None
        Advanced by one per iteration, showing the systems still active.

    Notes
    -----
    A column whose residual turns non-finite or whose curvature ``p^T A p``
    is not positive is a breakdown (the operator is not SPD in this
    precision) and raises :class:`FloatingPointError`, as does a residual
    growing above 1e6 times its best value. Reaching ``maxiter`` first gives a
    :class:`~sklearn.exceptions.ConvergenceWarning`.
    """
    r_cols, p = B.shape
    maxiter = 1000 if maxiter is None else int(maxiter)
    apply_m = precond if precond is not None else torch.clone
    bnorm = torch.linalg.vector_norm(B, dim=1)
    safe_bnorm = torch.where(bnorm > 0, bnorm, torch.ones_like(bnorm))
    X = torch.zeros_like(B)
    R = B.clone()
    P = apply_m(R)
    rz = (R * P).sum(1)
    n_iter = np.zeros(r_cols, dtype=np.int64)
    rel = (bnorm / safe_bnorm).cpu().numpy()
    best = rel.copy()
    active = np.flatnonzero(rel > tol)
    for _ in range(maxiter):
        if active.size == 0:
            break
        a = torch.as_tensor(active, device=B.device)
        AP = matmat(P[a])
        pAp = (P[a] * AP).sum(1)
        alpha = rz[a] / pAp
        X[a] += alpha[:, None] * P[a]
        R[a] -= alpha[:, None] * AP
        Z = apply_m(R[a])
        rz_new = (R[a] * Z).sum(1)
        P[a] = Z + (rz_new / rz[a])[:, None] * P[a]
        rz[a] = rz_new
        n_iter[active] += 1
        rel_a = (torch.linalg.vector_norm(R[a], dim=1) / safe_bnorm[a]).cpu().numpy()
        _check_breakdown(rel_a, pAp.cpu().numpy(), best[active], active, verbose_name)
        rel[active] = rel_a
        best[active] = np.minimum(best[active], rel_a)
        active = active[rel_a > tol]
        if progress is not None:
            progress.update(1)
            progress.set_postfix(active=active.size, worst=f"{rel.max():.1e}")
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


def _check_breakdown(rel, pAp, best, active, name):
    bad = ~np.isfinite(rel) | ~(pAp > 0)
    if bad.any():
        raise FloatingPointError(
            f"{name} broke down on right-hand sides {active[bad].tolist()[:10]} "
            "(non-finite values or a non-positive curvature p^T A p); the "
            "operator is not positive definite in this precision. Increase "
            "`damping` or use float64 parameters."
        )
    if np.any(rel > 1e6 * best):
        raise FloatingPointError(
            f"{name} diverged: the relative residual grew above 1e6 times its "
            "best value. Increase `damping`."
        )


class SpectralPreconditioner:
    r"""Low-rank-plus-complement approximation of :math:`A^{-1}`.

    .. math:: P = U \mathrm{diag}(1/\theta) U^\top
              + \frac{1}{\theta_\perp}(I - U U^\top)

    with ``U`` (rows) the top eigenvectors of ``A``, ``theta`` their
    eigenvalues and ``theta_perp`` the next one (an upper bound on the
    remaining spectrum). Symmetric positive definite, so usable in CG.
    """

    def __init__(self, evals, evecs, tail):
        self.evals = evals
        self.evecs = evecs
        self.tail = float(tail)

    def __call__(self, R):
        coef = R @ self.evecs.T  # (r, k)
        return R / self.tail + (coef * (1 / self.evals - 1 / self.tail)) @ self.evecs

    def quadratic_form(self, R):
        """``r^T P r`` for every row of ``R`` without forming ``P r``."""
        coef = R @ self.evecs.T
        return (R * R).sum(1) / self.tail + (
            coef**2 * (1 / self.evals - 1 / self.tail)
        ).sum(1)


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
    # Drawn in float64 row by row (the same start in any precision) without
    # a float64 copy of the whole block.
    omega = torch.stack(
        [
            torch.randn(n, generator=generator, dtype=torch.float64).to(like)
            for _ in range(k)
        ]
    )
    Q = torch.linalg.qr(omega.T).Q.T  # (k, n) orthonormal rows
    for _ in range(n_iter):
        Q = torch.linalg.qr(matmat(Q).T).Q.T
    AQ = matmat(Q)
    B = Q @ AQ.T
    evals, W = torch.linalg.eigh((B + B.T) / 2)
    order = torch.argsort(evals, descending=True)
    return evals[order], W[:, order].T @ Q
