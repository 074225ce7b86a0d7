"""Constant folding of a written graph, optionally at static input shapes: every node whose inputs
are all known (initializers, ``Constant`` outputs, or the ``Shape`` of a tensor whose shape is
static) is evaluated once with ONNX's reference evaluator and replaced by its value. At static
shapes this removes the shape and mask arithmetic PyTorch's tracer writes (``Shape`` -> ``Gather``
-> ``ConstantOfShape`` with an empty shape, ``Expand`` to a ``-1`` target, ``Range`` over the
sequence length), which runtimes other than ONNX Runtime load poorly or not at all (Apache TVM's
Relax frontend refuses all-MiniLM-L6-v2's). Quantize/dequantize nodes are never folded: the
integers they carry are the point of the file, and neither is what reads a stored weight.

>>> import onnx
>>> from onnx import helper as h, TensorProto as T
>>> g = h.make_graph([h.make_node("Shape", ["x"], ["s"]), h.make_node("ConstantOfShape", ["s"], ["z"]),
...                   h.make_node("Add", ["x", "z"], ["y"])], "g",
...                  [h.make_tensor_value_info("x", T.FLOAT, ["batch", 3])], [h.make_tensor_value_info("y", T.FLOAT, None)])
>>> m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
>>> fold_constants(m, {"x": [2, 3]})
2
>>> [n.op_type for n in m.graph.node], [d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim]
(['Add'], [2, 3])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

__all__ = ["fold_constants", "static_shapes"]

NEVER_FOLDED = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "RandomNormal", "RandomUniform",
                "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}
MAX_FOLDED = 1 << 16  # elements: a folded value larger than this (a broadcast mask, a table) stays computed
STORED = 256  # elements: an initializer this large is a stored weight; what reads it (the unpacking of 4-bit
# codes, the Cast of 16-bit weights) stays in the graph, or the file would hold a float copy instead


def static_shapes(model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]]) -> None:
    """Fix the graph inputs named in ``shapes`` to those shapes (a name the graph lacks, or a rank
    it does not have, is an error naming it)."""
    inputs = {i.name: i for i in model.graph.input}
    for name, shape in shapes.items():
        if name not in inputs:
            raise ValueError(f"static shape for {name!r}, but the graph's inputs are {sorted(inputs)}")
        dims = inputs[name].type.tensor_type.shape.dim
        if len(dims) != len(shape):
            raise ValueError(f"static shape {list(shape)} for input {name!r}, which has rank {len(dims)}")
        for d, v in zip(dims, shape, strict=True):
            d.Clear()
            d.dim_value = int(v)


def _static(vi: onnx.ValueInfoProto) -> list[int] | None:
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        return None
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
    return dims if all(v >= 0 for v in dims) else None


def _evaluate(node: onnx.NodeProto, values: dict[str, np.ndarray], opsets: list[onnx.OperatorSetIdProto]) -> list[np.ndarray] | None:
    from onnx.reference import ReferenceEvaluator

    ins = [i for i in node.input if i]
    g = helper.make_graph([node], "fold", [helper.make_tensor_value_info(i, helper.np_dtype_to_tensor_dtype(values[i].dtype),
                                                                       values[i].shape) for i in dict.fromkeys(ins)],
                          [helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None) for o in node.output if o])
    try:
        out = ReferenceEvaluator(helper.make_model(g, opset_imports=opsets)).run(None, {i: values[i] for i in ins})
    except Exception:  # an op the reference evaluator lacks, or one it computes differently: left as is
        return None
    return [np.asarray(o) for o in out]


def fold_constants(model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]] | None = None) -> int:
    """Fold ``model`` in place (at ``shapes``, graph input name -> static shape, when given);
    returns the number of nodes folded away. Folded values become initializers; ``Constant`` nodes
    and initializers left unread are removed. At static shapes the shapes are inferred again after
    each sweep (a slice whose end was just folded has a static shape now), until nothing folds."""
    if shapes:
        static_shapes(model, shapes)
    total = 0
    for _ in range(8):
        n = _sweep(model, bool(shapes))
        total += n
        if not n or not shapes:
            break
    return total


def _sweep(model: onnx.ModelProto, infer: bool) -> int:
    g = model.graph
    opsets = [o for o in model.opset_import if o.domain in ("", "ai.onnx")]
    values: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in g.initializer
                                     if t.data_location != onnx.TensorProto.EXTERNAL and int(np.prod(t.dims)) < STORED}
    known_shapes: dict[str, list[int]] = {}
    if infer:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True) if model.ByteSize() < (1 << 31) - 1 else model
        for vi in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
            s = _static(vi)
            if s is not None:
                known_shapes[vi.name] = s
    kept: list[onnx.NodeProto] = []
    folded: list[str] = []
    for node in g.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            out = _evaluate(node, values, opsets)
            if out is not None and out[0].size < STORED:
                values[node.output[0]] = out[0]
                folded.append(node.output[0])
                continue
        if node.domain not in ("", "ai.onnx") or node.op_type in NEVER_FOLDED or any(
                a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            kept.append(node)
            continue
        if node.op_type == "Shape" and node.input[0] not in values and node.input[0] in known_shapes:
            shape = np.array(known_shapes[node.input[0]], dtype=np.int64)
            start = next((a.i for a in node.attribute if a.name == "start"), 0)
            end = next((a.i for a in node.attribute if a.name == "end"), len(shape))
            values[node.output[0]] = shape[start:end]
            folded.append(node.output[0])
            continue
        if node.input and all(i in values for i in node.input if i):
            out = _evaluate(node, values, opsets)
            if out is not None and all(o.size <= MAX_FOLDED for o in out):
                for name, v in zip([o for o in node.output if o], out, strict=False):
                    values[name] = v
                    folded.append(name)
                continue
        kept.append(node)
    read = {i for n in kept for i in n.input} | {o.name for o in g.output}
    for n in kept:  # names read inside subgraphs (If, Loop bodies) count too
        for a in n.attribute:
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                read |= {i for sn in sub.node for i in sn.input}
    n_folded = len(g.node) - len(kept)
    existing = {t.name for t in g.initializer}
    new = [numpy_helper.from_array(values[name], name) for name in folded if name in read and name not in existing]
    del g.node[:]
    g.node.extend(kept)
    unread = [t for t in g.initializer if t.name not in read]
    for t in unread:
        g.initializer.remove(t)
    g.initializer.extend(new)
    live = {t.name for t in g.initializer} | {i for n in g.node for i in n.output} | {i.name for i in g.input}
    stale = [vi for vi in g.value_info if vi.name not in live]
    for vi in stale:
        g.value_info.remove(vi)
    return n_folded
