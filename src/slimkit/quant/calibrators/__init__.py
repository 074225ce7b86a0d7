"""Calibrators (observers): min-max, moving average, percentile, KL/entropy and MSE.

>>> import torch
>>> make_observer("percentile", percentile=99.0).name
'percentile'
"""

from __future__ import annotations

from typing import Any

from .base import Observer
from .entropy import EntropyObserver
from .minmax import MinMaxObserver, MovingAverageObserver
from .mse import MSEObserver
from .percentile import PercentileObserver

CALIBRATORS: dict[str, type[Observer]] = {
    "minmax": MinMaxObserver,
    "moving_average": MovingAverageObserver,
    "percentile": PercentileObserver,
    "entropy": EntropyObserver,
    "mse": MSEObserver,
}

__all__ = ["CALIBRATORS", "Observer", "make_observer", *[c.__name__ for c in CALIBRATORS.values()]]


def make_observer(name: str, **kwargs: Any) -> Observer:
    if name not in CALIBRATORS:
        raise ValueError(f"unknown calibrator {name!r}; available: {', '.join(CALIBRATORS)}")
    return CALIBRATORS[name](**kwargs)
