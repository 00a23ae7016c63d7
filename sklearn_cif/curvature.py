"""Damped generalized Gauss-Newton products.

:class:`DampedGGNOperator` applies

.. math:: (G + \\lambda I) V, \\qquad G = \\frac1N \\sum_i J_i^\\top H_i J_i

to a block of vectors ``V`` (shape ``(r, p)``), where ``J_i`` is the
Jacobian of the module output for example ``i`` with respect to the
parameters and ``H_i`` the Hessian of the loss with respect to that output.
One primal forward and one ``vjp`` closure per data batch serve all ``r``
vectors (``vmap`` over the tangents of ``jvp`` and over the cotangents of
the ``vjp``).
"""

import warnings

import torch
from torch.func import jvp, vjp, vmap

from sklearn_cif.exceptions import CIFWarning
from sklearn_cif.gradients import batch_tensors, iter_batches

__all__ = ["DampedGGNOperator", "output_jvp"]


def output_jvp(fmodel, x, V):
    """Outputs ``f(x)`` and ``J(x) v_j`` (shape ``(r, b, *out)``) for rows of ``V``.

    ``vmap`` over the tangents of ``jvp``: one batched call for all ``r``.
    """

    def f(theta):
        return fmodel.forward(theta, x)

    out, JV = vmap(lambda t: jvp(f, (fmodel.theta,), (t,)))(fmodel.unflatten(V))
    return out[0], JV


class DampedGGNOperator:
    r"""The matrix :math:`(1/N) \sum_i J_i^\top H_i J_i + \lambda I` as products.

    Parameters
    ----------
    fmodel : FunctionalModel
    X, y : array-like
        The N training examples the mean runs over.
    damping : float
        :math:`\lambda`.
    batch_size : int
        Examples per data batch.
    max_elements : int, default=2**24
        Bound on (vectors x input numbers of a batch) traced together in one
        ``vmap`` call.

    Attributes
    ----------
    n_products : int
        Number of matrix-vector products applied so far (a block of ``r``
        vectors counts ``r``).
    n_passes : int
        Number of passes over the data so far.
    """

    def __init__(self, fmodel, X, y, damping, batch_size, max_elements=2**24):
        self.fmodel = fmodel
        self.X, self.y = X, y
        self.n_samples = len(y)
        self.damping = float(damping)
        self.batch_size = int(batch_size)
        self.max_elements = int(max_elements)
        self.n_products = 0
        self.n_passes = 0
        if hasattr(fmodel.loss, "n_clipped_"):
            fmodel.loss.n_clipped_ = 0  # count the first pass only

    def _batch_ggn(self, x, y, V):
        fm = self.fmodel
        tangents = fm.unflatten(V)

        def f(theta):
            return fm.forward(theta, x)

        out, vjp_fn = vjp(f, fm.theta)
        state = fm.loss.hessian_state(out, y)
        # J V for every tangent (vmap of jvp re-traces the forward per tangent
        # column in one batched call).
        _, JV = vmap(lambda t: jvp(f, (fm.theta,), (t,)))(tangents)
        HJV = vmap(lambda u: fm.loss.hvp_from_state(state, out, y, u))(JV)
        (JtHJV,) = vmap(vjp_fn)(HJV)
        return fm.flatten(JtHJV, batch_dims=1)

    def _report_clipping(self):
        # A callable loss whose output Hessian is not PSD is clipped (see
        # losses.CallableLoss); say so once, after the first full pass.
        clipped = getattr(self.fmodel.loss, "n_clipped_", 0)
        if clipped:
            warnings.warn(
                f"The loss's Hessian with respect to the model output was not "
                f"positive semi-definite for {clipped} of {self.n_samples} examples; "
                "its negative eigenvalues were clipped to 0 (Gauss-Newton).",
                CIFWarning,
                stacklevel=4,
            )

    def matmat(self, V):
        """Apply the damped GGN to the rows of ``V`` (``(r, p)`` or ``(p,)``)."""
        single = V.dim() == 1
        V = V[None] if single else V
        acc = torch.zeros_like(V)
        for idx in iter_batches(self.n_samples, self.batch_size):
            x, y = batch_tensors(self.fmodel, self.X, self.y, idx)
            # vmap over r tangents materializes r copies of the batch's
            # activations: bound r x (input numbers) so that a CNN on images
            # does not thrash memory (CIFAR-shaped CNN: 20 s -> 11 s per 74
            # vectors); a small MLP keeps all columns at once.
            block = max(1, self.max_elements // max(1, x.numel()))
            for cols in iter_batches(V.shape[0], block):
                acc[cols] += self._batch_ggn(x, y, V[cols])
        out = acc / self.n_samples + self.damping * V
        self.n_products += V.shape[0]
        self.n_passes += 1
        if self.n_passes == 1:
            self._report_clipping()
        return out[0] if single else out

    def to_dense(self):
        """The full ``p x p`` matrix (tests and tiny models only)."""
        eye = torch.eye(
            self.fmodel.n_params, dtype=self.fmodel.dtype, device=self.fmodel.device
        )
        return self.matmat(eye)
