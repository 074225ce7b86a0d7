"""The PTQ passes for low bit widths: cross-layer equalization, bias correction, AdaRound."""

from pathlib import Path

import pytest
import torch
from torch import nn

import slimkit as sk
from slimkit.data import batches
from slimkit.quant.adaround import adaround
from slimkit.quant.equalization import equalization_pairs, equalize, equalize_pair
from slimkit.quant.modules import QuantConv, QuantLinear, weight_qparams


def _sqnr(model, q, x):
    with torch.no_grad():
        ref, out = model(x), q(x)
    return float(10 * torch.log10(ref.pow(2).sum() / (out - ref).pow(2).sum()))


def _calib(d, n=256):
    return batches(d.train_x[:n], None, 64)


class Chain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.b = nn.Conv2d(8, 4, 1)
        self.side = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        y = self.b(torch.relu(self.dw(nn.functional.relu(self.a(x)))))
        return y + self.side(x)  # b feeds an add: no pair after it


def test_equalization_keeps_the_function_and_balances_the_ranges():
    torch.manual_seed(0)
    m = Chain().eval()
    with torch.no_grad():  # channels whose ranges differ by 1000x, as depthwise layers have
        m.a.weight.mul_(torch.logspace(-2, 1, 8).reshape(8, 1, 1, 1))
        m.dw.weight.mul_(torch.logspace(1, -2, 8).reshape(8, 1, 1, 1))
    x = torch.randn(2, 3, 8, 8)
    ref = m(x)
    from slimkit.core.graph import trace

    gm = trace(m)
    assert equalization_pairs(gm) == [("a", "dw"), ("dw", "b")]
    equalize(gm)
    torch.testing.assert_close(gm(x), ref, rtol=1e-4, atol=1e-5)
    # after equalization each shared channel has the same range in both layers of a pair
    r1 = gm.dw.weight.reshape(8, -1).abs().amax(1)
    r2 = gm.b.weight.abs().amax(0).reshape(8)
    torch.testing.assert_close(r1, r2, rtol=1e-3, atol=1e-6)
    with pytest.raises(ValueError, match="8 output channels, the second 4"):
        equalize_pair(torch.randn(8, 3), None, torch.randn(2, 4))


def test_equalization_lifts_per_tensor_int8_of_an_imbalanced_depthwise_net():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(),
                      nn.Conv2d(8, 4, 1)).eval()
    with torch.no_grad():  # what BatchNorm folding often leaves in depthwise nets: channel ranges 1000x apart
        m[0].weight.mul_(torch.logspace(-2, 1, 8).reshape(8, 1, 1, 1))
        m[0].bias.mul_(torch.logspace(-2, 1, 8))
        m[2].weight.mul_(torch.logspace(1, -2, 8).reshape(8, 1, 1, 1))
    calib = [torch.randn(16, 3, 8, 8) for _ in range(4)]
    x = torch.randn(64, 3, 8, 8)
    plain = sk.quantize(m, {"per_channel": False}, calib_data=calib)
    cle = sk.quantize(m, "int8-cle", calib_data=calib)
    cle_pt = sk.quantize(m, {"per_channel": False, "equalize": True, "bias_correction": True}, calib_data=calib)
    assert cle_pt.slimkit_plan.passes["equalized_pairs"] == [["0", "2"], ["2", "4"]]
    assert _sqnr(m, cle_pt, x) > _sqnr(m, plain, x) + 6.0  # four times less noise, at least
    assert _sqnr(m, cle, x) > 20


def test_adaround_beats_round_to_nearest_at_4_bits_on_the_mlp(trained_mlp, digits):
    calib = _calib(digits, 128)
    cfg = {"weight_bits": 4, "reduce_range": False, "activations": "none"}
    rtn = sk.quantize(trained_mlp, cfg, calib_data=calib)
    ada = sk.quantize(trained_mlp, {**cfg, "rounding": "adaround", "adaround_iterations": 300}, calib_data=calib)
    assert ada.slimkit_plan.passes["adarounded"] == ["1", "3", "5"]
    assert _sqnr(trained_mlp, ada, digits.test_x) > _sqnr(trained_mlp, rtn, digits.test_x) + 1.0


@pytest.mark.slow
def test_adaround_beats_round_to_nearest_at_4_bits(trained_resnet, digits):
    calib = _calib(digits, 64)
    rtn = sk.quantize(trained_resnet, {"weight_bits": 4, "reduce_range": False}, calib_data=calib)
    ada = sk.quantize(trained_resnet, {"weight_bits": 4, "reduce_range": False, "rounding": "adaround",
                                       "adaround_iterations": 100}, calib_data=calib)
    assert _sqnr(trained_resnet, ada, digits.test_x) > _sqnr(trained_resnet, rtn, digits.test_x) + 1.0
    w = [m.weight_q for m in ada.modules() if isinstance(m, (QuantConv, QuantLinear))]
    assert max(int(t.abs().max()) for t in w) == 7  # still 4-bit integers, the grid unchanged


