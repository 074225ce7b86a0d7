"""Where activation quantizers go, so that ONNX Runtime can run every quantized op in integers.

Rules (the shape ONNX Runtime's QDQ fusions expect):
- the tensor inputs of *compute* ops (quantized conv/linear, add, concatenation, average pooling,
  matmul) are quantized, by one quantizer per producing tensor, shared by all its consumers;
- an activation (ReLU, ReLU6) that follows an op is quantized after it, so the runtime folds it
  into the integer op's output range (ReLU -> Q with zero-point 0 is removed);
- *shape* ops (max pooling, flatten, reshape, permute, zero padding...) keep their input's scale:
  their output reuses the input's quantizer, as the runtime requires to drop the Q/DQ around them
  (a zero pad between a conv's ReLU6 and the next conv, TensorFlow's SAME padding, then runs on
  uint8 and the conv before it stays an integer conv).

The result is a ``Placement``: plain data that is saved in the plan and applied again on load.

>>> Placement(quantize=["x"], share={"flatten": "x"}).to_dict()
{'quantize': ['x'], 'share': {'flatten': 'x'}}
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from slimkit.quant.modules import QuantConv, QuantLinear
from slimkit.quant.qat_modules import FakeQuantWeighted

__all__ = ["Placement", "find_placement", "bounded_nodes", "COMPUTE_FUNCTIONS", "SHAPE_FUNCTIONS", "SHAPE_METHODS"]

COMPUTE_MODULES: tuple[type, ...] = (QuantConv, QuantLinear, FakeQuantWeighted, nn.AdaptiveAvgPool2d, nn.AvgPool2d)
COMPUTE_FUNCTIONS: set[Any] = {
    operator.add, torch.add, torch.cat, torch.concat, torch.matmul, operator.matmul,
    F.adaptive_avg_pool2d, F.avg_pool2d,
}
COMPUTE_METHODS = {"add"}
SHAPE_MODULES: tuple[type, ...] = (nn.MaxPool1d, nn.MaxPool2d, nn.Flatten, nn.Identity, nn.Dropout)
SHAPE_FUNCTIONS: set[Any] = {torch.flatten, F.max_pool2d, torch.reshape, torch.permute, torch.transpose}
SHAPE_METHODS = {"view", "reshape", "flatten", "permute", "transpose", "contiguous", "squeeze", "unsqueeze"}


@dataclass
class Placement:
    """``quantize``: nodes whose output gets its own quantizer; ``share``: node -> node whose
    quantizer it reuses."""

    quantize: list[str] = field(default_factory=list)
    share: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"quantize": list(self.quantize), "share": dict(self.share)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Placement:
        return cls(quantize=list(d["quantize"]), share=dict(d["share"]))


def _kind(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        m = modules[str(node.target)]
        if isinstance(m, COMPUTE_MODULES):
            return "compute"
        if isinstance(m, SHAPE_MODULES):
            return "shape"
        if isinstance(m, (nn.ZeroPad1d, nn.ZeroPad2d, nn.ConstantPad1d, nn.ConstantPad2d)) and float(m.value) == 0.0:
            return "shape"  # zero maps to the zero-point exactly: padding commutes with quantizing
    elif node.op == "call_function":
        if node.target in COMPUTE_FUNCTIONS:
            return "compute"
        if node.target in SHAPE_FUNCTIONS:
            return "shape"
        if node.target is F.pad and node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "constant") == \
                "constant" and not (node.kwargs.get("value") or (node.args[3] if len(node.args) > 3 else 0)):
            return "shape"
    elif node.op == "call_method":
        if node.target in COMPUTE_METHODS:
            return "compute"
        if node.target in SHAPE_METHODS:
            return "shape"
    return "other"


def find_placement(gm: fx.GraphModule, float_nodes: set[str]) -> Placement:
    """Compute the placement for ``gm`` (already holding QuantConv/QuantLinear modules).

    ``float_nodes`` are the nodes that produce float tensors (``core.graph.float_tensor_nodes``).
    """
    modules = dict(gm.named_modules())
    marked: set[str] = set()
    shape_src: dict[str, str] = {}
    nodes = list(gm.graph.nodes)
    for node in nodes:
        kind = _kind(node, modules)
        if kind == "compute":
            for arg in node.all_input_nodes:
                if arg.name in float_nodes:
                    marked.add(arg.name)
        elif kind == "shape":
            src = node.args[0] if node.args else None
            if isinstance(src, fx.Node) and src.name in float_nodes and node.name in float_nodes:
                marked.add(src.name)
                shape_src[node.name] = src.name

    def root(name: str) -> str:
        while name in shape_src:
            name = shape_src[name]
        return name

    placement = Placement()
    for node in nodes:
        if node.name not in marked:
            continue
        if node.name in shape_src:
            placement.share[node.name] = root(node.name)
        else:
            placement.quantize.append(node.name)
    # a shape op whose source is not quantized on its own cannot share: give it its own quantizer
    for name, src in list(placement.share.items()):
        if src not in placement.quantize:
            del placement.share[name]
            placement.quantize.append(name)
    return placement


def bounded_nodes(gm: fx.GraphModule) -> set[str]:
    """The nodes whose output a clamp bounds on both sides (ReLU6, Hardtanh, ``clamp(x, a, b)`` with
    numbers): their range is known, and a calibrator that clips below the bound only loses the
    saturated values, which such layers produce in bulk."""
    modules = dict(gm.named_modules())
    out = set()
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(modules[str(node.target)], (nn.ReLU6, nn.Hardtanh)):
            out.add(node.name)
        elif node.op == "call_function" and node.target in (F.relu6, F.hardtanh):
            out.add(node.name)
        elif node.op in ("call_function", "call_method") and node.target in (torch.clamp, torch.clip, "clamp", "clip"):
            args = [*node.args[1:3], None, None]
            lo, hi = node.kwargs.get("min", args[0]), node.kwargs.get("max", args[1])
            if isinstance(lo, (int, float)) and isinstance(hi, (int, float)):
                out.add(node.name)
    return out


def quantizer_name(node_name: str) -> str:
    return f"act_quant_{node_name}"


def insert_quantizers(gm: fx.GraphModule, placement: Placement, make: Any) -> dict[str, nn.Module]:
    """Insert ``make(node_name)`` modules after each placed node (shared ones reused). In place."""
    by_name = {n.name: n for n in gm.graph.nodes}
    missing = [n for n in [*placement.quantize, *placement.share] if n not in by_name]
    if missing:
        raise ValueError(
            f"the plan places quantizers after nodes this model does not have: {missing[:5]}; "
            "was it made for another architecture?"
        )
    created: dict[str, nn.Module] = {}
    for name in placement.quantize:
        qname = quantizer_name(name)
        created[qname] = make(name)
        gm.add_submodule(qname, created[qname])
    for name in [*placement.quantize, *placement.share]:
        node = by_name[name]
        target = quantizer_name(placement.share.get(name, name))
        with gm.graph.inserting_after(node):
            qnode = gm.graph.call_module(target, (node,))
        node.replace_all_uses_with(qnode, delete_user_cb=lambda u, q=qnode: u is not q)
    gm.graph.lint()
    gm.recompile()
    return created
