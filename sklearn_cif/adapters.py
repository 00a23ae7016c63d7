"""Turning a user's model into one functional form.

:class:`FunctionalModel` holds detached copies (or views) of the chosen
parameters on the compute device, an inference-mode structural copy of the
module that shares the user's tensors, and an :class:`~sklearn_cif.losses.OutputLoss`.
The user's module is never mutated: no ``eval()`` on it, no ``requires_grad``
flips, no in-place writes (STYLE.md, convention 2).
"""

import copy
import hashlib
import itertools
import pickle
import threading
import warnings

import numpy as np
import torch
from sklearn.exceptions import NotFittedError

from sklearn_cif.exceptions import CIFWarning
from sklearn_cif.losses import get_loss, resolve_loss, skorch_loss
from sklearn_cif.sklearn_models import is_sklearn_model, to_torch

__all__ = [
    "FunctionalModel",
    "as_functional",
    "fingerprint_of",
    "is_model",
    "model_fingerprint",
    "module_of",
    "resolve_device",
]


def resolve_device(device):
    """Resolve the ``device`` parameter (``"auto"``, ``"cpu"``, ``"cuda[:i]"``)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"device={device!r} is not a valid torch device; use 'auto', 'cpu' "
            "or 'cuda'."
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        # skorch's behaviour: a cache or model moved from a GPU machine still
        # works on a CPU-only one, with a warning.
        warnings.warn(
            f"device={device!r} was requested but CUDA is not available; computing "
            "on the CPU instead. Pass device='cpu' or 'auto' to silence this.",
            CIFWarning,
            stacklevel=3,
        )
        return torch.device("cpu")
    return dev


def _is_skorch_net(model):
    try:
        from skorch import NeuralNet
    except ImportError:  # skorch is an optional extra
        return False
    return isinstance(model, NeuralNet)


def is_model(obj):
    """Whether ``obj`` is something ``fit`` accepts as the model."""
    return (
        isinstance(obj, torch.nn.Module) or _is_skorch_net(obj) or is_sklearn_model(obj)
    )


def _skorch_kind(net):
    from skorch import (
        NeuralNetBinaryClassifier,
        NeuralNetClassifier,
        NeuralNetRegressor,
    )

    for cls, kind in (
        (NeuralNetBinaryClassifier, "binary_classifier"),
        (NeuralNetClassifier, "classifier"),
        (NeuralNetRegressor, "regressor"),
    ):
        if isinstance(net, cls):
            return kind
    return "net"


def _skorch_loss(net):
    """The per-example loss of a skorch net's criterion (the losses declare it)."""
    crit = net.criterion_
    if getattr(crit, "weight", None) is not None:
        raise ValueError(
            "Weighted criteria are not supported; pass loss=callable returning the "
            "weighted per-example loss instead."
        )
    loss = skorch_loss(crit, _skorch_kind(net))
    if loss is None:
        raise ValueError(
            f"Cannot derive a per-example loss from the {type(net).__name__} "
            f"criterion {type(crit).__name__}; pass loss='cross_entropy', 'nll', "
            "'mse', 'bce_logits' or a callable."
        )
    return loss


def _inference_copy(module):
    """A structural copy of ``module`` in eval mode that shares all tensors.

    ``copy.deepcopy`` with every parameter and buffer pre-seeded in the memo
    copies the Python module objects (so flipping ``training`` touches only
    the copy) while the tensors themselves are shared, not duplicated.
    """
    memo = {id(t): t for t in itertools.chain(module.parameters(), module.buffers())}
    clone = copy.deepcopy(module, memo)
    return clone.eval()


