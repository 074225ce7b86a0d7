"""Floating-point formats: FP8 (E4M3 / E5M2, quant/fp8.py) and 16-bit floats (FP16 / BF16, quant/half.py),
in PyTorch and in the exported file."""

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import slimkit as sk
from slimkit.quant import Activations, HalfPrecision, Quantize, Weights
from slimkit.quant.fp8 import fake_fp8, fp8_max, fp8_scale, to_fp8
from slimkit.quant.modules import QuantConv, QuantLinear

transformers = pytest.importorskip("transformers")


def _bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                  vocab_size=200)
    model = transformers.BertModel(cfg).eval()
    batches = [{"input_ids": torch.randint(0, 200, (4, 16)), "attention_mask": torch.ones(4, 16, dtype=torch.long)}
               for _ in range(3)]
    return model, batches


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8),
                         nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4)).eval()


def _initializer_types(path):
    return {onnx.TensorProto.DataType.Name(i.data_type) for i in onnx.load(path).graph.initializer}


# --- FP8 ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt, top, step", [("fp8-e4m3", 448.0, 2 ** -4), ("fp8-e5m2", 57344.0, 2 ** -3)])
def test_fp8_rounding_is_relative_and_saturates(fmt, top, step):
    assert fp8_max(fmt) == top
    x = torch.logspace(-3, 1, 200) * torch.where(torch.arange(200) % 2 == 0, 1.0, -1.0)
    scale = fp8_scale(x.abs().max(), fmt)
    y = fake_fp8(x, scale, fmt)
    assert float(((y - x).abs() / x.abs()).max()) <= step + 1e-6  # half a mantissa step, small values and large
    assert to_fp8(torch.tensor([1e9, -1e9]), torch.tensor(1.0), fmt).float().tolist() == [top, -top]
    assert float(fp8_scale(torch.tensor(0.0), fmt)) == 1.0  # an all-zero tensor: no division by zero


def test_fp8_transformer_quantizes_exports_at_opset_19_and_matches_in_onnx_runtime(tmp_path):
    model, batches = _bert()
    q = sk.quantize(model, "fp8", calib_data=batches)
    layer = q.encoder.layer[0].attention.self.query
    assert isinstance(layer, QuantLinear) and isinstance(layer, nn.Linear) and layer.fmt == "fp8-e4m3"
    assert layer.weight_q.dtype == torch.float8_e4m3fn and layer.weight.shape == (64, 64)
    assert float((layer.weight - model.encoder.layer[0].attention.self.query.weight).detach().abs().max()) \
        <= float(layer.weight_scale.max()) * 16  # within the top binade's step (448 = 1.75 * 2**8, steps of 32)
    plan = q.slimkit_plan
    assert plan.fidelity_["cosine"] > 0.999 and plan.coverage_["fraction"] > 0.4
    report = sk.export_onnx(q, tmp_path / "fp8.onnx", batches[0])
    m = onnx.load(report.path)
    assert {o.version for o in m.opset_import if o.domain in ("", "ai.onnx")} == {19}
    assert "FLOAT8E4M3FN" in _initializer_types(report.path)
    assert report.parity.ok and report.parity.rel_l2 < 1e-5
    assert any("FP8" in i and "float" in i for i in report.lint.issues)  # the lint says it runs in float here
    fp8_nodes = [n for n in m.graph.node if n.op_type == "QuantizeLinear"]
    assert fp8_nodes  # activations go through Q/DQ


def test_fp8_cnn_in_the_graph_keeps_float_biases_and_matches_in_onnx_runtime(tmp_path):
    model = _cnn()
    x = torch.randn(8, 3, 8, 8)
    q = sk.quantize(model, Quantize.of([Weights(format="fp8-e5m2", reduce_range=False),
                                        Activations(format="fp8-e5m2")]), calib_data=[x[:4], x[4:]])
    convs = [m for m in q.modules() if isinstance(m, QuantConv)]
    assert len(convs) == 2 and all(c.weight_q.dtype == torch.float8_e5m2 and not c.bias_quantized for c in convs)
    report = sk.export_onnx(q, tmp_path / "cnn.onnx", x[:2])
    assert report.parity.ok and "FLOAT8E5M2" in _initializer_types(report.path)
    # each ReLU after its FP8 Q/DQ, not before: ONNX Runtime would drop a ReLU feeding a quantizer (exact on
    # uint8's grid, not on FP8's signed one) and compute another function
    nodes = onnx.load(report.path).graph.node
    producer = {o: n for n in nodes for o in n.output}
    relus = [n for n in nodes if n.op_type == "Relu"]
    assert len(relus) == 2 and all(producer[r.input[0]].op_type == "DequantizeLinear" for r in relus)


