"""Group-wise 4-bit weight-only quantization (MatMulNBits) and GPTQ."""

import pytest
import torch
from torch import nn

import slimkit as sk
from slimkit.data import batches
from slimkit.quant.gptq import gptq, hessian, inverse_cholesky
from slimkit.quant.weight_only import (
    QuantLinearNBits,
    dequantize_groups,
    pack_nibbles,
    rtn_groups,
    unpack_nibbles,
)


def _layer_inputs(model, layer, calib):
    seen = []
    h = layer.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        for b in calib:
            model(b)
    h.remove()
    return torch.cat(seen)


def _sqnr(ref_model, q, x):
    with torch.no_grad():
        ref, out = ref_model(x), q(x)
    return float(10 * torch.log10(ref.pow(2).sum() / (out - ref).pow(2).sum()))


def test_packing_and_group_grids():
    q = torch.randint(0, 16, (5, 3, 33), dtype=torch.uint8)
    assert pack_nibbles(q).shape == (5, 3, 17)
    assert torch.equal(unpack_nibbles(pack_nibbles(q), 33), q)
    w = torch.randn(8, 64)
    for symmetric in (True, False):
        q, scale, zp = rtn_groups(w, 4, 16, symmetric)
        assert scale.shape == zp.shape == (8, 4) and int(q.max()) <= 15
        # round to nearest: every weight within half a step of its group's grid (symmetric: the top clips by one)
        step = scale.abs().repeat_interleave(16, 1)
        err = (dequantize_groups(q, scale, zp) - w).abs()
        assert bool((err <= step * (1.0 if symmetric else 0.5) + 1e-6).all())
        assert bool((err <= step / 2 + 1e-6).float().mean() > 0.95)
    assert torch.equal(rtn_groups(w, 4, 16)[2], torch.full((8, 4), 8.0))  # symmetric: zero-point 8
    with pytest.raises(ValueError, match="group_size 24 does not divide the input dimension 64"):
        rtn_groups(w, 4, 24)


def test_gptq_lowers_each_layers_output_error_on_the_trained_mlp(trained_mlp, digits):
    calib = batches(digits.train_x[:512], None, 128)
    x = _layer_inputs(trained_mlp, trained_mlp[1], calib)
    w = trained_mlp[1].weight.detach()

    def out_err(grid):
        return float(((x @ (dequantize_groups(*grid) - w).T) ** 2).mean())

    rtn = out_err(rtn_groups(w, 4, 128))
    assert out_err(gptq(w, hessian(x), 4, 128)) < 0.5 * rtn
    assert out_err(gptq(w, hessian(x), 4, 128, act_order=True)) < 0.5 * rtn
    # the whole model, every layer by GPTQ, each fed the already quantized layers' outputs
    q_rtn = sk.quantize(trained_mlp, "int4-weight")
    q_gptq = sk.quantize(trained_mlp, "int4-gptq", calib_data=calib)
    assert q_gptq.slimkit_plan.passes["gptq"] == ["1", "3", "5"]
    assert _sqnr(trained_mlp, q_gptq, digits.test_x) > _sqnr(trained_mlp, q_rtn, digits.test_x) + 6.0


def test_inverse_cholesky_overwrites_the_hessian_and_equals_the_plain_chain():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 48, generator=g, dtype=torch.float64)
    h = hessian(x)
    h.diagonal().add_(0.01 * h.diagonal().mean())
    want = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    at = h.untyped_storage().data_ptr()
    u = inverse_cholesky(h)
    assert u.untyped_storage().data_ptr() == at  # in the Hessian's own memory: no second [in, in] copy
    assert torch.allclose(u, want, rtol=1e-10, atol=1e-12)
    assert torch.allclose(u.T @ u, torch.linalg.inv(hessian(x) + torch.diag_embed(
        torch.full((48,), 0.01 * float(hessian(x).diagonal().mean()), dtype=torch.float64))), rtol=1e-8, atol=1e-10)
    with pytest.raises(RuntimeError):  # not positive definite: LAPACK's error, which gptq() words
        inverse_cholesky(-torch.eye(4, dtype=torch.float64))


def test_int4_weights_export_as_matmulnbits_and_round_trip(trained_mlp, digits, tmp_path):
    calib = batches(digits.train_x[:256], None, 128)
    q = sk.quantize(trained_mlp, sk.quant.PRESETS["int4-gptq"].with_weights(group_size=32, symmetric=False),
                    calib_data=calib)
    assert all(isinstance(q.get_submodule(n), QuantLinearNBits) for n in ("1", "3", "5"))
    fp32 = sk.export_onnx(trained_mlp, tmp_path / "fp32.onnx", example_inputs=digits.test_x[:4])
    report = sk.export_onnx(q, tmp_path / "int4.onnx", example_inputs=digits.test_x[:4])
    assert report.lint.integer_ops == {"MatMulNBits": 3} and report.parity.rel_l2 < 1e-5
    assert report.size_bytes < 0.2 * fp32.size_bytes  # 4 bits plus a scale and zero-point per 32 weights
    sk.save(q, tmp_path / "int4")
    back = sk.load(tmp_path / "int4", trained_mlp)
    torch.testing.assert_close(back(digits.test_x[:16]), q(digits.test_x[:16]))


