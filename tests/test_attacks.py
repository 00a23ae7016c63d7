"""Standing attack suite (issue 15): every future change must pass it.

Five groups: subset fuzzing, input fuzzing, numerical faults, interrupts,
crafted or damaged cache files. A bad input must raise the named exception
with a message saying what is wrong; a valid input in another form must give
bitwise the answer of an independent, canonical form. (The 17 cases this
suite first found failing are fixed; none is marked xfail.)
"""

import copy
import io
import json
import pickle
import re
import struct
import warnings
import zipfile
from unittest import mock

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from _oracles import loop_grads
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sklearn.exceptions import ConvergenceWarning, NotFittedError

from sklearn_cif import ClusteredInfluenceEstimator

N = 30
CE = "cross_entropy"
# Deterministic, quick fuzzing: the same examples on every run.
_FUZZ = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def fuzz(max_examples):
    """Derandomized hypothesis settings with ``max_examples`` examples."""
    return settings(_FUZZ, max_examples=max_examples)


def _est(**kw):
    return ClusteredInfluenceEstimator(
        **{"n_clusters": 4, "loss": CE, "random_state": 0, **kw}
    )


def _tiny():
    """The data and model of conftest's ``tiny_classification``, for module scope."""
    rng = np.random.default_rng(0)
    X = torch.as_tensor(rng.normal(size=(N, 4)))
    y = torch.as_tensor(rng.integers(0, 3, size=N))
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)
    ).to(torch.float64)
    return net, X, y


def _same(a, b):
    """Bitwise equality: dtype, shape and bytes (NaN == NaN, -0.0 != 0.0)."""
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@pytest.fixture(scope="module")
def tiny():
    return _tiny()


@pytest.fixture(scope="module")
def fitted(tiny):
    net, X, y = tiny
    return _est().fit(net, X, y)


@pytest.fixture(scope="module")
def eval_set():
    rng = np.random.default_rng(5)
    Xv = torch.as_tensor(rng.normal(size=(12, 4)))
    yv = torch.as_tensor(rng.integers(0, 3, size=12))
    return Xv, yv


def _answers(est, subsets, Xv, yv, **kw):
    return {
        "membership": est.membership(subsets, **kw).toarray(),
        "param_change": est.param_change(subsets, **kw),
        "self_if": est.loss_change(subsets, target="if", **kw),
        "self_default": est.loss_change(subsets, **kw),
        "eval": est.loss_change(subsets, Xv, yv, **kw),
    }


# -- 1. subset fuzzing ---------------------------------------------------------
def _mask(idx):
    m = np.zeros(N, dtype=bool)
    m[np.asarray(idx, dtype=np.int64)] = True
    return m


ELEMENT_FORMS = {
    "int64": lambda o: np.array(o, dtype=np.int64),
    "int32": lambda o: np.array(o, dtype=np.int32),
    "uint16": lambda o: np.array(o, dtype=np.uint16),
    "pylist": lambda o: [int(i) for i in o],
    "mask": _mask,
}


def _matrix(orders):
    M = np.zeros((len(orders), N), dtype=np.int64)
    for q, o in enumerate(orders):
        M[q, o] = 1
    return M


def _coo_shuffled(orders):
    # COO entries in the given (shuffled) order, not sorted by row or column.
    rows = np.concatenate([np.full(len(o), q) for q, o in enumerate(orders)])
    cols = np.concatenate([np.asarray(o) for o in orders])
    return sp.coo_matrix((np.ones(cols.size), (rows, cols)), shape=(len(orders), N))


def _csr_with_stored_zeros(orders):
    # Explicitly stored zeros at every non-member: not members.
    M = _matrix(orders).astype(float)
    full = sp.csr_matrix(np.ones_like(M))
    full.data = M.ravel().copy()
    return full


MATRIX_FORMS = {
    "dense_int": lambda o: _matrix(o),
    "dense_bool": lambda o: _matrix(o).astype(bool),
    "dense_float": lambda o: _matrix(o).astype(np.float64),
    "dense_float32": lambda o: _matrix(o).astype(np.float32),
    "csr": lambda o: sp.csr_matrix(_matrix(o)),
    "csc": lambda o: sp.csc_matrix(_matrix(o).astype(float)),
    "coo": _coo_shuffled,
    "csr_stored_zeros": _csr_with_stored_zeros,
}
SINGLE_FORMS = {
    "array": lambda o: np.array(o, dtype=np.int64),
    "array_int32": lambda o: np.array(o, dtype=np.int32),
    "pylist": lambda o: [int(i) for i in o],
    "mask": _mask,
    "pylist_of_bools": lambda o: _mask(o).tolist(),
}


@st.composite
def subset_lists(draw, max_q=4):
    """Q valid subsets: canonical (sorted int64) and a shuffled order of each."""
    q = draw(st.integers(1, max_q))
    sets = [
        draw(st.sets(st.integers(0, N - 1), min_size=1, max_size=N)) for _ in range(q)
    ]
    canonical = [np.array(sorted(s), dtype=np.int64) for s in sets]
    orders = [draw(st.permutations(sorted(s))) for s in sets]
    return canonical, orders


