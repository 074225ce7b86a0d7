"""Knowledge distillation: losses usable in any training loop; offline, online and self distillation."""

from .config import DistillConfig
from .features import FeatureKD
from .losses import KDLoss
from .offline import distill_offline
from .online import Cohort, MutualLoss, distill_online
from .self_distill import ExitLoss, distill_exits, distill_generations
from .students import block_list, choose_layers, drop_layers

__all__ = ["KDLoss", "FeatureKD", "DistillConfig", "distill_offline", "MutualLoss", "Cohort", "distill_online",
           "ExitLoss", "distill_exits", "distill_generations", "block_list", "drop_layers", "choose_layers"]
