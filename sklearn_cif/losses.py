"""Per-example losses and their Hessians with respect to the model output.

Every loss here maps a batch of model outputs ``z`` (shape ``(n, *out)``) and
targets ``y`` to per-example losses ``(n,)`` and applies the per-example
output Hessian ``H_i = d^2 l_i / dz_i^2`` to output-space vectors. The
generalized Gauss-Newton matrix ``(1/N) sum_i J_i^T H_i J_i`` is built from
these products in :mod:`sklearn_cif.curvature`.

Each loss is the one owner of what the package knows about it: whether it is
a classification loss, how its targets are checked, how outputs become
class probabilities, whether ``target="auto"`` runs the Newton step for it,
and which skorch criteria map to it. A new loss is one subclass decorated
with :func:`register_loss`; nothing else in the package lists losses.
"""

import copy
import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["OutputLoss", "get_loss", "register_loss", "resolve_loss", "skorch_loss"]

_REGISTRY = {}


def register_loss(cls):
    """Class decorator: make ``loss=cls.name`` resolve to ``cls()``.

    Parameters
    ----------
    cls : type
        A subclass of :class:`OutputLoss` with a unique string ``name``.

    Returns
    -------
    cls : type
        The class, unchanged (so it can be used as a decorator).
    """
    if not (isinstance(cls, type) and issubclass(cls, OutputLoss)):
        raise TypeError(f"register_loss expects an OutputLoss subclass; got {cls!r}.")
    if not isinstance(cls.name, str) or cls.name in ("", "callable"):
        raise ValueError(f"{cls.__name__}.name must be a new string; got {cls.name!r}.")
    _REGISTRY[cls.name] = cls
    return cls


class OutputLoss:
    """A per-example loss with its output Hessian-vector product.

    Subclasses implement :meth:`value` and :meth:`hvp`. ``hvp`` receives the
    outputs ``z`` and targets ``y`` of a batch and output-space tangents
    ``u`` of the same shape as ``z`` and returns ``H_i u_i`` for each example.

    Class attributes (the loss's knowledge):

    - ``name``: the string ``loss=`` accepts;
    - ``is_classifier``: outputs are class scores (scored with accuracy by
      default; :meth:`to_proba` gives probabilities);
    - ``newton_default``: ``target="auto"`` runs the Newton step of
      ``target="retrain"`` (losses whose curvature is split at logits or a
      linear output);
    - ``exact_loss_change``: the Newton step's loss change is the loss at
      the predicted outputs (:meth:`predicted_value`), not its second-order
      expansion (``False`` for callables, whose outputs the cache holds
      flattened);
    - ``skorch_criteria``: the ``torch.nn`` criterion classes of a skorch
      net that map to this loss, and ``skorch_nets`` the skorch net kinds
      (``"classifier"``, ``"binary_classifier"``, ``"regressor"``,
      ``"net"``) it is restricted to (``None``: any kind).
    """

    name = "callable"
    is_classifier = False
    newton_default = False
    exact_loss_change = True
    skorch_criteria = ()
    skorch_nets = None

    def prepare_target(self, y, output_dtype):
        """Convert a target batch to the dtype this loss expects."""
        return y

    def check_targets(self, y, n_outputs):
        """Raise ``ValueError`` when targets ``y`` cannot go with ``n_outputs``.

        Parameters
        ----------
        y : torch.Tensor
            All targets (CPU), before :meth:`prepare_target`.
        n_outputs : int
            Outputs per example of the model.
        """

    def n_classes(self, n_outputs):
        """Number of classes of a model with ``n_outputs`` outputs."""
        return n_outputs

    def to_proba(self, outputs):
        """Class probabilities ``(n, n_classes)`` from predicted outputs ``(n, d)``."""
        raise ValueError(f"Outputs of a {self.name!r} loss are not class scores.")

    def linearized(self, outputs, change):
        """Predicted outputs after a first-order change ``J d``, as NumPy arrays.

        In the space where the curvature is split: ``outputs + change`` by
        default (logits, linear outputs).
        """
        return outputs + change

    def predicted_value(self, outputs, change, y):
        """Per-example loss at the predicted outputs, from a change ``J d``.

        The torch counterpart of :meth:`linearized`: the loss of the model
        whose outputs moved by ``change`` in the space where the curvature is
        split (``value(outputs + change)`` by default). Its second-order
        Taylor expansion in ``change`` is what the Newton step models.
        """
        return self.value(outputs + change, y)

    def value(self, z, y):  # pragma: no cover - abstract
        raise NotImplementedError

    def hvp(self, z, y, u):  # pragma: no cover - abstract
        raise NotImplementedError

    def hessian_state(self, z, y):
        """Per-batch quantities reused across many Hessian products."""
        return None

    def hvp_from_state(self, state, z, y, u):
        return self.hvp(z, y, u)

    def n_clipped(self, state):
        """Examples of a batch whose output Hessian was clipped to be PSD."""
        return 0

    def __repr__(self):
        return f"{type(self).__name__}()"


