"""Bundled data sets, installed with the package's dependencies (nothing is downloaded)."""

from .digits import Digits, batches, digits_accuracy, load_digits32, task
from .text import docstring_sentences

__all__ = ["Digits", "batches", "load_digits32", "docstring_sentences", "task", "digits_accuracy"]
