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

The second-order :math:`\Delta\ell` is what :func:`newton_effects` returns;
the fold effects of a built-in loss replace it by the loss of the predicted
outputs :math:`f_i + J_i d_N` themselves
(:func:`sklearn_cif._queries.outputs_loss_change`), its exact value for a
model linear in :math:`\theta`.

``fit`` caches per example what ``K`` and ``w`` need: the output Jacobian in
the top-``r`` eigenbasis ``U`` of :math:`\tilde H` (``F_i = J_i U^\top``),
its Gram block ``J_i J_i^\top``, the output Hessian and gradient, and the
residual ``r_i = g_i - \mu_{c(i)}`` seen through ``U`` and ``J_i``. The
inverse curvature is :math:`U^\top D U` (``D`` the inverse top
eigenvalues) plus, outside ``U`` and within each example only
(cross-example complement terms are dropped), the inverse of the
background curvature ``beta`` plus the example's own share
(:mod:`sklearn_cif._complement`, as for the self-influences; without a
calibrated ``beta``, the uniform ``c = 1/theta_{r+1}``, the inverse of the
first eigenvalue left out). ``K`` is then low rank plus block diagonal, so a fold costs
``O(m (d^3 + d r^2) + r^3)``: no CG solve and no model pass per fold.
"""

from dataclasses import dataclass

import numpy as np
import torch
from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh

from sklearn_cif._complement import own_share_blocks, psd_sqrt
from sklearn_cif.gradients import (
    iter_batches,
    output_derivatives,
    output_jacobians,
    output_jvp,
)

__all__ = [
    "MAX_LEVERAGE",
    "MAX_OUTPUTS",
    "NewtonEffects",
    "jacobian_kernel",
    "newton_effects",
    "nonlinearity",
    "spectral_jvp",
]

# Output dimension above which the d x d blocks per example are not cached.
MAX_OUTPUTS = 64
# Leverage (top eigenvalue of H_S^{1/2} K H_S^{1/2} / N) above which a fold's
# Newton step is clipped: its output change grows at most 1 / (1 - 0.99) =
# 100-fold over first order. The exact Gauss-Newton curvature keeps it below
# 1; approximate curvature (a subsample, a truncated spectrum) can push it
# past 1, where the unclipped step changes sign, and so can the Hessian
# (curvature_ "hessian"): it may lie below the fold's Gauss-Newton share.
MAX_LEVERAGE = 0.99


# Numbers of the explicit Jacobians (examples x outputs x parameters) held at
# once. Small blocks stay in cache: on the issue-14 MLP (d = 10, p = 19,210)
# Jacobians and Gram blocks of 16-32 examples took 0.55-0.6x the time of 87
# (2**24) on a 2-core CPU; not measured on a GPU.
JACOBIAN_ELEMENTS = 2**22


def jacobian_kernel(
    fmodel, labels, means, U, probe=None, max_elements=JACOBIAN_ELEMENTS
):
    """The per-batch kernel of the Newton-feature pass (see module doc).

    Returns ``kernel(idx, x, y) -> dict`` for
    :meth:`~sklearn_cif.passes.DataPasses.map_rows`, with per-example
    ``F`` (b, d, r), ``gram`` (b, d, d), ``hess`` (b, d, d), ``Jr`` (b, d)
    and ``Ur`` (b, r); with a ``probe`` direction ``(p,)`` also
    ``nonlinearity`` (b,), :func:`nonlinearity` along it. The caller checks
    ``d <= MAX_OUTPUTS`` first.
    """
    lab = torch.as_tensor(labels, device=fmodel.device)
    mean_coords = means @ U.T  # (C, r): mu_c seen through U

    def kernel(outer, x, t):
        out = fmodel.forward(fmodel.theta, x).detach()
        d = out[0].numel()
        e, H, _ = output_derivatives(fmodel, out, t)
        F_all = spectral_jvp(fmodel, x, U) if _jvp_is_cheaper(fmodel, d) else None
        keys = ("F", "gram", "hess", "Jr", "Ur")
        keys += () if probe is None else ("nonlinearity",)
        parts = {key: [] for key in keys}
        # Bound (examples x outputs x parameters) held at once.
        step = max(1, max_elements // (d * fmodel.n_params))
        for inner in iter_batches(x.shape[0], step):
            J = output_jacobians(fmodel, x[inner])  # (b, d, p)
            # Row-vector products (batched matmuls): einsum copies J to
            # reduce over its middle axis, several times slower on CPU.
            g = _rows_times(e[inner], J)  # e_i^T J_i, (b, p)
            idx = np.arange(outer.start, outer.stop)[inner]
            resid = g - means[lab[idx]]
            if F_all is None:
                F, Ur = J @ U.T, resid @ U.T
            else:  # r_i U^T = e_i^T F_i - mu_c U^T, no (b, p) x (p, r) product
                F = F_all[inner]
                Ur = torch.einsum("bdr,bd->br", F, e[inner]) - mean_coords[lab[idx]]
            parts["F"].append(F)
            parts["gram"].append(J @ J.transpose(1, 2))
            parts["hess"].append(H[inner])
            parts["Jr"].append(_rows_times(resid, J.transpose(1, 2)))
            parts["Ur"].append(Ur)
            if probe is not None:
                parts["nonlinearity"].append(
                    nonlinearity(fmodel, x[inner], t[inner], out[inner], J, probe)
                )
        return {key: torch.cat(val) for key, val in parts.items()}

    return kernel


def _rows_times(a, M):
    """``a_i^T M_i`` for every ``i``: ``(b, m)`` rows times ``(b, m, n)`` blocks."""
    return torch.bmm(a[:, None, :], M)[:, 0]


# Tangents pushed forward at once by spectral_jvp (bounds its activations).
JVP_CHUNK = 64


def _jvp_is_cheaper(fmodel, d):
    """Whether ``F_i = J_i U^T`` is cheaper as forward-mode products.

    One forward-mode product per eigenvector costs about three forward
    passes, against ``d`` rows of the explicit Jacobian each multiplying
    ``U^T``: forward mode wins from ``d = 4`` outputs (measured: 2x at ``d
    = 10``). Models ``vmap`` cannot trace keep the explicit product.
    """
    return d >= 4 and fmodel.grad_method != "loop"


def spectral_jvp(fmodel, x, U):
    """``J(x_i) U^T`` for a batch, ``(b, d, r)``, by forward-mode products.

    :data:`JVP_CHUNK` rows of ``U`` at a time through
    :func:`~sklearn_cif.gradients.output_jvp`.
    """
    chunks = [
        output_jvp(fmodel, x, U[i : i + JVP_CHUNK])[1]
        for i in range(0, U.shape[0], JVP_CHUNK)
    ]
    JU = torch.cat(chunks)  # (r, b, *out)
    return JU.reshape(JU.shape[0], x.shape[0], -1).permute(1, 2, 0)


def nonlinearity(fmodel, x, t, out, J, probe):
    r"""How far the loss of a moved model departs from its linearized outputs.

    Along ``probe`` scaled so that the outputs, where the loss's curvature
    is split (:meth:`~sklearn_cif.losses.OutputLoss.linearized`: logits,
    log-probabilities), move by 1 (root mean square over the batch), per
    example
    :math:`|\ell(f + J \delta) - \ell(f(\theta + \delta))| / (1 + |\ell|)`
    with the first term :meth:`~sklearn_cif.losses.OutputLoss.predicted_value`:
    zero to rounding when the outputs are linear in the parameters in that
    space (a linear model, a softmax of one, fixed features), of order one
    otherwise.
    """
    loss = fmodel.loss
    Jv = (J @ probe).reshape(out.shape)
    base = _flat(out).detach().cpu().numpy()
    split = loss.linearized(base, _flat(Jv).detach().cpu().numpy())
    split -= loss.linearized(base, np.zeros_like(base))
    rms = float(np.sqrt(np.mean(np.square(split))))
    if not rms > 0 or not np.isfinite(rms):
        return torch.zeros(x.shape[0], dtype=out.dtype, device=out.device)
    theta = fmodel.flatten(fmodel.theta) + probe / rms
    with torch.no_grad():
        moved = fmodel.forward(fmodel.unflatten(theta), x)
        pred = loss.predicted_value(out, Jv / rms, t)
        true = loss.value(moved, t)
    return _flat(pred - true).abs().amax(1) / (1 + _flat(true).abs().amax(1))


def _flat(v):
    return v.reshape(v.shape[0], -1)


def newton_effects(
    ind,
    first,
    w_means,
    n_samples,
    inv_evals,
    complement,
    feats,
    indefinite=False,
    background=None,
):
    """Newton-step self loss change and fold output changes for CSR subsets.

    Each fold is solved in the cheaper of two exact forms: in its output
    space (``m d`` unknowns) when ``m d <= r``, else through the ``r``
    eigendirections (block diagonal plus rank ``r``). Either way the fold's
    leverage is computed, the top eigenvalue of
    :math:`\tfrac1N H_S^{1/2} K H_S^{1/2}` (below 1 for the exact
    Gauss-Newton curvature: the removal objective stays convex; the
    Hessian can exceed the fold's Gauss-Newton share less than that);
    eigenvalues above
    :data:`MAX_LEVERAGE` are clipped to it, which bounds the step's
    amplification :math:`\\|J_S d_N\\| / \\|J_S u\\|` by
    ``1 / (1 - MAX_LEVERAGE)``. With ``indefinite`` (the Hessian, whose
    removal curvature may be indefinite: leverage above 1 is then a
    direction where the quadratic model has no minimum, not an
    approximation error) an eigenvalue beyond 1 amplifies by
    :math:`1 / |1 - \\mu|` instead, the saddle-free Newton rule of Dauphin
    et al. (2014), still capped at ``1 / (1 - MAX_LEVERAGE)``. Through the
    eigendirections (no eigenvectors of that matrix, its top eigenvalue by
    Lanczos) a fold past the cap has its removed share scaled down until
    its leverage is the cap, a damped step with the same bound. A fold
    whose step is not finite falls back to first order.

    Parameters
    ----------
    ind : scipy.sparse.csr_matrix of shape (Q, N)
        Subset indicator, indices sorted within each row.
    first : ndarray of shape (Q,)
        First-order self loss change :math:`\bar g^\top u` of each subset.
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
    indefinite : bool, default=False
        The curvature may lie below the fold's Gauss-Newton share (the
        Hessian): reflect leverage above 1 instead of clipping it.
    background : float or None, default=None
        ``beta`` of the complement model (:mod:`sklearn_cif._complement`):
        within each example the complement's inverse is that of
        :math:`\beta I` plus the example's own curvature share, as for the
        self-influences, instead of the uniform ``complement``.

    Returns
    -------
    NewtonEffects
        ``delta`` (Q,), ``out_change`` (nnz, d), ``z`` (nnz, d) with
        :math:`d_N = u + \tilde H^{-1} J_S^\top z`, and per fold ``leverage``
        ``amplification`` and ``safeguarded`` (clipped or first order).
    """
    N, c = float(n_samples), float(complement)
    D = np.asarray(inv_evals, dtype=np.float64)
    Q = ind.shape[0]
    res = NewtonEffects(
        delta=np.empty(Q),
        out_change=np.empty_like(w_means),
        z=np.empty_like(w_means),
        leverage=np.full(Q, np.nan),
        amplification=np.ones(Q),
        safeguarded=np.zeros(Q, dtype=bool),
    )
    for q in range(Q):
        lo, hi = ind.indptr[q], ind.indptr[q + 1]
        rows = ind.indices[lo:hi]
        m = rows.size
        f64 = {k: np.asarray(v[rows], dtype=np.float64) for k, v in feats.items()}
        F, Hs = f64["F"], f64["hess"]  # (m, d, r), (m, d, d)
        # w = J_S u: exact cluster-mean part + residual part, through U for
        # all pairs and the complement within each example.
        Ur = f64["Ur"]
        own = f64["Jr"] - np.einsum("mdr,mr->md", F, Ur)
        B = f64["gram"] - F @ F.transpose(0, 2, 1)
        S = psd_sqrt(Hs)  # H_i^{1/2}, once per fold
        # K = F D F^T (all pairs) + the complement within each example.
        if background is None:
            Bd, own = c * B, c * own
        else:
            Bd, own = own_share_blocks(B, own, S, background, N)
        w = w_means[lo:hi] + (F @ (D * Ur.sum(0)) + own) / N
        if m * w.shape[1] <= D.size:
            out, z, lev = _output_space_step(F, S, Bd, D, w, N, indefinite)
            res.leverage[q] = lev
            res.safeguarded[q] = lev > MAX_LEVERAGE
        else:
            lev = _eigen_space_leverage(F, S, Bd, D, N)
            res.leverage[q] = lev
            res.safeguarded[q] = lev > MAX_LEVERAGE
            # past the cap: remove only the share that brings it to the cap
            share = MAX_LEVERAGE / lev if lev > MAX_LEVERAGE else 1.0
            out, z = _eigen_space_step(F, share * Hs, Bd, D, w, N)
        if not (np.all(np.isfinite(out)) and np.all(np.isfinite(z))):
            out, z = w, np.zeros_like(w)  # first order
            res.safeguarded[q] = True
        quad = np.einsum("mi,mij,mj->", out, Hs, out)
        res.delta[q] = first[q] + N / m * float((w * z).sum()) + quad / (2 * m)
        res.out_change[lo:hi] = out
        res.z[lo:hi] = z
        norm_w = np.linalg.norm(w)
        res.amplification[q] = np.linalg.norm(out) / norm_w if norm_w > 0 else 1.0
    return res


def _output_space_step(F, S, Bd, D, w, N, indefinite=False):
    r"""The fold's step in its ``m d`` output coordinates, with leverage clipping.

    With :math:`S = H_S^{1/2}` and :math:`M = S K S / N = V \mathrm{diag}(\mu)
    V^\top` (symmetric), the step satisfies
    :math:`S J_S d_N = (I - M)^{-1} S w`, i.e. each eigendirection of ``M``
    amplifies first order by :math:`1 / (1 - \mu_k)`. Eigenvalues above
    :data:`MAX_LEVERAGE` are clipped to it in both factors (``indefinite``:
    :math:`\mu > 1` is first reflected to :math:`2 - \mu`, i.e. the gain
    :math:`1 / |1 - \mu|`). Returns
    ``(J_S d_N, z, max mu)`` with :math:`z = \frac1N H_S x`,
    :math:`x = (I - K H_S / N)^{-1} w`.
    """
    m, d, r = F.shape
    Ff = F.reshape(m * d, r)
    K = ((Ff * D) @ Ff.T).reshape(m, d, m, d)
    diag = np.arange(m)
    K[diag, :, diag, :] += Bd
    K = K.reshape(m * d, m * d)
    Sb = np.zeros((m, d, m, d))
    Sb[diag, :, diag, :] = S
    Sb = Sb.reshape(m * d, m * d)
    M = Sb @ K @ Sb / N
    mu, V = np.linalg.eigh((M + M.T) / 2)
    lev = float(mu[-1]) if mu.size else 0.0
    eff = 1.0 - np.abs(1.0 - mu) if indefinite else mu
    clipped = np.minimum(eff, MAX_LEVERAGE)
    gain = clipped / (1.0 - clipped)  # mu / (1 - mu), clipped
    safe = np.abs(mu) > 1e-12
    per_mu = np.where(safe, gain / np.where(safe, mu, 1.0), 1.0 / (1.0 - clipped))
    coef = V.T @ (Sb @ w.reshape(-1))
    t = Sb @ w.reshape(-1) + V @ (gain * coef)  # S x
    out = w.reshape(-1) + K @ (Sb @ (V @ (per_mu * coef))) / N
    z = (Sb @ t / N).reshape(m, d)
    return out.reshape(m, d), z, lev


def _eigen_space_leverage(F, S, Bd, D, N):
    r"""The fold's leverage, top eigenvalue of :math:`\frac1N S K S`, by Lanczos.

    ``S = H_S^{1/2}`` per example; each product costs ``O(m d r)`` through
    the low-rank-plus-block-diagonal ``K`` (no ``m d x m d`` matrix).
    """
    m, d, _ = F.shape

    def product(v):
        Sv = np.einsum("mij,mj->mi", S, v.reshape(m, d))
        Kv = F @ (D * np.einsum("mdr,md->r", F, Sv)) + np.einsum("mij,mj->mi", Bd, Sv)
        return np.einsum("mij,mj->mi", S, Kv).ravel() / N

    op = LinearOperator((m * d, m * d), matvec=product, dtype=np.float64)
    start = np.random.default_rng(0).standard_normal(m * d)  # same answer each call
    try:
        top = eigsh(op, k=1, which="LA", tol=1e-4, v0=start, return_eigenvectors=False)
    except ArpackNoConvergence as exc:  # its best estimate, if any
        top = exc.eigenvalues if len(exc.eigenvalues) else [np.nan]
    return float(top[0])


def _eigen_space_step(F, Hs, Bd, D, w, N):
    """The fold's step through the ``r`` eigendirections (block diagonal + rank r).

    :math:`I - K H_S / N` is block diagonal (``Bd``) plus a rank-``r`` term
    (``F D F^T``); Woodbury keeps the solves at ``d x d`` and ``r x r``.
    Returns ``(J_S d_N, z)``.
    """
    eye = np.eye(w.shape[1])
    Qb = eye - Bd @ Hs / N  # block diagonal part of I - K H / N
    Qi_w = np.linalg.solve(Qb, w[..., None])[..., 0]
    Qi_F = np.linalg.solve(Qb, F)  # (m, d, r)
    HF = np.einsum("mij,mir->mjr", Hs, F) / N  # (H/N)^T F = (H/N) F
    T = np.einsum("mdr,mds->rs", HF, Qi_F)
    rhs = D * np.einsum("mdr,md->r", HF, Qi_w)
    y_r = np.linalg.solve(np.eye(D.size) - D[:, None] * T, rhs)
    x = Qi_w + Qi_F @ y_r
    z = np.einsum("mij,mj->mi", Hs, x) / N
    Kz = F @ (D * np.einsum("mdr,md->r", F, z)) + np.einsum("mij,mj->mi", Bd, z)
    return w + Kz, z


@dataclass
class NewtonEffects:
    """What :func:`newton_effects` returns (see there)."""

    delta: np.ndarray
    out_change: np.ndarray
    z: np.ndarray
    leverage: np.ndarray
    amplification: np.ndarray
    safeguarded: np.ndarray
