"""Per-batch kernels with ``torch.func``: per-example gradients, output JVPs.

``g_i = grad_theta l(f(x_i; theta), y_i)`` for a batch at once, by
``vmap(grad(.))`` over ``functional_call``; modules that ``vmap`` cannot
trace fall back to a plain per-example loop (slow but exact). The loops
over a dataset that call these kernels live in :mod:`sklearn_cif.passes`.
"""

import warnings

import numpy as np
import torch
from torch.func import grad_and_value, jacrev, jvp, vmap

from sklearn_cif.exceptions import CIFWarning

__all__ = [
    "iter_batches",
    "output_derivatives",
    "output_jacobians",
    "output_jvp",
    "per_example_grads",
    "summed_grad",
    "take",
]


def iter_batches(n, batch_size):
    """Yield ``slice`` objects covering ``range(n)`` in order."""
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


def take(A, idx):
    """Rows ``idx`` of an array, tensor or sequence."""
    if torch.is_tensor(A):
        return A[idx]
    return A[idx] if isinstance(A, np.ndarray) else np.asarray(A)[idx]


def output_jvp(fmodel, x, V):
    """Outputs ``f(x)`` and ``J(x) v_j`` (shape ``(r, b, *out)``) for rows of ``V``.

    ``vmap`` over the tangents of ``jvp``: one batched call for all ``r``.
    """

    def f(theta):
        return fmodel.forward(theta, x)

    out, JV = vmap(lambda t: jvp(f, (fmodel.theta,), (t,)))(fmodel.unflatten(V))
    return out[0], JV


def output_derivatives(fmodel, out, t):
    """The loss's output gradient ``(b, d)``, Hessian ``(b, d, d)`` and clip count.

    The count is the batch's examples whose output Hessian the loss clipped
    to be PSD (:meth:`~sklearn_cif.losses.OutputLoss.n_clipped`).
    """
    b = out.shape[0]
    z = out.detach().requires_grad_(True)
    (e,) = torch.autograd.grad(fmodel.loss.value(z, t).sum(), z)
    state = fmodel.loss.hessian_state(z.detach(), t)
    d = out[0].numel()
    basis = torch.eye(d, dtype=out.dtype, device=out.device)
    basis = basis[:, None, :].expand(d, b, d).reshape(d, *out.shape)
    H = vmap(lambda u: fmodel.loss.hvp_from_state(state, z.detach(), t, u))(basis)
    H = H.reshape(d, b, d).permute(1, 2, 0)
    return e.reshape(b, d), H, fmodel.loss.n_clipped(state)


def _loop_jacobians(single, theta, x):
    """Per-example Jacobians one example at a time (models vmap cannot trace)."""
    rows = [jacrev(single)(theta, xi) for xi in x]
    return {name: torch.stack([r[name] for r in rows]) for name in theta}


def output_jacobians(fmodel, x):
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


def _vmap_grads(fmodel, x, y):
    def single_loss(theta, xi, yi):
        return fmodel.losses(theta, xi[None], yi[None])[0]

    grads, losses = vmap(grad_and_value(single_loss), in_dims=(None, 0, 0))(
        fmodel.theta, x, y
    )
    return fmodel.flatten(grads, batch_dims=1), losses


def _loop_grads(fmodel, x, y):
    rows, losses = [], []
    for i in range(x.shape[0]):
        theta = {n: t.detach().requires_grad_(True) for n, t in fmodel.theta.items()}
        loss = fmodel.losses(theta, x[i : i + 1], y[i : i + 1])[0]
        g = torch.autograd.grad(loss, [theta[n] for n in fmodel.names])
        rows.append(torch.cat([t.reshape(-1) for t in g]))
        losses.append(loss.detach())
    return torch.stack(rows), torch.stack(losses)


def per_example_grads(fmodel, x, y, method=None):
    """Per-example gradients ``(n, p)`` and losses ``(n,)`` for one batch.

    Parameters
    ----------
    fmodel : FunctionalModel
    x, y : torch.Tensor
        A batch on ``fmodel.device``.
    method : {None, "auto", "vmap", "loop"}
        ``None`` uses the method this model last succeeded with. ``"auto"``
        tries ``vmap`` and falls back to the loop (with a
        :class:`~sklearn_cif.exceptions.CIFWarning`) when tracing fails.
    """
    method = method or fmodel.grad_method
    if method == "loop":
        return _loop_grads(fmodel, x, y)
    try:
        return _vmap_grads(fmodel, x, y)
    except (RuntimeError, NotImplementedError, ValueError) as exc:
        if method == "vmap":
            raise
        warnings.warn(
            f"vmap could not compute per-example gradients ({exc}); falling back "
            "to a per-example loop, which is much slower.",
            CIFWarning,
            stacklevel=2,
        )
        fmodel.grad_method = "loop"
        return _loop_grads(fmodel, x, y)


def summed_grad(fmodel, x, y, weights=None):
    """``sum_i w_i g_i`` over a batch by one ordinary backward pass."""
    theta = {n: t.detach().requires_grad_(True) for n, t in fmodel.theta.items()}
    losses = fmodel.losses(theta, x, y)
    total = losses.sum() if weights is None else (losses * weights).sum()
    g = torch.autograd.grad(total, [theta[n] for n in fmodel.names])
    return torch.cat([t.reshape(-1) for t in g])