def _subset_forms():
    """form name -> (most subsets it can hold, builder(data, orders))."""
    forms = {}
    for name, element in ELEMENT_FORMS.items():
        forms[f"list of {name}"] = (4, lambda d, o, e=element: [e(x) for x in o])
    forms["tuple of int64"] = (4, lambda d, o: tuple(np.array(x) for x in o))

    def mixed(data, orders):
        names = sorted(ELEMENT_FORMS)
        picks = [data.draw(st.sampled_from(names), label="element") for _ in orders]
        return [ELEMENT_FORMS[p](o) for p, o in zip(picks, orders, strict=True)]

    forms["mixed list"] = (4, mixed)
    for name, build in MATRIX_FORMS.items():
        forms[f"matrix {name}"] = (4, lambda d, o, b=build: b(o))
    for name, build in SINGLE_FORMS.items():
        forms[f"single {name}"] = (1, lambda d, o, b=build: b(o[0]))
    return forms


SUBSET_FORMS = _subset_forms()


@pytest.mark.parametrize("form", sorted(SUBSET_FORMS))
@fuzz(6)
@given(data=st.data())
def test_every_subset_form_answers_bitwise_as_sorted_index_lists(
    fitted, eval_set, form, data
):
    # Every subset form, in any order, answers bitwise as sorted int64 index lists.
    max_q, build = SUBSET_FORMS[form]
    canonical, orders = data.draw(subset_lists(max_q))
    subsets = build(data, orders)
    Xv, yv = eval_set
    expected = _answers(fitted, canonical, Xv, yv)
    got = _answers(fitted, subsets, Xv, yv)
    for key, value in expected.items():
        assert _same(got[key], value), key
    # the counts are the members per cluster, computed independently
    counts = np.stack([np.bincount(fitted.labels_[c], minlength=4) for c in canonical])
    assert np.array_equal(got["membership"], counts)


def test_subset_forms_are_not_all_alike(fitted):
    # Guard against a vacuous equivalence: different subsets answer differently.
    a = fitted.param_change([np.arange(0, 10), np.arange(10, 20)])
    assert not np.array_equal(a[0], a[1])
    assert not _same(
        fitted.loss_change([np.arange(0, 10)]), fitted.loss_change([np.arange(1, 11)])
    )


QUERIES = {
    "membership": lambda est, s, ev, **kw: est.membership(s, **kw),
    "param_change": lambda est, s, ev, **kw: est.param_change(s, **kw),
    "self_if": lambda est, s, ev, **kw: est.loss_change(s, target="if", **kw),
    "self_default": lambda est, s, ev, **kw: est.loss_change(s, **kw),
    "eval": lambda est, s, ev, **kw: est.loss_change(s, *ev, **kw),
}
FAULTS = ["high", "negative", "duplicate", "empty_array", "empty_list", "empty_mask"]


def _inject(data, subset, fault):
    """``subset`` (sorted int64) with one ``fault``; returns (bad subset, fragment)."""
    pos = data.draw(st.integers(0, subset.size), label="position")
    if fault == "high":
        bad = data.draw(st.integers(N, 2**62), label="index")
        return np.insert(subset, pos, bad), "has indices out of range"
    if fault == "negative":
        bad = data.draw(st.integers(-(2**62), -1), label="index")
        return np.insert(subset, pos, bad), "has indices out of range"
    if fault == "duplicate":
        dup = subset[data.draw(st.integers(0, subset.size - 1), label="dup")]
        return np.insert(subset, pos, dup), "has duplicate indices"
    empty = {
        "empty_array": np.array([], dtype=np.int64),
        "empty_list": [],
        "empty_mask": np.zeros(N, dtype=bool),
    }[fault]
    return empty, "is empty"


@pytest.mark.parametrize("fault", FAULTS)
@fuzz(8)
@given(data=st.data())
def test_a_fault_in_one_subset_is_named_by_every_query(fitted, eval_set, fault, data):
    # A bad index or empty subset at position q: every query names subsets[q].
    canonical, _ = data.draw(subset_lists())
    q = data.draw(st.integers(0, len(canonical) - 1), label="q")
    subsets = list(canonical)
    subsets[q], fragment = _inject(data, canonical[q], fault)
    for query in QUERIES.values():
        with pytest.raises(ValueError, match=re.escape(f"subsets[{q}] {fragment}")):
            query(fitted, subsets, eval_set)
        if fault != "duplicate":  # assume_unique skips the duplicate check only
            with pytest.raises(ValueError, match=re.escape(f"subsets[{q}] ")):
                query(fitted, subsets, eval_set, assume_unique=True)


