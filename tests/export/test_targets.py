"""Files for runtimes other than ONNX Runtime: constant folding at static shapes, 4-bit layers as
plain ONNX, the parity check and the lint in OpenVINO and TVM (each skipped where not installed),
``slimkit bench --runtime``."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import slimkit as sk
from slimkit.export.fold import fold_constants
from slimkit.export.lint import lint
from slimkit.export.runtime import check_parity, session
from slimkit.export.runtimes import available, compare_runtime_latency, integer_kernels, open_file


def _bert(tmp_path, hidden: int = 32):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=2 * hidden)
    bert = transformers.BertModel(cfg).eval()
    ex = {"input_ids": torch.randint(0, 100, (2, 9)), "attention_mask": torch.tensor([[1] * 9, [1] * 5 + [0] * 4])}
    return bert, ex


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()


def test_static_shapes_fold_the_mask_arithmetic(tmp_path):
    bert, ex = _bert(tmp_path)
    dynamic = sk.export_onnx(bert, tmp_path / "d.onnx", ex)
    static = sk.export_onnx(bert, tmp_path / "s.onnx", ex, static_shapes=True)
    ops_d = [n.op_type for n in onnx.load(dynamic.path).graph.node]
    g = onnx.load(static.path).graph
    ops_s = [n.op_type for n in g.node]
    assert "ConstantOfShape" in ops_d and "Shape" in ops_d
    assert "ConstantOfShape" not in ops_s and "Shape" not in ops_s and "Range" not in ops_s
    assert len(ops_s) < 0.6 * len(ops_d)
    assert [[d.dim_value for d in i.type.tensor_type.shape.dim] for i in g.input] == [[2, 9], [2, 9]]
    feeds = {k: v.numpy() for k, v in ex.items()}
    a, b = session(dynamic.path).run(None, feeds)[0], session(static.path).run(None, feeds)[0]
    assert float(np.abs(a - b).max()) < 1e-5
    with torch.no_grad():
        want = bert(**ex).last_hidden_state.numpy()
    assert float(np.abs(b - want).max()) < 1e-4


def test_fold_keeps_stored_weights_and_quantizers(tmp_path):
    model = _cnn()
    x = torch.randn(4, 3, 8, 8)
    q = sk.quantize(model, "int8", calib_data=[torch.randn(8, 3, 8, 8) for _ in range(2)])
    r = sk.export_onnx(q, tmp_path / "q.onnx", x, target="openvino")
    ops = {n.op_type for n in onnx.load(r.path).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # never folded into float weights
    assert r.parity.ok and r.target == "openvino"


def test_fold_errors_name_the_input():
    from onnx import TensorProto as T
    from onnx import helper as h

    g = h.make_graph([h.make_node("Relu", ["x"], ["y"])], "g", [h.make_tensor_value_info("x", T.FLOAT, ["n", 3])],
                     [h.make_tensor_value_info("y", T.FLOAT, None)])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    with pytest.raises(ValueError, match="'tokens'.*inputs are \\['x'\\]"):
        fold_constants(m, {"tokens": [2, 3]})
    with pytest.raises(ValueError, match="input 'x', which has rank 2"):
        fold_constants(m, {"x": [2, 3, 4]})


def test_int4_layers_as_plain_onnx_for_tvm(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 32)).eval()
    q = sk.quantize(model, "int4-weight")
    x = torch.randn(3, 256)
    nbits = sk.export_onnx(q, tmp_path / "n.onnx", x)
    plain = sk.export_onnx(q, tmp_path / "p.onnx", x, target="tvm", check=True)
    g = onnx.load(plain.path).graph
    assert "MatMulNBits" in {n.op_type for n in onnx.load(nbits.path).graph.node}
    assert not [n for n in g.node if n.domain not in ("", "ai.onnx")]
    assert "BitShift" in {n.op_type for n in g.node}  # the codes stay bytes in the file
    stored = sum(t.ByteSize() for t in g.initializer)
    assert stored < 0.2 * sum(p.numel() * 4 for p in model.parameters())
    with torch.no_grad():
        want = q(x).numpy()
    got = session(plain.path).run(None, {"input": x.numpy()})[0]
    assert float(np.abs(got - want).max()) < 1e-4
    assert plain.parity.ok
    assert not any(isinstance(getattr(m, "export_standard", None), bool) and m.__dict__.get("export_standard")
                   for m in q.modules())  # restored after the export


def test_bad_targets(tmp_path):
    with pytest.raises(ValueError, match="unknown target 'tflite2'"):
        sk.export_onnx(nn.Linear(2, 2), tmp_path / "a.onnx", torch.randn(1, 2), target="tflite2")
    with pytest.raises(ValueError, match="generative export is for ONNX Runtime"):
        sk.export_onnx(nn.Linear(2, 2), tmp_path / "a.onnx", torch.randint(0, 2, (1, 2)), generative=True, target="tvm")
    with pytest.raises(ValueError, match="missing.onnx: no such ONNX file"):
        open_file(str(tmp_path / "missing.onnx"), "onnxruntime")
    with pytest.raises(ValueError, match="unknown runtime 'tensorflow'"):
        open_file(str(tmp_path / "a.onnx"), "tensorflow")
    with pytest.raises(ValueError, match="unknown lint target"):
        lint(str(tmp_path / "a.onnx"), "coreml")


def test_tvm_lint_rules_on_a_dynamic_int4_file(tmp_path):
    bert, ex = _bert(tmp_path, 128)  # 4-bit groups of 128
    q = sk.quantize(bert, "int4-weight")
    r = sk.export_onnx(q, tmp_path / "q.onnx", ex)
    issues = lint(r.path, "tvm").issues
    assert any("MatMulNBits" in i for i in issues) and any("static_shapes=True" in i for i in issues)
    assert not [i for i in lint(sk.export_onnx(q, tmp_path / "t.onnx", ex, target="tvm").path, "tvm").issues
                if "MatMulNBits" in i or "static_shapes" in i]


@pytest.mark.skipif(not available("openvino"), reason="OpenVINO not installed")
def test_openvino_runs_static_int8_on_integer_kernels(tmp_path):
    model = _cnn()
    x = torch.randn(4, 3, 8, 8)
    q = sk.quantize(model, "int8", calib_data=[torch.randn(8, 3, 8, 8) for _ in range(2)])
    r = sk.export_onnx(q, tmp_path / "q.onnx", x, target="openvino")
    assert r.runtime_parity is not None and r.runtime_parity.ok
    kernels = integer_kernels(r.path, "openvino")
    assert set(kernels["Convolution"]) <= {"u8", "i8"} and set(kernels["FullyConnected"]) <= {"u8", "i8"}
    fp32 = sk.export_onnx(model, tmp_path / "f.onnx", x, target="openvino")
    assert set(integer_kernels(fp32.path, "openvino")["Convolution"]) == {"f32"}  # FP32 stays FP32 (no BF16 hint)
    other = _cnn()
    with torch.no_grad():
        other[0].weight.neg_()
    assert not check_parity(other, r.path, x, None, 1e-2, runtime="openvino").ok  # another function fails
    lat = compare_runtime_latency([fp32.path, r.path], {"input": x.numpy()}, "openvino", rounds=1, seconds=0.05, warmup=1)
    assert all(t["median_ms"] > 0 for t in lat)


@pytest.mark.skipif(not available("openvino"), reason="OpenVINO not installed")
def test_openvino_lint_says_dynamic_int8_runs_in_float(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    q = sk.quantize(model, "int8-dynamic")
    r = sk.export_onnx(q, tmp_path / "d.onnx", torch.randn(2, 32), target="openvino")
    assert any("MatMulInteger in float" in i for i in r.lint.issues)
    assert any("weighted layers in float" in i for i in r.lint.issues)


@pytest.mark.skipif(not available("tvm"), reason="Apache TVM not installed")
def test_tvm_loads_the_static_transformer_and_int4(tmp_path):
    bert, ex = _bert(tmp_path, 128)
    with pytest.raises(ValueError, match="TVM could not load"):  # the dynamic file, as ONNX Runtime's exporter writes it
        open_file(sk.export_onnx(bert, tmp_path / "d.onnx", ex).path, "tvm").run({k: v.numpy() for k, v in ex.items()})
    r = sk.export_onnx(sk.quantize(bert, "int4-weight"), tmp_path / "t.onnx", ex, target="tvm")
    assert r.runtime_parity is not None and r.runtime_parity.ok
    assert "MatMulNBits" not in {n.op_type for n in onnx.load(r.path).graph.node}


@pytest.mark.skipif(not available("openvino"), reason="OpenVINO not installed")
def test_cli_bench_in_openvino(tmp_path, capsys):
    from slimkit.cli import main

    model = _cnn()
    x = torch.randn(4, 3, 8, 8)
    a = sk.export_onnx(model, tmp_path / "a.onnx", x).path
    b = sk.export_onnx(sk.quantize(model, "int8", calib_data=[x]), tmp_path / "b.onnx", x).path
    np.save(tmp_path / "x.npy", x.numpy())
    assert main(["bench", a, b, "--data", str(tmp_path / "x.npy"), "--runtime", "openvino", "--runs", "5",
                 "--json", str(tmp_path / "rows.json")]) == 0
    out = capsys.readouterr().out
    assert "run in openvino" in out
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert rows[0]["rel_l2"] < 1e-5 and rows[1]["rel_l2"] < 0.1
