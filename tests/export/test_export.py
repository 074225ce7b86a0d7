import os

import onnx
import pytest
import torch
from torch import nn

import slimkit as sk
from slimkit.data import batches
from slimkit.export import measure_latency
from slimkit.export.onnx import ParityError
from slimkit.export.runtime import session


@pytest.fixture(scope="module")
def q_resnet(trained_resnet, digits):
    return sk.quantize(trained_resnet, "int8", calib_data=batches(digits.train_x[:128], None, 64))


def test_int8_export_is_integer_and_matches_pytorch(q_resnet, digits, tmp_path):
    r = sk.export_onnx(q_resnet, tmp_path / "q.onnx", digits.test_x[:32])
    assert r.parity.ok and r.parity.top1_agreement == 1.0
    assert r.lint.ok, r.lint.issues
    assert r.lint.integer_ops.get("QLinearConv") == 20
    assert r.lint.integer_ops.get("QLinearAdd") == 8
    assert r.lint.float_ops == {}
    # weights are stored as int8, biases as int32: the file really is small
    m = onnx.load(r.path)
    dtypes = {i.data_type for i in m.graph.initializer if len(i.dims) == 4}
    assert dtypes == {onnx.TensorProto.INT8}


def test_dynamic_batch_axis(q_resnet, digits, tmp_path):
    r = sk.export_onnx(q_resnet, tmp_path / "q.onnx", digits.test_x[:4])
    sess = session(r.path)
    for n in (1, 7):
        out = sess.run(None, {"input": digits.test_x[:n].numpy()})[0]
        assert out.shape == (n, 10)


def test_float_model_exports_as_plain_fp32(trained_mlp, digits, tmp_path):
    r = sk.export_onnx(trained_mlp, tmp_path / "f.onnx", digits.test_x[:8])
    ops = {n.op_type for n in onnx.load(r.path).graph.node}
    assert "QuantizeLinear" not in ops and "DequantizeLinear" not in ops
    assert r.parity.rel_l2 < 1e-5


def test_dynamic_int8_export_uses_integer_matmuls(trained_mlp, digits, tmp_path):
    q = sk.quantize(trained_mlp, "int8-dynamic")
    r = sk.export_onnx(q, tmp_path / "d.onnx", digits.test_x[:8])
    assert r.parity.ok
    assert r.lint.integer_ops.get("DynamicQuantizeMatMul") == 3


def test_tuple_inputs_and_outputs(tmp_path):
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 4), nn.Linear(5, 4)

        def forward(self, x, y):
            return self.a(x) + self.b(y), self.a(x)

    m = Two().eval()
    ex = (torch.randn(2, 3), torch.randn(2, 5))
    q = sk.quantize(m, "int8", calib_data=[ex])
    r = sk.export_onnx(q, tmp_path / "two.onnx", ex)
    assert r.inputs == ["input_0", "input_1"] and len(r.outputs) == 2 and r.parity.ok


def test_failed_parity_leaves_no_file(trained_mlp, digits, tmp_path):
    q = sk.quantize(trained_mlp, "int8", calib_data=[digits.train_x[:64]])
    with pytest.raises(sk.ParityError):
        sk.export_onnx(q, tmp_path / "q.onnx", digits.test_x[:8], tolerance=0.0)
    assert os.listdir(tmp_path) == []


def test_export_refuses_a_model_still_calibrating(tmp_path):
    from slimkit.quant.calibrators import make_observer
    from slimkit.quant.modules import ActQuant

    m = nn.Sequential(ActQuant(observer=make_observer("minmax")), nn.Linear(2, 2))
    with pytest.raises(ValueError, match="still calibrating"):
        sk.export_onnx(m, tmp_path / "m.onnx", torch.randn(1, 2))


def test_latency_measurement(trained_mlp, digits, tmp_path):
    r = sk.export_onnx(trained_mlp, tmp_path / "f.onnx", digits.test_x[:1])
    lat = measure_latency(r.path, digits.test_x[:1], runs=5, warmup=2)
    assert 0 < lat["min_ms"] <= lat["median_ms"] and lat["runs"] == 5 and lat["threads"] == 2


def test_lint_flags_float_ops_between_qdq(tmp_path):
    from slimkit.export import lint

    # a model quantized except its last layer: the lint names the Gemm left in float
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    q = sk.quantize(m, {"exclude": ["2"]}, calib_data=[torch.randn(16, 4)])
    r = sk.export_onnx(q, tmp_path / "q.onnx", torch.randn(3, 4))
    rep = lint(r.path)
    assert not rep.ok and any("float" in i for i in rep.issues)


def test_default_parity_tolerance_follows_how_the_model_is_quantized(trained_mlp, digits):
    from slimkit.export.onnx import default_tolerance

    calib = [digits.train_x[:64]]
    assert default_tolerance(trained_mlp) == 1e-4
    q = sk.quantize(trained_mlp, "int8", calib_data=calib)  # measured when quantizing: 2.5x its error
    assert default_tolerance(q) == pytest.approx(2.5 * q.slimkit_plan.fidelity_["relative_l2"] + 1e-3)
    assert default_tolerance(sk.quantize(trained_mlp, "int4-weight")) == 2e-2
    assert default_tolerance(sk.quantize(trained_mlp, "int8-dynamic")) == 0.15
    normed = nn.Sequential(nn.Linear(16, 16), nn.LayerNorm(16), nn.Linear(16, 4)).eval()
    qn = sk.quantize(normed, "int8", calib_data=[torch.randn(16, 16)])
    qn.slimkit_plan.fidelity_ = {}  # nothing measured: the ladder
    assert default_tolerance(qn) == 0.15
    assert default_tolerance(sk.quantize(normed, sk.quant.PRESETS["int4-weight"].with_weights(group_size=16))) == 2e-2


