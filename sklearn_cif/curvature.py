"""Curvature operators: the matrix the influence solves invert, as products.

The contract every operator keeps (the solvers and the spectrum see nothing
else):

- ``matmat(V)``: the matrix applied to the rows of ``V`` (``(r, p)`` or
  ``(p,)``), returned in the same shape;
- ``n_params`` (``p``), ``dtype``, ``device``;
- ``damping``: the ``lambda`` its matrix includes;
- ``n_products``: matrix-vector products applied so far (a block of ``r``
  vectors counts ``r``);
- optionally ``dense(progress=None)``: the whole matrix, ``(p, p)`` in
  float64, from one data pass; ``solver="dense"`` factors it (an operator
  without it is solved by conjugate gradient).

Operators are built by name through :func:`make_curvature` (the
``curvature=`` parameter); ``"ggn"``, the damped generalized Gauss-Newton
matrix :class:`DampedGGNOperator`, is the first entry; ``"hessian"``, the
damped Hessian of the training objective :class:`DampedHessianOperator`,
the second. Their data loops go
through :class:`~sklearn_cif.passes.DataPasses`.
"""

import warnings

import numpy as np
import torch
from torch.func import jvp, vjp, vmap

from sklearn_cif.exceptions import CIFWarning
from sklearn_cif.gradients import iter_batches, output_derivatives, output_jacobians

__all__ = [
    "DampedGGNOperator",
    "DampedHessianOperator",
    "curvature_indices",
    "make_curvature",
    "register_curvature",
]

_CURVATURES = {}
# Most tangent vectors traced together in one vmap call of a GGN product.
MAX_COLUMNS = 64


def register_curvature(name):
    """Class decorator: make ``curvature=name`` build this operator class.

    The class is called as ``cls(passes, damping)`` with ``passes`` a
    :class:`~sklearn_cif.passes.DataPasses` over the examples the curvature
    averages over.
    """

    def decorate(cls):
        _CURVATURES[name] = cls
        return cls

    return decorate


def check_curvature(name):
    """Raise ``ValueError`` unless ``name`` is a registered curvature."""
    if not isinstance(name, str) or name not in _CURVATURES:
        raise ValueError(
            f"curvature={name!r} is not supported; expected one of "
            f"{sorted(_CURVATURES)}."
        )


def make_curvature(name, passes, damping):
    """Build the operator registered as ``name`` over ``passes``."""
    check_curvature(name)
    return _CURVATURES[name](passes, damping)


def curvature_indices(n_samples, curvature_samples, seed):
    """The examples the curvature averages over: ``None`` (all) or a subsample.

    The same seeded subsample serves every solve of one fit, and CiF and
    :class:`~sklearn_cif.PerQueryInfluence` draw it from the same named seed.
    """
    if curvature_samples is None or curvature_samples >= n_samples:
        return None
    rng = np.random.RandomState(seed)
    return np.sort(rng.choice(n_samples, int(curvature_samples), replace=False))


