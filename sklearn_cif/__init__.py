"""Clustered influence functions (CiF) for PyTorch and skorch models."""

from sklearn_cif.estimator import ClusteredInfluenceEstimator, PerQueryInfluence
from sklearn_cif.exceptions import CIFWarning
from sklearn_cif.model_selection import InfluenceCV, influence_cross_validate

__version__ = "0.1.0"

__all__ = [
    "CIFWarning",
    "ClusteredInfluenceEstimator",
    "InfluenceCV",
    "PerQueryInfluence",
    "influence_cross_validate",
    "__version__",
]
