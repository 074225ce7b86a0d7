"""``export_onnx(..., target="tflite")``: slimkit's ONNX -> TFLite converter, checked in LiteRT
(skipped where ai-edge-litert is not installed): float and full-integer files at parity, the int8
kernels read off the interpreter's op list, a free batch axis, and the errors for what it does
not convert."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch import nn

import slimkit as sk
from slimkit.export.runtimes import available, integer_kernels, open_file

pytestmark = pytest.mark.skipif(not available("litert"), reason="ai-edge-litert is not installed")


class _Net(nn.Module):
    """Every op the converter lowers, at shapes where TFLite's SAME padding is not PyTorch's."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.ReLU6())
        self.pw = nn.Conv2d(16, 16, 1)
        self.gate = nn.Conv2d(16, 16, 1)
        self.branch = nn.Conv2d(16, 8, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.avg = nn.AvgPool2d(2)
        self.fc = nn.Linear(24 * 2 * 2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = torch.relu(self.pw(self.dw(x)) + x)  # residual add, then relu
        y = y * torch.sigmoid(self.gate(y.mean((2, 3), keepdim=True)))  # squeeze-excite gating
        y = torch.cat([self.pool(y), self.pool(self.branch(y))], 1)
        return self.fc(torch.flatten(self.avg(y), 1))  # flattened with a 2x2 map left: NCHW order


def _model() -> nn.Module:
    torch.manual_seed(0)
    m = _Net().eval()
    with torch.no_grad():  # batch norms that do something
        for bn in (m.stem[1], m.dw[1]):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    return m


def _data(n: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_float_file_matches_pytorch_at_any_batch(tmp_path):
    model = _model()
    rep = sk.export_onnx(model, tmp_path / "m.tflite", _data(), target="tflite")
    assert rep.target == "tflite" and rep.parity.ok and rep.parity.rel_l2 < 1e-5
    assert rep.lint.integer_ops == {} and rep.lint.float_ops["CONV_2D"] == 4
    assert rep.lint.float_ops["DEPTHWISE_CONV_2D"] == 1 and rep.lint.float_ops["FULLY_CONNECTED"] == 1
    runner = open_file(rep.path, "litert")
    for n in (1, 5):  # the batch axis stays free
        x = _data(n, seed=n)
        with torch.no_grad():
            want = model(x).numpy()
        got = runner.run({"input": x.numpy()})[0]
        assert got.shape == want.shape and float(np.abs(got - want).max()) < 1e-4


def test_int8_file_is_full_integer_at_parity(tmp_path):
    model = _model()
    q = sk.quantize(model, "int8", calib_data=[_data(16, seed=s) for s in range(4)])
    f32 = sk.export_onnx(model, tmp_path / "f.tflite", _data(), target="tflite")
    rep = sk.export_onnx(q, tmp_path / "q.tflite", _data(), target="tflite")
    assert rep.parity.ok and rep.parity.file_vs_float is not None  # judged against the float model, as ONNX files are
    kernels = integer_kernels(rep.path, "litert")
    # int8 wherever the ONNX file quantizes a layer's output; the squeeze-excite gate (read by a float Sigmoid)
    # and the classifier have float outputs there, so they run in float, and the report names them
    assert kernels["CONV_2D"] == {"int8": 3, "float32": 1} and kernels["DEPTHWISE_CONV_2D"] == {"int8": 1}
    assert kernels["FULLY_CONNECTED"] == {"float32": 1}
    assert [i.split()[0] for i in rep.lint.issues] == ["/gate/Conv", "/fc/Gemm"]
    from ai_edge_litert import schema_py_generated as schema

    graph = schema.ModelT.InitFromPackedBuf(open(rep.path, "rb").read(), 0).subgraphs[0]
    stored = [(t.type, len(t.shape)) for t in graph.tensors if t.buffer > 0]
    # every weight is stored as int8, those two layers' too (dequantized once, at load); float constants are biases
    assert {n for kind, n in stored if kind == schema.TensorType.FLOAT32} == {1}
    assert sum(kind == schema.TensorType.INT8 and n > 1 for kind, n in stored) == 6
    assert os.path.getsize(rep.path) < os.path.getsize(f32.path)
    onnx_rep = sk.export_onnx(q, tmp_path / "q.onnx", _data())
    x = _data(32, seed=7)
    with torch.no_grad():
        want = q(x).numpy()
    got = open_file(rep.path, "litert").run({"input": x.numpy()})[0]
    ort = open_file(onnx_rep.path).run({"input": x.numpy()})[0]
    rel = float(np.linalg.norm(got - want) / np.linalg.norm(want))
    assert rel < 2 * float(np.linalg.norm(ort - want) / np.linalg.norm(want)) + 5e-3  # as close as ONNX Runtime's file


def test_a_file_computing_another_function_is_refused(tmp_path, monkeypatch):
    from slimkit.export import ParityError
    from slimkit.export.tflite_graph import GraphState

    model = _model()
    q = sk.quantize(model, "int8", calib_data=[_data(16, seed=s) for s in range(2)])
    real = GraphState.int8_weight

    def flipped(self, node):  # a converter that gets the filter layout wrong
        w, s = real(self, node)
        return np.ascontiguousarray(w[..., ::-1, :]), s

    monkeypatch.setattr(GraphState, "int8_weight", flipped)
    with pytest.raises(ParityError, match="LiteRT disagrees"):
        sk.export_onnx(q, tmp_path / "q.tflite", _data(), target="tflite")
    assert not any(p.name.endswith(".tflite") or p.name.startswith(".") for p in tmp_path.iterdir())


def test_what_is_not_converted_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"writes a \.tflite file"):
        sk.export_onnx(_model(), tmp_path / "m.onnx", _data(), target="tflite")
    with pytest.raises(ValueError, match="static_shapes"):
        sk.export_onnx(_model(), tmp_path / "m.tflite", _data(), target="tflite", static_shapes=False)
    grouped = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.ReLU()).eval()
    with pytest.raises(ValueError, match="grouped convolution"):
        sk.export_onnx(grouped, tmp_path / "g.tflite", torch.randn(2, 4, 8, 8), target="tflite")
    norm = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LayerNorm(4 * 6 * 6)).eval()
    with pytest.raises(ValueError, match="LayerNormalization"):
        sk.export_onnx(norm, tmp_path / "n.tflite", torch.randn(2, 3, 8, 8), target="tflite")
    tokens = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 2)).eval()
    with pytest.raises(ValueError, match="transformers are not converted"):
        sk.export_onnx(tokens, tmp_path / "t.tflite", torch.randint(0, 10, (2, 3)), target="tflite")
    assert not list(tmp_path.iterdir())  # nothing written, not even scratch folders
    with pytest.raises(ValueError, match="no such TFLite file"):
        open_file(str(tmp_path / "missing.tflite"), "litert")
    sk.export_onnx(_model(), tmp_path / "m.onnx", _data())
    with pytest.raises(ValueError, match="LiteRT runs .tflite files"):
        open_file(str(tmp_path / "m.onnx"), "litert")
    rep = sk.export_onnx(_model(), tmp_path / "m.tflite", _data(), target="tflite")
    with pytest.raises(ValueError, match="cannot run this one"):
        open_file(rep.path, "openvino" if available("openvino") else "onnxruntime")
    with pytest.raises(ValueError, match="has shape"):
        open_file(rep.path, "litert").run({"input": np.zeros((2, 3, 8, 8), np.float32)})


