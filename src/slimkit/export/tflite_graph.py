"""The state of an ONNX -> TFLite conversion (``export/tflite_ops.py`` lowers the ops on it): which
TFLite tensor holds each ONNX value, in which layout, and whether as int8; the DequantizeLinear
nodes seen (a weight's integers, or an int8 activation read as float); and the fusions that make
``DequantizeLinear -> op -> [Relu | Clip] -> QuantizeLinear`` one int8 TFLite op.

ONNX's 8-bit unsigned activations become TFLite's signed ones: the same integers less 128, the
zero-point less 128, so each value means exactly what it meant.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from slimkit.export.tflite_writer import TFLiteWriter

__all__ = ["Value", "GraphState", "attrs"]

QParams = tuple[float, int]  # (scale, zero-point) of an int8 tensor


@dataclass
class Value:
    """An ONNX value as a TFLite tensor: ``q`` its int8 qparams (None: float32); ``nhwc``: a 4-d
    activation stored channels-last, as TFLite's kernels take them."""

    index: int
    q: QParams | None = None
    nhwc: bool = False


def attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def same_padding(size: tuple[int, int], k: tuple[int, int], strides: list[int], dil: list[int]) -> list[tuple[int, int]]:
    """TFLite's SAME padding (before, after) on each spatial axis."""
    out = []
    for n, kk, st, dd in zip(size, k, strides, dil, strict=True):
        total = max((-(-n // st) - 1) * st + (kk - 1) * dd + 1 - n, 0)
        out.append((total // 2, total - total // 2))
    return out


class GraphState:
    def __init__(self, model: onnx.ModelProto) -> None:
        self.g = onnx.shape_inference.infer_shapes(model).graph
        self.w = TFLiteWriter()
        self.s = self.w.schema
        self.const: dict[str, np.ndarray] = {i.name: numpy_helper.to_array(i) for i in self.g.initializer}
        self.shape = {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim]
                      for vi in [*self.g.input, *self.g.value_info, *self.g.output]}
        self.readers: dict[str, list[onnx.NodeProto]] = {}
        for n in self.g.node:
            for i in n.input:
                self.readers.setdefault(i, []).append(n)
        self.graph_outputs = {o.name for o in self.g.output}
        self.vals: dict[str, Value] = {}
        self.dq: dict[str, tuple[str, np.ndarray, np.ndarray, int]] = {}  # DQ output -> (input, scale, zero, axis)
        self.done: set[int] = set()  # nodes already folded into an earlier TFLite op
        self.folded: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # weighted op -> its BatchNormalization's s, t
        self.ops: Counter[str] = Counter()
        self.float_layers: list[str] = []

    # -- values ------------------------------------------------------------------------------
    def sole_reader(self, name: str) -> onnx.NodeProto | None:
        r = self.readers.get(name, [])
        return r[0] if len(r) == 1 and name not in self.graph_outputs else None

    def qparams(self, node: onnx.NodeProto) -> QParams:
        """A QuantizeLinear's scale and zero-point, as TFLite's int8."""
        scale = self.const[node.input[1]]
        zero = self.const[node.input[2]] if len(node.input) > 2 and node.input[2] else np.zeros((), np.uint8)
        if scale.size != 1:
            raise ValueError(f"TFLite export: activation quantizer {node.name!r} is per-channel; TFLite quantizes "
                             "activations per tensor")
        if zero.dtype not in (np.uint8, np.int8):
            raise ValueError(f"TFLite export: quantizer {node.name!r} is {zero.dtype}; TFLite's integer kernels take int8")
        return float(scale.reshape(-1)[0]), int(zero.reshape(-1)[0]) - (128 if zero.dtype == np.uint8 else 0)

    def quantized(self, name: str) -> Value | None:
        """``name`` as an int8 tensor, if it is the DequantizeLinear of one."""
        if name in self.dq and self.dq[name][0] in self.vals:
            return self.vals[self.dq[name][0]]
        return None

    def floated(self, name: str, nhwc: bool = False) -> Value:
        """``name`` as a float tensor: a DEQUANTIZE where it is held in int8, a float constant for a
        weight (laid out like an NHWC activation where ``nhwc`` and it is 4-d or broadcasts as one)."""
        held = self.quantized(name) or (self.vals.get(name) if name in self.vals and self.vals[name].q else None)
        if held is not None:
            key = name + "#float"
            if key not in self.vals:
                idx = self.w.tensor(name + "_float", self.tfl_shape(name, held.nhwc), "float32", dynamic_batch=True)
                self.w.op("DEQUANTIZE", [held.index], [idx], int8=True)
                self.vals[key] = Value(idx, None, held.nhwc)
            return self.vals[key]
        if name in self.dq or name in self.const:
            arr = self.weight_float(name)
            if nhwc and 2 <= arr.ndim <= 4 and arr.size > 1:  # [C,1,1] or [1,C,1,1] against an NCHW activation
                arr = arr.reshape((1,) * (4 - arr.ndim) + arr.shape).transpose(0, 2, 3, 1)
            return Value(self.w.tensor(name, list(arr.shape), "float32", arr))
        return self.vals[name]

    def weight_float(self, name: str) -> np.ndarray:
        """A constant, or a weight behind its DequantizeLinear as the float values it stands for."""
        if name in self.dq:
            src, scale, zero, axis = self.dq[name]
            q = self.const[src].astype(np.float64)
            shape = [1] * q.ndim
            if scale.size > 1:
                shape[axis] = -1
            return ((q - zero.astype(np.float64).reshape(shape)) * scale.astype(np.float64).reshape(shape)).astype(np.float32)
        return self.const[name].astype(np.float32)

    def tfl_shape(self, name: str, nhwc: bool) -> list[int]:
        shape = list(self.shape.get(name) or [])
        if not shape or any(d <= 0 for d in shape):
            raise ValueError(f"TFLite export: the shape of {name!r} is not known statically (export at static shapes)")
        return [shape[0], *shape[2:], shape[1]] if nhwc and len(shape) == 4 else shape

    def out(self, name: str, q: QParams | None, nhwc: bool) -> Value:
        """A new activation tensor standing for ONNX value ``name``."""
        idx = self.w.tensor(name, self.tfl_shape(name, nhwc), "int8" if q else "float32", scale=q[0] if q else None,
                            zero=q[1] if q else None, dynamic_batch=True)
        self.vals[name] = Value(idx, q, nhwc)
        return self.vals[name]

    # -- fusion ------------------------------------------------------------------------------
    def tail(self, node: onnx.NodeProto, inputs: list[str], same: bool = False) -> tuple[list[Value], str, QParams | None]:
        """The TFLite inputs of ``node`` and the ONNX value its output stands for. int8 where every
        input is an int8 activation's DequantizeLinear and the output's sole reader is a
        QuantizeLinear (then folded in; with ``same``, only at the input's own qparams, for the
        kernels that move values without rescaling them); else float."""
        xs = [self.quantized(i) for i in inputs]
        out, q = node.output[0], None
        nxt = self.sole_reader(out)
        if all(v is not None for v in xs) and nxt is not None and nxt.op_type == "QuantizeLinear":
            wanted = self.qparams(nxt)
            if not same or all(v is not None and v.q == wanted for v in xs):
                q, out = wanted, nxt.output[0]
                self.done.add(id(nxt))
                self.shape[out] = self.shape[node.output[0]]
        ins = [v for v in xs if v is not None] if q is not None else [self.floated(i) for i in inputs]
        return ins, out, q

    def epilogue(self, node: onnx.NodeProto, quantized: bool) -> tuple[str, str, QParams | None]:
        """What follows a weighted or elementwise op: a Relu/Clip folded in as TFLite's fused
        activation, then (for an int8 op) the QuantizeLinear whose qparams its output takes.
        Returns (the ONNX value the op's output stands for, the fused activation, its qparams)."""
        out, act = node.output[0], "NONE"
        nxt = self.sole_reader(out)
        if nxt is not None and nxt.op_type in ("Relu", "Clip") and self.clip_kind(nxt) is not None:
            act, out = str(self.clip_kind(nxt)), nxt.output[0]
            self.done.add(id(nxt))
            nxt = self.sole_reader(out)
        if quantized and nxt is not None and nxt.op_type == "QuantizeLinear":
            self.done.add(id(nxt))
            self.shape[nxt.output[0]] = self.shape[out]
            return nxt.output[0], act, self.qparams(nxt)
        return out, act, None

    def clip_kind(self, node: onnx.NodeProto) -> str | None:
        """The TFLite activation a Relu or Clip is (RELU, RELU6, RELU_N1_TO_1), or None."""
        if node.op_type == "Relu":
            return "RELU"
        a = attrs(node)
        bounds = []
        for i, key, default in ((1, "min", -np.inf), (2, "max", np.inf)):
            given = self.const.get(node.input[i]) if len(node.input) > i and node.input[i] else None
            bounds.append(float(given) if given is not None else float(a.get(key, default)))
        return {(0.0, 6.0): "RELU6", (0.0, np.inf): "RELU", (-1.0, 1.0): "RELU_N1_TO_1"}.get((bounds[0], bounds[1]))

    def act(self, name: str) -> int:
        return int(getattr(self.s.ActivationFunctionType, name))

    def count(self, op: str, node: onnx.NodeProto, int8: bool) -> None:
        self.ops[f"{op}:{'int8' if int8 else 'float32'}"] += 1
        if not int8:
            self.float_layers.append(node.name)

    # -- weighted ops ------------------------------------------------------------------------
    def weighted(self, node: onnx.NodeProto) -> tuple[Value | None, str, str, QParams | None]:
        """A Conv / Gemm / MatMul's int8 input (None: the op runs in float), output and activation. A
        BatchNormalization right after it (left by the exporter where the weights are quantized) is
        folded into it (``fold_bn``), so that conv, normalization, activation and quantizer are one op."""
        x = self.quantized(node.input[0])
        w_int8 = node.input[1] in self.dq and self.const[self.dq[node.input[1]][0]].dtype == np.int8
        nxt = self.sole_reader(node.output[0])
        bn = self.batch_norm(nxt) if nxt is not None and nxt.op_type == "BatchNormalization" else None
        tail = node
        if nxt is not None and bn is not None and np.all(bn[0] != 0):
            self.done.add(id(nxt))
            self.folded[node.name] = bn
            self.shape[nxt.output[0]] = self.shape[node.output[0]]
            tail = nxt
        out, act, q = self.epilogue(tail, x is not None and w_int8)
        return (x if q is not None else None), out, act, q

    def batch_norm(self, node: onnx.NodeProto) -> tuple[np.ndarray, np.ndarray] | None:
        """``(s, t)`` of an inference BatchNormalization with constant statistics: ``y = x * s + t``
        per channel; None where they are not constants."""
        if len(node.input) < 5 or any(i not in self.const for i in node.input[1:5]):
            return None
        gamma, beta, mean, var = (self.const[i].astype(np.float64).reshape(-1) for i in node.input[1:5])
        s = gamma / np.sqrt(var + float(attrs(node).get("epsilon", 1e-5)))
        return s, beta - mean * s

    def fold_bn(self, node: onnx.NodeProto, w: np.ndarray, scale: np.ndarray | None,
                bias: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """Weights ``[out, ...]``, their int8 scales (None: float weights) and float bias with the
        op's folded BatchNormalization, if any: int8 weights keep their integers (negated where the
        factor is negative) and take the factor's size into their scales."""
        if node.name not in self.folded:
            return w, scale, bias
        s, t = self.folded[node.name]
        axes = (-1,) + (1,) * (w.ndim - 1)
        b = (bias.astype(np.float64) if bias is not None else np.zeros_like(s)) * s + t
        if scale is None:
            return (w * s.reshape(axes)).astype(np.float32), None, b
        flipped = np.clip(w.astype(np.int16) * np.sign(s).reshape(axes), -128, 127).astype(np.int8)
        return flipped, (np.broadcast_to(scale, s.shape) * np.abs(s)).astype(np.float32), b

    def int8_weight(self, node: onnx.NodeProto) -> tuple[np.ndarray, np.ndarray]:
        src, scale, zero, _ = self.dq[node.input[1]]
        if np.any(zero != 0):
            raise ValueError(f"TFLite export: the weights of {node.name!r} have non-zero zero-points; TFLite's int8 "
                             "kernels take symmetric weights")
        return self.const[src], scale.astype(np.float32).reshape(-1)

    def stored_int8(self, node: onnx.NodeProto) -> tuple[np.ndarray, np.ndarray] | None:
        """A weight the file stores as symmetric int8 (its integers and scales), else None."""
        name = node.input[1]
        if name not in self.dq or self.const[self.dq[name][0]].dtype != np.int8 or np.any(self.dq[name][2] != 0):
            return None
        return self.int8_weight(node)

    def filter(self, name: str, weights: np.ndarray, scale: np.ndarray | None, axis: int, int8_op: bool) -> int:
        """The filter tensor of a weighted op, ``weights`` in TFLite's layout. For an int8 op, the int8
        integers; for a float op whose weights the file stores in int8, the same integers and a
        DEQUANTIZE (LiteRT runs it once, at load: the file stays small); else float."""
        if scale is None:
            return self.w.tensor(name, list(weights.shape), "float32", weights)
        stored = self.w.tensor(name, list(weights.shape), "int8", weights, scale=scale, zero=np.zeros(scale.size),
                               axis=axis)
        if int8_op:
            return stored
        out = self.w.tensor(name + "_float", list(weights.shape), "float32")
        self.w.op("DEQUANTIZE", [stored], [out], int8=True)
        return out

    def bias(self, node: onnx.NodeProto, x: Value | None, w_scale: np.ndarray | None, channels: int,
             folded: np.ndarray | None = None) -> int:
        """The bias tensor: float for a float op; for an int8 one, int32 at the accumulator's scale
        (input scale x weight scale): the file's own int32 bias where it is at that scale, else
        the float bias (``folded``: with a BatchNormalization folded in) rounded to it."""
        name = node.input[2] if len(node.input) > 2 and node.input[2] else None
        if x is None or x.q is None or w_scale is None:
            b = folded if folded is not None else self.weight_float(name) if name else np.zeros(channels, np.float32)
            return self.w.tensor(node.name + "_bias", [channels], "float32", b.reshape(-1))
        want = (x.q[0] * w_scale.astype(np.float64)).reshape(-1)
        if folded is not None:
            b32 = np.round(folded.reshape(-1) / want).astype(np.int64)
        elif name is None:
            b32 = np.zeros(channels, np.int64)
        elif name in self.dq and self.const[self.dq[name][0]].dtype == np.int32 and \
                np.allclose(self.dq[name][1].reshape(-1).astype(np.float64), want, rtol=1e-5, atol=0):
            b32 = self.const[self.dq[name][0]].astype(np.int64).reshape(-1)
        else:
            b32 = np.round(self.weight_float(name).astype(np.float64).reshape(-1) / want).astype(np.int64)
        return self.w.tensor(node.name + "_bias", [channels], "int32", np.clip(b32, -(2**31), 2**31 - 1),
                             scale=want, zero=np.zeros(channels), axis=0)

    def bias_float(self, node: onnx.NodeProto) -> np.ndarray | None:
        return self.weight_float(node.input[2]).reshape(-1) if len(node.input) > 2 and node.input[2] else None

    def padded(self, node: onnx.NodeProto, x: Value, pads: list[int], k: tuple[int, int], strides: list[int],
               dil: list[int], fill: str | None = None) -> tuple[Value, int]:
        """``x`` and the TFLite padding for an op's explicit ``pads``: VALID for none, SAME where TFLite's
        SAME pads the same, else a PAD op (int8 PAD fills with the zero-point: real zeros) and VALID;
        ``fill="lowest"``: a PADV2 with the type's lowest value (max pooling's padding)."""
        n, c, h, w = self.shape[node.input[0]]
        top, left, bottom, right = pads
        if not any(pads):
            return x, self.s.Padding.VALID
        if [(top, bottom), (left, right)] == same_padding((h, w), k, strides, dil):
            return x, self.s.Padding.SAME
        amounts = self.w.tensor(node.name + "_pads", [4, 2], "int32", np.array([[0, 0], [top, bottom], [left, right], [0, 0]]))
        idx = self.w.tensor(node.name + "_padded", [n, h + top + bottom, w + left + right, c], "int8" if x.q else "float32",
                            scale=x.q[0] if x.q else None, zero=x.q[1] if x.q else None, dynamic_batch=True)
        if fill is None:
            self.w.op("PAD", [x.index, amounts], [idx], self.s.PadOptionsT(), int8=x.q is not None)
        else:
            low = self.w.tensor(node.name + "_fill", [], "int8" if x.q else "float32",
                                np.array(-128 if x.q else np.finfo(np.float32).min), scale=x.q[0] if x.q else None,
                                zero=x.q[1] if x.q else None)
            self.w.op("PADV2", [x.index, amounts, low], [idx], self.s.PadV2OptionsT(), int8=x.q is not None)
        return Value(idx, x.q, True), self.s.Padding.VALID
