"""Independent reference computations for the tests.

Everything here is written with plain autograd on flat parameter vectors
(``torch.autograd.functional``), not with the package's vmap/jvp machinery,
so that agreement is evidence, not a tautology.
"""

import numpy as np
import torch
from torch.func import functional_call


def flat_params(module):
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


def make_f(module):
    """``f(theta_flat, x)`` for a module, via functional_call on split views."""
    names = [n for n, _ in module.named_parameters()]
    shapes = [p.shape for p in module.parameters()]
    sizes = [p.numel() for p in module.parameters()]
    buffers = dict(module.named_buffers())
    eval_module = module  # tests pass modules without dropout/batch-norm

    def f(theta, x):
        chunks = torch.split(theta, sizes)
        params = {
            n: c.reshape(s) for n, c, s in zip(names, chunks, shapes, strict=True)
        }
        return functional_call(eval_module, {**params, **buffers}, (x,))

    return f


def loop_grads(module, loss_fn, X, y):
    """Per-example gradients by one backward per example, ``(N, p)``."""
    f = make_f(module)
    theta = flat_params(module)
    rows = []
    for i in range(len(X)):
        t = theta.clone().requires_grad_(True)
        loss = loss_fn(f(t, X[i : i + 1]), y[i : i + 1]).sum()
        (g,) = torch.autograd.grad(loss, t)
        rows.append(g)
    return torch.stack(rows)


def output_terms(module, loss_fn, X, y):
    """Per-example output Jacobians ``(N, d, p)`` and loss Hessians ``(N, d, d)``."""
    f = make_f(module)
    theta = flat_params(module)
    Js, Hs = [], []
    for i in range(len(X)):
        xi, yi = X[i : i + 1], y[i : i + 1]
        z = f(theta, xi).detach()
        Js.append(
            torch.autograd.functional.jacobian(lambda t: f(t, xi).reshape(-1), theta)  # noqa: B023
        )
        Hs.append(
            torch.autograd.functional.hessian(
                lambda zz: loss_fn(zz.reshape(z.shape), yi).sum(),  # noqa: B023
                z.reshape(-1),
            )
        )
    return torch.stack(Js), torch.stack(Hs)


def dense_ggn(module, loss_fn, X, y, damping):
    """Explicit ``(1/N) sum_i J_i^T H_i J_i + lambda I`` with autograd Jacobians."""
    J, H = output_terms(module, loss_fn, X, y)
    p = J.shape[2]
    G = torch.einsum("ndp,nde,neq->pq", J, H, J)
    return G / len(X) + damping * torch.eye(p, dtype=J.dtype)


def dense_hessian(module, loss_fn, X, y, damping):
    """Explicit Hessian of ``(1/N) sum_i loss_i + (lambda/2) ||theta||^2``."""
    f = make_f(module)
    theta = flat_params(module)

    def objective(t):
        return loss_fn(f(t, X), y).mean() + 0.5 * damping * (t * t).sum()

    return torch.autograd.functional.hessian(objective, theta)


def dense_influence(module, loss_fn, X, y, damping, subsets):
    """Dense ``(1/N) (G + lambda I)^{-1} sum_{i in S} g_i`` per subset, plus g."""
    g = loop_grads(module, loss_fn, X, y)
    H = dense_ggn(module, loss_fn, X, y, damping)
    B = torch.stack([g[np.asarray(s)].sum(0) for s in subsets]) / len(X)
    return torch.linalg.solve(H, B.T).T, g, H