@fuzz(25)
@given(data=st.data())
def test_assume_unique_counts_a_repeated_index_twice(fitted, eval_set, data):
    # assume_unique=True counts a duplicate twice (checked against labels_, transform).
    canonical, _ = data.draw(subset_lists())
    q = data.draw(st.integers(0, len(canonical) - 1), label="q")
    subsets = list(canonical)
    subsets[q], _ = _inject(data, canonical[q], "duplicate")
    Xv, yv = eval_set
    got = _answers(fitted, subsets, Xv, yv, assume_unique=True)
    counts = np.stack([np.bincount(fitted.labels_[s], minlength=4) for s in subsets])
    assert np.array_equal(got["membership"], counts)
    assert counts[q].sum() == canonical[q].size + 1
    expected = counts @ fitted.responses_.astype(np.float64) / N
    scale = np.abs(expected).max()
    np.testing.assert_allclose(
        got["param_change"], expected, rtol=1e-12, atol=1e-14 * scale
    )
    alpha = fitted.transform(Xv, yv).mean(0)
    expected = counts @ alpha / N
    np.testing.assert_allclose(
        got["eval"], expected, rtol=1e-9, atol=1e-12 * np.abs(expected).max()
    )
    for key in ("self_if", "self_default"):
        assert got[key].shape == (len(subsets),) and np.all(np.isfinite(got[key]))


def _bad_subsets():
    ok = np.arange(3, dtype=np.int64)
    dense = _matrix([ok, np.arange(5, 9)])
    two = np.array(dense)
    two[0, 4] = 2
    coo_dup = sp.coo_matrix(
        (np.ones(3), ([0, 0, 0], [1, 1, 2])), shape=(1, N)
    )  # (0, 1) stored twice: entry 2
    return {
        "float array": (np.array([0.0, 2.0]), "integer indices"),
        "float array in list": ([ok, np.array([1.0, 2.0])], "integer indices"),
        "string array": (np.array(["1", "2"]), "integer indices"),
        "short mask": (np.zeros(N - 1, dtype=bool), "length N=30"),
        "long mask": (np.ones(N + 1, dtype=bool), "length N=30"),
        "short mask in list": ([ok, np.ones(N - 1, dtype=bool)], "length N=30"),
        "2-d array in list": ([ok, np.array([[1, 2], [3, 4]])], "1-d"),
        "scalar in list": ([ok, 3], "1-d"),
        "dense entry 2": (two, "0 and 1"),
        "dense entry -1": (-dense, "0 and 1"),
        "dense entry 0.5": (dense * 0.5, "0 and 1"),
        "dense entry NaN": (np.where(dense == 1, np.nan, 0.0), "0 and 1"),
        "csr entry 2": (sp.csr_matrix(two), "0 and 1"),
        "csc entry -1": (sp.csc_matrix(-dense), "0 and 1"),
        "coo duplicate entry": (coo_dup, "0 and 1"),
        "dense N-1 columns": (dense[:, :-1], "N=30"),
        "dense N+1 columns": (np.hstack([dense, dense[:, :1]]), "N=30"),
        "csr N+1 columns": (sp.csr_matrix(np.hstack([dense, dense[:, :1]])), "N=30"),
        "coo N-1 columns": (sp.coo_matrix(dense[:, :-1]), "N=30"),
        "dense empty row": (np.vstack([dense, np.zeros(N, int)]), "empty"),
        "csr empty row": (sp.csr_matrix(np.vstack([dense, np.zeros(N)])), "empty"),
        "empty list": ([], "empty list"),
    }


BAD_SUBSETS = _bad_subsets()


@pytest.mark.parametrize("query", sorted(QUERIES))
@pytest.mark.parametrize("case", sorted(BAD_SUBSETS))
def test_malformed_subsets_raise_value_error(fitted, eval_set, case, query):
    # Each malformed query form is refused with a message saying what is wrong.
    subsets, fragment = BAD_SUBSETS[case]
    with pytest.raises(ValueError, match=re.escape(fragment)):
        QUERIES[query](fitted, subsets, eval_set)


@pytest.mark.parametrize("subsets", [[0.0, 2.0], [1, 2.0]], ids=["floats", "mixed"])
def test_python_float_list_says_integer_indices(fitted, subsets):
    # A plain list with float entries is refused for its non-integer indices.
    with pytest.raises(ValueError, match="integer indices"):
        fitted.param_change(subsets)


# -- 2. input fuzzing ----------------------------------------------------------
def _x_forms(X):
    """The same rows (numpy, C-ordered) in every layout and container."""
    big = np.zeros((2 * X.shape[0], 3 * X.shape[1]), dtype=X.dtype)
    big[::2, ::3] = X
    readonly = X.copy()
    readonly.setflags(write=False)
    return {
        "numpy_c": lambda: np.ascontiguousarray(X),
        "numpy_f": lambda: np.asfortranarray(X),
        "numpy_strided": lambda: big[::2, ::3],
        "numpy_negative_strides": lambda: X[::-1].copy()[::-1],
        "numpy_readonly": lambda: readonly,
        "torch": lambda: torch.from_numpy(X.copy()),
        "torch_f": lambda: torch.from_numpy(np.asfortranarray(X)),
        "torch_strided": lambda: torch.from_numpy(big)[::2, ::3],
        "torch_flipped_view": lambda: torch.from_numpy(X[::-1].copy()).flip(0),
        "dataframe": lambda: pd.DataFrame(X),
        "dataframe_reindexed": lambda: pd.DataFrame(X, index=np.arange(len(X))[::-1]),
    }