def test_group_wise_bad_input_and_unsupported_layers(trained_mlp, trained_resnet, digits):
    with pytest.raises(ValueError, match="group_size must be a power of two, at least 16"):
        sk.QuantConfig(activations="none", weight_bits=4, group_size=48)
    with pytest.raises(ValueError, match="set activations='none'"):
        sk.QuantConfig(weight_bits=4, group_size=128)
    with pytest.raises(ValueError, match="rounding='gptq' works on group-wise weights"):
        sk.QuantConfig(rounding="gptq")
    with pytest.raises(ValueError, match="group-wise weights are 2, 3 or 4 bits"):
        sk.QuantConfig(activations="none", weight_bits=5, group_size=128)
    with pytest.raises(ValueError, match="GPTQ need calib_data"):
        sk.quantize(trained_mlp, "int4-gptq")
    # a group size that does not divide a layer's width: that layer stays float, and the plan says why
    q = sk.quantize(trained_mlp, sk.quant.PRESETS["int4-weight"].with_weights(group_size=256))
    assert q.slimkit_plan.quantized_layers == ["1", "3"]
    assert "does not divide the input dimension 128" in q.slimkit_plan.skipped["5"]
    # convolutions are not group-quantized; the linear head is
    r = sk.quantize(trained_resnet, sk.quant.PRESETS["int4-weight"].with_weights(group_size=32))
    assert r.slimkit_plan.quantized_layers == ["fc"]
    assert r.slimkit_plan.skipped["stem.0"] == "group-wise weight-only quantization covers Linear layers"
    nan = [digits.train_x[:8].clone()]
    nan[0][0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="batch 0 holds NaN"):
        sk.quantize(trained_mlp, "int4-gptq", calib_data=nan)
    with pytest.raises(ValueError, match="Hessian is"):
        gptq(torch.randn(4, 8), torch.eye(6))


class _TinyLM(nn.Module):
    def __init__(self, tie: bool) -> None:
        super().__init__()
        self.emb, self.pos = nn.Embedding(500, 64), nn.Embedding(16, 64)
        self.body, self.head = nn.Linear(64, 64), nn.Linear(64, 500, bias=False)
        if tie:
            self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.relu(self.body(self.emb(ids) + self.pos(torch.arange(ids.shape[1])))))


def test_three_and_two_bit_groups_measure_in_pytorch_and_refuse_to_export(trained_mlp, digits, tmp_path):
    calib = batches(digits.train_x[:256], None, 128)
    sqnr = {}
    for bits in (4, 3, 2):
        q = sk.quantize(trained_mlp, sk.quant.PRESETS["int4-gptq"].with_weights(bits=bits, group_size=32), calib_data=calib)
        assert q.get_submodule("3").bits == bits
        codes = unpack_nibbles(q.get_submodule("3").packed.reshape(q.get_submodule("3").out_features, -1), 128)
        assert int(codes.max()) < 2**bits  # the integers fit the width
        sqnr[bits] = _sqnr(trained_mlp, q, digits.test_x)
    assert sqnr[4] > sqnr[3] + 3 > sqnr[2] + 6  # about 6 dB a bit
    with pytest.raises(ValueError, match=r"layer '1' cannot be exported: 2-bit group-wise weights are not "
                                         r"exported: .* quantize with weight_bits=4 to export"):
        sk.export_onnx(q, tmp_path / "q2.onnx", example_inputs=digits.test_x[:4])
    assert not (tmp_path / "q2.onnx").exists()
    sk.save(q, tmp_path / "q2")  # saved and reloaded like any plan
    torch.testing.assert_close(sk.load(tmp_path / "q2", trained_mlp)(digits.test_x[:16]), q(digits.test_x[:16]))


def test_embedding_tables_shrink_to_int8_rows_and_tied_ones_stay_float(tmp_path):
    torch.manual_seed(0)
    ids = torch.randint(0, 500, (4, 16))
    cfg = sk.quant.PRESETS["int4-weight"].with_weights(group_size=32)
    m = _TinyLM(tie=False).eval()
    q = sk.quantize(m, cfg)
    assert q.slimkit_plan.quantized_layers == ["body", "head", "emb", "pos"]
    assert q.emb.table.dtype == torch.int8 and q.emb.scales.shape == (500,)
    with torch.no_grad():
        rel = float((q.emb(ids) - m.emb(ids)).norm() / m.emb(ids).norm())
    assert rel < 0.01  # int8 rows: under 1% error
    fp32 = sk.export_onnx(m, tmp_path / "fp32.onnx", example_inputs=ids)
    report = sk.export_onnx(q, tmp_path / "q.onnx", example_inputs=ids)
    assert report.size_bytes < 0.25 * fp32.size_bytes
    sk.save(q, tmp_path / "lm")
    torch.testing.assert_close(sk.load(tmp_path / "lm", m)(ids), q(ids))
    # tied to a head that stays float: the table stays float too, one table shared in the file
    tied_model = _TinyLM(tie=True).eval()
    tied = sk.quantize(tied_model, cfg.with_weights(exclude=("head",)))
    assert "emb" not in tied.slimkit_plan.quantized_layers
    assert tied.slimkit_plan.skipped["emb"] == ("its weight is tied to 'head', which stays float; quantizing it apart "
                                                "would untie them")
    assert isinstance(tied.emb, nn.Embedding) and tied.head.weight is tied.emb.weight
    # tied to a head that is quantized: the two are apart anyway, and the table is quantized as well
    both = sk.quantize(tied_model, cfg)
    assert {"emb", "head"} <= set(both.slimkit_plan.quantized_layers)
    assert tied_model.head.weight is tied_model.emb.weight  # the caller's model keeps its tie


