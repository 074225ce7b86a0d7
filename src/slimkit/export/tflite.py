"""Export to TFLite / LiteRT: slimkit's own converter from its ONNX files, for CNNs.

``export_onnx(model, "m.tflite", x, target="tflite")`` exports the model to ONNX at the example's
shapes, converts it (``onnx_to_tflite``: ``tflite_graph.py`` holds the conversion's state,
``tflite_ops.py`` lowers each op, ``tflite_writer.py`` writes the flatbuffer), checks the file in
LiteRT and writes it.

A float file becomes float TFLite ops. A QDQ file becomes full-integer ops: each
``DequantizeLinear -> op -> [Relu | Clip] -> QuantizeLinear`` is one int8 TFLite op (``CONV_2D``,
``DEPTHWISE_CONV_2D``, ``FULLY_CONNECTED``, ``ADD``, ``MEAN``, pools) that keeps the file's own
integers: the weights slimkit rounded, its per-channel scales, its int32 biases, its activations'
scales and zero-points. A weighted op whose output the file leaves float (a classifier's last
layer, which ONNX Runtime's QGemm writes in float) runs in float on its int8 weights, stored as
such and dequantized once at load (a ``DEQUANTIZE`` of a constant), since TFLite's int8 kernels
write only int8; the report names it. Images go in and out in the ONNX
file's NCHW layout; inside, activations are NHWC as TFLite's kernels take them. The batch axis
stays free (LiteRT's ``resize_tensor_input``). Transformers are not converted.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import onnx

from slimkit.export.tflite_ops import Converter, TFLiteConversion
from slimkit.export.tflite_writer import op_types

if TYPE_CHECKING:
    from torch import nn

    from slimkit.core.batch import Batch
    from slimkit.export.onnx import ExportReport

__all__ = ["export_tflite", "onnx_to_tflite", "op_types", "TFLiteConversion"]

log = logging.getLogger(__name__)


def onnx_to_tflite(model: onnx.ModelProto) -> TFLiteConversion:
    """``model`` (at static shapes, its constants folded: ``export_onnx(..., static_shapes=True)``)
    as a TFLite flatbuffer; an op with no TFLite form here is a ``ValueError`` naming the node."""
    return Converter(model).run()


def export_tflite(model: nn.Module, path: str | os.PathLike[str], example_inputs: Batch, check: bool = True,
                  tolerance: float | None = None, input_names: list[str] | None = None) -> ExportReport:
    """``export_onnx(..., target="tflite")``: ``model`` as a ``.tflite`` file for LiteRT. The model
    is exported to ONNX at the example's shapes (checked in ONNX Runtime), converted
    (``onnx_to_tflite``), then run in LiteRT on the example and held to the same parity criterion
    as an ONNX file; it is written atomically, and only once it passes. The report's ``lint`` counts
    the weighted ops by the type LiteRT runs them in, from the interpreter's op list, and names each
    layer of a quantized model left in float."""
    from slimkit.core.batch import cache_free
    from slimkit.core.files import temp_dir, temp_file
    from slimkit.core.plans import has_plan, reference_of
    from slimkit.export.lint import LintReport
    from slimkit.export.onnx import ExportReport, ParityError, default_tolerance, export_onnx
    from slimkit.export.runtime import check_parity
    from slimkit.export.runtimes import available

    path = Path(path)
    if path.suffix != ".tflite":
        raise ValueError(f"target='tflite' writes a .tflite file; the output path ends in {path.suffix or 'nothing'}: {path}")
    if not available("litert"):
        raise ValueError("target='tflite' needs ai-edge-litert (TFLite's schema and LiteRT's interpreter, which checks "
                         "the file): pip install ai-edge-litert (or slimkit[runtimes])")
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = temp_dir(path.parent, prefix=".slimkit-tflite-")
    try:
        onnx_report = export_onnx(model, scratch / "model.onnx", example_inputs, check=check, tolerance=tolerance,
                                  input_names=input_names, static_shapes=True)
        conversion = onnx_to_tflite(onnx.load(str(scratch / "model.onnx")))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    quantized = has_plan(model, "quant")
    tol = tolerance if tolerance is not None else default_tolerance(model)
    reference = reference_of(model) if quantized and tolerance is None else None
    fd, tmp = temp_file(path.parent, prefix=f".{path.name}.", suffix=".tmp.tflite")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(conversion.data)
        parity = check_parity(model, tmp, cache_free(model, example_inputs), onnx_report.inputs, tol, reference,
                              runtime="litert")
        if check and not parity.ok:
            raise ParityError(f"LiteRT disagrees with PyTorch on {path.name}: {parity}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    ints: Counter[str] = Counter()
    floats: Counter[str] = Counter()
    for key, n in conversion.ops.items():
        op, dtype = key.split(":")
        (ints if dtype == "int8" else floats)[op] += n
    issues = [f"{layer} runs in float in LiteRT: its output is float in the ONNX file (TFLite's int8 kernels write "
              "int8); its int8 weights are stored as such and dequantized once, at load"
              for layer in conversion.float_layers] if quantized else []
    log.info("exported %s (%.1f kB): %s", path, len(conversion.data) / 1e3, parity)
    return ExportReport(str(path), onnx_report.inputs, onnx_report.outputs, parity,
                        LintReport(dict(ints), dict(floats), 0, issues), len(conversion.data), parity, "tflite")
