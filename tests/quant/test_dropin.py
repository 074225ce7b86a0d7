"""Quantized layers stay drop-ins for the layers they replace, and a verb says what it left alone."""

import numpy as np
import pytest
import torch
from torch import nn

import slimkit as sk
from slimkit.core import layers as layer_kinds
from slimkit.core.fidelity import FidelityError
from slimkit.export.runtime import check_parity
from slimkit.quant.modules import QuantConv, QuantLinear
from slimkit.quant.weight_only import QuantEmbedding


class _Encoder(nn.Module):
    """A model of torch's own transformer layers: MultiheadAttention reads ``out_proj.weight``."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 32)
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 5)

    def forward(self, ids):
        return self.head(self.encoder(self.embed(ids)).mean(1))


class _Scaled(nn.Embedding):
    """Gemma's way: a subclass whose own forward multiplies by a factor held in a buffer."""

    def __init__(self, n: int, d: int) -> None:
        super().__init__(n, d)
        self.register_buffer("embed_scale", torch.tensor(d**0.5), persistent=False)

    def forward(self, ids):
        return super().forward(ids) * self.embed_scale


class _Positions(nn.Embedding):
    """OPT's way: a forward with arguments of its own, calling the table with shifted ids."""

    def forward(self, mask, past_length=0, position_ids=None):
        if position_ids is None:
            position_ids = torch.cumsum(mask, 1) - 1
        return super().forward(position_ids + 2)


class _Decoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tokens, self.positions = _Scaled(40, 32), _Positions(20, 32)
        self.mlp = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 40))

    def forward(self, input_ids, attention_mask):
        return self.mlp(self.tokens(input_ids) + self.positions(attention_mask, position_ids=None))


@pytest.mark.parametrize("preset", ["int8-dynamic", "int8", "int4-weight"])
def test_torch_transformer_encoder_runs_and_exports(preset, tmp_path):
    torch.manual_seed(0)
    model = _Encoder().eval()
    ids = torch.randint(0, 50, (4, 12))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q = sk.quantize(model, {"int4-weight": {"weight_bits": 4, "group_size": 32, "activations": "none"}}.get(
        preset, preset), calib_data=[ids, ids])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    attn = q.encoder.layers[0].self_attn
    assert isinstance(attn.out_proj, nn.Linear) and attn.out_proj.weight.shape == (32, 32)
    assert attn.out_proj.weight.dtype == torch.float32
    ref = model(ids)
    assert float((q(ids) - ref).norm() / ref.norm()) < 0.1
    assert q.slimkit_plan.fidelity_["cosine"] > 0.99
    # MultiheadAttention's packed in_proj_weight, which it holds itself: int8 in the 8-bit presets,
    # 4-bit groups in the group-wise one
    held = [n for n in q.slimkit_plan.quantized_layers if n.endswith("in_proj_weight")]
    assert len(held) == 2 and not any("in_proj" in n for n in q.slimkit_plan.coverage_["left_alone"])
    assert "in_proj_weight" not in dict(attn.named_parameters()) and attn.in_proj_weight.shape == (96, 32)
    assert attn.in_proj_weight_q.dtype == (torch.uint8 if preset == "int4-weight" else torch.int8)
    report = sk.export_onnx(q, tmp_path / "enc.onnx", ids)
    assert report.parity.ok and report.parity.file_vs_float is not None


def test_layer_subclasses_keep_their_own_forward_and_attributes(tmp_path):
    torch.manual_seed(0)
    model = _Decoder().eval()
    batch = {"input_ids": torch.randint(0, 40, (2, 6)), "attention_mask": torch.ones(2, 6, dtype=torch.long)}
    q = sk.quantize(model, "int8-dynamic", calib_data=[batch])
    assert {"tokens", "positions"} <= set(q.slimkit_plan.quantized_layers)
    tokens = q.tokens
    assert isinstance(tokens, _Scaled) and isinstance(tokens, QuantEmbedding)
    assert float(tokens.embed_scale) == pytest.approx(32**0.5) and tokens.padding_idx is None
    assert "embed_scale" not in tokens.state_dict()  # still not persistent
    assert isinstance(q.positions, _Positions)
    ref = model(**batch)
    assert float((q(**batch) - ref).norm() / ref.norm()) < 0.05  # the sqrt(d) factor is kept
    assert sk.export_onnx(q, tmp_path / "dec.onnx", batch).parity.ok
    loaded = sk.load(_save(q, tmp_path), _Decoder().eval())
    assert torch.allclose(loaded(**batch), q(**batch), atol=1e-6)


