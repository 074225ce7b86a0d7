"""Rewrites of the exported ONNX graph that let ONNX Runtime run more of a quantized model in integers.

``fold_pads_into_convs``: a zero ``Pad`` in front of a conv (PyTorch has no asymmetric conv padding,
so TensorFlow-style SAME padding is an explicit pad) sits between quantizers,
``DQ -> Pad -> Q -> DQ -> Conv``, where ONNX Runtime leaves it in float between a dequantize and a
quantize. Both quantizers share one scale and zero-point (the placement makes a pad keep its
input's), and zero is exactly the zero-point, so the pad goes into the conv's own ``pads``
attribute (ONNX convs pad each side separately): ``DQ -> Conv(pads + p)``, the same numbers.

``slim_quantized``: what the file holds beyond the integers and their scales, removed where it says
nothing ONNX does not already assume: the all-zero int32 zero-points of the biases' dequantizers
(an absent zero-point is zero), the ``Identity`` nodes the exporter writes for quantizer parameters
two modules share (their readers read the source), and the inferred shapes (``value_info``, which
runtimes infer again). EfficientNet-Lite1's INT8 file: 26.9% of FP32's with it
(benchmarks/results/ptq_real_cnn.md; 27.8% in that file's previous run, without it), with the same
integer kernels and, measured ad hoc, bit-identical outputs.

``store_half``: the FP32 tensors a model rounded to 16 bits (``fp16-weights``) stored in 16 bits,
each behind a ``Cast``: torch's exporter folds the model's own up-cast into FP32 initializers.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

__all__ = ["fold_pads_into_convs", "slim_quantized", "store_half", "relu_after_fp8_qdq"]


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Values known without running the graph: initializers, Constant outputs, and Casts of them."""
    known = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            known[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        elif node.op_type == "Cast" and node.input[0] in known:
            to = next(a.i for a in node.attribute if a.name == "to")
            known[node.output[0]] = known[node.input[0]].astype(helper.tensor_dtype_to_np_dtype(to))
    return known


def _fold(graph: onnx.GraphProto, name: str, known: dict[str, np.ndarray], opset: list[onnx.OperatorSetIdProto]
          ) -> np.ndarray | None:
    """The value of ``name`` when every node it depends on is computed from constants alone (the
    pad widths torch writes as a Shape-free chain of Reshape, Slice and Cast), else None."""
    from onnx.reference import ReferenceEvaluator

    producer = {o: n for n in graph.node for o in n.output}
    needed: list[onnx.NodeProto] = []
    stack, seen = [name], set()
    while stack:
        x = stack.pop()
        if x in known or x in seen or not x:
            continue
        seen.add(x)
        node = producer.get(x)
        if node is None or node.op_type in ("QuantizeLinear", "DequantizeLinear") or len(needed) > 64:
            return None  # a graph input, or more than pad arithmetic
        needed.append(node)
        stack += list(node.input)
    order = [n for n in graph.node if any(n is m for m in needed)]
    leaves = {i for n in order for i in n.input if i in known}
    sub = helper.make_model(helper.make_graph(order, "fold", [], [helper.make_tensor_value_info(name, 0, None)],
                                              [numpy_helper.from_array(known[i], i) for i in leaves]),
                            opset_imports=opset)
    try:
        got: Any = ReferenceEvaluator(sub).run(None, {})
        return np.asarray(got[0])
    except Exception:  # an op the evaluator lacks: leave the pad as it is
        return None


def _wiring(graph: onnx.GraphProto) -> tuple[dict[str, onnx.NodeProto], dict[str, list[onnx.NodeProto]]]:
    """Each tensor's producing node, and the nodes reading it."""
    producer = {o: n for n in graph.node for o in n.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    return producer, readers


def _same(known: dict[str, np.ndarray], a: str, b: str) -> bool:
    return a == b or (a in known and b in known and np.array_equal(known[a], known[b])
                      and known[a].dtype == known[b].dtype)


def fold_pads_into_convs(model: onnx.ModelProto) -> int:
    """Fold every zero 4-D ``Pad`` that sits between a dequantize and a same-scale quantize read
    only by convs into those convs' ``pads``, in place; returns how many were folded."""
    graph = model.graph
    known = _constants(graph)
    producer, consumers = _wiring(graph)
    outputs = {o.name for o in graph.output}
    drop: list[onnx.NodeProto] = []
    for pad in list(graph.node):
        if pad.op_type != "Pad" or len(pad.input) < 2:
            continue
        if pad.input[1] not in known:
            widths = _fold(graph, pad.input[1], known, list(model.opset_import))
            if widths is None:
                continue
            known[pad.input[1]] = widths
        mode = next((a.s.decode() for a in pad.attribute if a.name == "mode"), "constant")
        value = known.get(pad.input[2]) if len(pad.input) > 2 and pad.input[2] else np.zeros(1)
        pads = known[pad.input[1]].astype(np.int64).tolist()
        if mode != "constant" or value is None or np.any(value != 0) or len(pads) != 8 or any(pads[i] for i in (0, 1, 4, 5)) \
                or len(pad.input) > 3 and pad.input[3]:
            continue
        dq0 = producer.get(pad.input[0])
        q = consumers.get(pad.output[0], [])
        if dq0 is None or dq0.op_type != "DequantizeLinear" or len(q) != 1 or q[0].op_type != "QuantizeLinear":
            continue
        q1 = q[0]
        dq = consumers.get(q1.output[0], [])
        if len(dq) != 1 or dq[0].op_type != "DequantizeLinear" or pad.output[0] in outputs or q1.output[0] in outputs:
            continue
        convs = consumers.get(dq[0].output[0], [])
        if not convs or dq[0].output[0] in outputs or any(c.op_type != "Conv" or c.input[0] != dq[0].output[0]
                                                         or any(a.name == "auto_pad" for a in c.attribute)
                                                         for c in convs):
            continue
        if not all(_same(known, x, y) for x, y in zip(dq0.input[1:], q1.input[1:], strict=False)) \
                or len(dq0.input) != len(q1.input):
            continue
        top, left, bottom, right = pads[2], pads[3], pads[6], pads[7]
        for conv in convs:
            old = next((a for a in conv.attribute if a.name == "pads"), None)
            before = list(old.ints) if old is not None else [0, 0, 0, 0]
            new = [before[0] + top, before[1] + left, before[2] + bottom, before[3] + right]
            if old is not None:
                conv.attribute.remove(old)
            conv.attribute.append(helper.make_attribute("pads", new))
            conv.input[0] = dq0.output[0]
        drop += [pad, q1, dq[0]]
    for n in drop:
        graph.node.remove(n)
    if drop:
        _drop_dead(graph)
    return len(drop) // 3


def _drop_dead(graph: onnx.GraphProto) -> None:
    """Remove the nodes nothing reads any more (the folded pads' width arithmetic)."""
    while True:
        read = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if not any(o in read for o in n.output)]
        if not dead:
            return
        for n in dead:
            graph.node.remove(n)


def slim_quantized(model: onnx.ModelProto) -> dict[str, int]:
    """Drop zero int32 zero-points, bypass ``Identity`` nodes, clear ``value_info`` (see the module
    doc), in place; returns how many of each went."""
    graph = model.graph
    known = _constants(graph)
    zero_points = 0
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and len(node.input) == 3 and node.input[2] in known:
            z = known[node.input[2]]
            if z.dtype == np.int32 and not z.any():
                del node.input[2]
                zero_points += 1
    outputs = {o.name for o in graph.output}
    source = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Identity" and n.output[0] not in outputs}

    def root(name: str) -> str:
        while name in source:
            name = source[name]
        return name

    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in source:
                node.input[i] = root(name)
    identities = sum(1 for n in graph.node if n.op_type == "Identity" and n.output[0] in source)
    _drop_dead(graph)
    shapes = len(graph.value_info)
    del graph.value_info[:]
    return {"zero_points": zero_points, "identities": identities, "value_info": shapes}


HALF_MIN_ELEMENTS = 256  # smaller FP32 tensors are not worth a Cast node of their own


def store_half(model: onnx.ModelProto, dtype: str) -> int:
    """FP32 initializers of ``HALF_MIN_ELEMENTS`` values or more stored in ``dtype`` (``"float16"``,
    ``"bfloat16"``), each read through a ``Cast`` back to FP32: the ``fp16-weights`` /
    ``bf16-weights`` form, half the bytes, FP32 arithmetic. The weights the model rounded to 16 bits
    are stored exactly; tensors the exporter computed from them (a conv's weights with a BatchNorm
    folded in) are rounded once more, within the format's own step, and the parity check says
    whether the file still computes the model's function. Returns how many were converted.

    >>> import numpy as np
    >>> from onnx import TensorProto
    >>> w = numpy_helper.from_array(np.full((16, 16), 0.5, np.float32), "w")
    >>> g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
    ...                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
    ...                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])], [w])
    >>> m = helper.make_model(g)
    >>> store_half(m, "float16"), m.graph.initializer[0].data_type == TensorProto.FLOAT16, m.graph.node[0].op_type
    (1, True, 'Cast')
    """
    import ml_dtypes

    np_half = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16}[dtype]
    to = {"float16": onnx.TensorProto.FLOAT16, "bfloat16": onnx.TensorProto.BFLOAT16}[dtype]
    graph = model.graph
    casts, done = [], 0
    for i, init in enumerate(list(graph.initializer)):
        if init.data_type != onnx.TensorProto.FLOAT or int(np.prod(init.dims)) < HALF_MIN_ELEMENTS:
            continue
        name, value = init.name, numpy_helper.to_array(init)
        if dtype == "float16":
            value = np.clip(value, -65504.0, 65504.0)
        half = value.astype(np_half)
        stored = numpy_helper.from_array(half, f"{name}_{dtype}") if dtype == "float16" else \
            helper.make_tensor(f"{name}_{dtype}", to, list(value.shape), half.view(np.uint16).tobytes(), raw=True)
        graph.initializer[i].CopyFrom(stored)  # ``init`` is that entry: its name is the new one from here
        casts.append(helper.make_node("Cast", [stored.name], [name], to=onnx.TensorProto.FLOAT, name=f"{name}_to_float"))
        done += 1
    for n in reversed(casts):
        graph.node.insert(0, n)
    return done


