"""Warnings specific to sklearn_cif."""

__all__ = ["CIFWarning"]


class CIFWarning(UserWarning):
    """A recoverable situation worth knowing (device or method fallback).

    Numerical trouble is reported separately (``ConvergenceWarning``,
    ``FloatingPointError``), so filtering this class never hides it.

    Examples
    --------
    >>> import warnings
    >>> from sklearn_cif import CIFWarning
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore", CIFWarning)  # e.g. CPU fallbacks
    ...     warnings.warn("computing on the CPU", CIFWarning)
    """
