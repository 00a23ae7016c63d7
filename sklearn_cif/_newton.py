r"""Leave-k-out Newton step and second-order loss change, from the cache.

First-order influence predicts :math:`u = \tilde H^{-1} b` with
:math:`b = (1/N)\sum_{i\in S} g_i` and :math:`\tilde H = G + \lambda I`.
Retraining without a fold ``S`` of ``m`` examples is closer to one Newton
step on the removal objective, whose curvature lacks the fold's share:

.. math::

    d_N = (\tilde H - \tfrac1N J_S^\top H_S J_S)^{-1} b,
    \qquad
    \Delta\ell \approx \bar g^\top d_N + \tfrac12 d_N^\top G_S d_N,

``J_S`` (``m d x p``) stacking the fold's output Jacobians and ``H_S`` its
block-diagonal output Hessians. Woodbury keeps everything in the fold's
output space: with :math:`w = J_S u` and :math:`K = J_S \tilde H^{-1} J_S^\top`,

.. math::

    z = \tfrac1N H_S (I - \tfrac1N K H_S)^{-1} w,\quad
    J_S d_N = w + K z,\quad
    \bar g^\top d_N = \bar g^\top u + \tfrac Nm w^\top z .

``fit`` caches per example what ``K`` and ``w`` need: the output Jacobian in
the top-``r`` eigenbasis ``U`` of :math:`\tilde H` (``F_i = J_i U^\top``),
its Gram block ``J_i J_i^\top``, the output Hessian and gradient, and the
residual ``r_i = g_i - \mu_{c(i)}`` seen through ``U`` and ``J_i``. The
inverse curvature is :math:`U^\top D U + c (I - U^\top U)`
(``D`` the inverse top eigenvalues, ``c = 1/theta_{r+1}`` the inverse of the
first eigenvalue left out), with the
complement kept within each example (cross-example complement terms are
dropped). ``K`` is then low rank plus block diagonal, so a fold costs
``O(m (d^3 + d r^2) + r^3)``: no CG solve and no model pass per fold.
"""

import numpy as np
import torch
from torch.func import jacrev, vmap

from sklearn_cif.gradients import iter_batches

__all__ = ["MAX_OUTPUTS", "jacobian_kernel", "newton_effects"]

# Output dimension above which the d x d blocks per example are not cached.
MAX_OUTPUTS = 64


def _output_derivatives(fmodel, out, t):
    """Output gradient ``(b, d)`` and Hessian ``(b, d, d)`` of the loss."""
    b = out.shape[0]
    z = out.detach().requires_grad_(True)
    (e,) = torch.autograd.grad(fmodel.loss.value(z, t).sum(), z)
    state = fmodel.loss.hessian_state(z.detach(), t)
    d = out[0].numel()
    basis = torch.eye(d, dtype=out.dtype, device=out.device)
    basis = basis[:, None, :].expand(d, b, d).reshape(d, *out.shape)
    H = vmap(lambda u: fmodel.loss.hvp_from_state(state, z.detach(), t, u))(basis)
    return e.reshape(b, d), H.reshape(d, b, d).permute(1, 2, 0)


def _loop_jacobians(single, theta, x):
    """Per-example Jacobians one example at a time (models vmap cannot trace)."""
    rows = [jacrev(single)(theta, xi) for xi in x]
    return {name: torch.stack([r[name] for r in rows]) for name in theta}


def _jacobians(fmodel, x):
    """Per-example output Jacobians ``(b, d, p)``."""

    def single(theta, xi):
        return fmodel.forward(theta, xi[None])[0]

    if fmodel.grad_method == "loop":  # vmap cannot trace this model
        jac = _loop_jacobians(single, fmodel.theta, x)
    else:
        try:
            jac = vmap(jacrev(single), in_dims=(None, 0))(fmodel.theta, x)
        except (RuntimeError, NotImplementedError, ValueError):
            jac = _loop_jacobians(single, fmodel.theta, x)
    out_dims = next(iter(jac.values())).dim() - 1 - len(fmodel.shapes[0])
    flat = fmodel.flatten(jac, batch_dims=1 + out_dims)
    return flat.reshape(x.shape[0], -1, fmodel.n_params)


