"""The only layer that knows ONNX: export (for ONNX Runtime, OpenVINO, TVM, TensorRT; to TFLite for LiteRT), running files in ONNX Runtime, OpenVINO, TVM and LiteRT, parity, latency and lint."""

from .early_exit import EarlyExitReport, EarlyExitSession, export_early_exit
from .generative import GenerativeReport
from .generator import Generation, Generator
from .lint import LintReport, lint
from .onnx import ExportReport, ParityError, export_onnx
from .runtime import OrtModule, Parity, check_parity, measure_latency, session

__all__ = ["Generation", "Generator", "GenerativeReport", "EarlyExitReport", "EarlyExitSession", "export_early_exit", "ExportReport", "LintReport", "Parity", "ParityError", "check_parity", "export_onnx",
           "lint", "measure_latency", "OrtModule", "session"]