def _save(model, tmp_path):
    sk.save(model, tmp_path / "saved")
    return tmp_path / "saved"


def test_conv_attributes_survive():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, dilation=1, padding=1), nn.ReLU()).eval()
    for preset in ("int8", "int8-dynamic"):
        q = sk.quantize(model, preset, calib_data=[torch.rand(2, 3, 16, 16)])
        conv = q.get_submodule("0")
        assert isinstance(conv, nn.Conv2d) and isinstance(conv, QuantConv)
        assert conv.stride == (2, 2) and conv.kernel_size == (3, 3) and conv.dilation == (1, 1)
        assert conv.weight.shape == (8, 3, 3, 3) and conv.weight.dtype == torch.float32
        assert conv.in_channels == 3 and conv.out_channels == 8
        with pytest.raises(AttributeError, match="integers"):
            conv.weight = torch.zeros(8, 3, 3, 3)


class _RowMajor(nn.Module):
    """A linear layer stored ``[in, out]`` (Hugging Face's Conv1D is one)."""

    def __init__(self, n_in: int, n_out: int, factor: float = 1.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out) / n_in**0.5)
        self.bias = nn.Parameter(torch.zeros(n_out))
        self.nf, self.factor = n_out, factor

    def forward(self, x):
        return (x @ self.weight + self.bias) * self.factor


@pytest.fixture
def row_major(monkeypatch):
    monkeypatch.setattr(layer_kinds, "_LINEAR_LIKE", [*layer_kinds._LINEAR_LIKE])
    sk_pred = lambda m: isinstance(m, _RowMajor)  # noqa: E731
    layer_kinds.register_linear_like(sk_pred)
    return sk_pred


