"""Clustered influence functions (CiF) for PyTorch and skorch models."""

from sklearn_cif.estimator import ClusteredInfluenceEstimator, PerQueryInfluence
from sklearn_cif.exceptions import CIFWarning

__version__ = "0.1.0"

__all__ = [
    "CIFWarning",
    "ClusteredInfluenceEstimator",
    "PerQueryInfluence",
    "__version__",
]
