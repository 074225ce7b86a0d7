"""Knowledge distillation: losses usable in any training loop."""

from .features import FeatureKD
from .losses import KDLoss

__all__ = ["KDLoss", "FeatureKD"]
