"""Training: the loop shared by every family that trains."""

from .fit import accuracy, fit

__all__ = ["accuracy", "fit"]