class _Tokens(nn.Module):
    """A toy encoder called like a Hugging Face model: token ids and a mask, mean-pooled."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.proj = nn.Embedding(50, 16), nn.Linear(16, 8)

    def forward(self, input_ids, attention_mask):
        h = self.proj(self.emb(input_ids))
        m = attention_mask.unsqueeze(-1).float()
        return (h * m).sum(1) / m.sum(1).clamp(min=1)


def test_token_batches_export_with_a_dynamic_sequence_axis(tmp_path):
    from slimkit.export.runtime import feeds

    torch.manual_seed(0)
    model = _Tokens().eval()
    ex = {"input_ids": torch.randint(0, 50, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    for m in (model, sk.quantize(model, sk.quant.PRESETS["int4-weight"].with_weights(group_size=16))):
        report = sk.export_onnx(m, tmp_path / "tok.onnx", ex)
        assert report.inputs == ["input_ids", "attention_mask"]
        s = session(report.path)
        for length in (3, 21):  # shorter and longer than the example
            b = {"input_ids": torch.randint(0, 50, (5, length)), "attention_mask": torch.ones(5, length, dtype=torch.long)}
            with torch.no_grad():
                want = m(**b).numpy()
            got = s.run(None, feeds(s, b))[0]
            assert got.shape == (5, 8)
            assert float(abs(got - want).max()) < 1e-4


def test_static_int8_stores_embedding_tables_as_int8(tmp_path):
    from slimkit.quant.weight_only import QuantEmbedding

    torch.manual_seed(0)
    model = _Tokens().eval()
    ex = {"input_ids": torch.randint(0, 50, (4, 8)), "attention_mask": torch.ones(4, 8, dtype=torch.long)}
    q = sk.quantize(model, "int8", calib_data=[ex])
    assert isinstance(q.get_submodule("emb"), QuantEmbedding)
    r = sk.export_onnx(q, tmp_path / "tok8.onnx", ex)
    tables = [i for i in onnx.load(r.path).graph.initializer if list(i.dims) == [50, 16]]
    assert r.parity.ok and [t.data_type for t in tables] == [onnx.TensorProto.INT8]


class _Attends(nn.Module):
    """Stands in for a Hugging Face model: ``config._attn_implementation`` and
    ``set_attn_implementation``, with a forward that records which one it ran under."""

    def __init__(self):
        super().__init__()
        self.config = type("Config", (), {"_attn_implementation": "sdpa"})()
        self.lin = nn.Linear(4, 2)
        self.ran_with: list[str] = []

    def set_attn_implementation(self, name):
        self.config._attn_implementation = name

    def forward(self, x):
        self.ran_with.append(self.config._attn_implementation)
        return self.lin(x)


def test_hf_attention_is_traced_eager_and_restored(tmp_path):
    model = _Attends().eval()
    sk.export_onnx(model, tmp_path / "a.onnx", torch.randn(2, 4))
    assert "eager" in model.ran_with
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="should end in .onnx"):  # restored on the way out of a failure too
        sk.export_onnx(model, tmp_path / "a.txt", torch.randn(2, 4))
    model.ran_with.clear()
    with pytest.raises(ParityError):  # and out of a failed parity check
        sk.export_onnx(model, tmp_path / "b.onnx", torch.randn(2, 4), tolerance=-1.0)
    assert "eager" in model.ran_with and model.config._attn_implementation == "sdpa"


def test_bert_exports_without_the_sdpa_mask_guards(tmp_path):
    transformers = pytest.importorskip("transformers")
    from slimkit.export.runtime import feeds

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, attn_implementation="sdpa")
    bert = transformers.BertModel(cfg).eval()
    ex = {"input_ids": torch.randint(0, 100, (2, 9)), "attention_mask": torch.tensor([[1] * 9, [1] * 5 + [0] * 4])}
    r = sk.export_onnx(bert, tmp_path / "bert.onnx", ex)
    ops = {n.op_type for n in onnx.load(r.path).graph.node}
    assert "IsNaN" not in ops and "Softmax" in ops
    assert bert.config._attn_implementation == "sdpa"
    s = session(r.path)
    b = {"input_ids": torch.randint(0, 100, (3, 17)), "attention_mask": torch.ones(3, 17, dtype=torch.long)}
    b["attention_mask"][1, 10:] = 0
    with torch.no_grad():
        want = bert(**b).last_hidden_state.numpy()  # the sdpa path in PyTorch
    got = s.run(None, feeds(s, b))[0]
    assert float(abs(got - want)[b["attention_mask"].bool().numpy()].max()) < 1e-4
    calib = [{"input_ids": torch.randint(0, 100, (4, 9)), "attention_mask": torch.ones(4, 9, dtype=torch.long)}
             for _ in range(2)]
    for preset in ("int8", "int8-dynamic"):  # the presets export a Hugging Face model with default tolerances
        q = sk.quantize(bert, preset, calib_data=calib)
        assert sk.export_onnx(q, tmp_path / f"{preset}.onnx", ex).parity.ok