@register_curvature("ggn")
class DampedGGNOperator:
    r"""The matrix :math:`(1/N) \sum_i J_i^\top H_i J_i + \lambda I` as products.

    ``J_i`` is the Jacobian of the module output for example ``i`` with
    respect to the parameters and ``H_i`` the Hessian of the loss with
    respect to that output. One primal forward and one ``vjp`` closure per
    data batch serve all ``r`` vectors of a block (``vmap`` over the
    tangents of ``jvp`` and over the cotangents of the ``vjp``).

    Parameters
    ----------
    passes : DataPasses
        Passes over the N examples the mean runs over.
    damping : float or array of shape (p,)
        :math:`\lambda`, or the diagonal :math:`\Lambda` of a per-parameter
        damping (the matrix is then :math:`G + \Lambda`).
    max_elements : int, default=2**24
        Bound on (vectors x input numbers of a batch) traced together in one
        ``vmap`` call.

    Attributes
    ----------
    n_products : int
        Number of matrix-vector products applied so far (a block of ``r``
        vectors counts ``r``).
    """

    def __init__(self, passes, damping, max_elements=2**24):
        self.passes = passes
        self.fmodel = fm = passes.fmodel
        self.n_samples = passes.n_samples
        self.n_params, self.dtype, self.device = fm.n_params, fm.dtype, fm.device
        if np.ndim(damping) == 0:
            self.damping = float(damping)
        else:
            self.damping = torch.as_tensor(damping, dtype=self.dtype).to(self.device)
        self.max_elements = int(max_elements)
        self.n_products = 0
        self._reported = False
        self._n_clipped = 0  # examples clipped in the first pass

    def _batch_ggn(self, x, y, V, count=False):
        fm = self.fmodel
        tangents = fm.unflatten(V)

        def f(theta):
            return fm.forward(theta, x)

        out, vjp_fn = vjp(f, fm.theta)
        state = fm.loss.hessian_state(out, y)
        if count:
            self._n_clipped += fm.loss.n_clipped(state)
        # J V for every tangent (vmap of jvp re-traces the forward per tangent
        # column in one batched call).
        _, JV = vmap(lambda t: jvp(f, (fm.theta,), (t,)))(tangents)
        HJV = vmap(lambda u: fm.loss.hvp_from_state(state, out, y, u))(JV)
        (JtHJV,) = vmap(vjp_fn)(HJV)
        return fm.flatten(JtHJV, batch_dims=1)

    def _report_clipping(self):
        # A callable loss whose output Hessian is not PSD is clipped (see
        # losses.CallableLoss); say so once, after the first full pass.
        clipped = self._n_clipped
        if clipped:
            warnings.warn(
                f"The loss's Hessian with respect to the model output was not "
                f"positive semi-definite for {clipped} of {self.n_samples} examples; "
                "its negative eigenvalues were clipped to 0 (Gauss-Newton).",
                CIFWarning,
                stacklevel=4,
            )

    def _column_block(self, x):
        """Tangent vectors traced together in one ``vmap`` call on batch ``x``.

        vmap over r tangents materializes r copies of the batch's
        activations: bound r x (input numbers) so that a CNN on images does
        not thrash memory (CIFAR-shaped CNN: 20 s -> 11 s per 74 vectors),
        and r itself: the 64-256-10 MLP took 7.4 ms per vector in blocks of
        64 and 11.6 ms in blocks of 128 (its rank-512 spectrum is computed
        in blocks of 128); checked afterwards on a 30-128-128-1 MLP: equal
        within noise (9.6-9.9 vs 9.9-10.5 ms); tiny models lose at most
        ~10 % by the cap.
        """
        return max(1, min(MAX_COLUMNS, self.max_elements // max(1, x.numel())))

    def _apply(self, V, batch_product):
        """``(1/N) sum_batches batch_product(x, y, V_cols, cols) + Lambda V``.

        ``V`` is ``(r, p)`` or ``(p,)``; columns go in blocks of
        :meth:`_column_block`.
        """
        single = V.dim() == 1
        V = V[None] if single else V

        def kernel(x, y, acc):
            for cols in iter_batches(V.shape[0], self._column_block(x)):
                acc[cols] += batch_product(x, y, V[cols], cols)

        acc = self.passes.accumulate(kernel, torch.zeros_like(V))
        out = acc / self.n_samples + self.damping * V
        self.n_products += V.shape[0]
        if not self._reported:
            self._reported = True
            self._report_clipping()
        return out[0] if single else out

    def matmat(self, V):
        """Apply the damped GGN to the rows of ``V`` (``(r, p)`` or ``(p,)``)."""

        def product(x, y, V_cols, cols):
            # each example counted once: first pass, first column block
            count = not self._reported and cols.start == 0
            return self._batch_ggn(x, y, V_cols, count)

        return self._apply(V, product)

    def to_dense(self):
        """The full ``p x p`` matrix by ``p`` products (tests and tiny models only)."""
        eye = torch.eye(self.n_params, dtype=self.dtype, device=self.device)
        return self.matmat(eye)

    def dense(self, progress=None):
        r"""The matrix :math:`\frac1N \sum_i J_i^\top H_i J_i + \lambda I`, in float64.

        One data pass of per-example output Jacobians ``J_i`` (``d`` rows of
        ``p``), each batch adding :math:`(J^\top)(H J)` by one matrix
        product: ``N d p^2`` multiply-adds and a ``p x p`` float64
        accumulator, against ``p`` products (``p`` passes) for
        :meth:`to_dense`.

        Parameters
        ----------
        progress : tqdm bar or None

        Returns
        -------
        A : torch.Tensor of shape (p, p)
            Symmetric, float64, on the model's device.
        """
        (A,) = self._dense_terms(progress, hessian=False)
        return A

    def _dense_terms(self, progress, hessian):
        r"""One pass: ``[G + Lambda]``, and with ``hessian`` also ``H - G``.

        ``H`` is the Hessian of the mean loss
        :math:`\frac1N \sum_i \nabla^2_\theta \ell_i`, built column block by
        column block from its products (:meth:`_batch_hessian`, ``p`` per
        batch); ``H - G`` is the part the Gauss-Newton matrix leaves out.
        """
        fm, p = self.fmodel, self.n_params
        eye = torch.eye(p, dtype=self.dtype, device=self.device) if hessian else None

        def kernel(x, y, acc):
            out = fm.forward(fm.theta, x).detach()
            _, H, clipped = output_derivatives(fm, out, y)
            if not self._reported:
                self._n_clipped += clipped
            step = max(1, self.max_elements // (H.shape[1] * p))
            for rows in iter_batches(x.shape[0], step):
                J = output_jacobians(fm, x[rows]).double()
                HJ = H[rows].double() @ J
                acc[0] += J.reshape(-1, p).T @ HJ.reshape(-1, p)
            if hessian:
                for cols in iter_batches(p, self._column_block(x)):
                    acc[1, cols] += self._batch_hessian(x, y, eye[cols]).double()

        n_terms = 2 if hessian else 1
        acc = torch.zeros(n_terms, p, p, dtype=torch.float64, device=self.device)
        acc = self.passes.accumulate(kernel, acc, progress=progress)
        terms = (acc + acc.transpose(1, 2)) / (2 * self.n_samples)
        if hessian:
            terms[1] -= terms[0]
        terms[0].diagonal().add_(
            torch.as_tensor(self.damping, dtype=torch.float64).to(terms)
        )
        self.n_products += p * n_terms
        if not self._reported:
            self._reported = True
            self._report_clipping()
        return list(terms)

    def _batch_hessian(self, x, y, V):
        r""":math:`\sum_i \nabla^2_\theta \ell_i\, v` for the rows ``v`` of ``V``.

        Forward-over-reverse products of the batch's summed loss: the full
        Hessian, whatever output Hessian the loss uses for its Gauss-Newton
        split (it is the same for a softmax written with logits or with
        probabilities).
        """
        fm = self.fmodel

        def total(theta):
            return fm.loss.value(fm.forward(theta, x), y).sum()

        grad_total = torch.func.grad(total)
        _, HV = vmap(lambda t: jvp(grad_total, (fm.theta,), (t,)))(fm.unflatten(V))
        return fm.flatten(HV, batch_dims=1)


@register_curvature("hessian")
class DampedHessianOperator(DampedGGNOperator):
    r"""The damped Hessian of the training objective, :math:`\nabla^2 J`, as products.

    :math:`\frac1N \sum_i \nabla^2_\theta \ell_i + \Lambda`: the Gauss-Newton
    matrix of :class:`DampedGGNOperator` plus what it leaves out,
    :math:`\frac1N \sum_i \sum_k (\partial \ell_i / \partial f_k)
    \nabla^2 f_{ik}` (zero for a model linear in its parameters). At a
    strict minimum of the damped objective it is positive definite and it
    is the curvature a warm-started refit sees; elsewhere it can be
    indefinite (conjugate gradient then fails and says so, the dense solver
    refuses it). ``curvature="auto"`` uses it only where the dense solver
    confirms it is positive definite.
    """

    def matmat(self, V):
        """Apply the damped Hessian to the rows of ``V`` (``(r, p)`` or ``(p,)``)."""
        return self._apply(V, lambda x, y, V_cols, _: self._batch_hessian(x, y, V_cols))

    def dense(self, progress=None):
        r"""The matrix :math:`\nabla^2 J` in float64, from one data pass.

        Returns
        -------
        A : torch.Tensor of shape (p, p)
        """
        A, R = self.dense_terms(progress)
        return A + R

    def dense_terms(self, progress=None):
        """``(G + Lambda, R)``: the damped Gauss-Newton matrix and the residual.

        Their sum is the damped Hessian; the build falls back to the first
        alone when the sum is not positive definite.
        """
        return self._dense_terms(progress, hessian=True)
