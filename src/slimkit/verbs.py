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

__all__ = ["VERBS", "DESCRIPTIONS", "describe"]

VERBS: dict[str, tuple[type, Mapping[str, Any]]] = {
    "quantize": (QuantConfig, QUANT_PRESETS),
    "qat": (QATConfig, QAT_PRESETS),
    "prune": (PruneConfig, PRUNE_PRESETS),
    "factorize": (FactorizeConfig, FACTORIZE_PRESETS),
    "distill": (DistillConfig, DISTILL_PRESETS),
}

# One line per preset: what it is and what it is good for (``slimkit presets``, the README's table).
DESCRIPTIONS: dict[str, dict[str, str]] = {
    "quantize": {
        "int8": "static INT8 (calibrated): CNNs and transformers on the CPU; needs calibration data; ~4x smaller",
        "int8-dynamic": "dynamic INT8 Linear layers, no calibration data: transformers and LSTMs on the CPU",
        "int8-smoothquant": "dynamic INT8 with SmoothQuant and float outlier channels: transformers whose "
                            "activations have outliers; needs calibration data",
        "int8-percentile": "static INT8 with percentile (99.99) activation ranges; needs calibration data",
        "int8-entropy": "static INT8 with KL-divergence ranges (can over-clip CNNs); needs calibration data",
        "int8-cle": "static INT8 after cross-layer equalization and bias correction: depthwise CNNs; needs data",
        "w4a8": "4-bit weights on a clipped grid, INT8 activations (stem, classifier, depthwise in INT8); needs data",
        "w4a8-adaround": "w4a8 with AdaRound's learned rounding (slow: minutes per layer on 2 cores); needs data",
        "int4-weight": "4-bit weight-only Linear layers in groups of 128 (MatMulNBits): LLMs, no data; ~7x smaller",
        "int4-gptq": "int4-weight with GPTQ's error-compensating rounding: LLMs; needs calibration data",
        "int4-awq": "int4-weight with AWQ's activation-aware channel scaling: LLMs; needs calibration data",
    },
    "qat": {
        "int8": "INT8 quantization-aware training (fake quantization, straight-through estimator)",
        "w4a8": "4-bit weights, INT8 activations, trained with the straight-through estimator",
        "w4a8-lsq": "w4a8 with learned step sizes (LSQ)",
        "w4a8-pact": "w4a8 with learned activation clipping (PACT)",
    },
    "prune": {
        "channels-50": "structured: half the channels removed (counts multiples of 8), a smaller dense model",
        "unstructured-80": "80% of the weights zeroed by magnitude, one global threshold (smaller once compressed)",
        "2:4": "N:M sparsity, 2 of every 4 weights kept (the pattern sparse tensor cores run)",
    },
    "factorize": {
        "svd-50": "truncated SVD of Linear layers and 1x1 convs, half the weights kept",
        "svd-whitened-50": "data-whitened SVD (SVD-LLM), half the weights kept: transformers; needs data",
    },
    "distill": {
        "kd": "offline response distillation (Hinton's soft targets, T=4, alpha 0.5) from a frozen teacher",
        "mutual": "online deep mutual learning: the student and its peers teach each other",
    },
}


def describe(verb: str, name: str) -> str:
    """The preset's one-line description."""
    return DESCRIPTIONS[verb][name]
