"""Small models trained the same way across tests."""

import torch
import torch.nn.functional as F


def make_mlp(d_in, d_hidden, d_out, seed, dtype=torch.float64, softmax=False):
    torch.manual_seed(seed)
    layers = [
        torch.nn.Linear(d_in, d_hidden),
        torch.nn.Tanh(),
        torch.nn.Linear(d_hidden, d_out),
    ]
    if softmax:
        layers.append(torch.nn.Softmax(dim=-1))
    return torch.nn.Sequential(*layers).to(dtype)


def trained_mlp(X, y, hidden, weight_decay, epochs):
    """A 64-hidden-10 tanh MLP, full-batch Adam with L2 ``weight_decay``.

    Near the optimum of the regularized objective of doc/developer.rst with
    ``lambda = weight_decay``.
    """
    Xt, yt = torch.as_tensor(X), torch.as_tensor(y)
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(Xt.shape[1], hidden),
        torch.nn.Tanh(),
        torch.nn.Linear(hidden, 10),
    )
    opt = torch.optim.Adam(net.parameters(), lr=1e-2, weight_decay=weight_decay)
    for _ in range(epochs):
        opt.zero_grad()
        F.cross_entropy(net(Xt), yt).backward()
        opt.step()
    return net