def test_awq_lowers_the_output_error_on_the_trained_mlp(trained_mlp, digits, tmp_path):
    from slimkit.quant.awq import awq_scales

    calib = batches(digits.train_x[:512], None, 128)
    scales, alpha, errors = awq_scales(trained_mlp[1].weight, _layer_inputs(trained_mlp, trained_mlp[1], calib), 4, 128)
    assert alpha > 0 and errors[alpha] < 0.97 * errors[0.0]  # alpha = 0 is round to nearest
    q = sk.quantize(trained_mlp, "int4-awq", calib_data=calib)
    assert set(q.slimkit_plan.passes["awq_alpha"]) == {"1", "3", "5"}
    rtn = sk.quantize(trained_mlp, "int4-weight")
    assert _sqnr(trained_mlp, q, digits.test_x) > _sqnr(trained_mlp, rtn, digits.test_x) + 0.5
    report = sk.export_onnx(q, tmp_path / "awq.onnx", example_inputs=digits.test_x[:4])
    assert report.lint.integer_ops == {"MatMulNBits": 3} and report.parity.rel_l2 < 1e-5
    sk.save(q, tmp_path / "awq")
    torch.testing.assert_close(sk.load(tmp_path / "awq", trained_mlp)(digits.test_x[:8]), q(digits.test_x[:8]))
    with pytest.raises(ValueError, match="rounding='awq' works on group-wise weights"):
        sk.QuantConfig(rounding="awq")


def test_awq_clipping_lowers_each_layers_output_error_on_the_trained_mlp(trained_mlp, digits):
    """The clipping search keeps, per row and group, a range no worse than round to nearest's on
    the rows it searched, so each layer's output error drops."""
    from slimkit.quant.awq import awq_clip, awq_scales, output_error_of
    from slimkit.quant.weight_only import dequantize_groups, group_qparams, quantize_groups

    calib = batches(digits.train_x[:512], None, 128)
    x = _layer_inputs(trained_mlp, trained_mlp[3], calib)
    w = trained_mlp[3].weight.detach()
    s, _, _ = awq_scales(w, x, 3, 32)
    for symmetric in (True, False):
        plain = group_qparams(w * s, 3, 32, symmetric)
        clipped = awq_clip(w * s, x / s, 3, 32, symmetric)
        assert bool((clipped[0].abs() <= plain[0].abs()).all()) and torch.equal(clipped[1], plain[1])
        errs = [output_error_of(w, dequantize_groups(quantize_groups(w * s, *g, 3), *g) / s, x) for g in (plain, clipped)]
        assert errs[1] < 0.9 * errs[0]
    # end to end, the clipped ranges shrink this ReLU network's outputs (no normalization puts the
    # scale back, as a transformer's LayerNorm does), so its logits' SQNR is lower, while the
    # accuracy stays at FP32's
    cfg = sk.quant.PRESETS["int4-awq"].with_weights(bits=3, group_size=32)
    with_clip = sk.quantize(trained_mlp, cfg, calib_data=calib)
    without = sk.quantize(trained_mlp, cfg.with_pass(sk.quant.AWQ(clip=False)), calib_data=calib)
    with torch.no_grad():
        ref, out, plain_out = trained_mlp(digits.test_x), with_clip(digits.test_x), without(digits.test_x)
    assert float(out.norm() / ref.norm()) < float(plain_out.norm() / ref.norm()) - 0.01
    acc = [float((y.argmax(1) == digits.test_y).float().mean()) for y in (ref, out)]
    assert acc[1] >= acc[0] - 0.01
    with pytest.raises(ValueError, match="clip must be one of"):
        sk.quant.AWQ(clip="yes")
    with pytest.raises(ValueError, match="max_shrink"):
        awq_clip(w, x, 3, 32, max_shrink=1.0)
    with pytest.raises(ValueError, match="saw none"):
        awq_clip(w, x[:0], 3, 32)


def test_padding_positions_stay_out_of_the_calibration_statistics():
    from slimkit.quant.sequential import token_rows as _token_rows

    x = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])
    rows = _token_rows([x], [{"input_ids": torch.zeros(2, 4, dtype=torch.long), "attention_mask": mask}])
    assert rows.shape == (5, 3) and torch.equal(rows, x[mask.bool()])
    assert _token_rows([x], [torch.zeros(2, 4)]).shape == (8, 3)  # not a tokenizer batch: every row