def test_a_registered_linear_like_layer_is_quantized_in_its_own_layout(row_major, tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(_RowMajor(16, 32), nn.ReLU(), _RowMajor(32, 4)).eval()
    x = torch.randn(8, 16)
    for preset in ("int8-dynamic", "int8"):
        q = sk.quantize(model, preset, calib_data=[x])
        assert q.slimkit_plan.quantized_layers == ["0", "2"] and q.slimkit_plan.coverage_["fraction"] == 1.0
        layer = q.get_submodule("0")
        assert isinstance(layer, _RowMajor) and isinstance(layer, QuantLinear) and layer.nf == 32
        assert layer.weight.shape == (16, 32)  # its own layout
        assert (layer.weight - model[0].weight).abs().max() < 0.02
        assert sk.export_onnx(q, tmp_path / f"{preset}.onnx", x).parity.ok
    assert type(model[0]) is _RowMajor and model[0].weight.shape == (16, 32)  # the caller's is untouched


def test_a_layer_that_computes_something_else_is_an_error_naming_it(row_major):
    torch.manual_seed(0)
    model = nn.Sequential(_RowMajor(16, 16), nn.ReLU(), _RowMajor(16, 16, factor=-3.0), nn.ReLU(),
                          _RowMajor(16, 4)).eval()  # layer 2 is not the plain x @ W + b it claims to be
    with pytest.raises(FidelityError, match=r"first layer that departs is '2'"):
        sk.quantize(model, "int8-dynamic", calib_data=[torch.randn(8, 16)])


class _Experts(nn.Module):
    """A mixture-of-experts bank held as one 3-D parameter (transformers 5's layout)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(16, 4)
        self.experts = nn.Parameter(torch.randn(4, 16, 16) * 0.1)

    def forward(self, x):
        w = self.gate(x).softmax(-1)
        return torch.einsum("be,eio,bi->bo", w, self.experts, x)


def test_weights_no_layer_holds_are_quantized_at_8_bits_or_reported(caplog, tmp_path):
    torch.manual_seed(0)
    model = _Experts().eval()
    x = torch.randn(4, 16)
    q = sk.quantize(model, "int8-dynamic")  # the bank becomes int8, read through a property
    assert isinstance(q, _Experts) and q.slimkit_plan.coverage_["fraction"] == 1.0
    assert q.experts_q.dtype == torch.int8 and q.experts.shape == (4, 16, 16)
    assert float((q(x) - model(x)).norm() / model(x).norm()) < 0.02
    assert sk.export_onnx(q, tmp_path / "bank.onnx", x).parity.ok
    loaded = sk.load(_save(q, tmp_path), _Experts().eval())
    assert torch.allclose(loaded(x), q(x))
    wide = nn.Sequential(nn.Linear(16, 32), _Experts()).eval()  # groups of 32 fit the Linear, not the bank
    with caplog.at_level("WARNING"):
        q4 = sk.quantize(wide, [{"weights": {"bits": 4, "group_size": 16}}, {"activations": {"mode": "none"}}])
    assert q4.slimkit_plan.coverage_["fraction"] == 1.0 and "quantized only" not in caplog.text
    with caplog.at_level("WARNING"):  # a group size that does not divide the bank's rows: left alone, and said so
        q4 = sk.quantize(nn.Sequential(nn.Linear(32, 16), _Experts()).eval(),
                         [{"weights": {"bits": 4, "group_size": 32}}, {"activations": {"mode": "none"}}])
    cov = q4.slimkit_plan.coverage_
    assert cov["fraction"] == pytest.approx(512 / (512 + 64 + 1024))
    assert "group_size 32 does not divide the last axis of _Experts.experts (16 values)" in cov["left_alone"]["1.experts"]
    assert "quantized only 32% of the weights" in caplog.text
    assert "| 1.experts |" in q4.slimkit_plan.summary()


def test_weights_no_layer_holds_take_4_bit_groups(tmp_path):
    """The group-wise presets give a bank what they give a Linear layer: 4-bit groups with a scale and
    a zero-point each, two values to a byte; the exported file holds the bytes, not a float copy."""
    import onnx
    from onnx import numpy_helper

    torch.manual_seed(0)
    model = _Experts().eval()
    model.experts.data = torch.randn(4, 64, 64) * 0.1
    model.gate = nn.Linear(64, 4)
    x = torch.randn(8, 64)
    q = sk.quantize(model, [{"weights": {"bits": 4, "group_size": 32, "symmetric": False}}, {"activations": {"mode": "none"}},
                            "gptq"], calib_data=[x])
    assert isinstance(q, _Experts) and "experts" in q.slimkit_plan.quantized_layers
    assert q.experts_q.dtype == torch.uint8 and q.experts_q.shape == (4, 64, 32) and q.experts_scale.shape == (4, 64, 2)
    step = (q.experts_scale.abs().max() / 2 + 1e-6).item()
    err = (q.experts - model.experts).abs()
    assert float(err.max()) <= step and float(err.mean()) > 0  # on the 4-bit grid, not the float weights
    assert q.slimkit_plan.passes["held_weights"]["rounding"] == "nearest"  # GPTQ reconstructs layers, not banks
    assert "GPTQ" in q.slimkit_plan.passes["held_weights"]["why"]
    ref = model(x)
    assert 0 < float((q(x) - ref).norm() / ref.norm()) < 0.1
    report = sk.export_onnx(q, tmp_path / "bank4.onnx", x)
    assert report.parity.ok
    stored = [numpy_helper.to_array(i) for i in onnx.load(str(tmp_path / "bank4.onnx")).graph.initializer]
    assert sum(a.nbytes for a in stored if a.dtype == np.float32 and a.size >= 4 * 64 * 64 // 2) == 0
    assert any(a.dtype == np.uint8 and a.size == 4 * 64 * 32 for a in stored)
    loaded = sk.load(_save(q, tmp_path), _bank_like())
    assert torch.equal(loaded.experts, q.experts) and torch.allclose(loaded(x), q(x))


def _bank_like() -> nn.Module:
    """An untrained model of the 64-wide bank's shapes, for ``sk.load`` to fill."""
    fresh = _Experts().eval()
    fresh.experts = nn.Parameter(torch.zeros(4, 64, 64))
    fresh.gate = nn.Linear(64, 4)
    return fresh


def test_parity_follows_the_compression_noise(tmp_path, digits):
    """The file passes when it is about as close to the float model as the PyTorch result is; a file
    that computes something else (a flipped sign, a dropped layer) fails."""
    from slimkit.zoo import mobilenet_v2

    torch.manual_seed(0)
    model = mobilenet_v2(in_channels=1, small_input=True).eval()  # depthwise convolutions and ReLU6
    x = digits.test_x[:16]
    q = sk.quantize(model, "int8", calib_data=[digits.train_x[:64]])
    report = sk.export_onnx(q, tmp_path / "q.onnx", x)
    assert report.parity.ok and report.parity.model_vs_float > 0
    flipped = nn.Sequential(model, nn.Flatten(), _Neg())
    sk.export_onnx(flipped.eval(), tmp_path / "flipped.onnx", x)
    assert not check_parity(q, str(tmp_path / "flipped.onnx"), x, None, 1e-2, reference=model).ok
    dropped = nn.Sequential(*[m for i, m in enumerate(model.children()) if i != 1]) if len(
        list(model.children())) > 2 else None
    if dropped is not None:
        try:
            sk.export_onnx(dropped.eval(), tmp_path / "dropped.onnx", x)
        except Exception:  # a dropped layer that changes the shapes cannot even run
            dropped = None
    if dropped is not None:
        assert not check_parity(q, str(tmp_path / "dropped.onnx"), x, None, 1e-2, reference=model).ok


class _Neg(nn.Module):
    def forward(self, x):
        return -x


def test_a_batch_the_model_cannot_take_names_the_layer():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for preset in ("int8", "int8-dynamic", "int4-gptq"):
        with pytest.raises(ValueError, match=r"calib_data batch 0: .* failed in layer '0' \(Linear, input shape \[2, 5\]\)"):
            sk.quantize(model, preset, calib_data=[torch.randn(2, 5)])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_a_model_with_nothing_to_quantize_says_why():
    convs = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU()).eval()
    with pytest.raises(ValueError, match="no layer of Sequential could be quantized.*group-wise"):
        sk.quantize(convs, {"activations": "none", "weight_bits": 4, "group_size": 32})


