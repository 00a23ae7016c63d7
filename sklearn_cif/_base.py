"""What the influence estimators share: model handling, targets, pinned settings.

:class:`BaseInfluence` carries the user's model without mutating or copying
it, rebuilds the functional model lazily (thread-safe, checked by
fingerprint), exposes the fitted cache's fields as read-only fitted
attributes, pins the parameters the cache was built with and resolves the
``target`` of self effects.
"""

import numbers
import threading

import numpy as np
from sklearn.base import BaseEstimator, clone
from sklearn.utils.validation import check_is_fitted

from sklearn_cif._checks import (
    check_data,
    check_inputs,
    check_model_data,
    data_fingerprint,
    n_features,
)
from sklearn_cif.adapters import as_functional, fingerprint_of, module_of
from sklearn_cif.losses import get_loss
from sklearn_cif.passes import DataPasses

__all__ = [
    "BaseInfluence",
    "TARGETS",
    "canonical_param",
    "check_target",
    "fitted_views",
]

TARGETS = ("auto", "retrain", "if")

# Guards the lazy (re)build of an estimator's functional model.
_BUILD_LOCK = threading.Lock()


def check_target(target):
    """Raise ``ValueError`` unless ``target`` is one of :data:`TARGETS`."""
    if not isinstance(target, str) or target not in TARGETS:
        raise ValueError(f"target={target!r}; expected one of {list(TARGETS)}.")