def _y_forms(y):
    return {
        "numpy": lambda: y.copy(),
        "torch": lambda: torch.from_numpy(y.copy()),
        "series": lambda: pd.Series(y),
        "series_reindexed": lambda: pd.Series(y, index=np.arange(len(y))[::-1]),
        "pylist": lambda: y.tolist(),
        "numpy_strided": lambda: np.repeat(y, 2)[::2],
    }


X_FORMS = sorted(_x_forms(np.zeros((2, 2))))
Y_FORMS = sorted(_y_forms(np.zeros(2, np.int64)))


@pytest.fixture(scope="module")
def references(tiny):
    """A fit on C-ordered numpy data of each dtype, with its answers."""
    net, X, y = tiny
    out = {}
    for dtype in (np.float64, np.float32):
        Xd = np.ascontiguousarray(X.numpy().astype(dtype))
        est = _est().fit(net, Xd, y.numpy())
        out[dtype] = (est, Xd, y.numpy(), _fit_answers(est))
    return out


FOLDS = [np.arange(0, 7), np.arange(7, 19), np.array([3, 22, 29])]


def _fit_answers(est):
    return {
        "self_if": est.loss_change(FOLDS, target="if"),
        "self_default": est.loss_change(FOLDS),
        "param_change": est.param_change(FOLDS),
        "labels": est.labels_,
    }


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("x_form", X_FORMS)
@fuzz(2)
@given(y_form=st.sampled_from(Y_FORMS))
def test_fit_on_any_layout_or_container_is_bitwise_the_same(
    tiny, references, dtype, x_form, y_form
):
    # Training data in any layout or container: same fingerprint, bitwise answers.
    net = tiny[0]
    ref, Xd, yd, expected = references[dtype]
    est = _est().fit(net, _x_forms(Xd)[x_form](), _y_forms(yd)[y_form]())
    assert est.data_fingerprint_ == ref.data_fingerprint_
    got = _fit_answers(est)
    for key, value in expected.items():
        assert _same(got[key], value), key


def test_fit_on_negative_stride_y(tiny, references):
    # y given as a negative-stride view fits like its contiguous copy.
    net = tiny[0]
    ref, Xd, yd, expected = references[np.float64]
    est = _est().fit(net, Xd, yd[::-1].copy()[::-1])
    assert est.data_fingerprint_ == ref.data_fingerprint_
    assert _same(est.loss_change(FOLDS), expected["self_default"])


def test_forms_and_dtypes_do_change_the_fingerprint(references):
    # Non-vacuity: float32 and float64 data differ in fingerprint and in answers.
    ref64, ref32 = references[np.float64][0], references[np.float32][0]
    assert ref64.data_fingerprint_ != ref32.data_fingerprint_
    assert not _same(ref64.param_change(FOLDS), ref32.param_change(FOLDS))


def test_float32_and_bfloat16_data_are_cast_to_the_model_dtype(tiny, references):
    # float32/bfloat16 X on a float64 model answers bitwise as the cast float64 X.
    net, X, y = tiny
    ref32, X32, _, expected32 = references[np.float32]
    cast = _est().fit(net, X32.astype(np.float64), y)
    assert _same(_fit_answers(cast)["self_default"], expected32["self_default"])
    assert cast.data_fingerprint_ != ref32.data_fingerprint_
    Xb = X.to(torch.bfloat16)
    bf = _est().fit(net, Xb, y)
    cast = _est().fit(net, Xb.to(torch.float64), y)
    for key, value in _fit_answers(cast).items():
        assert _same(_fit_answers(bf)[key], value), key
    assert bf.data_fingerprint_ != cast.data_fingerprint_


@pytest.fixture(scope="module")
def eval_references(tiny, eval_set):
    """Evaluation answers for C-ordered numpy data of each dtype (fresh fits)."""
    net, X, y = tiny
    out = {}
    for dtype in (np.float64, np.float32):
        Xv = np.ascontiguousarray(eval_set[0].numpy().astype(dtype))
        yv = eval_set[1].numpy()
        ref = _est().fit(net, X, y)
        out[dtype] = (Xv, yv, (ref.loss_change(FOLDS, Xv, yv), ref.transform(Xv, yv)))
    return out


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("x_form", X_FORMS)
@fuzz(2)
@given(y_form=st.sampled_from(Y_FORMS))
def test_evaluation_set_in_any_form_is_bitwise_the_same(
    tiny, eval_references, dtype, x_form, y_form
):
    # An evaluation set in any form gives bitwise loss_change and transform.
    net, X, y = tiny
    Xv, yv, expected = eval_references[dtype]
    est = _est().fit(net, X, y)
    Xf, yf = _x_forms(Xv)[x_form](), _y_forms(yv)[y_form]()
    assert _same(est.loss_change(FOLDS, Xf, yf), expected[0])
    assert _same(est.transform(Xf, yf), expected[1])


def _with_bad_value(X, value):
    X = X.copy()
    X[3, 1] = value
    return X


BAD_VALUES = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf}
ARRAY_FORMS = {
    "numpy64": lambda X: X,
    "numpy32": lambda X: X.astype(np.float32),
    "dataframe": pd.DataFrame,
}
ALL_FORMS = {**ARRAY_FORMS, "torch": torch.from_numpy}


