"""Full-batch LBFGS on a regularized objective: the benchmarks' actual refits."""

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
