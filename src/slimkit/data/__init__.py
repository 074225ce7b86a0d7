"""Bundled data sets, installed with the package's dependencies (nothing is downloaded)."""

from .digits import Digits, batches, load_digits32
from .text import docstring_sentences

__all__ = ["Digits", "batches", "load_digits32", "docstring_sentences"]
