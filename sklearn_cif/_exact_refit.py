r"""The exact refit of a model linear in its parameters, from the cache.

One Newton step (:mod:`sklearn_cif._newton`) is exact for a quadratic
objective (squared error) but not for a logistic regression on badly scaled
features: the fold's removal moves the other examples' logits, their
output Hessians change, and the step overshot real refits 1.3x on raw
digits features (``benchmarks/cv_fidelity.py``, ``lr_raw_1e-4``). When the
model's outputs, in the space where the curvature is split, move by exactly
:math:`J_i d` for a parameter change ``d`` (``linear_outputs_``: a linear or
softmax-linear model of fixed features), the cache holds the whole removal
objective, for every example, in the eigenbasis ``U`` of the damped
curvature (the dense solver keeps every eigenpair). With
:math:`d = U^\top a`, :math:`F_i = J_i U^\top` and ``s`` the eigenvalues,

.. math::

    \Phi_S(a) = \frac1N \sum_{i \notin S} [\ell_i(f_i + F_i a) - \ell_i(f_i)]
    + \tfrac12 a^\top R a - \frac1N \sum_i e_i^\top F_i a,
    \qquad R = \mathrm{diag}(s) - \frac1N \sum_i F_i^\top H_i F_i,

``e_i`` and ``H_i`` the output gradient and Hessian at the fitted outputs.
``R`` is the damping seen through ``U`` and the last term its gradient at
the optimum, so :math:`\Phi_S` is the regularized objective without ``S``
up to a constant, and its minimizer is the refit. :func:`exact_steps`
minimizes it by Newton's method with Armijo backtracking, from the one-step
answer, for a block of folds at once. Each Newton system is solved by
conjugate gradient (one independent recursion per fold) preconditioned
with the one-step curvature
:math:`\mathrm{diag}(s) - \frac1N F_S^\top H_S F_S` (Woodbury in the fold's
outputs). A product costs ``O(N d r)`` per fold, a matrix product over the
block: no model pass.
"""

import warnings

import numpy as np
import scipy.linalg
import torch
from sklearn.exceptions import ConvergenceWarning

from sklearn_cif.losses import get_loss

__all__ = ["MAX_NEWTON_ITER", "exact_steps", "refit_applies"]

# Newton iterations per fold before the step is reported unconverged.
MAX_NEWTON_ITER = 50
# A fold has converged when its Newton decrement g^T P^-1 g is below this
# fraction of its first-order energy b^T H^-1 b (step error ~1e-12 relative),
# or when the decrement stops falling below ROUNDING_RTOL (float64 floor).
DECREMENT_RTOL = 1e-24
ROUNDING_RTOL = 1e-8
# Absolute floor: a fold has converged when no example's output can be off
# by more than this (the decrement bounds |F_i (a* - a)|, module doc).
OUTPUT_ATOL = 1e-10
# Relative residual of the inner conjugate-gradient solves.
CG_RTOL = 1e-6
# Folds x examples x outputs^2 held at once (bounds the block size).
MAX_BLOCK_ELEMENTS = 2**24


def refit_applies(cache):
    """Whether the cache supports :func:`exact_steps` (see module doc)."""
    return (
        bool(cache.linear_outputs)
        and cache.curvature in ("ggn", "hessian")  # R is then the damping
        and cache.jacobian_spectral is not None
        and cache.complement == 0
        and cache.curvature_indices is None
        and get_loss(cache.loss_name).exact_loss_change
    )


