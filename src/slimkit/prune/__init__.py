"""Pruning: structured (channels, with a traced dependency graph), depth (residual blocks),
unstructured and N:M; during training with the gradual polynomial schedule or a sparsity penalty
(``SparsityPenalty``); after training in rounds (``prune_iteratively``); fine-tuning that keeps the
zeros (``hold_zeros``); at run time by early exit (``EarlyExit``)."""

from .config import IMPORTANCE, METHODS, PruneConfig
from .dependency import Group, Member, dependency_groups
from .dynamic import DynamicSparsity, SparseTrainConfig, sparse_train
from .early_exit import EarlyExit
from .gradual import GradualPruning, polynomial_sparsity
from .iterative import prune_iteratively, round_sparsities
from .layers import PrunableLayer, register_prunable, unregister_prunable
from .masks import hold_zeros
from .plan import PrunePlan, apply_plan, prune_model, search
from .regularize import SparsityPenalty
from .sensitivity import sensitivity_scan

__all__ = ["IMPORTANCE", "METHODS", "PruneConfig", "PrunePlan", "apply_plan", "prune_model", "search",
           "dependency_groups", "Group", "Member", "GradualPruning", "polynomial_sparsity", "hold_zeros",
           "sensitivity_scan", "EarlyExit", "SparsityPenalty", "prune_iteratively", "round_sparsities",
           "PrunableLayer", "register_prunable", "unregister_prunable", "DynamicSparsity",
           "SparseTrainConfig", "sparse_train"]
