"""herder: an elastic cloud dispatcher with pluggable drivers."""

__version__ = "0.1.0"