class _TwoConvs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 4 * 4, 4)

    def forward(self, x):
        x = torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))
        return self.fc(torch.flatten(x, 1))


def test_the_departing_layer_is_named_past_folded_batchnorms():
    """Static INT8 folds each BatchNorm into the conv before it (the BatchNorm is gone from the
    result); the search for the layer that departs compares such a conv with its BatchNorm's
    output, so it names the layer that computes something else, not the first folded one."""
    import copy

    from slimkit.core.fidelity import first_departing_layer
    from slimkit.core.graph import fold_batchnorm

    torch.manual_seed(0)
    model = _TwoConvs().eval()
    with torch.no_grad():
        for bn in (model.bn1, model.bn2):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.2, 0.5)
    x = torch.randn(4, 3, 8, 8)
    folded = torch.fx.symbolic_trace(copy.deepcopy(model))
    assert len(fold_batchnorm(folded)) == 2
    assert first_departing_layer(model, folded, x, 0.05) is None  # folding alone computes the same
    with torch.no_grad():
        folded.conv2.weight.neg_()
        folded.conv2.bias.neg_()
    assert first_departing_layer(model, folded, x, 0.05) == "conv2"


def test_the_departing_layer_is_named_past_batchnorms_folded_to_identity(digits):
    """On a model that stays the user's class (no graph), a folded BatchNorm leaves an Identity under
    its name: the conv before it is still compared with the BatchNorm's output. On the digits
    MobileNetV2, per-tensor INT8 collapses at the first depthwise conv (one channel's BatchNorm scales
    by 338, another by 0.02), and that is the layer named, not the stem conv before it."""
    from slimkit.zoo import trained

    mnv2 = trained("mobilenet_v2")
    calib = [digits.train_x[:32], digits.train_x[32:64]]
    scheme = [sk.quant.Weights(per_channel=False), sk.quant.Activations()]
    with pytest.raises(FidelityError, match=r"first layer that departs is 'features\.1\.block\.0\.0'"):
        sk.quantize(mnv2, scheme, calib_data=calib)
    q = sk.quantize(mnv2, [sk.quant.Weights(per_channel=False, exclude=["features.1.block.0.0"]), sk.quant.Activations()],
                    calib_data=calib)
    assert isinstance(q.features[0][1], nn.Identity)  # the stem's BatchNorm was folded into its conv
