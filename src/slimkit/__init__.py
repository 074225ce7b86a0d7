"""slimkit: make trained PyTorch models smaller and faster, and prove it in ONNX Runtime.

>>> import torch, slimkit as sk
>>> model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
>>> q = sk.quantize(model, "int8", calib_data=[torch.randn(16, 8)])
>>> q(torch.randn(2, 8)).shape
torch.Size([2, 2])
"""

from __future__ import annotations

from slimkit import api as _api
from slimkit import distill, prune
from slimkit.api import factorize, presets, qat, qat_presets, quantize
from slimkit.core.batch import inputs_only
from slimkit.core.verbmodule import callable_package
from slimkit.distill import DistillConfig, FeatureKD, KDLoss
from slimkit.export import ExportReport, ParityError, export_onnx
from slimkit.io import load, save, skeleton
from slimkit.lowrank import FactorizeConfig
from slimkit.prune import PruneConfig
from slimkit.quant import QuantConfig, Quantize
from slimkit.quant.qat import QATConfig

# ``slimkit.prune`` and ``slimkit.distill`` are packages and verbs at once: ``sk.prune(model, ...)``
# calls the verb, ``slimkit.prune.GradualPruning`` is the package's (the verb no longer shadows it).
callable_package(prune, _api.prune)
callable_package(distill, _api.distill)

__version__ = "0.1.0"

__all__ = ["quantize", "factorize", "FactorizeConfig", "prune", "PruneConfig", "KDLoss", "FeatureKD", "distill", "DistillConfig", "presets", "qat_presets", "export_onnx", "save", "load", "skeleton", "QuantConfig", "Quantize", "qat", "QATConfig", "ExportReport",
           "ParityError", "inputs_only", "__version__"]


