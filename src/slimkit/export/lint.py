"""Lint a QDQ model as ONNX Runtime sees it after its graph optimizations: Q/DQ pairs left unfused
(a quantized op that will run in float) and float compute ops left between quantized ops.

>>> LintReport(integer_ops={"QLinearConv": 3}, float_ops={}, leftover_qdq=0, issues=[]).ok
True
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field

import onnx

__all__ = ["LintReport", "lint", "TARGETS", "tensorrt_issues", "openvino_issues", "tvm_issues", "INTEGER_OPS", "FLOAT_COMPUTE_OPS"]

INTEGER_OPS = {
    "QLinearConv", "QLinearMatMul", "QGemm", "QLinearAdd", "QLinearMul", "QLinearConcat",
    "QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearSigmoid", "QLinearLeakyRelu",
    "MatMulInteger", "ConvInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul",
    "MatMulNBits", "QAttention", "DynamicQuantizeLSTM", "QLinearSoftmax", "QLinearWhere",
}
FLOAT_COMPUTE_OPS = {"Conv", "Gemm", "MatMul", "Add", "Mul", "Concat", "GlobalAveragePool",
                     "AveragePool", "FusedConv", "FusedGemm", "FusedMatMul"}


@dataclass
class LintReport:
    integer_ops: dict[str, int]
    float_ops: dict[str, int]
    leftover_qdq: int
    issues: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.issues

    def to_dict(self) -> dict[str, object]:
        return {"integer_ops": self.integer_ops, "float_ops": self.float_ops,
                "leftover_qdq": self.leftover_qdq, "issues": self.issues}


WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def tensorrt_issues(graph: onnx.GraphProto) -> list[str]:
    """Where a QDQ graph departs from TensorRT's rules for explicit quantization (its developer guide,
    "Q/DQ layer placement"), read from the file as written:

    - activation quantizers are symmetric int8 (zero-point 0), or FP8;
    - each weighted op (Conv, Gemm, MatMul) with quantized weights has its data input quantized;
    - an Add that takes a quantized weighted op's output has its other (residual) input quantized too,
      so TensorRT fuses the add into that op's int8 epilogue;
    - biases stay float (an int32 bias behind a DequantizeLinear is ONNX Runtime's form).
    """
    producer = {o: n for n in graph.node for o in n.output}
    inits = {i.name: i for i in graph.initializer}
    consts = {n.output[0]: a.t for n in graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"}
    ok_types = (onnx.TensorProto.INT8, onnx.TensorProto.FLOAT8E4M3FN, onnx.TensorProto.FLOAT8E5M2)
    issues: list[str] = []

    def from_dq(name: str) -> bool:
        n = producer.get(name)
        return n is not None and n.op_type == "DequantizeLinear"

    for n in graph.node:
        if n.op_type == "QuantizeLinear":
            zp = inits.get(n.input[2]) if len(n.input) > 2 else None
            zp_t = zp if zp is not None else consts.get(n.input[2]) if len(n.input) > 2 else None
            if zp_t is None or zp_t.data_type not in ok_types:
                issues.append(f"TensorRT: quantizer {n.name or n.output[0]!r} is not symmetric int8 (its zero-point "
                              "is uint8 or absent); TensorRT takes int8 with zero-point 0")
            elif zp_t.data_type == onnx.TensorProto.INT8 and onnx.numpy_helper.to_array(zp_t).any():
                issues.append(f"TensorRT: quantizer {n.name or n.output[0]!r} has a non-zero zero-point")
        elif n.op_type in WEIGHTED_OPS and len(n.input) > 1 and from_dq(n.input[1]):
            if not from_dq(n.input[0]):
                issues.append(f"TensorRT: {n.op_type} {n.name!r} has quantized weights but a float input; it runs "
                              "in float")
            if len(n.input) > 2 and from_dq(n.input[2]):
                issues.append(f"TensorRT: {n.op_type} {n.name!r} reads an int32 bias through a DequantizeLinear; "
                              "TensorRT takes float biases")
        elif n.op_type == "Add" and len(n.input) == 2:
            heads = [producer.get(i) for i in n.input]
            weighted = [h is not None and h.op_type in WEIGHTED_OPS and len(h.input) > 1 and from_dq(h.input[1])
                        for h in heads]
            for i, w in enumerate(weighted):
                other = n.input[1 - i]
                if w and not from_dq(other) and other not in inits and other not in consts:
                    issues.append(f"TensorRT: the residual input of Add {n.name!r} is not quantized; TensorRT "
                                  "fuses the add into the int8 op before it only when it is")
                    break
    return issues


TARGETS = ("onnxruntime", "openvino", "tvm", "tensorrt")


def openvino_issues(path: str, graph: onnx.GraphProto) -> list[str]:
    """What OpenVINO's CPU plugin runs in float in this file: read off what it compiled when
    OpenVINO is installed (``runtimes.integer_kernels``), else from the graph's ops."""
    from slimkit.export.runtimes import available, integer_kernels

    ops = Counter(n.op_type for n in graph.node)
    issues = []
    if ops.get("DynamicQuantizeLinear") or ops.get("MatMulInteger"):
        issues.append("dynamic INT8 (DynamicQuantizeLinear + MatMulInteger): OpenVINO runs MatMulInteger in float "
                      "with conversions around it, so this file is no faster there than FP32; quantize with static "
                      "'int8' (calibrated) or weight-only 'int4-weight' for OpenVINO")
    quantized = any(ops.get(k) for k in ("DequantizeLinear", "MatMulNBits", "MatMulInteger"))
    if quantized and available("openvino"):
        kernels = integer_kernels(path, "openvino")
        floats = sum(v for layer in kernels.values() for p, v in layer.items() if p in ("f32", "bf16", "f16"))
        total = sum(v for layer in kernels.values() for v in layer.values())
        if floats:
            issues.append(f"OpenVINO runs {floats} of its {total} weighted layers in float ({kernels})")
    return issues


def tvm_issues(graph: onnx.GraphProto) -> list[str]:
    """What Apache TVM's Relax ONNX frontend refuses, or runs without integer kernels, in this file."""
    ops = Counter(n.op_type for n in graph.node)
    issues = []
    custom = sorted({n.op_type for n in graph.node if n.domain not in ("", "ai.onnx")})
    if custom:
        issues.append(f"ops TVM's ONNX frontend does not have: {', '.join(custom)} (export with target='tvm' "
                      "writes 4-bit layers as plain ONNX)")
    dynamic = any(d.dim_param or not d.HasField("dim_value") for i in graph.input
                  for d in i.type.tensor_type.shape.dim)
    if dynamic and (ops.get("ConstantOfShape") or ops.get("Expand")):
        issues.append("shape arithmetic on dynamic axes (ConstantOfShape, Expand): TVM's frontend fails on it in "
                      "transformer masks; export with static_shapes=True (target='tvm' does)")
    if ops.get("DequantizeLinear") or ops.get("DynamicQuantizeLinear"):
        issues.append("TVM keeps Q/DQ elementwise and runs convs and matmuls in float: the quantized file is "
                      "correct there, not faster")
    return issues


def lint(path: str, target: str = "onnxruntime") -> LintReport:
    """Optimize ``path`` with ONNX Runtime (extended level, hardware-independent) and inspect it;
    ``target="tensorrt"`` checks the file as written against TensorRT's placement rules instead
    (``tensorrt_issues``), with ONNX Runtime's op counts beside them; ``"openvino"`` and ``"tvm"``
    say what those runtimes refuse or run in float (``openvino_issues``, ``tvm_issues``)."""
    if target not in TARGETS:
        raise ValueError(f"unknown lint target {target!r}; one of {', '.join(TARGETS)}")
    src = onnx.load(path, load_external_data=False)
    quantized = any(n.op_type in ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear")
                    for n in src.graph.node)
    scratch = tempfile.mkdtemp(prefix="slimkit-lint-")
    try:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = os.path.join(scratch, "optimized.onnx")
        # its tensors beside it (only the graph is read): a model over 2 GiB could not be written otherwise
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", "optimized.data")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        so.log_severity_level = 3
        ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        g = onnx.load(so.optimized_model_filepath, load_external_data=False).graph
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    ops = Counter(n.op_type for n in g.node)
    integer = {k: v for k, v in ops.items() if k in INTEGER_OPS}
    floats = {k: v for k, v in ops.items() if k in FLOAT_COMPUTE_OPS}
    produced_by = {o: n for n in g.node for o in n.output}
    issues: list[str] = []
    float8 = (onnx.TensorProto.FLOAT8E4M3FN, onnx.TensorProto.FLOAT8E5M2)
    fp8 = any(t.data_type in float8 for t in src.graph.initializer) or any(
        a.t.data_type in float8 for n in src.graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value")
    if fp8:  # a format for GPUs: the CPU provider has no FP8 kernels, so every FP8 layer runs in float here
        fed = sum(1 for n in g.node if n.op_type in FLOAT_COMPUTE_OPS
                  and any(i in produced_by and produced_by[i].op_type == "DequantizeLinear" for i in n.input))
        issues.append(f"FP8 Q/DQ: ONNX Runtime's CPU provider has no FP8 kernels, so {fed} FP8 layers run in float "
                      "here (correct, not faster): the format is for GPU runtimes with FP8 tensor cores (TensorRT)")
    elif target == "tensorrt":
        issues += tensorrt_issues(src.graph)
    elif target == "openvino":
        issues += openvino_issues(path, src.graph)
    elif target == "tvm":
        issues += tvm_issues(src.graph)
    elif quantized:
        for n in g.node:
            if n.op_type in FLOAT_COMPUTE_OPS:
                fed_by_dq = [i for i in n.input if i in produced_by and produced_by[i].op_type == "DequantizeLinear"]
                if fed_by_dq:
                    issues.append(f"{n.op_type} node {n.name or n.output[0]!r} runs in float between Q/DQ")
    graph_inputs = {i.name for i in g.input}
    graph_outputs = {o.name for o in g.output}
    leftover = 0
    for n in g.node:
        if n.op_type == "QuantizeLinear" and n.input[0] in graph_inputs:
            continue  # quantizing the model's input is expected
        if n.op_type == "DequantizeLinear" and n.output[0] in graph_outputs:
            continue  # so is dequantizing its output
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            leftover += 1
    if quantized and leftover and not fp8 and target == "onnxruntime":
        issues.append(f"{leftover} QuantizeLinear/DequantizeLinear nodes left unfused inside the graph")
    return LintReport(dict(integer), dict(floats), leftover, issues)