def test_fp8_saves_and_loads_to_the_same_outputs(tmp_path):
    model, batches = _bert()
    q = sk.quantize(model, "fp8", calib_data=batches)
    sk.save(q, tmp_path / "saved")
    loaded = sk.load(tmp_path / "saved", _bert()[0])
    with torch.no_grad():
        a, b = q(**batches[0]).last_hidden_state, loaded(**batches[0]).last_hidden_state
    assert torch.equal(a, b)


@pytest.mark.parametrize("passes, message", [
    ([Weights(format="fp8-e4m3"), Activations()], "FP8 weights take FP8 activations"),
    ([Weights(), Activations(format="fp8-e4m3")], "FP8 weights take FP8 activations"),
    ([Weights(format="fp8-e4m3"), Activations(format="fp8-e4m3", mode="static"), "bias_correction"], "integer grids"),
])
def test_fp8_refuses_what_does_not_fit(passes, message):
    with pytest.raises(ValueError, match=message):
        Quantize.of(passes)


def test_fp8_bad_fields_are_named():
    with pytest.raises(ValueError, match="mode='static'"):
        Activations(format="fp8-e4m3", mode="dynamic")
    with pytest.raises(ValueError, match="format"):
        Weights(format="fp6")
    with pytest.raises(ValueError, match="group_size"):
        Weights(format="fp8-e4m3", group_size=128, bits=4)


# --- FP16 / BF16 -------------------------------------------------------------------------------

def test_fp16_computes_in_half_keeps_norms_in_float_and_returns_float(tmp_path):
    model, batches = _bert()
    q = sk.quantize(model, "fp16", calib_data=batches[:1])
    assert q.encoder.layer[0].intermediate.dense.weight.dtype == torch.float16
    assert q.embeddings.LayerNorm.weight.dtype == torch.float32
    assert model.encoder.layer[0].intermediate.dense.weight.dtype == torch.float32  # the caller's model untouched
    with torch.no_grad():
        out = q(**batches[0]).last_hidden_state
    assert out.dtype == torch.float32
    plan = q.slimkit_plan
    assert plan.skipped["embeddings.LayerNorm"].startswith("normalization")
    assert plan.coverage_["fraction"] == 1.0 and 0.9999 < plan.fidelity_["cosine"]
    report = sk.export_onnx(q, tmp_path / "fp16.onnx", batches[0])
    assert "FLOAT16" in _initializer_types(report.path) and report.parity.ok
    fp32 = sk.export_onnx(model, tmp_path / "fp32.onnx", batches[0])
    assert report.size_bytes < 0.6 * fp32.size_bytes


@pytest.mark.parametrize("preset, dtype, onnx_type", [("fp16-weights", torch.float16, "FLOAT16"),
                                                      ("bf16-weights", torch.bfloat16, "BFLOAT16")])
def test_16_bit_weights_halve_the_file_and_keep_float32_arithmetic(tmp_path, preset, dtype, onnx_type):
    model, batches = _bert()
    q = sk.quantize(model, preset)
    w = q.encoder.layer[0].output.dense.weight
    assert w.dtype == torch.float32 and torch.equal(w, w.to(dtype).float())  # on the 16-bit grid, held in FP32
    report = sk.export_onnx(q, tmp_path / "w16.onnx", batches[0])
    fp32 = sk.export_onnx(model, tmp_path / "fp32.onnx", batches[0])
    types = _initializer_types(report.path)
    assert onnx_type in types and report.size_bytes < 0.6 * fp32.size_bytes
    assert report.parity.ok and report.parity.rel_l2 < 1e-5  # the same numbers: no rounding in the file
    casts = [n for n in onnx.load(report.path).graph.node if n.op_type == "Cast"]
    assert len(casts) >= 12  # every weight matrix read through a Cast to FP32


