"""The fitted CiF cache: one declared, immutable object.

:class:`CiFCache` holds every fitted array and scalar of a
:class:`~sklearn_cif.ClusteredInfluenceEstimator` and the fit-time settings
its answers depend on. ``fit`` builds a new one (:mod:`sklearn_cif._build`)
and installs it in one assignment, so an interrupted or failed fit leaves
the previous cache whole. The documented fitted attributes (``labels_``,
``responses_``, ...) are read-only views of its fields, and its field list
is the file format of ``save``/``load`` (:mod:`sklearn_cif._persistence`):
each field declares its shape in terms of the cache's dimensions.
"""

import dataclasses
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

__all__ = ["CiFCache", "PerQueryFit", "Seeds", "draw_seeds", "fitted_fields"]


class Seeds(NamedTuple):
    """One seed per consumer of randomness, drawn from ``random_state``."""

    sketch: int
    kmeans: int
    spectrum: int
    calibration: int
    curvature: int


def draw_seeds(rng):
    """The named seeds, drawn in one call from a ``RandomState``."""
    return Seeds(*(int(s) for s in rng.randint(np.iinfo(np.int32).max, size=5)))


def _array(*shape, kind="f", optional=False):
    """A field holding an array of ``shape`` (names of the cache's dimensions)."""
    return field(metadata={"shape": shape, "kind": kind, "optional": optional})


def _scalar(types, optional=False, attr=True):
    return field(metadata={"types": types, "optional": optional, "attr": attr})


@dataclass(frozen=True)
class CiFCache:
    """Everything a fitted :class:`~sklearn_cif.ClusteredInfluenceEstimator` knows.

    Dimensions: ``N`` training examples, ``C`` clusters, ``k`` sketch
    dimension, ``p`` parameters, ``d`` outputs per example, ``t`` target
    numbers per example, ``r`` kept
    eigenpairs, ``S`` curvature samples. Each field is documented on the
    estimator under its name with a trailing underscore.
    """

    labels: np.ndarray = _array("N", kind="i")
    cluster_sizes: np.ndarray = _array("C", kind="i")
    cluster_centers: np.ndarray = _array("C", "k")
    explained_scatter: float = _scalar(float)
    responses: np.ndarray = _array("C", "p")
    response_gram: np.ndarray = _array("C", "C")
    mean_response_products: np.ndarray = _array("C", "C")
    cluster_mean_norms: np.ndarray = _array("C")
    train_influence: np.ndarray = _array("N", "C")
    train_loss: np.ndarray = _array("N")
    train_outputs: np.ndarray = _array("N", "d")
    train_targets: np.ndarray = _array("N", "t")
    output_responses: np.ndarray = _array("N", "C", "d")
    residual_sq_norms: np.ndarray = _array("N")
    within_scatter: float = _scalar(float)
    self_influence: np.ndarray = _array("N")
    complement_curvature: float = _scalar(float, optional=True)
    correction: str = _scalar(str)
    solver: str = _scalar(str)
    curvature: str = _scalar(str)
    linear_outputs: bool = _scalar(bool)
    gradient_norm: float = _scalar(float)
    optimality_gap: float = _scalar(float)
    spectrum: np.ndarray = _array("r", optional=True)
    complement: float = _scalar(float, optional=True)
    truncation: float = _scalar(float, optional=True)
    damping_floor: float = _scalar(float)
    damping_diagonal: np.ndarray = _array("p", optional=True)
    spectral_basis: np.ndarray = _array("r", "p", optional=True)
    jacobian_spectral: np.ndarray = _array("N", "d", "r", optional=True)
    jacobian_gram: np.ndarray = _array("N", "d", "d", optional=True)
    output_hessians: np.ndarray = _array("N", "d", "d", optional=True)
    residual_jacobian: np.ndarray = _array("N", "d", optional=True)
    residual_spectral: np.ndarray = _array("N", "r", optional=True)
    cg_residuals: np.ndarray = _array("C")
    cg_tol: np.ndarray = _array("C")
    n_iter: np.ndarray = _array("C", kind="i")
    curvature_indices: np.ndarray = _array("S", kind="i", optional=True)
    loss_name: str = _scalar(str)
    n_clusters: int = _scalar(int)
    n_samples_fit: int = _scalar(int)
    n_features_in: int = _scalar(int)
    n_params: int = _scalar(int)
    n_data_passes: int = _scalar(int)
    n_ggn_products: int = _scalar(int)
    timings: dict = _scalar(dict)
    model_fingerprint: str = _scalar(str)
    data_fingerprint: str = _scalar(str)
    # Fit-time settings the answers depend on (pinned; not fitted attributes).
    settings: dict = _scalar(dict, attr=False)
    seeds: tuple = _scalar((list, tuple), attr=False)

    def dims(self):
        """The size of every dimension name used by the fields."""
        d = self.train_outputs.shape[1]
        r = 0 if self.spectrum is None else self.spectrum.shape[0]
        S = 0 if self.curvature_indices is None else self.curvature_indices.shape[0]
        return {
            "N": self.n_samples_fit,
            "C": self.n_clusters,
            "k": self.cluster_centers.shape[1],
            "p": self.n_params,
            "d": d,
            "t": self.train_targets.shape[1],
            "r": r,
            "S": S,
        }

    def newton_features(self):
        """The per-example Newton-step features, or ``None`` when not cached."""
        if self.jacobian_spectral is None:
            return None
        return {
            "F": self.jacobian_spectral,
            "gram": self.jacobian_gram,
            "hess": self.output_hessians,
            "Jr": self.residual_jacobian,
            "Ur": self.residual_spectral,
        }


@dataclass(frozen=True)
class PerQueryFit:
    """What a fitted :class:`~sklearn_cif.PerQueryInfluence` knows (no solves)."""

    curvature_indices: np.ndarray = _array("S", kind="i", optional=True)
    loss_name: str = _scalar(str)
    n_samples_fit: int = _scalar(int)
    n_features_in: int = _scalar(int)
    n_params: int = _scalar(int)
    model_fingerprint: str = _scalar(str)
    data_fingerprint: str = _scalar(str)
    settings: dict = _scalar(dict, attr=False)
    seeds: tuple = _scalar((list, tuple), attr=False)


def fitted_fields(cache_cls):
    """Names of the fields exposed as fitted attributes (``name + "_"``)."""
    return [
        f.name for f in dataclasses.fields(cache_cls) if f.metadata.get("attr", True)
    ]
