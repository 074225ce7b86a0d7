"""The peers slimkit is measured against: ONNX Runtime's own static quantizer on the FP32 ONNX
model (QDQ, per-channel, with its min-max / entropy / percentile calibrators).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from slimkit.core.batch import Batch, tensors_of

__all__ = ["ort_quantize_static"]

log = logging.getLogger(__name__)


class _Reader(CalibrationDataReader):
    def __init__(self, input_name: str, batches: Iterable[Batch]) -> None:
        self._items = iter([{input_name: tensors_of(b)[0].numpy().astype(np.float32)} for b in batches])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._items, None)


def ort_quantize_static(fp32_path: str, out_path: str, calib: list[Batch], method: str = "minmax",
                        per_channel: bool = True, reduce_range: bool = False, preprocess: bool = True) -> str:
    """Quantize ``fp32_path`` with ``onnxruntime.quantization.quantize_static`` (QDQ, U8 activations,
    S8 weights: its documented CPU defaults), after its documented pre-processing step
    (``quant_pre_process``: shape inference and graph optimization) unless ``preprocess=False``.

    Without that step the peer is handicapped on some graphs: the exporter shares identical
    initializers through ``Identity`` nodes (BatchNorm-folded zero biases of a random-weight net),
    ``quantize_static`` then leaves those convolutions in float ("Expected bias ... to be an
    initializer"), and the model runs slower than FP32."""
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    with tempfile.TemporaryDirectory() as tmp:
        src = fp32_path
        if preprocess:
            src = str(Path(tmp) / "preprocessed.onnx")
            quant_pre_process(fp32_path, src)
        name = ort.InferenceSession(src, providers=["CPUExecutionProvider"]).get_inputs()[0].name
        quantize_static(src, out_path, _Reader(name, calib), quant_format=QuantFormat.QDQ,
                        per_channel=per_channel, reduce_range=reduce_range,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=methods[method])
    return out_path