def _fit_or_eval(where, est, net, X, y):
    if where == "fit":
        return est.fit(net, X, y)
    return est.loss_change(FOLDS, X, y)


@pytest.mark.parametrize("where", ["fit", "eval"])
@pytest.mark.parametrize("form", sorted(ALL_FORMS))
@pytest.mark.parametrize("value", sorted(BAD_VALUES))
def test_non_finite_x_is_refused(tiny, fitted, where, form, value):
    # NaN or +-inf anywhere in X is refused (fit and evaluation sets).
    net, X, y = tiny
    Xb = ALL_FORMS[form](_with_bad_value(X.numpy(), BAD_VALUES[value]))
    est = _est() if where == "fit" else fitted
    with pytest.raises(ValueError, match=r"contains (NaN|infinity)"):
        _fit_or_eval(where, est, net, Xb, y)


@pytest.mark.parametrize("where", ["fit", "eval"])
@pytest.mark.parametrize("form", sorted(ARRAY_FORMS))
def test_non_finite_array_x_message_names_nan_or_infinity(tiny, fitted, where, form):
    # The message for a non-finite X is the same whatever its container.
    net, X, y = tiny
    Xb = ARRAY_FORMS[form](_with_bad_value(X.numpy(), np.nan))
    est = _est() if where == "fit" else fitted
    with pytest.raises(ValueError, match="NaN or infinity"):
        _fit_or_eval(where, est, net, Xb, y)


def _bad_inputs(X, y):
    Xn, yn = X.numpy(), y.numpy()
    return {
        "complex numpy": (Xn.astype(np.complex128), yn, "Complex"),
        "complex tensor": (X.to(torch.complex128), y, "Complex"),
        "y one short": (X, y[:-1], "inconsistent lengths"),
        "X one short numpy": (Xn[:-1], yn, "inconsistent lengths"),
    }


@pytest.mark.parametrize("where", ["fit", "eval"])
@pytest.mark.parametrize("case", sorted(_bad_inputs(torch.zeros(2, 2), torch.zeros(2))))
def test_complex_or_mismatched_data_is_refused(tiny, fitted, where, case):
    # Complex X and X/y of different lengths are refused in fit and queries.
    net, X, y = tiny
    Xb, yb, fragment = _bad_inputs(X, y)[case]
    est = _est() if where == "fit" else fitted
    with pytest.raises(ValueError, match=fragment):
        _fit_or_eval(where, est, net, Xb, yb)


def _eval_faults(X, y):
    y7 = y.clone()
    y7[4] = 7
    return {
        "3 features": (X[:, :3], y, "features"),
        "5 features numpy": (np.hstack([X.numpy(), X.numpy()[:, :1]]), y, "features"),
        "labels 2.5 tensor": (X, torch.full((N,), 2.5, dtype=torch.float64), None),
        "labels 2.5 numpy": (X, np.full(N, 2.5), None),
        "label 7": (X, y7, r"labels in \[0, 7\]"),
        "label -1": (X, torch.where(y == 0, -1, y), r"labels in \[-1, 2\]"),
        "y None": (X, None, "y is required"),
    }


EVAL_FAULTS = sorted(_eval_faults(torch.zeros(N, 4), torch.zeros(N)))


@pytest.mark.parametrize("case", EVAL_FAULTS)
@pytest.mark.parametrize("query", ["loss_change", "transform", "score"])
def test_bad_evaluation_sets_are_refused(tiny, fitted, case, query):
    # Bad evaluation features, labels or a missing y are refused by every query.
    _, X, y = tiny
    Xb, yb, fragment = _eval_faults(X, y)[case]
    fragment = fragment or "integer class indices"
    call = {
        "loss_change": lambda: fitted.loss_change(FOLDS, Xb, yb),
        "transform": lambda: fitted.transform(Xb, yb),
        "score": lambda: fitted.score(Xb, yb),
    }[query]
    with pytest.raises(ValueError, match=fragment):
        call()


def test_column_vector_y_is_refused_or_read_as_1d(tiny, references):
    # (N, 1) class labels are refused naming y, or answer as the 1-d labels.
    net, X, y = tiny
    expected = references[np.float64][3]["self_default"]
    try:
        est = _est().fit(net, X.numpy(), y.numpy()[:, None])
    except ValueError as exc:
        if "y" not in str(exc):
            pytest.fail(f"the ValueError does not name y: {exc}")
    else:
        if not _same(est.loss_change(FOLDS), expected):
            pytest.fail("(N, 1) labels answer differently from the 1-d labels")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_are_refused(tiny_classification, dtype):
    # bfloat16 and float16 models are refused (TypeError) before any gradient pass.
    net, X, y = tiny_classification
    half = copy.deepcopy(net).to(dtype)
    with mock.patch(
        "sklearn_cif.passes.per_example_grads", side_effect=AssertionError("pass ran")
    ):
        with pytest.raises(TypeError, match="float32 or float64"):
            _est().fit(half, X.to(dtype), y)
        with pytest.raises(TypeError, match="float32 or float64"):
            _est().fit(half, X, y)