def jacobian_kernel(fmodel, labels, means, U, max_elements=2**24):
    """The per-batch kernel of the Newton-feature pass (see module doc).

    Returns ``kernel(idx, x, y) -> dict`` for
    :meth:`~sklearn_cif.passes.DataPasses.map_rows`, with per-example
    ``F`` (b, d, r), ``gram`` (b, d, d), ``hess`` (b, d, d), ``Jr`` (b, d)
    and ``Ur`` (b, r). The caller checks ``d <= MAX_OUTPUTS`` first.
    """
    lab = torch.as_tensor(labels, device=fmodel.device)

    def kernel(outer, x, t):
        out = fmodel.forward(fmodel.theta, x).detach()
        d = out[0].numel()
        e, H = _output_derivatives(fmodel, out, t)
        parts = {key: [] for key in ("F", "gram", "hess", "Jr", "Ur")}
        # Bound (examples x outputs x parameters) held at once.
        step = max(1, max_elements // (d * fmodel.n_params))
        for inner in iter_batches(x.shape[0], step):
            J = _jacobians(fmodel, x[inner])  # (b, d, p)
            g = torch.einsum("bdp,bd->bp", J, e[inner])
            idx = np.arange(outer.start, outer.stop)[inner]
            resid = g - means[lab[idx]]
            F = J @ U.T
            parts["F"].append(F)
            parts["gram"].append(J @ J.transpose(1, 2))
            parts["hess"].append(H[inner])
            parts["Jr"].append(torch.einsum("bdp,bp->bd", J, resid))
            parts["Ur"].append(resid @ U.T)
        return {key: torch.cat(val) for key, val in parts.items()}

    return kernel


def newton_effects(ind, first, w_means, n_samples, inv_evals, complement, feats):
    """Newton-step self loss change and fold output changes for CSR subsets.

    Parameters
    ----------
    ind : scipy.sparse.csr_matrix of shape (Q, N)
        Subset indicator, indices sorted within each row.
    first : ndarray of shape (Q,)
        First-order self loss change :math:`\\bar g^\\top u` of each subset.
    w_means : ndarray of shape (nnz, d)
        Cluster-mean part of :math:`J_i u` for every member (CSR order).
    n_samples : int
        ``N``.
    inv_evals : ndarray of shape (r,)
        ``D``: inverse top eigenvalues of the damped curvature.
    complement : float
        ``c``: the inverse curvature on the complement of ``U``.
    feats : dict
        Per-example features, as :meth:`CiFCache.newton_features` returns.

    Returns
    -------
    delta : ndarray of shape (Q,)
        :math:`\\bar g^\\top d_N + \\tfrac12 d_N^\\top G_S d_N`.
    out_change : ndarray of shape (nnz, d)
        :math:`J_i d_N` for every member: its predicted output change.
    """
    N, c = float(n_samples), float(complement)
    D = np.asarray(inv_evals, dtype=np.float64)
    delta = np.empty(ind.shape[0])
    out_change = np.empty_like(w_means)
    for q in range(ind.shape[0]):
        lo, hi = ind.indptr[q], ind.indptr[q + 1]
        rows = ind.indices[lo:hi]
        m = rows.size
        f64 = {k: np.asarray(v[rows], dtype=np.float64) for k, v in feats.items()}
        F, Hs = f64["F"], f64["hess"]  # (m, d, r), (m, d, d)
        # w = J_S u: exact cluster-mean part + residual part, through U for
        # all pairs and the complement within each example.
        Ur = f64["Ur"]
        own = f64["Jr"] - np.einsum("mdr,mr->md", F, Ur)
        w = w_means[lo:hi] + (F @ (D * Ur.sum(0)) + c * own) / N
        # K = F D F^T (all pairs) + c (J_i J_i^T - F_i F_i^T) (within examples).
        Bd = c * (f64["gram"] - F @ F.transpose(0, 2, 1))
        eye = np.eye(w.shape[1])
        Q = eye - Bd @ Hs / N  # block diagonal part of I - K H / N
        Qi_w = np.linalg.solve(Q, w[..., None])[..., 0]
        Qi_F = np.linalg.solve(Q, F)  # (m, d, r)
        HF = np.einsum("mij,mir->mjr", Hs, F) / N  # (H/N)^T F = (H/N) F
        T = np.einsum("mdr,mds->rs", HF, Qi_F)
        rhs = D * np.einsum("mdr,md->r", HF, Qi_w)
        y_r = np.linalg.solve(np.eye(D.size) - D[:, None] * T, rhs)
        x = Qi_w + Qi_F @ y_r
        z = np.einsum("mij,mj->mi", Hs, x) / N
        Kz = F @ (D * np.einsum("mdr,md->r", F, z)) + np.einsum("mij,mj->mi", Bd, z)
        out = w + Kz
        quad = np.einsum("mi,mij,mj->", out, Hs, out)
        delta[q] = first[q] + N / m * float((w * z).sum()) + quad / (2 * m)
        out_change[lo:hi] = out
    return delta, out_change