def test_bf16_computes_in_bfloat16_and_its_file_is_refused_for_the_cpu_check_unless_asked(tmp_path):
    model, batches = _bert()
    q = sk.quantize(model, "bf16", calib_data=batches[:1])
    assert q.pooler.dense.weight.dtype == torch.bfloat16
    assert q.slimkit_plan.fidelity_["cosine"] > 0.999
    with pytest.raises(ValueError, match="no BF16 MatMul.*bf16-weights"):
        sk.export_onnx(q, tmp_path / "bf16.onnx", batches[0])
    assert not (tmp_path / "bf16.onnx").exists()
    report = sk.export_onnx(q, tmp_path / "bf16.onnx", batches[0], check=False)
    assert "BFLOAT16" in _initializer_types(report.path) and report.parity is None
    assert "not run or checked" in report.lint.issues[0]


def test_half_precision_keeps_what_the_user_names_and_round_trips(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    cfg = Quantize.of([HalfPrecision(dtype="float16", keep_float=("2",))])
    assert Quantize.from_dict(cfg.to_dict()) == cfg
    q = sk.quantize(model, cfg)
    assert q[0].weight.dtype == torch.float16 and q[2].weight.dtype == torch.float32
    assert q.slimkit_plan.skipped == {"2": "keep_float: kept in float32"}
    x = torch.randn(5, 16)
    sk.save(q, tmp_path / "saved")
    loaded = sk.load(tmp_path / "saved", nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)))
    assert torch.equal(q(x), loaded(x)) and loaded[0].weight.dtype == torch.float16


def test_half_precision_bad_input_is_named():
    with pytest.raises(ValueError, match="dtype"):
        HalfPrecision(dtype="float8")
    with pytest.raises(ValueError, match="compute"):
        HalfPrecision(compute="int8")
    with pytest.raises(ValueError, match="stands alone.*Weights"):
        Quantize.of([Weights(), HalfPrecision()])


def test_the_cnn_in_fp16_matches_in_onnx_runtime(tmp_path):
    model = _cnn()
    x = torch.randn(4, 3, 8, 8)
    q = sk.quantize(model, "fp16", calib_data=[x])
    assert q[1].weight.dtype == torch.float32 and q[0].weight.dtype == torch.float16  # BatchNorm in FP32
    report = sk.export_onnx(q, tmp_path / "cnn16.onnx", x)
    assert report.parity.ok
    with torch.no_grad():
        assert np.allclose(q(x).numpy(), model(x).numpy(), atol=1e-2)


def _tiny_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=128)
    return transformers.LlamaForCausalLM(cfg).eval(), torch.randint(0, 128, (1, 8))


def test_a_decoder_with_16_bit_weights_exports_for_generation_at_half_the_tensors(tmp_path):
    model, ids = _tiny_llama()
    q = sk.quantize(model, "fp16-weights")
    report = sk.export_onnx(q, tmp_path / "gen" / "model.onnx", ids, generative=True)
    assert report.parity.ok and report.tokens_torch == report.tokens_file
    assert "FLOAT16" in _initializer_types(report.path)
    with pytest.raises(ValueError, match="fp16-weights"):
        sk.export_onnx(sk.quantize(model, "fp16"), tmp_path / "gen16" / "model.onnx", ids, generative=True)


def test_an_fp8_decoder_exports_for_generation(tmp_path):
    model, ids = _tiny_llama()
    calib = [{"input_ids": torch.randint(0, 128, (2, 16))} for _ in range(2)]
    q = sk.quantize(model, "fp8", calib_data=calib)
    report = sk.export_onnx(q, tmp_path / "gen8" / "model.onnx", ids, generative=True)
    assert report.parity.ok and "FLOAT8E4M3FN" in _initializer_types(report.path)


# --- TensorRT's explicit quantization ----------------------------------------------------------

