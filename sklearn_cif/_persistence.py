"""Saving a fitted cache in a format that executes nothing on load.

One ``.npz`` file: every array field of the cache dataclass as an ``.npy``
member, plus ``__meta__``, a JSON document (stored as a uint8 array) with
the package version, the estimator's class, its JSON-serializable
parameters, the cache's scalar fields and its dimensions. The declared
fields are the format: :func:`load_cache` refuses unknown members, and reads
each member's header first, checking dtype, shape (from the dimensions) and
size (against the bytes the file really holds) before anything is
allocated; it never unpickles.
"""

import dataclasses
import json
import numbers
import tokenize
import warnings
import zipfile

import numpy as np
from numpy.lib import format as npy_format

from sklearn_cif._version import __version__
from sklearn_cif.exceptions import CIFWarning

__all__ = ["load_cache", "save_cache"]

_FORMAT = "sklearn_cif-cache-8"
_META = "__meta__"


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
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _is_array_field(f):
    return "shape" in f.metadata


def save_cache(cache, params, class_name, path):
    """Write a cache dataclass and the estimator's ``params`` to ``path``."""
    arrays, scalars = {}, {}
    for f in dataclasses.fields(cache):
        value = getattr(cache, f.name)
        if _is_array_field(f):
            if value is not None:
                arrays[f.name] = np.ascontiguousarray(value)
        else:
            scalars[f.name] = _plain(value)
    dropped = sorted(k for k, v in params.items() if not _jsonable(v))
    meta = {
        "format": _FORMAT,
        "version": __version__,
        "class": class_name,
        "params": {k: _plain(v) for k, v in params.items() if k not in dropped},
        "dropped_params": dropped,
        "scalars": scalars,
        "dims": cache.dims() if hasattr(cache, "dims") else {},
    }
    blob = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    with open(path, "wb") as fh:  # np.savez on a handle: the name is kept as given
        np.savez(fh, **{_META: blob}, **arrays)


def _read_member(zf, info, check):
    """Read one ``.npy`` member after ``check(shape, dtype)`` accepts its header."""
    if info.compress_type != zipfile.ZIP_STORED:
        # save writes stored members: their sizes are the bytes in the file,
        # while a compressed one could inflate to any size
        raise ValueError(f"{info.filename} is compressed; a cache is not")
    with zf.open(info) as fh:
        version = npy_format.read_magic(fh)
        if version == (1, 0):
            shape, fortran, dtype = npy_format.read_array_header_1_0(fh)
        elif version == (2, 0):
            shape, fortran, dtype = npy_format.read_array_header_2_0(fh)
        else:
            raise ValueError(f"unsupported .npy version {version}")
        header = fh.tell()
        if dtype.hasobject or fortran:
            raise ValueError("object or Fortran-ordered arrays are not a cache")
        check(shape, dtype)
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if size != info.file_size - header:
            raise ValueError(
                f"header says {size} bytes, the file holds {info.file_size - header}"
            )
        data = bytearray(fh.read(size))  # writable, no second copy
        return np.frombuffer(data, dtype=dtype).reshape(shape)


def _check_scalar(f, value):
    types = f.metadata["types"]
    types = types if isinstance(types, tuple) else (types,)
    if float in types:
        types = (*types, numbers.Real)
    if value is None and f.metadata.get("optional"):
        return value
    if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
        raise ValueError(
            f"field {f.name!r} holds {value!r}, expected {types[0].__name__}"
        )
    return tuple(value) if tuple in types else value


def _array_check(f, dims):
    def check(shape, dtype):
        expected = tuple(dims[d] for d in f.metadata["shape"])
        if tuple(shape) != expected:
            raise ValueError(f"{f.name} has shape {shape}, expected {expected}")
        kinds = "iu" if f.metadata["kind"] == "i" else "f"
        if dtype.kind not in kinds:
            raise ValueError(f"{f.name} has dtype {dtype}")

    return check


