"""4-bit NormalFloat (NF4, QLoRA's grid) weight-only Linear layers: the grid, the layer, the preset,
its export as plain ONNX, save/load, block-by-block quantization and the errors."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slimkit as sk
from slimkit.data import batches
from slimkit.quant.nf4 import NF4, QuantLinearNF4, dequantize_nf4, nf4_groups
from slimkit.quant.passes import GPTQ, Activations, BiasCorrection, Quantize, Weights
from slimkit.quant.weight_only import dequantize_groups, rtn_groups, unpack_nibbles

QLORA_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
             -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
             0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
             0.7229568362236023, 1.0]


def _initializers(path):
    import onnx
    from onnx import numpy_helper

    return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}


def test_the_codebook_is_qloras_and_every_weight_takes_its_nearest_code():
    assert torch.equal(NF4, torch.tensor(QLORA_NF4, dtype=torch.float32))
    # an independent reference: bitsandbytes' construction from the normal quantiles (create_normal_map),
    # 8 positive and 7 negative quantiles between offset and 1/2, an exact zero, scaled into [-1, 1]
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    offset = 0.9677083
    pos = normal.icdf(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -normal.icdf(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    grid = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    torch.testing.assert_close((grid / grid.max()).float(), NF4, rtol=0, atol=2e-7)

    torch.manual_seed(0)
    w = torch.randn(96, 256) * torch.rand(96, 1)
    w[3, 64:128] = 0.0  # an all-zero block: no division by zero, every code on the grid's zero
    codes, absmax = nf4_groups(w, 64, rows=40)  # a few rows at a time: three slices
    assert codes.dtype == torch.uint8 and codes.shape == w.shape and absmax.shape == (96, 4)
    torch.testing.assert_close(absmax, w.abs().reshape(96, 4, 64).amax(-1))
    assert float(absmax[3, 1]) == 0.0 and bool((codes[3, 64:128] == 7).all())
    normed = w.reshape(96, 4, 64) / absmax.clamp_min(1e-30)[..., None]
    brute = (normed[..., None] - NF4).abs().argmin(-1).reshape(96, 256)  # ties: the lower code, as bitsandbytes
    assert torch.equal(codes.long(), brute)
    back = dequantize_nf4(codes, absmax)
    assert not back.isnan().any() and bool((back[3, 64:128] == 0).all())
    torch.testing.assert_close(back, (NF4[brute].reshape(96, 4, 64) * absmax[..., None]).reshape(96, 256))
    # a value exactly between two codes goes to the lower one (bitsandbytes' strict comparisons)
    mid = (NF4[8] + NF4[9]) / 2
    assert nf4_groups(torch.tensor([[float(mid), 1.0]]), 2)[0].tolist() == [[8, 15]]
    with pytest.raises(ValueError, match="group_size 48 does not divide the input dimension 256"):
        nf4_groups(w, 48)


def test_nf4_beats_uniform_symmetric_int4_on_gaussian_weights():
    """The point of NF4: on normally distributed weights its levels sit where the weights are. It beats
    symmetric int4 at the preset's groups of 64 and wider, and QLoRA's own int4 baseline (absmax onto
    [-7, 7]) at every size; in groups of 32 or fewer slimkit's symmetric int4, whose 16 levels put each
    group's extreme on -8, is as close (0.0074 against NF4's 0.0076 here at 32)."""
    torch.manual_seed(0)
    w = torch.randn(512, 1024)
    for group in (16, 32, 64, 128, 256):
        nf4 = float((dequantize_nf4(*nf4_groups(w, group)) - w).pow(2).mean())
        int4 = float((dequantize_groups(*rtn_groups(w, 4, group, symmetric=True)) - w).pow(2).mean())
        g = w.reshape(512, -1, group)
        step = g.abs().amax(-1, keepdim=True) / 7
        absmax_int4 = float((torch.round(g / step) * step - g).pow(2).mean())
        assert nf4 < 0.95 * absmax_int4, (group, nf4, absmax_int4)
        if group >= 64:
            assert nf4 < 0.95 * int4, (group, nf4, int4)


def test_the_preset_gives_drop_in_nf4_layers_close_to_float(trained_mlp, digits):
    q = sk.quantize(trained_mlp, "nf4-weight")
    plan = q.slimkit_plan
    assert plan.quantized_layers == ["1", "3", "5"] and plan.coverage_["fraction"] == 1.0 and not plan.skipped
    for name in ("1", "3", "5"):
        layer, orig = q.get_submodule(name), trained_mlp.get_submodule(name)
        assert isinstance(layer, QuantLinearNF4) and isinstance(layer, nn.Linear)
        assert layer.weight.shape == orig.weight.shape and layer.weight.dtype == orig.weight.dtype
        assert layer.packed.dtype == torch.uint8 and layer.packed.shape == (orig.out_features, orig.in_features // 2)
        assert layer.absmax.shape == (orig.out_features, orig.in_features // 64)
        codes, absmax = nf4_groups(orig.weight, 64)
        assert torch.equal(unpack_nibbles(layer.packed, orig.in_features), codes)
        torch.testing.assert_close(layer.weight, dequantize_nf4(codes, absmax))
        assert not any(n == "weight" for n, _ in layer.named_parameters())
    with pytest.raises(AttributeError, match="holds its weight as NF4 codes"):
        q.get_submodule("1").weight = trained_mlp[1].weight.detach()
    x = digits.test_x
    with torch.no_grad():
        ref, out = trained_mlp(x), q(x)
    assert float((out - ref).norm() / ref.norm()) < 0.1
    assert float((out.argmax(1) == ref.argmax(1)).float().mean()) > 0.97
    with torch.no_grad():  # the float model is untouched
        assert torch.equal(trained_mlp(x), ref)


def test_a_wide_layer_dequantizes_a_slice_at_a_time_and_keeps_its_dtype():
    torch.manual_seed(0)
    wide = nn.Linear(64, 5000)  # over the 4096 rows dequantized at a time
    q = QuantLinearNF4(wide, 64)
    x = torch.randn(3, 64)
    torch.testing.assert_close(q(x), F.linear(x, q.dequantized_weight(), wide.bias), rtol=1e-5, atol=1e-5)
    no_bias = QuantLinearNF4(nn.Linear(64, 8, bias=False), 32)
    torch.testing.assert_close(no_bias(x), x @ no_bias.dequantized_weight().T)
    half = nn.Linear(64, 8).to(torch.bfloat16)
    qh = QuantLinearNF4(half, 64)
    assert qh.weight.dtype == torch.bfloat16 and qh(x.to(torch.bfloat16)).dtype == torch.bfloat16


def test_the_file_holds_the_codes_and_runs_in_onnx_runtime(trained_mlp, digits, tmp_path):
    import onnx
    import onnxruntime as ort

    q = sk.quantize(trained_mlp, "nf4-weight")
    fp32 = sk.export_onnx(trained_mlp, tmp_path / "fp32.onnx", example_inputs=digits.test_x[:4])
    report = sk.export_onnx(q, tmp_path / "nf4.onnx", example_inputs=digits.test_x[:4])  # checks parity itself
    assert report.parity.ok and report.parity.rel_l2 < 1e-5
    # half a byte per weight and a float32 absmax per 64 (0.5 bit): about 0.14x the float file
    assert report.size_bytes < 0.16 * fp32.size_bytes
    model = onnx.load(str(tmp_path / "nf4.onnx"))
    ops = {n.op_type for n in model.graph.node}
    assert {"BitShift", "Gather", "Mul", "MatMul"} <= ops and all(n.domain in ("", "ai.onnx") for n in model.graph.node)
    assert [o.domain for o in model.opset_import] == [""] and model.opset_import[0].version == 17
    stored = _initializers(tmp_path / "nf4.onnx")
    weights = 1024 * 256 + 256 * 128 + 128 * 10
    assert sum(a.size for a in stored.values() if a.dtype == np.uint8) == weights // 2  # the codes, two a byte
    floats = sum(a.size for a in stored.values() if a.dtype == np.float32)
    assert floats == weights // 64 + 256 + 128 + 10 + 16  # absmax, biases, one codebook: no float weight
    assert report.lint.integer_ops == {}  # the runtime multiplies in float: true, and what the format is
    sess = ort.InferenceSession(str(tmp_path / "nf4.onnx"), providers=["CPUExecutionProvider"])
    x = digits.test_x[:32]
    got = sess.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        want = q(x).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_save_and_load_rebuild_the_nf4_model(trained_mlp, digits, tmp_path):
    q = sk.quantize(trained_mlp, "nf4-weight")
    sk.save(q, tmp_path / "nf4")
    from slimkit.zoo import digits_model

    back = sk.load(tmp_path / "nf4", digits_model("mlp"))  # an untrained base: every value comes from the file
    assert isinstance(back.get_submodule("3"), QuantLinearNF4)
    assert back.slimkit_plan.config.weights.format == "nf4"
    with torch.no_grad():
        assert torch.equal(back(digits.test_x[:16]), q(digits.test_x[:16]))


def test_bias_correction_sweeps_nf4_layers(trained_mlp, digits):
    """A layer pass after NF4 rounding goes through the weight-pass sweep, which builds NF4 layers too."""
    calib = batches(digits.train_x[:256], None, 128)
    cfg = Quantize.of([Weights(bits=4, reduce_range=False, group_size=64, format="nf4"), Activations(mode="none"),
                       BiasCorrection()])
    q = sk.quantize(trained_mlp, cfg, calib_data=calib)
    assert all(isinstance(q.get_submodule(n), QuantLinearNF4) for n in ("1", "3", "5"))
    assert q.slimkit_plan.passes["bias_corrected"] == ["1", "3", "5"]
    assert not torch.equal(q.get_submodule("5").bias, trained_mlp[5].bias)  # the bias took the rounding's shift
    codes, _ = nf4_groups(trained_mlp[5].weight, 64)
    assert torch.equal(unpack_nibbles(q.get_submodule("5").packed, 128), codes)


def test_bad_input_and_layers_the_groups_do_not_fit(trained_mlp):
    with pytest.raises(ValueError, match="format='nf4' stores 4-bit codes in groups"):
        Weights(bits=4, format="nf4")
    with pytest.raises(ValueError, match="format='nf4' stores 4-bit codes in groups"):
        Weights(bits=3, group_size=64, format="nf4")
    nf4 = Weights(bits=4, reduce_range=False, group_size=64, format="nf4")
    with pytest.raises(ValueError, match="GPTQ chooses integers on a uniform grid"):
        Quantize.of([nf4, Activations(mode="none"), GPTQ()])
    with pytest.raises(ValueError, match="add Activations\\(mode='none'\\)"):
        Quantize.of([nf4, Activations()])
    # a group size that does not divide a layer's width: that layer stays float, and the plan says why
    q = sk.quantize(trained_mlp, sk.quant.PRESETS["nf4-weight"].with_weights(group_size=256))
    assert q.slimkit_plan.quantized_layers == ["1", "3"]
    assert "does not divide the input dimension 128" in q.slimkit_plan.skipped["5"]
    assert type(q.get_submodule("5")) is nn.Linear


class _Experts(nn.Module):
    """A mixture of experts whose bank is a parameter of its own (no Linear layer holds it)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(64, 4)
        self.experts = nn.Parameter(torch.randn(4, 64, 64) * 0.1)

    def forward(self, x):
        return torch.einsum("be,eio,bi->bo", self.gate(x).softmax(-1), self.experts, x)