def relu_after_fp8_qdq(model: onnx.ModelProto) -> int:
    """``Relu`` (or ``Clip``, ReLU6) ``-> QuantizeLinear -> DequantizeLinear`` with an 8-bit float
    zero-point rewritten as ``QuantizeLinear -> DequantizeLinear -> Relu``: for a ReLU the same
    numbers (rounding to FP8 keeps each value's sign, so zeroing the negatives before or after gives
    the same tensor); for a clip the same but where its upper bound is not on the scaled FP8 grid
    (then a value just below it may round one step above, which the clip after caps), and a form
    ONNX Runtime's optimizer leaves alone. Its ReLU-into-Q fusion removes a ReLU before a quantizer
    whose zero-point is 0, exact for uint8 (the grid starts at 0) but not for FP8, whose grid is
    signed: ONNX Runtime 1.32 then computes another function (measured: a conv net's output 0.28 off
    at its extended optimization level, 4e-8 with optimizations off); its Clip-into-Q fusion fails
    to load the file at all (``GetQConstantLowerUpper``: "Unexpected data type ... of 17"). Returns
    how many it moved."""
    graph = model.graph
    float8 = (onnx.TensorProto.FLOAT8E4M3FN, onnx.TensorProto.FLOAT8E5M2)
    fp8_consts = {n.output[0] for n in graph.node if n.op_type == "Constant"
                  and any(a.name == "value" and a.t.data_type in float8 for a in n.attribute)}
    fp8_consts |= {i.name for i in graph.initializer if i.data_type in float8}
    producer, readers = _wiring(graph)
    outputs = {o.name for o in graph.output}
    moved = 0
    for q in list(graph.node):
        if q.op_type != "QuantizeLinear" or len(q.input) < 3 or q.input[2] not in fp8_consts:
            continue
        relu = producer.get(q.input[0])
        dqs = readers.get(q.output[0], [])
        if relu is None or relu.op_type not in ("Relu", "Clip") or len(readers.get(relu.output[0], [])) != 1 \
                or relu.output[0] in outputs or len(dqs) != 1 or dqs[0].op_type != "DequantizeLinear":
            continue
        dq = dqs[0]
        q.input[0] = relu.input[0]  # quantize the ReLU's input
        after = dq.output[0]
        dq.output[0] = f"{after}_before_relu"
        relu.input[0], relu.output[0] = dq.output[0], after  # the ReLU now reads the dequantized tensor
        moved += 1
    if moved:  # keep the nodes in topological order: each ReLU after its dequantizer
        order: list[onnx.NodeProto] = []
        done: set[str] = {i.name for i in graph.input} | {i.name for i in graph.initializer}
        pending = list(graph.node)
        while pending:
            ready = [n for n in pending if all(not i or i in done for i in n.input)]
            if not ready:
                raise RuntimeError("relu_after_fp8_qdq left a cycle in the graph")
            for n in ready:
                order.append(n)
                done.update(n.output)
                pending.remove(n)
        del graph.node[:]
        graph.node.extend(order)
    return moved
