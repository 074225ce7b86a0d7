"""Bundled data sets, installed with the package's dependencies (nothing is downloaded)."""

from .digits import Digits, batches, load_digits32

__all__ = ["Digits", "batches", "load_digits32"]