class FunctionalModel:
    """A model in functional form: ``f(theta, x)`` and per-example losses.

    Parameters
    ----------
    module : torch.nn.Module
        The network. Never mutated.
    loss : OutputLoss
        Per-example loss on the module's output.
    params : None or list of str
        Names of the parameters that count (all trainable ones by default).
    device : torch.device
        Where parameters live and computation happens.
    squeeze_output : bool
        Reshape an ``(n, 1)`` output to ``(n,)`` (skorch's binary classifier).
    feature_map : None or fitted transformer
        Applied to every batch of ``X`` first (a pipeline's earlier steps).
    classes : None or ndarray
        Class labels in output order: targets are encoded as their index.
    penalty : None or callable
        ``n_samples -> {name: L2 coefficient}``, the training objective's
        penalty (scikit-learn models); what ``damping="auto"`` uses.
    """

    def __init__(
        self, module, loss, params=None, device="cpu", squeeze_output=False,
        feature_map=None, classes=None, penalty=None,
    ):  # fmt: skip
        self.feature_map = feature_map
        self.classes = None if classes is None else np.asarray(classes)
        self.penalty = penalty
        self.source = module  # only read, to fingerprint the user's current weights
        self.module = _inference_copy(module)
        # functional_call swaps tensors into ``self.module`` for the duration
        # of a call: one pass at a time per functional model (issue 12).
        self.lock = threading.RLock()
        self.loss = loss
        self.device = torch.device(device)
        self.squeeze_output = squeeze_output
        self.grad_method = "auto"  # becomes "loop" when vmap cannot trace
        named = dict(module.named_parameters())
        if params is None:
            names = [n for n, p in named.items() if p.requires_grad]
        else:
            names = [params] if isinstance(params, str) else list(params)
            unknown = [n for n in names if n not in named]
            repeated = sorted({n for n in names if names.count(n) > 1})
            if repeated:
                raise ValueError(
                    f"params={params!r} names {repeated} more than once; each "
                    "parameter may be listed once."
                )
            if unknown or not names:
                raise ValueError(
                    f"params={params!r} names unknown parameters {unknown}; expected "
                    f"a non-empty list drawn from {list(named)}."
                )
        if not names:
            raise ValueError("The model has no trainable parameters.")
        self.names = names
        self.theta = {n: named[n].detach().to(self.device) for n in names}
        self.frozen = {
            n: p.detach().to(self.device) for n, p in named.items() if n not in names
        }
        self.frozen.update(
            {n: b.detach().to(self.device) for n, b in module.named_buffers()}
        )
        self.shapes = [self.theta[n].shape for n in names]
        self.sizes = [self.theta[n].numel() for n in names]
        self.n_params = int(sum(self.sizes))
        dtypes = {p.dtype for p in self.theta.values()}
        if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
            raise TypeError(
                f"All selected parameters must share one floating dtype; got {dtypes}."
            )
        if next(iter(dtypes)) not in (torch.float32, torch.float64):
            raise TypeError(
                f"The model's parameters are {next(iter(dtypes))}; influence needs "
                "float32 or float64 (conjugate gradient and the spectrum are not "
                "reliable in half precision). Pass a float32 copy of the model."
            )
        self.dtype = dtypes.pop()
        self._source_ids = self._tensor_ids(module)

    @staticmethod
    def _tensor_ids(module):
        return [id(t) for t in itertools.chain(module.parameters(), module.buffers())]

    def views(self, module):
        """Whether this functional model still reads ``module``'s own tensors."""
        return module is self.source and self._tensor_ids(module) == self._source_ids

    # -- flat <-> dict --------------------------------------------------------
    def flatten(self, tensors, batch_dims=0):
        """Concatenate a dict of per-parameter tensors into flat vectors."""
        parts = [
            tensors[n].reshape(*tensors[n].shape[:batch_dims], -1) for n in self.names
        ]
        return torch.cat(parts, dim=-1)

    def unflatten(self, flat):
        """Split flat vectors ``(..., p)`` into a dict of parameter-shaped tensors."""
        lead = flat.shape[:-1]
        chunks = torch.split(flat, self.sizes, dim=-1)
        return {
            n: c.reshape(*lead, *s)
            for n, c, s in zip(self.names, chunks, self.shapes, strict=True)
        }

    # -- evaluation -----------------------------------------------------------
    def forward(self, theta, x):
        """Model output ``f(theta, x)`` for a batch ``x`` (inference mode)."""
        out = torch.func.functional_call(self.module, {**theta, **self.frozen}, (x,))
        if isinstance(out, tuple):  # skorch convention: first output counts
            out = out[0]
        if self.squeeze_output and out.dim() == 2 and out.shape[1] == 1:
            out = out[:, 0]
        return out

    def losses(self, theta, x, y):
        """Per-example losses ``(n,)`` at ``theta``."""
        return self.loss.value(self.forward(theta, x), y)

    def as_tensors(self, X, y=None):
        """Move a data batch to the device; floating X gets the model dtype."""
        # np.require copies a read-only batch (torch cannot wrap it safely);
        # C order makes the kernels see the same layout whatever the user's
        # (a Fortran-ordered copy of X gives bitwise the same answers)
        if self.feature_map is not None:
            X = self._features(X)
        x = X.contiguous() if torch.is_tensor(X) else torch.as_tensor(_writable_c(X))
        if x.is_floating_point():
            x = x.to(self.dtype)
        x = x.to(self.device)
        if y is None:
            return x, None
        y = self.targets(y)
        t = y if torch.is_tensor(y) else torch.as_tensor(_writable_c(y))
        return x, self.loss.prepare_target(t.to(self.device), self.dtype)

    def _features(self, X):
        Z = self.feature_map.transform(X.cpu().numpy() if torch.is_tensor(X) else X)
        return np.asarray(Z.toarray() if hasattr(Z, "toarray") else Z)

    def targets(self, y):
        """``y`` as the loss reads it: labels encoded through ``classes``."""
        if self.classes is not None:
            return self.encode(y)
        if not torch.is_tensor(y) and np.asarray(y).dtype.kind in "OUS":
            raise ValueError(
                "y holds non-numeric labels; only a scikit-learn classifier maps "
                "labels to outputs (through classes_). Encode y as class "
                "indices for this model."
            )
        return y

    def encode(self, y):
        """Class labels -> their index in ``classes`` (the output order)."""
        y = y.cpu().numpy() if torch.is_tensor(y) else np.asarray(y)
        idx = np.searchsorted(self.classes, y)
        idx = np.clip(idx, 0, len(self.classes) - 1)
        unknown = self.classes[idx] != y
        if np.any(unknown):
            raise ValueError(
                f"y contains labels {np.unique(y[unknown]).tolist()[:5]} that are not "
                f"among the model's classes_ {self.classes.tolist()}."
            )
        return idx.astype(np.int64)

    def fingerprint(self):
        """Fingerprint of the user's model as it is now (detects later edits)."""
        source = getattr(self, "source_model", None)
        if source is not None:
            return fingerprint_of(source)
        return model_fingerprint(
            dict(self.source.named_parameters()), dict(self.source.named_buffers())
        )