# -- 3. numerical faults -------------------------------------------------------
def test_overflowing_float32_model_raises_and_installs_nothing(tiny_classification):
    # A float32 model overflowing in fit raises FloatingPointError and installs nothing.
    net, X, y = tiny_classification
    net32, X32 = copy.deepcopy(net).float(), X.float()
    est = _est().fit(net32, X32, y)
    before = _fit_answers(est)
    fingerprint = est.data_fingerprint_
    bad = copy.deepcopy(net32)
    with torch.no_grad():
        bad[2].weight.mul_(1e20)
    fresh = _est()
    for target in (est, fresh):
        with pytest.raises(FloatingPointError, match=r"(?i)non-finite|not finite"):
            target.fit(bad, X32, y)
    after = _fit_answers(est)
    for key, value in before.items():
        assert _same(after[key], value), key
    assert est.data_fingerprint_ == fingerprint
    assert est.is_current(net32) and not est.is_current(bad)
    with pytest.raises(NotFittedError):
        fresh.param_change(FOLDS)


@pytest.mark.parametrize("container", ["tensor", "numpy"])
def test_nan_regression_target_is_refused_at_validation(tiny_regression, container):
    # A NaN regression target is refused before any pass, in fit and eval queries.
    net, X, y = tiny_regression
    est = ClusteredInfluenceEstimator(3, loss="mse", random_state=0).fit(net, X, y)
    before = est.loss_change([np.arange(5)])
    yb = y.clone()
    yb[2, 1] = float("nan")
    yb = yb if container == "tensor" else yb.numpy()
    with mock.patch(
        "sklearn_cif.passes.per_example_grads", side_effect=AssertionError("pass ran")
    ):
        with pytest.raises(ValueError, match="contains NaN"):
            est.fit(net, X, yb)
        with pytest.raises(ValueError, match="contains NaN"):
            est.loss_change([np.arange(5)], X, yb)
    assert _same(est.loss_change([np.arange(5)]), before)


@pytest.mark.parametrize(
    "params",
    [{"residual_correction": "none"}, {"correction_rank": 2}],
    ids=["no-preconditioner", "rank-2-preconditioner"],
)
def test_tiny_damping_and_two_iterations_warn_convergence(tiny_classification, params):
    # damping=1e-12 with cg_maxiter=2 cannot reach cg_tol: ConvergenceWarning.
    net, X, y = tiny_classification
    est = _est(damping=1e-12, cg_maxiter=2, solver="cg", cg_tol=1e-5, **params)
    with pytest.warns(ConvergenceWarning, match="cg_tol"):
        est.fit(net, X, y)
    assert np.all(est.cg_residuals_ > est.cg_tol_)


def test_exact_preconditioner_converges_in_two_iterations(tiny_classification):
    # Default rank 128 >= p = 43 makes the preconditioner exact: no warning.
    net, X, y = tiny_classification
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        est = _est(damping=1e-12, cg_maxiter=2, solver="cg").fit(net, X, y)
    assert np.all(est.cg_residuals_ <= est.cg_tol_)


@pytest.mark.parametrize("n_clusters", [4, N])
def test_huge_damping_gives_scaled_gradient_sums(tiny_classification, n_clusters):
    # damping=1e6: param_change = sum of autograd per-example gradients / (N lambda).
    net, X, y = tiny_classification
    lam = 1e6
    est = _est(n_clusters=n_clusters, damping=lam).fit(net, X, y)
    g = loop_grads(net, lambda z, t: F.cross_entropy(z, t, reduction="none"), X, y)
    g = g.numpy()
    labels = est.labels_
    if n_clusters == N:
        subsets = [np.array([0]), np.arange(5, 17), np.arange(N)]
    else:
        subsets = [np.flatnonzero(labels == c) for c in range(est.n_clusters_)]
        subsets += [np.flatnonzero(labels <= 1), np.arange(N)]
    expected = np.stack([g[s].sum(0) for s in subsets]) / (N * lam)
    got = est.param_change(subsets)
    np.testing.assert_allclose(
        got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max()
    )


@pytest.mark.parametrize(
    "params, fragment",
    [
        ({"cg_tol": 0.0}, "cg_tol"),
        ({"cg_tol": 1.0}, "cg_tol"),
        ({"cg_tol": 2.0}, "cg_tol"),
        ({"cg_tol": float("nan")}, "cg_tol"),
        ({"damping": float("nan")}, "damping"),
        ({"damping": 0.0}, "damping"),
        ({"damping": -1.0}, "damping"),
        ({"damping": float("inf")}, "damping"),
        ({"params": ["2.bias", "2.bias"]}, "more than once"),
    ],
    ids=lambda v: repr(v) if not isinstance(v, str) else v,
)
def test_bad_solver_parameters_are_refused_before_any_pass(
    tiny_classification, params, fragment
):
    # Bad cg_tol, damping or a repeated params name: ValueError before any pass.
    net, X, y = tiny_classification
    with mock.patch(
        "sklearn_cif.passes.per_example_grads", side_effect=AssertionError("pass ran")
    ):
        with pytest.raises(ValueError, match=fragment):
            _est(**params).fit(net, X, y)


