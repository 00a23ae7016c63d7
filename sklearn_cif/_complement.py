r"""The inverse curvature outside the kept eigenbasis, example by example.

The residual correction needs each example's :math:`r_i^\top \tilde H^{-1}
r_i` (``r_i = g_i - \mu_{c(i)}``). With the top eigenpairs ``(U, \theta)``
of :math:`\tilde H = G + \lambda I` kept, it splits exactly into the kept
part :math:`\sum_k (u_k^\top r_i)^2 / \theta_k` and the complement part
:math:`r_\perp^\top \tilde H_\perp^{-1} r_\perp`, ``r_perp`` the residual
outside ``U``. Only the second needs a model.

Where the spectrum is flat (many parameters per example), an example's
own share of the curvature, :math:`\frac1N A_i^\top H_i A_i` with
:math:`A_i = J_i (I - U^\top U)` its output Jacobian outside ``U``, is the
curvature its own residual meets: a badly fit example with a large
gradient saturates, a well fit one sees the background. The model is

.. math::

    \tilde H_\perp \approx \beta I + \tfrac1N A_i^\top H_i A_i
    \quad\Rightarrow\quad
    r_\perp^\top \tilde H_\perp^{-1} r_\perp = \frac1\beta \Big(
    \|r_\perp\|^2 - a^\top S (\beta N I + S B S)^{-1} S a \Big)

(Woodbury; :math:`S = H_i^{1/2}`, :math:`B = A_i A_i^\top = J_i J_i^\top -
F_i F_i^\top`, :math:`a = A_i r_\perp = J_i r_i - F_i U r_i`: ``d x d`` per
example from the cached Newton features). Without those features (more than
``MAX_OUTPUTS`` outputs) the model is the background alone,
:math:`\|r_\perp\|^2 / \beta`. The one number ``beta``, the background
curvature, is calibrated on a few exact solves (:func:`fit_background`).
"""

import numpy as np
from scipy.optimize import brentq

from sklearn_cif.gradients import iter_batches

__all__ = ["OwnShare", "fit_background", "own_share", "own_share_blocks", "psd_sqrt"]


def psd_sqrt(H):
    """Symmetric square roots of stacked PSD matrices ``(..., d, d)``.

    Eigenvalues below zero (rounding) count as zero.
    """
    ev, Q = np.linalg.eigh(H)
    return (Q * np.sqrt(np.clip(ev, 0.0, None))[..., None, :]) @ np.swapaxes(Q, -1, -2)


class OwnShare:
    """Per-example terms of the complement model (see the module doc).

    ``rho`` (n,) is :math:`\\|r_\\perp\\|^2`; ``SBS`` (n, d, d) and ``Sa``
    (n, d) the own-share terms, or ``None`` for the background alone.
    """

    def __init__(self, rho, SBS=None, Sa=None):
        self.rho = np.clip(np.asarray(rho, dtype=np.float64), 0.0, None)
        self.SBS, self.Sa = SBS, Sa

    def take(self, idx):
        """The terms of examples ``idx``."""
        if self.SBS is None:
            return OwnShare(self.rho[idx])
        return OwnShare(self.rho[idx], self.SBS[idx], self.Sa[idx])

    def form(self, beta, n_samples):
        r""":math:`r_\perp^\top \tilde H_\perp^{-1} r_\perp` per example at ``beta``."""
        if self.SBS is None:
            return self.rho / beta
        d = self.Sa.shape[1]
        M = beta * n_samples * np.eye(d) + self.SBS
        x = np.linalg.solve(M, self.Sa[..., None])[..., 0]
        saved = np.einsum("nd,nd->n", self.Sa, x)
        # the own share only lowers the form, never below zero
        return np.clip(self.rho - saved, 0.0, None) / beta


# The Newton features the model reads.
_READS = ("F", "gram", "hess", "Jr", "Ur")


def own_share(rho, feats=None, chunk=4096):
    """The :class:`OwnShare` terms from ``||r_perp||^2`` and the Newton features.

    ``feats`` as :meth:`~sklearn_cif._cache.CiFCache.newton_features`
    returns (``F``, ``gram``, ``hess``, ``Jr``, ``Ur``), or ``None``;
    read ``chunk`` examples at a time.
    """
    if not feats:
        return OwnShare(rho)
    n, d = feats["Jr"].shape
    SBS, Sa = np.empty((n, d, d)), np.empty((n, d))
    for rows in iter_batches(n, chunk):  # float64 copies of F a chunk at a time
        f64 = {k: np.asarray(feats[k][rows], dtype=np.float64) for k in _READS}
        F = f64["F"]
        a = f64["Jr"] - np.einsum("ndr,nr->nd", F, f64["Ur"])
        B = f64["gram"] - F @ F.transpose(0, 2, 1)
        S = psd_sqrt(f64["hess"])
        SBS[rows], Sa[rows] = S @ B @ S, np.einsum("nij,nj->ni", S, a)
    return OwnShare(rho, SBS, Sa)


def own_share_blocks(B, a, S, beta, n_samples):
    r"""The model's inverse inside each example, for the Newton step.

    :math:`A_i (\beta I + A_i^\top H_i A_i / N)^{-1}` applied to
    :math:`A_i^\top` and to :math:`r_i`, by Woodbury in ``d x d``, from
    ``B = A_i A_i^\top`` (m, d, d), ``a = A_i r_i`` (m, d) and ``S =
    H_i^{1/2}``. Returns the (symmetrized) blocks and the vectors.
    """
    BS = B @ S
    M = beta * n_samples * np.eye(B.shape[1]) + S @ BS
    SB = BS.transpose(0, 2, 1)  # S B (B and S symmetric)
    K = (B - BS @ np.linalg.solve(M, SB)) / beta
    Sa = np.einsum("mij,mj->mi", S, a)
    wa = a - np.einsum("mij,mj->mi", BS, np.linalg.solve(M, Sa[..., None])[..., 0])
    return (K + K.transpose(0, 2, 1)) / 2, wa / beta


def fit_background(kept, exact, terms, n_samples, low, high):
    r"""The background curvature ``beta`` that the exact self-influences imply.

    ``beta`` in ``[low, high]`` (the damping floor and the first eigenvalue
    left out: the complement's curvature lies between them) at which the
    predicted :math:`r_i^\top \tilde H^{-1} r_i` (``kept`` plus the model)
    matches the ``exact`` ones in geometric mean: a per-example ratio is
    the error a single-example query sees, and a sum would be ruled by the
    few badly fit examples whose residuals are largest. Examples with a
    zero exact value are left out; the bound nearer the data is returned
    when no ``beta`` in range matches.
    """
    ok = np.asarray(exact) > 0
    if not ok.any():
        return float(high)
    kept, exact, terms = np.asarray(kept)[ok], np.asarray(exact)[ok], terms.take(ok)

    def log_ratio(log_beta):  # decreasing in beta
        pred = kept + terms.form(np.exp(log_beta), n_samples)
        return float(np.mean(np.log(np.maximum(pred, 1e-300) / exact)))

    lo, hi = np.log(low), np.log(high)
    if log_ratio(lo) <= 0:
        return float(low)
    if log_ratio(hi) >= 0:
        return float(high)
    return float(np.exp(brentq(log_ratio, lo, hi, xtol=1e-6)))
