"""Per-example losses and their Hessians with respect to the model output.

Every loss here maps a batch of model outputs ``z`` (shape ``(n, *out)``) and
targets ``y`` to per-example losses ``(n,)`` and applies the per-example
output Hessian ``H_i = d^2 l_i / dz_i^2`` to output-space vectors. The
generalized Gauss-Newton matrix ``(1/N) sum_i J_i^T H_i J_i`` is built from
these products in :mod:`sklearn_cif.curvature`.
"""

import math

import torch
import torch.nn.functional as F

__all__ = ["OutputLoss", "resolve_loss"]


class OutputLoss:
    """A per-example loss with its output Hessian-vector product.

    Subclasses implement :meth:`value` and :meth:`hvp`. ``hvp`` receives the
    outputs ``z`` and targets ``y`` of a batch and output-space tangents
    ``u`` of the same shape as ``z`` and returns ``H_i u_i`` for each example.
    """

    name = "callable"

    def prepare_target(self, y, output_dtype):
        """Convert a target batch to the dtype this loss expects."""
        return y

    def value(self, z, y):  # pragma: no cover - abstract
        raise NotImplementedError

    def hvp(self, z, y, u):  # pragma: no cover - abstract
        raise NotImplementedError

    def hessian_state(self, z, y):
        """Per-batch quantities reused across many Hessian products."""
        return None

    def hvp_from_state(self, state, z, y, u):
        return self.hvp(z, y, u)

    def __repr__(self):
        return f"{type(self).__name__}()"


def _flat_out(z):
    return z.reshape(z.shape[0], -1)


class CrossEntropyLoss(OutputLoss):
    r"""Softmax cross-entropy on logits, :math:`l = -z_y + \log\sum_k e^{z_k}`.

    Output Hessian: :math:`H = \mathrm{diag}(p) - p p^\top`, ``p = softmax(z)``.
    """

    name = "cross_entropy"

    def prepare_target(self, y, output_dtype):
        return y.long()

    def value(self, z, y):
        return F.cross_entropy(z, y, reduction="none")

    def hessian_state(self, z, y):
        return torch.softmax(z.detach(), dim=-1)

    def hvp_from_state(self, p, z, y, u):
        return p * u - p * (p * u).sum(-1, keepdim=True)

    def hvp(self, z, y, u):
        return self.hvp_from_state(self.hessian_state(z, y), z, y, u)


class LogProbNLLLoss(CrossEntropyLoss):
    r"""Negative log-likelihood on log-probabilities, :math:`l = -z_y`.

    The loss is linear in ``z``, so its Hessian at the output is zero and a
    Gauss-Newton matrix split there would vanish. When ``z`` are normalized
    log-probabilities (``log_softmax``) the softmax cross-entropy on ``z``
    equals this loss, and its Hessian ``diag(p) - p p^T`` with
    ``p = exp(z)`` gives exactly the Gauss-Newton matrix split at the logits
    feeding the ``log_softmax``. That is the curvature used here.
    """

    name = "nll"

    def value(self, z, y):
        return F.nll_loss(z, y, reduction="none")


class ProbabilityNLLLoss(OutputLoss):
    r"""skorch's classifier loss on probabilities, :math:`l = -\log(p_y + \epsilon)`.

    ``NeuralNetClassifier`` with ``NLLLoss`` takes the log of the module's
    probability output (with ``eps`` the machine epsilon of the dtype).
    Output Hessian: :math:`H = e_y e_y^\top / (p_y + \epsilon)^2`.
    """

    name = "nll_proba"

    def prepare_target(self, y, output_dtype):
        return y.long()

    def value(self, z, y):
        eps = torch.finfo(z.dtype).eps
        return F.nll_loss(torch.log(z + eps), y, reduction="none")

    def hessian_state(self, z, y):
        # The Hessian is diagonal: 1/(p_y + eps)^2 at entry y, zero elsewhere.
        eps = torch.finfo(z.dtype).eps
        py = z.detach().gather(1, y[:, None]) + eps
        return F.one_hot(y, z.shape[1]).to(z.dtype) / py.square()

    def hvp_from_state(self, diag, z, y, u):
        return diag * u

    def hvp(self, z, y, u):
        return self.hvp_from_state(self.hessian_state(z, y), z, y, u)


