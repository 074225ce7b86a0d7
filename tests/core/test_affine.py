import pytest
import torch

from slimkit.core.affine import (
    choose_qparams,
    dequantize,
    fake_quantize,
    group_view,
    qrange,
    quantize,
    requantize,
    tensor_minmax,
)


def test_qrange_all_widths():
    for bits in range(2, 9):
        assert qrange(bits, True) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        assert qrange(bits, False) == (0, 2**bits - 1)
        assert qrange(bits, True, narrow=True)[0] == -(2 ** (bits - 1)) + 1
    with pytest.raises(ValueError, match="bits"):
        qrange(1, True)


def test_hand_computed_asymmetric():
    # range [-1, 3] on uint8: scale = 4/255, zero point = round(1 / scale) = 64
    s, z = choose_qparams(torch.tensor(-1.0), torch.tensor(3.0), bits=8, signed=False)
    assert float(s) == pytest.approx(4 / 255)
    assert int(z) == 64
    q = quantize(torch.tensor([-1.0, 0.0, 3.0, 10.0]), s, z, 0, 255)
    assert q.tolist() == [0, 64, 255, 255]
    assert dequantize(q, s, z)[1].item() == 0.0  # zero is exact


def test_hand_computed_symmetric_and_range_includes_zero():
    s, z = choose_qparams(torch.tensor(0.5), torch.tensor(2.0), bits=4, signed=True, symmetric=True, narrow=True)
    assert float(s) == pytest.approx(2.0 / 7) and int(z) == 0
    s2, z2 = choose_qparams(torch.tensor(1.0), torch.tensor(2.0), bits=8, signed=False)
    assert int(z2) == 0 and float(s2) == pytest.approx(2 / 255)  # range widened down to 0


@pytest.mark.parametrize("qmin,qmax", [(0, 255), (-128, 127), (0, 15), (-8, 7)])
def test_per_tensor_matches_torch_bit_for_bit(qmin, qmax):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, generator=g) * 3
    s, z = choose_qparams(x.min(), x.max(), bits=(qmax - qmin + 1).bit_length() - 1, signed=qmin < 0)
    ours = fake_quantize(x, s, z, qmin, qmax)
    ref = torch.fake_quantize_per_tensor_affine(x, float(s), int(z), qmin, qmax)
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_per_channel_any_axis_matches_torch(axis):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 5, 7, generator=g)
    lo, hi = tensor_minmax(x, axis)
    s, z = choose_qparams(lo, hi, bits=8, signed=True, symmetric=True)
    ours = fake_quantize(x, s, z, -128, 127, axis=axis)
    ref = torch.fake_quantize_per_channel_affine(x, s, z, axis, -128, 127)
    assert torch.equal(ours, ref)


def test_per_group_along_input_dim():
    w = torch.randn(4, 64)
    w[0, :32] *= 100  # a loud group must not wreck its neighbour
    gv = group_view(w, 32)  # [4, 2, 32]
    lo, hi = gv.amin(-1), gv.amax(-1)
    s, z = choose_qparams(lo, hi, bits=4, signed=True, symmetric=True)
    wq = fake_quantize(gv, s.unsqueeze(-1), z.unsqueeze(-1), -8, 7).reshape_as(w)
    err_group = (wq[0, 32:] - w[0, 32:]).abs().max()
    s_row, z_row = choose_qparams(w.amin(1), w.amax(1), bits=4, signed=True, symmetric=True)
    wq_row = fake_quantize(w, s_row, z_row, -8, 7, axis=0)
    assert err_group < (wq_row[0, 32:] - w[0, 32:]).abs().max() / 10
    with pytest.raises(ValueError, match="does not divide"):
        group_view(w, 48)


def test_requantize_matches_real_arithmetic():
    q = torch.arange(0, 256, dtype=torch.int32)
    out = requantize(q, torch.tensor(0.1), torch.tensor(128), torch.tensor(0.05), torch.tensor(0), -128, 127)
    expected = torch.clamp(torch.round((q - 128) * 0.1 / 0.05), -128, 127)
    assert torch.equal(out.to(torch.int32), expected.to(torch.int32))


def test_fake_quant_straight_through_gradient():
    x = torch.tensor([-5.0, 0.3, 0.7, 5.0], requires_grad=True)
    y = fake_quantize(x, torch.tensor(0.1), torch.tensor(0), -10, 10)
    y.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 0.0]  # identity inside the range, zero when clipped


def test_nan_range_and_empty_tensor_are_errors():
    with pytest.raises(ValueError, match="NaN"):
        choose_qparams(torch.tensor(float("nan")), torch.tensor(1.0))
    with pytest.raises(ValueError, match="empty"):
        tensor_minmax(torch.tensor([]))
