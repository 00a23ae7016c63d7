"""Clustered influence functions (CiF) for PyTorch and skorch models."""

from sklearn_cif import metrics
from sklearn_cif._cif import FAST_PRESET, ClusteredInfluenceEstimator
from sklearn_cif._per_query import PerQueryInfluence
from sklearn_cif._version import __version__
from sklearn_cif.exceptions import CIFWarning
from sklearn_cif.model_selection import InfluenceCV, influence_cross_validate

__all__ = [
    "FAST_PRESET",
    "CIFWarning",
    "ClusteredInfluenceEstimator",
    "InfluenceCV",
    "PerQueryInfluence",
    "influence_cross_validate",
    "metrics",
    "__version__",
]
