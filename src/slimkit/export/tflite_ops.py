"""ONNX ops lowered to TFLite's, one method each, on the conversion state of ``tflite_graph.py``.

Conv (plain and depthwise; a BatchNormalization after one folded in), Gemm, MatMul with a constant
weight, BatchNormalization, Add, Mul, Relu, Clip, Sigmoid,
GlobalAveragePool, ReduceMean, AveragePool, MaxPool, Flatten, Reshape, Concat, Pad, Identity, Dropout, and the
Q/DQ around them. Anything else is an error naming the node.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from slimkit.export.tflite_graph import GraphState, Value, attrs, same_padding

__all__ = ["Converter", "TFLiteConversion"]

_NHWC_AXIS = {0: 0, 1: 3, 2: 1, 3: 2}  # an NCHW axis in NHWC


@dataclass
class TFLiteConversion:
    """What a conversion wrote: the flatbuffer, its weighted ops by the type they compute in
    (``"CONV_2D:int8"``), and the ONNX nodes of weighted ops left in float."""

    data: bytes
    ops: Counter[str] = field(default_factory=Counter)
    float_layers: list[str] = field(default_factory=list)


class Converter(GraphState):
    def run(self) -> TFLiteConversion:
        inputs, names = [], []
        for vi in self.g.input:
            if vi.name in self.const:
                continue
            shape = self.shape[vi.name]
            if vi.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
                raise ValueError(f"TFLite export: input {vi.name!r} is "
                                 f"{onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)}, not float32: "
                                 "slimkit's TFLite converter takes CNNs (float images in); transformers are not converted")
            idx = self.w.tensor(vi.name, shape, "float32", dynamic_batch=True)
            inputs.append(idx)
            names.append(vi.name)
            self.vals[vi.name] = self._transposed(Value(idx), shape, to_nhwc=True) if len(shape) == 4 else Value(idx)
        for node in self.g.node:
            if id(node) in self.done:
                continue
            lower = getattr(self, "_" + node.op_type, None)
            if lower is None:
                raise ValueError(f"TFLite export: ONNX op {node.op_type} (node {node.name!r}) has no TFLite form here; "
                                 "slimkit writes .tflite files for CNNs (Conv, Gemm, pools, Add, Mul, Concat, Relu, Clip)")
            lower(node)
        outputs = []
        for o in self.g.output:  # float out, in the ONNX file's layout
            v = self.floated(o.name)
            outputs.append((self._transposed(v, self.shape[o.name], to_nhwc=False, name=o.name) if v.nhwc else v).index)
        data = self.w.finish(inputs, outputs, (names, [o.name for o in self.g.output]))
        return TFLiteConversion(data, self.ops, self.float_layers)

    def _transposed(self, v: Value, nchw: list[int], to_nhwc: bool, name: str | None = None) -> Value:
        shape = [nchw[0], *nchw[2:], nchw[1]] if to_nhwc else nchw
        base = name or f"{self.w.tensors[v.index].name}_{'nhwc' if to_nhwc else 'nchw'}"
        t = self.w.tensor(base, shape, "int8" if v.q else "float32", scale=v.q[0] if v.q else None,
                          zero=v.q[1] if v.q else None, dynamic_batch=True)
        perm = self.w.tensor(base + "_perm", [4], "int32", np.array([0, 2, 3, 1] if to_nhwc else [0, 3, 1, 2]))
        self.w.op("TRANSPOSE", [v.index, perm], [t], int8=v.q is not None)
        return Value(t, v.q, to_nhwc)

    # -- constants, Q/DQ ---------------------------------------------------------------------
    def _Constant(self, node: onnx.NodeProto) -> None:
        self.const[node.output[0]] = numpy_helper.to_array(attrs(node)["value"])

    def _Identity(self, node: onnx.NodeProto) -> None:
        src, dst = node.input[0], node.output[0]
        tables: tuple[dict[str, Any], ...] = (self.const, self.dq, self.vals)
        for table in tables:
            if src in table:
                table[dst] = table[src]

    _Dropout = _Identity

    def _DequantizeLinear(self, node: onnx.NodeProto) -> None:
        src = node.input[0]
        if src not in self.const and src not in self.vals:
            raise ValueError(f"TFLite export: {node.name!r} dequantizes {src!r}, which is neither a weight nor a "
                             "quantized activation")
        scale = self.const[node.input[1]]
        zero = self.const[node.input[2]] if len(node.input) > 2 and node.input[2] else np.zeros_like(scale, np.int8)
        self.dq[node.output[0]] = (src, scale, zero, int(attrs(node).get("axis", 1)))

    def _QuantizeLinear(self, node: onnx.NodeProto) -> None:
        q = self.qparams(node)
        src = self.quantized(node.input[0])
        if src is not None and src.q == q:  # DequantizeLinear -> QuantizeLinear at the same qparams
            self.vals[node.output[0]] = src
            return
        x = src if src is not None else self.floated(node.input[0])  # int8 -> int8: a requantization
        self.shape.setdefault(node.output[0], self.shape[node.input[0]])
        self.w.op("QUANTIZE", [x.index], [self.out(node.output[0], q, x.nhwc).index], int8=True)

    # -- weighted ops ------------------------------------------------------------------------
    def _Conv(self, node: onnx.NodeProto) -> None:
        a = attrs(node)
        x, out, act, q = self.weighted(node)
        xin = x if x is not None else self.floated(node.input[0])
        if not xin.nhwc:
            raise ValueError(f"TFLite export: {node.name!r} is not a 2-d convolution")
        stored = self.int8_weight(node) if x is not None else self.stored_int8(node)
        wq, w_scale = stored if stored is not None else (self.weight_float(node.input[1]), None)
        wq, w_scale, folded = self.fold_bn(node, wq, w_scale, self.bias_float(node))
        cin, cout, group = self.shape[node.input[0]][1], wq.shape[0], int(a.get("group", 1))
        kh, kw = wq.shape[2], wq.shape[3]
        strides, dil = a.get("strides", [1, 1]), a.get("dilations", [1, 1])
        depthwise = group == cin and group > 1 and wq.shape[1] == 1
        if group != 1 and not depthwise:
            raise ValueError(f"TFLite export: {node.name!r} is a grouped convolution ({group} groups); TFLite's "
                             "kernels take plain and depthwise ones")
        xin, padding = self.padded(node, xin, a.get("pads", [0, 0, 0, 0]), (kh, kw), strides, dil)
        # TFLite's filters: [1, kh, kw, C x multiplier] for depthwise (scales on the last axis), OHWI otherwise
        weights = wq.reshape(cout, kh, kw).transpose(1, 2, 0)[None] if depthwise else wq.transpose(0, 2, 3, 1)
        wt = self.filter(node.input[1], weights, w_scale, 3 if depthwise else 0, x is not None)
        bt = self.bias(node, x, w_scale if x is not None else None, cout, folded)
        y = self.out(out, q, True)
        opt: Any = self.s.DepthwiseConv2DOptionsT() if depthwise else self.s.Conv2DOptionsT()
        if depthwise:
            opt.depthMultiplier = cout // cin
        opt.padding, opt.strideH, opt.strideW = padding, strides[0], strides[1]
        opt.dilationHFactor, opt.dilationWFactor = dil[0], dil[1]
        opt.fusedActivationFunction = self.act(act)
        op = "DEPTHWISE_CONV_2D" if depthwise else "CONV_2D"
        self.w.op(op, [xin.index, wt, bt], [y.index], opt, int8=x is not None)
        self.count(op, node, x is not None)

    def _Gemm(self, node: onnx.NodeProto) -> None:
        a = attrs(node)
        if a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0 or a.get("transA", 0):
            raise ValueError(f"TFLite export: {node.name!r} is a Gemm with alpha, beta or transA")
        self._fully_connected(node, transposed=bool(a.get("transB", 0)))

    def _MatMul(self, node: onnx.NodeProto) -> None:
        if node.input[1] not in self.const and node.input[1] not in self.dq:
            raise ValueError(f"TFLite export: {node.name!r} multiplies two activations (attention); not converted here")
        self._fully_connected(node, transposed=False)

    def _fully_connected(self, node: onnx.NodeProto, transposed: bool) -> None:
        x, out, act, q = self.weighted(node)
        xin = x if x is not None else self.floated(node.input[0])
        if xin.nhwc or len(self.shape[node.input[0]]) != 2:
            raise ValueError(f"TFLite export: {node.name!r} multiplies a {len(self.shape[node.input[0]])}-d input; "
                             "converted for 2-d ones")
        stored = self.int8_weight(node) if x is not None else self.stored_int8(node)
        if stored is not None and stored[1].size > 1 and self.dq[node.input[1]][3] != (0 if transposed else 1):
            if x is not None:
                raise ValueError(f"TFLite export: {node.name!r} has weight scales along its input axis")
            stored = None
        wq, w_scale = stored if stored is not None else (self.weight_float(node.input[1]), None)
        wq = wq if transposed else wq.T  # TFLite's weights: [out, in]
        has_bias = node.op_type == "Gemm" and len(node.input) > 2 and bool(node.input[2])
        wq, w_scale, folded = self.fold_bn(node, wq, w_scale, self.bias_float(node) if has_bias else None)
        wt = self.filter(node.input[1], wq, w_scale, 0, x is not None)
        bt = self.bias(node, x, w_scale if x is not None else None, wq.shape[0], folded) \
            if has_bias or x is not None or folded is not None else -1
        y = self.out(out, q, False)
        opt = self.s.FullyConnectedOptionsT()
        opt.fusedActivationFunction = self.act(act)
        self.w.op("FULLY_CONNECTED", [xin.index, wt, bt], [y.index], opt, int8=x is not None)
        self.count("FULLY_CONNECTED", node, x is not None)

    def _BatchNormalization(self, node: onnx.NodeProto) -> None:
        """One not folded into a weighted op: a MUL and an ADD in float, per channel."""
        bn = self.batch_norm(node)
        rank = len(self.shape[node.input[0]])
        if bn is None or rank not in (2, 4):
            raise ValueError(f"TFLite export: {node.name!r} is a BatchNormalization with computed statistics or on "
                             f"{rank}-d data")
        x = self.floated(node.input[0])
        mid = self.w.tensor(node.name + "_scaled", self.tfl_shape(node.output[0], x.nhwc), "float32", dynamic_batch=True)
        s, t = (self.w.tensor(node.name + n, [len(v)], "float32", v.astype(np.float32)) for n, v in (("_s", bn[0]), ("_t", bn[1])))
        self.w.op("MUL", [x.index, s], [mid], self.s.MulOptionsT())
        self.w.op("ADD", [mid, t], [self.out(node.output[0], None, x.nhwc).index], self.s.AddOptionsT())

    # -- elementwise -------------------------------------------------------------------------
    def _binary(self, node: onnx.NodeProto, op: str, options: Any) -> None:
        xs = [self.quantized(i) for i in node.input]
        out, act, q = self.epilogue(node, all(v is not None for v in xs))
        layout = any((self.quantized(i) or self.vals.get(i, Value(-1))).nhwc for i in node.input)
        ins = [v for v in xs if v is not None] if q is not None else [self.floated(i, layout) for i in node.input]
        for v, i in zip(ins, node.input, strict=True):
            if len(self.shape.get(i) or []) == 4 and v.nhwc != layout:
                raise ValueError(f"TFLite export: {node.name!r} mixes layouts")
        self.shape.setdefault(out, self.shape[node.output[0]])
        y = self.out(out, q, layout)
        options.fusedActivationFunction = self.act(act)
        self.w.op(op, [v.index for v in ins], [y.index], options, int8=q is not None)

    def _Add(self, node: onnx.NodeProto) -> None:
        self._binary(node, "ADD", self.s.AddOptionsT())

    def _Mul(self, node: onnx.NodeProto) -> None:
        self._binary(node, "MUL", self.s.MulOptionsT())

    def _unary(self, node: onnx.NodeProto, op: str, options: Any = None, same: bool = False,
               extra: list[int] | None = None, q_required: tuple[float, int] | None = None,
               layout: bool | None = None) -> Value:
        """A one-input op (``extra``: its constant operands); ``layout``: the output's, if not the input's."""
        (x,), out, q = self.tail(node, [node.input[0]], same)
        if q is not None and q_required is not None and q != q_required:  # a kernel with a fixed output scale
            self.done.discard(id(self.sole_reader(node.output[0])))
            x, out, q = self.floated(node.input[0]), node.output[0], None
        y = self.out(out, q, x.nhwc if layout is None else layout)
        self.w.op(op, [x.index, *(extra or [])], [y.index], options, int8=q is not None)
        return y

    def _Relu(self, node: onnx.NodeProto) -> None:
        self._unary(node, "RELU")

    def _Clip(self, node: onnx.NodeProto) -> None:
        kind = self.clip_kind(node)
        if kind is None:
            raise ValueError(f"TFLite export: {node.name!r} clips to a range other than [0, 6], [0, inf) or [-1, 1]")
        self._unary(node, kind)

    def _Sigmoid(self, node: onnx.NodeProto) -> None:
        self._unary(node, "LOGISTIC", q_required=(1 / 256, -128))  # TFLite's int8 LOGISTIC writes at 1/256, -128

    # -- pooling and shapes ------------------------------------------------------------------
    def _GlobalAveragePool(self, node: onnx.NodeProto) -> None:
        opt = self.s.ReducerOptionsT()
        opt.keepDims = True
        self._unary(node, "MEAN", opt, extra=[self.w.tensor(node.name + "_axes", [2], "int32", np.array([1, 2]))])

    def _ReduceMean(self, node: onnx.NodeProto) -> None:
        a = attrs(node)
        rank = len(self.shape[node.input[0]])
        axes = sorted(int(v) % rank for v in (a.get("axes") or (self.const[node.input[1]].tolist()
                                                               if len(node.input) > 1 else range(rank))))
        x = self.quantized(node.input[0]) or self.vals.get(node.input[0]) or Value(-1)
        keep = bool(a.get("keepdims", 1))
        if x.nhwc:
            if not keep and axes != [2, 3]:
                raise ValueError(f"TFLite export: {node.name!r} drops image axes other than the spatial ones")
            axes = sorted(_NHWC_AXIS[v] for v in axes)
        opt = self.s.ReducerOptionsT()
        opt.keepDims = keep
        self._unary(node, "MEAN", opt, extra=[self.w.tensor(node.name + "_axes", [len(axes)], "int32", np.array(axes))],
                    layout=x.nhwc and keep)

    def _pool(self, node: onnx.NodeProto, op: str) -> None:
        a = attrs(node)
        k, strides, pads = a["kernel_shape"], a.get("strides", [1, 1]), a.get("pads", [0, 0, 0, 0])
        if a.get("ceil_mode", 0) or any(d != 1 for d in a.get("dilations", [1, 1])):
            raise ValueError(f"TFLite export: {node.name!r} pools with ceil_mode or dilations")
        same = [(pads[0], pads[2]), (pads[1], pads[3])] == same_padding(tuple(self.shape[node.input[0]][2:]), k, strides, [1, 1])
        # TFLite's SAME average divides by the valid count (count_include_pad=0) and its SAME max ignores the
        # padding; other max-pool padding is a PADV2 with the lowest value
        if any(pads) and op == "AVERAGE_POOL_2D" and (not same or a.get("count_include_pad", 0)):
            raise ValueError(f"TFLite export: {node.name!r} pads other than TFLite's SAME padding")
        opt = self.s.Pool2DOptionsT()
        opt.padding = self.s.Padding.SAME if any(pads) else self.s.Padding.VALID
        opt.strideH, opt.strideW, opt.filterHeight, opt.filterWidth = strides[0], strides[1], k[0], k[1]
        if any(pads) and not same:
            (x,), out, q = self.tail(node, [node.input[0]], same=True)
            x, opt.padding = self.padded(node, x, pads, (k[0], k[1]), strides, [1, 1], fill="lowest")
            self.w.op(op, [x.index], [self.out(out, q, True).index], opt, int8=q is not None)
            return
        self._unary(node, op, opt, same=True)

    def _MaxPool(self, node: onnx.NodeProto) -> None:
        self._pool(node, "MAX_POOL_2D")

    def _AveragePool(self, node: onnx.NodeProto) -> None:
        self._pool(node, "AVERAGE_POOL_2D")

    def _Flatten(self, node: onnx.NodeProto) -> None:
        if int(attrs(node).get("axis", 1)) != 1:
            raise ValueError(f"TFLite export: {node.name!r} flattens from an axis other than 1")
        self._reshape(node)

    def _Reshape(self, node: onnx.NodeProto) -> None:
        self._reshape(node)

    def _reshape(self, node: onnx.NodeProto) -> None:
        (x,), out, q = self.tail(node, [node.input[0]], same=True)
        src = self.shape[node.input[0]]
        if x.nhwc and any(d != 1 for d in src[2:]):  # NHWC data in NCHW order first, as the reshape reads it
            x = self._transposed(x, src, to_nhwc=False, name=node.name + "_nchw")
        new = [-1, *self.shape[node.output[0]][1:]]  # the batch stays free
        target = self.w.tensor(node.name + "_shape", [len(new)], "int32", np.array(new))
        self.w.op("RESHAPE", [x.index, target], [self.out(out, q, False).index], self.s.ReshapeOptionsT(),
                  int8=q is not None)

    def _Pad(self, node: onnx.NodeProto) -> None:
        a = attrs(node)
        pads = self.const.get(node.input[1]) if len(node.input) > 1 else np.asarray(a.get("pads", []))
        value = self.const.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if a.get("mode", b"constant") not in (b"constant", "constant") or pads is None or (
                value is not None and float(value) != 0) or (len(node.input) > 3 and node.input[3]):
            raise ValueError(f"TFLite export: {node.name!r} pads other than with zeros on all axes")
        rank = len(self.shape[node.input[0]])
        pairs = [[int(pads[i]), int(pads[i + rank])] for i in range(rank)]
        x = self.quantized(node.input[0]) or self.vals.get(node.input[0])
        if x is not None and x.nhwc:
            pairs = [pairs[0], pairs[2], pairs[3], pairs[1]]
        self._unary(node, "PAD", self.s.PadOptionsT(), same=True,
                    extra=[self.w.tensor(node.name + "_pads", [rank, 2], "int32", np.array(pairs))])

    def _Concat(self, node: onnx.NodeProto) -> None:
        ins, out, q = self.tail(node, list(node.input), same=True)  # TFLite's int8 concat does not rescale
        axis = int(attrs(node)["axis"]) % len(self.shape[node.input[0]])
        layout = ins[0].nhwc
        if any(v.nhwc != layout for v in ins):
            raise ValueError(f"TFLite export: {node.name!r} mixes layouts")
        opt = self.s.ConcatenationOptionsT()
        opt.axis = _NHWC_AXIS[axis] if layout else axis
        self.w.op("CONCATENATION", [v.index for v in ins], [self.out(out, q, layout).index], opt, int8=q is not None)