def _token(value):
    """A comparable, JSON-able stand-in for a parameter value.

    Values a file cannot hold (callables, RandomState instances) become
    ``"<...>"`` strings: they are compared by name, and a loaded estimator
    that has not been given them again (``None``) is not flagged.
    """
    if value is None or isinstance(value, (bool, str, numbers.Number)):
        return value.item() if hasattr(value, "item") else value
    if isinstance(value, (list, tuple)):
        return [_token(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _token(v) for k, v in value.items()}
    name = getattr(value, "__qualname__", type(value).__name__)
    return f"<{'callable ' if callable(value) else ''}{name}>"


def canonical_param(name, value):
    """Equivalent spellings of shared parameters merged.

    ``cg_maxiter=None`` is 1000 and ``params="w"`` is ``["w"]``.
    """
    if name == "cg_maxiter" and value is None:
        return 1000
    if name == "params" and isinstance(value, str):
        return [value]
    return value


def _plain(value):
    """Lists, tuples and arrays as nested tuples; NumPy scalars as Python ones."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((str(k), _plain(v)) for k, v in value.items()))
    return value.item() if isinstance(value, np.generic) else value


def _same_value(old, new):
    """Whether a pinned parameter still has its fitted value.

    The same object, or equal plain values; objects without a meaningful
    ``==`` (functions, modules, generators) compare by identity.
    """
    if old is new:
        return True
    try:
        return bool(_plain(old) == _plain(new))
    except Exception:  # an ``==`` that does not give one bool (tensors...)
        return False


def _describe(value):
    """A short description of a parameter value for error messages."""
    token = _token(value)
    if isinstance(token, str) and token.startswith("<"):
        return f"{token} at {id(value):#x}"
    return token


def fitted_views(cache_cls, names):
    """Class decorator: a read-only property ``name_`` per cache field ``name``."""

    def view(name):
        def get(self):
            cache = self.__dict__.get("_cache")
            if cache is None:
                raise AttributeError(
                    f"{type(self).__name__} has no attribute {name + '_'!r} before fit."
                )
            return getattr(cache, name)

        return property(get, doc=f"``{name}`` of the fitted {cache_cls.__name__}.")

    def decorate(cls):
        for name in names:
            setattr(cls, name + "_", view(name))
        return cls

    return decorate


class BaseInfluence(BaseEstimator):
    """Model handling, fitted views, pinned settings and targets.

    Subclasses set ``_pinned``: the parameters their fitted state depends
    on. The fitted state is one object, ``_cache``, installed by
    :meth:`_install` in one assignment.
    """

    _pinned = ()
    # Device state and the model are not pickled: a saved cache is arrays only.
    _not_pickled = ("_fmodel", "_fit_model", "_model_param")

    def __getstate__(self):
        state = dict(super().__getstate__())  # a copy: never strip the live object
        for key in self._not_pickled:
            state.pop(key, None)
        return state

    def __sklearn_is_fitted__(self):
        return self.__dict__.get("_cache") is not None

    def get_params(self, deep=True):
        """Get the parameters of this estimator; never recurse into ``model``.

        The model is carried, not tuned: exposing a skorch net's own
        parameters (``model__lr``...) would let tuning tools mutate the
        user's fitted net.

        Parameters
        ----------
        deep : bool, default=True
            Ignored: ``model`` is never expanded.

        Returns
        -------
        params : dict
            Parameter names mapped to their values.
        """
        return super().get_params(deep=False)

    def __sklearn_clone__(self):
        # FrozenEstimator semantics: the clone shares the very same model
        # object (never rebuilds an unfitted skorch net, never deep-copies a
        # GPU module); every other parameter is cloned as scikit-learn does.
        params = self.get_params()
        model = params.pop("model")
        return type(self)(
            model=model, **{k: clone(v, safe=False) for k, v in params.items()}
        )

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.required = True
        tags.non_deterministic = False
        return tags

    # -- pinned settings ---------
    def _canonical(self, name, value):
        """``value`` of parameter ``name`` with equivalent spellings merged.

        Subclasses map equivalent values to one (``"auto"`` and what it
        resolves to, ``None`` and the default it stands for, ...).
        """
        return value

    def _pinned_values(self):
        """The pinned parameters' canonical values: the very objects, in process."""
        params = self.get_params()
        return {name: self._canonical(name, params[name]) for name in self._pinned}

    def _settings_now(self, values=None):
        """The pinned values as JSON-able tokens (what a saved cache stores)."""
        values = self._pinned_values() if values is None else values
        return {name: _token(v) for name, v in values.items()}

    def _fit_snapshot(self):
        """The pinned values at the start of a fit: containers copied, objects kept."""
        return {
            name: _plain(v) if isinstance(v, (list, tuple, np.ndarray)) else v
            for name, v in self._pinned_values().items()
        }

    def _changed_settings(self):
        """``{name: (value at fit, value now)}`` for every pinned parameter changed.

        In the fitting process the fitted objects themselves are compared
        (another callable, loss module or array of other values counts as a
        change); after ``load`` only their tokens are known, and a value a
        file cannot hold (``"<...>"``) is not flagged while it is ``None``.
        """
        fitted_objects = self.__dict__.get("_fit_params")
        now = self._pinned_values()
        changed = {}
        for name in self._pinned:
            new = now[name]
            if fitted_objects is not None:
                old = fitted_objects[name]
                if not _same_value(old, new):
                    changed[name] = (_describe(old), _describe(new))
                continue
            old, token = self._cache.settings.get(name), _token(new)
            restorable = not (isinstance(old, str) and old.startswith("<"))
            if old != token and (restorable or new is not None):
                changed[name] = (old, token)
        return changed

    def _check_fitted(self):
        """``check_is_fitted``, then refuse answers for changed parameters."""
        check_is_fitted(self)
        changed = self._changed_settings()
        if changed:
            what = ", ".join(
                f"{k}={v[1]!r} (fitted with {v[0]!r})" for k, v in changed.items()
            )
            raise ValueError(
                f"Parameters changed since fit: {what}. The cache answers only for "
                "the settings it was built with; refit, or set them back."
            )
        return self._cache

    def is_current(self, model=None, X=None, y=None):
        """Whether the fitted cache answers for these parameters, model and data.

        Parameters
        ----------
        model : skorch net or torch.nn.Module, default=None
            When given, its weights must be those the cache was built with.
        X, y : array-like, default=None
            When given, they must be the training data of the fit.

        Returns
        -------
        current : bool
            False before fit, after a change of a parameter the cache depends
            on, or for another model or dataset.
        """
        if not self.__sklearn_is_fitted__() or self._changed_settings():
            return False
        if model is not None and fingerprint_of(model) != self._cache.model_fingerprint:
            return False
        if X is not None and y is not None:
            X, y = check_data(X, y)
            return data_fingerprint(X, y) == self._cache.data_fingerprint
        return True

    # -- the model ---------
    def _new_fmodel(self, model, X=None, y=None):
        """The functional model, probed on the data before any expensive pass."""
        fmodel = as_functional(
            model, loss=self.loss, params=self.params, device=self.device
        )
        if X is not None:
            check_model_data(fmodel, X, y)
        return fmodel

    def _get_fmodel(self, cache):
        """The functional model of the fitted model, rebuilt when needed.

        The model is the one ``fit`` used, unless the ``model`` parameter
        was set to another object since (or the estimator was loaded or
        unpickled without its model). Its weights must be those
        ``cache`` was built with (fingerprint); restoring them makes queries
        work again. ``cache`` is the one the query checked: a concurrent
        refit cannot swap it mid-query.
        """
        model, given = self.__dict__.get("_fit_model"), self.model
        if model is None or (
            given is not None and given is not self.__dict__.get("_model_param")
        ):  # loaded, or given another model with set_params since fit
            model = given
        if model is None:
            raise ValueError(
                "This query needs the model, but the estimator holds none (it "
                "was loaded from disk or unpickled). Call set_params(model=<the "
                "fitted model>)."
            )
        if fingerprint_of(model) != cache.model_fingerprint:
            raise ValueError(
                "The model's parameters changed since fit (fingerprint mismatch): "
                "it was trained further, edited or replaced, so the cached "
                "influences are stale. Restore the weights the cache was built "
                "with (queries then work again), or refit the estimator."
            )
        with _BUILD_LOCK:
            fmodel = self.__dict__.get("_fmodel")
            if (
                fmodel is None
                or fmodel.source_model is not model
                or not fmodel.views(module_of(model))
            ):
                fmodel = self._new_fmodel(model)
                if fmodel.loss.name != cache.loss_name:
                    raise ValueError(
                        f"The cache was built with loss={cache.loss_name!r}; this "
                        f"model and the loss parameter give {fmodel.loss.name!r}. "
                        "Set the loss the cache was built with, or refit."
                    )
                self._fmodel = fmodel
        return fmodel

    def _install(self, cache, model, fmodel, fit_params=None, **state):
        # One dict update (one bytecode): a fit interrupted before it leaves
        # the previous cache, model and lazy state whole. ``fit_params``: the
        # fit's snapshot of the pinned values (None after load).
        self.__dict__.update(
            _cache=cache,
            _fit_model=model,
            _fmodel=fmodel,
            _alpha_cache=None,
            _fit_params=fit_params,
            _model_param=self.model,
            **state,
        )

    def _eval_passes(self, X, y, cache):
        """Passes over a validated evaluation set (X, y) with the fitted model."""
        fmodel = self._get_fmodel(cache)
        X = check_inputs(X)
        if n_features(X) != cache.n_features_in:
            raise ValueError(
                f"X has {n_features(X)} features, but {type(self).__name__} is "
                f"expecting {cache.n_features_in} features as input."
            )
        if y is None:
            raise ValueError(
                "y is required: influence quantities are gradients of the loss at "
                "(x, y), so pass the targets with X."
            )
        X, y = check_data(X, y)
        check_model_data(fmodel, X, y)  # labels checked as the training labels
        return DataPasses(fmodel, X, y, self.batch_size)

    # -- targets ---------
    def available_targets(self):
        """The concrete targets of self effects these parameters can give.

        Returns
        -------
        targets : tuple of str
            A subset of ``("retrain", "if")``; ``target="auto"`` picks
            ``"retrain"`` when it is available and the loss makes it its
            default (:attr:`~sklearn_cif.losses.OutputLoss.newton_default`).
        """
        return ("if",)

    def _resolve_target(self, target, cache):
        check_target(target)
        if target == "auto":
            available = self._cache_targets(cache)
            newton = get_loss(cache.loss_name).newton_default
            return "retrain" if "retrain" in available and newton else "if"
        if target not in self._cache_targets(cache):
            raise ValueError(
                f"target={target!r} is not available from this fitted "
                f"{type(self).__name__}; it gives {list(self._cache_targets(cache))}."
                f"{self._target_hint}"
            )
        return target

    _target_hint = ""

    def _cache_targets(self, cache):
        return ("if",)