def test_weights_a_module_holds_itself_take_nf4_codes(tmp_path):
    torch.manual_seed(0)
    model = _Experts().eval()
    x = torch.randn(8, 64)
    q = sk.quantize(model, "nf4-weight")
    assert isinstance(q, _Experts) and "experts" in q.slimkit_plan.quantized_layers
    assert isinstance(q.gate, QuantLinearNF4) and q.slimkit_plan.coverage_["fraction"] == 1.0
    assert q.experts_q.dtype == torch.uint8 and q.experts_q.shape == (4, 64, 32)
    assert q.experts_absmax.shape == (4, 64, 1)
    codes, absmax = nf4_groups(model.experts.detach().reshape(-1, 64), 64)
    torch.testing.assert_close(q.experts, dequantize_nf4(codes, absmax).reshape(4, 64, 64))  # NF4, not int4
    report = sk.export_onnx(q, tmp_path / "bank.onnx", x)
    assert report.parity.ok
    stored = _initializers(tmp_path / "bank.onnx")
    assert not any(a.dtype == np.float32 and a.size >= 4 * 64 * 64 // 2 for a in stored.values())
    assert any(a.dtype == np.uint8 and a.size == 4 * 64 * 32 for a in stored.values())
    sk.save(q, tmp_path / "saved")
    fresh = _Experts().eval()
    loaded = sk.load(tmp_path / "saved", fresh)
    assert torch.equal(loaded.experts, q.experts) and torch.equal(loaded(x), q(x))


def _llama() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=128)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_a_tiny_llama_quantizes_and_exports_for_generation(tmp_path):
    model = _llama()
    q = sk.quantize(model, "nf4-weight")
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert all(isinstance(q.get_submodule(n), QuantLinearNF4) for n in linears) and len(linears) == 15
    ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, out = model(ids).logits, q(ids).logits
    assert float((out - ref).norm() / ref.norm()) < 0.25
    fp32 = sk.export_onnx(model, tmp_path / "fp32" / "model.onnx", ids, generative=True, check=False)
    report = sk.export_onnx(q, tmp_path / "nf4" / "model.onnx", ids, generative=True)
    assert report.parity.ok and report.tokens_file == report.tokens_torch
    # the tensors: the Linear layers as codes, the tables as int8 rows (a model this small is mostly graph)
    stored = _initializers(tmp_path / "nf4" / "model.onnx")
    float_stored = _initializers(tmp_path / "fp32" / "model.onnx")
    assert sum(a.nbytes for a in stored.values()) < 0.2 * sum(a.nbytes for a in float_stored.values())
    assert report.size_bytes < fp32.size_bytes
    assert not any(a.dtype == np.float32 and a.size >= 64 * 64 for a in stored.values())