class _Removal:
    """What every fold's removal objective shares (module doc)."""

    def __init__(self, cache):
        self.loss = get_loss(cache.loss_name)
        N, d, r = cache.jacobian_spectral.shape
        self.N, self.d, self.r = N, d, r
        self.F = np.asarray(cache.jacobian_spectral, dtype=np.float64)
        self.F2 = self.F.reshape(N * d, r)
        self.s = np.asarray(cache.spectrum, dtype=np.float64)
        self.H0 = np.asarray(cache.output_hessians, dtype=np.float64)
        self.f = torch.as_tensor(cache.train_outputs, dtype=torch.float64)
        t = cache.train_targets
        self.y = self.loss.prepare_target(
            torch.as_tensor(t[:, 0] if t.shape[1] == 1 else t), torch.float64
        )
        v, e, _ = self.derivatives(np.zeros((1, N, d)))
        self.v0, self.e0 = v[0], e[0]
        # max_i ||F_i D^(1/2)||^2: |F_i x| <= sqrt(kappa x^T diag(s) x)
        self.kappa = float((self.F * self.F / self.s).sum(2).max())

    def outputs(self, A):
        """Output changes ``(Q, N, d)`` of the steps ``A`` ``(Q, r)``."""
        return (self.F2 @ A.T).T.reshape(A.shape[0], self.N, self.d)

    def back(self, U):
        """:math:`\\frac1N \\sum_i F_i^\\top u_i` per fold, ``(Q, r)``."""
        return (U.reshape(U.shape[0], -1) @ self.F2) / self.N

    def derivatives(self, delta, hessians=False):
        """Loss, output gradient (and Hessian) at ``f + delta`` per fold."""
        Q = delta.shape[0]
        f = self.f.expand(Q, -1, -1).reshape(Q * self.N, self.d)
        y = self.y.expand(Q, *self.y.shape).reshape(Q * self.N, *self.y.shape[1:])
        c = torch.tensor(delta.reshape(Q * self.N, self.d), requires_grad=True)
        with torch.enable_grad():
            v = self.loss.predicted_value(f, c, y)
            (g,) = torch.autograd.grad(v.sum(), c, create_graph=hessians)
            H = None
            if hessians:
                cols = [
                    torch.autograd.grad(g[:, k].sum(), c, retain_graph=True)[0]
                    for k in range(self.d)
                ]
                H = torch.stack(cols, 1).numpy().reshape(Q, self.N, self.d, self.d)
        shape = (Q, self.N)
        return (
            v.detach().numpy().reshape(shape),
            g.detach().numpy().reshape(*shape, self.d),
            H,
        )

    def quadratic(self, A, delta):
        """:math:`a^\\top R a` per fold."""
        H0d = np.einsum("nij,qnj->qni", self.H0, delta)
        return (self.s * A * A).sum(1) - (delta * H0d).sum((1, 2)) / self.N


def _preconditioner(rem, rows):
    """``(diag(s) - F_S^T H_S F_S / N)^{-1}``, or ``1/s`` if not definite."""
    ev, Qv = np.linalg.eigh(rem.H0[rows])
    sq = (Qv * np.sqrt(np.clip(ev, 0.0, None))[:, None, :]) @ Qv.transpose(0, 2, 1)
    W = (sq @ rem.F[rows]).reshape(-1, rem.r) / np.sqrt(rem.N)  # (m d, r)
    D = 1.0 / rem.s
    try:
        if W.shape[0] <= rem.r:
            WD = W * D
            fac = scipy.linalg.cho_factor(np.eye(W.shape[0]) - WD @ W.T)
            return lambda v: D * v + WD.T @ scipy.linalg.cho_solve(fac, WD @ v)
        fac = scipy.linalg.cho_factor(np.diag(rem.s) - W.T @ W)
        return lambda v: scipy.linalg.cho_solve(fac, v)
    except np.linalg.LinAlgError:
        return lambda v: D * v


