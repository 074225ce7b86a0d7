"""Low-rank decomposition: SVD of Linear layers; spatial SVD, Tucker-2 and CP of convolutions."""

from .config import METHODS, FactorizeConfig
from .plan import FactorPlan, apply_plan, factorize_model, search

__all__ = ["METHODS", "FactorizeConfig", "FactorPlan", "apply_plan", "factorize_model", "search"]