def _read(path, class_name, cache_cls):
    with zipfile.ZipFile(path) as zf:
        members = {info.filename: info for info in zf.infolist()}
        if f"{_META}.npy" not in members:
            raise ValueError("no metadata")

        def check_meta(shape, dtype):
            if dtype != np.uint8 or len(shape) != 1:
                raise ValueError("metadata is not a byte string")

        meta = json.loads(bytes(_read_member(zf, members[f"{_META}.npy"], check_meta)))
        if not isinstance(meta, dict):
            raise ValueError("metadata is not a JSON object")
        if meta.get("format") != _FORMAT or meta.get("class") != class_name:
            raise TypeError(
                f"{path!s} holds {meta.get('class')!r} in format "
                f"{meta.get('format')!r}; expected a {class_name} cache in format "
                f"{_FORMAT!r}."
            )
        kinds = {"version": str, "params": dict, "dropped_params": list}
        kinds.update(scalars=dict, dims=dict)
        wrong = [k for k, kind in kinds.items() if not isinstance(meta.get(k), kind)]
        if wrong:
            raise ValueError(f"metadata lacks or mistypes {wrong}")
        fields = {f.name: f for f in dataclasses.fields(cache_cls)}
        unknown = sorted(
            set(members)
            - {f"{n}.npy" for n, f in fields.items() if _is_array_field(f)}
            - {f"{_META}.npy"}
        )
        if unknown:
            raise ValueError(f"unknown keys {unknown}")
        values = {}
        for name, f in fields.items():
            if not _is_array_field(f):
                if name not in meta["scalars"]:
                    raise ValueError(f"missing field {name!r}")
                values[name] = _check_scalar(f, meta["scalars"][name])
        dims = meta["dims"]
        if not all(isinstance(v, int) and v >= 0 for v in dims.values()):
            raise ValueError(f"bad dimensions {dims}")
        for name, f in fields.items():
            if _is_array_field(f):
                info = members.get(f"{name}.npy")
                if info is None and not f.metadata["optional"]:
                    raise ValueError(f"missing array {name!r}")
                values[name] = (
                    None
                    if info is None
                    else _read_member(zf, info, _array_check(f, dims))
                )
    return meta, cache_cls(**values)


def load_cache(path, class_name, cache_cls):
    """Read a file written by :func:`save_cache`.

    Returns ``(params, cache)``. Raises ``ValueError`` for a file that is not
    a complete, well-formed cache of ``class_name``; warns
    (:class:`~sklearn_cif.exceptions.CIFWarning`) when it was written by
    another package version or when parameters were not stored.
    """
    try:
        meta, cache = _read(path, class_name, cache_cls)
    except FileNotFoundError:
        raise FileNotFoundError(f"No cache file at {path!s}.") from None
    except TypeError as exc:
        raise ValueError(str(exc)) from None
    except (
        zipfile.BadZipFile,
        OSError,
        EOFError,
        KeyError,
        ValueError,
        NotImplementedError,  # a damaged zip directory (compression, flags)
        RuntimeError,  # an "encrypted" member
        RecursionError,  # absurdly nested metadata
        tokenize.TokenError,  # an unparsable .npy header
        SyntaxError,
    ) as exc:
        raise ValueError(
            f"{path!s} is not a readable sklearn_cif cache (corrupt or truncated "
            f"file, or not a cache: {exc})."
        ) from None
    dims = cache.dims() if hasattr(cache, "dims") else {}
    if dims and dims != meta["dims"]:
        raise ValueError(f"{path!s}: the cache's fields disagree with its dimensions.")
    if meta["version"] != __version__:
        warnings.warn(
            f"{path!s} was saved by sklearn_cif {meta['version']}, this is "
            f"{__version__}; check the answers before relying on them.",
            CIFWarning,
            stacklevel=3,
        )
    if meta["dropped_params"]:
        warnings.warn(
            f"Parameters {meta['dropped_params']} (the model, a callable loss, ...) "
            "are not stored; set them with set_params before queries that need "
            "the model.",
            CIFWarning,
            stacklevel=3,
        )
    return meta["params"], cache
