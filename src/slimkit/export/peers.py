"""The peers slimkit is measured against: ONNX Runtime's own static quantizer on the FP32 ONNX
model (QDQ, per-channel, with its min-max / entropy / percentile calibrators).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
import onnxruntime as ort
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)

from slimkit.core.batch import Batch, tensors_of

__all__ = ["ort_quantize_static"]

log = logging.getLogger(__name__)


class _Reader(CalibrationDataReader):
    def __init__(self, input_name: str, batches: Iterable[Batch]) -> None:
        self._items = iter([{input_name: tensors_of(b)[0].numpy().astype(np.float32)} for b in batches])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._items, None)


def ort_quantize_static(fp32_path: str, out_path: str, calib: list[Batch], method: str = "minmax",
                        per_channel: bool = True, reduce_range: bool = False) -> str:
    """Quantize ``fp32_path`` with ``onnxruntime.quantization.quantize_static`` (QDQ, U8 activations,
    S8 weights: its documented CPU defaults)."""
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    name = ort.InferenceSession(fp32_path, providers=["CPUExecutionProvider"]).get_inputs()[0].name
    quantize_static(fp32_path, out_path, _Reader(name, calib), quant_format=QuantFormat.QDQ,
                    per_channel=per_channel, reduce_range=reduce_range,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=methods[method])
    return out_path
