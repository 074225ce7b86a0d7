"""Early exit in ONNX: one file, each input leaving at the first sure exit."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import Tensor, nn

import slimkit as sk
from slimkit.core.graph import split_after
from slimkit.export import EarlyExitSession, export_early_exit
from slimkit.prune import EarlyExit
from slimkit.zoo import resnet18


def _confidence(z: Tensor) -> Tensor:
    return z.softmax(-1).amax(-1)


@pytest.fixture(scope="module")
def resnet_exits() -> tuple[EarlyExit, Tensor]:
    torch.manual_seed(0)
    net = resnet18(width=8, in_channels=1).eval()
    # one exit at a block's end (one tensor crosses the cut), one inside a block (the block's input
    # crosses too, for the shortcut)
    ee = EarlyExit(net, ["layers.0", "layers.1.relu1"], example_inputs=torch.randn(2, 1, 32, 32))
    with torch.no_grad():
        for p in ee.heads.parameters():  # confident heads, so that some inputs leave early
            p.mul_(20.0)
    return ee.eval(), torch.randn(48, 1, 32, 32)


def test_split_stages_chain_to_the_model(resnet_exits):
    ee, x = resnet_exits
    stages = split_after(ee.model, ee.exits)
    assert len(stages) == 3
    with torch.no_grad():
        *carry0, f0 = stages[0](x)
        *carry1, f1 = stages[1](*carry0)
        out = stages[2](*carry1)
        assert len(carry0) == 1 and len(carry1) == 2  # inside the block, the shortcut's input is carried too
        assert torch.allclose(out, ee.model(x), atol=1e-5)


def test_onnx_chain_takes_the_same_exits_as_pytorch(resnet_exits, tmp_path):
    ee, x = resnet_exits
    with torch.no_grad():
        all_logits = _all_exits(ee, x)
    # the threshold halfway between two middle confidences of exit 0 (none on it): about half leave there
    c = _confidence(all_logits[0]).sort().values
    threshold = float(c[len(c) // 2 - 1] + c[len(c) // 2]) / 2
    ee.threshold = threshold
    report = export_early_exit(ee, tmp_path / "ee.onnx", x)
    assert report.stages == 3 and report.exits_agree == 1.0 and report.rel_l2 < 1e-4 and report.inputs == ["input"]
    assert [p.name for p in tmp_path.iterdir()] == ["ee.onnx"]  # one file, no leftovers
    logits, took = EarlyExitSession(tmp_path / "ee.onnx")(x)
    with torch.no_grad():
        ref = ee(x)
    assert took.tolist() == ee.last_exit.tolist()
    assert set(took.tolist()) >= {0, 2} and 0.3 < float(np.mean(took == 0)) < 0.7
    assert np.allclose(logits, ref.numpy(), atol=1e-4)
    # an input that left at exit k got exit k's logits
    for k in range(2):
        rows = took == k
        assert np.allclose(logits[rows], all_logits[k][torch.from_numpy(rows)].numpy(), atol=1e-4)
    # threshold 1 (nobody is sure enough): the whole network for every input
    logits, took = EarlyExitSession(tmp_path / "ee.onnx", threshold=1.0)(x)
    assert (took == 2).all() and np.allclose(logits, ee.model(x).detach().numpy(), atol=1e-4)
    # threshold 0: every input at the first exit, and the later layers never run (a batch of one
    # input that is sure: the rest of the graph is skipped, whatever it holds)
    logits, took = EarlyExitSession(tmp_path / "ee.onnx", threshold=0.0)(x)
    assert (took == 0).all() and np.allclose(logits, all_logits[0].numpy(), atol=1e-4)
    ee.threshold = None


def _ops(graph: onnx.GraphProto) -> list[str]:
    """Op types of ``graph`` and of the graphs nested in its ``If`` nodes."""
    ops = []
    for node in graph.node:
        ops.append(node.op_type)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                ops += _ops(attr.g)
    return ops


@pytest.mark.parametrize("preset, kernel", [("int8", "DequantizeLinear"), ("int8-dynamic", "ConvInteger")])
def test_quantized_stages_export_with_integer_weights(resnet_exits, tmp_path, preset, kernel):
    """Quantize an early-exit model, then export it: each stage keeps its quantized layers as
    integer kernels (fx does not trace into them and export them as float arithmetic), so the file
    shrinks like the plain network's, and it takes the exits the quantized PyTorch model takes."""
    ee, x = resnet_exits
    ee.threshold = 0.9
    try:
        float_size = export_early_exit(ee, tmp_path / "float.onnx", x).size_bytes
        q = sk.quantize(ee, preset, calib_data=[x[i:i + 16] for i in range(0, 48, 16)])
        report = export_early_exit(q, tmp_path / "q.onnx", x)
    finally:
        ee.threshold = None
    assert report.exits_agree >= 0.95 and report.stages == 3
    assert report.size_bytes < 0.4 * float_size
    ops = _ops(onnx.load(str(tmp_path / "q.onnx")).graph)
    assert ops.count("If") == 2 and ops.count(kernel) >= 20, sorted(set(ops))
    if kernel == "ConvInteger":
        assert "Conv" not in ops  # every convolution integer


