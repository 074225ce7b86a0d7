"""Pruning: structured (channels, with a traced dependency graph), unstructured and N:M; during
training with the gradual polynomial schedule; fine-tuning that keeps the zeros (``hold_zeros``);
at run time by early exit (``EarlyExit``)."""

from .config import IMPORTANCE, METHODS, PruneConfig
from .dependency import Group, Member, dependency_groups
from .early_exit import EarlyExit
from .gradual import GradualPruning, polynomial_sparsity
from .masks import hold_zeros
from .plan import PrunePlan, apply_plan, prune_model, search
from .sensitivity import sensitivity_scan

__all__ = ["IMPORTANCE", "METHODS", "PruneConfig", "PrunePlan", "apply_plan", "prune_model", "search",
           "dependency_groups", "Group", "Member", "GradualPruning", "polynomial_sparsity", "hold_zeros",
           "sensitivity_scan", "EarlyExit"]
