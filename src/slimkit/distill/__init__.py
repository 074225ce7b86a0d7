"""Knowledge distillation: losses usable in any training loop."""

from .losses import KDLoss

__all__ = ["KDLoss"]
