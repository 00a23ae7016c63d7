"""Warnings specific to sklearn_cif."""

__all__ = ["CIFWarning"]


class CIFWarning(UserWarning):
    """A recoverable situation worth knowing (device or method fallback)."""
