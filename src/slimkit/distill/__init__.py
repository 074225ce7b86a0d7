"""Knowledge distillation: losses usable in any training loop, and offline distillation."""

from .config import DistillConfig
from .features import FeatureKD
from .losses import KDLoss
from .offline import distill_offline

__all__ = ["KDLoss", "FeatureKD", "DistillConfig", "distill_offline"]