def _flat_out(z):
    return z.reshape(z.shape[0], -1)


def _softmax(z):
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


class ClassIndexLoss(OutputLoss):
    """A classification loss whose targets are class indices ``0 .. d - 1``."""

    is_classifier = True

    def check_targets(self, y, n_outputs):
        if y.dim() != 1:
            raise ValueError(
                f"y must be a 1-d array of class indices for loss={self.name!r}; "
                f"got shape {tuple(y.shape)} (pass y.ravel())."
            )
        if y.is_floating_point() and not bool((y == y.round()).all()):
            raise ValueError(
                f"y must hold integer class indices for loss={self.name!r}."
            )
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= n_outputs:
            raise ValueError(
                f"y holds labels in [{lo}, {hi}] but the model has {n_outputs} "
                f"outputs; loss={self.name!r} expects class indices in "
                f"[0, {n_outputs - 1}]."
            )


@register_loss
class CrossEntropyLoss(ClassIndexLoss):
    r"""Softmax cross-entropy on logits, :math:`l = -z_y + \log\sum_k e^{z_k}`.

    Output Hessian: :math:`H = \mathrm{diag}(p) - p p^\top`, ``p = softmax(z)``.
    """

    name = "cross_entropy"
    newton_default = True
    skorch_criteria = (torch.nn.CrossEntropyLoss,)

    def to_proba(self, outputs):
        return _softmax(outputs)

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


@register_loss
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
    skorch_criteria = (torch.nn.NLLLoss,)

    def value(self, z, y):
        return F.nll_loss(z, y, reduction="none")

    def predicted_value(self, outputs, change, y):
        # moved log-probabilities renormalized, as to_proba does
        return F.cross_entropy(outputs + change, y, reduction="none")


@register_loss
class ProbabilityNLLLoss(ClassIndexLoss):
    r"""skorch's classifier loss on probabilities, :math:`l = -\log(p_y + \epsilon)`.

    ``NeuralNetClassifier`` with ``NLLLoss`` takes the log of the module's
    probability output (with ``eps`` the machine epsilon of the dtype).

    The curvature is split at the log-probabilities, as for ``"nll"``: with
    ``q = p + eps`` the output Hessian used is the categorical Fisher
    information in the probability parametrization,

    .. math:: H = \mathrm{diag}(1/q) - \frac{\mathbf 1 \mathbf 1^\top}{\sum_k q_k},

    positive semi-definite, and for a softmax output
    :math:`J_p^\top H J_p = J_z^\top (\mathrm{diag}(p) - p p^\top) J_z`: the
    Gauss-Newton matrix of the same model written with logits and
    cross-entropy. (The exact Hessian at the probabilities,
    :math:`e_y e_y^\top / q_y^2`, gives a misclassified example a leverage
    near 1: the Newton step overshot real CV 5.8x with it.) So the Newton
    step is this loss's default, as for ``"cross_entropy"`` (issue 13).
    """

    name = "nll_proba"
    newton_default = True
    skorch_criteria = (torch.nn.NLLLoss,)
    skorch_nets = ("classifier",)  # NeuralNetClassifier logs the probabilities

    def linearized(self, outputs, change):
        # log-probabilities: log q + J_p d / q, the first-order change of the
        # same model's logits up to a constant (a linearized p leaves the
        # simplex, and a clipped log loss of it was 1.8x the logits model's)
        q = outputs + np.finfo(outputs.dtype).eps
        return np.log(q) + change / q

    def to_proba(self, outputs):
        return _softmax(outputs)  # predicted outputs are log-probabilities

    def predicted_value(self, outputs, change, y):
        q = outputs + torch.finfo(outputs.dtype).eps
        return F.cross_entropy(torch.log(q) + change / q, y, reduction="none")

    def prepare_target(self, y, output_dtype):
        return y.long()

    def value(self, z, y):
        eps = torch.finfo(z.dtype).eps
        return F.nll_loss(torch.log(z + eps), y, reduction="none")

    def hessian_state(self, z, y):
        q = z.detach() + torch.finfo(z.dtype).eps
        return q, q.sum(-1, keepdim=True)

    def hvp_from_state(self, state, z, y, u):
        q, total = state
        return u / q - u.sum(-1, keepdim=True) / total

    def hvp(self, z, y, u):
        return self.hvp_from_state(self.hessian_state(z, y), z, y, u)


