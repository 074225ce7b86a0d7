"""Each verb's config class and named configs (presets), in one table: ``sk.presets(verb)``, the
verbs themselves and recipe stages all read it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from slimkit.distill.config import PRESETS as DISTILL_PRESETS
from slimkit.distill.config import DistillConfig
from slimkit.lowrank.config import PRESETS as FACTORIZE_PRESETS
from slimkit.lowrank.config import FactorizeConfig
from slimkit.prune.config import PRESETS as PRUNE_PRESETS
from slimkit.prune.config import PruneConfig
from slimkit.quant.config import PRESETS as QUANT_PRESETS
from slimkit.quant.config import QuantConfig
from slimkit.quant.qat import QAT_PRESETS, QATConfig

__all__ = ["VERBS"]

VERBS: dict[str, tuple[type, Mapping[str, Any]]] = {
    "quantize": (QuantConfig, QUANT_PRESETS),
    "qat": (QATConfig, QAT_PRESETS),
    "prune": (PruneConfig, PRUNE_PRESETS),
    "factorize": (FactorizeConfig, FACTORIZE_PRESETS),
    "distill": (DistillConfig, DISTILL_PRESETS),
}
