"""Saving a fitted cache in a format that executes nothing on load.

One ``.npz`` file: every fitted NumPy attribute as an array, plus a JSON
document (stored as a uint8 array) with the package version, the
estimator's class, its JSON-serializable parameters and its scalar fitted
attributes. :func:`load_cache` reads it with ``allow_pickle=False``.
"""

import json
import numbers
import warnings
import zipfile

import numpy as np

from sklearn_cif.exceptions import CIFWarning

__all__ = ["save_cache", "load_cache"]

_FORMAT = "sklearn_cif-cache-1"


def _jsonable(value):
    if value is None or isinstance(value, (bool, str)):
        return True
    if isinstance(value, numbers.Real):
        return np.isfinite(value) or isinstance(value, numbers.Integral)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _jsonable(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(_jsonable(v) for v in value)
    return False


def _plain(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def save_cache(est, path, version, extra_state):
    """Write ``est``'s fitted attributes and parameters to ``path`` (``.npz``)."""
    arrays, scalars = {}, {}
    for key, value in vars(est).items():
        if not key.endswith("_") or key.startswith("_"):
            continue
        if isinstance(value, np.ndarray):
            if value.dtype == object:
                raise TypeError(f"Cannot save object array {key}.")
            arrays[key] = value
        elif _jsonable(_plain(value)):
            scalars[key] = _plain(value)
    params = est.get_params()
    dropped = sorted(k for k, v in params.items() if not _jsonable(v))
    meta = {
        "format": _FORMAT,
        "version": version,
        "class": type(est).__name__,
        "params": {k: v for k, v in params.items() if k not in dropped},
        "dropped_params": dropped,
        "scalars": scalars,
        "state": extra_state,
    }
    blob = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    with open(path, "wb") as fh:  # np.savez on a handle: the name is kept as given
        np.savez(fh, __meta__=blob, **arrays)


def load_cache(path, cls, version):
    """Read a file written by :func:`save_cache` into a new ``cls`` instance.

    Returns ``(estimator, extra_state)``. Raises ``ValueError`` for a file
    that is not a complete cache; warns (:class:`CIFWarning`) when it was
    written by another package version.
    """
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(bytes(data["__meta__"]).decode())
            arrays = {k: data[k] for k in data.files if k != "__meta__"}
    except (zipfile.BadZipFile, OSError, EOFError, KeyError, ValueError) as exc:
        raise ValueError(
            f"{path!s} is not a readable sklearn_cif cache (corrupt or truncated "
            f"file: {exc})."
        ) from None
    if meta.get("format") != _FORMAT or meta.get("class") != cls.__name__:
        raise ValueError(
            f"{path!s} holds {meta.get('class')!r} in format {meta.get('format')!r}; "
            f"expected a {cls.__name__} cache in format {_FORMAT!r}."
        )
    if meta["version"] != version:
        warnings.warn(
            f"{path!s} was saved by sklearn_cif {meta['version']}, this is {version}; "
            "check the answers before relying on them.",
            CIFWarning,
            stacklevel=3,
        )
    est = cls(**meta["params"])
    for key, value in {**meta["scalars"], **arrays}.items():
        setattr(est, key, value)
    if meta["dropped_params"]:
        warnings.warn(
            f"Parameters {meta['dropped_params']} (the model, a callable loss, ...) "
            "are not stored; set them with set_params before queries that need "
            "the model.",
            CIFWarning,
            stacklevel=3,
        )
    return est, meta["state"]