# -- 4. interrupts -------------------------------------------------------------
def _all_answers(est, X, y):
    return {
        **_fit_answers(est),
        "transform": est.transform(X, y),
        "membership": est.membership(FOLDS).toarray(),
        "eval": est.loss_change(FOLDS, X[:10], y[:10]),
    }


@pytest.mark.parametrize(
    "target, solver",
    [
        ("sklearn_cif.passes.per_example_grads", "auto"),
        ("sklearn_cif._build.block_cg", "cg"),
        ("sklearn_cif._build.dense_eigh", "dense"),
    ],
)
def test_keyboard_interrupt_in_a_refit_changes_no_answer(
    tiny_classification, target, solver
):
    # A KeyboardInterrupt in a refit's gradient pass, CG or dense
    # factorization changes no answer.
    net, X, y = tiny_classification
    est = _est(solver=solver).fit(net, X, y)
    before = _all_answers(est, X, y)
    fingerprint = est.data_fingerprint_
    Xf, yf = X.flip(0), y.flip(0)
    assert _est(solver=solver).fit(net, Xf, yf).data_fingerprint_ != fingerprint
    with mock.patch(target, side_effect=KeyboardInterrupt) as hook:
        with pytest.raises(KeyboardInterrupt):
            est.fit(net, Xf, yf)
    assert hook.called
    assert est.data_fingerprint_ == fingerprint and est.is_current(net, X, y)
    after = _all_answers(est, X, y)
    for key, value in before.items():
        assert _same(after[key], value), key


def test_keyboard_interrupt_in_a_query_changes_no_later_answer(tiny_classification):
    # A KeyboardInterrupt inside transform changes no later answer.
    net, X, y = tiny_classification
    est = _est().fit(net, X, y)
    before = _all_answers(est, X, y)
    with mock.patch(
        "sklearn_cif.passes.per_example_grads", side_effect=KeyboardInterrupt
    ) as hook:
        with pytest.raises(KeyboardInterrupt):
            est.transform(X, y)
    assert hook.called
    after = _all_answers(est, X, y)
    for key, value in before.items():
        assert _same(after[key], value), key


# -- 5. crafted or damaged cache files -----------------------------------------
@pytest.fixture(scope="module")
def saved(fitted, tmp_path_factory):
    path = tmp_path_factory.mktemp("cache") / "cache.npz"
    fitted.save(path)
    return path


def _members(path):
    with zipfile.ZipFile(path) as zf:
        return {name: zf.read(name) for name in zf.namelist()}


def _write_zip(path, members):
    with zipfile.ZipFile(path, "w") as zf:
        for name, blob in members.items():
            zf.writestr(name, blob)
    return path


def _npy(array, allow_pickle=False):
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=allow_pickle)
    return buf.getvalue()


def _meta_blob(meta):
    text = meta if isinstance(meta, str) else json.dumps(meta)
    return _npy(np.frombuffer(text.encode(), dtype=np.uint8))


def _meta(members):
    return json.loads(bytes(np.load(io.BytesIO(members["__meta__.npy"]))))