def test_adaround_core_keeps_the_grid_and_beats_nearest_on_its_objective():
    torch.manual_seed(0)
    # correlated inputs: with independent ones the error splits per weight and nearest is optimal
    w, x = torch.randn(16, 32), torch.randn(512, 32) @ torch.randn(32, 32)
    scale, lo, hi = weight_qparams(w, 4)
    out = lambda inp, wt: inp @ wt.t()  # noqa: E731
    learned = adaround(w, scale, lo, hi, out, [x[:256], x[256:]], iterations=1000)
    q = learned / scale[:, None]
    assert torch.allclose(q, q.round(), atol=1e-4) and q.abs().max() < 7 + 1e-4
    nearest = torch.round(w / scale[:, None]).clamp(lo, hi) * scale[:, None]
    assert ((out(x, learned) - out(x, w)) ** 2).sum() < 0.8 * ((out(x, nearest) - out(x, w)) ** 2).sum()
    with pytest.raises(ValueError, match="calibration inputs"):
        adaround(w, scale, lo, hi, out, [])


def test_bias_correction_removes_the_mean_output_shift(trained_mlp, digits):
    x = digits.test_x
    cfg = {"weight_bits": 3, "reduce_range": False, "per_channel": False, "activations": "none"}
    plain = sk.quantize(trained_mlp, cfg, calib_data=_calib(digits, 128))
    bc = sk.quantize(trained_mlp, {**cfg, "bias_correction": True}, calib_data=_calib(digits, 128))
    with torch.no_grad():
        ref = trained_mlp(x)
        shift_plain = (plain(x) - ref).mean(0).abs().mean()
        shift_bc = (bc(x) - ref).mean(0).abs().mean()
    assert shift_bc < 0.5 * shift_plain


def test_low_bit_models_save_load_and_export(trained_resnet, digits, tmp_path):
    calib = _calib(digits, 64)
    for preset in ("int8-cle", "w4a8"):
        q = sk.quantize(trained_resnet, preset, calib_data=calib)
        sk.save(q, tmp_path / preset)
        from slimkit.zoo import resnet18

        back = sk.load(tmp_path / preset, resnet18(width=16, in_channels=1, small_input=True))
        with torch.no_grad():
            torch.testing.assert_close(back(digits.test_x[:16]), q(digits.test_x[:16]))
        report = sk.export_onnx(q, tmp_path / f"{preset}.onnx", digits.test_x[:2])
        assert Path(report.path).exists()


def test_low_bit_bad_input(trained_mlp):
    with pytest.raises(ValueError, match="AdaRound, BiasCorrection need calib_data"):
        sk.quantize(trained_mlp, "w4a8-adaround")
    with pytest.raises(ValueError, match="weight_grid"):
        sk.QuantConfig(weight_grid="percentile")
    with pytest.raises(ValueError, match="int8_layers names 'nope'"):
        sk.quantize(trained_mlp, {"weight_bits": 4, "activations": "none", "int8_layers": ["nope"]})
    with pytest.raises(ValueError, match="int8_layers fixes some widths"):
        sk.QuantConfig(weight_bits=4, int8_layers=("first",), mixed_bits=(4, 8), target_bits=6.0)
    with pytest.raises(ValueError, match="Equalize, BiasCorrection need calib_data"):
        sk.quantize(trained_mlp, "int8-cle")
    with pytest.raises(ValueError, match="rounding"):
        sk.QuantConfig(rounding="stochastic")
    with pytest.raises(ValueError, match="weight_bits must be in \\[2, 8\\]"):
        sk.QuantConfig(weight_bits=1)
    with pytest.raises(ValueError, match="equalize needs fold_bn"):
        sk.QuantConfig(equalize=True, fold_bn=False)
    with pytest.raises(ValueError, match="adaround_iterations"):
        sk.QuantConfig(rounding="adaround", adaround_iterations=0)
    assert {"w4a8", "w4a8-adaround", "int8-cle"} <= set(sk.presets())


def test_equalization_is_kept_only_where_it_helps_the_trained_mobilenet(digits):
    """Both ways are measured on the calibration data and the closer one returned; a way whose result
    departs past its noise loses. On the shipped digits MobileNetV2, per-tensor INT8 without
    equalization collapses at the first depthwise conv (its BatchNorm scales one channel by 338,
    another by 0.02), and equalization rescues it; with per-channel weights it only costs fidelity."""
    from slimkit.core.fidelity import FidelityError
    from slimkit.zoo import trained

    mnv2 = trained("mobilenet_v2")
    calib = _calib(digits, 64)
    x = digits.test_x[:200]
    per_tensor = [sk.quant.Weights(per_channel=False), sk.quant.Activations()]
    with pytest.raises(FidelityError, match="features.1.block.0.0"):
        sk.quantize(mnv2, per_tensor, calib_data=calib)
    q = sk.quantize(mnv2, [*per_tensor, sk.quant.Equalize()], calib_data=calib)
    report = q.slimkit_plan.passes["equalization"]
    assert report["kept"] and report["sqnr_db_without"] is None and report["sqnr_db_with"] > 20.0
    assert q.slimkit_plan.config.find(sk.quant.Equalize) is not None
    assert _sqnr(mnv2, q, x) > 20.0  # on held-out digits too

    per_channel = [sk.quant.Weights(), sk.quant.Activations()]
    plain = sk.quantize(mnv2, per_channel, calib_data=calib)
    q = sk.quantize(mnv2, [*per_channel, sk.quant.Equalize()], calib_data=calib)
    report = q.slimkit_plan.passes["equalization"]
    assert not report["kept"] and report["sqnr_db_without"] > report["sqnr_db_with"] + 1.0  # it matters here
    assert q.slimkit_plan.config.find(sk.quant.Equalize) is None
    assert _sqnr(mnv2, q, x) >= _sqnr(mnv2, plain, x) - 0.5  # so equalization never costs fidelity on held-out digits