@register_loss
class MSELoss(OutputLoss):
    r"""Squared error averaged over output entries, :math:`l = \frac1d \|z - y\|^2`.

    This is what ``torch.nn.MSELoss`` (and skorch's ``NeuralNetRegressor``)
    averages over a batch. Output Hessian: :math:`H = (2/d) I`.
    """

    name = "mse"
    newton_default = True
    skorch_criteria = (torch.nn.MSELoss,)

    def prepare_target(self, y, output_dtype):
        return y.to(output_dtype)

    def value(self, z, y):
        d = _flat_out(z)
        return (d - y.reshape(d.shape)).square().mean(1)

    def hvp(self, z, y, u):
        d = math.prod(z.shape[1:])
        return u * (2.0 / d)


@register_loss
class BCEWithLogitsLoss(OutputLoss):
    r"""Binary cross-entropy on logits, :math:`l = \log(1 + e^z) - y z`.

    Output Hessian: :math:`H = \sigma(z)(1 - \sigma(z))` (per output entry,
    averaged over entries when the output has several).
    """

    name = "bce_logits"
    is_classifier = True
    newton_default = True
    skorch_criteria = (torch.nn.BCEWithLogitsLoss,)

    def check_targets(self, y, n_outputs):
        if float(y.min()) < 0 or float(y.max()) > 1:
            raise ValueError("y must lie in [0, 1] for loss='bce_logits'.")

    def n_classes(self, n_outputs):
        return 2

    def to_proba(self, outputs):
        s = 1.0 / (1.0 + np.exp(-outputs[:, 0]))
        return np.stack([1 - s, s], axis=1)

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


class _ClippedHessian(NamedTuple):
    """Per-example PSD output Hessians and how many needed clipping."""

    hess: torch.Tensor
    n_clipped: int


class CallableLoss(OutputLoss):
    """A user loss ``fn(output, y) -> (n,)`` with an autograd output Hessian.

    The per-example Hessian with respect to the (flattened) output is formed
    explicitly and its negative eigenvalues are clipped to zero so that the
    Gauss-Newton matrix stays positive semi-definite.
    """

    name = "callable"
    exact_loss_change = False

    def __init__(self, fn):
        self.fn = fn

    def prepare_target(self, y, output_dtype):
        return y.to(output_dtype) if y.is_floating_point() else y

    def value(self, z, y):
        out = self.fn(z, y)
        if out.shape != (z.shape[0],):
            raise ValueError(
                "The callable `loss` must return one loss per example, shape "
                f"({z.shape[0]},); got shape {tuple(out.shape)} (a torch loss "
                "function needs reduction='none')."
            )
        return out

    def hessian_state(self, z, y):
        shape = z.shape[1:]

        def single(zi, yi):
            return self.fn(zi.reshape(1, *shape), yi[None])[0]

        def hess_one(zi, yi):
            return torch.func.hessian(lambda v: single(v.reshape(shape), yi))(zi)

        flat = z.detach().reshape(z.shape[0], -1)
        try:
            hess = torch.func.vmap(hess_one)(flat, y)
        except (RuntimeError, NotImplementedError, ValueError):
            # data-dependent control flow in the loss: one example at a time
            hess = torch.stack([hess_one(flat[i], y[i]) for i in range(len(flat))])
        evals, evecs = torch.linalg.eigh(hess)
        # eigh's rounding leaves tiny negative eigenvalues on PSD Hessians (a
        # callable cross-entropy: 146 of 300 examples): count only real ones.
        tol = 1e3 * torch.finfo(evals.dtype).eps * evals.abs().amax(-1, keepdim=True)
        hess = (evecs * evals.clamp_min(0)[:, None, :]) @ evecs.transpose(1, 2)
        # The count travels with the state: the loss object holds no counter
        # that concurrent passes or repeated column blocks would corrupt.
        return _ClippedHessian(hess, int((evals < -tol).any(-1).sum()))

    def hvp_from_state(self, state, z, y, u):
        flat = u.reshape(u.shape[0], -1, 1)
        return (state.hess @ flat).reshape(u.shape)

    def n_clipped(self, state):
        return state.n_clipped

    def hvp(self, z, y, u):
        return self.hvp_from_state(self.hessian_state(z, y), z, y, u)

    def __repr__(self):
        return f"CallableLoss({self.fn!r})"


