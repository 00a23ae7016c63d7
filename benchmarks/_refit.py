"""Full-batch LBFGS and a damped Newton-CG polish: the benchmarks' actual refits."""

import torch


def l2(net):
    """``||theta||^2`` over every parameter."""
    return sum((p * p).sum() for p in net.parameters())


def lbfgs_minimize(
    net, objective, *, steps, max_iter, tolerance_grad, tolerance_change
):
    """Minimize ``objective(net)`` in place: ``steps`` strong-Wolfe LBFGS runs."""
    opt = torch.optim.LBFGS(
        net.parameters(),
        lr=1,
        max_iter=max_iter,
        tolerance_grad=tolerance_grad,
        tolerance_change=tolerance_change,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        loss = objective(net)
        loss.backward()
        return loss

    for _ in range(steps):
        opt.step(closure)
    return net


def newton_cg_polish(obj, theta, *, steps, cg_iter, cg_rtol, tol):
    """Damped Newton steps, (H + mu I) d = -g by CG on Hessian-vector products.

    ``obj(flat)`` is the objective of the flat parameters ``theta``. Near the
    optimum it changes by less than float64 resolves, so a line search on
    its values stalls around an inf-norm gradient of 1e-8; this uses
    gradients only: a step is taken when it shrinks ||g||, else mu (0
    first) grows (Levenberg-Marquardt), as it does on negative curvature.
    The steps stop at an inf-norm gradient below ``tol``, after ``steps``, or
    once one shrinks ||g|| by less than half (outside Newton's basin).

    Returns ``(theta, used, converging)``: the new parameters, the Newton
    steps taken and whether the last one was still in Newton's basin (or
    the gradient is below ``tol``).
    """

    def grad_fn(flat):
        flat = flat.detach().requires_grad_(True)
        return torch.autograd.grad(obj(flat), flat)[0]

    def cg(hvp, g, mu):
        d, r = torch.zeros_like(g), -g
        q, rr, stop = r.clone(), r @ r, (cg_rtol**2) * (g @ g)
        for _ in range(cg_iter):
            hq = hvp(q) + mu * q
            curv = q @ hq
            if curv <= 0:
                return None  # negative curvature: more damping
            a = rr / curv
            d, r = d + a * q, r - a * hq
            rr_new = r @ r
            if rr_new <= stop:
                break
            q, rr = r + (rr_new / rr) * q, rr_new
        return d

    g = grad_fn(theta)
    used, mu, slow = 0, 0.0, False
    while g.abs().max().item() >= tol and used < steps:
        used += 1
        leaf = theta.clone().requires_grad_(True)
        g_graph = torch.autograd.grad(obj(leaf), leaf, create_graph=True)[0]

        def hvp(v, g_graph=g_graph, leaf=leaf):  # reverse over reverse, graph kept
            return torch.autograd.grad(g_graph, leaf, v, retain_graph=True)[0]

        for _ in range(6):
            d = cg(hvp, g, mu)
            g_new = None if d is None else grad_fn(theta + d)
            if g_new is not None and g_new.norm() < g.norm():
                slow = g_new.norm() > 0.5 * g.norm()  # not in Newton's basin
                theta, g, mu = theta + d, g_new, mu / 10
                break
            mu = max(10 * mu, 1e-5)
        else:
            slow = True
        del g_graph
        if slow:
            break
    return theta, used, g.abs().max().item() < tol or not slow