class MSELoss(OutputLoss):
    r"""Squared error averaged over output entries, :math:`l = \frac1d \|z - y\|^2`.

    This is what ``torch.nn.MSELoss`` (and skorch's ``NeuralNetRegressor``)
    averages over a batch. Output Hessian: :math:`H = (2/d) I`.
    """

    name = "mse"

    def prepare_target(self, y, output_dtype):
        return y.to(output_dtype)

    def value(self, z, y):
        d = _flat_out(z)
        return (d - y.reshape(d.shape)).square().mean(1)

    def hvp(self, z, y, u):
        d = math.prod(z.shape[1:])
        return u * (2.0 / d)


class BCEWithLogitsLoss(OutputLoss):
    r"""Binary cross-entropy on logits, :math:`l = \log(1 + e^z) - y z`.

    Output Hessian: :math:`H = \sigma(z)(1 - \sigma(z))` (per output entry,
    averaged over entries when the output has several).
    """

    name = "bce_logits"

    def prepare_target(self, y, output_dtype):
        return y.to(output_dtype)

    def value(self, z, y):
        d = _flat_out(z)
        loss = F.binary_cross_entropy_with_logits(
            d, y.reshape(d.shape), reduction="none"
        )
        return loss.mean(1)

    def hessian_state(self, z, y):
        s = torch.sigmoid(z.detach())
        return s * (1 - s) / math.prod(z.shape[1:])

    def hvp_from_state(self, w, z, y, u):
        return w * u

    def hvp(self, z, y, u):
        return self.hvp_from_state(self.hessian_state(z, y), z, y, u)


class CallableLoss(OutputLoss):
    """A user loss ``fn(output, y) -> (n,)`` with an autograd output Hessian.

    The per-example Hessian with respect to the (flattened) output is formed
    explicitly and its negative eigenvalues are clipped to zero so that the
    Gauss-Newton matrix stays positive semi-definite.
    """

    name = "callable"

    def __init__(self, fn):
        self.fn = fn
        self.n_clipped_ = 0

    def prepare_target(self, y, output_dtype):
        return y.to(output_dtype) if y.is_floating_point() else y

    def value(self, z, y):
        out = self.fn(z, y)
        if out.shape != (z.shape[0],):
            raise ValueError(
                "The callable `loss` must return one loss per example, shape "
                f"({z.shape[0]},); got shape {tuple(out.shape)}."
            )
        return out

    def hessian_state(self, z, y):
        shape = z.shape[1:]

        def single(zi, yi):
            return self.fn(zi.reshape(1, *shape), yi[None])[0]

        flat = z.detach().reshape(z.shape[0], -1)
        hess = torch.func.vmap(
            lambda zi, yi: torch.func.hessian(lambda v: single(v.reshape(shape), yi))(
                zi
            )
        )(flat, y)
        evals, evecs = torch.linalg.eigh(hess)
        self.n_clipped_ += int((evals < 0).any(-1).sum())
        return (evecs * evals.clamp_min(0)[:, None, :]) @ evecs.transpose(1, 2)

    def hvp_from_state(self, hess, z, y, u):
        flat = u.reshape(u.shape[0], -1, 1)
        return (hess @ flat).reshape(u.shape)

    def hvp(self, z, y, u):
        return self.hvp_from_state(self.hessian_state(z, y), z, y, u)

    def __repr__(self):
        return f"CallableLoss({self.fn!r})"


_LOSSES = {
    "cross_entropy": CrossEntropyLoss,
    "nll": LogProbNLLLoss,
    "mse": MSELoss,
    "bce_logits": BCEWithLogitsLoss,
    "nll_proba": ProbabilityNLLLoss,
}


def resolve_loss(loss):
    """Turn the ``loss`` parameter into an :class:`OutputLoss`.

    Parameters
    ----------
    loss : str, callable or OutputLoss
        One of ``"cross_entropy"``, ``"nll"``, ``"mse"``, ``"bce_logits"``,
        ``"nll_proba"``, or a callable ``(output, y) -> per-example loss``.
    """
    if isinstance(loss, OutputLoss):
        return loss
    if isinstance(loss, str):
        try:
            return _LOSSES[loss]()
        except KeyError:
            raise ValueError(
                f"Unknown loss={loss!r}; expected one of {sorted(_LOSSES)} or a "
                "callable (output, y) -> per-example losses."
            ) from None
    if callable(loss):
        return CallableLoss(loss)
    raise TypeError(
        f"loss must be a string, a callable or None; got {type(loss).__name__}."
    )
