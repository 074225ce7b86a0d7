"""Quantization: configs, calibrators, quantized modules, post-training quantization."""

from .config import PRESETS, QuantConfig
from .ptq import QuantPlan, apply_plan, quantize_ptq

__all__ = ["PRESETS", "QuantConfig", "QuantPlan", "apply_plan", "quantize_ptq"]
