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

__all__ = ["LintReport", "lint", "INTEGER_OPS", "FLOAT_COMPUTE_OPS"]

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


def lint(path: str) -> LintReport:
    """Optimize ``path`` with ONNX Runtime (extended level, hardware-independent) and inspect it."""
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
    if quantized and leftover and not fp8:
        issues.append(f"{leftover} QuantizeLinear/DequantizeLinear nodes left unfused inside the graph")
    return LintReport(dict(integer), dict(floats), leftover, issues)