def model_fingerprint(*tensor_dicts):
    """SHA-1 of every tensor's name, shape, dtype and bytes."""
    h = hashlib.sha1()
    for d in tensor_dicts:
        for name in sorted(d):
            t = d[name].detach().cpu().contiguous()
            h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _writable_c(a):
    """A writable C-ordered array torch can wrap (a copy only when needed).

    A one-row slice of a reversed array counts as C-contiguous to NumPy
    but keeps its negative stride, which torch refuses: copy it too.
    """
    a = np.require(a, requirements=["W", "C"])
    return a.copy() if any(st < 0 for st in a.strides) else a


def as_functional(model, loss=None, params=None, device="auto"):
    """Build a :class:`FunctionalModel` from a skorch net or a torch module.

    Parameters
    ----------
    model : skorch.NeuralNet or torch.nn.Module
        A fitted skorch net, or a module (then ``loss`` is required).
    loss : None, str or callable
        Overrides the loss derived from a skorch criterion.
    params : None or list of str
        Parameter names to differentiate with respect to.
    device : str
        ``"auto"``, ``"cpu"`` or ``"cuda"``.
    """
    dev = resolve_device(device)
    if is_sklearn_model(model):
        fmodel = _from_sklearn(model, loss, params, dev)
    elif _is_skorch_net(model):
        fmodel = _from_net(model, loss, params, dev)
    elif isinstance(model, torch.nn.Module):
        if loss is None:
            raise ValueError(
                "loss=None is only allowed for skorch nets; for a torch.nn.Module "
                "pass loss='cross_entropy', 'nll', 'mse', 'bce_logits' or a callable."
            )
        fmodel = FunctionalModel(model, resolve_loss(loss), params=params, device=dev)
    else:
        raise TypeError(
            "model must be a fitted skorch NeuralNet, a torch.nn.Module or a "
            f"scikit-learn model; got {type(model).__name__}."
        )
    fmodel.source_model = model  # the object the user passed
    return fmodel


def _from_net(net, loss, params, dev, feature_map=None):
    """A fitted skorch net's module with the loss of its criterion."""
    if not getattr(net, "initialized_", False) or not hasattr(net, "module_"):
        raise NotFittedError(
            f"The skorch net {type(net).__name__} is not initialized; fit it "
            "before computing influences."
        )
    return FunctionalModel(
        net.module_,
        resolve_loss(loss) if loss is not None else _skorch_loss(net),
        params=params,
        device=dev,
        squeeze_output=_skorch_kind(net) == "binary_classifier",
        feature_map=feature_map,
    )


def _from_sklearn(model, loss, params, dev):
    """A scikit-learn model (or pipeline) through its exact torch form."""
    form = to_torch(model)
    if form.net is not None:  # a pipeline ending in a skorch net
        return _from_net(form.net, loss, params, dev, form.feature_map)
    return FunctionalModel(
        form.module,
        resolve_loss(loss) if loss is not None else get_loss(form.loss),
        params=params,
        device=dev,
        squeeze_output=form.squeeze_output,
        feature_map=form.feature_map,
        classes=form.classes,
        penalty=form.damping,
    )


def module_of(model):
    """The torch module a functional model of ``model`` reads, or ``None``.

    ``None`` for a scikit-learn model: its torch form is a fresh copy of
    its coefficients each time (a pipeline ending in a skorch net reads
    the net's ``module_``).
    """
    if is_sklearn_model(model):
        form = to_torch(model)
        return None if form.net is None else form.net.module_
    return model.module_ if _is_skorch_net(model) else model


def fingerprint_of(model):
    """Fingerprint of the model's weights as they are now.

    A skorch net's ``module_``, a torch module, or a scikit-learn model's
    coefficients and (for a pipeline) its earlier steps' fitted state.
    """
    if is_sklearn_model(model):
        form = to_torch(model)
        module = form.module if form.net is None else form.net.module_
        extra = {}
        if form.feature_map is not None:
            blob = pickle.dumps(form.feature_map, protocol=4)
            extra["feature_map"] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
        return model_fingerprint(
            dict(module.named_parameters()), dict(module.named_buffers()), extra
        )
    module = model.module_ if _is_skorch_net(model) else model
    if not isinstance(module, torch.nn.Module):
        raise TypeError(
            "model must be a fitted skorch NeuralNet, a torch.nn.Module or a "
            f"scikit-learn model; got {type(model).__name__}."
        )
    return model_fingerprint(
        dict(module.named_parameters()), dict(module.named_buffers())
    )
