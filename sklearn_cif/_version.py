"""The package version, in a module of its own (no import cycle to hide)."""

__version__ = "0.2.0"