def test_clipped_grid_beats_the_max_grid_at_4_bits(trained_mlp, digits):
    """weight_grid='output' clips each channel where the output error on the calibration data is least:
    4-bit integers still (the clipped weights sit at the grid's ends), the outputs closer than the
    largest-magnitude grid's."""
    calib = _calib(digits, 128)
    cfg = {"weight_bits": 4, "reduce_range": False, "activations": "none"}
    plain = sk.quantize(trained_mlp, cfg)
    clipped = sk.quantize(trained_mlp, {**cfg, "weight_grid": "output"}, calib_data=calib)
    assert clipped.slimkit_plan.passes["clipped_grid"] == ["1", "3", "5"]
    assert _sqnr(trained_mlp, clipped, digits.test_x) > _sqnr(trained_mlp, plain, digits.test_x) + 0.5
    w = [m.weight_q for m in clipped.modules() if isinstance(m, QuantLinear)]
    assert all(int(t.abs().max()) == 7 for t in w)
    with pytest.raises(ValueError, match=r"Weights\(grid='output'\) need calib_data"):
        sk.quantize(trained_mlp, {**cfg, "weight_grid": "output"})
    own = sk.quantize(trained_mlp, {**cfg, "weight_grid": "mse"})  # the weights' own error: no data
    assert own.slimkit_plan.passes["clipped_grid"] == ["1", "3", "5"]
    assert all(int(m.weight_q.abs().max()) == 7 for m in own.modules() if isinstance(m, QuantLinear))


def test_int8_layers_become_layer_bits_in_the_plan(trained_resnet, digits):
    """'first', 'last' and 'depthwise' resolve to names: 7 bits (8 for a depthwise conv), the rest
    at weight_bits; the plan's config says which, and replays on load."""
    from slimkit.quant.config import resolve_int8_layers
    from slimkit.zoo import mobilenet_v2

    m = mobilenet_v2(in_channels=1)
    cfg = resolve_int8_layers(m, sk.Quantize.of([sk.quant.Weights(bits=4, reduce_range=False,
                                                                  int8_layers=("first", "last", "depthwise"))])).weights
    convs = [(n, x) for n, x in m.named_modules() if isinstance(x, (nn.Conv2d, nn.Linear))]
    depthwise = {n for n, x in convs if isinstance(x, nn.Conv2d) and x.groups > 1}
    assert cfg.layer_bits == {convs[0][0]: 7, convs[-1][0]: 7, **{n: 8 for n in depthwise}} and not cfg.int8_layers
    q = sk.quantize(trained_resnet, "w4a8", calib_data=_calib(digits, 64))
    bits = q.slimkit_plan.config.weights.layer_bits
    assert set(bits.values()) == {7} and len(bits) == 2  # ResNet: stem and classifier, no depthwise conv
    widths = {n: int(x.weight_q.abs().max()) for n, x in q.named_modules() if isinstance(x, (QuantConv, QuantLinear))}
    assert all(widths[n] <= 63 for n in bits) and max(v for n, v in widths.items() if n not in bits) == 7


def test_conv_patches_reproduce_the_conv():
    """AdaRound's conv loss on sampled positions: the patch products are the conv's outputs there,
    for a dense conv with stride and 'same' padding and for a depthwise one."""
    from slimkit.quant.patches import conv_patches

    torch.manual_seed(0)
    x = torch.randn(3, 6, 9, 9)
    for conv in (nn.Conv2d(6, 5, 3, stride=2, padding=1, bias=False), nn.Conv2d(6, 5, 3, padding="same", bias=False),
                 nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=False)):
        forward, rows = conv_patches(conv, [x], per_image=10**6, batch_rows=10**6)
        full = conv(x).permute(0, 2, 3, 1).reshape(-1, conv.out_channels)
        got = forward(rows[0], conv.weight)
        assert got.shape == full.shape
        torch.testing.assert_close(got.sort(0).values, full.sort(0).values, atol=1e-5, rtol=1e-5)
    assert conv_patches(nn.Conv2d(6, 6, 3, groups=2), [x]) is None  # grouped, not depthwise: the full conv
