"""The exported graph's rewrites: zero pads folded into the convs they feed."""

import onnx
import torch
from torch import nn

import slimkit as sk


class _SamePadded(nn.Module):
    """TensorFlow's SAME padding for a stride-2 conv: one row and column more at the bottom right."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3)
        self.act = nn.ReLU6()
        self.pad = nn.ZeroPad2d((0, 1, 0, 1))
        self.dw = nn.Conv2d(8, 8, 3, stride=2, groups=8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.dw(self.pad(self.act(self.stem(x))))), 1))


def test_a_zero_pad_between_quantized_convs_goes_into_the_conv(tmp_path):
    torch.manual_seed(0)
    model = _SamePadded().eval()
    x = torch.rand(16, 3, 12, 12)
    q = sk.quantize(model, "int8", calib_data=[x])
    rep = sk.export_onnx(q, tmp_path / "q.onnx", x[:2])
    assert rep.parity.ok and rep.lint.ok and not rep.lint.float_ops  # every conv an integer conv
    graph = onnx.load(str(tmp_path / "q.onnx")).graph
    assert not [n for n in graph.node if n.op_type == "Pad"]
    dw = next(n for n in graph.node if n.op_type == "Conv" and any(a.name == "group" and a.i == 8 for a in n.attribute))
    assert next(list(a.ints) for a in dw.attribute if a.name == "pads") == [0, 0, 1, 1]
    float_file = sk.export_onnx(model, tmp_path / "f.onnx", x[:2])  # a float model keeps its pad
    assert [n for n in onnx.load(float_file.path).graph.node if n.op_type == "Pad"]


def test_quantized_file_holds_no_zero_bias_zero_points_identities_or_shapes(tmp_path):
    """slim_quantized: the biases' dequantizers lose their all-zero int32 zero-points (ONNX's default),
    the Identity nodes of shared quantizer parameters go, and the inferred shapes are not stored;
    every conv still runs as an integer conv and the file passes parity."""
    torch.manual_seed(0)
    model = _SamePadded().eval()
    x = torch.rand(16, 3, 12, 12)
    rep = sk.export_onnx(sk.quantize(model, "int8", calib_data=[x]), tmp_path / "q.onnx", x[:2])
    assert rep.parity.ok and rep.lint.ok and not rep.lint.float_ops
    graph = onnx.load(str(tmp_path / "q.onnx")).graph
    dq = [n for n in graph.node if n.op_type == "DequantizeLinear"]
    inits = {t.name: t for t in graph.initializer}
    biases = [n for n in dq if n.input[0] in inits and inits[n.input[0]].data_type == onnx.TensorProto.INT32]
    assert biases and all(len(n.input) == 2 for n in biases)
    assert not [n for n in graph.node if n.op_type == "Identity"] and not graph.value_info
    assert all(len(n.input) == 3 for n in dq if n not in biases)  # activations and weights keep theirs