def exact_steps(cache, ind):
    """Minimize each fold's removal objective (module doc) by Newton's method.

    Parameters
    ----------
    cache : CiFCache
        With :func:`refit_applies`.
    ind : scipy.sparse.csr_matrix of shape (Q, N)
        Subset indicator.

    Returns
    -------
    steps : ndarray of shape (Q, r)
        Each fold's refit step :math:`U d` in the eigenbasis.
    first : ndarray of shape (Q, r)
        Its first-order (influence-function) step :math:`U \tilde H^{-1} b`.
    n_iter : ndarray of shape (Q,)
        Newton iterations taken from the one-step answer (0: it was exact).
    """
    rem = _Removal(cache)
    Q = ind.shape[0]
    A, first = np.zeros((Q, rem.r)), np.zeros((Q, rem.r))
    n_iter = np.zeros(Q, dtype=int)
    block = max(1, MAX_BLOCK_ELEMENTS // (rem.N * rem.d * rem.d))
    failed = 0
    for q0 in range(0, Q, block):
        q1 = min(Q, q0 + block)
        A[q0:q1], first[q0:q1], n_iter[q0:q1], ok = _block(rem, ind[q0:q1])
        failed += int((~ok).sum())
    if failed:
        warnings.warn(
            f"The exact refit of {failed} of {Q} subsets did not converge in "
            f"{MAX_NEWTON_ITER} Newton iterations; their last iterate is used.",
            ConvergenceWarning,
            stacklevel=3,
        )
    return A, first, n_iter


def _block(rem, ind):
    """Newton's method for the folds of ``ind`` together (see module doc)."""
    Q, N = ind.shape[0], rem.N
    keep = np.ones((Q, N), dtype=bool)
    for q in range(Q):
        keep[q, ind.indices[ind.indptr[q] : ind.indptr[q + 1]]] = False
    precs = [_preconditioner(rem, ~keep[q]) for q in range(Q)]

    def prec(V, folds):
        return np.stack([precs[q](v) for q, v in zip(folds, V, strict=True)])

    # gradient of Phi at 0 is -b, b the fold's mean gradient through U
    B = rem.back(np.where(keep[..., None], 0.0, rem.e0))
    energy = (B * B / rem.s).sum(1)
    A = prec(B, range(Q))  # the one-step Newton answer
    n_iter = np.zeros(Q, dtype=int)
    active = energy > 0
    last = np.full(Q, np.inf)
    while active.any():
        idx = np.flatnonzero(active)
        a, k = A[idx], keep[idx]
        delta = rem.outputs(a)
        _, e, Hk = rem.derivatives(delta, hessians=True)
        U = np.where(k[..., None], e, 0.0) - rem.e0
        U -= np.einsum("nij,qnj->qni", rem.H0, delta)
        g = rem.s * a + rem.back(U)
        dec = (g * prec(g, idx)).sum(1)
        stalled = (dec <= ROUNDING_RTOL * energy[idx]) & (dec >= last[idx] / 4)
        floor = np.maximum(DECREMENT_RTOL * energy[idx], OUTPUT_ATOL**2 / rem.kappa)
        done = (dec <= floor) | stalled
        done |= n_iter[idx] >= MAX_NEWTON_ITER
        last[idx] = dec
        active[idx[done]] = False
        live = ~done
        if not live.any():
            break
        idx, a, k, g = idx[live], a[live], k[live], g[live]
        Hk = np.where(k[..., None, None], Hk[live], 0.0) - rem.H0

        def hess(V, rows, Hk=Hk):
            W = rem.outputs(V)
            return rem.s * V + rem.back(np.einsum("qnij,qnj->qni", Hk[rows], W))

        # inexact Newton: the solve is as accurate as the iterate deserves
        rtol = np.clip(np.sqrt(dec[live] / energy[idx]), CG_RTOL, 0.1)
        step = _batched_cg(hess, -g, lambda V, rows, idx=idx: prec(V, idx[rows]), rtol)
        A[idx] = _line_search(rem, a, step, g, k, delta[live])
        n_iter[idx] += 1
    return A, B / rem.s, n_iter, n_iter < MAX_NEWTON_ITER


def _batched_cg(matmat, B, prec, rtol, maxiter=None):
    """Independent preconditioned CG for the rows of ``B`` (one system each).

    ``matmat(V, rows)`` and ``prec(V, rows)`` act on the systems ``rows``;
    a system leaves the recursion once its residual is below ``rtol`` times
    its right-hand side (per system).
    """
    X = np.zeros_like(B)
    R = B.copy()
    all_rows = np.arange(B.shape[0])
    Z = prec(R, all_rows)
    P = Z.copy()
    rz = (R * Z).sum(1)
    tol = rtol * np.linalg.norm(B, axis=1)
    for _ in range(maxiter or 10 * B.shape[1]):
        live = np.flatnonzero(np.linalg.norm(R, axis=1) > tol)
        if live.size == 0:
            break
        Pl = P[live]
        AP = matmat(Pl, live)
        pAp = (Pl * AP).sum(1)
        if np.any(pAp <= 0):  # not positive definite: stop where we are
            break
        alpha = rz[live] / pAp
        X[live] += alpha[:, None] * Pl
        R[live] -= alpha[:, None] * AP
        Z = prec(R[live], live)
        rz_new = (R[live] * Z).sum(1)
        P[live] = Z + (rz_new / rz[live])[:, None] * Pl
        rz[live] = rz_new
    return X


def _line_search(rem, A, step, g, keep, delta, max_halvings=30):
    """Armijo backtracking on each fold's removal objective.

    The outputs move linearly along the step, so a trial costs one loss
    evaluation. A fold whose decrease float64 cannot resolve takes the full
    step (it is at the minimum to rounding).
    """
    W = rem.outputs(step)
    slope = (g * step).sum(1)

    def phi(t):
        moved = delta + t[:, None, None] * W
        v, _, _ = rem.derivatives(moved)
        loss = np.where(keep, v - rem.v0, 0.0).sum(1) / rem.N
        lin = (rem.e0 * moved).sum((1, 2)) / rem.N
        return loss + rem.quadratic(A + t[:, None] * step, moved) / 2 - lin

    phi0 = phi(np.zeros(A.shape[0]))
    t = np.ones(A.shape[0])
    pending = np.ones(A.shape[0], dtype=bool)
    for _ in range(max_halvings):
        ok = phi(t) <= phi0 + 1e-4 * t * slope
        pending &= ~ok
        if not pending.any():
            break
        t = np.where(pending, t / 2, t)
    t = np.where(pending, 1.0, t)
    return A + t[:, None] * step
