"""Quantization: passes and presets, calibrators, quantized modules, post-training quantization."""

from .config import QuantConfig
from .passes import (
                     AWQ,
                     GPTQ,
                     Activations,
                     AdaRound,
                     BiasCorrection,
                     Embeddings,
                     Equalize,
                     HalfPrecision,
                     KeepFloat,
                     MixedPrecision,
                     OutlierChannels,
                     Quantize,
                     QuantPass,
                     SmoothQuant,
                     Weights,
                     pass_handler,
                     quant_pass,
)
from .presets import PRESETS, resolve_quantize
from .ptq import QuantPlan, apply_plan, quantize_ptq

__all__ = ["PRESETS", "QuantConfig", "QuantPlan", "apply_plan", "quantize_ptq", "Quantize", "QuantPass", "Weights",
           "Activations", "Embeddings", "Equalize", "SmoothQuant", "OutlierChannels", "GPTQ", "AWQ", "AdaRound",
           "BiasCorrection", "MixedPrecision", "KeepFloat", "HalfPrecision", "quant_pass", "pass_handler", "resolve_quantize"]
