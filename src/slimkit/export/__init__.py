"""The only layer that knows ONNX: export, running in ONNX Runtime, parity, latency and lint."""

from .lint import LintReport, lint
from .onnx import ExportReport, ParityError, export_onnx
from .runtime import OrtModule, Parity, check_parity, measure_latency, session

__all__ = ["ExportReport", "LintReport", "Parity", "ParityError", "check_parity", "export_onnx",
           "lint", "measure_latency", "OrtModule", "session"]
