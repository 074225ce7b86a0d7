"""Writing a TFLite flatbuffer with the schema LiteRT ships (``ai_edge_litert.schema_py_generated``,
its object API): tensors with their buffers and quantization, operators with their options, one
subgraph and its ``serving_default`` signature. Reading one back: ``op_types``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["TFLiteWriter", "op_types", "WEIGHTED"]

# the operator versions TFLite's converter gives the int8 forms (float forms are version 1)
INT8_VERSION = {"CONV_2D": 3, "DEPTHWISE_CONV_2D": 3, "FULLY_CONNECTED": 4, "ADD": 2, "MUL": 2, "MEAN": 2,
                "AVERAGE_POOL_2D": 2, "MAX_POOL_2D": 2, "QUANTIZE": 2, "DEQUANTIZE": 2, "PAD": 2, "PADV2": 2,
                "CONCATENATION": 2, "RESHAPE": 1, "RELU": 2, "RELU6": 2, "LOGISTIC": 2, "TRANSPOSE": 2}
WEIGHTED = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")
_DTYPES = ("float32", "int8", "int32")


class TFLiteWriter:
    """Tensors and operators appended in order, then ``finish`` packs the model."""

    def __init__(self) -> None:
        from ai_edge_litert import schema_py_generated as schema

        self.schema = schema
        self.tensors: list[Any] = []
        self.buffers: list[Any] = [schema.BufferT()]  # buffer 0: the empty sentinel every tensor without data uses
        self.operators: list[Any] = []
        self.codes: dict[tuple[str, int], int] = {}
        self.op_codes: list[Any] = []

    def tensor(self, name: str, shape: list[int], dtype: str, data: np.ndarray | None = None,
               scale: np.ndarray | float | None = None, zero: np.ndarray | int | None = None, axis: int = 0,
               dynamic_batch: bool = False) -> int:
        """A new tensor's index. ``data`` makes it a constant; ``scale`` / ``zero`` (per tensor, or
        per channel along ``axis``) its quantization; ``dynamic_batch`` a free first axis."""
        s = self.schema
        if dtype not in _DTYPES:
            raise ValueError(f"TFLite tensor {name!r}: dtype {dtype} is not one of {_DTYPES}")
        t = s.TensorT()
        t.name, t.shape = name, np.asarray(shape, np.int32)
        if dynamic_batch and shape:
            t.shapeSignature = np.asarray([-1, *shape[1:]], np.int32)
        t.type = getattr(s.TensorType, dtype.upper())
        t.buffer = 0
        if data is not None:
            b = s.BufferT()
            b.data = np.frombuffer(np.ascontiguousarray(data.astype(dtype)).tobytes(), np.uint8)
            self.buffers.append(b)
            t.buffer = len(self.buffers) - 1
        if scale is not None:
            q = s.QuantizationParametersT()
            q.scale = np.atleast_1d(np.asarray(scale, np.float32)).tolist()
            q.zeroPoint = np.atleast_1d(np.asarray(0 if zero is None else zero, np.int64)).tolist()
            if len(q.zeroPoint) == 1 and len(q.scale) > 1:
                q.zeroPoint = q.zeroPoint * len(q.scale)
            q.quantizedDimension = axis
            t.quantization = q
        self.tensors.append(t)
        return len(self.tensors) - 1

    def op(self, name: str, inputs: list[int], outputs: list[int], options: Any = None, int8: bool = False) -> None:
        """Operator ``name`` (TFLite's ``BuiltinOperator``) on tensors ``inputs`` (-1: an optional
        input left out); ``options`` a ``...OptionsT`` of the schema."""
        s = self.schema
        version = INT8_VERSION.get(name, 1) if int8 else 1
        if (name, version) not in self.codes:
            code = getattr(s.BuiltinOperator, name)
            oc = s.OperatorCodeT()
            oc.builtinCode, oc.deprecatedBuiltinCode, oc.version = code, min(code, 127), version
            self.codes[(name, version)] = len(self.op_codes)
            self.op_codes.append(oc)
        o = s.OperatorT()
        o.opcodeIndex, o.inputs, o.outputs = self.codes[(name, version)], list(inputs), list(outputs)
        if options is not None:
            o.builtinOptionsType = getattr(s.BuiltinOptions, type(options).__name__[:-1])  # Conv2DOptionsT -> Conv2DOptions
            o.builtinOptions = options
        self.operators.append(o)

    def finish(self, inputs: list[int], outputs: list[int], names: tuple[list[str], list[str]]) -> bytes:
        """The model's bytes: one subgraph with these inputs and outputs, and a signature naming them."""
        import flatbuffers

        s = self.schema
        g = s.SubGraphT()
        g.tensors, g.inputs, g.outputs, g.operators, g.name = self.tensors, inputs, outputs, self.operators, "main"
        sig = s.SignatureDefT()
        sig.signatureKey, sig.subgraphIndex = "serving_default", 0
        sig.inputs = [self._named(n, i) for n, i in zip(names[0], inputs, strict=True)]
        sig.outputs = [self._named(n, i) for n, i in zip(names[1], outputs, strict=True)]
        m = s.ModelT()
        m.version, m.description = 3, "slimkit"
        m.subgraphs, m.buffers, m.operatorCodes, m.signatureDefs = [g], self.buffers, self.op_codes, [sig]
        b = flatbuffers.Builder(1024)
        b.Finish(m.Pack(b), file_identifier=b"TFL3")
        return bytes(b.Output())

    def _named(self, name: str, index: int) -> Any:
        t = self.schema.TensorMapT()
        t.name, t.tensorIndex = name, index
        return t


def op_types(data: bytes | str) -> Mapping[str, int]:
    """The weighted ops of a ``.tflite`` file (a path or its bytes) by the type of the data they read,
    ``{"CONV_2D:int8": 20, "FULLY_CONNECTED:float32": 1}``, from LiteRT's interpreter's own op list."""
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_content=data) if isinstance(data, bytes) else Interpreter(model_path=str(data))
    tensors = {t["index"]: t for t in interp.get_tensor_details()}
    counts: Counter[str] = Counter()
    for op in interp._get_ops_details():
        if op["op_name"] in WEIGHTED:
            counts[f"{op['op_name']}:{np.dtype(tensors[op['inputs'][0]]['dtype']).name}"] += 1
    return dict(counts)