def test_the_tensorrt_placement_writes_symmetric_int8_float_biases_and_quantized_residuals(tmp_path, trained_resnet,
                                                                                          digits):
    from slimkit.export.lint import lint

    calib = [digits.train_x[i:i + 64] for i in range(0, 128, 64)]
    q = sk.quantize(trained_resnet, "int8-tensorrt", calib_data=calib)
    report = sk.export_onnx(q, tmp_path / "trt.onnx", digits.test_x[:4])
    assert report.parity.ok and report.lint.issues == []
    graph = onnx.load(report.path).graph
    inits = {i.name: i for i in graph.initializer}
    zps = [inits[n.input[2]] for n in graph.node if n.op_type == "QuantizeLinear"]
    assert zps and all(z.data_type == onnx.TensorProto.INT8 and not onnx.numpy_helper.to_array(z).any() for z in zps)
    assert not any(i.data_type == onnx.TensorProto.INT32 for i in graph.initializer)  # biases stay float
    producer = {o: n for n in graph.node for o in n.output}
    adds = [n for n in graph.node if n.op_type == "Add"]
    assert adds and all(producer[i].op_type == "DequantizeLinear" for n in adds for i in n.input)
    with torch.no_grad():
        agree = (q(digits.test_x).argmax(1) == trained_resnet(digits.test_x).argmax(1)).float().mean()
    assert agree > 0.98
    # the same rules fail ONNX Runtime's own form: uint8 activations, int32 biases
    ort_form = sk.export_onnx(sk.quantize(trained_resnet, "int8", calib_data=calib), tmp_path / "ort.onnx",
                              digits.test_x[:4])
    issues = lint(ort_form.path, "tensorrt").issues
    assert any("not symmetric int8" in i for i in issues) and any("int32 bias" in i for i in issues)


def test_the_tensorrt_rules_find_a_float_residual_and_a_float_input():
    from onnx import TensorProto, helper

    from slimkit.export.lint import tensorrt_issues

    w = onnx.numpy_helper.from_array(np.ones((4, 4), np.int8), "w")
    s = onnx.numpy_helper.from_array(np.ones(4, np.float32), "s")
    nodes = [helper.make_node("DequantizeLinear", ["w", "s"], ["wf"], axis=0),
             helper.make_node("Gemm", ["x", "wf"], ["y"], transB=1),  # a float input into quantized weights
             helper.make_node("Add", ["y", "x"], ["z"])]  # a residual that is not quantized
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 4])], [w, s])
    issues = tensorrt_issues(g)
    assert any("float input" in i for i in issues) and any("residual input" in i for i in issues)


def test_the_tensorrt_placement_takes_calibrated_activations_only():
    with pytest.raises(ValueError, match="placement='tensorrt'.*static"):
        Activations(placement="tensorrt", mode="dynamic")


def test_torch_attention_stays_float32_in_fp16_and_the_file_loads(tmp_path):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, dropout=0.0)
    model = nn.Sequential(nn.Linear(8, 32), nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)).eval()
    x = torch.randn(2, 5, 8)
    q = sk.quantize(model, "fp16", calib_data=[x])
    attn = q[1].layers[0].self_attn
    assert attn.in_proj_weight.dtype == torch.float32 and q[1].layers[0].linear1.weight.dtype == torch.float16
    assert "MultiheadAttention" in q.slimkit_plan.skipped["1.layers.0.self_attn"]
    report = sk.export_onnx(q, tmp_path / "mha16.onnx", x)  # ONNX Runtime 1.32 crashed loading its FP16 form
    assert report.parity.ok


def test_fp8_leaves_weights_a_module_holds_itself_in_float_and_says_so():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.TransformerEncoder(
        nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, dropout=0.0), 1, enable_nested_tensor=False)).eval()
    x = torch.randn(2, 5, 8)
    q = sk.quantize(model, "fp8", calib_data=[x, x])
    attn = q[1].layers[0].self_attn
    assert attn.in_proj_weight.dtype == torch.float32 and "in_proj_weight" in dict(attn.named_parameters())
    assert "stays float with fp8-e4m3" in q.slimkit_plan.skipped["1.layers.0.self_attn.in_proj_weight"]