def get_loss(name):
    """A fresh instance of the loss whose ``name`` is given.

    Parameters
    ----------
    name : str
        A registered name, or ``"callable"`` (the ``loss_name_`` of an
        estimator fitted with a user callable: the instance then carries the
        loss's knowledge, not the function).

    Returns
    -------
    loss : OutputLoss
    """
    if name == "callable":
        return CallableLoss(None)
    try:
        return _REGISTRY[name]()
    except (KeyError, TypeError):
        raise ValueError(
            f"Unknown loss={name!r}; expected one of {sorted(_REGISTRY)} or a "
            "callable (output, y) -> per-example losses."
        ) from None


def resolve_loss(loss):
    """Turn the ``loss`` parameter into an :class:`OutputLoss`.

    Parameters
    ----------
    loss : str, callable or OutputLoss
        A registered name (``"cross_entropy"``, ``"nll"``, ``"mse"``,
        ``"bce_logits"``, ``"nll_proba"`` or one added with
        :func:`register_loss`), or a callable ``(output, y) -> per-example
        loss``.

    Returns
    -------
    loss : OutputLoss
    """
    if isinstance(loss, OutputLoss):
        return loss
    if isinstance(loss, torch.nn.Module):
        return _module_loss(loss)
    if isinstance(loss, str) and loss != "callable":
        return get_loss(loss)
    if callable(loss):
        return CallableLoss(loss)
    if isinstance(loss, str):
        return get_loss(f"{loss!r}")  # raises with the registered names
    raise TypeError(
        f"loss must be a string, a callable or None; got {type(loss).__name__}."
    )


def _default_settings(module):
    """Whether a criterion has its class's default settings (``reduction`` aside)."""
    try:
        default = type(module)()
    except TypeError:  # required constructor arguments: not a default
        return False

    def settings(m):
        return {
            k: v
            for k, v in vars(m).items()
            if not k.startswith("_") and k not in ("training", "reduction")
        }

    mine, theirs = settings(module), settings(default)
    if any(torch.is_tensor(v) for v in (*mine.values(), *theirs.values())):
        return False
    tensors = [*module._buffers.values(), *module._parameters.values()]
    return mine == theirs and all(t is None for t in tensors)


def _module_loss(module):
    """A torch loss module (what a skorch user has) as a per-example loss.

    A registered loss when the module is a known criterion with default
    settings; else the module itself evaluated per example (a shallow copy
    with ``reduction="none"``; the user's module is not touched).
    """
    if _default_settings(module):
        known = skorch_loss(module, "net")
        if known is not None:
            return known
    if not hasattr(module, "reduction"):
        raise TypeError(
            f"loss={type(module).__name__}() has no `reduction`; pass a callable "
            "(output, y) -> per-example losses."
        )
    per_example = copy.copy(module)
    per_example.reduction = "none"
    return CallableLoss(per_example)


def skorch_loss(criterion, net_kind):
    """The registered loss a skorch net's ``criterion_`` maps to, or ``None``.

    Parameters
    ----------
    criterion : torch.nn.Module
        The net's criterion instance.
    net_kind : str
        ``"classifier"``, ``"binary_classifier"``, ``"regressor"`` or ``"net"``.

    Returns
    -------
    loss : OutputLoss or None
        A loss restricted to ``net_kind`` wins over one for any kind.
    """
    matches = [
        cls
        for cls in _REGISTRY.values()
        if isinstance(criterion, cls.skorch_criteria)
        and (cls.skorch_nets is None or net_kind in cls.skorch_nets)
    ]
    matches.sort(key=lambda cls: cls.skorch_nets is None)  # specific kinds first
    return matches[0]() if matches else None