def test_a_checkpoint_quantizes_block_by_block_to_the_same_nf4_model(tmp_path):
    model = _llama()
    model.save_pretrained(str(tmp_path / "llama"))
    g = torch.Generator().manual_seed(1)
    calib = [{"input_ids": torch.randint(0, 128, (2, 16), generator=g)} for _ in range(2)]
    streamed, whole = sk.quantize(tmp_path / "llama", "nf4-weight", calib), sk.quantize(model, "nf4-weight")
    assert isinstance(streamed.get_submodule("model.layers.1.mlp.down_proj"), QuantLinearNF4)
    assert streamed.slimkit_plan.quantized_layers == whole.slimkit_plan.quantized_layers
    with torch.no_grad():
        assert torch.equal(streamed(**calib[0]).logits, whole(**calib[0]).logits)


def test_model_code_that_reads_the_weight_exports_it_from_the_codes(tmp_path):
    """``nn.MultiheadAttention`` reads ``out_proj.weight`` and holds ``in_proj_weight`` itself: both
    dequantize from NF4 codes in PyTorch and in the file."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    x = torch.randn(2, 10, 64)
    q = sk.quantize(model, "nf4-weight")
    attn = q.layers[0].self_attn
    assert isinstance(attn.out_proj, QuantLinearNF4) and attn.in_proj_weight_q.dtype == torch.uint8
    assert "layers.0.self_attn" in q.slimkit_plan.passes["held_weights"]["weights"][0]
    with torch.no_grad():
        ref, out = model(x), q(x)
    assert 0 < float((out - ref).norm() / ref.norm()) < 0.1
    report = sk.export_onnx(q, tmp_path / "enc.onnx", x)
    assert report.parity.ok
    stored = _initializers(tmp_path / "enc.onnx")
    assert not any(a.dtype == np.float32 and a.size >= 64 * 64 for a in stored.values())
