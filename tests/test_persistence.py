"""save/load: the cache's declared fields are the format; tampered files are refused."""

import io
import json
import zipfile

import numpy as np
import pytest
from numpy.lib import format as npy_format

from sklearn_cif import ClusteredInfluenceEstimator


@pytest.fixture
def saved(tiny_classification, tmp_path):
    net, X, y = tiny_classification
    est = ClusteredInfluenceEstimator(4, loss="cross_entropy", random_state=0)
    est.fit(net, X, y)
    path = tmp_path / "cache.npz"
    est.save(path)
    return est, path


def _members(path):
    with zipfile.ZipFile(path) as zf:
        return {name: zf.read(name) for name in zf.namelist()}


def _write(path, members):
    with zipfile.ZipFile(path, "w") as zf:
        for name, blob in members.items():
            zf.writestr(name, blob)
    return path


def _npy(array):
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def _meta(members):
    return json.loads(bytes(np.load(io.BytesIO(members["__meta__.npy"]))))


def test_round_trip_is_every_field_bitwise(saved):
    # Every array and scalar of the cache comes back identical, and queries
    # (self effects with both targets, bounds) answer bitwise.
    est, path = saved
    loaded = ClusteredInfluenceEstimator.load(path)
    for name in ("labels_", "responses_", "train_influence_", "jacobian_spectral_"):
        a, b = getattr(est, name), getattr(loaded, name)
        assert a.dtype == b.dtype and np.array_equal(a, b)
    assert loaded.timings_ == est.timings_ and loaded.n_clusters_ == est.n_clusters_
    folds = [np.arange(0, 10), np.arange(10, 30)]
    for target in ("if", "retrain"):
        np.testing.assert_array_equal(
            loaded.loss_change(folds, target=target),
            est.loss_change(folds, target=target),
        )
    assert loaded.error_bound(5) == est.error_bound(5)


@pytest.mark.parametrize("key", ["save", "extra_", "__class__"])
def test_unknown_keys_are_refused(saved, tmp_path, key):
    # A member that is not a declared field (a method name included) is refused.
    _, path = saved
    members = _members(path)
    members[f"{key}.npy"] = _npy(np.zeros(3))
    with pytest.raises(ValueError, match="unknown keys"):
        ClusteredInfluenceEstimator.load(_write(tmp_path / "bad.npz", members))


def test_wrong_shape_dtype_and_size_are_refused(saved, tmp_path):
    # Shapes follow the cache's dimensions, dtypes their kind, and a header
    # cannot claim more data than the file holds (nothing is allocated).
    _, path = saved
    members = _members(path)
    cases = {
        "shape": ("responses.npy", _npy(np.zeros((3, 2)))),
        "dtype": ("labels.npy", _npy(np.zeros(30))),
    }
    for what, (name, blob) in cases.items():
        bad = dict(members, **{name: blob})
        with pytest.raises(ValueError, match="has shape|has dtype"):
            ClusteredInfluenceEstimator.load(_write(tmp_path / f"{what}.npz", bad))
    # a header claiming 10**12 float64 train losses over the real 30
    header = io.BytesIO()
    npy_format.write_array_header_1_0(
        header, {"descr": "<f8", "fortran_order": False, "shape": (10**12,)}
    )
    lie = header.getvalue() + members["train_loss.npy"][128:]
    meta = _meta(members)
    meta["dims"]["N"] = 10**12
    bad = dict(members)
    bad["train_loss.npy"] = lie
    bad["__meta__.npy"] = _npy(np.frombuffer(json.dumps(meta).encode(), np.uint8))
    with pytest.raises(ValueError, match="not a readable"):
        ClusteredInfluenceEstimator.load(_write(tmp_path / "lie.npz", bad))


def test_bad_scalars_and_missing_fields_are_refused(saved, tmp_path):
    # Scalar fields are type-checked; a missing required array is refused.
    _, path = saved
    members = _members(path)
    meta = _meta(members)
    meta["scalars"]["n_clusters"] = "four"
    bad = dict(members)
    bad["__meta__.npy"] = _npy(np.frombuffer(json.dumps(meta).encode(), np.uint8))
    with pytest.raises(ValueError, match="n_clusters"):
        ClusteredInfluenceEstimator.load(_write(tmp_path / "scalar.npz", bad))
    bad = {k: v for k, v in members.items() if k != "responses.npy"}
    with pytest.raises(ValueError, match="missing array 'responses'"):
        ClusteredInfluenceEstimator.load(_write(tmp_path / "missing.npz", bad))
    meta = _meta(members)
    meta["params"]["fit"] = 1
    bad = dict(members)
    bad["__meta__.npy"] = _npy(np.frombuffer(json.dumps(meta).encode(), np.uint8))
    with pytest.raises(ValueError, match="unknown parameters"):
        ClusteredInfluenceEstimator.load(_write(tmp_path / "param.npz", bad))


def test_compressed_members_are_refused(saved, tmp_path):
    # A cache rewritten with deflate-compressed members is refused: a
    # compressed member's size is not the bytes the file holds.
    _, path = saved
    members = _members(path)
    bad = tmp_path / "deflated.npz"
    with zipfile.ZipFile(bad, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, blob in members.items():
            zf.writestr(name, blob)
    with pytest.raises(ValueError, match="not a readable.*compressed"):
        ClusteredInfluenceEstimator.load(bad)
