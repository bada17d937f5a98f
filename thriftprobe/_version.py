"""The one source of the package's version: setup.py reads it, the package root re-exports it,
and modules inside the package import it from here (never from the package root)."""

__version__ = "0.1.0"
