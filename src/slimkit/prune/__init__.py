"""Pruning: structured (channels, with a traced dependency graph), unstructured and N:M."""

from .config import IMPORTANCE, METHODS, PruneConfig
from .dependency import Group, Member, dependency_groups
from .plan import PrunePlan, apply_plan, prune_model, search

__all__ = ["IMPORTANCE", "METHODS", "PruneConfig", "PrunePlan", "apply_plan", "prune_model", "search",
           "dependency_groups", "Group", "Member"]