def _load_quietly(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ClusteredInfluenceEstimator.load(path)


def test_saved_cache_loads_and_answers_bitwise(fitted, saved):
    # The undamaged file the attacks start from loads and answers bitwise.
    loaded = _load_quietly(saved)
    assert _same(loaded.param_change(FOLDS), fitted.param_change(FOLDS))
    assert _same(loaded.loss_change(FOLDS), fitted.loss_change(FOLDS))


@pytest.mark.parametrize("cut", [0, 1, 4, 30, 0.1, 0.5, 0.9, -22, -1])
def test_truncated_cache_is_not_readable(saved, tmp_path, cut):
    # A cache file cut anywhere raises ValueError 'not a readable'.
    blob = saved.read_bytes()
    end = cut if isinstance(cut, int) else int(cut * len(blob))
    path = tmp_path / "cut.npz"
    path.write_bytes(blob[:end])
    with pytest.raises(ValueError, match="not a readable"):
        _load_quietly(path)


@pytest.fixture(scope="module")
def flip_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("flips")


@fuzz(40)
@given(bit=st.integers(0, 2**40))
def test_a_flipped_bit_raises_value_error_or_loads(saved, flip_dir, bit):
    # One flipped bit: load raises ValueError or loads; then only ValueError.
    blob = bytearray(saved.read_bytes())
    bit %= 8 * len(blob)
    blob[bit // 8] ^= 1 << (bit % 8)
    path = flip_dir / "flipped.npz"
    path.write_bytes(bytes(blob))
    try:
        loaded = _load_quietly(path)
    except ValueError:
        return
    try:
        loaded.param_change(FOLDS)
    except ValueError:
        pass


def _central_directory(blob):
    return blob.index(b"PK\x01\x02")


def _cd_method_99(blob):
    blob = bytearray(blob)
    struct.pack_into("<H", blob, _central_directory(blob) + 10, 99)
    return bytes(blob)


def _cd_flag(bits):
    def damage(blob):
        blob = bytearray(blob)
        at = _central_directory(blob) + 8
        flags = struct.unpack_from("<H", blob, at)[0]
        struct.pack_into("<H", blob, at, flags | bits)
        return bytes(blob)

    return damage


ZIP_ESCAPES = {
    "compression method 99": (_cd_method_99, NotImplementedError),
    "encrypted flag": (_cd_flag(0x1), RuntimeError),
    "strong encryption flag": (_cd_flag(0x40), NotImplementedError),
    "patched data flag": (_cd_flag(0x20), NotImplementedError),
}


@pytest.mark.parametrize(
    "case",
    [case for case in ZIP_ESCAPES],
)
def test_damaged_zip_header_fields_raise_value_error(saved, tmp_path, case):
    # Unknown compression or encryption flags in the zip directory: ValueError.
    damage, _ = ZIP_ESCAPES[case]
    path = tmp_path / "damaged.npz"
    path.write_bytes(damage(saved.read_bytes()))
    with pytest.raises(ValueError, match="not a readable"):
        _load_quietly(path)


@pytest.mark.parametrize("member", ["__meta__.npy", "train_loss.npy"])
def test_unparsable_npy_header_raises_value_error(saved, tmp_path, member):
    # A member whose .npy header cannot be parsed is a damaged file: ValueError.
    members = _members(saved)
    members[member] = members[member].replace(b"}", b" ", 1)
    with pytest.raises(ValueError, match="not a readable"):
        _load_quietly(_write_zip(tmp_path / "header.npz", members))


def test_deeply_nested_metadata_raises_value_error(saved, tmp_path):
    # Metadata JSON nested far too deep is refused with ValueError.
    members = _members(saved)
    members["__meta__.npy"] = _meta_blob("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match="not a readable"):
        _load_quietly(_write_zip(tmp_path / "deep.npz", members))


_EXECUTED = []


def _record_execution():
    _EXECUTED.append(True)
    return "ran"


class _Payload:
    """Unpickling this runs ``_record_execution``."""

    def __reduce__(self):
        return (_record_execution, ())


def test_foreign_files_are_refused_without_running_code(saved, tmp_path):
    # Plain .npy, pickles and object arrays are refused and nothing is unpickled.
    np.save(tmp_path / "plain.npy", np.zeros(3))
    (tmp_path / "est.pkl").write_bytes(pickle.dumps(_load_quietly(saved)))
    (tmp_path / "payload.pkl").write_bytes(pickle.dumps(_Payload()))
    np.savez(tmp_path / "objects.npz", a=np.array([_Payload(), 1], dtype=object))
    members = _members(saved)
    members["labels.npy"] = _npy(np.array([_Payload()] * N, dtype=object), True)
    _write_zip(tmp_path / "object_member.npz", members)
    members = _members(saved)
    members["__meta__.npy"] = _npy(np.array([_Payload()], dtype=object), True)
    _write_zip(tmp_path / "object_meta.npz", members)
    for name in (
        "plain.npy",
        "est.pkl",
        "payload.pkl",
        "objects.npz",
        "object_member.npz",
        "object_meta.npz",
    ):
        with pytest.raises(ValueError, match="not a readable"):
            _load_quietly(tmp_path / name)
    assert not _EXECUTED


def test_malformed_metadata_is_refused(saved, tmp_path):
    # Metadata that is a list, lacks version, or is not JSON/bytes: ValueError.
    members = _members(saved)
    meta = _meta(members)
    no_version = {k: v for k, v in meta.items() if k != "version"}
    cases = {
        "list": (_meta_blob("[1, 2, 3]"), "not a JSON object"),
        "no version": (_meta_blob(no_version), "version"),
        "version not a string": (_meta_blob({**meta, "version": 1}), "version"),
        "not json": (_meta_blob("{'format': 1"), "not a readable"),
        "not utf-8": (_npy(np.frombuffer(b"\xff\xfe{", np.uint8)), "not a readable"),
        "float metadata": (_npy(np.zeros(4)), "not a byte string"),
        "2-d metadata": (_npy(np.zeros((2, 2), np.uint8)), "not a byte string"),
    }
    for case, (blob, fragment) in cases.items():
        bad = dict(members, **{"__meta__.npy": blob})
        with pytest.raises(ValueError, match=fragment):
            _load_quietly(_write_zip(tmp_path / f"{case}.npz", bad))


@pytest.mark.parametrize("key", ["save", "fit", "__class__", "__dict__", "load"])
def test_members_named_like_methods_are_unknown_keys(saved, tmp_path, key):
    # A member named like a method or a dunder is refused as an unknown key.
    members = _members(saved)
    members[f"{key}.npy"] = _npy(np.zeros(3))
    with pytest.raises(ValueError, match="unknown keys"):
        _load_quietly(_write_zip(tmp_path / "method.npz", members))


def test_missing_file_is_file_not_found(tmp_path):
    # A path with no file raises FileNotFoundError naming it.
    with pytest.raises(FileNotFoundError, match="No cache file"):
        ClusteredInfluenceEstimator.load(tmp_path / "nothing.npz")