def test_bench_times_tflite_files_in_litert(tmp_path, capsys):
    from slimkit.cli import main

    model = _model()
    q = sk.quantize(model, "int8", calib_data=[_data(16, seed=s) for s in range(2)])
    a = sk.export_onnx(model, tmp_path / "f.tflite", _data(), target="tflite").path
    b = sk.export_onnx(q, tmp_path / "q.tflite", _data(), target="tflite").path
    data = tmp_path / "x.npy"
    np.save(data, _data(16, seed=3).numpy())
    assert main(["bench", a, b, "--runtime", "litert", "--data", str(data), "--runs", "5"]) == 0
    out = capsys.readouterr().out
    assert "q.tflite" in out and "run in litert" in out
    onnx_file = sk.export_onnx(model, tmp_path / "f.onnx", _data()).path
    assert main(["bench", onnx_file, b, "--data", str(data)]) == 2
    assert "--runtime litert" in capsys.readouterr().err


def test_a_hugging_face_cnn_converts(tmp_path):
    """Hugging Face's ResNet: a max pool padded unlike TFLite's SAME (a PADV2 with the lowest value), and in
    the INT8 file the BatchNormalizations the exporter leaves after quantized convs, folded into them."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], num_labels=10)
    model = transformers.ResNetForImageClassification(cfg).eval()
    x = torch.randn(4, 3, 32, 32)
    f32 = sk.export_onnx(model, tmp_path / "f.tflite", x, target="tflite")
    assert f32.parity.ok and f32.parity.rel_l2 < 1e-5
    q = sk.quantize(model, "int8", calib_data=[torch.randn(8, 3, 32, 32) for _ in range(2)])
    import onnx

    sk.export_onnx(q, tmp_path / "q.onnx", x)
    assert "BatchNormalization" in {n.op_type for n in onnx.load(str(tmp_path / "q.onnx")).graph.node}
    rep = sk.export_onnx(q, tmp_path / "q.tflite", x, target="tflite")
    assert rep.parity.ok and rep.lint.integer_ops["CONV_2D"] >= 4