def _all_exits(ee: EarlyExit, x: Tensor) -> list[Tensor]:
    saved = ee.threshold
    ee.threshold = None
    try:
        return list(ee(x))
    finally:
        ee.threshold = saved


class _Masked(nn.Module):
    """Token states and a mask used after the cut: the mask crosses it."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.block1 = nn.Linear(16, 16)
        self.block2 = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        m = attention_mask.unsqueeze(-1).float()
        h = torch.relu(self.block1(self.embed(input_ids))) * m
        h = torch.relu(self.block2(h)) * m
        return self.head(h.sum(1) / m.sum(1))


def test_dict_inputs_and_a_mask_that_crosses_the_cut(tmp_path):
    torch.manual_seed(0)
    net = _Masked().eval()
    batch = {"input_ids": torch.randint(0, 50, (12, 7)), "attention_mask": torch.ones(12, 7, dtype=torch.long)}
    batch["attention_mask"][:, 5:] = 0
    ee = EarlyExit(net, ["block1"], example_inputs=batch, threshold=0.4).eval()
    report = export_early_exit(ee, tmp_path / "ee.onnx", batch)
    assert report.inputs == ["input_ids", "attention_mask"]
    logits, took = EarlyExitSession(tmp_path / "ee.onnx")(batch)
    with torch.no_grad():
        ref = ee(**batch)
    assert took.tolist() == ee.last_exit.tolist()
    assert np.allclose(logits, ref.numpy(), atol=1e-4)


class _GlobalScale(nn.Module):
    """A value with no batch axis (a statistic over the whole batch) used after the exit."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        scale = x.abs().amax()
        h = torch.relu(self.a(x))
        return self.c(torch.relu(self.b(h)) / scale)


def test_a_value_without_batch_axis_across_the_cut_is_rejected(tmp_path):
    ee = EarlyExit(_GlobalScale(), ["a"], example_inputs=torch.randn(3, 4), threshold=0.9).eval()
    with pytest.raises(ValueError, match="after exit 'a' .* no batch axis"):
        export_early_exit(ee, tmp_path / "ee.onnx", torch.randn(5, 4))
    assert list(tmp_path.iterdir()) == []  # nothing half-written


class _Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.c = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.c(self.a(torch.relu(self.a(x))))


def test_a_layer_called_twice_cannot_be_a_cut(tmp_path):
    ee = EarlyExit(_Twice(), ["a"], example_inputs=torch.randn(3, 4), threshold=0.9).eval()
    with pytest.raises(ValueError, match="layer 'a' is called 2 times"):
        export_early_exit(ee, tmp_path / "ee.onnx", torch.randn(5, 4))


def test_no_threshold_wrong_files_and_bad_thresholds_are_named(resnet_exits, tmp_path):
    ee, x = resnet_exits
    with pytest.raises(ValueError, match="needs a confidence threshold"):
        export_early_exit(ee, tmp_path / "ee.onnx", x[:4])
    with pytest.raises(ValueError, match="should end in .onnx"):
        export_early_exit(ee, tmp_path / "ee", x[:4], threshold=0.9)
    plain = tmp_path / "plain.onnx"
    torch.onnx.export(nn.Linear(4, 3), (torch.randn(2, 4),), str(plain), dynamo=False)
    with pytest.raises(ValueError, match="is not an early-exit model: its outputs are"):
        EarlyExitSession(plain)
    with pytest.raises(ValueError, match="example_inputs: batch 0 holds NaN or inf"):
        export_early_exit(ee, tmp_path / "ee.onnx", torch.full_like(x[:4], float("nan")), threshold=0.9)
    assert not (tmp_path / "ee.onnx").exists()
    with pytest.raises(FileNotFoundError, match="no early-exit model at .*missing.onnx"):
        EarlyExitSession(tmp_path / "missing.onnx")
    export_early_exit(ee, tmp_path / "ee.onnx", x[:4], threshold=0.9)
    with pytest.raises(ValueError, match="threshold must be in"):
        EarlyExitSession(tmp_path / "ee.onnx", threshold=1.5)
